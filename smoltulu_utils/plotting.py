"""One figure style and one save function for every figure of the kit, and the paper-data figures.

- :func:`set_style`: the seaborn theme every notebook calls once; readable on screen and in print.
- :data:`FAMILY_COLORS` / :func:`model_color`: a fixed palette, so SmolTulu is always blue, Tulu 3
  always orange and the other model families keep their colours across figures.
- :func:`save_figure`: writes ``<name>.png`` (150 dpi) and ``<name>.pdf`` under ``figures_dir()``,
  names paper-numbered like ``fig01_lr_bs_contours`` or ``table09_benchmarks``.
- :func:`plot_lr_bs_ratios` (Tables 2, 5, 7) and :func:`plot_benchmark_comparison` (Table 9).
- :func:`plot_contamination` (Tables 1, 4, 13) and :func:`plot_language_distribution` (Tables 10-12).
- :func:`plot_lr_bs_contours` (Figure 1) and :func:`plot_metric_vs_ratio`, from :func:`results.sweep_frame`.

Tests and CI run headless: set ``MPLBACKEND=Agg`` (nothing here opens a window).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, NullLocator

from .paper import canonical_model, family, format_lr, paper_hyperparameters, paper_results, table_caption
from .paths import figures_dir
from .results import ResultsStore, lower_is_better, sweep_frame
from .tables import validate_name

#: Model family -> colour. SmolTulu and Tulu 3 stand out; the comparison models are muted.
FAMILY_COLORS = {
    "SmolTulu": "#2F6DB5",
    "Tulu 3": "#E0762F",
    "SmolLM2": "#4E9A5C",
    "SmolLM1": "#9CC59A",
    "Llama": "#8A6BB1",
    "Qwen": "#B3875B",
    "Other": "#8C8C8C",
}
#: Shades for the four SmolTulu checkpoints (darker = DPO, lighter = SFT), inside the SmolTulu blue.
MODEL_COLORS = {
    "SmolTulu DPO-1130": "#1D4A82",
    "SmolTulu DPO-1207": "#3F7FC8",
    "SmolTulu SFT-1130": "#76A9DD",
    "SmolTulu SFT-1207": "#A9CBEE",
    "SmolTulu-1.7b-Reinforced": "#0E2A4F",
}
#: Figures the kit draws, by paper number.
FIGURE_NAMES = {
    "fig01": "fig01_lr_bs_contours",
    "lr_bs_ratios": "tables02_05_07_lr_bs_ratios",
    "table09": "table09_benchmarks",
    "dataset_lengths": "setup_dataset_lengths",
    "contamination": "tables01_04_13_contamination",
    "languages": "tables10_11_12_languages",
}
FORMATS = ("png", "pdf")
DPI = 150

_RC = {
    "figure.dpi": 100,
    "savefig.dpi": DPI,
    "savefig.bbox": "tight",
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
}


def set_style(context: str = "notebook", font_scale: float = 1.0) -> None:
    """Apply the kit's seaborn theme (white grid, fixed family palette, print-friendly fonts)."""
    sns.set_theme(
        context=context,
        style="whitegrid",
        palette=list(FAMILY_COLORS.values()),
        font_scale=font_scale,
        rc=_RC,
    )


def model_color(name: str) -> str:
    """The colour of a model or recipe label: its own SmolTulu shade, else its family's colour."""
    base = canonical_model(name.split(" (")[0])
    return MODEL_COLORS.get(base, FAMILY_COLORS[family(base)])


def save_figure(
    fig: Figure,
    name: str,
    directory: str | Path | None = None,
    formats: Sequence[str] = FORMATS,
    dpi: int = DPI,
) -> list[Path]:
    """Save ``fig`` as ``<name>.png`` and ``<name>.pdf`` in ``directory`` (default ``figures_dir()``).

    ``name``: lowercase letters, digits and underscores, paper-numbered (``fig01_lr_bs_contours``,
    ``table09_benchmarks``); anything else raises ValueError. Returns the written paths.
    """
    validate_name(name)
    folder = Path(directory) if directory is not None else figures_dir()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = folder / f"{name}.{fmt}"
        # Fixed metadata keeps the files byte-stable across runs (no creation date in the PDF).
        metadata = {"CreationDate": None} if fmt == "pdf" else {"Software": None} if fmt == "png" else None
        fig.savefig(path, format=fmt, dpi=dpi, bbox_inches="tight", metadata=metadata)
        paths.append(path)
    return paths


