"""One style, one save function, and the two figures drawn from the paper's numbers."""

from __future__ import annotations

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from smoltulu_utils import paper, plotting, tables  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    plotting.set_style()
    yield
    plt.close("all")


def assert_saved(paths, folder, name):
    assert [p.name for p in paths] == [f"{name}.png", f"{name}.pdf"]
    assert all(p.parent == folder for p in paths)
    png, pdf = (p.read_bytes() for p in paths)
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    assert pdf.startswith(b"%PDF") and len(pdf) > 2000


def test_save_figure_writes_png_and_pdf(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    assert_saved(
        plotting.save_figure(fig, "fig01_lr_bs_contours", tmp_path), tmp_path, "fig01_lr_bs_contours"
    )


def test_save_figure_default_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOLTULU_FIGURES_DIR", str(tmp_path / "figs"))
    fig, _ = plt.subplots()
    paths = plotting.save_figure(fig, "table09_benchmarks")
    assert paths[0].parent == tmp_path / "figs" and paths[0].exists()


@pytest.mark.parametrize(
    "name", ["Fig01", "fig01.png", "fig 01", "fig01-contours", "", "_fig01", "fig01_", "ü1"]
)
def test_save_figure_rejects_bad_names(tmp_path, name):
    fig, _ = plt.subplots()
    with pytest.raises(ValueError, match="bad output name"):
        plotting.save_figure(fig, name, tmp_path)
    assert not list(tmp_path.iterdir())


def test_palette_is_fixed_per_family():
    assert plotting.FAMILY_COLORS["SmolTulu"] != plotting.FAMILY_COLORS["Tulu 3"]
    assert plotting.model_color("Tulu 3 SFT 8b") == plotting.FAMILY_COLORS["Tulu 3"]
    assert plotting.model_color("Qwen2.5-1.5B-Instruct") == plotting.FAMILY_COLORS["Qwen"]
    assert plotting.model_color("SmolTulu DPO-1130 (kit)") == plotting.model_color("SmolTulu DPO-1130")
    assert (
        plotting.model_color("SultanR/SmolTulu-1.7b-Instruct") == plotting.MODEL_COLORS["SmolTulu DPO-1130"]
    )
    shades = [plotting.model_color(m) for m in paper.paper_models(9)]
    assert len(set(shades)) == len(shades)


def test_set_style_applies_the_theme():
    plt.rcParams["savefig.dpi"] = 72
    plotting.set_style()
    assert plt.rcParams["savefig.dpi"] == plotting.DPI
    assert plt.rcParams["pdf.fonttype"] == 42


def test_plot_lr_bs_ratios(tmp_path):
    fig = plotting.plot_lr_bs_ratios()
    assert isinstance(fig, Figure)
    axes = [ax for ax in fig.axes if ax.get_yticks().size]
    assert [ax.get_title(loc="left") for ax in axes] == ["SFT (Table 2)", "DPO (Table 5)", "RM (Table 7)"]
    assert all(ax.get_xscale() == "log" for ax in axes)
    hyper = paper.paper_hyperparameters()
    for ax, stage in zip(axes, ("SFT", "DPO", "RM"), strict=True):
        part = hyper[hyper["stage"] == stage]
        dots = sorted(line.get_xdata()[0] for line in ax.lines)
        assert dots == pytest.approx(sorted(part["learning_rate"] / part["batch_size"]))
        colours = {line.get_color() for line in ax.lines}
        assert colours == {plotting.FAMILY_COLORS["SmolTulu"], plotting.FAMILY_COLORS["Tulu 3"]}
    notes = [t.get_text() for ax in axes for t in ax.texts]
    assert "9.0e-5 / 8 = 1.1e-5" in notes and "4.0e-5 / 4 = 1.0e-5" in notes
    assert_saved(
        plotting.save_figure(fig, "tables02_05_07_lr_bs_ratios", tmp_path),
        tmp_path,
        "tables02_05_07_lr_bs_ratios",
    )


def tick_labels_overlap(fig, ax) -> bool:
    fig.canvas.draw()
    boxes = [t.get_window_extent() for t in ax.get_xticklabels() if t.get_text()]
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def test_plot_benchmark_comparison(tmp_path):
    fig = plotting.plot_benchmark_comparison()
    ax = fig.axes[0]
    heights = [bar.get_height() for bar in ax.patches]
    expected = paper.paper_results(9)
    assert len(heights) == len(expected) == 49
    by_model = {
        model: [r.value for r in expected.itertuples() if r.model == model] for model in paper.paper_models(9)
    }
    assert heights == [v for model in paper.paper_models(9) for v in by_model[model]]
    labels = {t.get_text() for t in ax.texts}
    assert {"51.0", "67.7", "24.2"} <= labels
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(paper.paper_models(9))
    assert not tick_labels_overlap(fig, ax)
    assert_saved(plotting.save_figure(fig, "table09_benchmarks", tmp_path), tmp_path, "table09_benchmarks")


def test_plot_benchmark_comparison_with_kit_columns(tmp_path):
    kit = [
        {
            "run_id": "k",
            "stage": "eval",
            "model": "SmolTulu SFT-1130",
            "benchmark": "gsm8k",
            "metric": "em",
            "value": 50.2,
        }
    ]
    fig = plotting.plot_benchmark_comparison(tables.table3(kit))
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "SmolTulu SFT-1130 (kit)" in legend and not any("Δ" in t for t in legend)
    assert any(bar.get_hatch() for bar in ax.patches)
    assert ax.get_title(loc="left").startswith("Table 3")
    assert not tick_labels_overlap(fig, ax)
    plotting.save_figure(fig, "table03_sft_results_kit", tmp_path)


def test_plot_lr_bs_ratios_takes_kit_recipes():
    kit = {"stage": "SFT", "label": "SmolTulu SFT-1130 (kit, smoke)", "learning_rate": 9e-5, "batch_size": 8}
    df = pd.concat([paper.paper_hyperparameters(), pd.DataFrame([kit])], ignore_index=True)
    fig = plotting.plot_lr_bs_ratios(df)
    sft = fig.axes[0]
    assert "SmolTulu SFT-1130 (kit, smoke)" in [t.get_text() for t in sft.get_yticklabels()]
    kit_dot = next(line for line in sft.lines if line.get_markerfacecolor() == "white")
    assert kit_dot.get_color() == plotting.FAMILY_COLORS["SmolTulu"]


def test_length_histograms_one_panel_per_dataset(tmp_path):
    from smoltulu_utils.plotting import plot_length_histograms, save_figure

    fig = plot_length_histograms({"a": [1, 2, 3, 10], "b": [5, 5, 6], "empty": []})
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title(loc="left") or ax.get_title() for ax in visible] == ["a (n=4)", "b (n=3)"]
    assert len(save_figure(fig, "setup_dataset_lengths", tmp_path)) == 2
    with pytest.raises(ValueError, match="no lengths"):
        plot_length_histograms({"empty": []})


