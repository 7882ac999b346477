"""The LR x batch-size sweep: the grid file, running and resuming cells, and surviving a kill."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
from collections import Counter
from pathlib import Path

import pytest

from smoltulu_utils.errors import KitError
from smoltulu_utils.recipes import SFTRecipe, recipe_path
from smoltulu_utils.results import CELL_COMPLETE, CELL_FAILED, ResultsStore, lower_is_better, sweep_frame
from smoltulu_utils.sweep import (
    EVAL_LOSS,
    Cell,
    CellResult,
    SweepError,
    SweepGrid,
    completed_cells,
    covers_paper_range,
    format_number,
    load_grid,
    paper_ratio_range,
    ratio_span,
    run_sweep,
    train_and_evaluate,
)

GRID = recipe_path("ablation_135m")
FIGURE1 = ("ARC (Average)", "GSM8K (5-shot)", "HellaSwag", "IFEval (Average)")
METRICS = (EVAL_LOSS, *FIGURE1)


def synthetic_scores(cell: Cell) -> dict[str, float]:
    """Scores with the paper's structure: reasoning peaks at a high LR/BS, pattern tasks at a low one."""
    r = math.log10(cell.ratio)
    b = math.log2(cell.effective_batch_size)
    return {
        EVAL_LOSS: 2.0 + 0.1 * (r + 6.5) ** 2 + 0.01 * b + 0.001 * cell.seed,
        "ARC (Average)": 40.0 - 2.0 * (r + 5.5) ** 2 + 0.2 * b,
        "GSM8K (5-shot)": 10.0 - 1.5 * (r + 5.0) ** 2,
        "HellaSwag": 42.0 - 2.0 * (r + 7.0) ** 2,
        "IFEval (Average)": 30.0 - 2.5 * (r + 7.2) ** 2,
    }


def small_grid(seeds=(0,)) -> list[Cell]:
    return [
        Cell(lr, bs, seed=seed, profile="smoke", metrics=METRICS)
        for lr in (1e-6, 1e-5, 1e-4, 1e-3)
        for bs in (4, 16, 64)
        for seed in seeds
    ]


class Fake:
    """A run_cell that counts its calls and can fail on chosen cells."""

    def __init__(self, fail: set[str] = frozenset()):
        self.calls: list[str] = []
        self.fail = set(fail)

    def __call__(self, cell: Cell) -> CellResult:
        self.calls.append(cell.run_id)
        if cell.run_id in self.fail:
            raise RuntimeError(f"out of memory in {cell.run_id}")
        scores = synthetic_scores(cell)
        return CellResult(
            metrics=scores,
            steps=10,
            tokens_seen=1000 * cell.effective_batch_size,
            train_loss=scores[EVAL_LOSS] - 0.1,
            eval_loss=scores[EVAL_LOSS],
            metric_names={label: "acc" for label in FIGURE1},
        )


# --- the grid file -------------------------------------------------------------------------------


def test_the_main_grid_loads_as_frozen_cells():
    cells = load_grid("ablation_135m", profile="single_gpu")
    assert len(cells) == 36
    assert len({c.run_id for c in cells}) == 36
    first = cells[0]
    assert (first.lr, first.effective_batch_size, first.seed) == (1e-6, 4, 0)
    assert first.run_id == "lr1e-06_bs4_s0" and first.ratio == pytest.approx(1e-6 / 4)
    assert first.profile == "single_gpu" and first.sweep == "ablation_135m"
    assert first.model == "HuggingFaceTB/SmolLM2-135M"
    assert first.metrics == METRICS and first.evaluate and first.benchmarks == FIGURE1
    with pytest.raises(dataclasses.FrozenInstanceError):
        first.lr = 1.0
    assert {c.lr for c in cells} == {1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4}
    assert {c.effective_batch_size for c in cells} == {4, 8, 16, 32, 64, 128}
    assert load_grid(GRID, profile="paper")[5].run_id == cells[5].run_id  # by path, another profile


