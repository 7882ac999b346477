"""How much GPU memory a training stage needs, which method fits (full, LoRA, QLoRA), and for how long.

``estimate_memory`` splits one device's memory into the parts that decide whether a run fits
(GiB; 1 GiB = 2**30 bytes)::

    weights      the trained model's parameters as they are held during training
    gradients    one gradient per trainable parameter
    optimizer    AdamW's two moments per trainable parameter (fp32)
    activations  what the backward pass needs from the forward, per layer and token
    logits       the vocabulary projection of the trained tokens and its gradient
    overhead     CUDA context, kernels and allocator slack (a fixed allowance)

``estimate_stage`` adds what each stage holds besides (``stage=``)::

    sft     the parts above
    rm      the parts above for both sequences of each pair (chosen and rejected), with a one-output score head
    dpo     as rm with the LM head, plus ``reference``: nothing when the reference log-probs are cached
            (``reference="cache"``, the kit's way: computed once before training from the starting model
            itself, which TRL's precompute also holds only during the precompute) or when adapters train
            (the reference is the model with its adapters off); a frozen copy in the compute dtype for
            full fine-tuning against a live reference (``reference="live"``)
    rlvr    PPO: the policy and the value model both train (weights to activations count both), a frozen
            ``reference`` policy in the compute dtype, a frozen ``reward_model`` only when its score is used
            (Tulu 3's RLVR has reward_model_multiplier 0: not loaded), and the generation ``kv_cache`` of
            the rollout batch over prompt + response

``plan_memory`` adds them up for each method and picks the first that fits in 90% of the GPU, in
the order of quality per byte: full fine-tuning, then LoRA on bf16/fp16 weights, then QLoRA on
4-bit weights; when none fits, its reason names the GPU, the need and the fixes, raised as
:class:`MemoryDoesNotFitError` with ``refuse=True``. ``plan_memory_from(plan)`` reads every argument
from a profile's plan, and refuses.
``MemoryPlan.describe()`` says why. ``lora_config()`` and ``qlora_quantization_config()`` build the
PEFT and bitsandbytes settings for LoRA and QLoRA.

``estimate_hours`` turns a plan into training time on a GPU of :data:`GPUS` from its FLOPs (and, for
PPO, the memory traffic of generation); ``memory_table`` crosses the paper's stages with those GPUs
and ``readme_section`` prints the README's "Memory and time per GPU" section from it.

Written by hand: neither transformers, PEFT nor accelerate estimates training memory for a given
sequence length and batch (accelerate's ``estimate-memory`` counts weights only), so the accounting
below is the kit's, from the sources named at each number. It is an estimate: it ignores memory
fragmentation peaks and kernels' workspaces beyond the fixed overhead, so leave the 10% margin.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import KitError

GIB = 2**30
METHODS = ("full", "lora", "qlora")
#: The share of the GPU a plan may fill; the rest absorbs fragmentation and estimate error.
USABLE_FRACTION = 0.9  # kit choice: 10% margin
#: CUDA context, cuBLAS/cuDNN workspaces and allocator slack, in GiB.
OVERHEAD_GIB = 1.0  # kit choice: a CUDA context alone takes 0.3-0.5 GiB

#: Bytes per parameter of each dtype name the kit uses.
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
#: NF4 with double quantization: 4 bits + 0.127 bits of quantization constants per parameter
#: (QLoRA, Dettmers et al. 2023, section 3 "Double Quantization").
NF4_BYTES = (4 + 0.127) / 8
#: Activation bytes per token, per layer and per unit of hidden size for a transformer block with
#: 16-bit activations: 34 (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
#: Transformer Models", eq. 1), without the 5*heads*seq/hidden term of the stored attention scores,
#: since SDPA and FlashAttention never keep the seq x seq matrix.
ACTIVATION_BYTES_PER_HIDDEN = 34
#: With gradient checkpointing each layer keeps only its input (2 bytes per hidden unit and token in
#: 16-bit); one layer's full activations are rebuilt at a time during the backward pass.
CHECKPOINT_BYTES_PER_HIDDEN = 2
#: TRL's fused LM head projects at most this many tokens times this many vocabulary entries at once
#: (trl 1.16: kernels/chunked_logprob.py TOKEN_CHUNK_SIZE and trainer/utils.py chunk size).
FUSED_TOKEN_TILE = 4096
FUSED_VOCAB_TILE = 32768
#: LoRA adapters on every projection of the attention and MLP blocks (see :func:`lora_config`).
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_RANK = 64  # Tulu 3: open-instruct finetune.py default lora_rank
LORA_ALPHA = 16  # Tulu 3: open-instruct finetune.py default lora_alpha
LORA_DROPOUT = 0.1  # Tulu 3: open-instruct finetune.py default lora_dropout


class MemoryPlanError(KitError, ValueError):
    """A model shape or method the memory planner cannot use; the message says what to give instead."""


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that set its training memory."""

    name: str
    n_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    n_heads: int
    n_kv_heads: int
    n_params: int | None = None  # None: computed from the shape (Llama layout, tied embeddings)
    tied_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    @property
    def kv_size(self) -> int:
        """Width of the key and value projections (smaller than hidden with grouped-query attention)."""
        return self.n_kv_heads * self.head_dim

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)

    @property
    def parameters(self) -> int:
        """``n_params`` when given, else the count of a Llama block stack with RMSNorm and SwiGLU."""
        if self.n_params is not None:
            return self.n_params
        h, i, kv = self.hidden_size, self.intermediate_size, self.kv_size
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q, o; k, v; gate, up, down; 2 norms
        return self.embedding_params + self.n_layers * per_layer + h

    def lora_parameters(self, rank: int = LORA_RANK) -> int:
        """Trainable parameters of rank-``rank`` adapters on the seven projections of every layer."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.kv_size
        fan_sums = [h + h, h + kv, h + kv, h + h, h + i, h + i, i + h]  # q, k, v, o, gate, up, down
        return self.n_layers * rank * sum(fan_sums)


#: Shapes of the models the kit trains, from their Hub config.json files.
KNOWN_SHAPES: dict[str, ModelShape] = {
    "HuggingFaceTB/SmolLM2-1.7B": ModelShape(
        "HuggingFaceTB/SmolLM2-1.7B", n_layers=24, hidden_size=2048, intermediate_size=8192,
        vocab_size=49152, n_heads=32, n_kv_heads=32,
    ),
    "HuggingFaceTB/SmolLM2-135M": ModelShape(
        "HuggingFaceTB/SmolLM2-135M", n_layers=30, hidden_size=576, intermediate_size=1536,
        vocab_size=49152, n_heads=9, n_kv_heads=3,
    ),
}  # fmt: skip
for _base in list(KNOWN_SHAPES):
    KNOWN_SHAPES[f"{_base}-Instruct"] = dataclasses.replace(KNOWN_SHAPES[_base], name=f"{_base}-Instruct")
KNOWN_SHAPES["SultanR/SmolTulu-1.7b-Instruct"] = dataclasses.replace(
    KNOWN_SHAPES["HuggingFaceTB/SmolLM2-1.7B"], name="SultanR/SmolTulu-1.7b-Instruct"
)
KNOWN_SHAPES["SultanR/SmolTulu-1.7b-RM"] = dataclasses.replace(  # the value model's start (a score head)
    KNOWN_SHAPES["HuggingFaceTB/SmolLM2-1.7B"], name="SultanR/SmolTulu-1.7b-RM"
)
KNOWN_SHAPES["bundled"] = dataclasses.replace(KNOWN_SHAPES["HuggingFaceTB/SmolLM2-135M"], name="bundled")


def model_shape(model_config_or_name: Any) -> ModelShape:
    """A :class:`ModelShape` from a known name, a transformers config, a model, a mapping or a shape."""
    source = model_config_or_name
    if isinstance(source, ModelShape):
        return source
    if isinstance(source, str):
        if source in KNOWN_SHAPES:
            return KNOWN_SHAPES[source]
        raise MemoryPlanError(
            f"no known shape for {source!r} (known: {', '.join(KNOWN_SHAPES)}). Pass its config instead: "
            f"plan_memory(AutoConfig.from_pretrained({source!r}), ...)."
        )
    config = getattr(source, "config", source)  # a model carries its config
    if not isinstance(config, Mapping) and hasattr(config, "get_text_config"):
        config = config.get_text_config()

    def get(key: str, default: Any = None) -> Any:
        return config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)

    try:
        n_heads = int(get("num_attention_heads"))
        shape = ModelShape(
            name=str(get("_name_or_path", "") or get("name", "") or type(config).__name__),
            n_layers=int(get("num_hidden_layers")),
            hidden_size=int(get("hidden_size")),
            intermediate_size=int(get("intermediate_size")),
            vocab_size=int(get("vocab_size")),
            n_heads=n_heads,
            n_kv_heads=int(get("num_key_value_heads") or n_heads),
            n_params=get("n_params"),
            tied_embeddings=bool(get("tie_word_embeddings", True)),
        )
    except (TypeError, ValueError) as exc:
        raise MemoryPlanError(
            f"cannot read a decoder shape from {type(config).__name__}: it needs num_hidden_layers, "
            "hidden_size, intermediate_size, vocab_size and num_attention_heads."
        ) from exc
    if hasattr(source, "parameters") and callable(source.parameters) and shape.n_params is None:
        shape = dataclasses.replace(shape, n_params=sum(p.numel() for p in source.parameters()))
    return shape


def _dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise MemoryPlanError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def estimate_memory(
    n_params: int,
    *,
    max_length: int,
    per_device_batch: int,
    dtype: str,
    method: str,
    gradient_checkpointing: bool,
    n_layers: int,
    hidden_size: int,
    vocab_size: int,
    trainable_params: int | None = None,
    embedding_params: int = 0,
    fused_lm_head: bool = True,
    logit_tokens: int | None = None,
) -> dict[str, float]:
    """Memory of one training device, in GiB per part, plus ``total``.

    ``method``:
      - ``"full"``: every parameter trains in mixed precision as the Trainer runs it (fp32 weights,
        fp32 gradients, fp32 AdamW moments: 4 + 4 + 8 = 16 bytes per parameter; autocast makes the
        16-bit copies on the fly). The same 16 bytes as ZeRO's mixed-precision Adam accounting.
      - ``"lora"``: frozen weights in ``dtype`` (2 bytes in bf16/fp16), plus ``trainable_params``
        adapter parameters at 16 bytes each.
      - ``"qlora"``: frozen block weights in NF4 with double quantization (0.516 bytes per parameter);
        ``embedding_params`` (not quantized by bitsandbytes) stay in ``dtype``; adapters as in LoRA.

    Activations: 34 bytes per token, layer and hidden unit in 16-bit (twice that in fp32); with
    ``gradient_checkpointing``, 2 bytes per token, layer and hidden unit plus one layer's full
    activations. Logits: with TRL's fused LM head (``fused_lm_head``) only a tile of at most
    4096 tokens x 32768 vocabulary entries exists at a time (fp32, forward and backward buffers);
    without it, every token's fp32 logits and their gradient. ``logit_tokens``: how many tokens go
    through the LM head (default all ``max_length x per_device_batch``; PPO projects only the response).
    """
    if method not in METHODS:
        raise MemoryPlanError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if min(n_params, max_length, per_device_batch, n_layers, hidden_size, vocab_size) <= 0:
        raise MemoryPlanError("n_params, max_length, per_device_batch and the shape must all be positive")
    half = _dtype_bytes(dtype)
    tokens = max_length * per_device_batch
    if method == "full":
        trainable = n_params
        weights = 4 * n_params
    else:
        if trainable_params is None:
            raise MemoryPlanError(f"method {method!r} needs trainable_params (the adapter parameter count)")
        trainable = trainable_params
        if method == "lora":
            weights = half * n_params + 4 * trainable
        else:
            weights = NF4_BYTES * (n_params - embedding_params) + half * embedding_params + 4 * trainable
    act_scale = half / 2  # the 34 and 2 bytes are for 16-bit activations
    if gradient_checkpointing:
        per_token = (CHECKPOINT_BYTES_PER_HIDDEN * n_layers + ACTIVATION_BYTES_PER_HIDDEN) * hidden_size
    else:
        per_token = ACTIVATION_BYTES_PER_HIDDEN * n_layers * hidden_size
    activations = act_scale * per_token * tokens
    projected = tokens if logit_tokens is None else logit_tokens
    if fused_lm_head:
        logits = 2 * 4 * min(projected, FUSED_TOKEN_TILE) * min(vocab_size, FUSED_VOCAB_TILE)
    else:
        logits = 2 * 4 * projected * vocab_size
    parts = {
        "weights": weights / GIB,
        "gradients": 4 * trainable / GIB,
        "optimizer": 8 * trainable / GIB,
        "activations": activations / GIB,
        "logits": logits / GIB,
        "overhead": OVERHEAD_GIB,
    }
    parts["total"] = sum(parts.values())
    return parts


def estimate_for_shape(
    shape: ModelShape,
    *,
    max_length: int,
    per_device_batch: int,
    dtype: str,
    method: str,
    gradient_checkpointing: bool = True,
    lora_rank: int = LORA_RANK,
) -> dict[str, float]:
    """:func:`estimate_memory` with the shape's numbers filled in."""
    return estimate_memory(
        shape.parameters,
        max_length=max_length,
        per_device_batch=per_device_batch,
        dtype=dtype,
        method=method,
        gradient_checkpointing=gradient_checkpointing,
        n_layers=shape.n_layers,
        hidden_size=shape.hidden_size,
        vocab_size=shape.vocab_size,
        trainable_params=None if method == "full" else shape.lora_parameters(lora_rank),
        embedding_params=shape.embedding_params,
    )


