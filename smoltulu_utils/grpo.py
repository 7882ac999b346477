"""GRPO through TRL's ``GRPOTrainer``, fed the PPO run's prompts, verifiers, batch sizes and log format.

GRPO needs no value model: the advantage is a response's reward relative to its group of
``num_generations``. Written by hand here: the reward function (the PPO run's score), the batch sizes
in TRL's terms, and the log mapping (one entry per rollout batch; TRL's per-token KL times the mean
response length, so that it reads per response as the PPO run logs it).
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .lm_head import use_plain_lm_head
from .ppo import BatchSizes, restrict_vocabulary, sample_and_verify, sample_row
from .rlvr_data import RLVRError
from .training import trainer_settings
from .verifiers import parse_ground_truth, verify

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .profiles import Plan
    from .recipes import RLVRRecipe


@dataclass(frozen=True)
class GRPOSettings:
    """GRPO's own settings, the RLVR recipe's (each cited there); lengths, temperature, KL beta, rewards and
    learning rate are read from the plan as the PPO run reads them."""

    num_generations: int  # responses per prompt
    num_iterations: int  # passes over each rollout batch: the recipe's num_epochs
    loss_type: str
    scale_rewards: str
    cliprange: float  # the PPO clip range, used as GRPO's epsilon
    max_grad_norm: float
    min_response_length: int  # a response shorter than this (before its EOS) counts as non-stop
    penalize_non_stop: bool  # the non-stop penalty replaces the score, as in the PPO run

    @classmethod
    def from_recipe(cls, recipe: RLVRRecipe, **changes: Any) -> GRPOSettings:
        """The settings of an RLVR recipe (``grpo_<name>`` or ``<name>``; ``num_iterations`` is its
        ``num_epochs``), with ``changes`` (e.g. ``num_generations=4``)."""
        names = [f.name for f in dataclasses.fields(cls)]
        values = {n: getattr(recipe, f"grpo_{n}", getattr(recipe, n, None)) for n in names}
        return cls(**{**values, "num_iterations": max(1, round(recipe.num_epochs)), **changes})


def _completion_text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], Mapping):
        return str(completion[-1].get("content", ""))
    return str(completion)


def grpo_reward_function(
    verifiable_reward: float = 10.0,
    non_stop_penalty: float = -10.0,
    eos_token_ids: Sequence[int] = (),
    min_response_length: int = 0,
) -> Callable[..., list[float]]:
    """A TRL reward function giving the PPO run's score: ``verifiable_reward`` when verified, else 0, and
    ``non_stop_penalty`` for a response without end-of-sequence (when ``eos_token_ids`` are given) or with
    fewer than ``min_response_length`` tokens before it. TRL passes the dataset's columns (``ground_truth``,
    ``dataset``, ...); it logs ``verifiable_reward`` (share verified) and ``verifier_errors``.
    """
    eos = {int(t) for t in eos_token_ids}

    def rlvr_verifier(prompts, completions, completion_ids=None, ground_truth=None, dataset=None,
                      constraint=None, constraint_type=None, log_metric=None, **_: Any) -> list[float]:  # fmt: skip
        n = len(completions)
        constraint = constraint or [None] * n
        constraint_type = constraint_type or [None] * n
        rewards, verified, errors = [], 0, 0
        for i, completion in enumerate(completions):
            verdict = verify(
                _completion_text(completion),
                parse_ground_truth(dataset[i], ground_truth[i], constraint[i], constraint_type[i]),
            )
            verified += verdict.verified
            errors += verdict.error is not None
            score = float(verifiable_reward) if verdict.verified else 0.0
            if eos and completion_ids is not None:
                ids = list(completion_ids[i])
                end = next((k for k, t in enumerate(ids) if t in eos), None)
                if end is None or end < min_response_length:
                    score = float(non_stop_penalty)
            rewards.append(score)
        if log_metric is not None:
            log_metric("verifiable_reward", verified / max(n, 1))
            log_metric("verifier_errors", float(errors))
        return rewards

    return rlvr_verifier


def grpo_entry(logs: Mapping[str, Any], step: int, episodes: int, seconds: float) -> dict[str, Any]:
    """A kit log entry from one of TRL's GRPO log dicts."""
    length = logs.get("completions/mean_length")
    kl = logs.get("kl")
    return {
        "iteration": step,
        "episodes": episodes,
        "learning_rate": logs.get("learning_rate"),
        "verifiable_reward": logs.get("verifiable_reward"),
        "score": logs.get("reward"),
        "kl": None if kl is None or length is None else float(kl) * float(length),
        "response_length": length,
        "non_stop_rate": logs.get("completions/clipped_ratio"),
        "entropy": logs.get("entropy"),
        "policy_loss": logs.get("loss"),
        "value_loss": None,
        "clip_fraction": logs.get("clip_ratio/region_mean"),
        "verifier_errors": logs.get("verifier_errors"),
        "iteration_s": seconds,
    }


