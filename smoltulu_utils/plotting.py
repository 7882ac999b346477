"""One figure style and one save function for every figure of the kit, and the paper-data figures.

- :func:`set_style`: the seaborn theme every notebook calls once; readable on screen and in print.
- :data:`FAMILY_COLORS` / :func:`model_color`: a fixed palette, so SmolTulu is always blue, Tulu 3
  always orange and the other model families keep their colours across figures.
- :func:`save_figure`: writes ``<name>.png`` (150 dpi) and ``<name>.pdf`` under ``figures_dir()``,
  names paper-numbered like ``fig01_lr_bs_contours`` or ``table09_benchmarks``.
- :func:`plot_lr_bs_ratios` (Tables 2, 5, 7) and :func:`plot_benchmark_comparison` (Table 9).
- :func:`plot_contamination` (Tables 1, 4, 13) and :func:`plot_language_distribution` (Tables 10-12).

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

from .paper import canonical_model, family, format_lr, paper_hyperparameters, paper_results, table_caption
from .paths import figures_dir
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

    fig, axes = plt.subplots(
        len(order),
        1,
        sharex=True,
        figsize=(9, 1.1 + 0.48 * sum(sizes) + 0.45 * len(order)),
        gridspec_kw={"height_ratios": sizes, "hspace": 0.45},
        squeeze=False,
    )
    low, high = data["ratio"].min() / 4, data["ratio"].max() * 40
    footnotes = []
    for ax, stage in zip(axes[:, 0], order, strict=True):
        part = data[data["stage"] == stage].reset_index(drop=True)
        y = np.arange(len(part))[::-1]
        for yi, row in zip(y, part.itertuples(), strict=True):
            colour = FAMILY_COLORS.get(row.family, FAMILY_COLORS["Other"])
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
    handles = [Line2D([], [], marker="o", linestyle="", color=FAMILY_COLORS[f], label=f) for f in families]
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
        hatch = "///" if "(kit" in model else None
        bars = ax.bar(
            offsets,
            heights,
            width * 0.92,
            label=model,
            color=model_color(model),
            hatch=hatch,
            edgecolor="white",
        )
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
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        values = np.asarray(lengths[name], dtype=float)
        ax.hist(values, bins=bins, color=FAMILY_COLORS["SmolTulu"], alpha=0.85)
        ax.axvline(np.median(values), color="0.2", linestyle="--", linewidth=1)
        ax.set_title(f"{name} (n={len(values)})", fontsize=9)
        ax.set_xlabel(f"{unit} per example (median dashed)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
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


def _sweep_data(df) -> pd.DataFrame:
    """A sweep frame from ``df`` (a :func:`~smoltulu_utils.sweep.sweep_frame` result or a ResultsStore)."""
    from .results import ResultsStore
    from .sweep import sweep_frame

    data = sweep_frame(df) if isinstance(df, ResultsStore) else df
    missing = {"metric", "lr", "bs", "value"} - set(data.columns)
    if missing:
        raise ValueError(
            f"the sweep frame lacks columns {sorted(missing)}; build it with sweep.sweep_frame(store)"
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
    from .sweep import lower_is_better

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


def _direction(metric: str) -> str:
    from .sweep import lower_is_better

    return "lower is better" if lower_is_better(metric) else "higher is better"


def _panel_grid(n: int, width: float, height: float):
    cols = n if n <= 3 else 2 if n == 4 else 3
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)[:n]


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
            zz = _bilinear(xs, ys, z, gx, gy)
            return 10**gx, 2**gy, np.ma.masked_invalid(zz)
    try:
        tri = Triangulation(x, y)
        gxx, gyy = np.meshgrid(gx, gy)
        zz = LinearTriInterpolator(tri, values)(gxx, gyy)
    except (RuntimeError, ValueError):  # collinear points: nothing to interpolate
        return None
    return 10**gx, 2**gy, zz


def _recipe_frame() -> pd.DataFrame:
    recipes = paper_hyperparameters("SFT").reset_index(drop=True)
    return recipes.assign(
        short=[
            label.replace("SmolTulu ", "")
            .replace("Tulu 3 SFT ", "Tulu 3 ")
            .replace("8b", "8B")
            .replace("70b", "70B")
            for label in recipes["label"]
        ]
    )


def _recipe_legend_label(row) -> str:
    size = str(row.model_size)
    scale = f"{format_lr(row.learning_rate)} / {int(row.batch_size)}"
    if row.family == "SmolTulu":
        return f"{row.label}: {scale} (a {size} recipe, not tuned for 135M)"
    return f"{row.label}: {scale} ({size} recipe)"


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
        ax.annotate(
            f"$10^{{{exponent}}}$",
            where,
            xytext=offset,
            textcoords="offset points",
            ha=align[0],
            va=align[1],
            fontsize=7,
            color="0.3",
            annotation_clip=False,
        )


def _box_gap(
    a: tuple[float, float, float, float], b: tuple[float, float, float, float]
) -> tuple[float, float]:
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
        self.taken: list[tuple[tuple[float, float, float, float], float]] = []  # (box, weight)

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
        x, y = self.point(lr, bs)
        width, height = 0.62 * fontsize * len(text) + 4, fontsize + 3

        def score(candidate: tuple[float, float, str]) -> float:
            dx, dy, ha = candidate
            cx = x + dx + (width / 2 if ha == "left" else -width / 2)
            label = (cx, y + dy, width, height)
            inside = (
                width / 2 <= cx <= self.width - width / 2 and height / 2 <= y + dy <= self.height - height / 2
            )
            gaps = [(*_box_gap(label, other), weight) for other, weight in self.taken]
            nearest = min((g[0] for g in gaps), default=99.0)
            covered = sum(area * weight for _, area, weight in gaps)
            # least area covered first; then, up to 12 pt, the most room; never outside the panel
            return -covered + min(nearest, 12.0) - (0.0 if inside else 1e4)

        best = max(_LABEL_CANDIDATES, key=score)  # the first of equals: the preferred order
        dx, dy, ha = best
        self.taken.append(
            ((x + dx + (width / 2 if ha == "left" else -width / 2), y + dy, width, height), 5.0)
        )
        return best


def plot_lr_bs_contours(df, metrics: Sequence[str] | None = None, recipes: bool = True) -> Figure:
    """Figure 1: one panel per metric, score over learning rate (x, log) and effective batch size (y, log).

    ``df``: the sweep's rows from :func:`~smoltulu_utils.sweep.sweep_frame` (or a ResultsStore).
    Each panel fills contours of the score interpolated on the log grid between the cells (seeds
    averaged), marks every cell with its value (an x where a cell has no finite value), draws dashed
    lines of constant LR/BS (labelled with the ratio) and, with ``recipes``, the SFT recipes of
    Table 2. Brighter is better in every panel: losses use the reversed colour map, as the colour bar
    says. ``metrics`` picks and orders the panels (default: Figure 1's four, then the rest, losses last).
    """
    from matplotlib.ticker import FixedLocator, NullLocator

    from .sweep import lower_is_better

    data = _sweep_data(df)
    chosen = _sweep_metrics(data, metrics)
    table = _recipe_frame() if recipes else None
    lrs = np.sort(data["lr"].unique())
    sizes = np.sort(data["bs"].unique())
    lr_all = np.concatenate([lrs, table["learning_rate"].to_numpy(float)]) if recipes else lrs
    bs_all = np.concatenate([sizes, table["batch_size"].to_numpy(float)]) if recipes else sizes
    xlim = (lr_all.min() / 1.8, lr_all.max() * 1.8)
    ylim = (bs_all.min() / 1.5, bs_all.max() * 2.2)  # room above the top row for labels
    cells = data.groupby(["lr", "bs"]).size().index  # every cell that reported any metric

    fig, axes = _panel_grid(len(chosen), 5.6, 4.6)
    for ax, metric in zip(axes, chosen, strict=True):
        part = data[data["metric"] == metric].groupby(["lr", "bs"], as_index=False)["value"].mean()
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
        mesh = _interpolate_log_grid(part["lr"].to_numpy(), part["bs"].to_numpy(), part["value"].to_numpy())
        if mesh is not None:
            ax.contourf(*mesh, levels=np.linspace(vmin, vmax, 13), cmap=cmap, norm=norm, alpha=0.9, zorder=1)
        ax.scatter(
            part["lr"],
            part["bs"],
            c=part["value"],
            cmap=cmap,
            norm=norm,
            s=34,
            edgecolors="black",
            linewidths=0.7,
            zorder=4,
        )
        decimals = _decimals(part["value"].to_numpy())
        placer = _LabelPlacer(ax, xlim, ylim)
        for lr, bs in cells:
            placer.take(lr, bs, 7, 7)
        for row in part.itertuples():
            placer.take(row.lr, row.bs, 0.62 * 6.5 * len(f"{row.value:.{decimals}f}") + 2, 9, dy=8.5)
            ax.annotate(
                f"{row.value:.{decimals}f}",
                (row.lr, row.bs),
                xytext=(0, 4),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize=6.5,
                color="black",
                zorder=5,
                bbox={"boxstyle": "round,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.6},
            )
        have = set(zip(part["lr"], part["bs"], strict=True))
        gaps = [cell for cell in cells if cell not in have]
        if gaps:
            ax.scatter(*zip(*gaps, strict=True), marker="x", color="0.35", s=30, linewidths=1.2, zorder=4)
        _draw_iso_ratio_lines(ax, xlim, ylim)
        if recipes:
            for row in table.itertuples():
                placer.take(row.learning_rate, row.batch_size, 11, 11, weight=3.0)
            for i, row in table.iterrows():
                colour = FAMILY_COLORS.get(row["family"], FAMILY_COLORS["Other"])
                ax.plot(
                    row["learning_rate"],
                    row["batch_size"],
                    _RECIPE_MARKERS[i % len(_RECIPE_MARKERS)],
                    color=colour,
                    markersize=13 if i == 0 else 9,
                    markeredgecolor="white",
                    markeredgewidth=1.0,
                    zorder=7,
                )
                dx, dy, ha = placer.place(row["learning_rate"], row["batch_size"], row["short"], 7)
                ax.annotate(
                    row["short"],
                    (row["learning_rate"], row["batch_size"]),
                    xytext=(dx, dy),
                    textcoords="offset points",
                    ha=ha,
                    va="center",
                    fontsize=7,
                    color=colour,
                    fontweight="bold",
                    zorder=7,
                    bbox={
                        "boxstyle": "round,pad=0.12",
                        "facecolor": "white",
                        "edgecolor": "none",
                        "alpha": 0.7,
                    },
                )
        ticks = [b for b in np.unique(bs_all) if ylim[0] <= b <= ylim[1]]
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

    handles = [
        Line2D(
            [],
            [],
            marker="o",
            linestyle="",
            color="0.5",
            markeredgecolor="black",
            label="sweep cell (its value above)",
        ),
        Line2D(
            [],
            [],
            color="0.25",
            linestyle=(0, (4, 3)),
            label="constant LR/BS (its ratio where it leaves the panel)",
        ),
    ]
    if len(data.groupby(["lr", "bs", "metric"])) < len(cells) * len(chosen):
        handles.append(
            Line2D([], [], marker="x", linestyle="", color="0.35", label="cell without a finite value")
        )
    if recipes:
        for i, row in table.iterrows():
            handles.append(
                Line2D(
                    [],
                    [],
                    marker=_RECIPE_MARKERS[i % len(_RECIPE_MARKERS)],
                    linestyle="",
                    color=FAMILY_COLORS.get(row["family"], FAMILY_COLORS["Other"]),
                    markersize=9,
                    label=_recipe_legend_label(row),
                )
            )
    models = (
        ", ".join(str(m) for m in dict.fromkeys(data["model"])) if "model" in data.columns else "the model"
    )
    profiles = ", ".join(str(p) for p in dict.fromkeys(data["profile"])) if "profile" in data.columns else ""
    fig.suptitle(
        f"Figure 1 (kit): SFT of {models} over learning rate x effective batch size"
        + (f"\nprofile {profiles}, {len(cells)} cells" if profiles else ""),
        x=0.01,
        ha="left",
        fontweight="bold",
    )
    fig.tight_layout(rect=(0, 0.0, 1, 0.98))
    fig.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(0.01, 0.0),
        ncols=2,
        fontsize=8,
        title="Table 2 recipes are marked for reference: none was tuned on the 135M model"
        if recipes
        else None,
        title_fontsize=8,
        alignment="left",
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
    low, high = data["ratio"].min(), data["ratio"].max()
    low, high = min(low, table["lr_bs_ratio"].min()), max(high, table["lr_bs_ratio"].max())
    for ax, metric in zip(axes, chosen, strict=True):
        part = data[data["metric"] == metric]
        for size in sizes:
            line = part[part["bs"] == size].sort_values("ratio")
            if line.empty:
                continue
            ax.plot(line["ratio"], line["value"], color=palette[size], linewidth=1, alpha=0.6, zorder=2)
            ax.scatter(
                line["ratio"],
                line["value"],
                color=palette[size],
                s=30,
                edgecolors="white",
                linewidths=0.5,
                zorder=3,
            )
        for i, row in table.iterrows():
            colour = FAMILY_COLORS.get(row["family"], FAMILY_COLORS["Other"])
            ax.axvline(row["lr_bs_ratio"], color=colour, linestyle=":", linewidth=1.1, zorder=1)
            ax.text(
                row["lr_bs_ratio"],
                _RATIO_LABEL_HEIGHTS[i % len(_RATIO_LABEL_HEIGHTS)],
                row["short"],
                transform=ax.get_xaxis_transform(),
                fontsize=6.5,
                color=colour,
                va="top",
                ha="left",
                zorder=5,
                bbox={"boxstyle": "round,pad=0.12", "facecolor": "white", "edgecolor": "none", "alpha": 0.8},
            )
        ax.set_xscale("log")
        ax.set_xlim(low / 2.5, high * 2.5)
        ax.set_xlabel("learning rate / effective batch size (log)")
        ax.set_ylabel(f"{_metric_title(metric)} ({_direction(metric)})", fontsize=9)
        ax.set_title(_metric_title(metric), fontsize=11)
    handles = [Line2D([], [], marker="o", linestyle="-", color=palette[s], label=f"{int(s)}") for s in sizes]
    handles.append(
        Line2D([], [], color="0.4", linestyle=":", label="Table 2 recipe ratio (1.7B / 8B / 70B runs)")
    )
    fig.suptitle(
        "Sweep scores against the LR/BS ratio (one marker per cell)", x=0.01, ha="left", fontweight="bold"
    )
    fig.tight_layout(rect=(0, 0.0, 1, 0.98))
    fig.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(0.01, 0.0),
        ncols=min(len(handles), 8),
        fontsize=8,
        title="effective batch size",
        title_fontsize=8,
        alignment="left",
    )
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

FIGURE_NAMES.update(
    {"contamination": "tables01_04_13_contamination", "languages": "tables10_11_12_languages"}
)
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
        1,
        len(tables),
        figsize=(4.6 * len(tables), 1.3 + 0.26 * max(heights)),
        squeeze=False,
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
            bars = ax.barh(
                y + shift,
                np.nan_to_num(heights_),
                height=width * 0.95,
                color=DATA_COLORS[name],
                hatch=hatch,
                edgecolor="white",
                label=name,
            )
            labels = ["–" if np.isnan(h) else f"{h:.2f}" for h in heights_]
            ax.bar_label(bars, labels=labels, padding=2, fontsize=6.5, color="0.25")
        ax.set_yticks(y, [str(i) for i in table.index], fontsize=7.5)
        ax.set_xlim(0, top * 1.25)
        ax.set_ylim(-0.6, len(table) - 0.4)
        ax.grid(axis="y", visible=False)
        ax.set_xlabel(xlabel, fontsize=9)
        number, _, rest = str(table.attrs.get("caption", "")).partition(":")
        ax.set_title("\n".join([number, *textwrap.wrap(rest.strip(), 44)]), fontsize=9)
    handles = [Line2D([], [], color=DATA_COLORS["paper"], linewidth=6, label="paper")]
    if any(_paper_and_kit(t)[1] is not None for t in tables):
        handles.append(Line2D([], [], color=DATA_COLORS["kit"], linewidth=6, label="kit (hatched)"))
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