def plot_lr_bs_ratios(df: pd.DataFrame | None = None) -> Figure:
    """The LR / effective-batch-size ratio of every recipe in Tables 2, 5 and 7, on a log scale.

    One panel per stage (SFT, DPO, RM), one dot per recipe coloured by family (hollow for labels
    with ``(kit``), annotated with ``LR / BS = ratio``. ``df`` defaults to :func:`~smoltulu_utils.paper.paper_hyperparameters`;
    any frame with columns stage, label (or config), learning_rate and batch_size works (kit recipes too).
    """
    data = paper_hyperparameters() if df is None else df.copy()
    if "label" not in data.columns:
        data["label"] = data["config"]
    guessed = data["label"].map(family)
    data["family"] = data["family"].fillna(guessed) if "family" in data.columns else guessed
    data["ratio"] = data["learning_rate"].astype(float) / data["batch_size"].astype(float)
    order = [s for s in ("SFT", "DPO", "RM") if s in set(data["stage"])]
    order += [s for s in dict.fromkeys(data["stage"]) if s not in order]
    tables = {"SFT": "Table 2", "DPO": "Table 5", "RM": "Table 7"}
    sizes = [int((data["stage"] == s).sum()) for s in order]

    figsize = (9, 1.1 + 0.48 * sum(sizes) + 0.45 * len(order))
    grid = {"height_ratios": sizes, "hspace": 0.45}
    fig, axes = plt.subplots(len(order), 1, sharex=True, figsize=figsize, gridspec_kw=grid, squeeze=False)
    low, high = data["ratio"].min() / 4, data["ratio"].max() * 40
    footnotes = []
    for ax, stage in zip(axes[:, 0], order, strict=True):
        part = data[data["stage"] == stage].reset_index(drop=True)
        y = np.arange(len(part))[::-1]
        for yi, row in zip(y, part.itertuples(), strict=True):
            colour = _family_color(row.family)
            ax.hlines(yi, low, row.ratio, color=colour, alpha=0.35, linewidth=2.5)
            face = "white" if "(kit" in str(row.label) else colour  # kit recipes: hollow dots
            ax.plot(row.ratio, yi, "o", color=colour, mfc=face, mew=2, markersize=9, zorder=3)
            lr_text = getattr(row, "learning_rate_printed", None)
            lr_text = lr_text if isinstance(lr_text, str) and lr_text else format_lr(row.learning_rate)
            text = f"{lr_text} / {int(row.batch_size)} = {format_lr(row.ratio)}"
            ax.annotate(
                text, (row.ratio, yi), xytext=(9, 0), textcoords="offset points", va="center", fontsize=9
            )
        labels = list(part["label"])
        if "note" in part.columns:
            for i, note in enumerate(part["note"]):
                if isinstance(note, str) and note:
                    labels[i] += " *"
                    footnote = f"* {stage}: '{part['label'][i]}' is the {note}"
                    if stage == "RM" and part["family"][i] == "Tulu 3":
                        footnote += (
                            "; Table 7 compares the RM ratios with Tulu 3's DPO recipe, not its RM recipe"
                        )
                    footnotes.append(footnote + ".")
        ax.set_yticks(y, labels)
        ax.set_ylim(-0.6, len(part) - 0.4)
        ax.set_xscale("log")
        ax.set_xlim(low, high)
        ax.grid(axis="y", visible=False)
        ax.set_title(f"{stage} ({tables[stage]})" if stage in tables else str(stage), fontsize=11, loc="left")
    axes[-1, 0].set_xlabel("learning rate / effective batch size (log scale)")
    families = [f for f in FAMILY_COLORS if f in set(data["family"])]
    handles = [_key(f, marker="o", linestyle="", color=FAMILY_COLORS[f]) for f in families]
    fig.legend(handles=handles, loc="upper right", ncols=len(handles), bbox_to_anchor=(0.98, 1.0))
    fig.suptitle("LR / batch-size ratio per recipe", x=0.02, ha="left", fontweight="bold")
    if footnotes:
        fig.text(0.02, -0.01, "\n".join(footnotes), fontsize=8, va="top", ha="left", color="0.3")
    return fig


def _tidy_benchmarks(df: pd.DataFrame) -> pd.DataFrame:
    """Accept tidy rows (model, benchmark, value) or a wide table (benchmarks x models, e.g. ``table9()``)."""
    if {"model", "benchmark", "value"} <= set(df.columns):
        return df[["model", "benchmark", "value"]].copy()
    wide = df[[c for c in df.columns if not str(c).endswith("Δ")]]
    tidy = wide.rename_axis("benchmark").reset_index().melt(id_vars="benchmark", var_name="model")
    return tidy.dropna(subset=["value"])


def plot_benchmark_comparison(df: pd.DataFrame | None = None, title: str | None = None) -> Figure:
    """Table 9 as a grouped bar chart: benchmarks on x, one bar per model, the value on each bar.

    ``df`` defaults to the paper's Table 9; tidy rows (model, benchmark, value) or a wide frame from
    :mod:`~smoltulu_utils.tables` (``table9(kit)``: kit bars hatched, Δ columns ignored) also work.
    ``title`` defaults to the table's caption.
    """
    source = paper_results(9) if df is None else df
    if title is None:
        caption = table_caption(9) if df is None else source.attrs.get("caption")
        title = caption or ""
    data = _tidy_benchmarks(source)
    benchmarks = list(dict.fromkeys(data["benchmark"]))
    models = list(dict.fromkeys(data["model"]))
    values = data.pivot_table(index="benchmark", columns="model", values="value", aggfunc="last")
    values = values.reindex(index=benchmarks, columns=models)

    n = len(models)
    width = 0.84 / n
    fig, ax = plt.subplots(figsize=(max(7.0, 0.8 * len(benchmarks) * (0.9 + 0.16 * n)) + 2.4, 5.0))
    x = np.arange(len(benchmarks))
    label_size = 8 if n <= 5 else 7
    for i, model in enumerate(models):
        offsets = x - 0.42 + width * (i + 0.5)
        heights = values[model].to_numpy(dtype=float)
        style = {"label": model, "color": model_color(model), "edgecolor": "white"}
        bars = ax.bar(offsets, heights, width * 0.92, hatch="///" if "(kit" in model else None, **style)
        labels = ["" if np.isnan(h) else f"{h:.1f}" for h in heights]
        ax.bar_label(bars, labels=labels, rotation=90, padding=2, fontsize=label_size, color="0.2")
    ax.set_xticks(x, [b.replace(" (", "\n(") for b in benchmarks])
    ax.tick_params(axis="x", length=0)
    ax.set_ylim(0, np.nanmax(values.to_numpy(dtype=float)) * 1.16)
    ax.set_xlim(-0.5, len(benchmarks) - 0.5)
    ax.set_ylabel("score (%)")
    ax.grid(axis="x", visible=False)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, title="model", title_fontsize=9)
    if title:
        ax.set_title(title, loc="left")
    fig.tight_layout()
    return fig


