"""The paper's tables rebuilt from ``data/paper`` and, beside them, the kit's numbers from results rows.

Hyperparameter tables (2, 5, 7) get one row per kit run; results tables (3, 6, 8, 9) and data tables
(1, 4, 13: contamination; 10, 11, 12: languages) get ``"<column> (paper)"``, ``"(kit)"`` and ``"Δ"``
(kit minus paper) columns where kit numbers exist. Each table's ``attrs`` carry its rendering (decimals
as printed, bold and delta columns, notes), so :func:`to_markdown`, :func:`to_latex` and
:func:`save_table` print the paper's digits, never float noise.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from .paper import (
    CONTAMINATION_TABLES,
    DATA_TABLE_MIXTURES,
    canonical_benchmark,
    canonical_model,
    format_lr,
    paper_benchmarks,
    paper_contamination,
    paper_hyperparameters,
    paper_languages,
    paper_models,
    paper_results,
    table_caption,
)
from .paths import results_dir
from .results import (
    CONTAMINATION_METRIC,
    DPO_STAGE,
    EFFECTIVE_BATCH_SIZE,
    LANGUAGE_METRIC,
    LEARNING_RATE,
    RM_STAGE,
    SFT_STAGE,
    ResultsStore,
    latest_rows,
)

#: Output names (without extension) of the rendered tables, paper-numbered.
TABLE_NAMES = {
    1: "table01_sft_contamination",
    2: "table02_sft_hyperparameters",
    3: "table03_sft_results",
    4: "table04_preference_contamination",
    5: "table05_dpo_hyperparameters",
    6: "table06_dpo_results",
    7: "table07_rm_hyperparameters",
    8: "table08_rm_results",
    9: "table09_benchmarks",
    10: "table10_sft_languages",
    11: "table11_preference_languages",
    12: "table12_rlvr_languages",
    13: "table13_rlvr_contamination",
}
#: The stage of the results rows that feed each hyperparameter table.
_HYPER_STAGES = {2: SFT_STAGE, 5: DPO_STAGE, 7: RM_STAGE}
_NAME_RE = re.compile(r"^[a-z0-9]+(?:_[a-z0-9]+)*$")

KitLike = pd.DataFrame | ResultsStore | Iterable[Mapping[str, Any]] | None
#: The metric a results table takes from the kit rows: one name, or benchmark -> name.
Metric = str | Mapping[str, str] | None


def validate_name(name: str) -> str:
    """Check an output name: lowercase letters, digits and single underscores, no extension."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"bad output name {name!r}: use lowercase letters, digits and underscores, no extension, "
            "paper-numbered (e.g. 'fig01_lr_bs_contours', 'table09_benchmarks')"
        )
    return name


def _kit_frame(kit: KitLike) -> pd.DataFrame | None:
    """Results rows as a DataFrame from a :class:`ResultsStore`, a DataFrame or a list of row dicts."""
    if kit is None:
        return None
    if isinstance(kit, ResultsStore):
        return kit.read()
    if isinstance(kit, pd.DataFrame):
        return kit
    return pd.DataFrame.from_records(list(kit))


def _newest(frame: pd.DataFrame) -> pd.DataFrame:
    """The newest row per model, benchmark and metric (``created_at`` parsed whatever its ISO format)."""
    if "created_at" in frame.columns:
        times = pd.to_datetime(frame["created_at"], utc=True, format="ISO8601", errors="coerce")
        frame = frame.assign(created_at=times)
    return latest_rows(frame, ("model", "benchmark", "metric"))


def _with_attrs(
    table: pd.DataFrame,
    number: int | str,
    caption: str,
    decimals: int | None,
    notes: list[str],
    *,
    bold: Iterable[str] = (),
    deltas: Iterable[str] = (),
    kit: Iterable[str] = (),
) -> pd.DataFrame:
    """``table`` with the rendering details that :func:`to_markdown` and :func:`to_latex` read."""
    table.attrs.update(table=number, caption=caption, decimals=decimals, bold_columns=list(bold))
    table.attrs.update(delta_columns=list(deltas), kit_columns=list(kit), notes=notes)
    return table


# --- hyperparameter tables -------------------------------------------------------------------


