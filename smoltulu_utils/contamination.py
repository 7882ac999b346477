"""Benchmark contamination of the training mixtures (the paper's Tables 1, 4 and 13), by n-gram matching.

The rule is Tulu 3's (open-instruct ``decontamination/search.py``, whose benchmarks the paper's tables
list): every user turn of a training row is a document (a preference pair's are those of ``chosen``);
an item is the question text of a benchmark row (:data:`ITEM_FIELDS`, answer options left out); text
is lowercased into ``\\w+`` tokens; an item is contaminated when a single document covers **more than
half** (:data:`THRESHOLD`) of its tokens with shared **8-grams** (:data:`NGRAM_SIZE`: a shared 8-word
phrase is rarely chance, and one changed word still leaves most of a question covered). Items with
fewer than 8 tokens have no 8-gram and are never flagged (``n_short``).

Written by hand because no maintained library checks overlap offline (open-instruct's scripts need an
Elasticsearch server). The benchmark side (about 36,000 items) is indexed once; the mixture is streamed
row by row and only matches are kept, so memory does not grow with the mixture.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .data import FULL_ROWS, get_spec, load_rows, mixture_spec, scan_prompts, stream_rows
from .data_checks import RowProblem
from .results import CONTAMINATION_METRIC, data_rows

#: Tulu 3's n-gram length and coverage threshold (see the module docstring).
NGRAM_SIZE = 8
THRESHOLD = 0.5
#: The kit's seven evaluation benchmarks (kit dataset names); every config of each, its eval split.
BENCHMARKS = ("arc", "bbh", "gsm8k", "hellaswag", "ifeval", "mmlu_pro", "piqa")
#: Benchmark -> the field holding an item's question text: the one Tulu 3 queried where it checked the
#: benchmark, else the question part of the kit's prompt (HellaSwag's without its ``[step]`` markers).
ITEM_FIELDS = {
    "arc": "question",
    "bbh": "input",
    "gsm8k": "question",
    "hellaswag": "ctx",
    "ifeval": "prompt",
    "mmlu_pro": "question",
    "piqa": "goal",
}
#: Fields that name an item, tried in order (else ``config/split/index``).
_ID_FIELDS = ("id", "question_id", "key", "ind")
_WORD = re.compile(r"\w+")
_MARKER = re.compile(r"\[[^\]]*\]")  # HellaSwag's WikiHow [header] / [step] / [title] markers
_PUNCT = re.compile(r"[^\w\s]")
_SNIPPET = 300  # characters of text kept in a match record
_START_BITS = 20  # an index posting packs (item number, start position) as item << 20 | start
_START_MASK = (1 << _START_BITS) - 1
_MAX_START = 1 << _START_BITS


def normalize(text: str) -> list[str]:
    """Lowercased word tokens of ``text``: punctuation dropped, any run of whitespace a single break."""
    return _WORD.findall(text.lower())


def perturb(text: str, replacement: str = "zebra") -> str:
    """``text`` disguised: upper case, no punctuation, doubled spaces, middle word replaced.

    The scan still finds such a copy of a text of at least ``2 * NGRAM_SIZE + 1`` words; the notebook and
    tests plant these.
    """
    words = _PUNCT.sub("", text).split()
    if words:
        words[len(words) // 2] = replacement
    return "  ".join(words).upper()


# --- the benchmark side ------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchmarkItem:
    """One benchmark item: its benchmark (Hub id, as the paper labels it), an id, its text and tokens."""

    benchmark: str
    item_id: str
    text: str
    tokens: tuple[str, ...]


def item_text(name: str, row: Mapping[str, Any]) -> str:
    """The text of one benchmark row that is matched against training data (see :data:`ITEM_FIELDS`)."""
    spec = get_spec(name)
    text = row.get(ITEM_FIELDS[spec.name])
    if not isinstance(text, str):
        raise ValueError(f"'{ITEM_FIELDS[spec.name]}' is {type(text).__name__}, expected str")
    return " ".join(_MARKER.sub(" ", text).split()) if spec.name == "hellaswag" else text


def items_from_rows(
    name: str, rows: Iterable[Mapping[str, Any]], config: str = "default", split: str | None = None
) -> list[BenchmarkItem]:
    """The items of benchmark ``name`` from rows in its Hub schema (any source)."""
    spec = get_spec(name)
    split = split or spec.splits[0]
    items = []
    for index, row in enumerate(rows):
        ident = next((row[k] for k in _ID_FIELDS if row.get(k) is not None), None)
        where = config if len(spec.configs) > 1 else split
        item_id = f"{where}/{index}" if ident is None else str(ident)
        text = item_text(spec.name, row)
        tokens = tuple(sys.intern(t) for t in normalize(text))  # one string object per distinct word
        items.append(BenchmarkItem(spec.hub_id, item_id, text, tokens))
    return items


def benchmark_items(
    benchmarks: Sequence[str] = BENCHMARKS, *, mirror: str | Path | None = None, limit: int | None = None
) -> list[BenchmarkItem]:
    """Every item of the benchmarks' eval splits (all configs; ``limit`` per config), via ``data.load_rows``."""
    items = []
    for name in benchmarks:
        spec = get_spec(name)
        for config in spec.configs:
            rows = load_rows(spec.name, spec.splits[0], config, mirror=mirror, limit=limit)
            items += items_from_rows(spec.name, rows, config, spec.splits[0])
    return items


