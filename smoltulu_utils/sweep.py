"""The learning-rate x batch-size sweep of the paper's Figure 1: a grid of training cells, run and resumed.

The paper's grid is not recoverable, so the kit declares one in ``recipes/ablation_135m.yaml``
(spanning at least the LR/BS ratios of Table 2); ``ablation_dpo_135m`` and ``ablation_rm_135m`` ask the
same question of DPO and the reward model::

    cells = load_grid("ablation_135m", profile="smoke")      # frozen Cells: lr, batch, seed, ratio, run_id
    report = run_sweep(cells, train_and_evaluate, ResultsStore())
    plotting.plot_lr_bs_contours(results.sweep_frame(ResultsStore()))

A cell's rows (one per metric, then a ``cell_complete`` marker) go to the results store in one atomic
append, so a killed sweep leaves each cell whole or absent and a rerun skips the finished ones. A cell
that raises is recorded as a ``cell_failed`` row and retried by the next run.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from .errors import FileKeyError
from .paths import runs_dir
from .recipes import GRID_KIND, Checker, Recipe, RecipeError, read_yaml, recipe_from_dict
from .results import CELL_COMPLETE, CELL_FAILED, ResultsStore, lower_is_better, make_row
from .stages import get_stage, sweep_stages

if TYPE_CHECKING:
    from .profiles import Plan, Profile

logger = logging.getLogger(__name__)

#: The metric every cell reports: the stage's loss on held-out data after training (lower is better).
EVAL_LOSS = "eval_loss"
#: Held-out preference-pair accuracy of a DPO (implicit reward) or reward-model cell (higher is better).
PAIR_ACCURACY = "pair_accuracy"
#: The stages a grid can sweep, and the recipe class of each (the stage table's sweepable stages).
SWEEP_STAGES: dict[str, type[Recipe]] = sweep_stages()
#: Metrics that are not benchmarks, and the stages that report them.
STAGE_METRICS = {EVAL_LOSS: ("sft", "dpo", "rm"), PAIR_ACCURACY: ("dpo", "rm")}

_TOP_KEYS = ("kind", "name", "figure", "base", "grid", "smoke")
_SIZE_KEYS = ("max_steps", "max_length", "max_train_samples", "eval_limit")
_REQUIRED_BLOCK_KEYS = ("learning_rates", "effective_batch_sizes", "seeds", "metrics")
_BLOCK_KEYS = (*_REQUIRED_BLOCK_KEYS, "model", "evaluate", *_SIZE_KEYS, "eval_samples")
_GRID_SET_KEYS = ("learning_rate", "effective_batch_size", "seed")


class SweepError(FileKeyError):
    """A sweep grid or cell that cannot be used; the message names the file, the key and the fix."""

    unnamed = "<grid>"


def format_number(value: float) -> str:
    """A learning rate as it appears in a run id: ``3e-05``, ``3.1e-06``, ``0.0001`` -> ``1e-04``."""
    mantissa, exponent = f"{float(value):.6e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{exponent}"


# --- cells -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One point of the grid: a learning rate, an effective batch size and a seed, with how to run it.

    ``ratio`` (LR / BS) and ``run_id`` (``lr3e-05_bs16_s0``) are derived. ``model``: a Hub id, ``"tiny"``
    or ``"bundled"``; the size caps override the profile's (None keeps it); ``eval_samples`` training
    rows are held out for the eval loss, the same rows for every cell.
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
        check = Checker(None, SweepError)
        for key, kind, least in (
            ("lr", float, check.positive),
            ("effective_batch_size", int, check.positive),
            ("seed", int, check.non_negative),
            ("eval_samples", int, check.positive),
        ):
            object.__setattr__(self, key, least(key, check.typed(key, getattr(self, key), kind)))
        object.__setattr__(self, "metrics", tuple(self.metrics))
        object.__setattr__(self, "ratio", self.lr / self.effective_batch_size)
        run_id = f"lr{format_number(self.lr)}_bs{self.effective_batch_size}_s{self.seed}"
        object.__setattr__(self, "run_id", run_id)

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
            "learning_rate": self.lr,
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


@dataclass(frozen=True)
class SweepGrid:
    """A grid file read for one profile: the base recipe, the values the cells take, what they share.

    ``shared``: the :class:`Cell` fields every cell of the grid has (model, metrics, evaluate, the size
    caps and ``eval_samples`` the file gives). The checks are the recipes' (:class:`recipes.Checker`),
    raising :class:`SweepError` with the file and the key (``grid.learning_rates[0]``, ``base.stage``).
    """

    path: Path
    name: str
    profile: str
    base: Recipe
    learning_rates: tuple[float, ...]
    effective_batch_sizes: tuple[int, ...]
    seeds: tuple[int, ...]
    shared: Mapping[str, Any]

    @classmethod
    def load(cls, name_or_path: str | Path = "ablation_135m", profile: str = "auto") -> SweepGrid:
        """Read and check a grid (a name in ``recipes/`` or a YAML path) for ``profile``.

        ``profile="smoke"`` takes the file's ``smoke`` block (keys it leaves out come from ``grid``);
        any other profile (``single_gpu``, ``paper``; ``auto`` picks one for this machine) takes ``grid``.
        """
        from .profiles import PROFILES, auto_profile_name

        path, data = read_yaml(name_or_path, SweepError)
        check = Checker(path, SweepError)
        check.mapping(None, data)
        if data.get("kind") != GRID_KIND:
            check.fail(
                "kind",
                f"is {data.get('kind')!r}, not '{GRID_KIND}': this is not a sweep grid.",
                f"add 'kind: {GRID_KIND}' (a training recipe is loaded with load_recipe).",
            )
        check.keys(data, _TOP_KEYS, ("base", "grid"), "a sweep grid")
        name = check.typed("name", data.get("name") or path.stem, str)
        profile_name = auto_profile_name() if profile == "auto" else str(profile)
        check.choice(None, profile_name, PROFILES, "profile", f"use 'auto' or one of {', '.join(PROFILES)}.")
        base = _base_recipe(check, data["base"])
        for where in ("grid", "smoke"):
            if where in data:
                check.mapping(where, data[where])
                required = _REQUIRED_BLOCK_KEYS if where == "grid" else ()
                check.keys(data[where], _BLOCK_KEYS, required, f"the '{where}' block", prefix=f"{where}.")
        # key -> (its name in messages, its value): the smoke block's keys replace the grid's
        block = {key: (f"grid.{key}", value) for key, value in data["grid"].items()}
        if profile_name == "smoke":
            if "smoke" not in data:
                check.fail(
                    "smoke",
                    "is missing: the smoke profile needs its own small grid.",
                    "add a 'smoke:' block.",
                )
            block.update({key: (f"smoke.{key}", value) for key, value in data["smoke"].items()})

        def listed(key: str, kind: type, least: Callable) -> tuple[Any, ...]:
            where, raw = block[key]
            if not isinstance(raw, list | tuple):
                raw = [raw] if raw is not None and not isinstance(raw, Mapping) else None
            if not raw:
                check.fail(where, "is empty: the grid needs at least one value.", "list one or more values.")
            values = tuple(
                least(f"{where}[{i}]", check.typed(f"{where}[{i}]", v, kind)) for i, v in enumerate(raw)
            )
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                check.fail(where, f"repeats {repeated}.", "list each value once.")
            return values

        lrs = listed("learning_rates", float, check.positive)
        sizes = listed("effective_batch_sizes", int, check.positive)
        seeds = listed("seeds", int, check.non_negative)
        shared: dict[str, Any] = {"metrics": _metrics(check, *block["metrics"], base.stage)}
        where, evaluate = block.get("evaluate", ("grid.evaluate", False))
        shared["evaluate"] = check.typed(where, evaluate, bool)
        where, model = block.get("model", ("grid.model", None))
        shared["model"] = check.typed(where, model or base.model, str)
        for key in (*_SIZE_KEYS, "eval_samples"):
            where, value = block.get(key, (key, None))
            if value is not None:
                shared[key] = check.positive(where, check.typed(where, value, int))
        return cls(path, name, profile_name, base, lrs, sizes, seeds, shared)

    def cells(self) -> list[Cell]:
        """The grid's cells, in order of learning rate, then batch size, then seed."""
        return [
            Cell(lr, bs, seed, profile=self.profile, sweep=self.name, base=self.base, **self.shared)
            for lr in self.learning_rates
            for bs in self.effective_batch_sizes
            for seed in self.seeds
        ]