def plot_length_histograms(lengths: dict[str, list[int]], unit: str = "tokens", bins: int = 20) -> Figure:
    """One small histogram per dataset of example lengths (``{name: lengths}``), medians marked."""
    names = [name for name, values in lengths.items() if len(values)]
    if not names:
        raise ValueError("no lengths to plot: every dataset given was empty")
    fig, axes = _panel_grid(len(names), 3.2, 2.4, cols=min(4, len(names)))
    for ax, name in zip(axes, names, strict=True):
        values = np.asarray(lengths[name], dtype=float)
        ax.hist(values, bins=bins, color=FAMILY_COLORS["SmolTulu"], alpha=0.85)
        ax.axvline(np.median(values), color="0.2", linestyle="--", linewidth=1)
        ax.set_title(f"{name} (n={len(values)})", fontsize=9)
        ax.set_xlabel(f"{unit} per example (median dashed)", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


# --- Figure 1: the learning-rate x batch-size sweep -------------------------------------------------

#: The sweep's figures: Figure 1's contour panels and the same scores against the LR/BS ratio.
ABLATION_FIGURE_NAMES = {"fig01": FIGURE_NAMES["fig01"], "fig01b": "fig01b_metric_vs_ratio"}
#: Figure 1's panels in the paper's order; other metrics follow, losses last.
FIGURE1_METRICS = ("ARC (Average)", "GSM8K (5-shot)", "HellaSwag", "IFEval (Average)")
#: Marker and label placement of each Table 2 recipe on the sweep figures (by position in the table).
_RECIPE_MARKERS = ("*", "P", "D", "v", "s", "^")
#: Heights (axes fraction) of the recipe labels on the ratio figure, staggered where ratios are close.
_RATIO_LABEL_HEIGHTS = (1.0, 0.84, 1.0, 0.92)
#: A label's or a marker's box in points on a panel: centre x, centre y, width, height.
Box = tuple[float, float, float, float]
#: Where a recipe's label may go, relative to its marker (points), in order of preference.
_LABEL_CANDIDATES = (
    (5, -13, "left"),
    (5, 13, "left"),
    (-5, -13, "right"),
    (-5, 13, "right"),
    (9, 0, "left"),
    (-9, 0, "right"),
    (5, 22, "left"),
    (-5, 22, "right"),
    (5, -22, "left"),
    (-5, -22, "right"),
)


def _family_color(name: str) -> str:
    return FAMILY_COLORS.get(name, FAMILY_COLORS["Other"])


def _key(label: str, **style) -> Line2D:
    """A legend entry: a line or marker drawn with ``style``, holding no data."""
    return Line2D([], [], label=label, **style)


def _label_box(pad: float, alpha: float) -> dict:
    """The white box behind a label on a busy panel."""
    return {"boxstyle": f"round,pad={pad}", "facecolor": "white", "edgecolor": "none", "alpha": alpha}


def _annotate(ax, text: str, xy, offset: tuple[float, float], box: dict, **style) -> None:
    """``text`` at ``offset`` points from ``xy``, on ``box`` (:func:`_label_box`)."""
    ax.annotate(text, xy, xytext=offset, textcoords="offset points", bbox=box, **style)


def _sweep_data(df) -> pd.DataFrame:
    """A sweep frame from ``df`` (a :func:`~smoltulu_utils.results.sweep_frame` result or a ResultsStore)."""
    data = sweep_frame(df) if isinstance(df, ResultsStore) else df
    missing = {"metric", "lr", "bs", "value"} - set(data.columns)
    if missing:
        raise ValueError(
            f"the sweep frame lacks columns {sorted(missing)}; build it with results.sweep_frame(store)"
        )
    data = data.dropna(subset=["lr", "bs", "value"])
    if data.empty:
        raise ValueError("no sweep rows to plot: run the sweep first (sweep.run_sweep) or check the store")
    data = data.assign(
        lr=data["lr"].astype(float), bs=data["bs"].astype(float), value=data["value"].astype(float)
    )
    if "ratio" not in data.columns or data["ratio"].isna().any():
        data["ratio"] = data["lr"] / data["bs"]
    return data


def _sweep_metrics(data: pd.DataFrame, metrics: Sequence[str] | None) -> list[str]:
    present = list(dict.fromkeys(data["metric"]))
    if metrics is None:
        first = [m for m in FIGURE1_METRICS if m in present]
        rest = [m for m in present if m not in first]
        return first + sorted(rest, key=lower_is_better)  # losses last, otherwise in store order
    chosen = list(metrics)
    unknown = [m for m in chosen if m not in present]
    if unknown:
        raise ValueError(f"no sweep rows for metric(s) {unknown}; the frame has {present}")
    return chosen


def _decimals(values: np.ndarray) -> int:
    """Decimals that tell a panel's values apart: 1 for scores spread over tens, 3 for losses within 0.5."""
    spread = float(np.nanmax(values) - np.nanmin(values)) if len(values) else 0.0
    if not spread > 0:
        return 2
    return int(np.clip(2 - np.floor(np.log10(spread)), 1, 4))


def _metric_title(metric: str) -> str:
    return {"eval_loss": "Eval loss", "train_loss": "Train loss"}.get(metric, metric)


def _panel_grid(n: int, width: float, height: float, cols: int | None = None):
    """``n`` visible panels of ``width`` x ``height`` inches (default columns: 1 to 3, two for four)."""
    cols = cols or (n if n <= 3 else 2 if n == 4 else 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)[:n]


def _finish_sweep_figure(
    fig: Figure, title: str, handles: list, ncols: int, legend_title: str | None
) -> None:
    """The bold title at the top left and the legend under the panels."""
    fig.suptitle(title, x=0.01, ha="left", fontweight="bold")
    fig.tight_layout(rect=(0, 0.0, 1, 0.98))
    fig.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(0.01, 0.0),
        ncols=ncols,
        fontsize=8,
        title=legend_title,
        title_fontsize=8,
        alignment="left",
    )