class NgramIndex:
    """The benchmark items' n-grams: hash of the n-gram -> ``item << 20 | start`` codes.

    Keys are 64-bit hashes of the token tuples (a chance collision among a few million n-grams has odds
    below one in a billion and at worst adds one covered window), so the index of all seven benchmarks
    fits in about 100 MB. Build it once; the scan calls :meth:`coverage` per document.
    """

    def __init__(self, items: Sequence[BenchmarkItem], n: int = NGRAM_SIZE):
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        self.items = list(items)
        self.n = n
        self.lengths = [len(item.tokens) for item in self.items]
        postings: dict[int, int | list[int]] = {}
        for number, item in enumerate(self.items):
            tokens = item.tokens
            if len(tokens) >= _MAX_START:
                raise ValueError(
                    f"{item.benchmark} item {item.item_id} has {len(tokens)} words; at most {_MAX_START - 1}"
                )
            for start in range(len(tokens) - n + 1):
                key, code = hash(tokens[start : start + n]), number << _START_BITS | start
                old = postings.get(key)
                if old is None:
                    postings[key] = code
                elif isinstance(old, list):
                    old.append(code)
                else:
                    postings[key] = [old, code]
        self.postings = postings
        self.n_short = sum(length < n for length in self.lengths)

    def __len__(self) -> int:
        return len(self.postings)

    def coverage(self, tokens: Sequence[str]) -> dict[int, float]:
        """Item number -> the fraction of its tokens covered by this document's matching n-grams."""
        n, postings = self.n, self.postings
        hits: list[int] = []
        for i in range(len(tokens) - n + 1):
            found = postings.get(hash(tuple(tokens[i : i + n])))
            if found is not None:
                if isinstance(found, int):
                    hits.append(found)
                else:
                    hits.extend(found)
        if not hits:
            return {}
        starts: dict[int, list[int]] = {}
        for code in sorted(set(hits)):
            starts.setdefault(code >> _START_BITS, []).append(code & _START_MASK)
        lengths = self.lengths
        return {number: _covered(s, n) / lengths[number] for number, s in starts.items()}

    def windows(self, number: int) -> set[int]:
        """The n-gram hashes of one item (to find where a document matches it)."""
        tokens = self.items[number].tokens
        return {hash(tokens[i : i + self.n]) for i in range(len(tokens) - self.n + 1)}

    def benchmarks(self) -> list[str]:
        """The benchmarks of the indexed items, in first-seen order."""
        return list(dict.fromkeys(item.benchmark for item in self.items))


def _covered(starts: list[int], n: int) -> int:
    """Tokens in the union of the windows ``[s, s + n)`` (``starts`` sorted)."""
    total, end = 0, -1
    for start in starts:
        stop = start + n
        total += stop - max(start, end) if stop > end else 0
        end = max(end, stop)
    return total


# --- the scan ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Match:
    """The training document that covers the largest share of one benchmark item."""

    benchmark: str
    item_id: str
    item_text: str
    score: float
    row_index: int
    row_id: str
    source: str
    train_text: str


@dataclass
class ScanResult:
    """One mixture scanned against an index: per-item best matches, counts and timing."""

    mixture: str
    index: NgramIndex
    threshold: float
    n_rows: int = 0
    n_documents: int = 0
    n_words: int = 0
    n_skipped: int = 0
    problems: list[RowProblem] = field(default_factory=list)
    best: dict[int, Match] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def rows_per_second(self) -> float:
        """Training rows (conversations, pairs or prompts) scanned per second."""
        return self.n_rows / self.seconds if self.seconds > 0 else float("nan")

    @property
    def words_per_row(self) -> float:
        """Prompt words (tokens after normalisation) per row scanned: the rate depends on it."""
        return self.n_words / self.n_rows if self.n_rows else float("nan")

    def projected_seconds(self, rows: int | None = None) -> float:
        """Seconds to scan ``rows`` rows (default: the full mixture) of about :attr:`words_per_row` words."""
        rows = FULL_ROWS.get(self.mixture, self.n_rows) if rows is None else rows
        return rows / self.rows_per_second

    def contaminated(self) -> list[Match]:
        """The matches above the threshold, by benchmark then item."""
        return [m for m in self.best.values() if m.score > self.threshold]

    def frame(self) -> pd.DataFrame:
        """One row per benchmark: mixture, benchmark, n_items, n_short, n_contaminated, percent."""
        counts: dict[str, list[int]] = {b: [0, 0, 0] for b in self.index.benchmarks()}
        for item in self.index.items:
            counts[item.benchmark][0] += 1
            counts[item.benchmark][1] += len(item.tokens) < self.index.n
        for match in self.contaminated():
            counts[match.benchmark][2] += 1
        rows = [
            {
                "mixture": self.mixture,
                "benchmark": bench,
                "n_items": n,
                "n_short": short,
                "n_contaminated": bad,
                "percent": 100.0 * bad / n if n else 0.0,
            }
            for bench, (n, short, bad) in counts.items()
        ]
        return pd.DataFrame(rows)

    def matches_frame(self, above_threshold: bool = True) -> pd.DataFrame:
        """The contaminated items (or every item with any match) with their best training document."""
        matches = self.contaminated() if above_threshold else list(self.best.values())
        columns = list(Match.__dataclass_fields__)
        frame = pd.DataFrame([m.__dict__ for m in matches], columns=columns)
        frame.insert(0, "mixture", self.mixture)
        return frame.sort_values(["benchmark", "score"], ascending=[True, False], ignore_index=True)


