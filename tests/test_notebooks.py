"""The notebooks: stored stripped with one parameters cell, and every one runs in the smoke profile.

The execution tests go through :func:`smoltulu_utils.notebooks.run_notebook`, the same path as
``make reproduce``, in order, sharing one results and figures folder as a real run does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from smoltulu_utils import notebooks as nbs
from smoltulu_utils.paths import NOTEBOOKS_DIR, PAPER_DIR

STAGE_NOTEBOOKS = nbs.ordered_notebooks()
ALL_NOTEBOOKS = [*STAGE_NOTEBOOKS, NOTEBOOKS_DIR / "_template.ipynb"]


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def test_the_stage_notebooks_are_found_in_order():
    names = [p.name for p in STAGE_NOTEBOOKS]
    assert names[0] == "00_setup_and_data.ipynb"
    assert names[-1] == "07_tables_and_figures.ipynb"
    assert names == sorted(names)
    assert names[1] == "00b_data_analysis.ipynb", "the data analysis runs right after setup"


def test_ordered_notebooks_puts_lettered_notebooks_after_their_number(tmp_path):
    for name in ("01_b", "00b_a", "00_a", "_template", "0x_no", "00bb_no"):
        (tmp_path / f"{name}.ipynb").write_text("{}")
    names = [p.name for p in nbs.ordered_notebooks(tmp_path)]
    assert names == ["00_a.ipynb", "00b_a.ipynb", "01_b.ipynb"]


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=lambda p: p.name)
def test_stored_stripped_with_one_parameters_cell_holding_every_override(path):
    nbs.check_stored(path)
    for cell in _cells(path):
        if cell["cell_type"] == "code":
            assert cell.get("execution_count") is None, f"{path.name}: execution counts must be cleared"


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=lambda p: p.name)
def test_skeleton_colab_install_then_versions_then_parameters(path):
    code = [c for c in _cells(path) if c["cell_type"] == "code"]
    first, second, third = ("".join(c["source"]) for c in code[:3])
    assert 'find_spec("smoltulu_utils") is None' in first, (
        "first code cell installs the kit only when missing"
    )
    assert "detect_hardware" in second and "hardware_report" in second
    assert "parameters" in code[2]["metadata"].get("tags", [])
    assert "PROFILE" in third
    markdown = "".join("".join(c["source"]) for c in _cells(path) if c["cell_type"] == "markdown")
    assert "| profile |" in markdown, "the opening cell gives the budget per profile"
    assert "Try this" in markdown


def test_check_stored_refuses_outputs_and_missing_parameters(tmp_path):
    nb = json.loads((NOTEBOOKS_DIR / "_template.ipynb").read_text())
    code = next(c for c in nb["cells"] if c["cell_type"] == "code")
    code["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["hi\n"]}]
    bad = tmp_path / "00_bad.ipynb"
    bad.write_text(json.dumps(nb))
    with pytest.raises(nbs.NotebookError, match="holds 1 outputs"):
        nbs.check_stored(bad)
    code["outputs"] = []
    bad.write_text(json.dumps(nb))
    with pytest.raises(nbs.NotebookError, match="lacks"):
        nbs.check_stored(bad, overrides=["PROFILE", "NOT_A_PARAMETER"])
    for cell in nb["cells"]:
        cell.get("metadata", {}).pop("tags", None)
    bad.write_text(json.dumps(nb))
    with pytest.raises(nbs.NotebookError, match="exactly one"):
        nbs.parameters_of(bad)


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """Every stage notebook executed in order in the smoke profile (once for this module)."""
    out = tmp_path_factory.mktemp("executed")
    return {
        p.name: nbs.run_notebook(p, nbs.SMOKE_OVERRIDES, out, progress_bar=False) for p in STAGE_NOTEBOOKS
    }


@pytest.mark.slow
@pytest.mark.parametrize("path", STAGE_NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_in_the_smoke_profile(path, smoke_runs):
    run = smoke_runs[path.name]
    executed = json.loads(run.output.read_text())
    errors = [o for c in executed["cells"] for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert executed["metadata"]["papermill"]["parameters"]["PROFILE"] == "smoke"


@pytest.mark.slow
def test_setup_notebook_leaves_the_plans_and_the_length_figure(smoke_runs):
    results = Path(os.environ["SMOLTULU_RESULTS_DIR"])
    figures = Path(os.environ["SMOLTULU_FIGURES_DIR"])
    plans = pd.read_csv(results / "plans_smoke.csv")
    assert set(plans["recipe"]) >= {"sft_1130", "sft_1207", "dpo_1130", "dpo_1207", "rm_1130", "rm_1207"}
    formed = plans["per_device"] * plans["accumulation"] * plans["processes"]
    assert (formed == plans["effective_batch"]).all()
    for ext in ("png", "pdf"):
        assert (figures / f"setup_dataset_lengths.{ext}").stat().st_size > 1000


@pytest.mark.slow
def test_tables_notebook_renders_table9_equal_to_the_paper(smoke_runs):
    results = Path(os.environ["SMOLTULU_RESULTS_DIR"])
    figures = Path(os.environ["SMOLTULU_FIGURES_DIR"])
    rendered = pd.read_csv(results / "tables" / "table09_benchmarks.csv", dtype=str)
    paper = pd.read_csv(PAPER_DIR / "table09_wider_comparison.csv", dtype=str)
    first = rendered.columns[0]
    for row in paper.itertuples():
        # a model with kit numbers (02 scores its SFT runs) shows its paper column as "<model> (paper)"
        column = f"{row.model} (paper)" if f"{row.model} (paper)" in rendered.columns else row.model
        value = rendered.loc[rendered[first] == row.benchmark, column]
        assert list(value) == [row.value], (row.model, row.benchmark)
    for name in (
        "table02_sft_hyperparameters",
        "table05_dpo_hyperparameters",
        "table07_rm_hyperparameters",
        "table03_sft_results",
        "table06_dpo_results",
        "table08_rm_results",
    ):
        for ext in ("csv", "md", "tex"):
            assert (results / "tables" / f"{name}.{ext}").exists()
    for name in ("tables02_05_07_lr_bs_ratios", "table09_benchmarks"):
        assert (figures / f"{name}.png").exists() and (figures / f"{name}.pdf").exists()


@pytest.mark.slow
def test_tables_notebook_puts_kit_results_beside_the_paper(tmp_path, monkeypatch):
    from smoltulu_utils.results import ResultsStore

    monkeypatch.setenv("SMOLTULU_RESULTS_DIR", str(tmp_path / "results"))  # its own tables folder

    store = ResultsStore(tmp_path / "results.jsonl")
    store.append(
        {
            "run_id": "dpo_1130_eval",
            "stage": "eval",
            "model": "SmolTulu DPO-1130",
            "benchmark": "GSM8K (5-shot)",
            "metric": "qem",
            "value": 50.0,
        }
    )
    tables_nb = NOTEBOOKS_DIR / "07_tables_and_figures.ipynb"
    parameters = {**nbs.SMOKE_OVERRIDES, "RESULTS_FILE": str(store.path)}
    run = nbs.run_notebook(tables_nb, parameters, tmp_path / "executed", progress_bar=False)
    results = Path(os.environ["SMOLTULU_RESULTS_DIR"])
    table9 = pd.read_csv(results / "tables" / "table09_benchmarks.csv", dtype=str).set_index("Benchmark")
    assert table9.loc["GSM8K (5-shot)", "SmolTulu DPO-1130 (paper)"] == "51.6"
    assert table9.loc["GSM8K (5-shot)", "SmolTulu DPO-1130 (kit)"] == "50.0"
    assert table9.loc["GSM8K (5-shot)", "SmolTulu DPO-1130 Δ"] == "-1.6"
    assert run.output.exists()


@pytest.mark.slow
def test_tables_notebook_redraws_every_stages_training_curves_from_the_store(smoke_runs):
    """Notebooks 02-05 store their curves; 07 reads them back from the results file alone."""
    from smoltulu_utils.results import ResultsStore, curves_frame

    curves = curves_frame(ResultsStore().read())
    assert {"sft", "dpo", "rm", "rlvr"} <= set(curves["stage"])
    assert set(curves.loc[curves["stage"] == "rlvr", "curve"]) >= {"verifiable_reward"}
    figures = Path(os.environ["SMOLTULU_FIGURES_DIR"])
    assert (figures / "training_curves_kit.png").stat().st_size > 1000