def _bilinear(xs: np.ndarray, ys: np.ndarray, z: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of ``z[j, i]`` given at ``xs[i]``, ``ys[j]`` onto the mesh ``gx x gy``."""
    ix = np.clip(np.searchsorted(xs, gx) - 1, 0, len(xs) - 2)
    iy = np.clip(np.searchsorted(ys, gy) - 1, 0, len(ys) - 2)
    tx = ((gx - xs[ix]) / (xs[ix + 1] - xs[ix]))[None, :]
    ty = ((gy - ys[iy]) / (ys[iy + 1] - ys[iy]))[:, None]
    z00, z01 = z[np.ix_(iy, ix)], z[np.ix_(iy, ix + 1)]
    z10, z11 = z[np.ix_(iy + 1, ix)], z[np.ix_(iy + 1, ix + 1)]
    return (1 - ty) * ((1 - tx) * z00 + tx * z01) + ty * ((1 - tx) * z10 + tx * z11)


def _interpolate_log_grid(lr: np.ndarray, bs: np.ndarray, values: np.ndarray, size: int = 100):
    """The score on a fine mesh in (log10 LR, log2 BS): bilinear on a full grid, else linear on triangles.

    Returns ``(LR, BS, Z)`` in data units, Z masked outside the cells' hull, or None when the cells
    do not span an area (fewer than two values on an axis, or all on one line).
    """
    from matplotlib.tri import LinearTriInterpolator, Triangulation

    x, y = np.log10(lr), np.log2(bs)
    xs, ys = np.unique(x), np.unique(y)
    if len(xs) < 2 or len(ys) < 2:
        return None
    gx, gy = np.linspace(xs[0], xs[-1], size), np.linspace(ys[0], ys[-1], size)
    if len(x) == len(xs) * len(ys):  # every (lr, bs) pair present: a full rectangular grid
        z = np.full((len(ys), len(xs)), np.nan)
        z[np.searchsorted(ys, y), np.searchsorted(xs, x)] = values
        if not np.isnan(z).any():
            return 10**gx, 2**gy, np.ma.masked_invalid(_bilinear(xs, ys, z, gx, gy))
    try:
        zz = LinearTriInterpolator(Triangulation(x, y), values)(*np.meshgrid(gx, gy))
    except (RuntimeError, ValueError):  # collinear points: nothing to interpolate
        return None
    return 10**gx, 2**gy, zz


def _recipe_frame() -> pd.DataFrame:
    """Table 2's SFT recipes with a short label each (``SFT-1130``, ``Tulu 3 8B``)."""
    recipes = paper_hyperparameters("SFT").reset_index(drop=True)
    short = [
        label.replace("SmolTulu ", "")
        .replace("Tulu 3 SFT ", "Tulu 3 ")
        .replace("8b", "8B")
        .replace("70b", "70B")
        for label in recipes["label"]
    ]
    return recipes.assign(short=short)


def _recipe_legend_label(row) -> str:
    scale = f"{format_lr(row.learning_rate)} / {int(row.batch_size)}"
    if row.family == "SmolTulu":
        return f"{row.label}: {scale} (a {row.model_size} recipe, not tuned for 135M)"
    return f"{row.label}: {scale} ({row.model_size} recipe)"


def _draw_iso_ratio_lines(ax, xlim: tuple[float, float], ylim: tuple[float, float]) -> None:
    """Dashed lines of constant LR/BS, one per decade, labelled just outside the top or right edge."""
    low, high = xlim[0] / ylim[1], xlim[1] / ylim[0]
    lr_line = np.geomspace(xlim[0], xlim[1], 50)
    for exponent in range(int(np.floor(np.log10(low))), int(np.ceil(np.log10(high))) + 1):
        ratio = 10.0**exponent
        ax.plot(
            lr_line, lr_line / ratio, color="0.25", linestyle=(0, (4, 3)), linewidth=0.8, alpha=0.7, zorder=2
        )
        top_lr, right_bs = ratio * ylim[1], xlim[1] / ratio
        if xlim[0] < top_lr <= xlim[1]:  # the line leaves through the top edge
            where, offset, align = (top_lr, ylim[1]), (0, 2), ("center", "bottom")
        elif ylim[0] < right_bs <= ylim[1]:  # ... else through the right edge
            where, offset, align = (xlim[1], right_bs), (3, 0), ("left", "center")
        else:
            continue
        style = {"ha": align[0], "va": align[1], "fontsize": 7, "color": "0.3", "annotation_clip": False}
        ax.annotate(f"$10^{{{exponent}}}$", where, xytext=offset, textcoords="offset points", **style)


def _box_gap(a: Box, b: Box) -> tuple[float, float]:
    """``(distance, overlap area)`` in points of two boxes given as (centre x, centre y, width, height)."""
    apart_x = abs(a[0] - b[0]) - (a[2] + b[2]) / 2
    apart_y = abs(a[1] - b[1]) - (a[3] + b[3]) / 2
    distance = float(np.hypot(max(apart_x, 0.0), max(apart_y, 0.0)))
    overlap_x = min(-apart_x, a[2], b[2]) if apart_x < 0 else 0.0
    overlap_y = min(-apart_y, a[3], b[3]) if apart_y < 0 else 0.0
    return distance, float(overlap_x * overlap_y)


class _LabelPlacer:
    """Puts each recipe label where it is farthest from the cell points, their values and other labels.

    Works in points on the panel (log10 LR across, log2 BS up), from the axes limits and size.
    """

    def __init__(self, ax, xlim: tuple[float, float], ylim: tuple[float, float]):
        box = ax.get_position()
        fig = ax.get_figure()
        self.width = box.width * fig.get_figwidth() * 72
        self.height = box.height * fig.get_figheight() * 72
        self.x0, self.x1 = np.log10(xlim[0]), np.log10(xlim[1])
        self.y0, self.y1 = np.log2(ylim[0]), np.log2(ylim[1])
        self.taken: list[tuple[Box, float]] = []  # (box, weight)

    def point(self, lr: float, bs: float) -> tuple[float, float]:
        x = (np.log10(lr) - self.x0) / (self.x1 - self.x0) * self.width
        y = (np.log2(bs) - self.y0) / (self.y1 - self.y0) * self.height
        return float(x), float(y)

    def take(
        self, lr: float, bs: float, width: float, height: float, dy: float = 0.0, weight: float = 1.0
    ) -> None:
        """Mark a box (a cell, its value, a marker) that labels should avoid; ``weight``: how much."""
        x, y = self.point(lr, bs)
        self.taken.append(((x, y + dy, width, height), weight))

    def place(self, lr: float, bs: float, text: str, fontsize: float) -> tuple[float, float, str]:
        """The offset and alignment of the best of :data:`_LABEL_CANDIDATES` for ``text``; it is taken."""
        x, y = self.point(lr, bs)
        width, height = 0.62 * fontsize * len(text) + 4, fontsize + 3

        def box(candidate: tuple[float, float, str]) -> Box:
            dx, dy, ha = candidate
            return x + dx + (width / 2 if ha == "left" else -width / 2), y + dy, width, height

        def score(candidate: tuple[float, float, str]) -> float:
            label = box(candidate)
            inside = (
                width / 2 <= label[0] <= self.width - width / 2
                and height / 2 <= label[1] <= self.height - height / 2
            )
            gaps = [(*_box_gap(label, other), weight) for other, weight in self.taken]
            nearest = min((g[0] for g in gaps), default=99.0)
            covered = sum(area * weight for _, area, weight in gaps)
            # least area covered first; then, up to 12 pt, the most room; never outside the panel
            return -covered + min(nearest, 12.0) - (0.0 if inside else 1e4)

        best = max(_LABEL_CANDIDATES, key=score)  # the first of equals: the preferred order
        self.taken.append((box(best), 5.0))
        return best


def _fill_contours(ax, part: pd.DataFrame, cmap, norm) -> None:
    """The interpolated score as filled contours (none where the cells span no area), and the cell points."""
    mesh = _interpolate_log_grid(part["lr"].to_numpy(), part["bs"].to_numpy(), part["value"].to_numpy())
    if mesh is not None:
        levels = np.linspace(norm.vmin, norm.vmax, 13)
        ax.contourf(*mesh, levels=levels, cmap=cmap, norm=norm, alpha=0.9, zorder=1)
    points = {"s": 34, "edgecolors": "black", "linewidths": 0.7, "zorder": 4}
    ax.scatter(part["lr"], part["bs"], c=part["value"], cmap=cmap, norm=norm, **points)


def _label_cells(ax, part: pd.DataFrame, cells, placer: _LabelPlacer) -> None:
    """Each cell's value above its point, and an x on the cells without a finite value."""
    decimals = _decimals(part["value"].to_numpy())
    for lr, bs in cells:
        placer.take(lr, bs, 7, 7)
    for row in part.itertuples():
        text = f"{row.value:.{decimals}f}"
        placer.take(row.lr, row.bs, 0.62 * 6.5 * len(text) + 2, 9, dy=8.5)
        style = {"ha": "center", "va": "bottom", "fontsize": 6.5, "color": "black", "zorder": 5}
        _annotate(ax, text, (row.lr, row.bs), (0, 4), _label_box(0.1, 0.6), **style)
    have = set(zip(part["lr"], part["bs"], strict=True))
    gaps = [cell for cell in cells if cell not in have]
    if gaps:
        ax.scatter(*zip(*gaps, strict=True), marker="x", color="0.35", s=30, linewidths=1.2, zorder=4)


def _mark_recipes(ax, table: pd.DataFrame, placer: _LabelPlacer) -> None:
    """Table 2's recipes at their (LR, BS), each with its short label where it covers the least."""
    for row in table.itertuples():
        placer.take(row.learning_rate, row.batch_size, 11, 11, weight=3.0)
    for i, row in table.iterrows():
        colour = _family_color(row["family"])
        where = (row["learning_rate"], row["batch_size"])
        marker = _RECIPE_MARKERS[i % len(_RECIPE_MARKERS)]
        ax.plot(*where, marker, color=colour, markersize=13 if i == 0 else 9, mec="white", mew=1.0, zorder=7)
        dx, dy, ha = placer.place(*where, row["short"], 7)
        style = {"ha": ha, "va": "center", "fontsize": 7, "color": colour, "fontweight": "bold", "zorder": 7}
        _annotate(ax, row["short"], where, (dx, dy), _label_box(0.12, 0.7), **style)


def _contour_panel(fig: Figure, ax, metric: str, part: pd.DataFrame, cells, table, xlim, ylim, ticks) -> None:
    """One panel of Figure 1: contours, cells and values, iso-ratio lines, the recipes, axes and colour bar."""
    lower = lower_is_better(metric)
    cmap = plt.get_cmap("viridis_r" if lower else "viridis")
    vmin, vmax = part["value"].min(), part["value"].max()
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    norm = plt.Normalize(vmin, vmax)
    ax.set_xscale("log")
    ax.set_yscale("log", base=2)
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    _fill_contours(ax, part, cmap, norm)
    placer = _LabelPlacer(ax, xlim, ylim)
    _label_cells(ax, part, cells, placer)
    _draw_iso_ratio_lines(ax, xlim, ylim)
    if table is not None:
        _mark_recipes(ax, table, placer)
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_yticklabels([f"{int(b)}" for b in ticks])
    ax.grid(False)
    ax.set_xlabel("learning rate (log)")
    ax.set_ylabel("effective batch size (log)")
    ax.set_title(_metric_title(metric), fontsize=11, pad=14)
    bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, pad=0.07, fraction=0.06)
    direction = "lower is better, colours reversed" if lower else "higher is better"
    bar.set_label(f"{_metric_title(metric)} ({direction})", fontsize=8)
    bar.ax.tick_params(labelsize=7)


