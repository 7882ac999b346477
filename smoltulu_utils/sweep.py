"""The learning-rate x batch-size sweep of the paper's Figure 1: a grid of SFT cells, run and resumed.

The paper's central figure fine-tunes SmolLM2-135M over a grid of learning rates and effective batch
sizes and draws one contour panel per benchmark. Its grid is not recoverable, so the kit declares
one in ``recipes/ablation_135m.yaml`` (spanning at least the LR/BS ratios of Table 2)::

    cells = load_grid("ablation_135m", profile="smoke")      # frozen Cells: lr, batch, seed, ratio, run_id
    report = run_sweep(cells, train_and_evaluate, ResultsStore())
    df = sweep_frame(ResultsStore())                        # one row per cell x metric
    plotting.plot_lr_bs_contours(df)

:func:`run_sweep` runs one cell at a time through any callable ``run_cell(cell)`` (the default,
:func:`train_and_evaluate`, trains with :func:`smoltulu_utils.sft.train_sft` and scores the result;
tests pass a fake). A cell's rows (one per metric, then a ``cell_complete`` marker) go to the
results store in one atomic append, so a sweep killed at any instant leaves each cell either whole
or absent: a rerun skips the finished cells and recomputes the rest. A cell that raises is recorded
as a ``cell_failed`` row, counted in the :class:`SweepReport`, and retried by the next run.
"""

from __future__ import annotations

import difflib
import logging
import math
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from tqdm.auto import tqdm

from .errors import FileKeyError
from .paths import RECIPES_DIR, runs_dir
from .recipes import Recipe, RecipeError, recipe_from_dict
from .results import ResultsStore
from .stages import get_stage, sweep_stages

if TYPE_CHECKING:
    import pandas as pd

    from .profiles import Plan, Profile

logger = logging.getLogger(__name__)

#: The value of ``kind:`` that marks a YAML file as a sweep grid.
GRID_KIND = "lr_bs_sweep"
#: The metric every cell reports: the stage's loss on held-out data after training (lower is better).
EVAL_LOSS = "eval_loss"
#: Held-out preference-pair accuracy of a DPO (implicit reward) or reward-model cell (higher is better).
PAIR_ACCURACY = "pair_accuracy"
#: The stages a grid can sweep, and the recipe class of each (the stage table's sweepable stages).
SWEEP_STAGES: dict[str, type[Recipe]] = sweep_stages()
#: Metrics that are not benchmarks, and the stages that report them.
STAGE_METRICS = {EVAL_LOSS: ("sft", "dpo", "rm"), PAIR_ACCURACY: ("dpo", "rm")}
#: Benchmark label of the row written last for a finished cell (its value: the number of metric rows).
MARKER = "cell_complete"
#: Benchmark label of the row recording a cell that raised (value 1; the error is in its settings).
FAILED = "cell_failed"
#: Row labels that are bookkeeping, not scores.
BOOKKEEPING = (MARKER, FAILED)

_TOP_KEYS = ("kind", "name", "figure", "base", "grid", "smoke")
_BLOCK_KEYS = (
    "learning_rates",
    "effective_batch_sizes",
    "seeds",
    "model",
    "metrics",
    "evaluate",
    "max_steps",
    "max_length",
    "max_train_samples",
    "eval_limit",
    "eval_samples",
)
_REQUIRED_BLOCK_KEYS = ("learning_rates", "effective_batch_sizes", "seeds", "metrics")
_SIZE_KEYS = ("max_steps", "max_length", "max_train_samples", "eval_limit")
_GRID_SET_KEYS = ("learning_rate", "effective_batch_size", "seed")


class SweepError(FileKeyError):
    """A sweep grid or cell that cannot be used; the message names the file, the key and the fix."""

    unnamed = "<grid>"


def lower_is_better(metric: str) -> bool:
    """True for losses and perplexities (``eval_loss``, ``train_loss``), where a smaller value is better."""
    low = metric.lower()
    return "loss" in low or "perplexity" in low


def format_number(value: float) -> str:
    """A learning rate as it appears in a run id: ``3e-05``, ``3.1e-06``, ``0.0001`` -> ``1e-04``."""
    mantissa, exponent = f"{float(value):.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{exponent}"


