"""RLVR prompts: the mixture's rows as rendered prompts with verifier targets, and the toy task.

Written by hand because no library checks RLVR rows (:func:`prepare_rlvr_rows` says why a row is left
out). The toy task's answer is one digit; with the policy restricted to the digits, a tiny random model
learns it in seconds, which is how the tests and notebook show that PPO and GRPO learn.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .data_checks import ROLES, SkippedRow, SkipReport
from .errors import KitError
from .verifiers import GroundTruthError, Target, parse_target

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .profiles import Plan

log = logging.getLogger(__name__)


class RLVRError(KitError, ValueError):
    """An RLVR run that cannot start: a plan for another stage, no usable prompt, a wrong reward model."""


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
        if message.get("role") not in ROLES:
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
    """Usable prompts of RLVR rows, rendered with the generation prompt, and their verifier targets:
    ``(examples, report)``. A row is skipped, with its index and reason in ``report.skipped`` and a warning
    in the log, when its prompt is unusable, its ground truth cannot be read, or its prompt is longer than
    ``prompt_length`` tokens (Tulu 3 filters those out too).
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


# -- the toy task ------------------------------------------------------------------------------------
TOY_SYSTEM = "Answer with one digit."
TOY_PROMPT = "Reply with the digit {digit}."


def toy_task_rows(digits: Sequence[str] = ("7",), copies: int = 4) -> list[dict]:
    """Rows of a trivially verifiable task in the RLVR mixture's schema: the answer is one given digit.

    ``dataset`` is ``gsm8k`` (the last number of the response must equal the digit), so the real verifier
    scores it. With the policy restricted to :func:`toy_vocabulary`, a random model answers right about
    once in 10 tries.
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


def toy_vocabulary(tokenizer: PreTrainedTokenizerBase, digits: str = "0123456789") -> list[int]:
    """Token ids of ``digits``: the toy task's whole vocabulary."""
    ids = set()
    for digit in digits:
        encoded = tokenizer.encode(digit, add_special_tokens=False)
        if len(encoded) != 1:
            raise RLVRError(
                f"the tokenizer splits {digit!r} into {encoded}; the toy task needs one token per digit"
            )
        ids.add(encoded[0])
    return sorted(ids)


def toy_plan(
    iterations: int = 20,
    batch: int = 16,
    learning_rate: float = 3e-3,
    num_epochs: int = 4,
    seed: int = 42,
    num_processes: int | None = None,
) -> Plan:
    """A plan for the toy task: the ``rlvr_ppo`` recipe with one-token responses, ``batch`` prompts per
    iteration per process, ``num_epochs`` passes per batch and a learning rate for the tiny model, for
    ``num_processes`` (default: the launcher's ``WORLD_SIZE``, else 1). The one-token answers never end,
    so the non-stop penalty is off; everything else (KL beta, temperature, rewards) is the recipe's.
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
        penalize_non_stop=False,
    )
    profile = get_profile("smoke").replace(model="tiny", max_steps=None, per_device_batch_cap=batch)
    return resolve(recipe, profile, num_processes=world, verbose=False)


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
    """Share of ``samples`` responses, sampled at ``temperature`` over ``examples`` in turn, that verify: the
    logs' ``verifiable_reward`` on a fresh sample, for a before/after check. The random state is kept."""
    from .ppo import sample_and_verify

    verified = 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, samples, batch_size):
            batch = [examples[i % len(examples)] for i in range(start, min(samples, start + batch_size))]
            _, verdicts, _, _ = sample_and_verify(model, tokenizer, batch, response_length, temperature)
            verified += sum(v.verified for v in verdicts)
    return verified / samples