def _metrics(check: Checker, where: str, raw: Any, stage: str) -> tuple[str, ...]:
    from .paper import BENCHMARKS, canonical_benchmark

    if not isinstance(raw, list | tuple) or not raw:
        check.fail(where, f"must be a non-empty list, got {raw!r}.", f"list '{EVAL_LOSS}' first.")
    labels = []
    for i, item in enumerate(raw):
        key = f"{where}[{i}]"
        item = check.typed(key, item, str)
        if item in STAGE_METRICS:
            if stage not in STAGE_METRICS[item]:
                check.fail(key, f"'{item}' is not reported by a {stage} cell.",
                           f"use it with stage {' or '.join(STAGE_METRICS[item])}, or remove it.")  # fmt: skip
            labels.append(item)
            continue
        try:
            label = canonical_benchmark(item)
        except (KeyError, ValueError):
            label = None
        if label not in BENCHMARKS:  # fails, naming the closest metric or benchmark
            fix = f"use {', '.join(map(repr, STAGE_METRICS))} or one of the paper's benchmarks: {', '.join(BENCHMARKS)}."
            check.choice(key, item, (*STAGE_METRICS, *BENCHMARKS), "metric", fix)
        labels.append(label)
    if EVAL_LOSS not in labels:
        check.fail(where, f"must include '{EVAL_LOSS}' (every cell reports it).", f"add '{EVAL_LOSS}'.")
    if len(set(labels)) != len(labels):
        check.fail(where, f"lists a metric twice: {labels}.", "list each metric once.")
    return tuple(labels)