def test_the_smoke_grid_is_small_and_quick():
    cells = load_grid("ablation_135m", profile="smoke")
    lrs, sizes = {c.lr for c in cells}, {c.effective_batch_size for c in cells}
    assert len(lrs) >= 3 and len(sizes) >= 3 and len(cells) == len(lrs) * len(sizes)
    assert all(c.model == "tiny" and c.profile == "smoke" for c in cells)
    assert all(c.max_steps <= 5 and c.max_length <= 256 for c in cells)
    assert all(not c.evaluate and c.benchmarks == () and EVAL_LOSS in c.metrics for c in cells)
    # 3 steps of the largest batch, at most 4 sequences of <= 128 tokens per forward pass
    assert sum(c.max_steps * c.effective_batch_size for c in cells) <= 2000


def test_run_ids_are_derived_from_the_values():
    assert Cell(3e-5, 16).run_id == "lr3e-05_bs16_s0"
    assert Cell(3.1e-6, 32, seed=2).run_id == "lr3.1e-06_bs32_s2"
    assert Cell(1e-4, 8).run_id == "lr1e-04_bs8_s0" == Cell(0.0001, 8.0).run_id
    assert Cell("9e-5", 8).lr == 9e-5  # YAML reads 9e-5 as a string
    assert format_number(9.0e-5) == "9e-05"
    assert Cell(3e-5, 16) == Cell(3e-5, 16) and hash(Cell(3e-5, 16)) == hash(Cell(3e-5, 16))
    for bad in ({"lr": 0}, {"lr": -1e-5}, {"lr": float("nan")}, {"effective_batch_size": 0}, {"seed": -1}):
        values = {"lr": 1e-5, "effective_batch_size": 8, **bad}
        with pytest.raises(SweepError, match=next(iter(bad))):
            Cell(**values)


def test_a_cell_becomes_a_recipe_and_a_plan():
    cell = next(c for c in load_grid("ablation_135m", profile="smoke") if c.effective_batch_size == 16)
    recipe = cell.recipe()
    assert isinstance(recipe, SFTRecipe)
    assert (recipe.learning_rate, recipe.effective_batch_size, recipe.seed) == (cell.lr, 16, cell.seed)
    assert recipe.name == cell.run_id and recipe.lr_bs_ratio == pytest.approx(cell.ratio)
    assert recipe.model == "HuggingFaceTB/SmolLM2-135M" and recipe.loss_reduction == "sum"
    plan = cell.plan()
    assert plan.model == "tiny" and plan.max_steps == cell.max_steps and plan.max_length == 128
    assert (
        plan.effective_batch_size == 16
        and plan.per_device_batch_size * plan.gradient_accumulation_steps == 16
    )
    assert plan.lr_bs_ratio == pytest.approx(cell.ratio)
    with pytest.raises(SweepError, match="no base recipe"):
        Cell(1e-5, 8).recipe()


def test_the_grid_spans_the_paper_ratio_range():
    low, high = paper_ratio_range()
    assert low == pytest.approx(2e-6 / 128) and high == pytest.approx(9e-5 / 8)  # Tulu 3 70B, SFT-1130
    assert 1.5e-8 < low < 1.6e-8 and 1.1e-5 < high < 1.2e-5
    for profile in ("single_gpu", "paper", "smoke"):
        cells = load_grid("ablation_135m", profile=profile)
        span = ratio_span(cells)
        assert span[0] <= low and span[1] >= high, (profile, span)
        assert covers_paper_range(cells)
    assert not covers_paper_range([Cell(1e-5, 8), Cell(1e-4, 8)])


def test_every_grid_value_names_its_source():
    text = GRID.read_text()
    assert "not recoverable" in text
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.endswith(":"):
            continue  # comments and block headers
        assert "# " in line, f"no source comment: {line!r}"
        source = line.split("# ", 1)[1]
        assert source.startswith(("kit choice", "Figure 1", "Tulu 3", "Table 2", "paper")), line


