"""Figure 1 from the sweep's results rows: contour panels over LR x batch size, and scores vs LR/BS."""

from __future__ import annotations

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import math  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from smoltulu_utils import plotting  # noqa: E402
from smoltulu_utils.results import ResultsStore, sweep_frame  # noqa: E402
from smoltulu_utils.sweep import EVAL_LOSS, Cell, run_sweep  # noqa: E402

FIGURE1 = ("ARC (Average)", "GSM8K (5-shot)", "HellaSwag", "IFEval (Average)")
METRICS = (*FIGURE1, EVAL_LOSS)


def scores(cell: Cell) -> dict[str, float]:
    r, b = math.log10(cell.ratio), math.log2(cell.effective_batch_size)
    loss = 2.0 + 0.1 * (r + 6.5) ** 2
    return {
        "ARC (Average)": 40 - 2 * (r + 5.5) ** 2 + 0.2 * b,
        "GSM8K (5-shot)": 10 - 1.5 * (r + 5) ** 2,
        "HellaSwag": 42 - 2 * (r + 7) ** 2,
        "IFEval (Average)": 30 - 2.5 * (r + 7.2) ** 2,
        EVAL_LOSS: float("nan") if cell.lr >= 1e-3 and cell.effective_batch_size == 4 else loss,
    }


