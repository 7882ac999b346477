"""The RLVR stage: prompts from the RLVR mixture, the kit's PPO (as SmolTulu) or TRL's GRPO, one log format.

::

    plan = resolve("rlvr_ppo", profile="auto")
    result = train_rlvr(plan, "runs/rlvr_ppo", parent="runs/dpo_1130")   # PPO from the DPO checkpoint
    result = train_rlvr(plan, "runs/rlvr_grpo", method="grpo")          # the modern alternative
    result.logs[-1]["verifiable_reward"], result.samples[0]["verified"]

SmolTulu-1.7b-Reinforced was trained with Tulu 3's PPO: the policy starts from the DPO checkpoint, a
frozen copy is the KL reference, the value model starts from the reward model, and the reward is the
verifiers' (:mod:`smoltulu_utils.verifiers`) with the non-stop penalty. :mod:`smoltulu_utils.ppo` holds
that algorithm. GRPO (TRL's ``GRPOTrainer``) needs no value model: it samples ``num_generations``
responses per prompt and uses their reward relative to the group's mean as the advantage; the kit feeds
it the same verifiers through a reward function (:func:`grpo_reward_function`, TRL's signature
``f(prompts, completions, completion_ids, **dataset_columns) -> list[float]``).

Batch sizes are counted as Tulu 3 counted them (:func:`rlvr_batch_sizes`): the recipe's
``rollout_batch_size`` and ``minibatch_size`` are per process, the global batch is that times
``plan.num_processes``; each rollout batch is used for ``num_epochs`` passes (Tulu 3: 4; GRPO's
``num_iterations``). Rollouts are sampled by transformers' ``generate``; vLLM is opt-in
(``generator="vllm"``). Where GRPO differs from the PPO run: its rollout counts completions
(``num_generations`` per prompt), its KL is a loss term (k3 estimator) rather than a per-token reward,
and its advantage is the group-relative score, to which the same non-stop replacement applies.

Both write the same per-iteration log entries (:data:`LOG_KEYS`): ``verifiable_reward`` (the share of
responses verified, 0 to 1; times 10 is Tulu 3's reward), ``kl`` (per response, summed over its tokens),
``response_length``, ``non_stop_rate`` (share of responses without end-of-sequence), ``value_loss``
(None for GRPO, which has no value model), ``clip_fraction``; plus ``skipped_rows``, the rows left out
because their ground truth cannot be read. TRL's GRPO logs its KL as a per-token mean (k3 estimator);
the kit multiplies it by the mean response length so that both read per response.

Written by hand here: the data preparation (which rows are usable and why not: no library checks RLVR
rows), the value-model loading with its manifest check, the log mapping, and the bookkeeping (manifest,
results rows, a JSONL log). The toy task (:func:`toy_task_rows`) is a prompt whose answer is one digit,
with the policy restricted to digits and end-of-sequence, so that a tiny random model can learn it in
seconds: the kit's tests and notebook show with it that both algorithms learn.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .data_checks import SkippedRow, SkipReport
from .errors import KitError
from .lm_head import use_plain_lm_head
from .manifest import MANIFEST_NAME, check_parent, write_manifest
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
from .training import check_world_size, data_entry
from .verifiers import GroundTruthError, Target, parse_ground_truth, parse_target, verify

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .profiles import Plan

log = logging.getLogger(__name__)

#: The log keys PPO and GRPO share (every entry also has iteration, episodes and skipped_rows).
LOG_KEYS = ("verifiable_reward", "kl", "response_length", "non_stop_rate", "value_loss", "clip_fraction")
METHODS = ("ppo", "grpo")


class RLVRError(KitError, ValueError):
    """An RLVR run that cannot start: a plan for another stage, no usable prompt, a wrong reward model."""


# ======================================================================================================
# Rows -> prompts and targets
# ======================================================================================================
@dataclass(frozen=True, eq=False)
class RLVRExample:
    """One usable prompt: its row index, the rendered prompt's token ids, the verifier target, the messages."""

    index: int
    prompt_ids: tuple[int, ...]
    target: Target
    messages: tuple[Mapping[str, str], ...]


@dataclass
class RLVRDataReport(SkipReport):
    """What :func:`prepare_rlvr_rows` kept and skipped (``skipped``: index and reason of each left-out row)."""

    n_rows: int
    n_kept: int
    prompt_length: int
    by_subset: dict[str, int] = field(default_factory=dict)
    skipped: list[SkippedRow] = field(default_factory=list)

    def describe(self) -> str:
        """A summary line (kept, skipped, per subset), then the skipped rows with their reasons."""
        subsets = ", ".join(f"{k} {v}" for k, v in sorted(self.by_subset.items()))
        head = (
            f"{self.n_kept} of {self.n_rows} rows kept ({subsets or 'none'}), prompts up to "
            f"{self.prompt_length} tokens; {self.n_skipped} skipped"
        )
        return "\n".join([head, *self.skipped_lines()])


