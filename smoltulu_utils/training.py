"""What every training stage shares: the Trainer settings a plan fixes, the logs, the data entry of a manifest.

The SFT, DPO and reward-model stages each build a TRL config (``SFTConfig``, ``DPOConfig``,
``RewardConfig``) from a resolved :class:`~smoltulu_utils.profiles.Plan`; the settings that do not
depend on the stage are written once here, so a change of policy (logging, precision, checkpoints)
reaches every stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .profiles import Plan


def trainer_settings(plan: Plan, output_dir: str | Path, *, max_grad_norm: float) -> dict[str, Any]:
    """``TrainingArguments`` keywords from a plan: batch split, schedule, seed, precision, device, logs.

    Per-device batch and accumulation come from the plan (their product with the processes is the
    recipe's effective batch); learning rate, scheduler, warmup, weight decay, epochs and seed from the
    recipe; ``plan.max_steps`` (when set) caps the optimizer steps. bf16/fp16 follow ``plan.dtype``;
    ``use_cpu`` is set when there is no CUDA GPU (which also makes a multi-process launch use gloo).
    Logs every step (a NaN or infinite loss is logged as it is), progress bar on, no intermediate
    checkpoints and no evaluation inside the loop (each stage saves and scores once, at the end).
    """
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
        "use_cpu": not torch.cuda.is_available(),
        "gradient_checkpointing": plan.gradient_checkpointing,
        "max_grad_norm": max_grad_norm,
        "report_to": plan.report_to,
        "logging_steps": 1,
        "logging_nan_inf_filter": False,  # a diverging run must show its NaN/inf loss, not hide it
        "disable_tqdm": False,
        "save_strategy": "no",
        "eval_strategy": "no",
    }


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
