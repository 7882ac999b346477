"""Reward-model evaluation for Table 8: UltraFeedback pair accuracy and RewardBench's section scores.

::

    ufb = evaluate_ultrafeedback(model, tokenizer)      # accuracy on UltraFeedback test_prefs
    rb = evaluate_rewardbench(model, tokenizer)         # RewardBench subsets -> Chat, Chat Hard, ...
    store.append(table8_rows(model="rm", run_id="rm_1130", ultrafeedback=ufb, rewardbench=rb))

Pairs are scored with :func:`~smoltulu_utils.reward_model.score_preferences` (every pair's two scores
kept; TRL reports a running batch accuracy only). RewardBench (Lambert et al. 2024, arXiv:2403.13787) is
aggregated as its reference code does (``rewardbench.utils.calculate_scores_per_section``): each section
is the mean of its subsets' pair accuracies weighted by fixed prompt counts (:data:`REWARDBENCH_WEIGHTS`,
so the kit's fixtures weigh like the full set), and the Average is the unweighted mean of the four
sections. The SmolTulu paper's "RB Average" is not that mean (RM-1130: 72.43 printed, 70.33 computed), so
it used an aggregate it does not state; the kit's Average is RewardBench's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .results import ACCURACY_METRIC, make_row
from .reward_model import PreferenceScores, score_preferences

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

REWARDBENCH_SPLIT = "filtered"  # the 2,985 prompts the leaderboard scores
#: Section -> its subsets (reference code: ``SUBSET_MAPPING``; the old "Prior Sets" are no section here).
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
#: up-weighted to the six code subsets' total so math and code weigh the same in Reasoning, and the two
#: XSTest subsets, whose counts the reference code swaps (the leaderboard's Safety scores use them too).
REWARDBENCH_WEIGHTS: dict[str, int] = {
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95,
    "mt-bench-easy": 28, "mt-bench-med": 40,
    "mt-bench-hard": 37, "llmbar-natural": 100, "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92, "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46,
    "refusals-dangerous": 100, "refusals-offensive": 100,
    "xstest-should-refuse": 250,  # 154 prompts, weighted 250 as the reference code does
    "xstest-should-respond": 154,  # 250 prompts, weighted 154 as the reference code does
    "donotanswer": 136,
    "math-prm": 984,  # 447 prompts, counted as 984 = 6 x 164
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


def evaluate_ultrafeedback(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    rows: Iterable[Mapping] | None = None,
    mirror: str | Path | None = None,
    limit: int | None = None,
    **options: Any,
) -> PreferenceScores:
    """Pair accuracy on UltraFeedback ``test_prefs`` (Table 8's UFB): ``load_rows("ultrafeedback")`` by default.

    Ties in the dataset's own ratings are kept, as the split has them. ``options`` (``batch_size``,
    ``max_length``) go to :func:`~smoltulu_utils.reward_model.score_preferences`.
    """
    if rows is None:
        from .data import load_rows

        rows = load_rows("ultrafeedback", "test_prefs", mirror=mirror, limit=limit, validate=False)
    return score_preferences(model, tokenizer, rows, **options)


def load_rewardbench_rows(mirror: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """RewardBench's ``filtered`` rows from ``mirror``, else ``SMOLTULU_DATA_MIRROR``, else the Hub."""
    from .data import load_rows

    rows = load_rows("rewardbench", REWARDBENCH_SPLIT, mirror=mirror, limit=limit, validate=False)
    return [dict(r) for r in rows]


def rewardbench_sections(
    subset_accuracy: Mapping[str, float], weights: Mapping[str, float] = REWARDBENCH_WEIGHTS
) -> dict[str, float | None]:
    """Section scores in percent from per-subset accuracies (0 to 1), the way RewardBench aggregates.

    A subset with no rows is left out of its section (as the reference code does), a section with none
    is None; ``"Average"`` is None unless all four sections exist. Other subsets are ignored.
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
    **options: Any,
) -> RewardBenchResult:
    """Per-subset accuracy and the four section scores (and their Average) of RewardBench's layout.

    Rows: ``prompt``, ``chosen``, ``rejected`` (strings) and ``subset``; default
    :func:`load_rewardbench_rows` (the first ``limit``). ``per_subset`` keeps the first that many rows
    of every subset (a quick look that still fills every section). Bad rows are skipped and reported
    in ``result.scores.report``; ``options`` go to :func:`~smoltulu_utils.reward_model.score_preferences`.
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
    scores = score_preferences(model, tokenizer, rows, group_field="subset", **options)
    accuracy = scores.by_group()
    counts = dict(Counter(scores.groups or []))
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
    values: list[tuple[str, float, int]] = []  # (benchmark, value, n)
    if rewardbench is not None:
        counts = rewardbench.subset_counts
        for section, value in rewardbench.sections.items():
            if value is not None:
                subsets = REWARDBENCH_SECTIONS.get(section, ())
                n = rewardbench.scores.n if section == "Average" else sum(counts.get(s, 0) for s in subsets)
                values.append((TABLE8_LABELS[section], value, n))
        for subset, value in rewardbench.subset_accuracy.items():
            values.append((f"RewardBench/{subset}", 100 * value, counts[subset]))
    if ultrafeedback is not None and ultrafeedback.n:
        values.append((TABLE8_LABELS["ultrafeedback"], 100 * ultrafeedback.accuracy, ultrafeedback.n))
    rows = []
    for benchmark, value, n in values:
        row = make_row(run_id, stage, model, benchmark, ACCURACY_METRIC, value, n=n, settings=settings)
        if paper_model:
            row["paper_model"] = paper_model
        rows.append(row)
    return rows
