"""The RLVR stage: the kit's PPO (:mod:`~smoltulu_utils.ppo`, as SmolTulu) or TRL's GRPO
(:mod:`~smoltulu_utils.grpo`) on the RLVR mixture's prompts (:mod:`~smoltulu_utils.rlvr_data`)::

    result = train_rlvr(plan, "runs/rlvr_ppo", parent="runs/dpo_1130")   # PPO from the DPO checkpoint
    result = train_rlvr(plan, "runs/rlvr_grpo", method="grpo")          # the modern alternative

Both write the same log entry per rollout batch (:data:`LOG_KEYS`; ``verifiable_reward`` is the share
verified, ``kl`` is per response, ``value_loss`` is None for GRPO). Written by hand here: the value
model's loading with its manifest check, and the bookkeeping (manifest, results rows, a JSONL log).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .grpo import GRPOSettings, grpo_samples, run_grpo
from .manifest import check_parent
from .ppo import (
    BatchSizes,
    PPOSettings,
    PPOTrainer,
    batch_sizes,
    choose_generator,
    restrict_vocabulary,
    value_model_from_policy,
)
from .recipes import RLVRRecipe
from .results import curve_rows, make_row
from .rlvr_data import RLVRDataReport, RLVRError, prepare_rlvr_rows
from .training import MASTER_DTYPE, TrainingMethod, start_stage

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .profiles import Plan

#: The log keys PPO and GRPO share (every entry also has iteration, episodes and skipped_rows).
LOG_KEYS = ("verifiable_reward", "kl", "response_length", "non_stop_rate", "value_loss", "clip_fraction")
METHODS = ("ppo", "grpo")


def load_value_model(
    source: str | Path, tokenizer: PreTrainedTokenizerBase, policy: PreTrainedModel | None = None
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """The value model's starting point: ``(model, info)``, a one-label sequence classifier.

    ``source``: a kit reward-model checkpoint (its manifest must say stage ``rm`` and match the policy's
    tokenizer and chat template), a Hub id (the SmolTulu RM), ``"bundled"`` (SmolLM2-135M-Instruct with a
    new score head) or ``"tiny"`` (the policy's backbone with a new head). ``info`` is for the manifest.
    The weights load in float32 whatever the checkpoint's dtype: the value model trains in full.
    """
    from .models import ensure_bundled_cache, load_model, tiny_model

    name = str(source)
    folder = Path(name).expanduser()
    info: dict[str, Any] = {"source": name}
    path = name
    if name == "tiny":
        base = policy if policy is not None else tiny_model(tokenizer=tokenizer)[0]
        return value_model_from_policy(base), {**info, "head": "new"}
    if folder.is_dir():
        manifest = check_parent(folder, tokenizer)  # a kit checkpoint with the policy's tokenizer
        if manifest.get("stage") != "rm":
            raise RLVRError(
                f"the value model starts from a reward model, but {folder} is a {manifest.get('stage')!r} "
                "checkpoint. Fix: pass reward_model= a folder written by the RM stage (train_rm), or set "
                "value_model_from: policy in the recipe."
            )
        info.update(stage="rm", recipe=(manifest.get("recipe") or {}).get("name"))
        path = str(folder)
    elif name == "bundled":
        path, info["head"] = str(ensure_bundled_cache()), "new"
    model = load_model(path, head="reward", dtype=MASTER_DTYPE)
    if getattr(model.config, "num_labels", None) != 1 or not hasattr(model, "score"):
        raise RLVRError(
            f"{name} is not a one-label sequence classifier (a reward model); cannot start a value model"
        )
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        raise RLVRError(
            f"{name} has a smaller vocabulary than the policy's tokenizer ({len(tokenizer)} tokens)"
        )
    return model, info


@dataclass
class RLVRResult:
    """What one RLVR run did: per-iteration logs (:data:`LOG_KEYS` and more) and the last responses."""

    method: str
    output_dir: Path | None
    iterations: int
    logs: list[dict[str, Any]]
    samples: list[dict[str, Any]]
    wall_seconds: float
    learning_rate: float
    rollout_batch_size: int
    data_report: RLVRDataReport
    notes: list[str] = field(default_factory=list)

    def curve(self, key: str) -> list[tuple[int, float]]:
        """``(iteration, value)`` of one log key (entries without it are left out)."""
        return [(e["iteration"], float(e[key])) for e in self.logs if e.get(key) is not None]

    def final(self, key: str, last: int = 1) -> float | None:
        """Mean of ``key`` over the last ``last`` iterations (None when never logged)."""
        values = [v for _, v in self.curve(key)[-last:]]
        return sum(values) / len(values) if values else None

    def to_dict(self) -> dict[str, Any]:
        """Plain values (paths as text, the data report in its manifest form)."""
        out = dataclasses.asdict(self)
        out["output_dir"] = str(self.output_dir) if self.output_dir else None
        out["data_report"] = self.data_report.to_dict()
        return out


def results_rows(
    result: RLVRResult, run_id: str, model: str, settings: Mapping[str, Any] | None = None
) -> list[dict]:
    """ResultsStore rows of a run: the first and last iteration's value of each shared log key, and
    each key's curve over the iterations (:func:`~smoltulu_utils.results.curve_rows`)."""
    run_settings = {
        "method": result.method,
        "iterations": result.iterations,
        "learning_rate": result.learning_rate,
        "rollout_batch_size": result.rollout_batch_size,
        "skipped_rows": result.data_report.n_skipped,
        **dict(settings or {}),
    }
    benchmark = f"RLVR training ({result.method})"
    rows = []
    for key in LOG_KEYS:
        for when, entry in (("initial", result.logs[0]), ("final", result.logs[-1])):
            value = entry.get(key)
            if value is None or not math.isfinite(float(value)):
                continue
            metric, n = f"{when}_{key}", int(entry.get("episodes", 0))
            rows.append(
                make_row(run_id, "rlvr", model, benchmark, metric, float(value), n=n, settings=run_settings)
            )
    return rows + curve_rows(
        run_id, "rlvr", model, {key: result.curve(key) for key in LOG_KEYS}, run_settings
    )


def samples_frame(result: RLVRResult):
    """The last iteration's responses with their verdicts, as a DataFrame."""
    import pandas as pd

    columns = ["subset", "ground_truth", "response", "extracted", "verified", "ended", "score", "length"]
    return pd.DataFrame(result.samples, columns=columns)


def rlvr_batch_sizes(plan: Plan) -> BatchSizes:
    """The run's batch sizes, counted as Tulu 3 counted them: the recipe's ``rollout_batch_size`` and
    ``minibatch_size`` are per process (open-instruct's ``local_rollout_batch_size`` and
    ``local_mini_batch_size``, 32 on the Reinforced card), times ``plan.num_processes``."""
    recipe = plan.recipe
    return batch_sizes(
        recipe.rollout_batch_size, recipe.minibatch_size, plan.num_processes, plan.per_device_batch_cap
    )


def _iterations(plan: Plan, max_iterations: int | None) -> int:
    """Rollout batches to run: ``num_episodes`` over the global rollout batch, capped by the profile's steps."""
    n = max(1, plan.recipe.num_episodes // rlvr_batch_sizes(plan).rollout)
    if plan.max_steps:
        n = min(n, plan.max_steps)
    return min(n, max_iterations) if max_iterations else n


def train_rlvr(
    plan: Plan,
    output_dir: str | Path | None = None,
    *,
    method: str = "ppo",
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    rows: Iterable[Mapping] | None = None,
    parent: str | Path | None = None,
    reward_model: str | Path | None = None,
    value_model: PreTrainedModel | None = None,
    max_iterations: int | None = None,
    ppo_settings: PPOSettings | None = None,
    grpo_settings: GRPOSettings | None = None,
    restrict_to: Sequence[int] | None = None,
    generator: str = "auto",
    store: Any = None,
    run_id: str | None = None,
    callback: Callable[[dict], Any] | None = None,
    verbose: bool = True,
) -> RLVRResult:
    """Run the RLVR stage of ``plan`` with ``method`` ``"ppo"`` (the kit's, as SmolTulu) or ``"grpo"`` (TRL's).

    The stage skeleton (:func:`~smoltulu_utils.training.start_stage`) loads the tokenizer and the policy
    (in full, float32) from ``parent`` (the DPO checkpoint) or ``plan.model``, and the plan's RLVR rows,
    unless given; unusable rows are skipped and counted (``skipped_rows`` in every log entry). PPO's value
    model starts from ``value_model``, ``reward_model``, the recipe's reward model, or the policy
    (``value_model_from: policy``). Iterations: ``num_episodes`` over the global rollout batch, capped by
    the profile's steps and ``max_iterations``. The settings default to the recipe's. ``restrict_to``:
    token ids the policy may produce (the toy task). ``generator``: ``"auto"`` (``generate``) or
    ``"vllm"`` (opt-in). With ``output_dir`` the policy, tokenizer, ``manifest.json`` and
    ``rlvr_log.jsonl`` are saved; ``store`` (a ResultsStore) gets the first and last :data:`LOG_KEYS` values.
    """
    from .data import write_jsonl

    if method not in METHODS:
        raise RLVRError(f"unknown method {method!r}; use 'ppo' (SmolTulu's) or 'grpo' (TRL's GRPOTrainer)")
    run = start_stage(
        plan, RLVRRecipe, output_dir, caller="train_rlvr", error=RLVRError, tokenizer=tokenizer, parent=parent
    )
    recipe, tokenizer, notes = plan.recipe, run.tokenizer, run.notes
    if recipe.reward_model_multiplier:
        raise RLVRError(
            f"reward_model_multiplier is {recipe.reward_model_multiplier}: the kit's RLVR uses the verifiable "
            "reward only, as the card and Tulu 3 (reward_model_multiplier: 0)."
        )
    engine = choose_generator(generator)  # before any model loads: a clear error when vLLM cannot run
    if run.parent_manifest is not None and run.parent_stage != "dpo":
        notes.append(
            f"the policy starts from a {run.parent_stage!r} checkpoint; SmolTulu starts RLVR from DPO"
        )
    model = run.load_model(model, chosen=TrainingMethod("full", None, {"dtype": MASTER_DTYPE}))
    examples, report = prepare_rlvr_rows(run.rows(rows), tokenizer, recipe.prompt_length)
    if not examples:
        raise RLVRError(f"no usable RLVR rows: {report.describe()}")
    sizes, iterations = rlvr_batch_sizes(plan), _iterations(plan, max_iterations)
    handle = restrict_vocabulary(model, restrict_to) if restrict_to is not None else None
    if verbose:
        print(
            f"RLVR {recipe.name} ({method}): {report.describe().splitlines()[0]}\n"
            f"  {iterations} iterations of {sizes.rollout} prompts, responses up to "
            f"{recipe.response_length} tokens at temperature {recipe.temperature}, LR {plan.learning_rate:g}, "
            f"KL beta {recipe.kl_beta}"
        )

    def on_entry(entry: dict) -> None:
        entry["skipped_rows"] = report.n_skipped
        if verbose:
            print(_progress(entry))
        if callback is not None:
            callback(entry)

    start = time.perf_counter()
    value_info: dict[str, Any] = {}
    if method == "ppo":
        settings = ppo_settings or PPOSettings.from_recipe(recipe)
        trainer, value_info = _ppo_trainer(plan, model, tokenizer, examples, iterations, settings,
                                           reward_model, value_model, engine, notes)  # fmt: skip
        logs = trainer.train(iterations, callback=on_entry)
        samples, policy, accelerator = trainer.samples, trainer.unwrapped.policy, trainer.accelerator
    else:
        settings = grpo_settings or GRPOSettings.from_recipe(recipe)
        logs, trainer = run_grpo(plan, model, tokenizer, examples, sizes, iterations, settings,
                                 restrict_to=restrict_to, output_dir=output_dir, on_entry=on_entry,
                                 generator=engine)  # fmt: skip
        samples = grpo_samples(trainer.model, tokenizer, examples, recipe, settings)
        policy, accelerator = trainer.accelerator.unwrap_model(trainer.model), trainer.accelerator
    wall = time.perf_counter() - start
    if handle is not None:
        handle.remove()

    result = RLVRResult(
        method=method,
        output_dir=run.output_dir,
        iterations=len(logs),
        logs=logs,
        samples=samples,
        wall_seconds=wall,
        learning_rate=plan.learning_rate,
        rollout_batch_size=sizes.rollout,
        data_report=report,
        notes=notes,
    )
    main = accelerator.is_main_process
    if output_dir is not None and main:
        policy.save_pretrained(run.output_dir)
        write_jsonl(logs, run.output_dir / "rlvr_log.jsonl")
        extra = {
            "method": method,
            "value_model": value_info or None,
            "iterations": result.iterations,
            "first_log": logs[0] if logs else None,
            "last_log": logs[-1] if logs else None,
            "wall_seconds": wall,
            "ppo_settings": dataclasses.asdict(settings) if method == "ppo" else None,
            "grpo_settings": dataclasses.asdict(settings) if method == "grpo" else None,
        }
        run.finish("rlvr", report, extra, main=main)
    if store is not None and main and logs:
        name = run_id or f"{recipe.name}_{method}_{plan.profile}"
        store.append(
            results_rows(result, name, str(output_dir) if output_dir else name, {"profile": plan.profile})
        )
    if verbose and logs:
        print(
            f"  done: {result.iterations} iterations in {wall:.1f} s, verifiable reward "
            f"{logs[0]['verifiable_reward']:.2f} -> {logs[-1]['verifiable_reward']:.2f}, skipped rows "
            f"{report.n_skipped}" + (f"; saved to {output_dir}" if output_dir is not None else "")
        )
    return result


def _ppo_trainer(
    plan, model, tokenizer, examples, iterations, settings, reward_model, value_model, generator, notes
) -> tuple[PPOTrainer, dict[str, Any]]:
    """The PPO trainer of a plan and what its value model started from; rollouts by ``generator``."""
    recipe, sizes = plan.recipe, rlvr_batch_sizes(plan)
    if value_model is not None:
        value_info = {"source": "given"}
    elif recipe.value_model_from == "policy":
        value_model, value_info = value_model_from_policy(model), {"source": "policy", "head": "new"}
    else:
        value_model, value_info = load_value_model(
            reward_model or recipe.reward_model, tokenizer, policy=model
        )
    reference = copy.deepcopy(model)  # a copy keeps the policy's vocabulary restriction, if any
    if sizes.num_processes > 1:
        notes.append(
            f"rollout batch {sizes.rollout} prompts, minibatch {sizes.minibatch}: {sizes.local_rollout} and "
            f"{sizes.local_minibatch} per process x {sizes.num_processes} processes, as Tulu 3 counts them"
        )
    if generator == "vllm":
        notes.append("rollouts generated by vLLM (TRL's colocated engine)")
    trainer = PPOTrainer(
        policy=model,
        ref_policy=reference,
        value_model=value_model,
        tokenizer=tokenizer,
        examples=examples,
        settings=settings,
        sizes=sizes,
        learning_rate=plan.learning_rate,
        total_iterations=iterations,
        mixed_precision={"bf16": "bf16", "fp16": "fp16"}.get(plan.dtype, "no"),
        generator=generator,
        gradient_checkpointing=plan.gradient_checkpointing,
    )
    return trainer, value_info


def _progress(entry: Mapping[str, Any]) -> str:
    def fmt(key: str) -> str:
        value = entry.get(key)
        return "-" if value is None else f"{value:.3g}"

    return (
        f"  iter {entry['iteration']:>4}: verifiable {fmt('verifiable_reward')}, KL {fmt('kl')}, "
        f"length {fmt('response_length')}, non-stop {fmt('non_stop_rate')}, value loss {fmt('value_loss')}, "
        f"clip {fmt('clip_fraction')} ({entry.get('iteration_s', 0):.2f} s)"
    )