# --- cells -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One point of the grid: a learning rate, an effective batch size and a seed, with how to run it.

    ``ratio`` (LR / BS) and ``run_id`` (``lr3e-05_bs16_s0``) are derived from the values. The other
    fields say how :func:`train_and_evaluate` runs the cell: the profile, the weights to train
    (``model``: a Hub id, ``"tiny"`` or ``"bundled"``), the metrics expected, whether to run the
    benchmarks, size caps that override the profile's (None keeps the profile's), and how many
    training rows are held out for the eval loss (``eval_samples``, the same rows for every cell).
    """

    lr: float
    effective_batch_size: int
    seed: int = 0
    profile: str = "smoke"
    sweep: str = "ablation_135m"
    model: str = "HuggingFaceTB/SmolLM2-135M"
    metrics: tuple[str, ...] = (EVAL_LOSS,)
    evaluate: bool = False
    max_steps: int | None = None
    max_length: int | None = None
    max_train_samples: int | None = None
    eval_limit: int | None = None
    eval_samples: int = 16
    base: Recipe | None = field(default=None, repr=False, compare=False)
    ratio: float = field(init=False)
    run_id: str = field(init=False)

    def __post_init__(self) -> None:
        lr = _positive_number(self.lr, None, "lr")
        bs = _positive_int(self.effective_batch_size, None, "effective_batch_size")
        seed = _non_negative_int(self.seed, None, "seed")
        object.__setattr__(self, "eval_samples", _positive_int(self.eval_samples, None, "eval_samples"))
        object.__setattr__(self, "lr", lr)
        object.__setattr__(self, "effective_batch_size", bs)
        object.__setattr__(self, "seed", seed)
        object.__setattr__(self, "metrics", tuple(self.metrics))
        object.__setattr__(self, "ratio", lr / bs)
        object.__setattr__(self, "run_id", f"lr{format_number(lr)}_bs{bs}_s{seed}")

    @property
    def benchmarks(self) -> tuple[str, ...]:
        """The benchmark labels to evaluate after training (empty when ``evaluate`` is off)."""
        return tuple(m for m in self.metrics if m not in STAGE_METRICS) if self.evaluate else ()

    @property
    def stage(self) -> str:
        """The stage the cell trains: its base recipe's (``sft`` without one)."""
        return self.base.stage if self.base is not None else "sft"

    def settings(self) -> dict[str, Any]:
        """The values that identify the cell in a results row's settings."""
        return {
            "sweep": self.sweep,
            "lr": self.lr,
            "effective_batch_size": self.effective_batch_size,
            "ratio": self.ratio,
            "seed": self.seed,
            "profile": self.profile,
            "eval_samples": self.eval_samples,
        }

    def recipe(self) -> Recipe:
        """The grid's base recipe (SFT, DPO or RM) with this cell's learning rate, batch size, seed and run id."""
        if self.base is None:
            raise SweepError(
                None,
                "base",
                f"cell {self.run_id} has no base recipe to train.",
                "build cells with load_grid(), or pass base=load_recipe('sft_1130').",
            )
        return self.base.replace(
            name=self.run_id,
            learning_rate=self.lr,
            effective_batch_size=self.effective_batch_size,
            seed=self.seed,
        )

    def profile_spec(self) -> Profile:
        """The cell's profile with its model and size caps applied."""
        from .profiles import get_profile

        changes: dict[str, Any] = {"model": self.model}
        changes.update({k: getattr(self, k) for k in _SIZE_KEYS if getattr(self, k) is not None})
        return get_profile(self.profile).replace(**changes)

    def plan(self, hardware: Any = None, num_processes: int | None = None) -> Plan:
        """The training plan for this cell on this machine (see :func:`smoltulu_utils.profiles.resolve`)."""
        from .profiles import resolve

        return resolve(
            self.recipe(), self.profile_spec(), hardware=hardware, num_processes=num_processes, verbose=False
        )


def ratio_span(cells: Iterable[Cell]) -> tuple[float, float]:
    """The smallest and largest LR / BS ratio of ``cells``."""
    ratios = [cell.ratio for cell in cells]
    if not ratios:
        raise SweepError(None, None, "no cells given.")
    return min(ratios), max(ratios)


def paper_ratio_range(stage: str = "sft") -> tuple[float, float]:
    """The smallest and largest LR / BS ratio of the paper's recipes of a stage (Tables 2, 5, 7), unscaled."""
    from .paper import paper_hyperparameters

    ratios = paper_hyperparameters(stage.upper())["lr_bs_ratio"].astype(float)
    return float(ratios.min()), float(ratios.max())


def covers_paper_range(cells: Iterable[Cell]) -> bool:
    """True when the cells' LR / BS ratios reach at least the lowest and highest ratio of their stage's table."""
    cells = list(cells)
    low, high = ratio_span(cells)
    paper_low, paper_high = paper_ratio_range(cells[0].stage)
    return low <= paper_low and high >= paper_high


# --- loading a grid ----------------------------------------------------------------------------


def _closest(word: str, choices: Iterable[str]) -> str:
    match = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


