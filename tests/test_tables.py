"""The paper loaders and the rebuilt Tables 2, 3, 5, 6, 7, 8, 9: exact numbers, kit columns, renderers."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from smoltulu_utils import paper, tables
from smoltulu_utils.paths import PAPER_DIR
from smoltulu_utils.results import ResultsStore

RESULTS_TABLES = {3: "table03_sft_results.csv", 6: "table06_dpo_results.csv", 8: "table08_rm_results.csv"}
RESULTS_TABLES[9] = "table09_wider_comparison.csv"
HYPER_TABLES = {2: "table02_sft_hyperparameters.csv", 5: "table05_dpo_hyperparameters.csv"}
HYPER_TABLES[7] = "table07_rm_hyperparameters.csv"


def raw(filename: str) -> pd.DataFrame:
    return pd.read_csv(PAPER_DIR / filename, dtype=str, keep_default_na=False)


def printed_cells(filename: str) -> dict[tuple[str, str], str]:
    frame = raw(filename)
    return {(b, m): v for b, m, v in zip(frame["benchmark"], frame["model"], frame["value"], strict=True)}


# --- paper loaders -----------------------------------------------------------------------------


def test_benchmarks_are_the_papers_labels_in_order():
    for number in (3, 6, 9):
        assert tuple(dict.fromkeys(raw(RESULTS_TABLES[number])["benchmark"])) == paper.BENCHMARKS
    card = raw("modelcard_instruct_reinforced_eval.csv")
    assert tuple(dict.fromkeys(card["benchmark"])) == paper.CARD_BENCHMARKS
    assert "IFEval (Average prompt/inst)" in paper.CARD_BENCHMARKS
    assert tuple(dict.fromkeys(raw(RESULTS_TABLES[8])["benchmark"])) == paper.RM_BENCHMARKS


@pytest.mark.parametrize("table", [3, 6, 8, 9, "model_card", "rm_card", "table09"])
def test_paper_results_are_tidy_and_exact(table):
    frame = paper.paper_results(table)
    key = paper._table_key(table)
    source = raw(paper.RESULT_FILES[key])
    assert list(frame["model"]) == list(source["model"])
    assert list(frame["benchmark"]) == list(source["benchmark"])
    assert list(frame["printed"]) == list(source["value"])
    assert list(frame["value"]) == [float(v) for v in source["value"]]
    assert list(frame["status"]) == list(source["status"])
    assert {"model", "benchmark", "value", "source", "status"} <= set(frame.columns)
    assert not frame.duplicated(["model", "benchmark"]).any()


def test_status_values_say_where_numbers_come_from():
    assert set(paper.paper_results(9)["status"]) == {"stated_in_paper"}
    assert set(paper.paper_results("model_card")["status"]) == {"stated_in_model_card"}
    assert set(paper.paper_rm_results(card=True)["status"]) == {"stated_in_model_card"}
    assert paper.paper_rm_results().equals(paper.paper_results(8))


def test_models_in_paper_order():
    assert paper.paper_models(9) == (
        "SmolTulu DPO-1130",
        "SmolTulu DPO-1207",
        "SmolTulu SFT-1130",
        "SmolTulu SFT-1207",
        "SmolLM2-1.7B-Instruct",
        "Llama-3.2-1B-Instruct",
        "Qwen2.5-1.5B-Instruct",
    )
    assert paper.paper_models(8) == ("SmolTulu RM-1130", "SmolTulu RM-1207", "Tulu 3 8b RM")


@pytest.mark.parametrize(("stage", "number"), [("SFT", 2), ("dpo", 5), ("RM", 7), (2, 2), ("table07", 7)])
def test_paper_hyperparameters_by_stage_or_number(stage, number):
    frame = paper.paper_hyperparameters(stage)
    source = raw(HYPER_TABLES[number])
    assert list(frame["config"]) == list(source["config"])
    assert list(frame["learning_rate_printed"]) == list(source["learning_rate"])
    assert list(frame["batch_size"]) == [int(b) for b in source["batch_size"]]
    assert set(frame["table"]) == {number}


def test_printed_ratios_agree_with_lr_over_batch():
    frame = paper.paper_hyperparameters()
    assert len(frame) == 11 and set(frame["stage"]) == {"SFT", "DPO", "RM"}
    for row in frame.itertuples():
        printed = row.lr_bs_ratio_printed
        decimals = len(printed.split(".")[1]) if "." in printed else 0
        assert abs(row.lr_bs_ratio * row.scale - float(printed)) <= 0.5 * 10**-decimals + 1e-12, row.config
    assert set(frame["family"]) == {"SmolTulu", "Tulu 3"}
    table7_tulu = frame[(frame["table"] == 7) & (frame["family"] == "Tulu 3")].iloc[0]
    assert table7_tulu["label"] == "Tulu 3 DPO 8b" and "Table 7" in table7_tulu["note"]


def test_canonical_names():
    assert paper.canonical_benchmark("gsm8k") == "GSM8K (5-shot)"
    assert paper.canonical_benchmark("IFEval (Average prompt/inst)") == "IFEval (Average)"
    assert paper.canonical_benchmark("mmlu_pro") == "MMLU-Pro (MCF)"
    assert paper.canonical_benchmark("rb_chat_hard") == "RB Chat Hard"
    assert paper.canonical_benchmark("something else") == "something else"
    assert paper.canonical_model("SultanR/SmolTulu-1.7b-Instruct") == "SmolTulu DPO-1130"
    assert paper.canonical_model("Llama-1B-Instruct") == "Llama-3.2-1B-Instruct"


def test_unknown_tables_raise():
    with pytest.raises(KeyError):
        paper.paper_results(4)
    with pytest.raises(KeyError):
        paper.paper_hyperparameters("RLVR")
    with pytest.raises(KeyError):
        tables.build_table(14)


# --- tables with the paper's numbers ----------------------------------------------------------


@pytest.mark.parametrize("number", sorted(RESULTS_TABLES))
def test_results_tables_equal_the_paper(number):
    df = tables.build_table(number)
    cells = printed_cells(RESULTS_TABLES[number])
    assert list(df.index) == list(paper.paper_benchmarks(number))
    assert list(df.columns) == list(paper.paper_models(number))
    assert df.size == len(cells)
    for (benchmark, model), text in cells.items():
        assert df.loc[benchmark, model] == float(text)


@pytest.mark.parametrize("number", sorted(HYPER_TABLES))
def test_hyperparameter_tables_equal_the_paper(number):
    df = tables.build_table(number)
    source = raw(HYPER_TABLES[number])
    scale = source["ratio_scale"].iloc[0]
    ratio_col = f"LR/BS ratio ({scale})"
    assert list(df.columns) == ["Model size", "Learning rate", "Batch size", ratio_col]
    assert list(df["Learning rate"]) == list(source["learning_rate"])
    assert [str(b) for b in df["Batch size"]] == list(source["batch_size"])
    assert list(df[ratio_col]) == list(source["lr_bs_ratio_stated"])
    assert [i.startswith(("SmolTulu", "Tulu 3")) for i in df.index] == [True] * len(df)
    md = tables.to_markdown(df)
    for lr, ratio in zip(source["learning_rate"], source["lr_bs_ratio_stated"], strict=True):
        assert f" {lr} " in md and f" {ratio} " in md
    assert ("x1e6" if number == 2 else "x1e7") in md
    assert r"$\times 10^{" in tables.to_latex(df)


def test_table7_reports_the_dpo_comparison():
    df = tables.table7()
    assert "Tulu 3 DPO 8b" in df.index
    assert any("DPO recipe" in note for note in df.attrs["notes"])
    assert "DPO recipe" in tables.to_markdown(df)


def parse_markdown(md: str) -> tuple[list[str], list[list[str]]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    split = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    return split[0], [[c.replace("**", "") for c in row] for row in split[2:]]


def parse_latex(tex: str) -> tuple[list[str], list[list[str]]]:
    body = tex.split(r"\toprule")[1].split(r"\bottomrule")[0]
    head, rows = body.split(r"\midrule")
    clean = [re.sub(r"\\textbf\{([^}]*)\}", r"\1", ln).rstrip(" \\") for ln in rows.strip().splitlines()]
    return [c.strip() for c in head.strip().rstrip(" \\").split("&")], [
        [c.strip() for c in ln.split("&")] for ln in clean
    ]


def test_rendered_table9_has_exactly_the_papers_numbers(tmp_path):
    cells = printed_cells(RESULTS_TABLES[9])
    df = tables.table9()
    header, rows = parse_markdown(tables.to_markdown(df))
    assert header[1:] == list(paper.paper_models(9))
    seen = {(row[0], model): text for row in rows for model, text in zip(header[1:], row[1:], strict=True)}
    assert seen == cells  # "51.0" stays "51.0", not "51" or "51.00000001"

    header, rows = parse_latex(tables.to_latex(df))
    seen = {(row[0], model): text for row in rows for model, text in zip(header[1:], row[1:], strict=True)}
    assert seen == cells

    csv_path = tables.save_table(df, "table09_benchmarks", tmp_path)[0]
    saved = pd.read_csv(csv_path, dtype=str, index_col=0)
    seen = {(b, m): saved.loc[b, m] for b in saved.index for m in saved.columns}
    assert seen == cells


def test_table8_keeps_two_decimals():
    md = tables.to_markdown(tables.table8())
    assert "76.50" in md and "94.13" in md


def test_best_value_per_row_is_bold():
    tex = tables.to_latex(tables.table9())
    gsm = next(ln for ln in tex.splitlines() if ln.startswith("GSM8K"))
    assert r"\textbf{51.6}" in gsm and gsm.count(r"\textbf") == 1
    md = tables.to_markdown(tables.table3())
    assert "**61.0**" in next(ln for ln in md.splitlines() if "IFEval" in ln)
    assert r"\textbf" not in tables.to_latex(tables.table2())


def test_latex_is_booktabs():
    tex = tables.to_latex(tables.table6())
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}{lrrr}", r"\caption{Table 6"):
        assert rule in tex
    assert r"\label{tab:table06}" in tex


# --- kit numbers beside the paper's ------------------------------------------------------------


def kit_rows():
    base = {"run_id": "dpo_1130", "stage": "eval", "model": "SmolTulu DPO-1130", "settings": {}}
    return [
        dict(base, benchmark="gsm8k", metric="em", value=10.0, created_at="2025-01-01T00:00:00+00:00"),
        dict(base, benchmark="gsm8k", metric="em", value=53.0, created_at="2025-02-01T00:00:00+00:00"),
        dict(base, benchmark="IFEval (Average prompt/inst)", metric="avg", value=60.04),
        dict(base, model="SmolLM2-135M smoke", benchmark="PIQA", metric="acc_norm", value=55.0),
        dict(base, model="tiny", paper_model="SmolTulu DPO-1207", benchmark="PIQA", metric="acc", value=70.0),
    ]


def test_kit_values_appear_beside_the_paper_with_delta(tmp_path):
    store = ResultsStore(tmp_path / "results.jsonl")
    store.append(kit_rows())
    df = tables.table6(store)
    m = "SmolTulu DPO-1130"
    assert [c for c in df.columns if c.startswith(m)] == [f"{m} (paper)", f"{m} (kit)", f"{m} Δ"]
    assert df.loc["GSM8K (5-shot)", f"{m} (kit)"] == 53.0  # the newest row wins
    assert df.loc["GSM8K (5-shot)", f"{m} Δ"] == 1.4
    assert df.loc["IFEval (Average)", f"{m} Δ"] == -7.7
    assert pd.isna(df.loc["PIQA", f"{m} Δ"])
    assert df.loc["GSM8K (5-shot)", f"{m} (paper)"] == 51.6
    assert df.loc["PIQA", "SmolTulu DPO-1207 Δ"] == -6.4  # matched through paper_model
    assert "SmolLM2-1.7B-Instruct" in df.columns  # no kit numbers: a plain paper column
    assert not any("135M" in c for c in df.columns)

    md = tables.to_markdown(df)
    gsm = next(ln for ln in md.splitlines() if ln.startswith("| GSM8K"))
    assert "**51.6**" in gsm and "53.0" in gsm and "+1.4" in gsm and "**53.0**" not in gsm
    assert "Δ = kit − paper" in md
    tex = tables.to_latex(df)
    assert r"$\Delta$" in tex and "$-$7.7" in tex

    wider = tables.table6(store, include_unmatched=True)
    assert wider.loc["PIQA", "SmolLM2-135M smoke (kit)"] == 55.0


def test_kit_accepts_dataframes_lists_and_hub_ids():
    rows = [dict(r, model="SultanR/SmolTulu-1.7b-Instruct") for r in kit_rows()[:2]]
    from_list = tables.table9(rows)
    from_frame = tables.table9(pd.DataFrame(rows))
    assert from_list.equals(from_frame)
    assert from_list.loc["GSM8K (5-shot)", "SmolTulu DPO-1130 Δ"] == 1.4


def test_several_metrics_must_be_chosen():
    rows = kit_rows()[:2] + [dict(kit_rows()[0], metric="em_strict", value=40.0)]
    with pytest.raises(ValueError, match="several metrics"):
        tables.table9(rows)
    assert tables.table9(rows, metric="em_strict").loc["GSM8K (5-shot)", "SmolTulu DPO-1130 (kit)"] == 40.0
    chosen = tables.table9(rows, metric={"gsm8k": "em"})
    assert chosen.loc["GSM8K (5-shot)", "SmolTulu DPO-1130 (kit)"] == 53.0


def test_kit_recipes_join_hyperparameter_tables():
    rows = [
        {
            "run_id": "sft_smoke",
            "stage": "sft",
            "model": "SmolTulu SFT-1130",
            "benchmark": "train",
            "metric": "loss",
            "value": 1.0,
            "settings": {"learning_rate": 9e-5, "effective_batch_size": 8, "profile": "smoke"},
        }
    ]
    df = tables.table2(rows)
    assert df.loc["SmolTulu SFT-1130 (kit run sft_smoke)", "LR/BS ratio (x1e6)"] == "11.25"
    assert df.loc["SmolTulu SFT-1130 (kit run sft_smoke)", "Learning rate"] == "9.0e-5"
    assert len(tables.table5(rows)) == 4  # an SFT run does not join the DPO table
    sweep = [
        dict(rows[0], run_id=f"cell{i}", settings={"learning_rate": lr, "effective_batch_size": 8})
        for i, lr in enumerate([1e-5, 1e-4])
    ]
    assert len(tables.table2(sweep)) == 4 + 2  # every run of a sweep keeps its own row


def test_sweep_rows_join_the_hyperparameter_table():
    from smoltulu_utils.sweep import Cell, CellResult, cell_rows

    rows = cell_rows(Cell(9e-5, 8), CellResult({"HellaSwag": 40.0}, eval_loss=1.5), model="SmolTulu SFT-1130")
    df = tables.table2(rows)
    assert df.loc["SmolTulu SFT-1130 (kit run lr9e-05_bs8_s0)", "LR/BS ratio (x1e6)"] == "11.25"


# --- saving ------------------------------------------------------------------------------------


def test_save_table_writes_csv_md_tex(tmp_path):
    paths = tables.save_table(tables.table3(), "table03_sft_results", tmp_path)
    assert [p.suffix for p in paths] == [".csv", ".md", ".tex"]
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)
    assert "49.0" in paths[0].read_text()


def test_save_table_default_folder_and_bad_names(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOLTULU_RESULTS_DIR", str(tmp_path))
    paths = tables.save_table(tables.table2(), "table02_sft_hyperparameters")
    assert paths[0].parent == tmp_path / "tables"
    for bad in ("Table02", "table02.csv", "table 02", "table-02", "", "_x", "x__y"):
        with pytest.raises(ValueError, match="bad output name"):
            tables.save_table(tables.table2(), bad, tmp_path)


def test_save_all_tables(tmp_path):
    written = tables.save_all_tables(directory=tmp_path)
    assert sorted(written) == list(range(1, 14))
    assert len(list(tmp_path.iterdir())) == 39
    assert (tmp_path / "table09_benchmarks.tex").exists()