def _contour_legend(data: pd.DataFrame, cells, chosen: list[str], table) -> list[Line2D]:
    handles = [
        _key("sweep cell (its value above)", marker="o", linestyle="", color="0.5", mec="black"),
        _key("constant LR/BS (its ratio where it leaves the panel)", color="0.25", linestyle=(0, (4, 3))),
    ]
    if len(data.groupby(["lr", "bs", "metric"])) < len(cells) * len(chosen):
        handles.append(_key("cell without a finite value", marker="x", linestyle="", color="0.35"))
    for i, row in table.iterrows() if table is not None else ():
        marker = _RECIPE_MARKERS[i % len(_RECIPE_MARKERS)]
        colour = _family_color(row["family"])
        handles.append(
            _key(_recipe_legend_label(row), marker=marker, linestyle="", color=colour, markersize=9)
        )
    return handles


def plot_lr_bs_contours(df, metrics: Sequence[str] | None = None, recipes: bool = True) -> Figure:
    """Figure 1: one panel per metric, score over learning rate (x, log) and effective batch size (y, log).

    ``df``: the sweep's rows from :func:`~smoltulu_utils.results.sweep_frame` (or a ResultsStore).
    Each panel fills contours of the score interpolated on the log grid between the cells (seeds
    averaged), marks every cell with its value (an x where a cell has no finite value), draws dashed
    lines of constant LR/BS (labelled with the ratio) and, with ``recipes``, the SFT recipes of
    Table 2. Brighter is better in every panel: losses use the reversed colour map, as the colour bar
    says. ``metrics`` picks and orders the panels (default: Figure 1's four, then the rest, losses last).
    """
    data = _sweep_data(df)
    chosen = _sweep_metrics(data, metrics)
    table = _recipe_frame() if recipes else None
    lr_all, bs_all = data["lr"].unique(), data["bs"].unique()
    if recipes:
        lr_all = np.concatenate([lr_all, table["learning_rate"].to_numpy(float)])
        bs_all = np.concatenate([bs_all, table["batch_size"].to_numpy(float)])
    xlim = (lr_all.min() / 1.8, lr_all.max() * 1.8)
    ylim = (bs_all.min() / 1.5, bs_all.max() * 2.2)  # room above the top row for labels
    ticks = [b for b in np.unique(bs_all) if ylim[0] <= b <= ylim[1]]
    cells = data.groupby(["lr", "bs"]).size().index  # every cell that reported any metric
    fig, axes = _panel_grid(len(chosen), 5.6, 4.6)
    for ax, metric in zip(axes, chosen, strict=True):
        part = data[data["metric"] == metric].groupby(["lr", "bs"], as_index=False)["value"].mean()
        _contour_panel(fig, ax, metric, part, cells, table, xlim, ylim, ticks)
    models = ", ".join(map(str, dict.fromkeys(data["model"]))) if "model" in data.columns else "the model"
    profiles = ", ".join(map(str, dict.fromkeys(data["profile"]))) if "profile" in data.columns else ""
    title = f"Figure 1 (kit): SFT of {models} over learning rate x effective batch size"
    title += f"\nprofile {profiles}, {len(cells)} cells" if profiles else ""
    legend_title = "Table 2 recipes are marked for reference: none was tuned on the 135M model"
    _finish_sweep_figure(
        fig, title, _contour_legend(data, cells, chosen, table), 2, legend_title if recipes else None
    )
    return fig