#: The stages the planner knows (a recipe's ``stage``); ``"ppo"`` is read as ``"rlvr"``.
STAGES = ("sft", "rm", "dpo", "rlvr")
#: Where DPO's reference log-probs come from: computed once before training ("cache"), or a frozen
#: reference model run beside the policy at every step ("live").
REFERENCES = ("cache", "live")
#: The order of the parts in an estimate (``describe`` prints them in it).
PART_ORDER = (
    "weights", "gradients", "optimizer", "activations", "logits", "reference", "reward_model", "kv_cache",
    "overhead",
)  # fmt: skip


def _stage_name(stage: str) -> str:
    name = "rlvr" if stage == "ppo" else stage
    if name not in STAGES:
        raise MemoryPlanError(f"unknown stage {stage!r}; use one of {', '.join(STAGES)} ('ppo' means rlvr)")
    return name


def _frozen_bytes(shape: ModelShape, method: str, half: int) -> float:
    """A frozen model's weights: 16-bit, or NF4 blocks with a 16-bit embedding when the method is QLoRA."""
    if method == "qlora":
        return NF4_BYTES * (shape.parameters - shape.embedding_params) + half * shape.embedding_params
    return half * shape.parameters


def _total(parts: dict[str, float]) -> dict[str, float]:
    ordered = {k: parts[k] for k in PART_ORDER if k in parts}
    ordered["total"] = sum(ordered.values())
    return ordered


