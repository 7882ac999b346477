"""Evaluate a model on the paper's seven benchmarks with lm-eval, and return tidy results.

:func:`evaluate` takes a model in memory (with its tokenizer), a checkpoint folder, a Hub id, or the
kit keywords ``"bundled"`` / ``"tiny"``; runs the kit's lm-eval tasks (:mod:`smoltulu_utils.eval_tasks`)
with the chat template and multi-turn shots, as the paper's harness did, through lm-eval's ``HFLM``
(or ``VLLM`` when vLLM and a GPU are present); and returns one results-store row per paper number,
lm-eval's raw output and every per-sample record. Scoring is lm-eval's; this module only chooses
settings and reshapes results.
"""

from __future__ import annotations

import importlib.util
import json
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .atomic import atomic_open
from .errors import KitError
from .eval_tasks import PAPER_METRICS, SUITE, paper_scores, task_manager
from .paper import BENCHMARKS, canonical_benchmark
from .results import EVAL_STAGE, make_row
from .serialize import jsonable

#: The reference harness capped prompts at 2,048 tokens (vLLM ``max_model_length``), left-truncated.
MAX_LENGTH = 2048
#: Batch size on a CPU when "auto" is asked for: lm-eval's automatic search is meant for GPU memory.
CPU_BATCH_SIZE = 8


#: Kit recipe -> the paper's model its checkpoint reproduces (the column it joins in Tables 3, 6, 9).
RECIPE_PAPER_MODELS = {
    "sft_1130": "SmolTulu SFT-1130",
    "sft_1207": "SmolTulu SFT-1207",
    "dpo_1130": "SmolTulu DPO-1130",
    "dpo_1207": "SmolTulu DPO-1207",
    "rm_1130": "SmolTulu RM-1130",
    "rm_1207": "SmolTulu RM-1207",
}
#: Checkpoint stages that are language models the benchmarks score (a reward model is not one).
GENERATIVE_STAGES = ("sft", "dpo", "rlvr", None)
#: Names of the kit's model keywords in result rows.
KEYWORD_NAMES = {"bundled": "SmolLM2-135M-Instruct (bundled)", "tiny": "tiny SmolLM2 (random)"}


class EvaluationError(KitError, ValueError):
    """Bad arguments to :func:`evaluate` (an unknown benchmark, a model without its tokenizer...)."""


@dataclass
class Evaluation:
    """The result of :func:`evaluate`: ``rows`` (one results-store row per paper number, value in
    0..100), ``scores`` (paper label -> value), ``raw`` (lm-eval's output without the samples) and
    ``samples`` (task -> per-sample records).
    """

    rows: list[dict[str, Any]]
    scores: dict[str, float]
    raw: dict[str, Any]
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    seconds: float = 0.0

    def samples_frame(self, task: str | None = None) -> pd.DataFrame:
        """Per-sample prompt, response, target and scores of one task (or all), one row per sample."""
        return pd.DataFrame(
            [
                {"task": name, **_sample_summary(sample)}
                for name, samples in self.samples.items()
                if task is None or name == task
                for sample in samples
            ]
        )

    def save_samples(self, folder: str | Path) -> list[Path]:
        """Write each task's samples as ``{folder}/{task}.jsonl`` (atomically); return the paths."""
        paths = []
        for name, samples in self.samples.items():
            path = Path(folder) / f"{name}.jsonl"
            with atomic_open(path) as fh:
                for sample in samples:
                    fh.write(json.dumps(jsonable(sample), ensure_ascii=False) + "\n")
            paths.append(path)
        return paths


def resolve_benchmarks(benchmarks: Iterable[str] | None = None) -> list[str]:
    """Paper labels for ``benchmarks`` (paper labels, short names like ``"gsm8k"``, or task names)."""
    if benchmarks is None:
        return list(BENCHMARKS)
    by_task = {task: label for label, task in SUITE.items()}
    labels = []
    for name in benchmarks:
        label = by_task.get(name) or canonical_benchmark(name)
        if label not in SUITE:
            raise EvaluationError(
                f"unknown benchmark {name!r}: use one of {', '.join(BENCHMARKS)} "
                "(or short names such as 'arc', 'gsm8k', 'ifeval')"
            )
        labels.append(label)
    return list(dict.fromkeys(labels))