def _kit_recipes(kit: pd.DataFrame | None, number: int, scale: float, ratio_col: str) -> pd.DataFrame:
    columns = ["Model size", "Learning rate", "Batch size", ratio_col]
    if kit is None or kit.empty or "settings" not in kit.columns:
        return pd.DataFrame(columns=columns)
    rows: dict[str, list[Any]] = {}
    for record in kit.to_dict("records"):
        settings = record.get("settings")
        if record.get("stage") != _HYPER_STAGES[number] or not isinstance(settings, Mapping):
            continue
        lr, bs = settings.get(LEARNING_RATE), settings.get(EFFECTIVE_BATCH_SIZE)
        if lr is None or bs is None:
            continue
        # one row per run: a sweep's runs share a model and differ in run_id
        label = f"{record['model']} (kit run {record['run_id']})"
        rows[label] = ["", format_lr(float(lr)), int(bs), f"{float(lr) / int(bs) * scale:.4g}"]
    return pd.DataFrame.from_dict(rows, orient="index", columns=columns)


def _hyperparameter_table(number: int, kit: KitLike) -> pd.DataFrame:
    hyper = paper_hyperparameters(number)
    ratio_col = f"LR/BS ratio ({hyper['ratio_scale'].iloc[0]})"
    table = pd.DataFrame(
        {
            "Model size": hyper["model_size"].to_numpy(),
            "Learning rate": hyper["learning_rate_printed"].to_numpy(),
            "Batch size": hyper["batch_size"].to_numpy(),
            ratio_col: hyper["lr_bs_ratio_printed"].to_numpy(),
        },
        index=pd.Index(hyper["label"], name="Recipe"),
    )
    extra = _kit_recipes(_kit_frame(kit), number, float(hyper["scale"].iloc[0]), ratio_col)
    if not extra.empty:
        table = pd.concat([table, extra])
        table.index.name = "Recipe"
    notes = [f"{row.label}: {row.note}." for row in hyper.itertuples() if row.note]
    if number == 7:
        notes.append("Table 7 compares the RM ratios with Tulu 3's DPO recipe, not Tulu 3's RM recipe.")
    return _with_attrs(table, number, table_caption(number), None, notes)


def table2(kit: KitLike = None) -> pd.DataFrame:
    """Table 2, SFT hyperparameters; kit SFT runs (settings learning_rate, effective_batch_size) are added below."""
    return _hyperparameter_table(2, kit)


def table5(kit: KitLike = None) -> pd.DataFrame:
    """Table 5, DPO hyperparameters; kit DPO runs are added below."""
    return _hyperparameter_table(5, kit)


def table7(kit: KitLike = None) -> pd.DataFrame:
    """Table 7, reward-model hyperparameters (Tulu 3 column as printed: its DPO recipe); kit RM runs below."""
    return _hyperparameter_table(7, kit)


# --- results tables --------------------------------------------------------------------------


def _kit_values(kit: pd.DataFrame | None, benchmarks: tuple[str, ...], metric: Metric) -> pd.DataFrame:
    """Kit values as a benchmark x model frame, matched to the table's benchmark labels."""
    empty = pd.DataFrame(index=pd.Index(benchmarks))
    if kit is None or kit.empty:
        return empty
    by_key = {canonical_benchmark(b): b for b in benchmarks}
    frame = kit.copy()
    model = frame["model"]
    if "paper_model" in frame.columns:
        model = frame["paper_model"].where(frame["paper_model"].notna() & (frame["paper_model"] != ""), model)
    frame["model"] = model.astype(str).map(canonical_model)
    frame["benchmark"] = frame["benchmark"].astype(str).map(lambda b: by_key.get(canonical_benchmark(b)))
    frame = frame[frame["benchmark"].notna()]
    if isinstance(metric, Mapping):
        wanted = {by_key.get(canonical_benchmark(k), k): v for k, v in metric.items()}
        keep = [wanted.get(b) in (None, m) for b, m in zip(frame["benchmark"], frame["metric"], strict=True)]
        frame = frame[keep]
    elif metric is not None:
        frame = frame[frame["metric"] == metric]
    if frame.empty:
        return empty
    frame = _newest(frame)
    counts = frame.groupby(["model", "benchmark"])["metric"].nunique()
    clash = counts[counts > 1]
    if len(clash):
        (model_name, bench), _ = next(iter(clash.items()))
        found = sorted(frame[(frame["model"] == model_name) & (frame["benchmark"] == bench)]["metric"])
        raise ValueError(
            f"kit results hold several metrics for {model_name!r} on {bench!r}: {found}; "
            "pass metric='...' or metric={benchmark: metric} to choose the one the paper reports"
        )
    wide = frame.pivot(index="benchmark", columns="model", values="value")
    return wide.reindex(benchmarks).astype(float)