def write_grid(tmp_path: Path, old: str, new: str) -> Path:
    text = GRID.read_text()
    assert old in text, old
    path = tmp_path / "grid.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


@pytest.mark.parametrize(
    ("old", "new", "profile", "key", "words"),
    [
        ("[1.0e-6, 3.0e-6,", "[-1.0e-6, 3.0e-6,", "paper", "grid.learning_rates[0]", "positive"),
        ("[4, 8, 16,", "[0, 8, 16,", "paper", "grid.effective_batch_sizes[0]", "positive"),
        ("[1.0e-6, 3.0e-6, 1.0e-5, 3.0e-5, 1.0e-4, 3.0e-4]", "[]", "paper", "grid.learning_rates", "empty"),
        ("[4, 8, 16,", "[4, 4, 16,", "paper", "grid.effective_batch_sizes", "repeats"),
        (
            "  seeds: [0]                       # kit choice: one seed per",
            "  seed: [0]  # kit choice",
            "paper",
            "grid.seed",
            "Did you mean 'seeds'",
        ),
        ("figure: fig01", "figur: fig01", "paper", "figur", "not a key"),
        ("HellaSwag, IFEval", "Winogrande, IFEval", "paper", "grid.metrics[3]", "unknown metric"),
        ("  metrics: [eval_loss, ARC", "  metrics: [ARC", "paper", "grid.metrics", "eval_loss"),
        ("  num_epochs: 2 ", "  num_epochs: 0 ", "paper", "base.num_epochs", "positive"),
        (
            "  packing: true",
            "  learning_rate: 1.0e-5\n  packing: true",
            "paper",
            "base.learning_rate",
            "set by the grid",
        ),
        ("  max_steps: 3 ", "  max_steps: -3 ", "smoke", "smoke.max_steps", "positive"),
        ("  max_steps: 3 ", "  max_step: 3 ", "paper", "smoke.max_step", "Did you mean 'max_steps'"),
        ("[2, 4, 16]", "[2, 4, 2.5]", "smoke", "smoke.effective_batch_sizes[2]", "should be int"),
        ("kind: lr_bs_sweep", "kind: recipe", "paper", "kind", "not a sweep grid"),
    ],
)
def test_bad_grid_values_name_the_file_and_the_key(tmp_path, old, new, profile, key, words):
    path = write_grid(tmp_path, old, new)
    with pytest.raises(KitError) as caught:
        load_grid(path, profile=profile)
    message = str(caught.value)
    assert str(path) in message and f"key '{key}'" in message and words in message, message


def test_a_grid_loads_into_its_values_and_cells():
    grid = SweepGrid.load("ablation_135m", "smoke")
    assert (grid.name, grid.profile, grid.path, grid.base.stage) == ("ablation_135m", "smoke", GRID, "sft")
    assert (
        grid.shared["model"] == "tiny" and grid.shared["max_steps"] == 3 and grid.shared["eval_samples"] == 12
    )
    assert grid.cells() == load_grid("ablation_135m", "smoke")
    assert len(grid.cells()) == len(grid.learning_rates) * len(grid.effective_batch_sizes) * len(grid.seeds)
    with pytest.raises(SweepError, match="no such grid file. Did you mean 'ablation_135m'"):
        SweepGrid.load("ablation_13m")


def test_other_grid_errors(tmp_path):
    with pytest.raises(SweepError, match="no such grid file"):
        load_grid(tmp_path / "missing.yaml")
    with pytest.raises(SweepError, match="not a sweep grid"):
        load_grid("sft_1130")  # a training recipe, not a grid
    with pytest.raises(SweepError, match="unknown profile 'smok'.*Did you mean 'smoke'"):
        load_grid("ablation_135m", profile="smok")
    no_smoke = tmp_path / "no_smoke.yaml"
    no_smoke.write_text(GRID.read_text().split("\nsmoke:")[0])
    assert len(load_grid(no_smoke, profile="paper")) == 36
    with pytest.raises(SweepError, match="key 'smoke'"):
        load_grid(no_smoke, profile="smoke")
    not_yaml = tmp_path / "bad.yaml"
    not_yaml.write_text("kind: [unclosed\n")
    with pytest.raises(SweepError, match="not valid YAML"):
        load_grid(not_yaml)