def plot_metric_vs_ratio(df, metrics: Sequence[str] | None = None) -> Figure:
    """Each metric against the LR/BS ratio (log x): one marker per cell, coloured by effective batch size.

    Cells of one batch size are joined in ratio order; dotted lines mark the ratios of Table 2's SFT
    recipes. ``df`` as for :func:`plot_lr_bs_contours`.
    """
    data = _sweep_data(df)
    chosen = _sweep_metrics(data, metrics)
    table = _recipe_frame()
    sizes = sorted(data["bs"].unique())
    palette = dict(zip(sizes, sns.color_palette("viridis", len(sizes)), strict=True))
    fig, axes = _panel_grid(len(chosen), 5.0, 3.8)
    low = min(data["ratio"].min(), table["lr_bs_ratio"].min())
    high = max(data["ratio"].max(), table["lr_bs_ratio"].max())
    for ax, metric in zip(axes, chosen, strict=True):
        part = data[data["metric"] == metric]
        for size in sizes:
            line = part[part["bs"] == size].sort_values("ratio")
            if line.empty:
                continue
            ax.plot(line["ratio"], line["value"], color=palette[size], linewidth=1, alpha=0.6, zorder=2)
            points = {"s": 30, "edgecolors": "white", "linewidths": 0.5, "zorder": 3}
            ax.scatter(line["ratio"], line["value"], color=palette[size], **points)
        for i, row in table.iterrows():
            colour = _family_color(row["family"])
            ax.axvline(row["lr_bs_ratio"], color=colour, linestyle=":", linewidth=1.1, zorder=1)
            height = _RATIO_LABEL_HEIGHTS[i % len(_RATIO_LABEL_HEIGHTS)]
            style = {"fontsize": 6.5, "color": colour, "va": "top", "ha": "left", "zorder": 5}
            box, transform = _label_box(0.12, 0.8), ax.get_xaxis_transform()
            ax.text(row["lr_bs_ratio"], height, row["short"], transform=transform, bbox=box, **style)
        ax.set_xscale("log")
        ax.set_xlim(low / 2.5, high * 2.5)
        ax.set_xlabel("learning rate / effective batch size (log)")
        direction = "lower is better" if lower_is_better(metric) else "higher is better"
        ax.set_ylabel(f"{_metric_title(metric)} ({direction})", fontsize=9)
        ax.set_title(_metric_title(metric), fontsize=11)
    handles = [_key(f"{int(s)}", marker="o", linestyle="-", color=palette[s]) for s in sizes]
    handles.append(_key("Table 2 recipe ratio (1.7B / 8B / 70B runs)", color="0.4", linestyle=":"))
    title = "Sweep scores against the LR/BS ratio (one marker per cell)"
    _finish_sweep_figure(fig, title, handles, min(len(handles), 8), "effective batch size")
    return fig