def test_training_curves_from_the_store_draw_a_line_per_run_in_a_panel_per_stage_and_curve():
    from smoltulu_utils.results import curve_rows, curves_frame

    rows = curve_rows("sft_a", "sft", "m", {"train_loss": [(1, 2.0), (2, 1.5)]})
    rows += curve_rows("sft_b", "sft", "m", {"train_loss": [(1, 2.2), (2, 1.9), (3, 1.7)]})
    rows += curve_rows("dpo_a", "dpo", "m", {"train_loss": [(1, 0.69)], "rewards/margins": [(1, 0.1)]})
    fig = plotting.plot_training_curves(curves_frame(pd.DataFrame(rows)))
    where = plt.rcParams["axes.titlelocation"]  # the kit's style puts titles on the left
    titles = [ax.get_title(loc=where) for ax in fig.axes if ax.get_visible()]
    assert titles == ["sft: training loss", "dpo: training loss", "dpo: reward margin (chosen - rejected)"]
    sft_panel = fig.axes[0]
    assert [list(line.get_ydata()) for line in sft_panel.get_lines()] == [[2.0, 1.5], [2.2, 1.9, 1.7]]
    with pytest.raises(ValueError, match="no training curves"):
        plotting.plot_training_curves(curves_frame(pd.DataFrame(rows)), panels=["kl"])