# --- running the sweep -----------------------------------------------------------------------------


def rows_by_cell(store: ResultsStore) -> dict[str, Counter]:
    out: dict[str, Counter] = {}
    for row in store.rows(strict=True):
        out.setdefault(row["run_id"], Counter())[row["benchmark"]] += 1
    return out


def test_every_cell_is_recorded_once_and_a_rerun_skips_all(tmp_path, capsys):
    store = ResultsStore(tmp_path / "results.jsonl")
    cells = small_grid()
    fake = Fake()
    report = run_sweep(cells, fake, store, progress=True)
    assert "12/12" in capsys.readouterr().err  # the tqdm bar over cells
    assert report.ok and report.completed == [c.run_id for c in cells] and not report.skipped
    assert fake.calls == [c.run_id for c in cells]
    counts = rows_by_cell(store)
    assert set(counts) == {c.run_id for c in cells}
    for run_id, count in counts.items():
        assert count == Counter({**dict.fromkeys(METRICS, 1), CELL_COMPLETE: 1}), run_id

    rows = store.rows()
    assert rows[len(METRICS)]["benchmark"] == CELL_COMPLETE  # the marker follows the cell's metric rows
    first = rows[0]
    assert first["stage"] == "sft" and first["model"] == "HuggingFaceTB/SmolLM2-135M"
    settings = first["settings"]
    assert settings["learning_rate"] == 1e-6 and settings["effective_batch_size"] == 4
    assert settings["ratio"] == pytest.approx(2.5e-7) and settings["seed"] == 0
    assert settings["profile"] == "smoke" and settings["sweep"] == "ablation_135m"
    assert settings["steps"] == 10 and settings["tokens_seen"] == 4000 and settings["wall_seconds"] >= 0
    assert settings["eval_loss"] == pytest.approx(synthetic_scores(cells[0])[EVAL_LOSS])
    assert settings["train_loss"] == pytest.approx(settings["eval_loss"] - 0.1)
    assert {r["metric"] for r in rows if r["benchmark"] == "ARC (Average)"} == {"acc"}
    assert {r["metric"] for r in rows if r["benchmark"] == EVAL_LOSS} == {"loss"}
    assert len(completed_cells(store)) == 12

    again = Fake()
    size = len(store)
    report = run_sweep(cells, again, store, progress=False)
    assert again.calls == [] and report.skipped == [c.run_id for c in cells] and not report.completed
    assert len(store) == size

    other = Fake()  # the same cells under another model label are other runs
    run_sweep(cells[:2], other, store, model="SmolLM2-135M (kit)", progress=False)
    assert other.calls == [c.run_id for c in cells[:2]]


def test_a_failing_cell_is_counted_and_the_sweep_goes_on(tmp_path, caplog):
    store = ResultsStore(tmp_path / "results.jsonl")
    cells = small_grid()
    broken = {cells[3].run_id, cells[7].run_id}
    fake = Fake(fail=broken)
    report = run_sweep(cells, fake, store, progress=False)
    assert fake.calls == [c.run_id for c in cells]  # every cell was tried
    assert set(report.failed) == broken and not report.ok
    assert "RuntimeError: out of memory" in report.failed[cells[3].run_id]
    assert len(report.completed) == 10 and "2 failed" in str(report)
    assert any("failed" in r.message and cells[3].run_id in r.message for r in caplog.records)
    failures = [r for r in store.rows() if r["benchmark"] == CELL_FAILED]
    assert {r["run_id"] for r in failures} == broken
    assert (
        "out of memory" in failures[0]["settings"]["error"]
        and "Traceback" in failures[0]["settings"]["traceback"]
    )
    frame = sweep_frame(store)
    assert set(frame["run_id"]) == {c.run_id for c in cells} - broken  # failures are not scores
    assert not frame["metric"].isin([CELL_FAILED, CELL_COMPLETE]).any()

    retry = Fake()  # the next run retries only the failed cells
    report = run_sweep(cells, retry, store, progress=False)
    assert sorted(retry.calls) == sorted(broken) and report.ok and len(report.skipped) == 10
    assert len(sweep_frame(store)) == 12 * len(METRICS)