def _base_recipe(check: Checker, base: Any) -> Recipe:
    check.mapping("base", base)
    for key in _GRID_SET_KEYS:
        if key in base:
            check.fail(f"base.{key}", "is set by the grid, cell by cell.", "remove it from 'base'.")
    try:
        recipe = recipe_from_dict(
            {**base, "learning_rate": 1e-5, "effective_batch_size": 1, "seed": 0}, check.file
        )
    except RecipeError as err:  # the same message, its key inside the base block
        prefix = f"{err.file}: key '{err.key}': " if err.key else f"{err.file}: "
        check.fail(f"base.{err.key}" if err.key else "base", str(err).removeprefix(prefix))
    check.choice("base.stage", recipe.stage, SWEEP_STAGES, "sweep stage")
    return recipe


def load_grid(name_or_path: str | Path = "ablation_135m", profile: str = "auto") -> list[Cell]:
    """The cells of a sweep grid (a name in ``recipes/`` or a YAML path) for one profile (see :class:`SweepGrid`)."""
    return SweepGrid.load(name_or_path, profile).cells()


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

    Every row carries :meth:`Cell.settings` and the training numbers. A metric that is not finite (a
    diverged run's NaN loss) gets no row; the marker lists it under ``non_finite``.
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
        name = result.metric_names.get(metric) or ("loss" if lower_is_better(str(metric)) else "score")
        stderr = _finite(result.stderr.get(metric))
        n = _count(result.n.get(metric))
        extra = {
            "stderr": stderr if stderr is not None and stderr >= 0 else None,
            "n": n if n is not None and n >= 0 else None,
        }
        rows.append(make_row(cell.run_id, stage, label, str(metric), name, value, settings=settings, **extra))
    marker_settings = {**settings, "metrics": [r["benchmark"] for r in rows], "non_finite": non_finite}
    return [
        *rows,
        make_row(cell.run_id, stage, label, CELL_COMPLETE, "rows", len(rows), settings=marker_settings),
    ]


def _cell_key(cell: Cell, model: str | None) -> tuple[Any, ...]:
    return (cell.run_id, model or cell.model, cell.profile, cell.sweep)


def completed_cells(store: ResultsStore, stage: str = "sft") -> set[tuple[Any, ...]]:
    """``(run_id, model, profile, sweep)`` of every cell whose ``cell_complete`` marker is in ``store``."""
    return store.done_keys(
        "run_id", "model", "settings.profile", "settings.sweep", stage=stage, benchmark=CELL_COMPLETE
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

    ``run_cell(cell)`` returns a :class:`CellResult`, a mapping ``{metric: value}`` or a list of rows
    (None: :func:`train_and_evaluate`). ``stage`` and ``model`` label the rows (None: the cells' own).
    A cell whose ``cell_complete`` marker is in the store (same run id, model, profile and sweep) is
    skipped; a finished cell's rows go in one atomic append, marker last. A cell that raises is
    logged, recorded as a ``cell_failed`` row and counted in the report, and the sweep goes on.
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
            wall = time.perf_counter() - began
            report.failed[cell.run_id] = _record_failure(store, cell, err, stage, model, wall)
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
    store: ResultsStore, cell: Cell, err: Exception, stage: str, model: str | None, wall: float
) -> str:
    """Log a cell's error and append its ``cell_failed`` row (the error in its settings); return the error."""
    message = f"{type(err).__name__}: {err}"
    logger.error("cell %s failed after %.1f s: %s", cell.run_id, wall, message)
    logger.debug("cell %s traceback:\n%s", cell.run_id, traceback.format_exc())
    settings = {**cell.settings(), "wall_seconds": round(wall, 3), "error": message[:2000]}
    settings["traceback"] = traceback.format_exc()[-4000:]
    try:
        store.append(
            make_row(cell.run_id, stage, model or cell.model, CELL_FAILED, "error", 1, settings=settings)
        )
    except Exception as write_error:  # the report still counts the failure
        logger.error("could not record the failure of %s: %s", cell.run_id, write_error)
    return message


#: Seed of the split that holds out the eval rows: fixed, so every cell is scored on the same rows.
EVAL_SPLIT_SEED = 0


def split_rows(plan: Plan, eval_samples: int) -> tuple[Any, Any]:
    """``(train_rows, eval_rows)`` for a cell's plan: the profile's data with ``eval_samples`` rows held out.

    The held-out rows depend only on the data and :data:`EVAL_SPLIT_SEED`, so every cell is scored on the
    same rows; the training rows are the rest, at most ``plan.max_train_samples``.
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
    """The stage table's ``train_<stage>`` function, imported on use (the sweep module loads without it)."""
    return get_stage(stage).train_function()


def train_and_evaluate(cell: Cell, output_dir: str | Path | None = None) -> CellResult:
    """The default ``run_cell``: train the cell with its stage's trainer, then score it.

    The held-out rows (:func:`split_rows`) give the eval loss (SFT: mean NLL per trained token; DPO and
    RM: the stage's loss) and, for DPO and RM, the pair accuracy. The checkpoint goes to ``output_dir``
    (default ``runs_dir()/sweeps/<sweep>/<profile>/<run_id>``); with ``evaluate`` on, the cell's
    benchmarks are run on it.
    """
    plan = cell.plan()
    out = Path(output_dir) if output_dir else runs_dir() / "sweeps" / cell.sweep / cell.profile / cell.run_id
    train_rows, eval_rows = split_rows(plan, cell.eval_samples)
    trained = _stage_trainer(cell.stage)(plan, out, rows=train_rows, eval_rows=eval_rows, verbose=False)
    tokens = getattr(trained, "trained_tokens", None)
    result = CellResult(
        metrics={EVAL_LOSS: getattr(trained, "eval_loss", None)},  # None or NaN: listed as non-finite
        steps=getattr(trained, "steps", None),
        tokens_seen=tokens if tokens is not None else getattr(trained, "tokens_seen", None),
        train_loss=_finite(getattr(trained, "final_train_loss", None)),
        eval_loss=_finite(getattr(trained, "eval_loss", None)),
        wall_seconds=getattr(trained, "wall_seconds", None),
        metric_names={EVAL_LOSS: "loss_per_token" if cell.stage == "sft" else f"{cell.stage}_loss"},
    )
    if PAIR_ACCURACY in cell.metrics:
        result.metrics[PAIR_ACCURACY] = getattr(trained, "eval_accuracy", None)
        result.metric_names[PAIR_ACCURACY] = "accuracy"
    if cell.benchmarks:
        from .evaluation import evaluate

        scored = evaluate(
            str(getattr(trained, "output_dir", None) or out),
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
