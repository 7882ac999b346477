"""The reward-model stage: TRL's ``RewardTrainer`` driven by a :class:`Plan`, and the Table 8 evaluation.

::

    plan = resolve("rm_1130", profile="auto")
    result = train_rm(plan, "runs/rm_1130")            # model, tokenizer and rows follow the plan
    result.final_train_loss, result.eval_accuracy       # Bradley-Terry loss, held-out pair accuracy
    ufb = evaluate_ultrafeedback(model, tokenizer)      # accuracy on UltraFeedback test_prefs
    rb = evaluate_rewardbench(model, tokenizer)         # RewardBench subsets -> Chat, Chat Hard, ...

The model is a sequence classifier with one output (``AutoModelForSequenceClassification``,
``num_labels=1``) on top of the start checkpoint; it reads one hidden state per conversation, the one at
the conversation's last real token, and maps it to a score ``r``. It trains on pairs with the
Bradley-Terry loss ``-log sigmoid(r(chosen) - r(rejected))``, averaged over the pairs of a batch
(TRL's ``RewardTrainer`` loss, without its optional margin and centering terms). A pair counts as
correct when ``r(chosen) > r(rejected)``; a tie counts as wrong, as in RewardBench's reference code.

What TRL and transformers do here: tokenization with the chat template, batching, the loss, the
training loop and the score head. What is written by hand, and why:

- **Which token is scored.** transformers' sequence-classification head (5.x,
  ``GenericForSequenceClassification``) takes the rightmost token that is not the pad id. SmolLM2 ships
  ``pad == eos == <|im_end|>``, so a conversation that ends with ``<|im_end|>`` (a template that ends on
  eos, TRL's text path that appends eos, a truncated reply) is scored at the token *before* its last
  real token (TRL's PPO reward function, ``trl.experimental.utils.get_reward``, reads the token before
  the first pad id of the response: before the first ``<|im_end|>``). SmolLM2's template ends every
  turn with ``<|im_end|>`` and a newline, so a whole rendered conversation ends on the newline and the
  head happens to read it; any sequence that ends on eos does not. The kit therefore (1) trains with a pad id distinct from eos (``<|endoftext|>`` for SmolLM2, see
  :func:`score_pad_token_id`), and checks in every training step that the head's position is the last
  attended one, and (2) scores evaluation batches at the last position of the attention mask
  (:func:`reward_scores`), whatever the checkpoint's pad id. ``tests/test_reward_model.py`` shows the
  wrong position and compares the kit's score with one computed by hand at the last real token.
- **Evaluation** (:func:`score_preferences`, :func:`evaluate_rewardbench`): TRL reports a running
  batch accuracy only; the kit keeps every pair's two scores (the figure of chosen vs rejected score
  distributions, per-subset accuracy) and aggregates RewardBench the way its reference code does
  (:data:`REWARDBENCH_SECTIONS`, :data:`REWARDBENCH_WEIGHTS`, :func:`rewardbench_sections`).
- The run's bookkeeping: rows checked by :func:`smoltulu_utils.preferences.prepare_preference_rows`,
  the manifest and parent checks, results rows for Table 8.

RewardBench scoring
-------------------
RewardBench (Lambert et al. 2024, "RewardBench: Evaluating Reward Models for Language Modeling",
arXiv:2403.13787) scores each of its 23 subsets by pair accuracy, then groups them into four sections.
A section's score is the mean of its subsets' accuracies *weighted by the number of prompts* of each
subset (a per-prompt average over the section), except that in Reasoning the math subset
(``math-prm``, 447 prompts) is up-weighted to 984, the total of the six code subsets, so math and code
count equally, and the two XSTest subsets carry each other's count (the reference code weighs
``xstest-should-refuse``, 154 prompts, by 250 and ``xstest-should-respond``, 250 prompts, by 154; the
kit keeps these weights, so its Safety scores compare with the leaderboard's). The final score is the
unweighted mean of the four section scores. This is the paper's description and its reference code
(``rewardbench.utils.calculate_scores_per_section`` with ``EXAMPLE_COUNTS`` and ``SUBSET_MAPPING``);
the weights are fixed numbers, not the counts of the rows at hand, so a subset of RewardBench (the
kit's fixtures) is weighted like the full set. Note: the
SmolTulu paper's "RB Average" is not the mean of its four section scores (RM-1130: 72.43 printed, 70.33
computed; Tulu 3 8B RM: 81.34 vs 78.19), so the paper used another aggregate that it does not state;
the kit's Average is RewardBench's.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from trl import RewardTrainer

from .chat_template import doctor
from .errors import KitError
from .manifest import MANIFEST_NAME, check_parent, write_manifest
from .preferences import PreferenceDataReport, prepare_preference_rows
from .recipes import RMRecipe
from .training import (
    check_world_size,
    data_entry,
    full_precision,
    log_history,
    save_trained_model,
    stage_load_kwargs,
    trainer_settings,
    training_method,
)

if TYPE_CHECKING:  # pragma: no cover
    import datasets
    import pandas as pd
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from trl import RewardConfig

    from .profiles import Plan

log = logging.getLogger(__name__)

#: Evaluation batch size (pairs are scored as 2 x this many sequences, longest first).
EVAL_BATCH_SIZE = 8
#: Tokens a scored conversation keeps (kit choice: the recipes' max_length; longer ones are cut and counted).
EVAL_MAX_LENGTH = 2048

# --------------------------------------------------------------------------------------- RewardBench
REWARDBENCH_HUB_ID = "allenai/reward-bench"
REWARDBENCH_SPLIT = "filtered"  # the 2,985 prompts the leaderboard scores
#: RewardBench's row fields (the Hub's ``dataset_info``), in order.
REWARDBENCH_FIELDS = ("prompt", "chosen", "chosen_model", "rejected", "rejected_model", "subset", "id")
#: Section -> its subsets, as RewardBench groups them (reference code: ``SUBSET_MAPPING``). The
#: "Prior Sets" of the first leaderboard (Anthropic HH, SHP, Summarize) are no section here.
REWARDBENCH_SECTIONS: dict[str, tuple[str, ...]] = {
    "Chat": ("alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"),
    "Chat Hard": (
        "mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
        "llmbar-adver-GPTOut", "llmbar-adver-manual",
    ),
    "Safety": (
        "refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond",
        "donotanswer",
    ),
    "Reasoning": ("math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"),
}  # fmt: skip
#: Subset -> its weight in the section mean: the reference code's ``EXAMPLE_COUNTS``
#: (``rewardbench/constants.py``), the subset's prompt count in the filtered split, except math-prm,
#: up-weighted from 447 to 984 = 6 x 164, the six code subsets together, so that math and code weigh the
#: same in Reasoning (the paper's choice), and the two XSTest subsets, whose counts the reference code
#: swaps (154 should-refuse and 250 should-respond prompts, weighted 250 and 154; XSTest has only 200
#: unsafe prompts). The leaderboard's Safety scores use these weights, and so does the kit.
REWARDBENCH_WEIGHTS: dict[str, int] = {
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95,
    "mt-bench-easy": 28, "mt-bench-med": 40,
    "mt-bench-hard": 37, "llmbar-natural": 100, "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92, "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46,
    "refusals-dangerous": 100, "refusals-offensive": 100,
    "xstest-should-refuse": 250,  # 154 prompts, weighted 250 as the reference code does
    "xstest-should-respond": 154,  # 250 prompts, weighted 154 as the reference code does
    "donotanswer": 136,
    "math-prm": 984,  # 447 prompts, counted as 984
    "hep-cpp": 164, "hep-go": 164, "hep-java": 164, "hep-js": 164, "hep-python": 164, "hep-rust": 164,
}  # fmt: skip
#: The Table 8 column each recipe's run stands beside.
RM_PAPER_MODELS = {"rm_1130": "SmolTulu RM-1130", "rm_1207": "SmolTulu RM-1207"}
#: Table 8's labels (``smoltulu_utils.paper.RM_BENCHMARKS``) for the kit's scores.
TABLE8_LABELS = {
    "Chat": "RB Chat",
    "Chat Hard": "RB Chat Hard",
    "Safety": "RB Safety",
    "Reasoning": "RB Reasoning",
    "Average": "RB Average",
    "ultrafeedback": "UFB",
}


class RMError(KitError, ValueError):
    """A reward-model run or evaluation that cannot go on; the message says why and how to fix it."""


# ======================================================================================================
# Which token is scored
# ======================================================================================================
def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the position of the last attended token (the last 1 of the mask); left or right padding."""
    mask = attention_mask.to(torch.long)
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (positions * mask).argmax(-1)