def test_results_in_other_shapes_and_values_that_are_not_finite(tmp_path):
    store = ResultsStore(tmp_path / "results.jsonl")
    cells = small_grid()[:4]

    def run_cell(cell):
        if cell is cells[0]:
            return {EVAL_LOSS: float("nan"), "ARC (Average)": 30.0}  # a diverged run
        if cell is cells[1]:
            return [
                {"benchmark": "ARC (Average)", "metric": "acc_norm", "value": 31.5, "stderr": 1.2, "n": 100}
            ]
        if cell is cells[2]:
            return "not a result"
        return CellResult(metrics={}, eval_loss=2.5, steps=3)

    report = run_sweep(cells, run_cell, store, progress=False)
    assert report.non_finite == {cells[0].run_id: [EVAL_LOSS]} and "diverged" in str(report)
    assert list(report.failed) == [cells[2].run_id] and "TypeError" in report.failed[cells[2].run_id]
    marker = next(
        r for r in store.rows() if r["run_id"] == cells[0].run_id and r["benchmark"] == CELL_COMPLETE
    )
    assert marker["value"] == 1 and marker["settings"]["non_finite"] == [EVAL_LOSS]
    frame = sweep_frame(store).set_index("run_id")
    arc = frame.loc[cells[1].run_id]
    assert (arc["metric"], arc["score_metric"], arc["value"], arc["stderr"], arc["n"]) == (
        "ARC (Average)",
        "acc_norm",
        31.5,
        1.2,
        100,
    )
    assert frame.loc[cells[3].run_id, "value"] == 2.5 and frame.loc[cells[3].run_id, "metric"] == EVAL_LOSS
    assert lower_is_better(EVAL_LOSS) and lower_is_better("train_loss") and not lower_is_better("HellaSwag")


def test_sweep_frame_reads_only_the_sweep(tmp_path):
    store = ResultsStore(tmp_path / "results.jsonl")
    store.append(  # an ordinary SFT run's row in the same store
        {
            "run_id": "sft_1130",
            "stage": "sft",
            "model": "m",
            "benchmark": "HellaSwag",
            "metric": "acc",
            "value": 40.0,
            "settings": {"lr": 9e-5, "effective_batch": 8},
        }
    )
    assert sweep_frame(store).empty and list(sweep_frame(store).columns)[:3] == ["run_id", "sweep", "profile"]
    cells = small_grid(seeds=(0, 1))
    run_sweep(cells, Fake(), store, progress=False)
    frame = sweep_frame(store)
    assert len(frame) == len(cells) * len(METRICS)
    row = frame[(frame["run_id"] == "lr1e-05_bs16_s1") & (frame["metric"] == "HellaSwag")].iloc[0]
    assert (row["lr"], row["bs"], row["seed"]) == (1e-5, 16, 1) and row["ratio"] == pytest.approx(1e-5 / 16)
    assert row["value"] == pytest.approx(synthetic_scores(Cell(1e-5, 16, seed=1))["HellaSwag"])
    assert sweep_frame(store, profile="paper").empty and sweep_frame(store, sweep="other").empty
    assert len(sweep_frame(store, stage="dpo")) == 0