def _snippet(text: str, index: NgramIndex, number: int) -> str:
    """The part of a training document around its first n-gram shared with item ``number``."""
    windows, n = index.windows(number), index.n
    words = list(_WORD.finditer(text))
    tokens = [w.group().lower() for w in words]
    for i in range(len(tokens) - n + 1):
        if hash(tuple(tokens[i : i + n])) in windows:
            begin = max(0, words[i].start() - 50)
            return ("..." if begin else "") + text[begin : begin + _SNIPPET]
    return text[:_SNIPPET]


def _row_label(row: Mapping, key: str) -> str:
    value = row.get(key)
    return "" if value is None else str(value)


def scan_rows(
    index: NgramIndex,
    rows: Iterable[Any],
    *,
    kind: str,
    mixture: str = "",
    threshold: float = THRESHOLD,
    progress: bool = False,
    total: int | None = None,
    problems: list[RowProblem] | None = None,
) -> ScanResult:
    """Scan training rows (of schema ``kind``, any iterable) once; keep each item's best-covering document.

    Rows without a usable user turn are recorded in ``result.problems``, skipped and counted.
    """
    result = ScanResult(mixture, index, threshold, problems=problems if problems is not None else [])
    best, items = result.best, index.items
    start = time.perf_counter()
    scan = scan_prompts(rows, kind, result, desc=f"contamination {mixture}", progress=progress, total=total)
    for row_index, row, texts in scan:
        for text in texts:
            tokens = normalize(text)
            result.n_documents += 1
            result.n_words += len(tokens)
            for number, score in index.coverage(tokens).items():
                previous = best.get(number)
                if previous is None or score > previous.score:
                    item = items[number]
                    where = _snippet(text, index, number) if score > threshold else text[:_SNIPPET]
                    best[number] = Match(
                        item.benchmark, item.item_id, item.text[:_SNIPPET], score, row_index,
                        _row_label(row, "id"), _row_label(row, "source") or _row_label(row, "dataset"), where,
                    )  # fmt: skip
    result.seconds = time.perf_counter() - start
    return result


def scan_mixture(
    name: str,
    index: NgramIndex,
    *,
    mirror: str | Path | None = None,
    limit: int | None = None,
    threshold: float = THRESHOLD,
    progress: bool = True,
) -> ScanResult:
    """Stream one training mixture (``tulu3_sft``, ``tulu3_preference``, ``rlvr_mixed``) through the index."""
    spec = mixture_spec(name)
    problems: list[RowProblem] = []
    rows = stream_rows(spec.name, mirror=mirror, limit=limit, problems=problems)
    return scan_rows(
        index, rows, kind=spec.kind, mixture=spec.name, threshold=threshold, progress=progress,
        total=limit, problems=problems,
    )  # fmt: skip


def contamination_frame(results: Iterable[ScanResult]) -> pd.DataFrame:
    """The per-benchmark frames of several scans, stacked (mixture, benchmark, n_items, ..., percent)."""
    frames = [r.frame() for r in results]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def results_rows(
    results: Iterable[ScanResult], *, run_id: str, settings: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Results-store rows (:func:`~smoltulu_utils.results.data_rows`) per mixture and benchmark Hub id, for
    ``tables.table1`` (4, 13): value the percent, n the items, the counts and scan settings in settings.
    """
    rows = []
    for result in results:
        scan = {
            "ngram": result.index.n,
            "threshold": result.threshold,
            "rows_scanned": result.n_rows,
            "rows_skipped": result.n_skipped,
        }
        values = []
        for row in result.frame().to_dict("records"):
            counts = {"n_contaminated": int(row["n_contaminated"]), "n_short": int(row["n_short"])}
            values.append(
                (row["benchmark"], row["percent"], row["n_items"], {**dict(settings or {}), **counts, **scan})
            )
        rows += data_rows(run_id, result.mixture, CONTAMINATION_METRIC, values)
    return rows