def head_token_index(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Per row, the position transformers' sequence-classification head scores: the rightmost non-pad id.

    The same expression as ``GenericForSequenceClassification.forward`` (transformers 5.x). With
    ``pad == eos`` a row that ends with eos is scored before its last real token.
    """
    non_pad = (input_ids != pad_token_id).to(torch.long)
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (positions * non_pad).argmax(-1)


#: Tokens the kit may pad reward-model batches with when the tokenizer's pad is its eos, in order.
_PAD_CANDIDATES = ("unk_token", "<|endoftext|>", "<|finetune_right_pad_id|>", "<pad>", "[PAD]")


def score_pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """A pad id for reward-model batches that is not eos (so the head finds the last real token).

    The tokenizer's own pad when it differs from eos; otherwise its unk token, or another special token
    of the vocabulary that the chat template does not render (``<|endoftext|>`` for SmolLM2, id 0).
    Raises :class:`RMError` when there is none; then add a pad token to the tokenizer and resize the
    model's embeddings.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if pad is not None and pad != eos:
        return int(pad)
    avoid = {eos, tokenizer.bos_token_id}
    vocab = tokenizer.get_vocab()
    for candidate in _PAD_CANDIDATES:
        token = getattr(tokenizer, candidate, None) if candidate.endswith("_token") else candidate
        token_id = vocab.get(token) if isinstance(token, str) else None
        if token_id is not None and token_id not in avoid:
            return int(token_id)
    raise RMError(
        f"the tokenizer pads with its eos token {tokenizer.eos_token!r} and has no other special token to "
        "pad reward-model batches with, so the score head could not find the last real token. Fix: "
        "tokenizer.add_special_tokens({'pad_token': '<|pad|>'}) and model.resize_token_embeddings(len(tokenizer))."
    )


def _score_head(model: torch.nn.Module) -> torch.nn.Module:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model
    head = getattr(base, "score", None)
    if not isinstance(head, torch.nn.Module):
        raise RMError(
            f"{type(base).__name__} has no 'score' head: load the reward model with "
            "load_reward_model(...) (AutoModelForSequenceClassification with num_labels=1)."
        )
    return head


def reward_scores(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """One score per row, read at the last attended token (the attention mask's last 1), shape ``[B]``.

    The model runs as it is (its own forward, attention and head); the head's output at every position
    is caught on the way out and read at :func:`last_token_index`, so the result does not depend on the
    pad id, and equals the score of the unpadded conversation at its last real token.
    """
    caught: list[torch.Tensor] = []
    handle = _score_head(model).register_forward_hook(lambda _m, _args, out: caught.append(out))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        handle.remove()
    per_position = caught[-1]  # [B, T, num_labels]
    index = last_token_index(attention_mask).to(per_position.device)
    return per_position[torch.arange(per_position.shape[0], device=per_position.device), index, 0]


# ======================================================================================================
# The model
# ======================================================================================================
def _head_from_causal_lm(causal_lm: PreTrainedModel, seed: int) -> PreTrainedModel:
    """A one-output sequence classifier with the causal LM's backbone and a fresh score head."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(causal_lm.config)
    config.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(config)
    prefix = model.base_model_prefix
    getattr(model, prefix).load_state_dict(getattr(causal_lm, prefix).state_dict(), strict=True)
    return model.to(dtype=next(causal_lm.parameters()).dtype)


def load_reward_model(
    source: str | Path | PreTrainedModel, *, seed: int = 42, dtype: Any = None, **load_kwargs: Any
) -> PreTrainedModel:
    """A reward model (one-output sequence classifier) from ``"bundled"``, ``"tiny"``, a folder or a Hub id.

    A causal-LM checkpoint (the DPO model the RM starts from) gets a new score head, initialised from
    ``seed`` (transformers' normal(0, initializer_range)); a reward-model checkpoint (a kit RM run, the
    SmolTulu RM) keeps its head. A model object is converted the same way (a causal LM gets a head).
    """
    from transformers import set_seed

    from .models import ensure_bundled_cache, load_model, tiny_model

    if not isinstance(source, str | Path):
        model = source
    elif str(source) == "tiny":
        model = tiny_model(dtype=dtype, **load_kwargs)[0]
    else:
        from trl.trainer.reward_trainer import suppress_seqcls_warning

        path = ensure_bundled_cache() if str(source) == "bundled" else source
        set_seed(seed)  # the new score head's initialisation
        with suppress_seqcls_warning():
            model = load_model(str(path), head="reward", dtype=dtype, **load_kwargs)
    if getattr(model.config, "num_labels", None) == 1 and hasattr(model, "score"):
        return model
    if not hasattr(model, getattr(model, "base_model_prefix", None) or "-"):
        raise RMError(f"cannot make a reward model from {type(model).__name__}: it has no backbone to reuse")
    return _head_from_causal_lm(model, seed)


# ======================================================================================================
# Scoring conversations and preference pairs
# ======================================================================================================
def _ids(tokenizer: PreTrainedTokenizerBase, conversation: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(conversation, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(t) for t in ids]


@torch.no_grad()
def score_conversations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[list[dict]],
    *,
    batch_size: int = EVAL_BATCH_SIZE,
    max_length: int | None = EVAL_MAX_LENGTH,
) -> tuple[list[float], int]:
    """Scores of whole conversations, read at each one's last real token: ``(scores, n_truncated)``.

    Each conversation is rendered with the chat template (as TRL renders it for training), cut to
    ``max_length`` tokens (counted in ``n_truncated``), batched longest first with right padding, and
    scored with :func:`reward_scores`. The model is put in eval mode and left so; a model config
    without a pad id gets the kit's (the head refuses batches otherwise; it does not change the scores).
    """
    if batch_size < 1:
        raise RMError(f"batch_size must be at least 1, got {batch_size}")
    model.eval()
    device = next(model.parameters()).device
    pad = score_pad_token_id(tokenizer)
    if getattr(model.config, "pad_token_id", None) is None:  # the head refuses batches without one
        model.config.pad_token_id = pad
    encoded = [_ids(tokenizer, c) for c in conversations]
    truncated = sum(max_length is not None and len(ids) > max_length for ids in encoded)
    if max_length is not None:
        encoded = [ids[:max_length] for ids in encoded]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    scores = [0.0] * len(encoded)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
            mask[row, : len(encoded[i])] = 1
        values = reward_scores(model, ids.to(device), mask.to(device)).float().cpu().tolist()
        for i, value in zip(batch, values, strict=True):
            scores[i] = float(value)
    return scores, truncated


@dataclass
class PreferenceScores:
    """Both scores of every usable pair; ``accuracy`` is the share with ``chosen > rejected`` (ties wrong)."""

    chosen: list[float]
    rejected: list[float]
    report: PreferenceDataReport
    n_truncated: int = 0  # conversations cut to max_length before scoring
    groups: list[str] | None = None  # per pair (e.g. its RewardBench subset), when the rows carry one

    @property
    def n(self) -> int:
        return len(self.chosen)

    @property
    def correct(self) -> list[bool]:
        return [c > r for c, r in zip(self.chosen, self.rejected, strict=True)]

    @property
    def accuracy(self) -> float:
        """Share of pairs whose chosen reply scores strictly higher (0 to 1)."""
        return sum(self.correct) / self.n if self.n else float("nan")

    @property
    def margin(self) -> float:
        """Mean of ``r(chosen) - r(rejected)``."""
        return sum(c - r for c, r in zip(self.chosen, self.rejected, strict=True)) / max(self.n, 1)

    @property
    def loss(self) -> float:
        """Mean Bradley-Terry loss ``-log sigmoid(r(chosen) - r(rejected))`` over the pairs."""
        diffs = torch.tensor([c - r for c, r in zip(self.chosen, self.rejected, strict=True)])
        return float(-torch.nn.functional.logsigmoid(diffs).mean()) if self.n else float("nan")

    def by_group(self) -> dict[str, float]:
        """Accuracy per group (e.g. RewardBench subset), in first-seen order."""
        if self.groups is None:
            return {}
        totals: dict[str, list[int]] = {}
        for group, ok in zip(self.groups, self.correct, strict=True):
            totals.setdefault(group, [0, 0])
            totals[group][0] += ok
            totals[group][1] += 1
        return {g: right / count for g, (right, count) in totals.items()}

    def to_frame(self) -> pd.DataFrame:
        """One row per pair: input row index, both scores, margin, correct (and group)."""
        import pandas as pd

        frame = pd.DataFrame(
            {
                "row": self.report.kept_indices,
                "chosen": self.chosen,
                "rejected": self.rejected,
                "margin": [c - r for c, r in zip(self.chosen, self.rejected, strict=True)],
                "correct": self.correct,
            }
        )
        if self.groups is not None:
            frame["group"] = self.groups
        return frame


def score_preferences(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Iterable[Mapping],
    *,
    group_field: str | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    max_length: int | None = EVAL_MAX_LENGTH,
) -> PreferenceScores:
    """Score both sides of every preference row; bad rows are skipped and reported (``report``).

    Rows of any layout :func:`~smoltulu_utils.preferences.prepare_preference_rows` reads. Long
    conversations are cut to ``max_length`` (and counted), not dropped, so every usable pair is scored.
    ``group_field`` names a row field to group accuracy by (``"subset"`` for RewardBench).
    """
    rows = list(rows)
    dataset, report = prepare_preference_rows(rows, tokenizer, max_length, drop_too_long=False)
    conversations = [p + c for p, c in zip(dataset["prompt"], dataset["chosen"], strict=True)]
    conversations += [p + r for p, r in zip(dataset["prompt"], dataset["rejected"], strict=True)]
    scores, truncated = score_conversations(
        model, tokenizer, conversations, batch_size=batch_size, max_length=max_length
    )
    n = len(dataset)
    groups = [str(rows[i].get(group_field)) for i in report.kept_indices] if group_field else None
    return PreferenceScores(scores[:n], scores[n:], report, truncated, groups)


def evaluate_ultrafeedback(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    rows: Iterable[Mapping] | None = None,
    mirror: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    max_length: int | None = EVAL_MAX_LENGTH,
) -> PreferenceScores:
    """Pair accuracy on UltraFeedback ``test_prefs`` (Table 8's UFB): ``load_rows("ultrafeedback")`` by default.

    Ties in the dataset's own ratings (``score_chosen == score_rejected``) are kept, as the split has them.
    """
    if rows is None:
        from .data import load_rows

        rows = load_rows("ultrafeedback", "test_prefs", mirror=mirror, limit=limit, validate=False)
    return score_preferences(model, tokenizer, rows, batch_size=batch_size, max_length=max_length)


# ----------------------------------------------------------------------------------- RewardBench
def rewardbench_path(mirror: str | Path | None = None) -> Path:
    """``{mirror}/allenai/reward-bench/default/filtered.jsonl`` (mirror: ``SMOLTULU_DATA_MIRROR``, else the fixtures)."""
    from .paths import FIXTURES_DIR, mirror_dir

    root = Path(mirror) if mirror is not None else (mirror_dir() or FIXTURES_DIR)
    return root / REWARDBENCH_HUB_ID / "default" / f"{REWARDBENCH_SPLIT}.jsonl"


def load_rewardbench_rows(mirror: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """RewardBench's ``filtered`` rows from a mirror file (:func:`rewardbench_path`) or the Hub.

    Source: ``mirror``, else ``SMOLTULU_DATA_MIRROR``, else the Hub (``datasets.load_dataset``).
    """
    from .data import load_rows

    rows = load_rows("rewardbench", REWARDBENCH_SPLIT, mirror=mirror, limit=limit, validate=False)
    return [dict(r) for r in rows]


def rewardbench_sections(
    subset_accuracy: Mapping[str, float], weights: Mapping[str, float] = REWARDBENCH_WEIGHTS
) -> dict[str, float | None]:
    """Section scores in percent from per-subset accuracies (0 to 1), the way RewardBench aggregates.

    Each section is the mean of its subsets' accuracies weighted by :data:`REWARDBENCH_WEIGHTS`; a
    subset with no rows is left out of its section (as the reference code does), a section with none
    is None. ``"Average"`` is the unweighted mean of the four sections (None unless all four exist).
    Subsets outside the four sections are ignored.
    """
    out: dict[str, float | None] = {}
    for section, subsets in REWARDBENCH_SECTIONS.items():
        present = [s for s in subsets if s in subset_accuracy]
        total = sum(weights[s] for s in present)
        out[section] = 100 * sum(subset_accuracy[s] * weights[s] for s in present) / total if total else None
    values = [v for v in out.values() if v is not None]
    out["Average"] = sum(values) / len(values) if len(values) == len(REWARDBENCH_SECTIONS) else None
    return out


@dataclass
class RewardBenchResult:
    """RewardBench scores: every pair's scores, accuracy per subset (0 to 1), sections in percent."""

    scores: PreferenceScores
    subset_accuracy: dict[str, float]
    sections: dict[str, float | None]
    subset_counts: dict[str, int]
    unknown_subsets: list[str] = field(default_factory=list)  # rows in no section (not scored in sections)

    def describe(self) -> str:
        parts = [f"{k} {v:.1f}" for k, v in self.sections.items() if v is not None]
        return f"RewardBench on {self.scores.n} pairs: " + ", ".join(parts)


def evaluate_rewardbench(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    rows: Iterable[Mapping] | None = None,
    mirror: str | Path | None = None,
    limit: int | None = None,
    per_subset: int | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    max_length: int | None = EVAL_MAX_LENGTH,
) -> RewardBenchResult:
    """Per-subset accuracy and the four section scores (and their Average) of RewardBench's layout.

    Rows: ``prompt``, ``chosen``, ``rejected`` (strings) and ``subset``; default
    :func:`load_rewardbench_rows` (the first ``limit``). ``per_subset`` keeps the first that many rows
    of every subset (a quick look that still fills every section). Bad rows are skipped and reported
    in ``result.scores.report``.
    """
    rows = list(load_rewardbench_rows(mirror, limit) if rows is None else rows)
    if per_subset is not None:
        seen: dict[Any, int] = {}
        kept = []
        for row in rows:
            key = row.get("subset") if isinstance(row, Mapping) else None
            seen[key] = seen.get(key, 0) + 1
            if seen[key] <= per_subset:
                kept.append(row)
        rows = kept
    scores = score_preferences(
        model, tokenizer, rows, group_field="subset", batch_size=batch_size, max_length=max_length
    )
    accuracy = scores.by_group()
    counts: dict[str, int] = {}
    for group in scores.groups or []:
        counts[group] = counts.get(group, 0) + 1
    unknown = sorted(g for g in accuracy if g not in REWARDBENCH_WEIGHTS)
    return RewardBenchResult(scores, accuracy, rewardbench_sections(accuracy), counts, unknown)


def table8_rows(
    *,
    model: str,
    run_id: str,
    ultrafeedback: PreferenceScores | None = None,
    rewardbench: RewardBenchResult | None = None,
    paper_model: str | None = None,
    settings: Mapping[str, Any] | None = None,
    stage: str = "rm",
) -> list[dict[str, Any]]:
    """Results rows (percent) for ``ResultsStore``: Table 8's RB sections, RB Average and UFB, plus
    one ``RewardBench/<subset>`` row per subset. ``paper_model`` names the Table 8 column it reproduces."""
    base: dict[str, Any] = {"run_id": run_id, "stage": stage, "model": model, "metric": "accuracy"}
    if paper_model:
        base["paper_model"] = paper_model
    base["settings"] = dict(settings or {})
    rows = []
    if rewardbench is not None:
        for section, value in rewardbench.sections.items():
            if value is not None:
                n = (
                    rewardbench.scores.n
                    if section == "Average"
                    else sum(rewardbench.subset_counts.get(s, 0) for s in REWARDBENCH_SECTIONS[section])
                )
                rows.append({**base, "benchmark": TABLE8_LABELS[section], "value": value, "n": n})
        for subset, value in rewardbench.subset_accuracy.items():
            rows.append(
                {
                    **base,
                    "benchmark": f"RewardBench/{subset}",
                    "value": 100 * value,
                    "n": rewardbench.subset_counts[subset],
                }
            )
    if ultrafeedback is not None and ultrafeedback.n:
        rows.append(
            {
                **base,
                "benchmark": TABLE8_LABELS["ultrafeedback"],
                "value": 100 * ultrafeedback.accuracy,
                "n": ultrafeedback.n,
            }
        )
    return rows


# ======================================================================================================
# The trainer
# ======================================================================================================
class KitRewardTrainer(RewardTrainer):
    """TRL's ``RewardTrainer`` that checks, every step, that each sequence is scored at its last real token.

    Give it a tokenizer whose pad differs from eos (:func:`build_rm_trainer` does); TRL then pads with
    that id and sets the model's ``pad_token_id`` to it, and transformers' head reads the rightmost
    non-pad token. :meth:`compute_loss` compares that position with the attention mask's last 1 and
    raises :class:`RMError` on any difference (a conversation whose last token is the pad id).
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pad = self.model.config.get_text_config().pad_token_id
        head = head_token_index(inputs["input_ids"], pad)
        wanted = last_token_index(inputs["attention_mask"])
        if not torch.equal(head, wanted):
            rows = (head != wanted).nonzero().flatten().tolist()
            raise RMError(
                f"the score head would read rows {rows} of this batch at the wrong token (pad id {pad} "
                "ends those sequences). Fix: pad with a token that never ends a conversation "
                "(score_pad_token_id) or score with reward_scores()."
            )
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def rm_config(
    plan: Plan, output_dir: str | Path, *, max_grad_norm: float | None = None, **overrides: Any
) -> RewardConfig:
    """TRL's ``RewardConfig`` for a plan: batch, accumulation, LR, schedule, epochs or steps, precision.

    The effective batch counts preference pairs (each pair is two sequences). ``max_length`` is the
    plan's (the kit drops longer pairs before, and reports them). Logs every step, no intermediate
    checkpoints, no evaluation inside the loop (the stage scores its eval rows itself, before and after).
    ``max_grad_norm`` None is the recipe's (1.0, as Tulu 3).
    """
    from trl import RewardConfig

    settings = trainer_settings(plan, output_dir, max_grad_norm=max_grad_norm)
    settings["max_length"] = plan.max_length
    settings.update(overrides)
    return RewardConfig(**settings)


def build_rm_trainer(
    plan: Plan,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: datasets.Dataset,
    output_dir: str | Path,
    *,
    callbacks: list | None = None,
    peft_config: Any = None,
    max_grad_norm: float | None = None,
    **config_overrides: Any,
) -> KitRewardTrainer:
    """A :class:`KitRewardTrainer` for a plan and a dataset made by ``prepare_preference_rows``.

    The trainer gets a copy of ``tokenizer`` whose pad is :func:`score_pad_token_id` (``tokenizer``
    itself is left as it is, so the saved checkpoint keeps its parent's tokenizer and fingerprint).
    """
    train_tokenizer = copy.deepcopy(tokenizer)
    pad_id = score_pad_token_id(tokenizer)
    train_tokenizer.pad_token = train_tokenizer.convert_ids_to_tokens(pad_id)
    config = rm_config(plan, output_dir, max_grad_norm=max_grad_norm, **config_overrides)
    return KitRewardTrainer(
        model=model,
        args=config,
        train_dataset=train_dataset,
        processing_class=train_tokenizer,
        callbacks=callbacks,
        peft_config=peft_config,
    )


# ======================================================================================================
# The stage
# ======================================================================================================
@dataclass
class RMResult:
    """What one reward-model run did. Accuracies are shares of held-out pairs (0 to 1), losses Bradley-Terry."""

    output_dir: Path
    steps: int
    train_loss: list[tuple[int, float]]  # (optimizer step, mean Bradley-Terry loss of that step's pairs)
    final_train_loss: float | None
    eval_loss: float | None  # mean Bradley-Terry loss on the eval rows after training; None without them
    eval_accuracy: float | None  # share of eval pairs with r(chosen) > r(rejected), after training
    eval_accuracy_before: float | None  # the same before training (the fresh head)
    trained_tokens: int  # tokens of chosen and rejected sequences seen in training (padding never counts)
    wall_seconds: float
    learning_rate: float
    effective_batch_size: int  # preference pairs per optimizer step
    method: str = "full"
    train_accuracy: list[tuple[int, float]] = field(default_factory=list)  # TRL's batch accuracy per step
    data_report: PreferenceDataReport | None = None
    eval_scores: PreferenceScores | None = None
    manifest: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_seen(self) -> int:
        """Same as ``trained_tokens`` (the sweep's name)."""
        return self.trained_tokens

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["output_dir"] = str(self.output_dir)
        out["data_report"] = self.data_report.to_dict() if self.data_report else None
        out.pop("eval_scores")
        return out


def _method(plan: Plan, peft_config: Any, model_given: bool, quantization_config: Any = None):
    """The stages' choice of full / LoRA / QLoRA (:func:`~smoltulu_utils.training.training_method`), with
    LoRA adapters for a score head (the head itself trains in full and is saved with the adapters)."""
    chosen = training_method(
        plan, peft_config, model_given=model_given, quantization_config=quantization_config
    )
    if peft_config is None and chosen.method in ("lora", "qlora"):
        from .memory import lora_config

        chosen.peft_config = lora_config(task_type="SEQ_CLS", modules_to_save=["score"])
    return chosen


def train_rm(
    plan: Plan,
    output_dir: str | Path,
    *,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    rows: Iterable[Mapping] | None = None,
    eval_rows: Iterable[Mapping] | None = None,
    parent: str | Path | None = None,
    callbacks: list | None = None,
    peft_config: Any = None,
    max_grad_norm: float | None = None,
    eval_before: bool = True,
    verbose: bool = True,
    quantization_config: Any = None,
) -> RMResult:
    """Train the reward model of ``plan`` and save model, tokenizer and ``manifest.json`` in ``output_dir``.

    Mirrors :func:`smoltulu_utils.sft.train_sft`: the tokenizer and model come from ``parent`` when
    given (a kit checkpoint folder, e.g. the DPO run, or a Hub id), else from ``plan.model``; a causal
    LM gets a fresh score head (:func:`load_reward_model`, seeded by the recipe). The rows default to
    ``load_rows(recipe.dataset)`` from the profile's data, at most ``plan.max_train_samples``. A kit
    checkpoint parent must share the tokenizer and chat template (:func:`check_parent`), and the
    chat-template doctor must pass, before anything trains. Bad pairs are skipped and reported
    (``result.data_report``); no usable pair raises :class:`~smoltulu_utils.preferences.PreferenceDataError`.
    With ``eval_rows`` the held-out pairs are scored before (``eval_before``) and after training. A
    causal LM passed as ``model`` is wrapped in a new reward model (the trained one is saved in
    ``output_dir``); a reward model passed in trains in place. Full fine-tuning trains float32 weights
    whatever the checkpoint's dtype; ``peft_config`` (LoRA), ``quantization_config`` (QLoRA) or the
    memory plan choose adapters, merged with the trained score head into the saved model, so the PPO
    value model starts from a plain checkpoint. A tokenizer without a chat template gets the kit's.
    """
    from .data import load_rows
    from .models import adapt_tokenizer, load_tokenizer, match_model_to_tokenizer
    from .profiles import data_mirror

    recipe = plan.recipe
    if not isinstance(recipe, RMRecipe):
        raise RMError(
            f"train_rm needs a plan for a reward-model recipe, got stage {recipe.stage!r} ({recipe.name})"
        )
    check_world_size(plan)
    output_dir = Path(output_dir)
    source = str(parent) if parent is not None else plan.model
    folder = Path(source).expanduser()
    is_checkpoint = folder.is_dir() and (folder / MANIFEST_NAME).is_file()
    adapted: list[str] = []
    if tokenizer is None:
        tokenizer = load_tokenizer(source)
        adapted = adapt_tokenizer(tokenizer)  # a base model's tokenizer gets the kit's chat template
    if folder.is_dir() and (parent is not None or is_checkpoint):
        check_parent(folder, tokenizer)
    doctor(tokenizer).raise_for_problems()

    chosen = _method(plan, peft_config, model is not None, quantization_config)
    method, notes = chosen.method, list(chosen.notes)
    if model is None:
        model = load_reward_model(source, seed=recipe.seed, **stage_load_kwargs(chosen, source))
    else:
        model = load_reward_model(model, seed=recipe.seed)
    if method == "full" and (cast := full_precision(model)):
        notes.append(cast)
    if adapted:
        adapted += match_model_to_tokenizer(model, tokenizer)
        notes.append("tokenizer adapted: " + "; ".join(adapted))

    given = rows is not None
    if rows is None:
        rows = load_rows(
            recipe.dataset, mirror=data_mirror(plan.profile), limit=plan.max_train_samples, validate=False
        )
    train_dataset, report = prepare_preference_rows(rows, tokenizer, plan.max_length)
    eval_list = list(eval_rows) if eval_rows is not None else None
    accuracy_before = None
    if eval_list is not None and eval_before:
        accuracy_before = score_preferences(model, tokenizer, eval_list, max_length=plan.max_length).accuracy
        model.train()

    trainer = build_rm_trainer(
        plan,
        model,
        tokenizer,
        train_dataset,
        output_dir,
        callbacks=callbacks,
        peft_config=chosen.peft_config,
        max_grad_norm=max_grad_norm,
    )
    main = trainer.is_world_process_zero()
    pad_id = trainer.processing_class.pad_token_id
    notes.append(
        f"scored at the last real token: batches padded with {trainer.processing_class.pad_token!r} "
        f"(id {pad_id}), eos is {tokenizer.eos_token!r} (id {tokenizer.eos_token_id})"
    )
    if verbose and main:
        print(
            f"RM {recipe.name}: {report.describe().splitlines()[0]}\n"
            f"  {method} fine-tuning, Bradley-Terry loss, effective batch {plan.effective_batch_size} pairs = "
            f"{plan.per_device_batch_size} x {plan.gradient_accumulation_steps} x {plan.num_processes}, "
            f"LR {plan.learning_rate:g}, {plan.max_steps or recipe.num_epochs} "
            f"{'steps' if plan.max_steps else 'epochs'}"
        )
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start

    trained = trainer.model
    # The checkpoint keeps its parent's tokenizer and pad id; the kit scores by attention mask.
    trained.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    eval_scores = None
    if eval_list is not None:
        eval_scores = score_preferences(trained, tokenizer, eval_list, max_length=plan.max_length)
    history = trainer.state.log_history
    train_loss = log_history(history, "loss")
    final = train_loss[-1][1] if train_loss else None
    if final is not None and not math.isfinite(final):
        notes.append(f"the final training loss is {final}: lower the learning rate")
    tokens = log_history(history, "num_tokens")
    result = RMResult(
        output_dir=output_dir,
        steps=int(trainer.state.global_step),
        train_loss=train_loss,
        final_train_loss=final,
        eval_loss=eval_scores.loss if eval_scores else None,
        eval_accuracy=eval_scores.accuracy if eval_scores else None,
        eval_accuracy_before=accuracy_before,
        trained_tokens=int(tokens[-1][1]) if tokens else int(getattr(trainer, "_total_train_tokens", 0)),
        wall_seconds=wall,
        learning_rate=plan.learning_rate,
        effective_batch_size=plan.effective_batch_size,
        method=method,
        train_accuracy=log_history(history, "accuracy"),
        data_report=report,
        eval_scores=eval_scores,
        notes=notes,
    )

    def reload_base():  # QLoRA: the base in full precision (a fresh head: the adapter holds the trained one)
        base = load_reward_model(source, seed=recipe.seed, dtype="float32")
        if adapted:
            match_model_to_tokenizer(base, tokenizer)
        return base

    saved = save_trained_model(trainer, output_dir, chosen, reload_base=reload_base)
    if main:
        tokenizer.save_pretrained(output_dir)  # the original tokenizer, over the trainer's padded copy
        result.manifest = write_manifest(
            output_dir,
            stage="rm",
            recipe=recipe,
            data=[data_entry(plan, report, given, "train_rm")],
            tokenizer=tokenizer,
            seed=recipe.seed,
            parent=source if is_checkpoint or not folder.is_dir() else None,
            extra={
                "started_from": source,
                "plan": plan.to_dict(),
                "method": method,
                "merged": saved["merged"],
                "weights_dtype": saved["dtype"],
                "tokenizer_adapted": adapted,
                "loss": "bradley_terry_mean",
                "score_position": "last real token (attention mask); training pad id "
                f"{pad_id}, distinct from eos {tokenizer.eos_token_id}",
                "max_grad_norm": trainer.args.max_grad_norm,
                "steps": result.steps,
                "final_train_loss": final,
                "eval_loss": result.eval_loss,
                "eval_accuracy": result.eval_accuracy,
                "eval_accuracy_before": accuracy_before,
                "trained_tokens": result.trained_tokens,
                "wall_seconds": wall,
                "data_report": report.to_dict(),
                "notes": notes,
            },
        )
    if verbose and main:
        first = train_loss[0][1] if train_loss else float("nan")
        accuracy = (
            f", eval accuracy {accuracy_before if accuracy_before is not None else float('nan'):.3f} -> "
            f"{result.eval_accuracy:.3f}"
            if result.eval_accuracy is not None
            else ""
        )
        print(
            f"  done: {result.steps} steps in {wall:.1f} s, loss {first:.3f} -> "
            f"{final if final is not None else float('nan'):.3f}, {result.trained_tokens} tokens seen"
            f"{accuracy}; saved to {output_dir}"
        )
    return result
