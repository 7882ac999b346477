"""evaluate(): the kit's lm-eval run of the paper's benchmarks, reshaped into tidy rows and samples."""

from __future__ import annotations

import json

import pytest

from smoltulu_utils.evaluation import EvaluationError, evaluate, pick_backend, resolve_benchmarks
from smoltulu_utils.paths import FIXTURES_DIR
from smoltulu_utils.results import ResultsStore


def test_benchmark_names_resolve_to_paper_labels():
    assert resolve_benchmarks(["gsm8k", "smoltulu_arc", "IFEval (Average prompt/inst)", "gsm8k"]) == [
        "GSM8K (5-shot)",
        "ARC (Average)",
        "IFEval (Average)",
    ]
    assert len(resolve_benchmarks()) == 7
    with pytest.raises(EvaluationError, match="unknown benchmark 'mmlu'"):
        resolve_benchmarks(["mmlu"])


def test_backend_choice():
    assert pick_backend("auto", "bundled") in ("hf", "vllm")
    assert pick_backend("hf", object()) == "hf"
    with pytest.raises(EvaluationError, match="backend must be"):
        pick_backend("tpu", "bundled")


def test_a_model_in_memory_needs_its_tokenizer(tiny_model):
    model, _ = tiny_model
    with pytest.raises(EvaluationError, match="needs its tokenizer"):
        evaluate(model, benchmarks=["arc"], limit=1, mirror=FIXTURES_DIR)


@pytest.fixture(scope="module")
def tiny_eval(tiny_model):
    model, tokenizer = tiny_model
    return evaluate(
        model,
        tokenizer,
        benchmarks=["arc", "gsm8k"],
        limit=2,
        mirror=FIXTURES_DIR,
        max_gen_toks=16,  # the random tiny model never ends its turn
        model_name="tiny",
        paper_model="SmolTulu DPO-1130",
        run_id="tiny-eval",
    )


def test_rows_are_tidy_and_agree_with_the_samples(tiny_eval):
    rows = {row["benchmark"]: row for row in tiny_eval.rows}
    assert set(rows) == {"ARC (Average)", "GSM8K (5-shot)"}
    arc, gsm = rows["ARC (Average)"], rows["GSM8K (5-shot)"]
    assert (arc["n"], gsm["n"]) == (4, 2)  # two items of each ARC config, two GSM8K items
    assert arc["metric"] == "acc_norm" and gsm["metric"] == "exact_match"
    assert arc["settings"]["chat_template"] and arc["settings"]["max_gen_toks"] == 16
    per_config = [
        tiny_eval.samples_frame(task)["acc_norm"].astype(float).mean()
        for task in ("smoltulu_arc_easy", "smoltulu_arc_challenge")
    ]
    assert arc["value"] == pytest.approx(100 * sum(per_config) / 2)  # macro mean, as the paper
    assert 0 <= gsm["value"] <= 100


def test_samples_keep_prompts_and_responses(tiny_eval, tmp_path):
    frame = tiny_eval.samples_frame("smoltulu_gsm8k")
    assert len(frame) == 2
    assert frame["prompt"].str.startswith("<|im_start|>system").all()
    assert (
        frame["prompt"].map(lambda p: p.count("<|im_start|>user")).eq(6).all()
    )  # five shots and the question
    paths = tiny_eval.save_samples(tmp_path)
    assert {p.name for p in paths} == {
        "smoltulu_arc_easy.jsonl",
        "smoltulu_arc_challenge.jsonl",
        "smoltulu_gsm8k.jsonl",
    }
    assert all(json.loads(line) for p in paths for line in p.read_text().splitlines())


def test_rows_go_into_the_store_and_beside_the_paper(tiny_eval, tmp_path):
    from smoltulu_utils.tables import table9

    store = ResultsStore(tmp_path / "results.jsonl")
    store.append(tiny_eval.rows)
    table = table9(store)
    assert table.loc["GSM8K (5-shot)", "SmolTulu DPO-1130 (paper)"] == 51.6
    assert table.loc["GSM8K (5-shot)", "SmolTulu DPO-1130 (kit)"] == pytest.approx(
        tiny_eval.scores["GSM8K (5-shot)"], abs=0.05
    )


def test_lm_eval_reports_the_paper_column_names(tiny_eval):
    from lm_eval.utils import make_table

    assert "|GSM8K (5-shot)" in make_table(tiny_eval.raw)
    assert "|ARC (Average)|" in make_table(tiny_eval.raw, "groups")


def test_find_checkpoints_skips_sweep_cells_and_evaluated_ones(tmp_path):
    from smoltulu_utils.evaluation import find_checkpoints

    for folder in ("sft/sft_1130", "sft/sft_1207", "sweeps/ablation_135m/smoke/lr1e-05_bs4_s0"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "manifest.json").write_text("{}")
    reward_model = tmp_path / "rm" / "rm_1130"  # not a language model: scored by notebook 04 instead
    reward_model.mkdir(parents=True)
    manifest = {"manifest_version": 1, "stage": "rm", "tokenizer": {}, "created_at": "2026-01-01T00:00:00"}
    (reward_model / "manifest.json").write_text(json.dumps(manifest))
    assert [p.name for p in find_checkpoints(tmp_path)] == ["sft_1130", "sft_1207"]
    store = ResultsStore(tmp_path / "results.jsonl")
    store.append(
        {
            "run_id": "e",
            "stage": "eval",
            "model": str(tmp_path / "sft" / "sft_1130"),
            "benchmark": "PIQA",
            "metric": "acc_norm",
            "value": 50.0,
        }
    )
    assert [p.name for p in find_checkpoints(tmp_path, store)] == ["sft_1207"]
