"""Preference pairs for the DPO and reward-model stages: checked rows in TRL's conversational format.

::

    dataset, report = prepare_preference_rows(rows, tokenizer, max_length=2048)
    dataset[0]            # {"prompt": [...messages], "chosen": [assistant turn], "rejected": [assistant turn]}
    report.describe()     # "38 of 40 pairs kept ...; skipped row 3: chosen equals rejected ..."

Every preference layout the kit meets becomes TRL's conversational format with an explicit prompt (the
turns before the reply in ``prompt``, the two final assistant turns in ``chosen`` and ``rejected``):
whole chats that share all but the last turn (Tulu 3, UltraFeedback), RewardBench's strings, and TRL's
own layout. Written by hand because TRL checks no pair's meaning: it trains on two equal replies or two
different prompts, and drops over-long pairs without saying which. Such rows are skipped and reported
with their index and reason; an empty input, or one with no usable pair, raises :class:`PreferenceDataError`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .data_checks import SkippedRow, SkipReport, conversation_problem
from .errors import KitError, first_line

if TYPE_CHECKING:  # pragma: no cover
    import datasets
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


class PreferenceDataError(KitError, ValueError):
    """No usable preference pair (an empty input, or every row skipped); ``report`` says why, row by row."""

    def __init__(self, message: str, report: PreferenceDataReport | None = None):
        self.report = report
        super().__init__(message)


@dataclass
class PreferenceDataReport(SkipReport):
    """What :func:`prepare_preference_rows` kept and skipped.

    ``kept_indices[i]`` is the input position of output row ``i`` (to join per-row fields such as a
    RewardBench subset back). Token counts are of the whole rendered conversations of the kept rows.
    """

    n_rows: int
    n_kept: int
    n_too_long: int  # kept rows longer than max_length (only when too-long rows are kept)
    max_length: int | None
    chosen_tokens: int
    rejected_tokens: int
    longest: int  # tokens of the longest kept conversation
    kept_indices: list[int] = field(default_factory=list)
    skipped: list[SkippedRow] = field(default_factory=list)

    def describe(self) -> str:
        """One summary line, then the skipped rows by index (the first ``SHOWN_SKIPS``)."""
        limit = f"max length {self.max_length}" if self.max_length else "no length limit"
        long = f", {self.n_too_long} longer than {self.max_length} kept" if self.n_too_long else ""
        lines = [
            f"{self.n_kept} of {self.n_rows} preference pairs kept ({limit}{long}; "
            f"{self.chosen_tokens} chosen + {self.rejected_tokens} rejected tokens, longest {self.longest}); "
            f"{self.n_skipped} skipped"
        ]
        return "\n".join(lines + self.skipped_lines())

    def to_dict(self) -> dict[str, Any]:
        """Plain values for a manifest (skipped rows listed up to ``SHOWN_SKIPS``, counted in full)."""
        out = super().to_dict()
        out.pop("kept_indices")
        return out


# ======================================================================================================
# One row -> (prompt, chosen reply, rejected reply), or the reason it cannot be a pair
# ======================================================================================================
def _plain(messages: Sequence[Mapping]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _conversations(row: Any) -> tuple[list[dict], list[dict]] | str:
    """The full chosen and rejected conversations of a row in any known layout, or why there are none."""
    if not isinstance(row, Mapping):
        return f"not a preference row: a {type(row).__name__}, not a dict"
    missing = [key for key in ("chosen", "rejected") if row.get(key) is None]
    if missing:
        return f"not a preference row: no {' or '.join(repr(k) for k in missing)}"
    prompt = row.get("prompt")
    prompt_turns = isinstance(prompt, Sequence) and not isinstance(prompt, str)
    if prompt is not None and not (isinstance(prompt, str) or prompt_turns):
        return f"bad prompt: expected a string or a list of messages, got {type(prompt).__name__}"
    sides = {}
    for side in ("chosen", "rejected"):
        value = row[side]
        if isinstance(value, str):  # RewardBench layout: the reply alone, after the prompt
            if prompt is None:
                return f"no prompt: '{side}' is a string, so the row needs a 'prompt'"
            if isinstance(prompt, str):
                if not prompt.strip():
                    return "empty prompt: the prompt string has no text"
                value = [{"role": "user", "content": prompt}, {"role": "assistant", "content": value}]
            else:
                value = [*prompt, {"role": "assistant", "content": value}]
        elif prompt_turns and isinstance(value, Sequence):
            # TRL's explicit prompt: the replies follow the prompt turns (unless they repeat them already)
            if list(value[: len(prompt)]) != list(prompt) or len(value) <= len(prompt):
                value = [*prompt, *value]
        problem = conversation_problem(value, side=side)
        if problem:
            return problem
        sides[side] = _plain(value)
    return sides["chosen"], sides["rejected"]


def _pair_problem(chosen: list[dict], rejected: list[dict]) -> str | None:
    """Why two full conversations are not a usable preference pair, or None."""
    for side, conversation in (("chosen", chosen), ("rejected", rejected)):
        if not conversation:
            return f"empty {side}: no messages"
        last = conversation[-1]
        if last["role"] != "assistant":
            return f"no reply: '{side}' ends with a {last['role']!r} turn, not an assistant turn"
        if not last["content"].strip():
            return f"empty reply: the last '{side}' turn has no text"
    if len(chosen) != len(rejected):
        return (
            f"prompt mismatch: chosen has {len(chosen) - 1} prompt turns, rejected {len(rejected) - 1} "
            "(the two must share every turn before the reply)"
        )
    for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1], strict=True)):
        if a != b:
            what = "role" if a["role"] != b["role"] else "content"
            return f"prompt mismatch: message {i} ({a['role']}) differs in {what} between chosen and rejected"
    if chosen[-1]["content"].strip() == rejected[-1]["content"].strip():
        return "chosen equals rejected: the two replies are the same text"
    if not any(m["role"] == "user" for m in chosen[:-1]):
        return "no prompt: no user turn before the reply"
    return None


def split_pair(row: Mapping) -> dict[str, list[dict]]:
    """One row as TRL's explicit-prompt pair ``{"prompt", "chosen", "rejected"}``; PreferenceDataError if bad."""
    found = _conversations(row)
    if isinstance(found, str):
        raise PreferenceDataError(f"not a usable preference pair: {found}")
    chosen, rejected = found
    problem = _pair_problem(chosen, rejected)
    if problem:
        raise PreferenceDataError(f"not a usable preference pair: {problem}")
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}