@pytest.fixture(autouse=True)
def close_figures():
    plotting.set_style()
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sweep of 4 learning rates x 3 batch sizes run with a synthetic run_cell; one cell diverged."""
    path = tmp_path_factory.mktemp("sweep") / "results.jsonl"
    cells = [
        Cell(lr, bs, profile="smoke", metrics=METRICS)
        for lr in (1e-6, 1e-5, 1e-4, 1e-3)
        for bs in (4, 16, 64)
    ]
    run_sweep(cells, scores, ResultsStore(path), progress=False)
    return ResultsStore(path)


def panels(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.get_visible() and "learning rate" in ax.get_xlabel()]


def legend_texts(fig: Figure) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def test_contours_have_one_panel_per_metric(store):
    df = sweep_frame(store)
    fig = plotting.plot_lr_bs_contours(df)
    assert isinstance(fig, Figure)
    axes = panels(fig)
    assert [ax.get_title(loc="left") for ax in axes] == [
        *FIGURE1,
        "Eval loss",
    ]  # Figure 1's order, losses last
    for ax in axes:
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
        assert ax.get_xlabel() == "learning rate (log)" and ax.get_ylabel() == "effective batch size (log)"
    colorbars = [ax.get_ylabel() for ax in fig.axes if ax not in axes and ax.get_ylabel()]
    assert colorbars[0] == "ARC (Average) (higher is better)"
    assert colorbars[-1] == "Eval loss (lower is better, colours reversed)"
    four = plotting.plot_lr_bs_contours(df, metrics=FIGURE1)
    assert len(panels(four)) == 4


def test_contours_show_cells_ratios_and_the_paper_recipes(store):
    fig = plotting.plot_lr_bs_contours(store)  # a ResultsStore works too
    arc = panels(fig)[0]
    texts = [t.get_text() for t in arc.texts]
    assert len(arc.collections) >= 2  # the filled contours and the cell points
    arc_values = sweep_frame(store).query("metric == 'ARC (Average)'")["value"].to_numpy()
    decimals = plotting._decimals(arc_values)
    assert decimals == 1  # scores spread over about 10 points
    assert f"{scores(Cell(1e-5, 16))['ARC (Average)']:.{decimals}f}" in texts  # cell values are printed
    assert "$10^{-7}$" in texts  # iso-ratio lines are labelled with their ratio
    assert {"SFT-1130", "SFT-1207", "Tulu 3 8B", "Tulu 3 70B"} <= set(texts)
    legend = " | ".join(legend_texts(fig))
    assert (
        "SmolTulu SFT-1130: 9.0e-5 / 8 (a 1.7B recipe" in legend
        and "SmolTulu SFT-1207: 3.1e-6 / 32" in legend
    )
    assert "Tulu 3 SFT 8b: 5.0e-6 / 128" in legend and "Tulu 3 SFT 70b: 2.0e-6 / 128" in legend
    assert "cell without a finite value" in legend  # the diverged cell's eval loss
    plain = plotting.plot_lr_bs_contours(store, recipes=False)
    assert "SFT-1130" not in " ".join(legend_texts(plain))


def test_interpolation_is_exact_for_a_plane_on_the_log_grid():
    lr, bs = np.meshgrid([1e-6, 1e-5, 1e-4], [4, 16, 64, 128])
    plane = 3 * np.log10(lr) - 0.5 * np.log2(bs)
    mesh_lr, mesh_bs, values = plotting._interpolate_log_grid(lr.ravel(), bs.ravel(), plane.ravel(), size=41)
    expected = 3 * np.log10(mesh_lr)[None, :] - 0.5 * np.log2(mesh_bs)[:, None]
    assert np.allclose(values, expected)
    scattered = plotting._interpolate_log_grid(lr.ravel()[:-1], bs.ravel()[:-1], plane.ravel()[:-1], size=41)
    inside = ~np.ma.getmaskarray(scattered[2])
    assert np.allclose(scattered[2][inside], expected[inside])  # linear on triangles: exact for a plane
    assert 0 < np.count_nonzero(~inside) < inside.size  # outside the cells' hull: nothing drawn
    assert (
        plotting._interpolate_log_grid(np.array([1e-5, 1e-4]), np.array([8, 8]), np.array([1.0, 2.0])) is None
    )


def test_values_get_enough_decimals_to_differ():
    assert plotting._decimals(np.array([10.8241, 10.5854, 10.6164])) == 3  # tiny-model losses
    assert plotting._decimals(np.array([23.1, 43.4])) == 1
    assert plotting._decimals(np.array([2.0, 2.0])) == 2


def test_a_single_row_of_cells_still_plots(tmp_path):
    store = ResultsStore(tmp_path / "results.jsonl")
    run_sweep(
        [Cell(lr, 8, profile="smoke") for lr in (1e-5, 1e-4)],
        lambda c: {EVAL_LOSS: 2.0},
        store,
        progress=False,
    )
    fig = plotting.plot_lr_bs_contours(sweep_frame(store))
    assert len(panels(fig)) == 1


def test_metric_vs_ratio_has_one_marker_per_cell(store):
    df = sweep_frame(store)
    fig = plotting.plot_metric_vs_ratio(df)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title(loc="left") for ax in axes] == [*FIGURE1, "Eval loss"]
    for ax, metric in zip(axes, METRICS, strict=True):
        assert ax.get_xscale() == "log"
        points = sum(len(c.get_offsets()) for c in ax.collections)
        assert points == len(df[df["metric"] == metric])
    assert axes[-1].get_ylabel() == "Eval loss (lower is better)"
    assert [t for t in legend_texts(fig)][:3] == ["4", "16", "64"]  # coloured by effective batch size
    assert "SFT-1130" in [t.get_text() for t in axes[0].texts]


def test_both_figures_save_as_png_and_pdf(store, tmp_path):
    saved = plotting.save_ablation_figures(sweep_frame(store), tmp_path)
    assert [p.name for p in saved["fig01"]] == ["fig01_lr_bs_contours.png", "fig01_lr_bs_contours.pdf"]
    assert [p.name for p in saved["fig01b"]] == ["fig01b_metric_vs_ratio.png", "fig01b_metric_vs_ratio.pdf"]
    assert plotting.ABLATION_FIGURE_NAMES["fig01"] == plotting.FIGURE_NAMES["fig01"]
    for png, pdf in saved.values():
        assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 20_000
        assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_size > 5_000


def test_bad_input_is_explained(store, tmp_path):
    df = sweep_frame(store)
    with pytest.raises(ValueError, match="no sweep rows for metric"):
        plotting.plot_lr_bs_contours(df, metrics=["PIQA"])
    with pytest.raises(ValueError, match="no sweep rows to plot"):
        plotting.plot_metric_vs_ratio(sweep_frame(ResultsStore(tmp_path / "empty.jsonl")))
    with pytest.raises(ValueError, match="lacks columns"):
        plotting.plot_lr_bs_contours(df.drop(columns=["bs"]))