def pick_backend(backend: str, model: Any) -> str:
    """``"hf"`` or ``"vllm"``: ``auto`` takes vLLM when it is installed, a GPU is present and the model
    is a folder or Hub id (vLLM loads weights itself), else transformers."""
    if backend not in ("auto", "hf", "vllm"):
        raise EvaluationError(f"backend must be 'auto', 'hf' or 'vllm', not {backend!r}")
    import torch

    vllm_ok = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
    if backend == "vllm" and not vllm_ok:
        raise EvaluationError("backend 'vllm' needs the vllm package and a CUDA GPU; use backend='hf'")
    if backend == "auto":
        return "vllm" if vllm_ok and isinstance(model, str | Path) and str(model) != "tiny" else "hf"
    return backend


def _hf_lm(model: Any, tokenizer: Any, batch_size: int | str, max_length: int):
    from lm_eval.models.huggingface import HFLM

    from .models import load_model, load_tokenizer

    if isinstance(model, str | Path):
        tokenizer = tokenizer or load_tokenizer(str(model))
        model = load_model(str(model))
    elif tokenizer is None:
        raise EvaluationError(
            "a model given in memory needs its tokenizer: evaluate(model, tokenizer, ...), "
            "or pass a checkpoint folder / Hub id instead"
        )
    if batch_size == "auto" and model.device.type == "cpu":
        batch_size = CPU_BATCH_SIZE
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def _vllm_lm(model: str | Path, batch_size: int | str, max_length: int):
    from lm_eval.models.vllm_causallms import VLLM

    from .models import ensure_bundled_cache

    path = str(ensure_bundled_cache()) if str(model) == "bundled" else str(model)
    return VLLM(pretrained=path, batch_size=batch_size, max_model_len=max_length, dtype="auto")


def evaluate(
    model: Any,
    tokenizer: Any = None,
    *,
    benchmarks: Iterable[str] | None = None,
    limit: int | None = None,
    batch_size: int | str = "auto",
    backend: str = "auto",
    mirror: str | Path | None = None,
    max_gen_toks: int | None = None,
    max_length: int = MAX_LENGTH,
    model_name: str | None = None,
    paper_model: str | None = None,
    run_id: str | None = None,
    settings: Mapping[str, Any] | None = None,
) -> Evaluation:
    """Run the paper's benchmarks (default all seven) on ``model`` and return an :class:`Evaluation`.

    ``limit``: items per task (smoke runs). ``mirror``: a local data mirror (default
    ``SMOLTULU_DATA_MIRROR`` or the Hub). ``max_gen_toks`` caps generation for every generative task
    (a deviation, recorded in the settings; None keeps each task's own cap). ``model_name`` labels the
    rows (default: the folder, Hub id or the model's class); ``paper_model`` names the paper's model
    the rows stand beside in the tables (e.g. ``"SmolTulu DPO-1130"``).
    """
    from lm_eval import simple_evaluate

    labels = resolve_benchmarks(benchmarks)
    chosen = pick_backend(backend, model)
    model_name = _default_name(model) if model_name is None else model_name
    if chosen == "vllm":
        lm = _vllm_lm(model, batch_size, max_length)
    else:
        lm = _hf_lm(model, tokenizer, batch_size, max_length)
    manager = task_manager(include_defaults=False, metadata={"data_mirror": str(mirror)} if mirror else None)
    start = time.perf_counter()
    raw = simple_evaluate(
        model=lm,
        tasks=[SUITE[label] for label in labels],
        task_manager=manager,
        limit=limit,
        apply_chat_template=True,
        fewshot_as_multiturn=True,
        log_samples=True,
        gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None,
        bootstrap_iters=1000,
    )
    seconds = time.perf_counter() - start
    samples = raw.pop("samples", {}) or {}
    scores = paper_scores(raw)
    run_settings = {
        "backend": chosen,
        "batch_size": getattr(lm, "batch_size", batch_size),
        "limit": limit,
        "max_gen_toks": max_gen_toks,
        "max_length": max_length,
        "chat_template": True,
        "fewshot_as_multiturn": True,
        "mirror": str(mirror) if mirror else None,
        **dict(settings or {}),
    }
    rows = _tidy_rows(raw, scores, labels, model_name, paper_model, run_id or _new_run_id(), run_settings)
    return Evaluation(rows=rows, scores=scores, raw=raw, samples=samples, seconds=seconds)