def results_table(
    number: int | str, kit: KitLike = None, *, metric: Metric = None, include_unmatched: bool = False
) -> pd.DataFrame:
    """Any results table of ``data/paper`` (3, 6, 8, 9, ``"model_card"``, ``"rm_card"``) with kit numbers; see :func:`table3`."""
    paper = paper_results(number)
    models, benchmarks = paper_models(number), paper_benchmarks(number)
    decimals = int(paper["decimals"].max())
    wide = paper.pivot(index="benchmark", columns="model", values="value").reindex(
        index=list(benchmarks), columns=list(models)
    )
    kit_wide = _kit_values(_kit_frame(kit), benchmarks, metric)
    columns: dict[str, pd.Series] = {}
    bold, deltas, kit_cols = [], [], []
    for model in models:
        kit_series = kit_wide[model] if model in kit_wide.columns else None
        if kit_series is None or kit_series.isna().all():
            columns[model] = wide[model]
            bold.append(model)
            continue
        columns[f"{model} (paper)"] = wide[model]
        columns[f"{model} (kit)"] = kit_series
        columns[f"{model} Δ"] = (kit_series - wide[model]).round(decimals)
        bold.append(f"{model} (paper)")
        kit_cols.append(f"{model} (kit)")
        deltas.append(f"{model} Δ")
    if include_unmatched:
        for model in kit_wide.columns:
            if model not in models and kit_wide[model].notna().any():
                columns[f"{model} (kit)"] = kit_wide[model]
                kit_cols.append(f"{model} (kit)")
    table = pd.DataFrame(columns, index=pd.Index(list(benchmarks), name="Benchmark"))
    notes = ["(paper): as printed in the paper; (kit): this kit's run; Δ = kit − paper."] if kit_cols else []
    caption = table_caption(number)
    return _with_attrs(table, number, caption, decimals, notes, bold=bold, deltas=deltas, kit=kit_cols)


def table3(kit: KitLike = None, *, metric: Metric = None, include_unmatched: bool = False) -> pd.DataFrame:
    """Table 3, SFT models on the seven benchmarks; kit numbers beside the paper's with Δ.

    Kit rows match a paper column by ``paper_model`` (if present) or ``model`` (aliases such as Hub ids
    accepted) and by benchmark label (``"gsm8k"`` matches ``"GSM8K (5-shot)"``); the newest row wins.
    Kit values must be in percent, like the paper's. ``metric`` picks one metric (a name, or a dict
    benchmark -> name) when the kit logged several; ``include_unmatched`` adds columns for kit
    models that are not in the table.
    """
    return results_table(3, kit, metric=metric, include_unmatched=include_unmatched)


def table6(kit: KitLike = None, *, metric: Metric = None, include_unmatched: bool = False) -> pd.DataFrame:
    """Table 6, DPO models on the seven benchmarks; kit numbers as in :func:`table3`."""
    return results_table(6, kit, metric=metric, include_unmatched=include_unmatched)


def table8(kit: KitLike = None, *, metric: Metric = None, include_unmatched: bool = False) -> pd.DataFrame:
    """Table 8, reward models on RewardBench subsets and UltraFeedback test_prefs; kit numbers as in :func:`table3`."""
    return results_table(8, kit, metric=metric, include_unmatched=include_unmatched)


def table9(kit: KitLike = None, *, metric: Metric = None, include_unmatched: bool = False) -> pd.DataFrame:
    """Table 9, the wider comparison (SmolTulu SFT/DPO, SmolLM2, Llama 3.2, Qwen2.5); kit numbers as in :func:`table3`."""
    return results_table(9, kit, metric=metric, include_unmatched=include_unmatched)