def save_ablation_figures(df, directory: str | Path | None = None) -> dict[str, list[Path]]:
    """Draw and save both sweep figures (``fig01_lr_bs_contours``, ``fig01b_metric_vs_ratio``); return the paths."""
    saved = {}
    for key, draw in (("fig01", plot_lr_bs_contours), ("fig01b", plot_metric_vs_ratio)):
        fig = draw(df)
        try:
            saved[key] = save_figure(fig, ABLATION_FIGURE_NAMES[key], directory)
        finally:
            plt.close(fig)
    return saved


# --- the data tables: contamination (Tables 1, 4, 13) and languages (Tables 10, 11, 12) -------------

#: Bar colours of the data tables: the paper's numbers, and the kit's (hatched).
DATA_COLORS = {"paper": FAMILY_COLORS["SmolTulu"], "kit": FAMILY_COLORS["Tulu 3"]}


def _paper_and_kit(table: pd.DataFrame) -> tuple[pd.Series, pd.Series | None]:
    """The paper column and the kit column (or None) of a data table from :mod:`~smoltulu_utils.tables`."""
    paper_cols = [c for c in table.columns if str(c).endswith("(paper)")]
    kit_cols = [c for c in table.columns if str(c).endswith("(kit)") and not str(c).startswith("Items")]
    if paper_cols:
        return table[paper_cols[0]].astype(float), table[kit_cols[0]].astype(float) if kit_cols else None
    return table.iloc[:, 0].astype(float), None