def _default_name(model: Any) -> str:
    if isinstance(model, str | Path):
        return KEYWORD_NAMES.get(str(model), str(model))
    return getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__


def find_checkpoints(
    root: str | Path | None = None, store: Any = None, stages: tuple[str | None, ...] | None = None
) -> list[Path]:
    """Stage checkpoints (folders holding a ``manifest.json``) under ``root`` (default ``runs_dir()``).

    Left out: sweep cells (the sweep scores them), stages not in ``stages`` (default
    :data:`GENERATIVE_STAGES`: not reward models) and, given a results ``store``, checkpoints it has rows for.
    """
    from .paths import runs_dir

    root = Path(root) if root is not None else runs_dir()
    if not root.is_dir():
        return []
    found = sorted(p.parent for p in root.rglob("manifest.json") if "sweeps" not in p.relative_to(root).parts)
    found = [p for p in found if _manifest_stage(p) in (stages or GENERATIVE_STAGES)]
    if store is not None:
        found = [p for p in found if not store.has(stage=EVAL_STAGE, model=str(p))]
    return found


def _manifest_stage(folder: Path) -> str | None:
    from .manifest import read_manifest

    try:
        return read_manifest(folder).get("stage")
    except KitError:  # an unreadable manifest: let evaluate() report it
        return None


def paper_model_for(source: str | Path) -> str | None:
    """The paper's model a checkpoint folder (by its manifest's recipe) or Hub id stands beside, if any."""
    from .manifest import read_manifest
    from .paper import canonical_model, paper_models

    folder = Path(source)
    if (folder / "manifest.json").is_file():
        recipe = (read_manifest(folder).get("recipe") or {}).get("name")
        return RECIPE_PAPER_MODELS.get(recipe)
    name = canonical_model(str(source))
    return name if name in paper_models(9) else None


def _new_run_id() -> str:
    return f"eval-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def _tidy_rows(raw, scores, labels, model_name, paper_model, run_id, settings) -> list[dict[str, Any]]:
    rows = []
    counts = raw.get("n-samples", {})
    groups = {**(raw.get("groups") or {}), **raw.get("results", {})}
    for label in labels:
        if label not in scores:
            continue
        metric = PAPER_METRICS[label]
        name = "+".join(key.split(",")[0] for key in metric.metrics)
        n = int(sum(counts.get(m, {}).get("effective", 0) for m in metric.members or (metric.source,)))
        stderr = _stderr(groups.get(metric.source, {}), metric.metrics)
        value = round(scores[label], 4)
        row = make_row(
            run_id, EVAL_STAGE, model_name, label, name, value, stderr=stderr, n=n, settings=settings
        )
        rows.append({**row, "paper_model": paper_model} if paper_model else row)
    return rows


def _stderr(row: Mapping[str, Any], metrics: tuple[str, ...]) -> float | None:
    """lm-eval's stderr of a single metric, in percent (rounded as the value is), or None."""
    if len(metrics) != 1:
        return None  # an average of two metrics has no stderr of its own here
    name, _, filt = metrics[0].partition(",")
    value = row.get(f"{name}_stderr,{filt}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return round(100 * value, 4) if value == value else None  # NaN -> None


def _sample_summary(sample: Mapping[str, Any]) -> dict[str, Any]:
    """The readable part of one lm-eval sample: the prompt, the response(s), the target and scores."""
    arguments = sample.get("arguments") or []
    first = arguments[0] if arguments else None
    prompt = first[0] if isinstance(first, list | tuple) and first else first
    response = sample.get("filtered_resps")
    if isinstance(response, list) and len(response) == 1:
        response = response[0]
    summary = {"doc_id": sample.get("doc_id"), "prompt": prompt, "response": response}
    return summary | {key: sample.get(key) for key in ("target", *sample.get("metrics", []))}