def chat_ids(tokenizer: PreTrainedTokenizerBase, conversation: list[dict]) -> list[int]:
    """The token ids of a rendered conversation, as TRL tokenizes it (``apply_chat_template``, tokenized)."""
    ids = tokenizer.apply_chat_template(conversation, tokenize=True)
    if hasattr(ids, "keys"):  # a BatchEncoding in recent transformers
        ids = ids["input_ids"]
    return [int(t) for t in ids]


# ======================================================================================================
# Rows -> dataset
# ======================================================================================================
def preference_features() -> datasets.Features:
    """The features of a prepared dataset: ``prompt``, ``chosen`` and ``rejected`` as lists of messages."""
    import datasets

    messages = datasets.List({"content": datasets.Value("string"), "role": datasets.Value("string")})
    return datasets.Features({"prompt": messages, "chosen": messages, "rejected": messages})


def prepare_preference_rows(
    rows: Iterable[Mapping],
    tokenizer: PreTrainedTokenizerBase | None,
    max_length: int | None,
    *,
    drop_too_long: bool = True,
) -> tuple[datasets.Dataset, PreferenceDataReport]:
    """Check preference rows and split each into TRL's explicit prompt format: ``(Dataset, report)``.

    Every kept row becomes ``{"prompt": [turns before the reply], "chosen": [assistant reply],
    "rejected": [assistant reply]}``, which ``DPOTrainer`` and ``RewardTrainer`` render with the chat
    template. A row is skipped, with its index and reason in ``report.skipped`` and a warning in the
    log, when it is not a preference row, a side does not end with a non-empty assistant reply, the two
    replies are the same text, the prompts differ, there is no user turn, or the chat template fails on
    it. A side longer than ``max_length`` tokens skips the row when ``drop_too_long`` (what TRL's
    RewardTrainer would do silently), else it is kept and counted (DPO truncates). Raises
    :class:`PreferenceDataError` for an empty input or when no row is usable.
    """
    import datasets

    if max_length is not None and max_length < 2:
        raise PreferenceDataError(f"max_length must be at least 2 tokens or None, got {max_length}")
    columns: dict[str, list] = {"prompt": [], "chosen": [], "rejected": []}
    skipped: list[SkippedRow] = []
    kept: list[int] = []
    n_rows = n_too_long = chosen_tokens = rejected_tokens = longest = 0
    for index, row in enumerate(rows):
        n_rows += 1
        found = _conversations(row)
        problem = found if isinstance(found, str) else _pair_problem(*found)
        lengths = (0, 0)
        if problem is None and tokenizer is not None:
            try:
                lengths = (len(chat_ids(tokenizer, found[0])), len(chat_ids(tokenizer, found[1])))
            except Exception as exc:  # a template's own error (e.g. jinja raise_exception) on one row
                problem = f"chat template: {type(exc).__name__}: {first_line(exc)}"
            else:
                if max_length is not None and max(lengths) > max_length:
                    if drop_too_long:
                        problem = (
                            f"too long: chosen {lengths[0]} and rejected {lengths[1]} tokens, "
                            f"max_length is {max_length}"
                        )
                    else:
                        n_too_long += 1
        if problem is not None:
            skipped.append(SkippedRow(index, problem))
            continue
        chosen, rejected = found
        columns["prompt"].append(chosen[:-1])
        columns["chosen"].append(chosen[-1:])
        columns["rejected"].append(rejected[-1:])
        kept.append(index)
        chosen_tokens += lengths[0]
        rejected_tokens += lengths[1]
        longest = max(longest, *lengths)
    report = PreferenceDataReport(
        n_rows=n_rows,
        n_kept=len(kept),
        n_too_long=n_too_long,
        max_length=max_length,
        chosen_tokens=chosen_tokens,
        rejected_tokens=rejected_tokens,
        longest=longest,
        kept_indices=kept,
        skipped=skipped,
    )
    if n_rows == 0:
        raise PreferenceDataError(
            "the preference set is empty: no rows to train or score. Check the dataset name, split and "
            "mirror (load_rows(..., mirror=...)), or the filter that selected the rows.",
            report,
        )
    if not kept:
        raise PreferenceDataError(f"no usable preference pair in {n_rows} rows:\n{report.describe()}", report)
    if skipped:
        log.warning("preference data: skipped %d of %d rows\n%s", len(skipped), n_rows, report.describe())
    return datasets.Dataset.from_dict(columns, features=preference_features()), report