def estimate_stage(
    model_config_or_name: Any,
    *,
    stage: str = "sft",
    max_length: int,
    per_device_batch: int,
    dtype: str,
    method: str,
    gradient_checkpointing: bool = True,
    lora_rank: int = LORA_RANK,
    reference: str = "cache",
    prompt_length: int | None = None,
    response_length: int | None = None,
    rollout_batch: int | None = None,
    value_model: Any = None,
    reward_model: Any = None,
) -> dict[str, float]:
    """Memory of one device for one stage and method, in GiB per part plus ``total`` (see the module doc).

    ``per_device_batch`` counts sequences for sft, pairs for rm and dpo (two sequences each) and the
    PPO micro-batch for rlvr. rlvr needs ``prompt_length`` and ``response_length``; ``rollout_batch``
    is the number of prompts one device generates for at once (default ``per_device_batch``);
    ``value_model`` is the value model's shape or name when it differs from the policy's (it starts
    from the reward model); ``reward_model`` is the frozen reward model's, or None when its score is
    not used. With LoRA or QLoRA the value model trains adapters too and the reference is the policy
    with its adapters off.
    """
    stage = _stage_name(stage)
    if reference not in REFERENCES:
        raise MemoryPlanError(f"unknown reference {reference!r}; use 'cache' or 'live'")
    shape = model_shape(model_config_or_name)
    if stage == "sft":
        return estimate_for_shape(
            shape, max_length=max_length, per_device_batch=per_device_batch, dtype=dtype, method=method,
            gradient_checkpointing=gradient_checkpointing, lora_rank=lora_rank,
        )  # fmt: skip
    half = _dtype_bytes(dtype)

    def trained(model: ModelShape, length: int, sequences: int, vocab: int, **kw: Any) -> dict[str, float]:
        return estimate_memory(
            model.parameters, max_length=length, per_device_batch=sequences, dtype=dtype, method=method,
            gradient_checkpointing=gradient_checkpointing, n_layers=model.n_layers,
            hidden_size=model.hidden_size, vocab_size=vocab,
            trainable_params=None if method == "full" else model.lora_parameters(lora_rank),
            embedding_params=model.embedding_params, **kw,
        )  # fmt: skip

    if stage in ("rm", "dpo"):  # chosen and rejected go through the model together (TRL concatenates them)
        parts = trained(shape, max_length, 2 * per_device_batch, shape.vocab_size if stage == "dpo" else 1)
        if stage == "dpo":
            live_copy = reference == "live" and method == "full"
            parts["reference"] = (half * shape.parameters if live_copy else 0.0) / GIB
        return _total(parts)

    if prompt_length is None or response_length is None:
        raise MemoryPlanError(
            "stage 'rlvr' needs prompt_length and response_length (the recipe's); "
            "plan_memory_from(plan) reads them from a plan."
        )
    length = prompt_length + response_length
    projected = per_device_batch * response_length  # PPO takes log-probs of the response tokens only
    policy = trained(shape, length, per_device_batch, shape.vocab_size, fused_lm_head=False,
                     logit_tokens=projected)  # fmt: skip
    value_shape = model_shape(value_model) if value_model is not None else shape
    value = trained(value_shape, length, per_device_batch, 1, fused_lm_head=False, logit_tokens=projected)
    parts = {k: policy[k] + value[k] for k in ("weights", "gradients", "optimizer", "activations", "logits")}
    parts["reference"] = (half * shape.parameters if method == "full" else 0.0) / GIB
    reward = model_shape(reward_model) if reward_model is not None else None
    parts["reward_model"] = (_frozen_bytes(reward, method, half) if reward else 0.0) / GIB
    rollout = rollout_batch or per_device_batch
    kv_per_token = 2 * shape.n_layers * shape.kv_size * half  # keys and values of every layer
    parts["kv_cache"] = rollout * length * kv_per_token / GIB
    parts["overhead"] = OVERHEAD_GIB
    return _total(parts)