def test_the_default_run_cell_trains_through_train_sft(tmp_path, monkeypatch):
    seen = []

    def train_sft(plan, output_dir, *, rows=None, eval_rows=None, verbose=True):
        seen.append(
            {"plan": plan, "output_dir": Path(output_dir), "rows": list(rows), "eval": list(eval_rows)}
        )
        return types.SimpleNamespace(
            output_dir=Path(output_dir),
            steps=3,
            train_loss=[(1, 9.0), (3, 8.5)],
            final_train_loss=8.5,
            eval_loss=8.7,
            trained_tokens=768,
            wall_seconds=1.5,
        )

    monkeypatch.setitem(sys.modules, "smoltulu_utils.sft", types.SimpleNamespace(train_sft=train_sft))
    monkeypatch.setenv("SMOLTULU_RUNS_DIR", str(tmp_path / "runs"))
    cells = load_grid("ablation_135m", profile="smoke")
    cell = cells[4]
    result = train_and_evaluate(cell)
    call = seen[0]
    plan = call["plan"]
    assert plan.learning_rate == cell.lr and plan.effective_batch_size == cell.effective_batch_size
    assert plan.model == "tiny" and plan.max_steps == cell.max_steps
    assert call["output_dir"] == tmp_path / "runs" / "sweeps" / "ablation_135m" / "smoke" / cell.run_id
    assert result.metrics == {EVAL_LOSS: 8.7} and result.train_loss == 8.5
    assert (result.steps, result.tokens_seen, result.wall_seconds) == (3, 768, 1.5)
    # the eval rows are held out of training, and the same for every cell
    assert len(call["eval"]) == cell.eval_samples == 12 and len(call["rows"]) == cell.max_train_samples
    as_text = [{json.dumps(r, sort_keys=True) for r in call[k]} for k in ("rows", "eval")]
    assert not as_text[0] & as_text[1]

    store = ResultsStore(tmp_path / "results.jsonl")
    report = run_sweep([cells[0]], None, store, progress=False)  # None: train_and_evaluate
    assert report.ok and sweep_frame(store)["value"].tolist() == [8.7]
    assert sweep_frame(store)["wall_seconds"].tolist() == [1.5]
    assert [json.dumps(r, sort_keys=True) for r in seen[1]["eval"]] == [
        json.dumps(r, sort_keys=True) for r in call["eval"]
    ]


# --- a sweep killed mid-way -------------------------------------------------------------------------

KILLED_SWEEP = textwrap.dedent(
    """
    import math, sys, time
    from smoltulu_utils.results import ResultsStore
    from smoltulu_utils.sweep import Cell, run_sweep

    store_path, calls_path, pause = sys.argv[1], sys.argv[2], float(sys.argv[3])

    def run_cell(cell):
        with open(calls_path, "a") as fh:
            fh.write(cell.run_id + "\\n")
        time.sleep(pause)
        r = math.log10(cell.ratio)
        return {"eval_loss": 2 + 0.1 * (r + 6) ** 2, "ARC (Average)": 40 - (r + 5) ** 2}

    cells = [Cell(lr, bs, profile="smoke") for lr in (1e-6, 1e-5, 1e-4, 1e-3) for bs in (4, 32)]
    run_sweep(cells, run_cell, ResultsStore(store_path), progress=False)
    """
)


