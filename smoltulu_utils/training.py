"""What every training stage shares: the skeleton around its trainer, how the weights train and are
saved, the Trainer settings a plan fixes, the logs, the data entry of a manifest.

Every stage (SFT, DPO, reward model, RLVR) runs the same skeleton::

    run = start_stage(plan, SFTRecipe, output_dir, caller="train_sft", ...)  # tokenizer, parent, doctor
    model = run.load_model(model, peft_config=...)   # full (float32), LoRA or QLoRA, tokenizer matched
    rows = run.rows(rows)                             # the recipe's dataset unless rows are given
    ...                                               # the stage's own data prep, trainer and training
    run.finish("sft", report, extra, trainer=trainer) # merged weights, tokenizer, manifest.json

and returns a :class:`StageResult` (loss curve, timing, the plan's LR and batch, notes), whose
:meth:`StageResult.curve_rows` put its training curves into the results store.

Precision and method
--------------------
:func:`training_method` is the one place that decides how a stage loads the weights it trains: full
fine-tuning always loads (or casts, :func:`full_precision`) float32 master weights, whatever the
checkpoint's dtype (Hub checkpoints are bf16, and transformers' default ``dtype="auto"`` keeps them so).
The Trainer's bf16/fp16 autocast then computes in half precision over fp32 parameters. Updating bf16
weights directly would lose nearly every AdamW step at the paper's learning rates: a step of 8e-7 on a
weight of 0.02 is below half of bf16's spacing there (about 1.2e-4), so it rounds away. LoRA loads the
frozen weights in the plan's dtype, QLoRA in 4-bit; :func:`save_trained_model` merges either adapter
into float32 base weights and saves a plain model, so the next stage loads it like any checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .chat_template import doctor
from .errors import KitError
from .manifest import MANIFEST_NAME, check_parent, write_manifest

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

    from .profiles import Plan

#: The dtype of the weights a stage trains in full (master weights; autocast computes in bf16/fp16).
MASTER_DTYPE = "float32"
METHODS = ("full", "lora", "qlora")


class TrainingMethodError(KitError, ValueError):
    """A method/model combination a stage cannot train or save; the message says the fix."""


# ======================================================================================================
# Full, LoRA or QLoRA, and the dtype of the weights
# ======================================================================================================
@dataclass
class TrainingMethod:
    """How the weights train: ``method`` ("full", "lora", "qlora"), the PEFT config, how to load the model."""

    method: str
    peft_config: Any = None
    load_kwargs: dict[str, Any] = field(default_factory=dict)  # extra keywords for load_model
    notes: list[str] = field(default_factory=list)


def training_method(
    plan: Plan, peft_config: Any = None, model_given: bool = False, quantization_config: Any = None
) -> TrainingMethod:
    """Full fine-tuning, LoRA or QLoRA for a plan, and the keywords to load the model with.

    A given ``quantization_config`` (e.g. :func:`smoltulu_utils.memory.qlora_quantization_config`) means
    QLoRA with ``peft_config`` (default :func:`~smoltulu_utils.memory.lora_config`); a given
    ``peft_config`` alone means LoRA. Otherwise ``plan.peft == "auto"`` on a CUDA GPU asks the memory
    planner (:func:`smoltulu_utils.memory.plan_memory_from`, for the plan's stage) which method fits
    the GPU, and refuses (:class:`~smoltulu_utils.memory.MemoryDoesNotFitError`) when not even QLoRA
    fits; anything else trains in full (so does a plan whose memory the planner cannot estimate, with a
    note). Full fine-tuning loads float32 weights on every device, whatever the checkpoint's dtype
    (see the module docstring); LoRA loads the frozen weights in the plan's dtype; QLoRA loads them in
    4-bit, so it needs ``model_given=False`` (the stage loads the model itself).
    """
    from .memory import lora_config

    if quantization_config is not None:
        if model_given:
            raise TrainingMethodError(
                "quantization_config asks the stage to load the model in 4-bit, but a model was passed in; "
                "pass model=None (the stage loads it), or load it yourself and pass only a peft_config."
            )
        return TrainingMethod(
            "qlora",
            peft_config if peft_config is not None else lora_config(),
            {"quantization_config": quantization_config},
            ["QLoRA from the given quantization_config"],
        )
    lora_load = {"dtype": plan.dtype if plan.dtype in ("bf16", "fp16") else MASTER_DTYPE}
    if peft_config is not None:
        return TrainingMethod("lora", peft_config, lora_load, ["adapters from the given peft_config"])
    cuda = plan.hardware.device == "cuda"
    full = TrainingMethod("full", None, {"dtype": MASTER_DTYPE})
    if plan.peft != "auto" or not cuda or not plan.hardware.memory_gib:
        return full
    from .memory import MemoryDoesNotFitError, plan_memory_from, qlora_quantization_config

    try:  # the estimate of the plan's own stage (a DPO or reward-model run needs other memory than SFT)
        memory = plan_memory_from(plan)
    except MemoryDoesNotFitError:  # not even QLoRA fits: the message names the GPU, the need and the fixes
        raise
    except KitError as exc:  # a model whose shape the planner does not know: train in full, say so
        full.notes.append(f"no memory plan ({exc}); full fine-tuning")
        return full
    notes = [memory.describe()]
    if memory.method == "full":
        return TrainingMethod("full", None, full.load_kwargs, notes)
    if memory.method == "lora":
        return TrainingMethod("lora", lora_config(), lora_load, notes)
    if model_given:
        raise TrainingMethodError(
            "the memory plan needs QLoRA (4-bit weights) but a model was passed in; let the stage load "
            "it (model=None), or pass a model loaded with qlora_quantization_config() and a peft_config.\n"
            + memory.describe()
        )
    compute = "bf16" if plan.dtype == "bf16" else "fp16"
    quantization = qlora_quantization_config(compute)
    return TrainingMethod("qlora", lora_config(), {"quantization_config": quantization}, notes)


def stage_load_kwargs(chosen: TrainingMethod, source: str) -> dict[str, Any]:
    """The keywords to load ``source`` with: ``chosen.load_kwargs``, only the dtype for "bundled"/"tiny"."""
    if source in ("bundled", "tiny"):
        if "quantization_config" in chosen.load_kwargs:
            raise TrainingMethodError(
                f"QLoRA loads a checkpoint in 4-bit from a folder or the Hub; '{source}' is built in memory. "
                "Save it first (model.save_pretrained(folder)) and start from the folder, or use LoRA."
            )
        return {k: v for k, v in chosen.load_kwargs.items() if k == "dtype"}
    return dict(chosen.load_kwargs)


def is_quantized(model: Any) -> bool:
    """Whether ``model`` (or the base of a PEFT model) holds 4-bit or 8-bit weights."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False))


def full_precision(model: PreTrainedModel) -> str | None:
    """Cast a model that trains in full to float32 master weights; return a note when it was cast.

    A model passed to a stage in bf16/fp16 (or loaded so) would otherwise be updated in half precision,
    where most small AdamW steps round away. Float32 models are left untouched (None is returned).
    """
    if is_quantized(model):
        raise TrainingMethodError(
            "a 4-bit/8-bit model cannot train in full: pass a peft_config (LoRA adapters) or load the model "
            "in full precision."
        )
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if not dtypes or dtypes == {torch.float32}:
        return None
    model.to(torch.float32)
    names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
    return f"weights cast from {names} to float32 master weights for full fine-tuning"


def save_trained_model(
    trainer: Any,
    output_dir: str | Path,
    chosen: TrainingMethod,
    *,
    reload_base: Callable[[], PreTrainedModel] | None = None,
) -> dict[str, Any]:
    """Save a stage's trained weights in ``output_dir`` as a plain model; return the manifest's record.

    Full fine-tuning: the Trainer saves the model (``trainer.save_model``, which also gathers sharded
    weights). LoRA and QLoRA: the adapter is merged into float32 base weights and the merged model is
    saved, so the next stage loads the folder like any checkpoint and trains every weight. LoRA merges
    into the trained model's own base weights, cast to float32 first; QLoRA reloads the base in full
    precision with ``reload_base()`` (its 4-bit weights are an approximation of the checkpoint) and
    merges the adapter into that. Returns ``{"method": ..., "merged": bool, "dtype": ...}``.
    """
    output_dir = Path(output_dir)
    if chosen.method == "full":
        trainer.save_model(str(output_dir))
        return {"method": "full", "merged": False, "dtype": _dtype_of(trainer.model)}
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not hasattr(model, "merge_and_unload"):
        raise TrainingMethodError(
            f"a {chosen.method} run should train a PEFT model, but the trainer holds {type(model).__name__}"
        )
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        merged = _merged(model, chosen.method, reload_base)
        merged.save_pretrained(output_dir)
        dtype = _dtype_of(merged)
    else:
        dtype = MASTER_DTYPE
    trainer.accelerator.wait_for_everyone()
    return {"method": chosen.method, "merged": True, "dtype": dtype}


def _merged(model: Any, method: str, reload_base: Callable[[], PreTrainedModel] | None) -> Any:
    """The PEFT model's adapter merged into float32 base weights (a plain transformers model)."""
    if not is_quantized(model):
        model.to(torch.float32)  # adapters merge into float32 weights, not rounded into bf16 ones
        return model.merge_and_unload()
    if reload_base is None:
        raise TrainingMethodError(
            f"a {method} run trained over 4-bit weights and no full-precision base to merge into was given"
        )
    from peft import PeftModel

    with tempfile.TemporaryDirectory(prefix="kit_adapter_") as folder:
        model.save_pretrained(folder)
        base = reload_base()
        base.to(torch.float32)
        merged = PeftModel.from_pretrained(base, folder).merge_and_unload()
    return merged


def _dtype_of(model: Any) -> str | None:
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    return str(first.dtype).removeprefix("torch.") if first is not None else None


class WorldSizeError(KitError, ValueError):
    """A plan formed for one process count, run on another (the effective batch would change)."""


def check_world_size(plan: Plan) -> None:
    """Refuse a run whose process count differs from the plan's: its effective batch would not be the recipe's.

    The running count is the launcher's ``WORLD_SIZE`` (1 without a launcher). A notebook kernel is one
    process: resolve with ``num_processes=1`` there, or start several through
    :func:`smoltulu_utils.launch.run_stage` / ``python -m smoltulu_utils <stage> --processes N``.
    """
    import os

    running = int(os.environ.get("WORLD_SIZE") or 1)
    if running != plan.num_processes:
        raise WorldSizeError(
            f"the plan for {plan.recipe.name} splits its batch over {plan.num_processes} process(es) but "
            f"{running} {'is' if running == 1 else 'are'} running, so the effective batch (and the LR/BS "
            f"ratio) would change. Fix: resolve(..., num_processes={running}), or launch "
            f"{plan.num_processes} processes (python -m smoltulu_utils {plan.recipe.stage} --processes "
            f"{plan.num_processes} ...)."
        )


def trainer_settings(
    plan: Plan, output_dir: str | Path, *, max_grad_norm: float | None = None
) -> dict[str, Any]:
    """``TrainingArguments`` keywords from a plan: batch split, schedule, seed, precision, device, logs.

    Per-device batch and accumulation come from the plan (their product with the processes is the
    recipe's effective batch); learning rate, scheduler, warmup, weight decay, epochs and seed from the
    recipe; ``plan.max_steps`` (when set) caps the optimizer steps. ``max_grad_norm`` (None: the
    recipe's; 0: no clipping) clips each step's gradient norm. bf16/fp16 follow ``plan.dtype``;
    ``use_cpu`` is set when there is no CUDA GPU (which also makes a multi-process launch use gloo),
    except that an FSDP or DeepSpeed launch stays sharded (:func:`~smoltulu_utils.scale_out.device_settings`).
    Logs every step (a NaN or infinite loss is logged as it is), progress bar on, no intermediate
    checkpoints and no evaluation inside the loop (each stage saves and scores once, at the end).
    """
    from .scale_out import device_settings

    recipe = plan.recipe
    return {
        "output_dir": str(output_dir),
        "per_device_train_batch_size": plan.per_device_batch_size,
        "per_device_eval_batch_size": plan.per_device_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "learning_rate": plan.learning_rate,
        "lr_scheduler_type": recipe.lr_scheduler,
        "warmup_steps": recipe.warmup_ratio,  # transformers 5: a float below 1 is a ratio of the steps
        "weight_decay": recipe.weight_decay,
        "num_train_epochs": recipe.num_epochs,
        "max_steps": plan.max_steps if plan.max_steps else -1,
        "seed": recipe.seed,
        "bf16": plan.dtype == "bf16",
        "fp16": plan.dtype == "fp16",
        **device_settings(),  # use_cpu without CUDA, except under an FSDP/DeepSpeed launch (scale_out)
        "gradient_checkpointing": plan.gradient_checkpointing,
        "max_grad_norm": resolve_max_grad_norm(plan, max_grad_norm),
        "report_to": plan.report_to,
        "logging_steps": 1,
        "logging_nan_inf_filter": False,  # a diverging run must show its NaN/inf loss, not hide it
        "disable_tqdm": False,
        "save_strategy": "no",
        "eval_strategy": "no",
    }


def resolve_max_grad_norm(plan: Plan, max_grad_norm: float | None = None) -> float:
    """The gradient clip of a run: ``max_grad_norm`` when given, else the recipe's (0.0 without one)."""
    if max_grad_norm is not None:
        return float(max_grad_norm)
    return float(getattr(plan.recipe, "max_grad_norm", 0.0))


def log_history(history: list[dict], key: str) -> list[tuple[int, float]]:
    """``(optimizer step, value)`` of one key of a Trainer's ``state.log_history``."""
    return [(int(e["step"]), float(e[key])) for e in history if key in e and "step" in e]


def data_entry(plan: Plan, report: Any, given: bool, caller: str) -> dict[str, Any]:
    """The manifest's entry for a stage's training data: dataset, revision, source and row counts.

    ``report`` is the stage's data report (``n_rows``, ``n_kept``, ``n_skipped``); ``given`` says the
    rows were passed in by the caller (``caller``, e.g. ``"train_sft"``) rather than loaded.
    """
    from .data import get_spec
    from .profiles import data_mirror

    spec = get_spec(plan.recipe.dataset)
    mirror = None if given else data_mirror(plan.profile)
    return {
        "id": spec.hub_id,
        "revision": None if given or mirror is not None else spec.revision,
        "split": "train",
        "n_rows": report.n_kept,
        "source": f"rows passed to {caller}" if given else (str(mirror) if mirror else "hub"),
        "rows_read": report.n_rows,
        "rows_skipped": report.n_skipped,
        "max_train_samples": None if given else plan.max_train_samples,
    }


def describe_batch(plan: Plan) -> str:
    """``effective batch 32 = 4 x 8 x 1`` (per device x accumulation x processes) for a stage's summary."""
    return (
        f"effective batch {plan.effective_batch_size} = {plan.per_device_batch_size} x "
        f"{plan.gradient_accumulation_steps} x {plan.num_processes}"
    )


# ======================================================================================================
# The stage skeleton
# ======================================================================================================
@dataclass(kw_only=True)
class StageResult:
    """What every stage's run reports; a stage's result adds its own fields and curves."""

    output_dir: Path | None
    steps: int
    train_loss: list[tuple[int, float]] = field(default_factory=list)  # (optimizer step, loss)
    final_train_loss: float | None = None
    wall_seconds: float = 0.0
    learning_rate: float = 0.0
    effective_batch_size: int = 0
    method: str = "full"
    data_report: Any = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["output_dir"] = str(self.output_dir) if self.output_dir is not None else None
        out["data_report"] = self.data_report.to_dict() if self.data_report else None
        return out

    def training_curves(self) -> dict[str, list[tuple[int, float]]]:
        """The run's training curves by name, ``(step, value)`` each."""
        return {"train_loss": self.train_loss}

    def curve_rows(self, run_id: str, stage: str, model: str | None = None, settings: Mapping | None = None):
        """The training curves as results-store rows (:func:`smoltulu_utils.results.curve_rows`)."""
        from .results import curve_rows

        settings = {
            "learning_rate": self.learning_rate,
            "effective_batch_size": self.effective_batch_size,
            **(settings or {}),
        }
        return curve_rows(run_id, stage, model or str(self.output_dir), self.training_curves(), settings)


@dataclass
class StageRun:
    """One stage run between :func:`start_stage` and :meth:`finish`: where it starts, tokenizer, model, notes."""

    plan: Plan
    output_dir: Path | None
    caller: str  # the stage function, named in the manifest when rows are passed in
    source: str  # the parent folder or Hub id the weights and tokenizer come from
    tokenizer: Any
    checkpoint: bool  # the source is a folder with a kit manifest
    parent_manifest: dict[str, Any] | None  # that manifest, checked against the tokenizer
    adapted: list[str]  # what adapt_tokenizer / match_model_to_tokenizer changed
    notes: list[str] = field(default_factory=list)
    chosen: TrainingMethod | None = None
    given: bool = False  # the rows were passed in
    load: Callable[..., Any] | None = None  # how the stage loads weights from ``source``

    @property
    def recipe(self) -> Any:
        return self.plan.recipe

    @property
    def parent_stage(self) -> str | None:
        """The stage the parent checkpoint's manifest names (None without a kit parent)."""
        return (self.parent_manifest or {}).get("stage")

    def load_model(
        self,
        model: Any = None,
        *,
        peft_config: Any = None,
        quantization_config: Any = None,
        chosen: TrainingMethod | None = None,
        load: Callable[..., Any] | None = None,
    ) -> Any:
        """The model the stage trains: ``model`` or ``load(source, ...)`` (default ``models.load_model``).

        The method (full, LoRA, QLoRA) is ``chosen`` or :func:`training_method`'s; full fine-tuning gets
        float32 master weights (:func:`full_precision`); an adapted tokenizer's new tokens get embeddings.
        """
        from .models import load_model, match_model_to_tokenizer

        self.chosen = chosen or training_method(
            self.plan, peft_config, model_given=model is not None, quantization_config=quantization_config
        )
        self.notes += self.chosen.notes
        self.load = load or load_model
        if model is None:
            model = self.load(self.source, **stage_load_kwargs(self.chosen, self.source))
        if self.chosen.method == "full" and (cast := full_precision(model)):
            self.notes.append(cast)
        if self.adapted:
            self.adapted += match_model_to_tokenizer(model, self.tokenizer)
            self.notes.append("tokenizer adapted: " + "; ".join(self.adapted))
        return model

    def rows(self, rows: Iterable[Mapping] | None) -> Iterable[Mapping]:
        """``rows``, or the recipe's dataset from the profile's data, at most ``plan.max_train_samples``."""
        from .data import load_rows
        from .profiles import data_mirror

        self.given = rows is not None
        if rows is not None:
            return rows
        plan = self.plan
        return load_rows(
            self.recipe.dataset,
            mirror=data_mirror(plan.profile),
            limit=plan.max_train_samples,
            validate=False,
        )

    def train(self, trainer: Any) -> float:
        """Run ``trainer.train()``; return its wall-clock seconds."""
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start

    def result(self, result_type: type, trainer: Any, loss_key: str, wall: float, report: Any, **fields: Any):
        """The stage's :class:`StageResult` from its trained ``trainer``: steps, the logged ``loss_key``
        curve and its last value (a NaN or infinite one adds a note), the plan's LR and batch, the method,
        the data report and notes; ``fields`` fill the stage's own."""
        train_loss = log_history(trainer.state.log_history, loss_key)
        final = train_loss[-1][1] if train_loss else None
        if final is not None and not math.isfinite(final):
            self.notes.append(f"the final training loss is {final}: lower the learning rate")
        return result_type(
            output_dir=self.output_dir,
            steps=int(trainer.state.global_step),
            train_loss=train_loss,
            final_train_loss=final,
            wall_seconds=wall,
            learning_rate=self.plan.learning_rate,
            effective_batch_size=self.plan.effective_batch_size,
            method=self.chosen.method,
            data_report=report,
            notes=self.notes,
            **fields,
        )

    def _reload_base(self) -> PreTrainedModel:
        """QLoRA: the base in full precision, to merge the adapter into."""
        from .models import match_model_to_tokenizer

        base = self.load(self.source, dtype=MASTER_DTYPE)
        if self.adapted:
            match_model_to_tokenizer(base, self.tokenizer)
        return base

    def finish(
        self, stage: str, report: Any, extra: Mapping[str, Any], *, trainer: Any = None, main: bool = True
    ) -> dict[str, Any] | None:
        """Save what the stage trained, its tokenizer and ``manifest.json`` in ``output_dir``.

        With a ``trainer`` its model is saved (LoRA/QLoRA merged, :func:`save_trained_model`) and only
        its main process writes the rest; without one the stage saved its weights itself. ``report`` is
        the data report, or a :class:`StageResult` (its data report, steps, final loss and seconds go into
        the manifest). ``extra`` joins the manifest's record (after where the run started, the plan, the
        method and the tokenizer). Returns the manifest on the main process, else None.
        """
        if isinstance(report, StageResult):
            result, report = report, report.data_report
            extra = {
                "steps": result.steps,
                "final_train_loss": result.final_train_loss,
                "wall_seconds": result.wall_seconds,
                **extra,
            }
        saved: dict[str, Any] = {}
        if trainer is not None:
            saved = save_trained_model(trainer, self.output_dir, self.chosen, reload_base=self._reload_base)
            main = trainer.is_world_process_zero()
        if not main:
            return None
        self.tokenizer.save_pretrained(self.output_dir)
        folder = Path(self.source).expanduser()
        record = {"started_from": self.source, "plan": self.plan.to_dict(), "method": self.chosen.method}
        if saved:
            record.update(merged=saved["merged"], weights_dtype=saved["dtype"])
        return write_manifest(
            self.output_dir,
            stage=stage,
            recipe=self.recipe,
            data=[data_entry(self.plan, report, self.given, self.caller)],
            tokenizer=self.tokenizer,
            seed=self.recipe.seed,
            parent=self.source if self.checkpoint or not folder.is_dir() else None,
            extra={
                **record,
                "tokenizer_adapted": self.adapted,
                **extra,
                "data_report": report.to_dict(),
                "notes": self.notes,
            },
        )


def start_stage(
    plan: Plan,
    recipe_type: type,
    output_dir: str | Path | None,
    *,
    caller: str,
    error: type[Exception] = KitError,
    tokenizer: Any = None,
    parent: str | Path | None = None,
) -> StageRun:
    """Begin a stage run: check the plan, load and adapt the tokenizer, check the parent, run the doctor.

    ``plan`` must be for a ``recipe_type`` recipe (else ``error``) and for the running process count
    (:func:`check_world_size`). The tokenizer (unless given) and later the model come from ``parent``
    (a kit checkpoint folder or a Hub id), else ``plan.model``; a tokenizer without a chat template (a
    base model's) gets the kit's (:func:`~smoltulu_utils.models.adapt_tokenizer`). A folder holding a
    manifest must share the tokenizer and chat template (:func:`~smoltulu_utils.manifest.check_parent`),
    and the chat-template doctor must pass, before anything loads or trains.
    """
    from .models import adapt_tokenizer, load_tokenizer

    recipe = plan.recipe
    if not isinstance(recipe, recipe_type):
        raise error(
            f"{caller} needs a plan for a recipe of type {recipe_type.__name__}, got stage {recipe.stage!r} ({recipe.name})"
        )
    check_world_size(plan)
    source = str(parent) if parent is not None else plan.model
    folder = Path(source).expanduser()
    checkpoint = folder.is_dir() and (folder / MANIFEST_NAME).is_file()
    adapted: list[str] = []
    if tokenizer is None:
        tokenizer = load_tokenizer(source)
        adapted = adapt_tokenizer(tokenizer)  # a base model's tokenizer gets the kit's chat template
    manifest = None
    if folder.is_dir() and (parent is not None or checkpoint):
        manifest = check_parent(
            folder, tokenizer
        )  # a parent folder must be a kit checkpoint with our template
    doctor(tokenizer).raise_for_problems()
    return StageRun(
        plan=plan,
        output_dir=Path(output_dir) if output_dir is not None else None,
        caller=caller,
        source=source,
        tokenizer=tokenizer,
        checkpoint=checkpoint,
        parent_manifest=manifest,
        adapted=adapted,
    )