def _positive_number(value: Any, file: Any, key: str) -> float:
    number = None
    if not isinstance(value, bool):
        try:  # PyYAML reads 9e-5 (no dot) as a string: accept the number it means
            number = float(value)
        except (TypeError, ValueError):
            number = None
    if number is None or not math.isfinite(number) or number <= 0:
        raise SweepError(file, key, f"must be a positive number, got {value!r}.", "give a value above 0.")
    return number


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if math.isfinite(number) and number.is_integer() else None


def _positive_int(value: Any, file: Any, key: str) -> int:
    number = _int(value)
    if number is None or number < 1:
        raise SweepError(file, key, f"must be a positive whole number, got {value!r}.", "give 1 or more.")
    return number


def _non_negative_int(value: Any, file: Any, key: str) -> int:
    number = _int(value)
    if number is None or number < 0:
        raise SweepError(file, key, f"must be a whole number >= 0, got {value!r}.", "give 0 or more.")
    return number


def grid_path(name_or_path: str | Path) -> Path:
    """The YAML file of a grid name (``'ablation_135m'``: ``recipes/`` or ``recipes/sweeps/``) or a path."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith((".yaml", ".yml")) or "/" in text or "\\" in text:
        path = Path(name_or_path).expanduser()
    else:
        path = RECIPES_DIR / f"{text}.yaml"
        if not path.is_file() and (RECIPES_DIR / "sweeps" / f"{text}.yaml").is_file():
            path = RECIPES_DIR / "sweeps" / f"{text}.yaml"
    if not path.is_file():
        raise SweepError(
            path, None, "no such grid file.", "give a grid name such as 'ablation_135m' or a path."
        )
    return path


def _values(block: Mapping[str, Any], file: Path, where: str, key: str, convert: Callable) -> list[Any]:
    raw = block[key]
    name = f"{where}.{key}"
    if not isinstance(raw, list | tuple):
        raw = [raw] if raw is not None and not isinstance(raw, Mapping) else None
    if not raw:
        raise SweepError(
            file, name, "is empty: the grid needs at least one value.", "list one or more values."
        )
    values = [convert(v, file, f"{name}[{i}]") for i, v in enumerate(raw)]
    if len(set(values)) != len(values):
        repeated = sorted({v for v in values if values.count(v) > 1})
        raise SweepError(file, name, f"repeats {repeated}.", "list each value once.")
    return values


def _metrics(block: Mapping[str, Any], file: Path, where: str, stage: str = "sft") -> tuple[str, ...]:
    from .paper import BENCHMARKS, canonical_benchmark

    raw = block["metrics"]
    name = f"{where}.metrics"
    if not isinstance(raw, list | tuple) or not raw:
        raise SweepError(file, name, f"must be a non-empty list, got {raw!r}.", f"list '{EVAL_LOSS}' first.")
    labels = []
    for i, item in enumerate(raw):
        if not isinstance(item, str) or not item.strip():
            raise SweepError(file, f"{name}[{i}]", f"must be a metric name, got {item!r}.")
        if item in STAGE_METRICS:
            if stage not in STAGE_METRICS[item]:
                raise SweepError(
                    file, f"{name}[{i}]", f"'{item}' is not reported by a {stage} cell.",
                    f"use it with stage {' or '.join(STAGE_METRICS[item])}, or remove it.",
                )  # fmt: skip
            labels.append(item)
            continue
        try:
            label = canonical_benchmark(item)
        except (KeyError, ValueError):
            label = None
        if label not in BENCHMARKS:
            raise SweepError(
                file,
                f"{name}[{i}]",
                f"unknown metric {item!r}." + _closest(item, (*STAGE_METRICS, *BENCHMARKS)),
                f"use {', '.join(repr(m) for m in STAGE_METRICS)} or one of the paper's benchmarks: "
                f"{', '.join(BENCHMARKS)}.",
            )
        labels.append(label)
    if EVAL_LOSS not in labels:
        raise SweepError(
            file, name, f"must include '{EVAL_LOSS}' (every cell reports it).", f"add '{EVAL_LOSS}'."
        )
    if len(set(labels)) != len(labels):
        raise SweepError(file, name, f"lists a metric twice: {labels}.", "list each metric once.")
    return tuple(labels)


def _check_block(block: Any, file: Path, where: str, required: Sequence[str]) -> dict[str, Any]:
    if not isinstance(block, Mapping):
        raise SweepError(file, where, f"must be a mapping of keys to values, got {block!r}.")
    for key in block:
        if key not in _BLOCK_KEYS:
            raise SweepError(
                file,
                f"{where}.{key}",
                "is not a grid key." + _closest(key, _BLOCK_KEYS),
                f"use only {', '.join(_BLOCK_KEYS)}.",
            )
    for key in required:
        if key not in block:
            raise SweepError(file, f"{where}.{key}", "is missing.", f"add '{key}: ...' under '{where}'.")
    return dict(block)


def _base_recipe(base: Any, file: Path) -> Recipe:
    if not isinstance(base, Mapping):
        raise SweepError(file, "base", f"must be a mapping of recipe keys, got {base!r}.")
    for key in _GRID_SET_KEYS:
        if key in base:
            raise SweepError(
                file, f"base.{key}", "is set by the grid, cell by cell.", "remove it from 'base'."
            )
    trial = {**base, "learning_rate": 1e-5, "effective_batch_size": 1, "seed": 0}
    try:
        recipe = recipe_from_dict(trial, file)
    except RecipeError as err:
        text = str(err)
        prefix = f"{err.file}: key '{err.key}': " if err.key else f"{err.file}: "
        key = f"base.{err.key}" if err.key else "base"
        raise SweepError(file, key, text[len(prefix) :] if text.startswith(prefix) else text) from None
    if not isinstance(recipe, tuple(SWEEP_STAGES.values())):
        raise SweepError(
            file,
            "base.stage",
            f"is '{recipe.stage}'; a sweep trains {', '.join(SWEEP_STAGES)}.",
            f"use 'stage: {' | '.join(SWEEP_STAGES)}'.",
        )
    return recipe


def load_grid(name_or_path: str | Path = "ablation_135m", profile: str = "auto") -> list[Cell]:
    """The cells of a sweep grid (a name in ``recipes/`` or a YAML path) for one profile.

    ``profile="smoke"`` takes the file's ``smoke`` block (keys it leaves out come from ``grid``);
    any other profile (``single_gpu``, ``paper``; ``auto`` picks one for this machine) takes
    ``grid``. Cells come in order of learning rate, then batch size, then seed. A bad value (not
    positive, an empty list, an unknown key or metric) raises :class:`SweepError` naming the file
    and the key.
    """
    from .profiles import PROFILES, auto_profile_name

    path = grid_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepError(path, None, f"is not valid YAML ({err}).", "check indentation and colons.") from None
    if not isinstance(data, Mapping):
        raise SweepError(path, None, f"should be a mapping of keys to values, got {type(data).__name__}.")
    if data.get("kind") != GRID_KIND:
        raise SweepError(
            path,
            "kind",
            f"is {data.get('kind')!r}, not '{GRID_KIND}': this is not a sweep grid.",
            f"add 'kind: {GRID_KIND}' (a training recipe is loaded with load_recipe).",
        )
    for key in data:
        if key not in _TOP_KEYS:
            raise SweepError(
                path,
                key,
                "is not a key of a sweep grid." + _closest(key, _TOP_KEYS),
                f"use {', '.join(_TOP_KEYS)}.",
            )
    for key in ("base", "grid"):
        if key not in data:
            raise SweepError(path, key, "is missing.", f"add a '{key}:' block.")
    name = data.get("name") or path.stem
    if not isinstance(name, str):
        raise SweepError(path, "name", f"must be a word, got {name!r}.")

    profile_name = auto_profile_name() if profile == "auto" else str(profile)
    if profile_name not in PROFILES:
        raise SweepError(
            path,
            None,
            f"unknown profile {profile!r}." + _closest(profile_name, PROFILES),
            f"use 'auto' or one of {', '.join(PROFILES)}.",
        )
    base = _base_recipe(data["base"], path)
    block = _check_block(data["grid"], path, "grid", _REQUIRED_BLOCK_KEYS)
    smoke = _check_block(data["smoke"], path, "smoke", ()) if "smoke" in data else None
    where = "grid"
    if profile_name == "smoke":
        if smoke is None:
            raise SweepError(path, "smoke", "is missing: the smoke profile needs its own small grid.")
        block.update(smoke)
        where = "smoke"

    def keyed(key: str) -> str:  # where a merged value came from, for messages
        return where if where == "smoke" and key in data["smoke"] else "grid"

    lrs = _values(block, path, keyed("learning_rates"), "learning_rates", _positive_number)
    sizes = _values(block, path, keyed("effective_batch_sizes"), "effective_batch_sizes", _positive_int)
    seeds = _values(block, path, keyed("seeds"), "seeds", _non_negative_int)
    metrics = _metrics(block, path, keyed("metrics"), base.stage)
    evaluate = block.get("evaluate", False)
    if not isinstance(evaluate, bool):
        raise SweepError(path, f"{keyed('evaluate')}.evaluate", f"must be true or false, got {evaluate!r}.")
    model = block.get("model") or base.model
    if not isinstance(model, str):
        raise SweepError(path, f"{keyed('model')}.model", f"must be a model name or null, got {model!r}.")
    caps = {}
    for key in _SIZE_KEYS:
        value = block.get(key)
        caps[key] = None if value is None else _positive_int(value, path, f"{keyed(key)}.{key}")
    if block.get("eval_samples") is not None:
        caps["eval_samples"] = _positive_int(
            block["eval_samples"], path, f"{keyed('eval_samples')}.eval_samples"
        )
    return [
        Cell(
            lr=lr,
            effective_batch_size=bs,
            seed=seed,
            profile=profile_name,
            sweep=name,
            model=model,
            metrics=metrics,
            evaluate=evaluate,
            base=base,
            **caps,
        )
        for lr in lrs
        for bs in sizes
        for seed in seeds
    ]


# --- running -----------------------------------------------------------------------------------


@dataclass
class CellResult:
    """What one cell produced: its scores and how much training went into them.

    ``metrics``: label -> value (``"eval_loss"``, ``"ARC (Average)"``...). ``eval_loss`` is also
    added to ``metrics`` when given alone. ``wall_seconds`` defaults to the time ``run_cell`` took.
    ``stderr``, ``n`` and ``metric_names`` (the row's ``metric`` field) are optional, per label.
    """

    metrics: dict[str, float]
    steps: int | None = None
    tokens_seen: int | None = None
    train_loss: float | None = None
    eval_loss: float | None = None
    wall_seconds: float | None = None
    stderr: dict[str, float] = field(default_factory=dict)
    n: dict[str, int] = field(default_factory=dict)
    metric_names: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.metrics = dict(self.metrics)
        if self.eval_loss is not None and EVAL_LOSS not in self.metrics:
            self.metrics[EVAL_LOSS] = self.eval_loss
        if self.eval_loss is None and EVAL_LOSS in self.metrics:
            self.eval_loss = self.metrics[EVAL_LOSS]


def as_cell_result(value: Any) -> CellResult:
    """A :class:`CellResult` from what a ``run_cell`` returned: a CellResult, ``{label: value}``, or rows.

    Rows are mappings with ``benchmark`` and ``value`` (and optionally ``metric``, ``stderr``, ``n``),
    such as :attr:`smoltulu_utils.evaluation.Evaluation.rows`.
    """
    if isinstance(value, CellResult):
        return value
    if isinstance(value, Mapping):
        return CellResult(metrics=dict(value))
    if isinstance(value, list | tuple) and all(isinstance(row, Mapping) for row in value):
        parts: dict[str, dict[str, Any]] = {"metrics": {}, "stderr": {}, "n": {}, "metric_names": {}}
        for row in value:
            label = str(row["benchmark"])
            parts["metrics"][label] = row["value"]
            for part, key in (("stderr", "stderr"), ("n", "n"), ("metric_names", "metric")):
                if row.get(key) is not None:
                    parts[part][label] = row[key]
        return CellResult(**parts)
    raise TypeError(
        f"run_cell returned {type(value).__name__}; return a CellResult, a mapping of metric -> value, "
        "or a list of result rows"
    )


def _finite(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _count(value: Any) -> int | None:
    number = _finite(value)
    return int(number) if number is not None else None


def cell_rows(
    cell: Cell, result: CellResult, *, stage: str = "sft", model: str | None = None, wall_seconds: float = 0.0
) -> list[dict[str, Any]]:
    """The rows a finished cell adds to the store: one per finite metric, then the ``cell_complete`` marker.

    Every row carries the cell's settings (sweep, lr, effective_batch_size, ratio, seed, profile) and
    steps, tokens_seen, wall_seconds, train_loss and eval_loss. Metrics that are not finite numbers
    (a diverged run's NaN loss) get no row; the marker lists them under ``non_finite``.
    """
    wall = _finite(result.wall_seconds)
    settings = {
        **cell.settings(),
        "steps": _count(result.steps),
        "tokens_seen": _count(result.tokens_seen),
        "wall_seconds": round(wall if wall is not None else wall_seconds, 3),
        "train_loss": _finite(result.train_loss),
        "eval_loss": _finite(result.eval_loss),
    }
    label = model or cell.model
    rows, non_finite = [], []
    for metric, raw in result.metrics.items():
        value = _finite(raw)
        if value is None:
            non_finite.append(str(metric))
            continue
        row = {
            "run_id": cell.run_id,
            "stage": stage,
            "model": label,
            "benchmark": str(metric),
            "metric": result.metric_names.get(metric)
            or ("loss" if lower_is_better(str(metric)) else "score"),
            "value": value,
            "settings": settings,
        }
        stderr = _finite(result.stderr.get(metric))
        if stderr is not None and stderr >= 0:
            row["stderr"] = stderr
        n = _count(result.n.get(metric))
        if n is not None and n >= 0:
            row["n"] = n
        rows.append(row)
    marker = {
        "run_id": cell.run_id,
        "stage": stage,
        "model": label,
        "benchmark": MARKER,
        "metric": "rows",
        "value": len(rows),
        "settings": {**settings, "metrics": [r["benchmark"] for r in rows], "non_finite": non_finite},
    }
    return [*rows, marker]


def _cell_key(cell: Cell, model: str | None) -> tuple[Any, ...]:
    return (cell.run_id, model or cell.model, cell.profile, cell.sweep)


def completed_cells(store: ResultsStore, stage: str = "sft") -> set[tuple[Any, ...]]:
    """``(run_id, model, profile, sweep)`` of every cell whose ``cell_complete`` marker is in ``store``."""
    return store.done_keys(
        "run_id", "model", "settings.profile", "settings.sweep", stage=stage, benchmark=MARKER
    )


@dataclass
class SweepReport:
    """What :func:`run_sweep` did: the run ids it completed, skipped (already done) and saw fail."""

    total: int
    completed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # run_id -> "ErrorType: message"
    non_finite: dict[str, list[str]] = field(default_factory=dict)  # run_id -> metrics without a value
    seconds: float = 0.0
    store: Path | None = None

    @property
    def ok(self) -> bool:
        """True when no cell failed."""
        return not self.failed

    def __str__(self) -> str:
        text = (
            f"sweep of {self.total} cells: {len(self.completed)} run, {len(self.skipped)} already done, "
            f"{len(self.failed)} failed in {self.seconds:.1f} s"
        )
        if self.store is not None:
            text += f" -> {self.store}"
        for run_id, error in self.failed.items():
            text += f"\n  failed {run_id}: {error}"
        for run_id, metrics in self.non_finite.items():
            text += f"\n  no finite value for {', '.join(metrics)} in {run_id} (diverged?)"
        return text


def run_sweep(
    cells: Iterable[Cell],
    run_cell: Callable[[Cell], Any] | None = None,
    store: ResultsStore | str | Path | None = None,
    *,
    stage: str | None = None,
    model: str | None = None,
    progress: bool = True,
) -> SweepReport:
    """Run ``cells`` one at a time through ``run_cell`` and append their rows to ``store``.

    ``run_cell(cell)`` returns a :class:`CellResult`, a mapping ``{metric: value}`` or a list of
    rows (None: :func:`train_and_evaluate`). ``store``: a :class:`ResultsStore` or its path (None:
    the default store). ``stage`` labels the rows (None: the cells' stage, from their base recipe).
    ``model`` labels the rows (None: each cell's ``model``).

    A cell whose ``cell_complete`` marker is already in the store for the same run id, model,
    profile and sweep is skipped. A finished cell's rows are written in one atomic append, the
    marker last, so a sweep killed at any moment resumes where it stopped and never writes a cell
    twice. A cell that raises is logged, recorded as a ``cell_failed`` row, counted in the report,
    and the sweep goes on (the next run retries it). A tqdm bar shows progress over the cells.
    """
    cells = list(cells)
    if stage is None:  # the cells' own stage (their base recipe's), "sft" for bare cells
        stages = {cell.stage for cell in cells}
        if len(stages) > 1:
            raise SweepError(None, "stage", f"the cells train several stages ({sorted(stages)}).",
                             "run one sweep per stage.")  # fmt: skip
        stage = stages.pop() if stages else "sft"
    run_cell = run_cell or train_and_evaluate
    if not isinstance(store, ResultsStore):
        store = ResultsStore(store)
    report = SweepReport(total=len(cells), store=store.path)
    done = completed_cells(store, stage)
    start = time.perf_counter()
    sweeps = sorted({cell.sweep for cell in cells})
    bar = tqdm(cells, desc=f"sweep {', '.join(sweeps)}", unit="cell", disable=not progress)
    for cell in bar:
        key = _cell_key(cell, model)
        if key in done:
            report.skipped.append(cell.run_id)
            continue
        bar.set_postfix_str(f"{cell.run_id}; {len(report.failed)} failed", refresh=False)
        began = time.perf_counter()
        try:
            result = as_cell_result(run_cell(cell))
            rows = cell_rows(cell, result, stage=stage, model=model, wall_seconds=time.perf_counter() - began)
            store.append(rows)
        except Exception as err:  # a failed cell must not stop the sweep
            _record_failure(store, cell, err, stage, model, time.perf_counter() - began, report)
            continue
        done.add(key)
        report.completed.append(cell.run_id)
        missing = rows[-1]["settings"]["non_finite"]
        if missing:
            report.non_finite[cell.run_id] = missing
            logger.warning("cell %s: no finite value for %s", cell.run_id, ", ".join(missing))
    bar.close()
    report.seconds = time.perf_counter() - start
    if report.failed:
        logger.warning("%s", report)
    return report


def _record_failure(
    store: ResultsStore,
    cell: Cell,
    err: Exception,
    stage: str,
    model: str | None,
    wall_seconds: float,
    report: SweepReport,
) -> None:
    message = f"{type(err).__name__}: {err}"
    logger.error("cell %s failed after %.1f s: %s", cell.run_id, wall_seconds, message)
    logger.debug("cell %s traceback:\n%s", cell.run_id, traceback.format_exc())
    report.failed[cell.run_id] = message
    row = {
        "run_id": cell.run_id,
        "stage": stage,
        "model": model or cell.model,
        "benchmark": FAILED,
        "metric": "error",
        "value": 1,
        "settings": {
            **cell.settings(),
            "wall_seconds": round(wall_seconds, 3),
            "error": message[:2000],
            "traceback": traceback.format_exc()[-4000:],
        },
    }
    try:
        store.append(row)
    except Exception as write_error:  # the report still counts the failure
        logger.error("could not record the failure of %s: %s", cell.run_id, write_error)


def _final_loss(history: Any) -> float | None:
    """The last loss of a training history (numbers, ``(step, loss)`` pairs or dicts with ``loss``)."""
    if history is None:
        return None
    if not isinstance(history, Sequence) or isinstance(history, str):
        return _finite(history)
    for item in reversed(history):
        if isinstance(item, Mapping):
            value = item.get("loss", item.get("train_loss"))
        elif isinstance(item, Sequence) and not isinstance(item, str) and item:
            value = item[-1]
        else:
            value = item
        if _finite(value) is not None:
            return _finite(value)
    return None


#: Seed of the split that holds out the eval rows: fixed, so every cell is scored on the same rows.
EVAL_SPLIT_SEED = 0


def split_rows(plan: Plan, eval_samples: int) -> tuple[Any, Any]:
    """``(train_rows, eval_rows)`` for a cell's plan: the profile's data with ``eval_samples`` rows held out.

    The held-out rows depend only on the data and :data:`EVAL_SPLIT_SEED`, never on the cell, so the
    eval losses of a sweep compare; the training rows are the rest, at most ``plan.max_train_samples``.
    """
    from .data import load_rows
    from .profiles import data_mirror

    cap = plan.max_train_samples
    rows = load_rows(
        plan.recipe.dataset,
        mirror=data_mirror(plan.profile),
        limit=cap + eval_samples if cap else None,
        validate=False,
    )
    if len(rows) <= eval_samples:
        raise SweepError(
            None,
            "eval_samples",
            f"holds out {eval_samples} rows but the data has only {len(rows)}.",
            "lower eval_samples in the grid.",
        )
    parts = rows.train_test_split(test_size=eval_samples, seed=EVAL_SPLIT_SEED, shuffle=True)
    train = parts["train"]
    if cap and len(train) > cap:
        train = train.select(range(cap))
    return train, parts["test"]


def _stage_trainer(stage: str) -> Callable[..., Any]:
    """The ``train_<stage>`` function of a stage from the stage table, imported on use (the sweep module
    loads without them)."""
    return get_stage(stage).train_function()


def train_and_evaluate(cell: Cell, output_dir: str | Path | None = None) -> CellResult:
    """The default ``run_cell``: train the cell with its stage's trainer, then score it.

    SFT cells run :func:`smoltulu_utils.sft.train_sft`, DPO cells :func:`smoltulu_utils.dpo.train_dpo`
    (the reference log-probs are computed by the first cell and read from the cache by every other,
    since they share the starting model and data), reward-model cells
    :func:`smoltulu_utils.reward_model.train_rm`. ``eval_samples`` rows of the training data are held
    out (:func:`split_rows`) and give the eval loss (SFT: mean NLL per trained token; DPO and RM: the
    stage's loss on the held-out pairs) and, for DPO and RM, the held-out pair accuracy. The checkpoint
    goes to ``output_dir`` (default ``runs_dir()/sweeps/<sweep>/<profile>/<run_id>``). When the cell's
    ``evaluate`` is on, its benchmarks are run with :func:`smoltulu_utils.evaluation.evaluate` on the
    saved checkpoint (``eval_limit`` items each).
    """
    plan = cell.plan()
    out = Path(output_dir) if output_dir else runs_dir() / "sweeps" / cell.sweep / cell.profile / cell.run_id
    train_rows, eval_rows = split_rows(plan, cell.eval_samples)
    trained = _stage_trainer(cell.stage)(plan, out, rows=train_rows, eval_rows=eval_rows, verbose=False)
    final = getattr(trained, "final_train_loss", None)
    tokens = getattr(trained, "trained_tokens", None)
    result = CellResult(
        metrics={EVAL_LOSS: getattr(trained, "eval_loss", None)},  # None or NaN: listed as non-finite
        steps=getattr(trained, "steps", None),
        tokens_seen=tokens if tokens is not None else getattr(trained, "tokens_seen", None),
        train_loss=_finite(final) if final is not None else _final_loss(getattr(trained, "train_loss", None)),
        eval_loss=_finite(getattr(trained, "eval_loss", None)),
        wall_seconds=getattr(trained, "wall_seconds", None),
        metric_names={EVAL_LOSS: "loss_per_token" if cell.stage == "sft" else f"{cell.stage}_loss"},
    )
    if PAIR_ACCURACY in cell.metrics:
        result.metrics[PAIR_ACCURACY] = getattr(trained, "eval_accuracy", None)
        result.metric_names[PAIR_ACCURACY] = "accuracy"
    if cell.benchmarks:
        from .evaluation import evaluate

        checkpoint = getattr(trained, "output_dir", None) or out
        scored = evaluate(
            str(checkpoint),
            benchmarks=cell.benchmarks,
            limit=plan.eval_limit,
            max_gen_toks=cell.profile_spec().eval_max_gen_toks,
            model_name=cell.model,
            run_id=cell.run_id,
            settings=cell.settings(),
        )
        scores = as_cell_result(scored.rows)
        result.metrics.update(scores.metrics)
        result.stderr.update(scores.stderr)
        result.n.update(scores.n)
        result.metric_names.update(scores.metric_names)
    return result


# --- reading back ------------------------------------------------------------------------------

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


def sweep_frame(
    store: ResultsStore | str | Path | None = None,
    stage: str = "sft",
    *,
    sweep: str | None = None,
    profile: str | None = None,
) -> pd.DataFrame:
    """The sweep's scores from the results store: one row per cell x metric.

    Columns: run_id, sweep, profile, model, seed, metric (the label: ``eval_loss``, ``ARC (Average)``),
    score_metric (the row's metric field), value, stderr, n, lr, bs (effective batch size), ratio
    (LR / BS), steps, tokens_seen, wall_seconds, train_loss, eval_loss, created_at. Only rows with a
    ``sweep`` setting count; bookkeeping rows are left out; a cell written twice keeps its newest rows.
    """
    import pandas as pd

    if not isinstance(store, ResultsStore):
        store = ResultsStore(store)
    records = []
    for row in store.rows():
        settings = row.get("settings") or {}
        if row["stage"] != stage or "sweep" not in settings or row["benchmark"] in BOOKKEEPING:
            continue
        if (sweep is not None and settings["sweep"] != sweep) or (
            profile is not None and settings.get("profile") != profile
        ):
            continue
        records.append(
            {
                "run_id": row["run_id"],
                "sweep": settings["sweep"],
                "profile": settings.get("profile"),
                "model": row["model"],
                "seed": settings.get("seed"),
                "metric": row["benchmark"],
                "score_metric": row["metric"],
                "value": float(row["value"]),
                "stderr": row.get("stderr"),
                "n": row.get("n"),
                "lr": settings.get("lr"),
                "bs": settings.get("effective_batch_size"),
                "ratio": settings.get("ratio"),
                "steps": settings.get("steps"),
                "tokens_seen": settings.get("tokens_seen"),
                "wall_seconds": settings.get("wall_seconds"),
                "train_loss": settings.get("train_loss"),
                "eval_loss": settings.get("eval_loss"),
                "created_at": row.get("created_at"),
            }
        )
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


__all__ = [
    "BOOKKEEPING",
    "EVAL_LOSS",
    "FAILED",
    "GRID_KIND",
    "MARKER",
    "Cell",
    "CellResult",
    "SweepError",
    "SweepReport",
    "as_cell_result",
    "cell_rows",
    "completed_cells",
    "covers_paper_range",
    "format_number",
    "grid_path",
    "load_grid",
    "lower_is_better",
    "paper_ratio_range",
    "ratio_span",
    "run_sweep",
    "split_rows",
    "sweep_frame",
    "train_and_evaluate",
]