def test_a_killed_sweep_resumes_without_recomputing_finished_cells(tmp_path):
    script = tmp_path / "sweep_script.py"
    script.write_text(KILLED_SWEEP)
    store = ResultsStore(tmp_path / "results.jsonl")
    calls = tmp_path / "calls.txt"

    def finished() -> set[str]:
        return {r["run_id"] for r in store.rows(warn=False) if r["benchmark"] == CELL_COMPLETE}

    def started() -> list[str]:
        return calls.read_text().split() if calls.exists() else []

    command = [sys.executable, str(script), str(store.path), str(calls)]
    process = subprocess.Popen([*command, "0.4"])
    deadline = time.monotonic() + 60
    try:
        # kill once two cells are finished and another one started less than 0.2 s of its 0.4 s ago
        while not (
            len(finished()) >= 2
            and len(started()) > len(finished())
            and time.time() - calls.stat().st_mtime < 0.2
        ):
            assert process.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline, "the sweep made no progress"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    done_before = finished()
    calls_before = started()
    interrupted = set(calls_before) - done_before
    assert 2 <= len(done_before) < 8 and interrupted

    rerun = subprocess.run([*command, "0"], timeout=60, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    calls_after = started()[len(calls_before) :]
    assert not set(calls_after) & done_before  # finished cells are never recomputed
    assert interrupted <= set(calls_after)  # the cell killed mid-way is
    assert len(calls_after) == 8 - len(done_before)

    counts = rows_by_cell(store)  # strict: every line of the file is a whole row
    assert len(counts) == 8
    for run_id, count in counts.items():
        assert count == Counter({EVAL_LOSS: 1, "ARC (Average)": 1, CELL_COMPLETE: 1}), run_id
    assert not list(tmp_path.glob(".results.jsonl.*.tmp"))
    assert len(sweep_frame(store)) == 16


# --- DPO and reward-model grids ----------------------------------------------------------------


@pytest.mark.parametrize("name, stage", [("ablation_dpo_135m", "dpo"), ("ablation_rm_135m", "rm")])
def test_preference_grids_load_and_span_their_tables(name, stage):
    from smoltulu_utils.sweep import PAIR_ACCURACY, paper_ratio_range

    for profile in ("smoke", "paper"):
        cells = load_grid(name, profile)
        assert {cell.stage for cell in cells} == {stage}
        assert cells[0].metrics == ("eval_loss", PAIR_ACCURACY)
        assert covers_paper_range(cells)
    low, high = paper_ratio_range(stage)
    assert low < high


def test_pair_accuracy_is_refused_for_sft_grids(tmp_path):
    text = GRID.read_text().replace(
        "  metrics: [eval_loss]             #", "  metrics: [eval_loss, pair_accuracy]  #"
    )
    path = tmp_path / "grid.yaml"
    path.write_text(text)
    with pytest.raises(SweepError, match="pair_accuracy.*not reported by a sft cell"):
        load_grid(path, "smoke")


def test_dpo_sweep_trains_cells_and_reads_the_reference_from_the_cache(tmp_path):
    """Two DPO cells through the default run_cell: rows per metric; the second cell runs no reference pass."""
    from smoltulu_utils.manifest import read_manifest
    from smoltulu_utils.sweep import PAIR_ACCURACY

    cells = [c for c in load_grid("ablation_dpo_135m", "smoke") if c.effective_batch_size == 4][1:]
    assert len(cells) == 2
    store = ResultsStore(tmp_path / "results.jsonl")
    report = run_sweep(cells, store=store, progress=False)
    assert report.ok and report.completed == [c.run_id for c in cells]
    frame = sweep_frame(store, stage="dpo")
    assert set(frame["metric"]) == {"eval_loss", PAIR_ACCURACY}
    assert frame["value"].notna().all() and frame["steps"].eq(3).all()
    manifests = [read_manifest(Path(os.environ["SMOLTULU_RUNS_DIR"]) / "sweeps" / c.sweep / c.profile / c.run_id)
                 for c in cells]  # fmt: skip
    second = manifests[1]["extra"]["reference"]
    assert second["found"] == "hit" and second["forward_passes"] == 0


def test_rm_sweep_trains_a_cell_through_train_rm(tmp_path):
    from smoltulu_utils.sweep import PAIR_ACCURACY

    cells = [
        c for c in load_grid("ablation_rm_135m", "smoke") if c.effective_batch_size == 4 and c.lr == 1e-4
    ]
    store = ResultsStore(tmp_path / "results.jsonl")
    report = run_sweep(cells, store=store, progress=False)
    assert report.ok and report.completed == [cells[0].run_id]
    frame = sweep_frame(store, stage="rm")
    assert set(frame["metric"]) == {"eval_loss", PAIR_ACCURACY}
    assert frame["value"].between(0, 10).all() and frame["steps"].eq(3).all()