# --- rendering -------------------------------------------------------------------------------


def _infer_decimals(values: Iterable[Any]) -> int:
    best = 0
    for value in values:
        if isinstance(value, float) and math.isfinite(value):
            best = max(best, next((d for d in range(7) if round(value, d) == value), 6))
    return best


def _cells(df: pd.DataFrame, missing: str) -> tuple[list[list[str]], list[list[bool]]]:
    """Every cell as display text, and which cells are the best of their row (to bold)."""
    attrs = df.attrs
    decimals = attrs.get("decimals")
    if decimals is None:
        decimals = _infer_decimals(v for col in df.columns for v in df[col] if isinstance(v, float))
    deltas = set(attrs.get("delta_columns", []))
    bold_cols = [c for c in attrs.get("bold_columns", []) if c in df.columns]
    texts, bolds = [], []
    for _, row in df.iterrows():
        numbers = [row[c] for c in bold_cols if isinstance(row[c], (int, float)) and not pd.isna(row[c])]
        best = max(numbers) if numbers else None
        line, flags = [], []
        for col in df.columns:
            value = row[col]
            if value is None or (isinstance(value, float) and math.isnan(value)):
                line.append(missing)
            elif isinstance(value, float):
                line.append(f"{value:+.{decimals}f}" if col in deltas else f"{value:.{decimals}f}")
            else:
                line.append(str(value))
            flags.append(best is not None and col in bold_cols and value == best)
        texts.append(line)
        bolds.append(flags)
    return texts, bolds


def to_markdown(df: pd.DataFrame, bold: bool = True) -> str:
    """A GitHub-flavoured markdown table (numbers as printed, the row's best in bold), then any notes."""
    from tabulate import tabulate

    texts, bolds = _cells(df, "–")
    rows = [
        [str(index)] + [f"**{t}**" if bold and b else t for t, b in zip(line, flags, strict=True)]
        for index, line, flags in zip(df.index, texts, bolds, strict=True)
    ]
    headers = [df.index.name or ""] + [str(c) for c in df.columns]
    aligns = ["left"] + ["right"] * len(df.columns)
    text = tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True, colalign=aligns)
    notes = df.attrs.get("notes", [])
    return text + ("\n\n" + "\n".join(f"Note: {n}" for n in notes) if notes else "") + "\n"


_LATEX_SPECIALS = {c: "\\" + c for c in "&%$#_{}"}
_LATEX_SPECIALS.update({"\\": r"\textbackslash{}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"})


def _latex_escape(text: str) -> str:
    out = "".join(_LATEX_SPECIALS.get(ch, ch) for ch in text)
    out = re.sub(r"x1e(\d+)", r"$\\times 10^{\1}$", out)
    out = re.sub(r"^-(?=\d)", "$-$", out)
    return out.replace("Δ", r"$\Delta$").replace("−", "$-$").replace("–", "--")