#: Kit keys averaged over all optimizer steps of one GRPO rollout batch, and TRL's names for them.
_PASS_KEYS = {"policy_loss": "loss", "clip_fraction": "clip_ratio/region_mean", "entropy": "entropy"}


def _log_callback(episodes_per_iteration: int, sink: list, on_entry: Callable[[dict], Any]):
    """A TrainerCallback that turns TRL's per-step GRPO logs into one kit entry per rollout batch.

    TRL logs the rewards on the step that generated the batch; the later steps on the same batch
    (``num_iterations`` passes, several minibatches) log only losses, which are averaged into the entry.
    """
    from transformers import TrainerCallback

    class RLVRLogs(TrainerCallback):
        def __init__(self):
            self.last = time.perf_counter()
            self.batch: list[dict[str, Any]] = []  # TRL's logs of the current rollout batch

        def _flush(self) -> None:
            if not self.batch:
                return
            now, iteration = time.perf_counter(), len(sink) + 1
            entry = grpo_entry(self.batch[0], iteration, iteration * episodes_per_iteration, now - self.last)
            for key, trl_key in _PASS_KEYS.items():
                values = [float(step[trl_key]) for step in self.batch if step.get(trl_key) is not None]
                entry[key] = sum(values) / len(values) if values else None
            self.batch, self.last = [], now
            sink.append(entry)
            on_entry(entry)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:  # a new rollout batch
                self._flush()
                self.batch = [dict(logs)]
            elif logs and self.batch and "loss" in logs:
                self.batch.append(dict(logs))

        def on_train_end(self, args, state, control, **kwargs):
            self._flush()

    return RLVRLogs()


def _reference_folder(model: PreTrainedModel, scratch: Path) -> None:
    """Make TRL able to load the reference policy: it reads ``config._name_or_path``; an in-memory model
    (the tiny one) is saved to ``scratch`` first."""
    name = getattr(model.config, "_name_or_path", "") or ""
    if not Path(name).is_dir():
        model.save_pretrained(scratch)
        model.config._name_or_path = str(scratch)


def grpo_batch_arguments(sizes: BatchSizes, settings: GRPOSettings) -> dict[str, int]:
    """GRPOConfig's batch arguments for the PPO run's sizes: one generation batch is the rollout batch
    (``rollout / num_generations`` prompts, each sampled ``num_generations`` times), one optimizer step a
    minibatch, and ``num_iterations`` passes over each batch."""
    if sizes.rollout % settings.num_generations:
        raise RLVRError(
            f"GRPO needs the rollout batch ({sizes.rollout} completions: {sizes.local_rollout} per process x "
            f"{sizes.num_processes}) to be a multiple of num_generations ({settings.num_generations}); pick "
            "GRPOSettings.from_recipe(recipe, num_generations=...) that divides it"
        )
    return {
        "per_device_train_batch_size": sizes.micro,
        "gradient_accumulation_steps": sizes.accumulation,
        "steps_per_generation": sizes.local_rollout // sizes.micro,
        "num_iterations": settings.num_iterations,
    }


