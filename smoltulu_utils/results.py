"""An append-only store of tidy results: one JSON row per number, in one JSONL file.

Every stage and evaluation appends rows (built with :func:`make_row`); tables and figures read only
from here and ``data/paper``. A row: run_id, stage, model, benchmark, metric, value, optional stderr,
n and settings, created_at, and extra keys such as ``paper_model`` (the paper column it reproduces).
Appends rewrite the file to a temporary copy and rename it over the old one under an ``fcntl`` lock,
so a killed process leaves the old file or the new one, never half a row. Written by hand: no
maintained library offers a locked, atomic JSONL store of this shape.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic import atomic_open
from .errors import KitError
from .paths import results_dir
from .serialize import jsonable

try:  # POSIX only; on other systems writers are not serialised against each other.
    import fcntl
except ImportError:  # pragma: no cover - exercised on Windows only
    fcntl = None

if TYPE_CHECKING:
    import pandas as pd

#: Fields every row must have (``created_at`` is filled in by :meth:`ResultsStore.append` if absent).
REQUIRED_FIELDS = ("run_id", "stage", "model", "benchmark", "metric", "value")
#: Optional fields with a fixed meaning.
OPTIONAL_FIELDS = ("stderr", "n", "settings", "created_at")
#: Column order of :meth:`ResultsStore.read`; extra keys follow.
COLUMNS = REQUIRED_FIELDS + OPTIONAL_FIELDS
#: The key that identifies one measurement; :meth:`ResultsStore.latest` keeps the newest per key.
DEFAULT_KEY = ("run_id", "stage", "model", "benchmark", "metric")

_TEXT_FIELDS = ("run_id", "stage", "model", "benchmark", "metric")

# The vocabulary every rows builder writes and every reader expects.
#: ``stage`` values: the training stages, evaluations, and rows that describe training data.
SFT_STAGE, DPO_STAGE, RM_STAGE, RLVR_STAGE = "sft", "dpo", "rm", "rlvr"
EVAL_STAGE, DATA_STAGE = "eval", "data"
#: ``settings`` keys of a training run's hyperparameters (Tables 2, 5, 7 read them).
LEARNING_RATE, EFFECTIVE_BATCH_SIZE = "learning_rate", "effective_batch_size"
#: ``metric`` of a contamination row (percent of a benchmark's items found in a mixture).
CONTAMINATION_METRIC = "contamination_percent"
#: ``metric`` of a language row (percent of a mixture's rows in a language; ``benchmark`` = language).
LANGUAGE_METRIC = "language_percent"
#: ``metric`` of a reward model's pairwise accuracy rows (Table 8).
ACCURACY_METRIC = "accuracy"
#: ``benchmark`` of training-curve rows (see :func:`curve_rows`).
TRAINING_BENCHMARK = "training"


class ResultsError(KitError, ValueError):
    """A row that does not fit the schema, or a store file that cannot be used."""


class ResultsWarning(UserWarning):
    """The store file holds lines that are not whole rows; the good rows were kept."""


@dataclass(frozen=True)
class BadLine:
    """A line of the store file that is not a whole, valid row."""

    lineno: int
    text: str
    reason: str


def default_path() -> Path:
    """The default store file: ``results_dir()/"results.jsonl"``."""
    return results_dir() / "results.jsonl"


def now_iso() -> str:
    """The current UTC time as an ISO 8601 string with microseconds."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")


def _describe(index: int, row: Any) -> str:
    keys = ("run_id", "benchmark", "metric") if isinstance(row, Mapping) else ()
    ids = ", ".join(f"{k}={row[k]!r}" for k in keys if k in row)
    return f"row {index} ({ids})" if ids else f"row {index}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_time(text: str) -> _dt.datetime:
    # Python 3.10's fromisoformat does not accept a trailing "Z".
    return _dt.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)


