"""The language distribution of the training mixtures (the paper's Tables 10, 11 and 12).

Each row's prompt (its user turns, fenced code removed, the first :data:`MAX_CHARS` characters) is
given to langdetect 1.0.9 (character n-gram profiles of 55 languages), seeded so that the same text
always gets the same language. A share is the percent of rows *with a detected language* (rows without
letters are left out), which is how the paper's shares add up to 100. The paper does not name its
tool; langdetect misreads short texts, confuses close languages (Spanish / Catalan / Portuguese) and
is pulled around by code and math, so differences of a few tenths of a point are expected.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pandas as pd

from .data import FULL_ROWS, get_spec, mirror_path, mixture_spec, prompt_texts, scan_prompts, stream_rows
from .data_checks import RowProblem
from .paths import mirror_dir
from .results import LANGUAGE_METRIC, data_rows

#: The identifier and its version, recorded with the results.
DETECTOR = "langdetect 1.0.9"
#: Characters of a prompt given to the detector (enough for a stable answer; it is slower on more).
MAX_CHARS = 2000
#: langdetect's language codes -> English names (the paper's labels).
LANGUAGE_NAMES = {
    "af": "Afrikaans", "ar": "Arabic", "bg": "Bulgarian", "bn": "Bengali", "ca": "Catalan",
    "cs": "Czech", "cy": "Welsh", "da": "Danish", "de": "German", "el": "Greek", "en": "English",
    "es": "Spanish", "et": "Estonian", "fa": "Persian", "fi": "Finnish", "fr": "French",
    "gu": "Gujarati", "he": "Hebrew", "hi": "Hindi", "hr": "Croatian", "hu": "Hungarian",
    "id": "Indonesian", "it": "Italian", "ja": "Japanese", "kn": "Kannada", "ko": "Korean",
    "lt": "Lithuanian", "lv": "Latvian", "mk": "Macedonian", "ml": "Malayalam", "mr": "Marathi",
    "ne": "Nepali", "nl": "Dutch", "no": "Norwegian", "pa": "Punjabi", "pl": "Polish",
    "pt": "Portuguese", "ro": "Romanian", "ru": "Russian", "sk": "Slovak", "sl": "Slovenian",
    "so": "Somali", "sq": "Albanian", "sv": "Swedish", "sw": "Swahili", "ta": "Tamil", "te": "Telugu",
    "th": "Thai", "tl": "Tagalog", "tr": "Turkish", "uk": "Ukrainian", "ur": "Urdu", "vi": "Vietnamese",
    "zh-cn": "Chinese", "zh-tw": "Chinese",
}  # fmt: skip
_FENCED = re.compile(r"```.*?(?:```|$)", re.DOTALL)
_LETTER = re.compile(r"[^\W\d_]")


@cache
def _factory():
    """langdetect's detector factory with its 55 profiles loaded once, seeded for determinism."""
    from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory

    factory = DetectorFactory()
    factory.load_profile(PROFILES_DIRECTORY)
    factory.seed = 0
    return factory


def detect_language(text: str) -> str | None:
    """langdetect's code for ``text`` (``"en"``, ``"zh-cn"``...), or None when it has no letters."""
    from langdetect.lang_detect_exception import LangDetectException

    if not _LETTER.search(text):
        return None
    detector = _factory().create()
    detector.append(text)
    try:
        return detector.detect()
    except LangDetectException:  # "No features in text": nothing the profiles know
        return None


def language_name(code: str | None) -> str:
    """The English name of a langdetect code (``"zh-tw"`` -> ``"Chinese"``); ``"Undetected"`` for None."""
    return "Undetected" if code is None else LANGUAGE_NAMES.get(code, code)


def prompt_text(kind: str, row: Any, max_chars: int = MAX_CHARS) -> str:
    """The text of one row that is classified: its user turns, fenced code removed, cut to ``max_chars``."""
    text = "\n".join(prompt_texts(kind, row))
    return _FENCED.sub(" ", text)[:max_chars]