def to_latex(
    df: pd.DataFrame, caption: str | None = None, label: str | None = None, bold: bool = True
) -> str:
    r"""A booktabs LaTeX table (``\toprule``/``\midrule``/``\bottomrule``), the row's best in bold.

    ``caption`` defaults to the paper's caption, ``label`` to ``tab:tableNN``; needs ``\usepackage{booktabs}``.
    """
    texts, bolds = _cells(df, "--")
    number = df.attrs.get("table")
    caption = caption if caption is not None else df.attrs.get("caption")
    if label is None and isinstance(number, int):
        label = f"tab:table{number:02d}"
    header = [_latex_escape(str(df.index.name or ""))] + [_latex_escape(str(c)) for c in df.columns]
    lines = [
        r"\begin{table}[ht]",
        r"\centering",
        r"\begin{tabular}{l" + "r" * len(df.columns) + "}",
        r"\toprule",
        " & ".join(header) + r" \\",
        r"\midrule",
    ]
    for index, line, flags in zip(df.index, texts, bolds, strict=True):
        cells = [_latex_escape(t) for t in line]
        cells = [rf"\textbf{{{c}}}" if bold and f else c for c, f in zip(cells, flags, strict=True)]
        lines.append(" & ".join([_latex_escape(str(index)), *cells]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    for note in df.attrs.get("notes", []):
        lines.append(r"\par\smallskip{\footnotesize " + _latex_escape(note) + "}")
    if caption:
        lines.append(r"\caption{" + _latex_escape(caption) + "}")
    if label:
        lines.append(r"\label{" + label + "}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def save_table(df: pd.DataFrame, name: str, directory: str | Path | None = None) -> list[Path]:
    """Write ``<name>.csv``, ``<name>.md`` and ``<name>.tex`` to ``directory`` (default ``results_dir()/"tables"``)."""
    validate_name(name)
    folder = Path(directory) if directory is not None else results_dir() / "tables"
    folder.mkdir(parents=True, exist_ok=True)
    decimals = df.attrs.get("decimals")
    csv_path, md_path, tex_path = (folder / f"{name}{ext}" for ext in (".csv", ".md", ".tex"))
    float_format = f"%.{decimals}f" if decimals is not None else None
    df.to_csv(csv_path, float_format=float_format, encoding="utf-8")
    md_path.write_text(to_markdown(df), encoding="utf-8")
    tex_path.write_text(to_latex(df), encoding="utf-8")
    return [csv_path, md_path, tex_path]


def save_all_tables(kit: KitLike = None, directory: str | Path | None = None) -> dict[int, list[Path]]:
    """Build and save every table under its :data:`TABLE_NAMES` name."""
    frame = _kit_frame(kit)
    return {n: save_table(build_table(n, frame), TABLE_NAMES[n], directory) for n in sorted(_BUILDERS)}


# --- the data tables: contamination (Tables 1, 4, 13) and languages (Tables 10, 11, 12) ---------
# Their kit rows (written by contamination.results_rows and languages.results_rows) have stage
# DATA_STAGE, model = the mixture, benchmark = the benchmark's Hub id or the language.

_CONTAMINATION_NOTE = (
    "percent of a benchmark's items of which one user turn among {rows} rows covers more than "
    "{threshold} of the words with {ngram}-gram matches (Tulu 3's rule)"
)
_LANGUAGE_NOTE = (
    "share of {detected} rows with a detected language (of {rows} read) whose prompt the "
    "language identifier{detector} assigns to the language"
)


def _kit_data_rows(kit: KitLike, mixture: str, metric: str) -> pd.DataFrame:
    """The newest kit row per benchmark (or language) of one mixture and metric."""
    frame = _kit_frame(kit)
    needed = {"model", "benchmark", "metric", "value"}
    if frame is None or frame.empty or not needed <= set(frame.columns):
        return pd.DataFrame(columns=["benchmark", "value", "n", "settings"])
    frame = _newest(frame[(frame["metric"] == metric) & (frame["model"].astype(str) == mixture)])
    for column in ("n", "settings"):
        if column not in frame.columns:
            frame[column] = None
    return frame[["benchmark", "value", "n", "settings"]].reset_index(drop=True)


def _note_values(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers a data table's note quotes from the kit rows' settings (words where one is missing)."""

    def given(key: str, text: Any, default: str) -> str:
        return text(settings[key]) if settings.get(key) is not None else default

    return {
        "ngram": given("ngram", str, "n"),
        "threshold": given("threshold", lambda t: f"{float(t):.0%}", "a threshold"),
        "rows": given("rows_scanned", lambda n: f"{int(n):,}", "the"),
        "detected": given("rows_detected", lambda n: f"{int(n):,}", "the"),
        "detector": f" ({settings['detector']})" if settings.get("detector") else "",
    }


def _data_table(number: int, kit: KitLike) -> pd.DataFrame:
    """A contamination or language table, with the kit rows of its mixture beside the paper's."""
    languages = number not in CONTAMINATION_TABLES
    if languages:
        paper, key, base, metric = paper_languages(number), "language", "Presence %", LANGUAGE_METRIC
        caption = f"Table {number}: language distribution of the {paper['dataset'].iloc[0]}"
    else:
        paper, key, base = paper_contamination(number), "benchmark", "Contamination %"
        metric = CONTAMINATION_METRIC
        caption = f"Table {number}: benchmark contamination of {paper['dataset'].iloc[0]}"
    labels = list(paper[key])
    paper_values = pd.Series(paper["value"].to_numpy(dtype=float), index=labels)
    found = _kit_data_rows(kit, DATA_TABLE_MIXTURES[number], metric)
    if found.empty:
        table = pd.DataFrame({base: paper_values}, index=pd.Index(labels, name=key.capitalize()))
        kit_cols, deltas, notes = [], [], []
    else:
        found = found.set_index("benchmark")
        extra = [b for b in found.index if b not in paper_values.index]
        if languages:  # languages the paper does not list: largest share first
            extra = sorted(extra, key=lambda b: -float(found.loc[b, "value"]))
        index = labels + extra
        kit_values = found["value"].astype(float).reindex(index)
        if languages:  # the kit read the mixture: a listed language it never saw has 0 rows
            kit_values = kit_values.fillna(0.0)
        paper_col = paper_values.reindex(index)
        columns = {f"{base} (paper)": paper_col, f"{base} (kit)": kit_values}
        columns[f"{base} Δ"] = (kit_values - paper_col).round(2)
        if not languages:
            counts = [int(c) if c is not None and not pd.isna(c) else None for c in found["n"].reindex(index)]
            columns["Items (kit)"] = pd.Series(counts, index=index, dtype=object)
        table = pd.DataFrame(columns, index=pd.Index(index, name=key.capitalize()))
        kit_cols, deltas = [f"{base} (kit)"], [f"{base} Δ"]
        settings = next((s for s in found["settings"] if isinstance(s, Mapping)), {})
        note = (_LANGUAGE_NOTE if languages else _CONTAMINATION_NOTE).format(**_note_values(settings))
        notes = [
            f"(paper): as printed in the paper; (kit): {note}; Δ = kit − paper; –: not measured on that side."
        ]
    return _with_attrs(table, number, caption, 2, notes, deltas=deltas, kit=kit_cols)


def table1(kit: KitLike = None) -> pd.DataFrame:
    """Table 1, contamination of the SFT mixture, in the paper's order then the kit's other benchmarks.

    Kit rows of ``tulu3_sft`` (:func:`smoltulu_utils.contamination.results_rows`) add ``(kit)``, ``Δ``
    and ``Items (kit)`` (the items checked) beside ``Contamination % (paper)``.
    """
    return _data_table(1, kit)


def table4(kit: KitLike = None) -> pd.DataFrame:
    """Table 4, contamination of the preference mixture (DPO / RM); kit rows of ``tulu3_preference`` as in :func:`table1`."""
    return _data_table(4, kit)


def table13(kit: KitLike = None) -> pd.DataFrame:
    """Table 13, contamination of the RLVR mixture; kit rows of ``rlvr_mixed`` as in :func:`table1`."""
    return _data_table(13, kit)


def table10(kit: KitLike = None) -> pd.DataFrame:
    """Table 10, languages of the SFT mixture in percent, in the order printed; kit rows of ``tulu3_sft``
    (:func:`smoltulu_utils.languages.results_rows`) add ``(kit)`` and ``Δ``, and the kit's other languages.
    """
    return _data_table(10, kit)


def table11(kit: KitLike = None) -> pd.DataFrame:
    """Table 11, languages of the preference mixture (DPO / RM); kit rows of ``tulu3_preference`` as in :func:`table10`."""
    return _data_table(11, kit)


def table12(kit: KitLike = None) -> pd.DataFrame:
    """Table 12, languages of the RLVR mixture; kit rows of ``rlvr_mixed`` as in :func:`table10`."""
    return _data_table(12, kit)


_BUILDERS = {
    1: table1, 2: table2, 3: table3, 4: table4, 5: table5, 6: table6, 7: table7,
    8: table8, 9: table9, 10: table10, 11: table11, 12: table12, 13: table13,
}  # fmt: skip


def build_table(number: int, kit: KitLike = None) -> pd.DataFrame:
    """Table ``number`` (1 to 13), with kit numbers where given."""
    if number not in _BUILDERS:
        raise KeyError(f"no table {number}; choose from {sorted(_BUILDERS)}")
    return _BUILDERS[number](kit)