def _prompt_problem(row: Any) -> str | None:
    messages = row.get("messages") if isinstance(row, Mapping) else None
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        return "no prompt: 'messages' is missing, empty or not a list"
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("content"), str):
            return f"bad message: message {i} is not a dict with text content"
        if message.get("role") not in ("system", "user", "assistant"):
            return f"bad message: message {i} has role {message.get('role')!r}"
    if messages[-1].get("role") != "user":
        return f"prompt does not end with a user turn (last role {messages[-1].get('role')!r})"
    return None


def _render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def prepare_rlvr_rows(
    rows: Iterable[Mapping], tokenizer: PreTrainedTokenizerBase, prompt_length: int
) -> tuple[list[RLVRExample], RLVRDataReport]:
    """Usable prompts of RLVR rows: ``(examples, report)``.

    Each row's ``messages`` are rendered with the chat template and the assistant's generation prompt;
    its ground truth is read by :func:`~smoltulu_utils.verifiers.parse_target`. A row is skipped, with its
    index and reason in ``report.skipped`` and a warning in the log, when its prompt is unusable, its
    ground truth cannot be read (``ground truth: ...``), or its prompt is longer than ``prompt_length``
    tokens (Tulu 3 filters those out too). Nothing is scored for a skipped row.
    """
    examples: list[RLVRExample] = []
    skipped: list[SkippedRow] = []
    by_subset: dict[str, int] = {}
    n_rows = 0
    for index, row in enumerate(rows):
        n_rows += 1
        problem = _prompt_problem(row)
        target = ids = None
        if problem is None:
            try:
                target = parse_target(row)
            except GroundTruthError as exc:
                problem = f"ground truth: {exc}"
        if problem is None:
            try:
                ids = _render_prompt(tokenizer, [dict(m) for m in row["messages"]])
            except Exception as exc:  # a template's own error on one row
                problem = f"chat template: {type(exc).__name__}: {exc}"
        if problem is None and len(ids) > prompt_length:
            problem = f"prompt too long: {len(ids)} tokens, more than prompt_length {prompt_length}"
        if problem is not None:
            skipped.append(SkippedRow(index, problem))
            continue
        by_subset[target.kind] = by_subset.get(target.kind, 0) + 1
        messages = tuple({"role": m["role"], "content": m["content"]} for m in row["messages"])
        examples.append(RLVRExample(index, tuple(ids), target, messages))
    report = RLVRDataReport(n_rows, len(examples), prompt_length, by_subset, skipped)
    if skipped:
        log.warning("RLVR data: skipped %d of %d rows\n%s", len(skipped), n_rows, report.describe())
    return examples, report


# ======================================================================================================
# The toy task
# ======================================================================================================
TOY_SYSTEM = "Answer with one digit."
TOY_PROMPT = "Reply with the digit {digit}."


def toy_task_rows(digits: Sequence[str] = ("7",), copies: int = 4) -> list[dict]:
    """Rows of a trivially verifiable task in the RLVR mixture's schema: the answer is one given digit.

    ``dataset`` is ``gsm8k`` (the last number of the response must equal the digit), so the real verifier
    scores it. With the policy restricted to :func:`toy_vocabulary`, a random model answers right about
    once in 121 tries (the digit, then end-of-sequence, among 11 tokens).
    """
    return [
        {
            "messages": [
                {"role": "system", "content": TOY_SYSTEM},
                {"role": "user", "content": TOY_PROMPT.format(digit=d)},
            ],
            "ground_truth": d,
            "dataset": "gsm8k",
            "constraint_type": None,
            "constraint": None,
        }
        for _ in range(copies)
        for d in digits
    ]


def toy_vocabulary(
    tokenizer: PreTrainedTokenizerBase, digits: str = "0123456789", eos: bool = False
) -> list[int]:
    """Token ids of ``digits`` (and end-of-sequence with ``eos``): the toy task's whole vocabulary."""
    ids = {tokenizer.eos_token_id} if eos else set()
    for digit in digits:
        encoded = tokenizer.encode(digit, add_special_tokens=False)
        if len(encoded) != 1:
            raise RLVRError(
                f"the tokenizer splits {digit!r} into {encoded}; the toy task needs one token per digit"
            )
        ids.add(encoded[0])
    return sorted(ids)