def validate_row(row: Mapping[str, Any], index: int = 0) -> dict[str, Any]:
    """Check one row against the schema and return it as a plain, JSON-ready dict.

    Raises :class:`ResultsError` naming the row and the field when a required field is missing or
    empty, ``value``/``stderr`` is not a finite number, ``n`` is not a non-negative integer,
    ``settings`` is not a mapping, ``created_at`` is not ISO 8601, or the row is not JSON-serialisable.
    """
    where = _describe(index, row)
    if not isinstance(row, Mapping):
        raise ResultsError(f"{where}: expected a mapping of field -> value, got {type(row).__name__}")
    out = {str(k): jsonable(v, strict=True) for k, v in row.items()}
    for field in REQUIRED_FIELDS:
        if field not in out or out[field] is None or out[field] == "":
            raise ResultsError(f"{where}: missing required field {field!r}")
    for field in _TEXT_FIELDS:
        if not isinstance(out[field], str):
            raise ResultsError(f"{where}: field {field!r} must be a string, got {out[field]!r}")
    value = out["value"]
    if not _is_number(value) or not math.isfinite(value):
        raise ResultsError(f"{where}: field 'value' must be a finite number, got {value!r}")
    if out.get("stderr") is not None:
        stderr = out["stderr"]
        if not _is_number(stderr) or not math.isfinite(stderr) or stderr < 0:
            raise ResultsError(f"{where}: field 'stderr' must be a finite number >= 0, got {stderr!r}")
    if out.get("n") is not None:
        n = out["n"]
        if isinstance(n, float) and n.is_integer():
            n = out["n"] = int(n)
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ResultsError(f"{where}: field 'n' must be an integer >= 0, got {n!r}")
    settings = out.setdefault("settings", {})
    if settings is None:
        out["settings"] = {}
    elif not isinstance(settings, Mapping):
        raise ResultsError(f"{where}: field 'settings' must be a mapping, got {settings!r}")
    created = out.get("created_at")
    if created is None:
        out["created_at"] = now_iso()
    elif not isinstance(created, str):
        raise ResultsError(f"{where}: field 'created_at' must be an ISO 8601 string, got {created!r}")
    else:
        try:
            _parse_time(created)
        except ValueError:
            raise ResultsError(f"{where}: field 'created_at' is not ISO 8601: {created!r}") from None
    try:
        json.dumps(out, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ResultsError(f"{where}: not JSON-serialisable ({err})") from None
    return out


def make_row(
    run_id: str,
    stage: str,
    model: str,
    benchmark: str,
    metric: str,
    value: float,
    *,
    stderr: float | None = None,
    n: int | None = None,
    settings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One validated store row (``created_at`` filled in); the constructor every rows builder uses."""
    row = dict(run_id=run_id, stage=stage, model=model, benchmark=benchmark, metric=metric, value=value)
    optional = {"stderr": stderr, "n": n}
    row.update({key: v for key, v in optional.items() if v is not None}, settings=dict(settings or {}))
    return validate_row(row)


def data_rows(
    run_id: str, mixture: str, metric: str, values: Iterable[tuple[str, float, int, Mapping[str, Any]]]
) -> list[dict[str, Any]]:
    """Rows of stage :data:`DATA_STAGE` that describe one training mixture (``model`` = the mixture),
    one per ``(benchmark or language, percent, count, settings)``."""
    return [
        make_row(run_id, DATA_STAGE, mixture, label, metric, float(value), n=int(n), settings=settings)
        for label, value, n, settings in values
    ]


def curve_rows(
    run_id: str,
    stage: str,
    model: str,
    curves: Mapping[str, Sequence[tuple[int, float]]],
    settings: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One row per (curve, optimizer step) of training curves such as ``{"train_loss": [(10, 2.3)]}``.

    Rows have benchmark :data:`TRAINING_BENCHMARK` and metric ``f"{curve}@{step}"``, so every step
    keeps its own key through :func:`latest_rows`; :func:`curves_frame` reads them back. A NaN or
    infinite point (a diverged run) has no row: the store holds finite numbers only.
    """
    return [
        make_row(run_id, stage, model, TRAINING_BENCHMARK, f"{name}@{int(step)}", value, settings=settings)
        for name, points in curves.items()
        for step, value in points
        if math.isfinite(value)
    ]


def curves_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The training-curve rows of a results frame as columns run_id, stage, model, curve, step, value."""
    import pandas as pd

    columns = ["run_id", "stage", "model", "curve", "step", "value"]
    rows = frame[frame["benchmark"] == TRAINING_BENCHMARK] if len(frame) else frame
    if not len(rows):
        return pd.DataFrame(columns=columns)
    parts = rows["metric"].str.rsplit("@", n=1, expand=True)
    out = rows.assign(curve=parts[0], step=parts[1].astype(int), value=rows["value"].astype(float))
    out = out.sort_values(["run_id", "stage", "model", "curve", "step"], kind="stable")
    return out[columns].reset_index(drop=True)


def _matches(row: Mapping[str, Any], key: Mapping[str, Any]) -> bool:
    for field, wanted in key.items():
        if field not in row:
            return False
        have = row[field]
        if isinstance(wanted, Mapping):
            if not isinstance(have, Mapping) or not _matches(have, wanted):
                return False
        elif have != wanted:
            return False
    return True


def _lookup(row: Mapping[str, Any], field: str) -> Any:
    """A field of a row; ``"settings.learning_rate"`` reaches into a nested mapping."""
    if field in row:
        value = row[field]
    else:
        value = row
        for part in field.split("."):
            if not isinstance(value, Mapping) or part not in value:
                return None
            value = value[part]
    if isinstance(value, (Mapping, list)):
        return json.dumps(value, sort_keys=True)
    return value


class ResultsStore:
    """Tidy results in one append-only JSONL file (default ``results_dir()/"results.jsonl"``).

    ``append`` validates and writes atomically; ``read`` returns a DataFrame; ``has``,
    ``done_keys`` and ``latest`` let a sweep skip finished work and pick the newest value.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None):
        self.path = Path(path).expanduser() if path is not None else default_path()
        #: Lines of the file that were not whole rows at the last read (see :meth:`rows`).
        self.bad_lines: list[BadLine] = []

    def __repr__(self) -> str:
        return f"ResultsStore({str(self.path)!r})"

    def __len__(self) -> int:
        return len(self.rows(warn=False))

    @property
    def lock_path(self) -> Path:
        """The sidecar file that writers lock (the data file itself is replaced on every append)."""
        return self.path.with_name(self.path.name + ".lock")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+b") as handle:
            if fcntl is not None:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _remove_stale_temps(self) -> None:
        # Called with the lock held: any temp file left now belongs to a writer that died.
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()

    def append(self, rows: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Validate ``rows`` (one mapping or several) and add them to the file atomically.

        All rows are checked before anything is written, so one bad row writes nothing. Returns the
        rows as written (``settings`` defaulted to ``{}``, ``created_at`` filled in).
        """
        batch = [rows] if isinstance(rows, Mapping) else list(rows)
        clean = [validate_row(row, i) for i, row in enumerate(batch)]
        if not clean:
            return []
        payload = "".join(json.dumps(row, allow_nan=False, ensure_ascii=False) + "\n" for row in clean)
        with self._locked():
            self._remove_stale_temps()
            self._write_atomically(payload.encode("utf-8"))
        return clean

    def _write_atomically(self, payload: bytes, keep_existing: bool = True) -> None:
        with atomic_open(self.path, "wb") as out:
            if keep_existing and self.path.exists():
                with open(self.path, "rb") as old:
                    last = b"\n"
                    while chunk := old.read(1 << 20):
                        out.write(chunk)
                        last = chunk[-1:]
                if last != b"\n":
                    # Something else left a partial last line: close it so that it stays a
                    # single bad line (reported by read) instead of swallowing our first row.
                    warnings.warn(
                        f"{self.path}: the file ended in a partial line; it is kept as a bad "
                        "line (see ResultsStore.read and ResultsStore.repair)",
                        ResultsWarning,
                        stacklevel=3,
                    )
                    out.write(b"\n")
            out.write(payload)

    def rows(self, warn: bool = True, strict: bool = False) -> list[dict[str, Any]]:
        """All whole rows, in file order, as dicts.

        Other lines (a partial write, a hand edit) are skipped, kept in :attr:`bad_lines` and named in a
        :class:`ResultsWarning`; with ``strict=True`` they raise :class:`ResultsError` instead.
        """
        self.bad_lines = []
        if not self.path.exists():
            return []
        good: list[dict[str, Any]] = []
        with open(self.path, "rb") as handle:
            data = handle.read()
        lines = data.split(b"\n")
        partial_tail = not data.endswith(b"\n") and data != b""
        if not partial_tail:
            lines = lines[:-1]
        for lineno, raw in enumerate(lines, start=1):
            text = raw.decode("utf-8", errors="replace")
            if not text.strip():
                continue
            try:
                row = json.loads(text)
                if not isinstance(row, dict):
                    raise ValueError("not a JSON object")
                good.append(validate_row(row, lineno))
            except ValueError as err:
                tail = partial_tail and lineno == len(lines)
                reason = "partial last line (an interrupted write?)" if tail else str(err)
                self.bad_lines.append(BadLine(lineno, text, reason))
        if self.bad_lines:
            listed = "; ".join(f"line {b.lineno}: {b.reason}" for b in self.bad_lines[:5])
            more = f" (and {len(self.bad_lines) - 5} more)" if len(self.bad_lines) > 5 else ""
            message = (
                f"{self.path}: {len(self.bad_lines)} line(s) are not whole rows and were skipped, "
                f"{len(good)} good rows kept: {listed}{more}. ResultsStore.repair() moves them aside."
            )
            if strict:
                raise ResultsError(message)
            if warn:
                warnings.warn(message, ResultsWarning, stacklevel=2)
        return good

    def read(self, expand_settings: bool = False, strict: bool = False) -> pd.DataFrame:
        """All rows as a DataFrame (schema columns, then extra keys), ``created_at`` parsed to UTC.

        ``expand_settings=True`` adds a ``settings.<key>`` column per setting; bad lines as in :meth:`rows`.
        """
        import pandas as pd

        records = self.rows(strict=strict)
        extras = sorted({k for row in records for k in row} - set(COLUMNS))
        frame = pd.DataFrame.from_records(records, columns=[*COLUMNS, *extras])
        frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True, format="ISO8601")
        if expand_settings and len(frame):
            flat = pd.json_normalize(frame["settings"].tolist()).add_prefix("settings.")
            flat.index = frame.index
            frame = pd.concat([frame, flat], axis=1)
        return frame

    def has(self, **key: Any) -> bool:
        """True if a row matches every ``field=value`` given (a dict value matches as a subset)."""
        return any(_matches(row, key) for row in self.rows())

    def done_keys(self, *fields: str, **filters: Any) -> set[Any]:
        """The distinct values of ``fields`` over the rows matching ``filters``.

        One field gives a set of values, several give a set of tuples; ``"settings.learning_rate"``
        reaches into settings. Default fields: :data:`DEFAULT_KEY`. A sweep skips ``if key in done``.
        """
        fields = fields or DEFAULT_KEY
        selected = [row for row in self.rows() if _matches(row, filters)]
        if len(fields) == 1:
            return {_lookup(row, fields[0]) for row in selected}
        return {tuple(_lookup(row, f) for f in fields) for row in selected}

    def latest(self, *key: str, **filters: Any) -> pd.DataFrame:
        """The newest row (largest ``created_at``, then last written) per key among rows matching ``filters``."""
        frame = self.read()
        if filters and len(frame):
            records = frame.to_dict("records")
            frame = frame[[_matches(row, filters) for row in records]]
        return latest_rows(frame, key or DEFAULT_KEY)

    def repair(self) -> Path | None:
        """Move the lines that are not whole rows to ``<file>.rejected`` (returned; None if there were none)."""
        with self._locked():
            good = self.rows(warn=False)
            if not self.bad_lines:
                return None
            rejected = self.path.with_name(self.path.name + ".rejected")
            with open(rejected, "a", encoding="utf-8") as out:
                for bad in self.bad_lines:
                    out.write(bad.text + "\n")
                out.flush()
                os.fsync(out.fileno())
            payload = "".join(json.dumps(r, allow_nan=False, ensure_ascii=False) + "\n" for r in good)
            self._write_atomically(payload.encode("utf-8"), keep_existing=False)
            self.bad_lines = []
            return rejected


def latest_rows(frame: pd.DataFrame, key: Iterable[str] = DEFAULT_KEY) -> pd.DataFrame:
    """The newest row (largest ``created_at``, then last in order; none counts as oldest) per ``key``."""
    key = [k for k in key if k in frame.columns]
    if frame.empty:
        return frame.copy()
    ordered = frame.assign(_order=range(len(frame)))
    if "created_at" in ordered.columns:
        ordered = ordered.sort_values(["created_at", "_order"], kind="stable", na_position="first")
    kept = ordered.drop_duplicates(subset=key, keep="last") if key else ordered.tail(1)
    return kept.sort_values("_order").drop(columns="_order").reset_index(drop=True)


# --- the rows of a learning-rate x batch-size sweep (written by smoltulu_utils.sweep) ----------------

#: ``benchmark`` of the row written last for a finished sweep cell (its value: the number of metric rows).
CELL_COMPLETE = "cell_complete"
#: ``benchmark`` of the row recording a sweep cell that raised (value 1; the error is in its settings).
CELL_FAILED = "cell_failed"
#: Columns of :func:`sweep_frame`.
FRAME_COLUMNS = (
    "run_id",
    "sweep",
    "profile",
    "model",
    "seed",
    "metric",
    "score_metric",
    "value",
    "stderr",
    "n",
    "lr",
    "bs",
    "ratio",
    "steps",
    "tokens_seen",
    "wall_seconds",
    "train_loss",
    "eval_loss",
    "created_at",
)


def lower_is_better(metric: str) -> bool:
    """True for losses and perplexities (``eval_loss``, ``train_loss``), where a smaller value is better."""
    low = metric.lower()
    return "loss" in low or "perplexity" in low


def sweep_frame(
    store: ResultsStore | str | Path | None = None,
    stage: str = SFT_STAGE,
    *,
    sweep: str | None = None,
    profile: str | None = None,
) -> pd.DataFrame:
    """A sweep's scores from the results store: one row per cell x metric, columns :data:`FRAME_COLUMNS`.

    ``metric`` is the row's benchmark label (``eval_loss``, ``ARC (Average)``), ``score_metric`` its
    metric field, ``bs`` the effective batch size, ``ratio`` LR / BS. Only rows with a ``sweep``
    setting count; bookkeeping rows are left out; a cell written twice keeps its newest rows.
    """
    import pandas as pd

    if not isinstance(store, ResultsStore):
        store = ResultsStore(store)
    setting = {"lr": LEARNING_RATE, "bs": EFFECTIVE_BATCH_SIZE}  # the settings key of a column
    records = []
    for row in store.rows():
        settings = row.get("settings") or {}
        bookkeeping = row["benchmark"] in (CELL_COMPLETE, CELL_FAILED)
        if row["stage"] != stage or "sweep" not in settings or bookkeeping:
            continue
        if (sweep is not None and settings["sweep"] != sweep) or (
            profile is not None and settings.get("profile") != profile
        ):
            continue
        record = {column: settings.get(setting.get(column, column)) for column in FRAME_COLUMNS}
        record.update(
            run_id=row["run_id"],
            model=row["model"],
            metric=row["benchmark"],
            score_metric=row["metric"],
            value=float(row["value"]),
            stderr=row.get("stderr"),
            n=row.get("n"),
            created_at=row.get("created_at"),
        )
        records.append(record)
    frame = pd.DataFrame.from_records(records, columns=list(FRAME_COLUMNS))
    if frame.empty:
        return frame
    key = ["run_id", "sweep", "profile", "model", "metric"]
    frame = frame.drop_duplicates(subset=key, keep="last").reset_index(drop=True)
    for column in ("lr", "ratio", "value", "train_loss", "eval_loss", "wall_seconds"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    frame["bs"] = pd.to_numeric(frame["bs"], errors="coerce").astype("Int64")
    missing = frame["ratio"].isna() & frame["lr"].notna() & frame["bs"].notna()
    frame.loc[missing, "ratio"] = frame.loc[missing, "lr"] / frame.loc[missing, "bs"].astype(float)
    frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True, format="ISO8601")
    return frame