def run_grpo(
    plan: Plan,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Any],
    sizes: BatchSizes,
    iterations: int,
    settings: GRPOSettings,
    *,
    restrict_to: Sequence[int] | None = None,
    output_dir: str | Path | None = None,
    on_entry: Callable[[dict], Any] = lambda entry: None,
    generator: str = "transformers",
) -> tuple[list[dict], Any]:
    """Train ``model`` with TRL's GRPO for ``iterations`` rollout batches of ``examples`` (``RLVRExample``):
    ``(log entries, the trainer)``; ``on_entry`` sees each entry; ``generator``: ``choose_generator``'s."""
    import datasets
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    recipe = plan.recipe
    batch_arguments = grpo_batch_arguments(sizes, settings)
    rows = [
        {
            "prompt": [dict(m) for m in ex.messages],
            "ground_truth": ex.target.ground_truth,
            "dataset": ex.target.kind,
            "constraint": ex.target.constraint,
            "constraint_type": ex.target.constraint_type,
        }
        for ex in examples
    ]
    eos = sorted({int(tokenizer.eos_token_id)})
    scratch = Path(tempfile.mkdtemp(prefix="rlvr_grpo_"))
    if recipe.kl_beta > 0:
        _reference_folder(model, scratch / "reference")
    # The Trainer settings every stage shares (schedule, seed, precision, device, logs), then GRPO's own.
    common = trainer_settings(plan, output_dir or scratch / "out", max_grad_norm=settings.max_grad_norm)
    config = GRPOConfig(
        **{
            **common,
            **batch_arguments,
            "per_device_eval_batch_size": batch_arguments["per_device_train_batch_size"],
            "num_generations": settings.num_generations,
            "max_completion_length": recipe.response_length,
            "temperature": recipe.temperature,
            "top_k": 0,
            "top_p": 1.0,
            "beta": recipe.kl_beta,
            "epsilon": settings.cliprange,
            "loss_type": settings.loss_type,
            "scale_rewards": settings.scale_rewards,
            # TRL counts optimizer steps, the kit rollout batches
            "max_steps": iterations * settings.num_iterations * sizes.minibatches,
            "use_vllm": generator == "vllm",
            "vllm_mode": "colocate",
            "disable_tqdm": True,
        }
    )
    logs: list[dict] = []
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=grpo_reward_function(
            recipe.verifiable_reward,
            recipe.non_stop_penalty,
            eos if settings.penalize_non_stop else (),
            settings.min_response_length,
        ),
        args=config,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[_log_callback(sizes.rollout, logs, on_entry)],
    )
    trainer.remove_callback(PrinterCallback)  # the kit prints its own line per step (with verbose)
    if restrict_to is not None and trainer.ref_model is not None:
        restrict_vocabulary(trainer.ref_model, restrict_to)
    if not torch.cuda.is_available():  # TRL's tiled LM head is several times slower on a CPU
        for module in (trainer.model, trainer.ref_model):
            if module is not None:
                use_plain_lm_head(module)
    try:
        trainer.train()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # the reference copy and TRL's output folder
    return logs, trainer


def grpo_samples(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Any],
    recipe: RLVRRecipe,
    settings: GRPOSettings,
    n: int = 8,
) -> list[dict]:
    """Responses of the trained GRPO policy to the first ``n`` prompts, with their verdicts (as PPO keeps them)."""
    batch = [examples[i % len(examples)] for i in range(min(n, max(len(examples), 1)))]
    texts, verdicts, ended, lengths = sample_and_verify(
        model, tokenizer, batch, recipe.response_length, recipe.temperature
    )
    samples = []
    for ex, text, verdict, end, length in zip(batch, texts, verdicts, ended, lengths, strict=True):
        score = recipe.verifiable_reward if verdict.verified else 0.0
        if settings.penalize_non_stop and not end:  # replaced, as in the reward function
            score = recipe.non_stop_penalty
        samples.append(sample_row(tokenizer, ex, text, verdict, score, bool(end), int(length)))
    return samples