@dataclass(frozen=True)
class MemoryPlan:
    """The method chosen for one GPU, the estimate of every method, and why."""

    method: str
    fits: bool
    gpu_gib: float
    budget_gib: float
    estimates: dict[str, dict[str, float]] = field(repr=False)
    reason: str
    model: str
    max_length: int
    per_device_batch: int
    dtype: str
    gradient_checkpointing: bool
    stage: str = "sft"
    gpu_name: str = ""
    settings: dict[str, Any] = field(default_factory=dict, repr=False)  # the stage's own arguments

    @property
    def estimate(self) -> dict[str, float]:
        """The estimate of the chosen method."""
        return self.estimates[self.method]

    @property
    def gpu(self) -> str:
        """The GPU in words: its name when known, and its size."""
        return f"{self.gpu_name} ({self.gpu_gib:g} GiB)" if self.gpu_name else f"a {self.gpu_gib:g} GiB GPU"

    def describe(self) -> str:
        """A few lines: the choice and why, then each method's parts in GiB."""
        run = f"{self.max_length} tokens x {self.per_device_batch} per device"
        s = self.settings
        if self.stage in ("rm", "dpo"):
            run = f"{self.max_length} tokens x {self.per_device_batch} pairs per device"
        if self.stage == "dpo":
            run += f", reference log-probs {'cached' if s.get('reference') == 'cache' else 'live'}"
        if self.stage == "rlvr":
            run = (
                f"prompt {s.get('prompt_length')} + response {s.get('response_length')} tokens, "
                f"micro-batch {self.per_device_batch}, {s.get('rollout_batch') or self.per_device_batch} "
                f"rollouts per device, reward model {'loaded' if s.get('reward_model') else 'not loaded'}"
            )
        lines = [
            f"Memory plan for {self.model} ({self.stage}): {self.method.upper()}"
            + ("" if self.fits else " (does NOT fit)")
            + f" on {self.gpu} ({self.budget_gib:.1f} GiB usable)",
            f"  run   : {run}, {self.dtype}, "
            f"gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}",
            f"  why   : {self.reason}",
        ]
        for method in METHODS:
            parts = self.estimates[method]
            detail = ", ".join(f"{k} {v:.1f}" for k, v in parts.items() if k != "total")
            lines.append(f"  {method:<6}: {parts['total']:6.1f} GiB ({detail})")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class MemoryDoesNotFitError(MemoryPlanError):
    """No method fits the GPU. ``plan`` holds every estimate (method ``qlora``, ``fits=False``)."""

    def __init__(self, message: str, plan: MemoryPlan):
        super().__init__(message)
        self.plan = plan


_WHY = {
    "full": "full fine-tuning trains every weight, the paper's method",
    "lora": "LoRA freezes the weights in {dtype} and trains rank-{rank} adapters; it keeps the weights "
    "exact, so it is preferred over QLoRA whenever it fits",
    "qlora": "QLoRA stores the frozen weights in 4-bit NF4 and trains rank-{rank} adapters; the smallest "
    "footprint, at the cost of quantization error and slower steps",
}
#: Parts that DeepSpeed ZeRO-3 shards over the GPUs (parameters, gradients, optimizer states, the
#: frozen models' weights); activations, logits and the overhead stay whole on every GPU.
ZERO3_SHARDED = ("weights", "gradients", "optimizer", "reference", "reward_model")
ZERO3_GPU_COUNTS = (2, 4, 8, 16, 32, 64)


def plan_memory(
    model_config_or_name: Any,
    max_length: int,
    per_device_batch: int,
    dtype: str,
    gpu_gib: float,
    *,
    gradient_checkpointing: bool = True,
    lora_rank: int = LORA_RANK,
    usable_fraction: float = USABLE_FRACTION,
    stage: str = "sft",
    reference: str = "cache",
    prompt_length: int | None = None,
    response_length: int | None = None,
    rollout_batch: int | None = None,
    value_model: Any = None,
    reward_model: Any = None,
    gpu_name: str = "",
    refuse: bool = False,
) -> MemoryPlan:
    """Pick full fine-tuning, LoRA or QLoRA for one stage on one GPU of ``gpu_gib`` GiB.

    The first method, in the order full -> LoRA -> QLoRA, whose :func:`estimate_stage` fits in
    ``usable_fraction`` (90%) of the GPU. When none fits, the reason names the GPU (``gpu_name`` when
    given), the memory needed and the fixes: the GPU size that fits, the ``paper`` profile on several
    GPUs with ZeRO-3, a shorter length, a smaller per-device batch (the profile keeps the effective
    batch through gradient accumulation); with ``refuse`` it is raised as
    :class:`MemoryDoesNotFitError`, else the plan says QLoRA with ``fits=False`` (the behaviour of
    callers written before ``refuse``; :func:`plan_memory_from` refuses). The stage keywords are
    :func:`estimate_stage`'s; ``stage`` defaults to ``"sft"``.
    """
    if gpu_gib <= 0:
        raise MemoryPlanError(f"gpu_gib must be positive, got {gpu_gib}")
    shape = model_shape(model_config_or_name)
    stage = _stage_name(stage)
    budget = usable_fraction * gpu_gib
    settings: dict[str, Any] = {"reference": reference} if stage == "dpo" else {}
    if stage == "rlvr":
        settings = {
            "prompt_length": prompt_length,
            "response_length": response_length,
            "rollout_batch": rollout_batch,
            "value_model": None if value_model is None else model_shape(value_model).name,
            "reward_model": None if reward_model is None else model_shape(reward_model).name,
        }

    def estimate(method: str, **changes: Any) -> dict[str, float]:
        run = {
            "max_length": max_length, "per_device_batch": per_device_batch, "prompt_length": prompt_length,
            "response_length": response_length, "rollout_batch": rollout_batch,
        } | changes  # fmt: skip
        return estimate_stage(
            shape, stage=stage, dtype=dtype, method=method, gradient_checkpointing=gradient_checkpointing,
            lora_rank=lora_rank, reference=reference, value_model=value_model, reward_model=reward_model,
            **run,
        )  # fmt: skip

    estimates = {method: estimate(method) for method in METHODS}
    chosen = next((m for m in METHODS if estimates[m]["total"] <= budget), None)
    plan = MemoryPlan(
        method=chosen or "qlora",
        fits=chosen is not None,
        gpu_gib=float(gpu_gib),
        budget_gib=budget,
        estimates=estimates,
        reason="",
        model=shape.name,
        max_length=max_length,
        per_device_batch=per_device_batch,
        dtype=dtype,
        gradient_checkpointing=gradient_checkpointing,
        stage=stage,
        gpu_name=gpu_name,
        settings=settings,
    )
    if chosen is None:
        message = _refusal(plan, estimate, usable_fraction)
        plan = dataclasses.replace(plan, reason=message)
        if refuse:
            raise MemoryDoesNotFitError(message, plan)
        return plan
    before = METHODS[: METHODS.index(chosen)]
    too_big = "; ".join(f"{m} needs {estimates[m]['total']:.1f} GiB > {budget:.1f}" for m in before)
    reason = (too_big + ". " if too_big else "") + (
        f"{chosen} needs {estimates[chosen]['total']:.1f} GiB <= {budget:.1f}: "
        + _WHY[chosen].format(dtype=dtype, rank=lora_rank)
        + "."
    )
    return dataclasses.replace(plan, reason=reason)