def _paired_bars(tables: Sequence[pd.DataFrame], xlabel: str, title: str) -> Figure:
    """One panel per table: a horizontal bar per row for the paper, a hatched one beside it for the kit."""
    heights = [max(len(t), 1) for t in tables]
    fig, axes = plt.subplots(
        1, len(tables), figsize=(4.6 * len(tables), 1.3 + 0.26 * max(heights)), squeeze=False
    )
    for ax, table in zip(axes[0], tables, strict=True):
        paper, kit = _paper_and_kit(table)
        y = np.arange(len(table))[::-1]
        width = 0.4 if kit is not None else 0.7
        offset = width / 2 if kit is not None else 0.0
        sides = [("paper", paper, offset, None)]
        if kit is not None:
            sides.append(("kit", kit, -offset, "///"))
        top = np.nanmax([np.nanmax(s[1].to_numpy(dtype=float), initial=0.0) for s in sides]) or 1.0
        for name, values, shift, hatch in sides:
            heights_ = values.to_numpy(dtype=float)
            style = {"color": DATA_COLORS[name], "hatch": hatch, "edgecolor": "white", "label": name}
            bars = ax.barh(y + shift, np.nan_to_num(heights_), height=width * 0.95, **style)
            labels = ["–" if np.isnan(h) else f"{h:.2f}" for h in heights_]
            ax.bar_label(bars, labels=labels, padding=2, fontsize=6.5, color="0.25")
        ax.set_yticks(y, [str(i) for i in table.index], fontsize=7.5)
        ax.set_xlim(0, top * 1.25)
        ax.set_ylim(-0.6, len(table) - 0.4)
        ax.grid(axis="y", visible=False)
        ax.set_xlabel(xlabel, fontsize=9)
        number, _, rest = str(table.attrs.get("caption", "")).partition(":")
        ax.set_title("\n".join([number, *textwrap.wrap(rest.strip(), 44)]), fontsize=9)
    handles = [_key("paper", color=DATA_COLORS["paper"], linewidth=6)]
    if any(_paper_and_kit(t)[1] is not None for t in tables):
        handles.append(_key("kit (hatched)", color=DATA_COLORS["kit"], linewidth=6))
    fig.legend(handles=handles, loc="upper right", ncols=len(handles), bbox_to_anchor=(0.99, 1.0))
    fig.suptitle(title, x=0.01, ha="left", fontweight="bold")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return fig


def plot_contamination(tables: Sequence[pd.DataFrame] | None = None) -> Figure:
    """Tables 1, 4 and 13 as bars: percent of each benchmark's items found in the SFT, preference, RLVR mixtures.

    ``tables`` defaults to the paper's (``tables.table1()``, ``table4()``, ``table13()``); pass the same
    tables built with kit results (``table1(store)``...) to draw the kit's bars (hatched) beside them.
    """
    from .tables import build_table

    tables = [build_table(n) for n in (1, 4, 13)] if tables is None else list(tables)
    return _paired_bars(tables, "benchmark items found in the mixture (%)", "Benchmark contamination")


def plot_language_distribution(tables: Sequence[pd.DataFrame] | None = None) -> Figure:
    """Tables 10, 11 and 12 as bars: the share of each language in the SFT, preference and RLVR mixtures.

    ``tables`` defaults to the paper's (``tables.table10()``, ``table11()``, ``table12()``); tables built
    with kit results add the kit's bars (hatched).
    """
    from .tables import build_table

    tables = [build_table(n) for n in (10, 11, 12)] if tables is None else list(tables)
    return _paired_bars(tables, "share of the mixture's rows (%)", "Language distribution")


#: Panel titles of training curves (the RLVR log keys, :data:`smoltulu_utils.rlvr.LOG_KEYS`, and the
#: stages' curves); a curve without one is titled by its name.
CURVE_LABELS = {
    "train_loss": "training loss",
    "train_accuracy": "batch pair accuracy",
    "rewards/margins": "reward margin (chosen - rejected)",
    "rewards/accuracies": "batch pair accuracy",
    "verifiable_reward": "verified share",
    "kl": "KL to the reference (per response)",
    "response_length": "response length (tokens)",
    "non_stop_rate": "share never ending",
    "value_loss": "value loss",
    "clip_fraction": "clip fraction",
}


def plot_training_curves(
    curves: pd.DataFrame, panels: Sequence[str] | None = None, xlabel: str = "step"
) -> Figure:
    """One panel per stage and curve of ``curves`` (:func:`~smoltulu_utils.results.curves_frame`), a line
    per run: stages in pipeline order, the training loss first; ``panels`` picks curves by name, in order."""
    stages = ["sft", "dpo", "rm", "rlvr"]
    pairs = dict.fromkeys(zip(curves["stage"], curves["curve"], strict=True))
    keys = [(stage, name) for stage, name in pairs if not panels or name in panels]

    def order(key: tuple[str, str]) -> tuple[int, int]:
        stage, name = key
        rank = list(panels).index(name) if panels else int(name != "train_loss")
        return (stages.index(stage) if stage in stages else len(stages), rank)

    keys.sort(key=order)
    if not keys:
        raise ValueError("no training curves to plot: append a run's curve_rows to the results store first")
    fig, axes = _panel_grid(len(keys), 4.2, 3.2)
    several = len({stage for stage, _ in keys}) > 1
    for ax, (stage, name) in zip(axes, keys, strict=True):
        panel = curves[(curves["stage"] == stage) & (curves["curve"] == name)]
        for run, group in panel.groupby("run_id", sort=False):
            ax.plot(group["step"], group["value"], marker="o", markersize=3, label=run)
        ax.set_xlabel(xlabel)
        ax.set_title((f"{stage}: " if several else "") + CURVE_LABELS.get(name, name))
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_rlvr_curves(results, keys: Sequence[str] = ("verifiable_reward", "kl", "response_length")) -> Figure:
    """One panel per RLVR log key, one line per run (``results``: label -> ``RLVRResult``), over iterations."""
    points = [
        {"run_id": label, "stage": "rlvr", "curve": key, "step": step, "value": value}
        for label, result in results.items()
        for key in keys
        for step, value in result.curve(key)
    ]
    frame = pd.DataFrame(points, columns=["run_id", "stage", "curve", "step", "value"])
    return plot_training_curves(frame, keys, xlabel="iteration")