#: The toy task's one-token answers never end, so the non-stop penalty is off (open-instruct's switch).
TOY_PPO = PPOSettings(penalize_non_stop=False)


def toy_grpo_settings(num_generations: int = 8) -> GRPOSettings:
    """GRPO settings for the toy task: ``num_generations`` answers per prompt, no non-stop penalty."""
    return GRPOSettings(num_generations=num_generations, penalize_non_stop=False)


def toy_plan(
    iterations: int = 20,
    batch: int = 16,
    learning_rate: float = 3e-3,
    num_epochs: int = 4,
    seed: int = 42,
    num_processes: int | None = None,
) -> Plan:
    """A plan for the toy task: the ``rlvr_ppo`` recipe with one-token responses, ``batch`` prompts per
    iteration per process, ``num_epochs`` PPO passes (GRPO: iterations per batch), and a learning rate for
    the tiny model, for ``num_processes`` (default: the launcher's ``WORLD_SIZE``, else 1).

    Everything else (KL beta 0.05, temperature 1, the verifier, the reward 10) is the recipe's. The value
    of ``non_stop_penalty`` is kept; :data:`TOY_PPO` and :func:`toy_grpo_settings` switch it off.
    """
    from .profiles import get_profile, resolve
    from .recipes import load_recipe

    world = num_processes or int(os.environ.get("WORLD_SIZE") or 1)
    recipe = load_recipe("rlvr_ppo").replace(
        learning_rate=learning_rate,
        rollout_batch_size=batch,
        minibatch_size=batch,
        effective_batch_size=batch * world,  # one optimizer step: a minibatch on every process
        response_length=1,
        num_episodes=batch * iterations * world,
        num_epochs=num_epochs,
        lr_scheduler="constant",
        seed=seed,
    )
    profile = get_profile("smoke").replace(model="tiny", max_steps=None, per_device_batch_cap=batch)
    return resolve(recipe, profile, num_processes=world, verbose=False)


@torch.no_grad()
def verified_rate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[RLVRExample],
    response_length: int,
    *,
    samples: int = 64,
    temperature: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
) -> float:
    """Share of ``samples`` responses, sampled at ``temperature`` over ``examples`` in turn, that verify.

    The same measure as the logs' ``verifiable_reward``, on a fresh, larger sample: a before/after check
    of a policy that does not depend on the training batches. The global random state is left untouched.
    """
    from .ppo import left_pad, response_mask, sample_responses

    eos = [int(tokenizer.eos_token_id)]
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    verified = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, samples, batch_size):
            batch = [examples[i % len(examples)] for i in range(start, min(samples, start + batch_size))]
            ids, mask = left_pad([list(ex.prompt_ids) for ex in batch], pad, device)
            responses = sample_responses(model, ids, mask, response_length, temperature, eos, pad)
            keep, _ = response_mask(responses, eos)
            for ex, row, k in zip(batch, responses.tolist(), keep.tolist(), strict=True):
                text = tokenizer.decode([t for t, m in zip(row, k, strict=True) if m and t not in eos],
                                        skip_special_tokens=True)  # fmt: skip
                verified += verify(text, ex.target).verified
    model.train(was_training)
    return verified / samples