def zero3_gpus(parts: dict[str, float], budget_gib: float) -> int | None:
    """The fewest GPUs (of :data:`ZERO3_GPU_COUNTS`) over which ZeRO-3 brings ``parts`` under the budget.

    The :data:`ZERO3_SHARDED` parts divide by the GPU count; the rest stays whole on every GPU (the
    generation cache too: the recipe's rollout batch is per process). None when no count is enough.
    """
    for n in ZERO3_GPU_COUNTS:
        per_gpu = sum(v / n if k in ZERO3_SHARDED else v for k, v in parts.items() if k != "total")
        if per_gpu <= budget_gib:
            return n
    return None


def _refusal(plan: MemoryPlan, estimate: Any, usable_fraction: float) -> str:
    """The message of a plan no method fits: the GPU, the need, and each fix with its new estimate."""
    e, budget, s = plan.estimates, plan.budget_gib, plan.settings
    need = e["qlora"]["total"]
    lines = [
        f"no method fits {plan.stage} of {plan.model} on {plan.gpu}: {budget:.1f} GiB usable, and even QLoRA "
        f"needs {need:.1f} GiB (LoRA {e['lora']['total']:.1f}, full fine-tuning {e['full']['total']:.1f}). "
        "Fixes:",
        f"  - a bigger GPU: at least {math.ceil(need / usable_fraction)} GiB for QLoRA, "
        f"{math.ceil(e['lora']['total'] / usable_fraction)} for LoRA, "
        f"{math.ceil(e['full']['total'] / usable_fraction)} for full fine-tuning;",
    ]
    gpus = zero3_gpus(e["full"], budget)
    if gpus:
        lines.append(
            f"  - the 'paper' profile on {gpus} such GPUs with DeepSpeed ZeRO-3 "
            "(recipes/accelerate/deepspeed_zero3.yaml), which shards weights, gradients and optimizer "
            "states: full fine-tuning, the paper's method;"
        )
    else:
        lines.append(
            "  - ZeRO-3 over several GPUs ('paper' profile) shards the weights and optimizer states, but "
            "what stays whole on each GPU (activations, logits, generation cache) exceeds it at these sizes;"
        )
    if plan.stage == "rlvr":
        prompt, response = s["prompt_length"], s["response_length"]
        while prompt + response > 128:
            prompt, response = max(1, prompt // 2), max(1, response // 2)
            shorter = estimate("qlora", prompt_length=prompt, response_length=response)["total"]
            if shorter <= budget:
                lines.append(
                    f"  - shorter sequences: prompt_length {prompt} and response_length {response} "
                    f"(QLoRA {shorter:.1f} GiB; the generation cache of the rollout batch grows with both, "
                    f"{e['qlora']['kv_cache']:.1f} GiB now);"
                )
                break
    else:
        length = plan.max_length
        while length > 64:
            length //= 2
            shorter = estimate("qlora", max_length=length)["total"]
            if shorter <= budget:
                lines.append(f"  - a shorter max_length: {length} (QLoRA {shorter:.1f} GiB);")
                break
    smaller = None
    for batch in range(plan.per_device_batch - 1, 0, -1):
        smaller = estimate("qlora", per_device_batch=batch)["total"]
        if smaller <= budget:
            lines.append(
                f"  - a smaller per-device batch: {batch} (QLoRA {smaller:.1f} GiB; the profile keeps the "
                "effective batch through gradient accumulation: lower its per_device_batch_cap);"
            )
            break
    else:
        if smaller is not None:
            lines.append(
                f"  - a smaller per-device batch alone is not enough: at 1, QLoRA needs {smaller:.1f} GiB;"
            )
    if not plan.gradient_checkpointing:
        lines.append("  - gradient checkpointing on (the profile's gradient_checkpointing).")
    lines[-1] = lines[-1].rstrip(";") + "."
    return "\n".join(lines)


def stage_settings(recipe: Any) -> dict[str, Any]:
    """The :func:`plan_memory` stage keywords of a recipe: ``stage``, and for RLVR its lengths and models.

    RLVR: ``rollout_batch`` is the recipe's ``rollout_batch_size`` (prompts per process, as Tulu 3
    counts them); the value model starts from ``reward_model`` when ``value_model_from`` says so; the
    reward model itself is loaded only when ``reward_model_multiplier`` is not 0.
    """
    stage = _stage_name(recipe.stage)
    if stage != "rlvr":
        return {"stage": stage}
    return {
        "stage": stage,
        "prompt_length": recipe.prompt_length,
        "response_length": recipe.response_length,
        "rollout_batch": recipe.rollout_batch_size,
        "value_model": recipe.reward_model if recipe.value_model_from == "reward_model" else None,
        "reward_model": recipe.reward_model if recipe.reward_model_multiplier else None,
    }


def plan_memory_from(
    plan: Any, *, gpu_gib: float | None = None, reference: str = "cache", refuse: bool = True, **kwargs: Any
) -> MemoryPlan:
    """:func:`plan_memory` for a profile's plan: its model, length, per-device batch, dtype, GPU and stage.

    Raises :class:`MemoryDoesNotFitError` when no method fits (``refuse=False``: a plan with
    ``fits=False`` instead). ``gpu_gib`` defaults to the plan's ``hardware.memory_gib``; other keywords
    go to :func:`plan_memory`.
    """
    gpu_gib = gpu_gib or plan.hardware.memory_gib
    if not gpu_gib:
        raise MemoryPlanError("the plan's hardware does not say its GPU memory; pass gpu_gib=")
    settings = stage_settings(plan.recipe)
    if settings["stage"] == "dpo":
        settings["reference"] = reference
    return plan_memory(
        plan.model, plan.max_length, plan.per_device_batch_size, plan.dtype, gpu_gib,
        gradient_checkpointing=plan.gradient_checkpointing, gpu_name=plan.hardware.device_name, refuse=refuse,
        **(settings | kwargs),
    )  # fmt: skip


def lora_config(
    rank: int = LORA_RANK, alpha: float = LORA_ALPHA, dropout: float = LORA_DROPOUT, **kwargs: Any
):
    """PEFT ``LoraConfig`` for causal-LM SFT: rank 64, alpha 16, dropout 0.1 on every projection.

    rank, alpha and dropout are open-instruct's defaults (``finetune.py``: lora_rank 64, lora_alpha 16,
    lora_dropout 0.1), the code Tulu 3 trains with. Target modules: the seven attention and MLP
    projections of a Llama block (kit choice: QLoRA, Dettmers et al. 2023, finds adapters on all
    linear layers necessary to match full fine-tuning; TRL refuses an adapter on ``lm_head``).
    """
    from peft import LoraConfig

    settings = {
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": list(LORA_TARGET_MODULES),
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    settings.update(kwargs)
    return LoraConfig(**settings)


def qlora_quantization_config(compute_dtype: str = "bf16", *, require_cuda: bool = True):
    """transformers ``BitsAndBytesConfig`` for QLoRA: 4-bit NF4 weights, double quantization, bf16 compute.

    bitsandbytes' 4-bit kernels need a CUDA GPU: on any other device this raises
    :class:`MemoryPlanError` unless ``require_cuda=False`` (to inspect the settings). On a GPU without
    bf16 (T4, V100) pass ``compute_dtype="fp16"``.
    """
    import torch
    from transformers import BitsAndBytesConfig

    if require_cuda and not torch.cuda.is_available():
        raise MemoryPlanError(
            "QLoRA needs a CUDA GPU: bitsandbytes' 4-bit weights have no CPU training kernels. On this "
            "machine train the small models in full (profile 'smoke'), or use LoRA (lora_config()) "
            "without quantization."
        )
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if compute_dtype not in dtypes:
        raise MemoryPlanError(f"compute_dtype must be one of {', '.join(dtypes)}, got {compute_dtype!r}")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtypes[compute_dtype],
    )


# ======================================================================================================
# Time, and the table of the README
# ======================================================================================================
@dataclass(frozen=True)
class GPUSpec:
    """One GPU model: memory as torch reports it, dense 16-bit tensor-core peak, memory bandwidth."""

    name: str
    memory_gib: float  # torch.cuda.get_device_properties().total_memory / 2**30 (below the marketed GB)
    tflops: float  # dense bf16 peak (fp16 where the GPU has no bf16), TFLOP/s
    bandwidth_gbs: float  # GB/s
    compute_capability: tuple[int, int]


#: The GPUs of the README table, from NVIDIA's datasheets (SXM parts for A100, H100, H200).
GPUS: tuple[GPUSpec, ...] = (
    GPUSpec("T4 16 GB", 14.7, 65.0, 320.0, (7, 5)),  # fp16 tensor cores; no bf16
    GPUSpec("A100 40 GB", 39.4, 312.0, 1555.0, (8, 0)),
    GPUSpec("A100 80 GB", 79.2, 312.0, 2039.0, (8, 0)),
    GPUSpec("H100 80 GB", 79.1, 989.0, 3350.0, (9, 0)),
    GPUSpec("H200 141 GB", 139.8, 989.0, 4800.0, (9, 0)),
)
#: Model FLOPs utilisation of training: the share of the peak a well-fed step reaches.
MFU = 0.40  # kit choice: typical of a 1-2B model in bf16 with FlashAttention/SDPA on one GPU
#: QLoRA dequantizes the 4-bit weights for every matmul: the same FLOPs at this share of the MFU.
QLORA_MFU_FACTOR = 0.5  # kit choice: QLoRA steps run about half as fast as LoRA's
#: Decoding reads the weights and the cache once per generated token: memory-bound, at this share
#: of the GPU's bandwidth.
GENERATION_BANDWIDTH_UTILISATION = 0.40  # kit choice: vLLM-like decoding; transformers' generate is slower
#: Rows of each training mixture: the Hub cards' dataset_info num_examples
#: (/work/shared/training_samples/*/README.md); RLVR's is the prompt count (GSM8K 7,473, MATH 7,500, IF 14,973).
DATASET_ROWS = {"tulu3_sft": 939_343, "tulu3_preference": 271_409, "rlvr_mixed": 29_946}
#: Tokens per row, chat template included (both sequences of a preference pair).
TOKENS_PER_ROW = {
    # kit choice: the card's 2,914,250,826 bytes / 939,343 rows = 3,102 bytes per conversation, at 3.66
    # bytes per SmolLM2 token (measured on 100 real preference rows; the mixture is 83% English, Table 10)
    "tulu3_sft": 850,
    # kit choice: 1,494 tokens per pair measured on 100 real rows with the SmolLM2 tokenizer (the card's
    # 6,192 bytes per row, holding the prompt three times, give 1,690)
    "tulu3_preference": 1_500,
}
#: Prompt tokens of one PPO episode: the kit left-pads a rollout batch to its longest prompt.
RLVR_PROMPT_TOKENS = 1_000  # kit choice: GSM8K's 8-shot prompts average 830 tokens (up to 1,249 in 100 real rows), MATH's 706, IF's about 64


def flops_per_token(n_params: int, method: str, gradient_checkpointing: bool = True) -> float:
    """Training FLOPs per token: forward 2N and backward 4N (full), 2N without weight gradients
    (LoRA, QLoRA: the adapters' own are negligible), plus 2N to recompute the forward under
    gradient checkpointing."""
    if method not in METHODS:
        raise MemoryPlanError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    return ((6 if method == "full" else 4) + (2 if gradient_checkpointing else 0)) * n_params


def estimate_hours(plan: Any, method: str, gpu: GPUSpec, *, reference: str = "cache") -> dict[str, float]:
    """Training time of ``plan`` with ``method`` on ``plan.num_processes`` GPUs like ``gpu`` (linear scaling).

    Tokens: sft, rm and dpo train ``rows x tokens per row x num_epochs`` (:data:`DATASET_ROWS`, capped by
    the plan's ``max_train_samples``; :data:`TOKENS_PER_ROW`, capped by the length); dpo adds a no-grad
    reference forward (2N per token) once with cached log-probs, every epoch with a live reference.
    RLVR (PPO) runs ``num_episodes`` episodes of :data:`RLVR_PROMPT_TOKENS` prompt tokens and a full
    ``response_length`` response (the kit pads responses to it); per token, ``num_epochs`` training
    passes of the policy and the value model, no-grad forwards of the policy (old log-probs), the
    value model, the reference and (when loaded) the reward model, and the prompt's prefill. Compute:
    FLOPs / (peak x :data:`MFU`; QLoRA x :data:`QLORA_MFU_FACTOR`). Generation: each decoding step of
    a rollout batch reads the weights and the cache so far, at :data:`GENERATION_BANDWIDTH_UTILISATION`
    of the bandwidth. Returns ``tokens``, ``flops``, ``generation_hours`` and ``hours`` (the total).
    """
    recipe = plan.recipe
    stage = _stage_name(recipe.stage)
    shape = model_shape(plan.model)
    n = shape.parameters
    per_token = flops_per_token(n, method, plan.gradient_checkpointing)
    rate = gpu.tflops * 1e12 * MFU * (QLORA_MFU_FACTOR if method == "qlora" else 1.0)
    generation_s = 0.0
    if stage != "rlvr":
        if recipe.dataset not in TOKENS_PER_ROW:
            raise MemoryPlanError(
                f"no row count for dataset {recipe.dataset!r}; known: {', '.join(TOKENS_PER_ROW)}"
            )
        rows = min(DATASET_ROWS[recipe.dataset], plan.max_train_samples or DATASET_ROWS[recipe.dataset])
        row_tokens = min(TOKENS_PER_ROW[recipe.dataset], plan.max_length * (1 if stage == "sft" else 2))
        tokens = rows * row_tokens * recipe.num_epochs
        flops = tokens * per_token
        if stage == "dpo":
            flops += rows * row_tokens * (recipe.num_epochs if reference == "live" else 1) * 2 * n
    else:
        settings = stage_settings(recipe)
        value = model_shape(settings["value_model"]) if settings["value_model"] else shape
        reward = model_shape(settings["reward_model"]) if settings["reward_model"] else None
        prompt, response = min(RLVR_PROMPT_TOKENS, recipe.prompt_length), recipe.response_length
        length, epochs = prompt + response, max(1, round(recipe.num_epochs))
        no_grad = 2 * n + 2 * value.parameters + 2 * n + (2 * reward.parameters if reward else 0)
        train = epochs * (per_token + flops_per_token(value.parameters, method, plan.gradient_checkpointing))
        tokens = recipe.num_episodes * length
        flops = tokens * (train + no_grad) + recipe.num_episodes * prompt * 2 * n
        half = _dtype_bytes(plan.dtype)
        rollout = recipe.rollout_batch_size
        kv_per_token = 2 * shape.n_layers * shape.kv_size * half
        step_bytes = response * _frozen_bytes(shape, method, half) + rollout * kv_per_token * (
            response * prompt + response**2 / 2
        )
        iterations = math.ceil(recipe.num_episodes / rollout)
        generation_s = iterations * step_bytes / (gpu.bandwidth_gbs * 1e9 * GENERATION_BANDWIDTH_UTILISATION)
    processes = max(1, plan.num_processes)
    seconds = (flops / rate + generation_s) / processes
    return {
        "tokens": float(tokens),
        "flops": float(flops),
        "generation_hours": generation_s / processes / 3600,
        "hours": seconds / 3600,
    }


@dataclass(frozen=True)
class TableRow:
    """A row of the README table: its label and the recipes (or one sweep grid) it stands for."""

    label: str
    names: tuple[str, ...]
    grid: bool = False  # names[0] is a sweep grid (recipes/ablation_*.yaml): hours add up its cells


#: The rows of the README table. Where a row stands for several recipes, it shows the one that needs
#: the most memory (they share model and data; their effective batches, so per-device batches, differ).
TABLE_ROWS: tuple[TableRow, ...] = (
    TableRow("SFT-1130/1207 1.7B", ("sft_1130", "sft_1207")),
    TableRow("DPO-1130/1207 1.7B", ("dpo_1130", "dpo_1207")),
    TableRow("RM-1130/1207 1.7B", ("rm_1130", "rm_1207")),
    TableRow("RLVR PPO 1.7B", ("rlvr_ppo",)),
    TableRow("135M ablation (SFT grid)", ("ablation_135m",), grid=True),
)
METHOD_LABELS = {"full": "full", "lora": "LoRA", "qlora": "QLoRA"}


def _plans_for(row: TableRow, profile: str, hardware: Any) -> tuple[list[Any], int]:
    """The plans a row stands for on ``hardware`` (one process), and how many runs the row's hours cover."""
    from .profiles import resolve

    if not row.grid:
        return [resolve(n, profile, hardware=hardware, num_processes=1, verbose=False) for n in row.names], 1
    from .sweep import load_grid

    cells = load_grid(row.names[0], profile=profile)
    plans = {}
    for cell in cells:  # one plan per distinct per-device batch is enough: the rest are the same sizes
        plan = cell.plan(hardware=hardware, num_processes=1)
        plans.setdefault((plan.per_device_batch_size, plan.max_length), plan)
    return list(plans.values()), len(cells)


def memory_table(profile: str = "paper", gpus: tuple[GPUSpec, ...] = GPUS, reference: str = "cache"):
    """One row per stage of :data:`TABLE_ROWS` and GPU of ``gpus``: the method, peak memory and hours.

    Each recipe is resolved with ``profile`` on one GPU (``paper``: the recipe's own sizes, full data,
    10M RLVR episodes; ``single_gpu``: that profile's caps), planned by :func:`plan_memory_from` and
    timed by :func:`estimate_hours`. ``method`` is ``"refused"`` when nothing fits (``peak_gib`` is then
    QLoRA's need, ``hours`` None). A grid row's hours add up all its cells.
    """
    import pandas as pd

    from .hardware import hardware_from_facts

    records = []
    for row in TABLE_ROWS:
        for gpu in gpus:
            hardware = hardware_from_facts(
                "cuda", 1, gpu.name, gpu.memory_gib, 1, compute_capability=gpu.compute_capability
            )
            plans, runs = _plans_for(row, profile, hardware)
            options = []
            for plan in plans:
                try:
                    memory = plan_memory_from(plan, reference=reference)
                except MemoryDoesNotFitError as exc:
                    memory = exc.plan
                options.append(((not memory.fits, METHODS.index(memory.method), memory.estimate["total"]),
                                plan, memory))  # fmt: skip
            _, plan, memory = max(options, key=lambda option: option[0])
            recipe = plan.recipe
            hours = None
            if memory.fits:
                hours = runs * estimate_hours(plan, memory.method, gpu, reference=reference)["hours"]
            records.append({
                "stage": row.label,
                "recipe": row.names[0] if row.grid else recipe.name,
                "runs": runs,
                "sizes": _sizes(plan, runs),
                "gpu": gpu.name,
                "gpu_gib": gpu.memory_gib,
                "dtype": plan.dtype,
                "max_length": plan.max_length,
                "per_device_batch": plan.per_device_batch_size,
                "train_rows": plan.max_train_samples,
                "method": memory.method if memory.fits else "refused",
                "fits": memory.fits,
                "peak_gib": round(memory.estimate["total"], 1),
                "hours": hours,
            })  # fmt: skip
    return pd.DataFrame(records)


def _hours(hours: float) -> str:
    if hours < 10:
        return f"{hours:.1f} h"
    return f"{hours:,.0f} h"


def _sizes(plan: Any, runs: int) -> str:
    """A plan's sizes in a few words, for the table's row labels."""
    recipe = plan.recipe
    if _stage_name(recipe.stage) == "rlvr":
        return (
            f"{recipe.prompt_length}+{recipe.response_length} tokens, {recipe.rollout_batch_size} rollouts, "
            f"{recipe.num_episodes:,} episodes"
        )
    unit = " pairs" if recipe.stage in ("rm", "dpo") else ""
    cells = f", {runs} cells" if runs > 1 else ""
    return f"{plan.max_length} tokens x {plan.per_device_batch_size}{unit}{cells}"


def memory_table_markdown(table: Any) -> str:
    """``memory_table``'s frame as a markdown table: a row per stage, a column per GPU, cells
    "method, peak GiB, hours" (or "refused, needs N GiB")."""
    gpus = list(dict.fromkeys(table["gpu"]))
    header = "| stage (sizes per GPU) | " + " | ".join(gpus) + " |"
    lines = [header, "|" + "---|" * (len(gpus) + 1)]
    for stage in dict.fromkeys(table["stage"]):
        records = table[table["stage"] == stage].to_dict("records")
        cells = []
        for record in records:
            if record["fits"]:
                cells.append(
                    f"{METHOD_LABELS[record['method']]}, {record['peak_gib']:.1f} GiB, {_hours(record['hours'])}"
                )
            else:
                cells.append(f"refused (needs {record['peak_gib']:.1f} GiB)")
        lines.append(f"| {stage} ({records[-1]['sizes']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


README_HEADING = "## Memory and time per GPU"


def readme_section() -> str:
    """The README's "Memory and time per GPU" section, tables and assumptions, computed now."""
    from .profiles import PROFILES

    single = PROFILES["single_gpu"]
    sft, pref = TOKENS_PER_ROW["tulu3_sft"], TOKENS_PER_ROW["tulu3_preference"]
    rows = DATASET_ROWS
    return "\n".join([
        README_HEADING,
        "",
        "What each stage needs on one GPU, computed by the memory planner (`smoltulu_utils.memory`; printed",
        "by `python benchmarks/memory_table.py`, and `tests/test_memory.py` fails when this section and the",
        "planner disagree). Each cell: the method the planner picks (full fine-tuning if it fits, else LoRA,",
        "else QLoRA, else refused with the fixes), that method's estimated peak memory, and the estimated",
        "training time on that one GPU.",
        "",
        "The recipes as written (the `paper` profile's sizes: the full mixtures, the recipe lengths, the",
        "card's 10M RLVR episodes) on one GPU:",
        "",
        memory_table_markdown(memory_table("paper")),
        "",
        f"The `single_gpu` profile ({single.max_train_samples:,} rows, max_length {single.max_length}, "
        f"RLVR capped at {single.max_episodes:,} episodes):",
        "",
        memory_table_markdown(memory_table("single_gpu")),
        "",
        "Assumptions (all in `smoltulu_utils.memory`; estimates, not measurements):",
        "",
        f"- Memory: {USABLE_FRACTION:.0%} of the GPU usable; gradient checkpointing on; the per-device batch is the",
        "  largest divisor of the effective batch up to 8 (the rest by gradient accumulation); a row that stands",
        "  for two recipes shows the one that needs more memory; DPO reads cached reference log-probs; PPO",
        "  trains the policy and the value model, holds a frozen reference and the rollout batch's generation",
        "  cache, and loads no reward model (reward_model_multiplier 0).",
        "- Time: training FLOPs (8N per token in full, 6N with adapters, gradient checkpointing's recomputation",
        f"  included; N parameters) at {MFU:.0%} of the GPU's dense 16-bit peak (QLoRA "
        f"{MFU * QLORA_MFU_FACTOR:.0%}); PPO adds three no-grad",
        "  forwards per token (old log-probs, values, reference) and generation, bound by memory bandwidth",
        f"  ({GENERATION_BANDWIDTH_UTILISATION:.0%} of it).",
        f"- Data: {rows['tulu3_sft']:,} SFT conversations of ~{sft:,} tokens; {rows['tulu3_preference']:,} "
        f"preference pairs of ~{pref:,} tokens;",
        f"  a PPO episode is ~{RLVR_PROMPT_TOKENS:,} prompt tokens and a full-length response.",
    ])  # fmt: skip