@dataclass
class LanguageCount:
    """Languages of one mixture: rows per language, and what was read, checked, undetected or skipped."""

    mixture: str
    stride: int = 1
    counts: Counter = field(default_factory=Counter)
    n_rows: int = 0
    n_checked: int = 0
    n_undetected: int = 0
    n_skipped: int = 0
    problems: list[RowProblem] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def n_detected(self) -> int:
        """Rows checked that got a language."""
        return self.n_checked - self.n_undetected

    @property
    def rows_per_second(self) -> float:
        """Rows checked (identified) per second, reading included."""
        return self.n_checked / self.seconds if self.seconds > 0 else float("nan")

    def projected_seconds(self, rows: int | None = None) -> float:
        """Seconds to identify ``rows`` rows at the measured rate (default: every row of the full mixture)."""
        rows = FULL_ROWS.get(self.mixture, self.n_rows) if rows is None else rows
        return rows / self.rows_per_second

    def frame(self) -> pd.DataFrame:
        """One row per language, largest first: mixture, language, rows, percent (of rows detected)."""
        total = self.n_detected
        rows = [
            {"mixture": self.mixture, "language": lang, "rows": n, "percent": 100.0 * n / total}
            for lang, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))
        ]
        return pd.DataFrame(rows, columns=["mixture", "language", "rows", "percent"])


def count_languages(
    rows: Iterable[Any],
    *,
    kind: str,
    mixture: str = "",
    stride: int = 1,
    progress: bool = False,
    total: int | None = None,
    problems: list[RowProblem] | None = None,
) -> LanguageCount:
    """Identify the language of every ``stride``-th row (0, stride, 2 x stride...) and count them.

    Rows without a usable user turn (recorded in ``problems``) and ``None`` rows (lines that were not JSON)
    are skipped and counted.
    """
    if stride < 1:
        raise ValueError(f"stride must be at least 1, got {stride}")
    result = LanguageCount(mixture, stride, problems=problems if problems is not None else [])
    start = time.perf_counter()
    scan = scan_prompts(
        rows, kind, result, stride=stride, desc=f"languages {mixture}", progress=progress, total=total
    )
    for _, row, _ in scan:
        text = prompt_text(kind, row)
        result.n_checked += 1
        code = detect_language(text)
        if code is None:
            result.n_undetected += 1
        else:
            result.counts[language_name(code)] += 1
    result.seconds = time.perf_counter() - start
    return result


def mixture_rows(name: str, mirror: str | Path | None = None) -> int:
    """Rows of a mixture: lines of its mirror file, or the dataset card's count when read from the Hub."""
    root = Path(mirror) if mirror is not None else mirror_dir()
    spec = get_spec(name)
    if root is None:
        return FULL_ROWS[spec.name]
    path = mirror_path(spec.name, root=root)
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


def language_distribution(
    name: str,
    *,
    mirror: str | Path | None = None,
    limit: int | None = None,
    stride: int = 1,
    progress: bool = True,
) -> LanguageCount:
    """Stream one training mixture and count the languages of every ``stride``-th row's prompt."""
    spec = mixture_spec(name)
    problems: list[RowProblem] = []
    rows = stream_rows(spec.name, mirror=mirror, limit=limit, problems=problems)
    return count_languages(
        rows,
        kind=spec.kind,
        mixture=spec.name,
        stride=stride,
        progress=progress,
        total=limit,
        problems=problems,
    )


def results_rows(
    results: Iterable[LanguageCount], *, run_id: str, settings: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Results-store rows (:func:`~smoltulu_utils.results.data_rows`) per mixture and language, for
    ``tables.table10`` (11, 12): value the percent of detected rows, n the rows in that language.
    """
    rows = []
    for result in results:
        run_settings = {
            **dict(settings or {}),
            "rows_scanned": result.n_rows,
            "rows_detected": result.n_detected,
            "rows_undetected": result.n_undetected,
            "rows_skipped": result.n_skipped,
            "stride": result.stride,
            "detector": DETECTOR,
        }
        values = [
            (r["language"], r["percent"], r["rows"], run_settings) for r in result.frame().to_dict("records")
        ]
        rows += data_rows(run_id, result.mixture, LANGUAGE_METRIC, values)
    return rows