# ======================================================================================================
# Models
# ======================================================================================================
def load_value_model(
    source: str | Path, tokenizer: PreTrainedTokenizerBase, policy: PreTrainedModel | None = None
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """The value model's starting point: ``(model, info)``, a one-label sequence classifier.

    ``source``: a kit reward-model checkpoint (its manifest must exist, say stage ``rm`` and match the
    policy's tokenizer and chat template: :func:`~smoltulu_utils.manifest.check_parent`), a Hub id (the
    SmolTulu RM), ``"bundled"`` (SmolLM2-135M-Instruct with a new score head) or ``"tiny"`` (the policy's
    own backbone with a new head, for tests). ``info`` records what was loaded, for the manifest. The
    value model trains in full, so its weights load in float32 whatever the checkpoint's dtype.
    """
    from .models import ensure_bundled_cache, load_model, tiny_model
    from .training import MASTER_DTYPE

    name = str(source)
    folder = Path(name).expanduser()
    info: dict[str, Any] = {"source": name}
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
        model = load_model(str(folder), head="reward", dtype=MASTER_DTYPE)
    elif name == "bundled":
        model = load_model(str(ensure_bundled_cache()), head="reward", dtype=MASTER_DTYPE)
        info["head"] = "new"
    else:
        model = load_model(name, head="reward", dtype=MASTER_DTYPE)
    if getattr(model.config, "num_labels", None) != 1 or not hasattr(model, "score"):
        raise RLVRError(
            f"{name} is not a one-label sequence classifier (a reward model); cannot start a value model"
        )
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        raise RLVRError(
            f"{name} has a smaller vocabulary than the policy's tokenizer ({len(tokenizer)} tokens)"
        )
    return model, info


def _frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    reference = copy.deepcopy(model)
    reference.eval().requires_grad_(False)
    return reference


# ======================================================================================================
# Results
# ======================================================================================================
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
    """ResultsStore rows of a run: the first and last iteration's value of each shared log key."""
    rows = []
    for key in LOG_KEYS:
        for when, entry in (("initial", result.logs[0]), ("final", result.logs[-1])):
            value = entry.get(key)
            if value is None or not math.isfinite(float(value)):
                continue
            rows.append(
                {
                    "run_id": run_id,
                    "stage": "rlvr",
                    "model": model,
                    "benchmark": f"RLVR training ({result.method})",
                    "metric": f"{when}_{key}",
                    "value": float(value),
                    "n": int(entry.get("episodes", 0)),
                    "settings": {
                        "method": result.method,
                        "iterations": result.iterations,
                        "learning_rate": result.learning_rate,
                        "rollout_batch_size": result.rollout_batch_size,
                        "skipped_rows": result.data_report.n_skipped,
                        **dict(settings or {}),
                    },
                }
            )
    return rows


# ======================================================================================================
# GRPO through TRL
# ======================================================================================================
@dataclass(frozen=True)
class GRPOSettings:
    """GRPO's own constants; the recipe's learning rate, batch sizes, epochs (TRL's ``num_iterations``),
    lengths, temperature, KL beta and non-stop penalty (it replaces the score, as in the PPO run) are shared."""

    num_generations: int = 8  # kit choice: responses per prompt (DeepSeekMath used 64; 8 fits small batches)
    loss_type: str = "dapo"  # kit choice: TRL's default token-level normalisation
    scale_rewards: str = "group"  # kit choice: TRL's default, advantages divided by the group's std
    cliprange: float = 0.2  # Tulu 3: the PPO clip range, used as GRPO's epsilon
    max_grad_norm: float = 1.0  # Tulu 3: as the PPO run
    min_response_length: int = 0  # Tulu 3: a response shorter than this (before its EOS) counts as non-stop
    penalize_non_stop: bool = True  # Tulu 3: open-instruct's non_stop_penalty switch (on for RLVR)


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
    fewer than ``min_response_length`` tokens before it.

    TRL calls it with the prompts, the completions, their token ids and the dataset's other columns
    (``ground_truth``, ``dataset``, ``constraint``, ``constraint_type``); it logs ``verifiable_reward``
    (share verified) and ``verifier_errors`` through TRL's ``log_metric``.
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


def _grpo_entry(logs: Mapping[str, Any], step: int, episodes: int, seconds: float) -> dict[str, Any]:
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
_GRPO_PASS_KEYS = {"policy_loss": "loss", "clip_fraction": "clip_ratio/region_mean", "entropy": "entropy"}


def _grpo_log_callback(
    episodes_per_iteration: int, skipped: int, sink: list, callback: Callable | None, verbose: bool
):
    """A TrainerCallback that turns TRL's per-step GRPO logs into one kit entry per rollout batch.

    TRL logs the rewards on the step that generated the batch; the later steps on the same batch
    (``num_iterations`` passes, several minibatches) log only losses, which are averaged into the entry.
    """
    from transformers import TrainerCallback

    class RLVRLogs(TrainerCallback):
        """Collects TRL's per-step GRPO logs as kit log entries, one per rollout batch."""

        def __init__(self):
            self.last = time.perf_counter()
            self.pending: dict[str, Any] | None = None
            self.steps: list[Mapping[str, Any]] = []

        def _flush(self) -> None:
            if self.pending is None:
                return
            entry, steps = self.pending, self.steps
            self.pending, self.steps = None, []
            for key, trl_key in _GRPO_PASS_KEYS.items():
                found = [entry.get(key)] + [step.get(trl_key) for step in steps]
                values = [float(v) for v in found if v is not None]
                entry[key] = sum(values) / len(values) if values else None
            now = time.perf_counter()
            entry["iteration_s"], self.last = now - self.last, now
            sink.append(entry)
            if verbose:
                print(_progress(entry))
            if callback is not None:
                callback(entry)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs:
                return
            if "reward" in logs:  # a new rollout batch
                self._flush()
                iteration = len(sink) + 1
                self.pending = _grpo_entry(logs, iteration, iteration * episodes_per_iteration, 0.0)
                self.pending["skipped_rows"] = skipped
            elif self.pending is not None and "loss" in logs:
                self.steps.append(dict(logs))

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


def grpo_batch_arguments(plan: Plan, settings: GRPOSettings) -> dict[str, int]:
    """GRPOConfig's batch arguments for the PPO run's sizes (:func:`rlvr_batch_sizes`).

    One generation batch is the rollout batch (``rollout_batch_size`` completions per process, i.e.
    ``rollout_batch_size / num_generations`` prompts over all processes sampled ``num_generations``
    times), one optimizer step a minibatch; TRL then runs ``num_iterations`` passes over it (the
    recipe's ``num_epochs``), as the PPO run does.
    """
    sizes = rlvr_batch_sizes(plan)
    if sizes.rollout % settings.num_generations:
        raise RLVRError(
            f"GRPO needs the rollout batch ({sizes.rollout} completions: {sizes.local_rollout} per process x "
            f"{sizes.num_processes}) to be a multiple of num_generations ({settings.num_generations}); pick "
            "GRPOSettings(num_generations=...) that divides it"
        )
    return {
        "per_device_train_batch_size": sizes.micro,
        "gradient_accumulation_steps": sizes.accumulation,
        "steps_per_generation": sizes.local_rollout // sizes.micro,
        "num_iterations": _num_epochs(plan),
    }


def _run_grpo(plan, model, tokenizer, examples, report, iterations, settings, restrict_to, output_dir,
              verbose, callback, generator="auto") -> tuple[list[dict], list[dict], Any]:  # fmt: skip
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    from .scale_out import device_settings

    recipe = plan.recipe
    check_world_size(plan)  # rollout sizes are per process: another count changes the global batch
    use_vllm = choose_generator(generator) == "vllm"
    sizes = rlvr_batch_sizes(plan)
    batch_arguments = grpo_batch_arguments(plan, settings)
    steps_per_iteration = batch_arguments["num_iterations"] * sizes.minibatches
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
    config = GRPOConfig(
        output_dir=str(output_dir or scratch / "out"),
        **batch_arguments,
        num_generations=settings.num_generations,
        max_completion_length=recipe.response_length,
        temperature=recipe.temperature,
        top_k=0,
        top_p=1.0,
        beta=recipe.kl_beta,
        epsilon=settings.cliprange,
        loss_type=settings.loss_type,
        scale_rewards=settings.scale_rewards,
        learning_rate=plan.learning_rate,
        lr_scheduler_type=recipe.lr_scheduler,
        warmup_steps=recipe.warmup_ratio,
        weight_decay=recipe.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        max_steps=iterations * steps_per_iteration,  # TRL counts optimizer steps, the kit rollout batches
        seed=recipe.seed,
        bf16=plan.dtype == "bf16",
        fp16=plan.dtype == "fp16",
        **device_settings(),  # keeps an FSDP/DeepSpeed launch on a CPU sharded, as the other stages
        **({"gradient_checkpointing": True} if plan.gradient_checkpointing else {}),
        use_vllm=use_vllm,
        vllm_mode="colocate",
        report_to=plan.report_to,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
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
        callbacks=[_grpo_log_callback(sizes.rollout, report.n_skipped, logs, callback, verbose)],
    )
    from transformers.trainer_callback import PrinterCallback

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
    return logs, [], trainer


# ======================================================================================================
# The stage
# ======================================================================================================
def rlvr_batch_sizes(plan: Plan) -> BatchSizes:
    """The run's batch sizes, counted as Tulu 3 counted them.

    open-instruct's ``local_rollout_batch_size`` and ``local_mini_batch_size`` (32 in Tulu 3's launch
    commands and on the Reinforced card) are per GPU: ``rollout_batch_size = local_rollout_batch_size *
    world_size``. The recipe's ``rollout_batch_size`` and ``minibatch_size`` are those per-process counts;
    the global sizes are them times ``plan.num_processes``; micro-batches are capped by the profile.
    """
    recipe = plan.recipe
    try:
        return batch_sizes(
            recipe.rollout_batch_size, recipe.minibatch_size, plan.num_processes, plan.per_device_batch_cap
        )
    except KitError as exc:
        raise RLVRError(str(exc)) from exc


def _num_epochs(plan: Plan) -> int:
    """Passes over each rollout batch: the recipe's ``num_epochs`` (Tulu 3: 4), at least 1."""
    return max(1, round(plan.recipe.num_epochs))


def _iterations(plan: Plan, max_iterations: int | None) -> int:
    """Rollout batches to run: ``num_episodes`` over the global rollout batch, capped by the profile's steps."""
    recipe = plan.recipe
    n = max(1, recipe.num_episodes // rlvr_batch_sizes(plan).rollout)
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

    The policy and tokenizer come from ``parent`` (the DPO checkpoint: manifest and tokenizer checked) or
    ``plan.model``, unless given. The rows are the plan's RLVR mixture (fixtures in the smoke profile,
    at most ``plan.max_train_samples``) unless given; unusable rows are skipped and counted
    (``result.data_report``, ``skipped_rows`` in every log entry). PPO's value model starts from
    ``reward_model`` (a kit RM checkpoint) or the recipe's ``reward_model``, or from the policy when
    the recipe says ``value_model_from: policy``, unless ``value_model`` is given. Iterations (rollout
    batches): the recipe's ``num_episodes`` over the global rollout batch (``rollout_batch_size`` per
    process x ``plan.num_processes``, :func:`rlvr_batch_sizes`), capped by the profile's steps and
    ``max_iterations``. ``restrict_to``: token ids the policy may produce (the toy task). ``generator``:
    ``"auto"`` or ``"transformers"`` (transformers' ``generate``), or ``"vllm"`` (opt-in: vLLM colocated on
    the GPU through TRL, for PPO and GRPO; an error when vLLM or a GPU is missing). With ``output_dir``
    the policy, tokenizer, ``manifest.json`` and ``rlvr_log.jsonl`` are saved there; ``store`` (a ResultsStore) receives the first and last values of :data:`LOG_KEYS`.
    """
    from .chat_template import doctor
    from .data import load_rows, write_jsonl
    from .models import adapt_tokenizer, load_model, load_tokenizer, match_model_to_tokenizer
    from .profiles import data_mirror
    from .training import MASTER_DTYPE, full_precision

    recipe = plan.recipe
    if not isinstance(recipe, RLVRRecipe):
        raise RLVRError(
            f"train_rlvr needs a plan for an RLVR recipe, got stage {recipe.stage!r} ({recipe.name})"
        )
    if method not in METHODS:
        raise RLVRError(f"unknown method {method!r}; use 'ppo' (SmolTulu's) or 'grpo' (TRL's GRPOTrainer)")
    if recipe.reward_model_multiplier:
        raise RLVRError(
            f"reward_model_multiplier is {recipe.reward_model_multiplier}: the kit's RLVR uses the verifiable "
            "reward only, as the card and Tulu 3 (reward_model_multiplier: 0)."
        )
    notes: list[str] = []
    source = str(parent) if parent is not None else plan.model
    folder = Path(source).expanduser()
    is_checkpoint = folder.is_dir() and (folder / MANIFEST_NAME).is_file()
    adapted: list[str] = []
    if tokenizer is None:
        tokenizer = load_tokenizer(source)
        adapted = adapt_tokenizer(tokenizer)  # a base model's tokenizer gets the kit's chat template
    if folder.is_dir() and (parent is not None or is_checkpoint):
        stage = check_parent(folder, tokenizer).get("stage")
        if stage != "dpo":
            notes.append(f"the policy starts from a {stage!r} checkpoint; SmolTulu starts RLVR from DPO")
    doctor(tokenizer).raise_for_problems()
    if model is None:  # the policy trains in full: float32 master weights, whatever the checkpoint's dtype
        model = load_model(source, dtype=MASTER_DTYPE)
    if cast := full_precision(model):
        notes.append(cast)
    if adapted:
        adapted += match_model_to_tokenizer(model, tokenizer)
        notes.append("tokenizer adapted: " + "; ".join(adapted))

    given = rows is not None
    if rows is None:
        rows = load_rows(
            recipe.dataset, mirror=data_mirror(plan.profile), limit=plan.max_train_samples, validate=False
        )
    examples, report = prepare_rlvr_rows(rows, tokenizer, recipe.prompt_length)
    if not examples:
        raise RLVRError(f"no usable RLVR rows: {report.describe()}")
    iterations = _iterations(plan, max_iterations)
    handle = restrict_vocabulary(model, restrict_to) if restrict_to is not None else None
    if verbose:
        print(
            f"RLVR {recipe.name} ({method}): {report.describe().splitlines()[0]}\n"
            f"  {iterations} iterations of {rlvr_batch_sizes(plan).rollout} prompts, responses up to "
            f"{recipe.response_length} tokens at temperature {recipe.temperature}, LR {plan.learning_rate:g}, "
            f"KL beta {recipe.kl_beta}"
        )

    start = time.perf_counter()
    value_info: dict[str, Any] = {}
    if method == "ppo":
        trainer = _ppo_trainer(plan, model, tokenizer, examples, iterations, reward_model, value_model,
                               ppo_settings or PPOSettings(), restrict_to, generator, value_info, notes)  # fmt: skip

        def tagged(entry: dict) -> None:
            entry["skipped_rows"] = report.n_skipped
            if verbose:
                print(_progress(entry))
            if callback is not None:
                callback(entry)

        logs = trainer.train(iterations, callback=tagged)
        samples = trainer.samples
        policy = trainer.unwrapped.policy
        accelerator = trainer.accelerator
    else:
        settings = grpo_settings or GRPOSettings()
        logs, samples, grpo = _run_grpo(plan, model, tokenizer, examples, report, iterations, settings,
                                        restrict_to, output_dir, verbose, callback, generator)  # fmt: skip
        samples = _grpo_samples(grpo.model, tokenizer, examples, plan, settings)
        policy = grpo.accelerator.unwrap_model(grpo.model)
        accelerator = grpo.accelerator
    wall = time.perf_counter() - start
    if handle is not None:
        handle.remove()

    result = RLVRResult(
        method=method,
        output_dir=Path(output_dir) if output_dir is not None else None,
        iterations=len(logs),
        logs=logs,
        samples=samples,
        wall_seconds=wall,
        learning_rate=plan.learning_rate,
        rollout_batch_size=rlvr_batch_sizes(plan).rollout,
        data_report=report,
        notes=notes,
    )
    main = accelerator.is_main_process
    if output_dir is not None and main:
        output_dir = Path(output_dir)
        policy.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
        write_jsonl(logs, output_dir / "rlvr_log.jsonl")
        write_manifest(
            output_dir,
            stage="rlvr",
            recipe=recipe,
            data=[data_entry(plan, report, given, "train_rlvr")],
            tokenizer=tokenizer,
            seed=recipe.seed,
            parent=source if is_checkpoint or not folder.is_dir() else None,
            extra={
                "method": method,
                "tokenizer_adapted": adapted,
                "started_from": source,
                "value_model": value_info or None,
                "plan": plan.to_dict(),
                "iterations": result.iterations,
                "first_log": logs[0] if logs else None,
                "last_log": logs[-1] if logs else None,
                "wall_seconds": wall,
                "data_report": report.to_dict(),
                "ppo_settings": dataclasses.asdict(ppo_settings or PPOSettings())
                if method == "ppo"
                else None,
                "grpo_settings": dataclasses.asdict(grpo_settings or GRPOSettings())
                if method == "grpo"
                else None,
                "notes": notes,
            },
        )
    if store is not None and main and logs:
        name = run_id or f"{recipe.name}_{method}_{plan.profile}"
        store.append(
            results_rows(result, name, str(output_dir) if output_dir else name, {"profile": plan.profile})
        )
    if verbose and logs:
        first, last = logs[0], logs[-1]
        print(
            f"  done: {result.iterations} iterations in {wall:.1f} s, verifiable reward "
            f"{first['verifiable_reward']:.2f} -> {last['verifiable_reward']:.2f}, skipped rows {report.n_skipped}"
            + (f"; saved to {output_dir}" if output_dir is not None else "")
        )
    return result


def _ppo_trainer(plan, model, tokenizer, examples, iterations, reward_model, value_model, settings,
                 restrict_to, generator, value_info, notes) -> PPOTrainer:  # fmt: skip
    """The PPO trainer of a plan: the recipe's per-process sizes times ``plan.num_processes`` (as Tulu 3),
    ``num_epochs`` passes per rollout batch, rollouts by ``generate`` unless ``generator="vllm"``."""
    recipe = plan.recipe
    check_world_size(plan)  # rollout sizes are per process: another count changes the global batch
    sizes = rlvr_batch_sizes(plan)
    engine = choose_generator(generator)  # before any model loads: a clear error when vLLM cannot run
    if value_model is None:
        if recipe.value_model_from == "policy":
            value_model = value_model_from_policy(model)
            value_info.update(source="policy", head="new")
        else:
            value_model, info = load_value_model(reward_model or recipe.reward_model, tokenizer, policy=model)
            value_info.update(info)
    else:
        value_info.update(source="given")
    reference = _frozen_copy(model)  # a copy keeps the policy's vocabulary restriction, if any
    if sizes.num_processes > 1:
        notes.append(
            f"rollout batch {sizes.rollout} prompts, minibatch {sizes.minibatch}: {sizes.local_rollout} and "
            f"{sizes.local_minibatch} per process x {sizes.num_processes} processes, as Tulu 3 counts them"
        )
    if engine == "vllm":
        notes.append("rollouts generated by vLLM (TRL's colocated engine)")
    return PPOTrainer(
        policy=model,
        ref_policy=reference,
        value_model=value_model,
        tokenizer=tokenizer,
        examples=examples,
        learning_rate=plan.learning_rate,
        rollout_batch_size=sizes.rollout,
        minibatch_size=sizes.minibatch,
        micro_batch_size=sizes.micro,
        response_length=recipe.response_length,
        num_epochs=_num_epochs(plan),
        kl_beta=recipe.kl_beta,
        temperature=recipe.temperature,
        verifiable_reward=recipe.verifiable_reward,
        non_stop_penalty=recipe.non_stop_penalty,
        lr_scheduler=recipe.lr_scheduler,
        warmup_ratio=recipe.warmup_ratio,
        weight_decay=recipe.weight_decay,
        total_iterations=iterations,
        seed=recipe.seed,
        settings=settings,
        mixed_precision={"bf16": "bf16", "fp16": "fp16"}.get(plan.dtype, "no"),
        generator=engine,
        gradient_checkpointing=plan.gradient_checkpointing,
    )


def _grpo_samples(model, tokenizer, examples, plan, settings: GRPOSettings, n: int = 8) -> list[dict]:
    """Responses of the trained GRPO policy to the first prompts, with their verdicts (as PPO keeps them)."""
    from .ppo import _sample, left_pad, response_mask, sample_responses

    recipe = plan.recipe
    batch = [examples[i % len(examples)] for i in range(min(n, max(len(examples), 1)))]
    device = next(model.parameters()).device
    eos = [int(tokenizer.eos_token_id)]
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0])
    ids, mask = left_pad([list(ex.prompt_ids) for ex in batch], pad, device)
    was_training = model.training
    model.eval()
    responses = sample_responses(model, ids, mask, recipe.response_length, recipe.temperature, eos, pad)
    model.train(was_training)
    keep, ended = response_mask(responses, eos)
    samples = []
    for ex, row, k, end in zip(batch, responses.tolist(), keep.tolist(), ended.tolist(), strict=True):
        text = tokenizer.decode(
            [t for t, m in zip(row, k, strict=True) if m and t not in eos], skip_special_tokens=True
        )
        verdict = verify(text, ex.target)
        score = recipe.verifiable_reward if verdict.verified else 0.0
        if settings.penalize_non_stop and not end:  # replaced, as in the reward function
            score = recipe.non_stop_penalty
        samples.append(_sample(tokenizer, ex, text, verdict, score, bool(end), int(sum(k))))
    return samples


def _progress(entry: Mapping[str, Any]) -> str:
    def fmt(key: str) -> str:
        value = entry.get(key)
        return "-" if value is None else f"{value:.3g}"

    return (
        f"  iter {entry['iteration']:>4}: verifiable {fmt('verifiable_reward')}, KL {fmt('kl')}, "
        f"length {fmt('response_length')}, non-stop {fmt('non_stop_rate')}, value loss {fmt('value_loss')}, "
        f"clip {fmt('clip_fraction')} ({entry.get('iteration_s', 0):.2f} s)"
    )


# ======================================================================================================
# Display
# ======================================================================================================
CURVE_LABELS = {
    "verifiable_reward": "verified share",
    "kl": "KL to the reference (per response)",
    "response_length": "response length (tokens)",
    "non_stop_rate": "share never ending",
    "value_loss": "value loss",
    "clip_fraction": "clip fraction",
}


def plot_curves(
    results: Mapping[str, RLVRResult], keys: Sequence[str] = ("verifiable_reward", "kl", "response_length")
):
    """One panel per log key, one line per run (``results``: label -> result), over iterations."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for label, result in results.items():
            curve = result.curve(key)
            if curve:
                xs, ys = zip(*curve, strict=True)
                ax.plot(xs, ys, marker="o", markersize=3, label=label)
        ax.set_xlabel("iteration")
        ax.set_title(CURVE_LABELS.get(key, key))
    axes[0][0].legend()
    fig.tight_layout()
    return fig


def samples_frame(result: RLVRResult):
    """The last iteration's responses with their verdicts, as a DataFrame."""
    import pandas as pd

    columns = ["subset", "ground_truth", "response", "extracted", "verified", "ended", "score", "length"]
    return pd.DataFrame(result.samples, columns=columns)
