"""Benchmark contamination by 8-gram matching: planted copies are found, clean items are not."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import pytest

from smoltulu_utils import contamination as cont
from smoltulu_utils import tables
from smoltulu_utils.data import MirrorFileMissing, get_spec, load_rows, stream_rows
from smoltulu_utils.paths import FIXTURES_DIR, KIT_ROOT
from smoltulu_utils.results import ResultsStore

SHARED = Path(os.environ.get("SMOLTULU_SHARED") or KIT_ROOT.parent / "shared")


@pytest.fixture(scope="module")
def fixture_index():
    return cont.NgramIndex(cont.benchmark_items(mirror=FIXTURES_DIR))


@pytest.fixture(scope="module")
def sft_rows():
    return [dict(row) for row in load_rows("tulu3_sft", mirror=FIXTURES_DIR)]


def _item(index, benchmark, item_id):
    return next(
        (n, it) for n, it in enumerate(index.items) if it.benchmark == benchmark and it.item_id == item_id
    )


def _chat(user: str) -> dict:
    return {
        "id": "planted",
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "Sure."}],
        "source": "test",
    }


def _contaminated(result) -> set[tuple[str, str]]:
    return {(m.benchmark, m.item_id) for m in result.contaminated()}


def test_normalize_ignores_case_punctuation_and_whitespace():
    assert cont.normalize("Hello,  World!\n\tIt's 3.5 km.") == ["hello", "world", "it", "s", "3", "5", "km"]
    assert cont.normalize("Ça  VA?") == cont.normalize("ça va")
    assert cont.normalize("") == []


def test_coverage_counts_the_union_of_matching_windows():
    words = [f"w{i}" for i in range(20)]
    item = cont.BenchmarkItem("bench", "0", " ".join(words), tuple(words))
    index = cont.NgramIndex([item], n=8)
    assert index.coverage(words) == {0: 1.0}
    assert index.coverage(["x", *words[:10], "y"]) == {0: 10 / 20}  # windows at 0..2 cover words 0..9
    changed = [*words[:10], "zebra", *words[11:]]  # one word changed: every other word still covered
    assert index.coverage(changed) == {0: 19 / 20}
    assert index.coverage(words[:7]) == {}  # shorter than n: no window at all
    short = cont.BenchmarkItem("bench", "1", "a b c", ("a", "b", "c"))
    assert cont.NgramIndex([short]).n_short == 1 and len(cont.NgramIndex([short])) == 0


def test_the_fixture_mixtures_hold_no_copy_of_the_sft_side(fixture_index, sft_rows):
    result = cont.scan_rows(fixture_index, sft_rows, kind="sft", mixture="tulu3_sft")
    assert result.n_rows == len(sft_rows) == 60 and result.n_skipped == 0
    assert result.contaminated() == []
    frame = result.frame()
    assert set(frame["benchmark"]) == {get_spec(b).hub_id for b in cont.BENCHMARKS}
    assert frame.set_index("benchmark").loc["lukaemon/bbh", "n_items"] == 112
    assert (frame["percent"] == 0).all()


def test_planted_and_perturbed_copies_are_found_and_clean_items_are_not(fixture_index, sft_rows):
    plants = {  # (benchmark, item id) -> how the copy is disguised
        ("openai/gsm8k", "test/0"): lambda t: t.upper(),
        ("openai/gsm8k", "test/3"): lambda t: re.sub(r"[^\w\s]", "", t),
        ("google/IFEval", "90004"): lambda t: "\n  ".join(t.split()),
        ("google/IFEval", "90006"): lambda t: t.replace("rainbow", "sunset"),  # one word changed
        ("Rowan/hellaswag", "5004"): lambda t: "Please continue this: " + t + " Thanks!",
        ("openai/gsm8k", "test/5"): cont.perturb,  # all four at once
    }
    rows = copy.deepcopy(sft_rows)
    planted_at = {}
    for k, (key, disguise) in enumerate(plants.items()):
        _, item = _item(fixture_index, *key)
        at = 7 * k + 3
        rows.insert(at, _chat(disguise(item.text)))
        planted_at[key] = at
    # near misses that must stay clean: a short item copied whole (fewer than 8 words) and a long item
    # of which only the first third is copied
    _, short = _item(fixture_index, "baber/piqa", "validation/3")
    _, partial = _item(fixture_index, "google/IFEval", "90006")
    rows += [_chat(short.text), _chat(" ".join(partial.text.split()[:12]) + " and other things entirely.")]

    result = cont.scan_rows(fixture_index, rows, kind="sft", mixture="tulu3_sft")
    assert _contaminated(result) == set(plants)
    for match in result.contaminated():
        assert match.row_index == planted_at[(match.benchmark, match.item_id)]
        assert match.score > cont.THRESHOLD
    # "rainbow" is word 4 of 40: the 8-grams through it are lost, so words 1 to 4 are not covered
    assert result.best[_item(fixture_index, "google/IFEval", "90006")[0]].score == pytest.approx(36 / 40)
    frame = result.frame().set_index("benchmark")
    assert frame.loc["openai/gsm8k", "n_contaminated"] == 3
    assert frame.loc["openai/gsm8k", "percent"] == pytest.approx(50.0)
    assert frame.loc["TIGER-Lab/MMLU-Pro", "n_contaminated"] == 0
    listed = result.matches_frame()
    assert len(listed) == len(plants) and listed["train_text"].str.len().gt(0).all()


def test_preference_and_rlvr_rows_are_read_from_their_prompts(fixture_index):
    _, item = _item(fixture_index, "openai/gsm8k", "test/2")
    pair = {
        "id": "p0",
        "prompt": item.text,
        "chosen": [{"role": "user", "content": item.text}, {"role": "assistant", "content": "42"}],
        "rejected": [{"role": "user", "content": item.text}, {"role": "assistant", "content": "41"}],
        "source": "test",
    }
    found = cont.scan_rows(fixture_index, [pair], kind="preference", mixture="tulu3_preference")
    assert _contaminated(found) == {("openai/gsm8k", "test/2")}
    # an assistant turn is not a prompt: the same text as a response is not matched
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": item.text}]}
    assert cont.scan_rows(fixture_index, [chat], kind="sft").contaminated() == []
    prompt = {"messages": [{"role": "user", "content": "Question: " + item.text}], "ground_truth": "1"}
    assert _contaminated(cont.scan_rows(fixture_index, [prompt], kind="rlvr")) == {("openai/gsm8k", "test/2")}


def test_bad_rows_are_reported_skipped_and_counted(fixture_index):
    rows = [
        _chat("What is 2 + 2?"),
        {"id": "x"},
        {"messages": [{"role": "assistant", "content": "orphan"}]},
        "not a row",
        _chat("fine"),
    ]
    result = cont.scan_rows(fixture_index, rows, kind="sft", mixture="tulu3_sft")
    assert result.n_rows == 5 and result.n_skipped == 3 and result.n_documents == 2
    assert [p.index for p in result.problems] == [1, 2, 3]
    assert "messages" in result.problems[0].reason and "no user turn" in result.problems[1].reason


def test_stream_rows_reads_a_mirror_line_by_line_and_reports_bad_lines(tmp_path, sft_rows):
    path = tmp_path / "allenai" / "tulu-3-sft-mixture" / "default" / "train.jsonl"
    path.parent.mkdir(parents=True)
    lines = [json.dumps(r) for r in sft_rows[:3]]
    path.write_text("\n".join([lines[0], "{not json", "", lines[1], lines[2]]) + "\n")
    problems = []
    rows = list(stream_rows("tulu3_sft", mirror=tmp_path, problems=problems))
    assert [r is None for r in rows] == [False, True, False, False]
    assert problems[0].index == 1 and "line 2" in problems[0].reason
    assert len(list(stream_rows("tulu3_sft", mirror=tmp_path, limit=2))) == 2
    with pytest.raises(MirrorFileMissing, match="mirror"):
        next(stream_rows("rlvr_mixed", mirror=tmp_path))
    result = cont.scan_mixture("tulu3_sft", cont.NgramIndex([]), mirror=tmp_path, progress=False)
    assert result.n_rows == 4 and result.n_skipped == 1 and result.projected_seconds(8) > 0


def test_results_rows_feed_table1_beside_the_paper(fixture_index, sft_rows, tmp_path):
    _, item = _item(fixture_index, "openai/gsm8k", "test/0")
    result = cont.scan_rows(fixture_index, [*sft_rows, _chat(item.text)], kind="sft", mixture="tulu3_sft")
    store = ResultsStore(tmp_path / "results.jsonl")
    store.append(cont.results_rows([result], run_id="contamination_test", settings={"profile": "smoke"}))
    table = tables.build_table(1, store)
    assert table.loc["openai/gsm8k", "Contamination % (paper)"] == 0.08
    assert table.loc["openai/gsm8k", "Contamination % (kit)"] == pytest.approx(100 / 6)
    assert table.loc["openai/gsm8k", "Contamination % Δ"] == pytest.approx(round(100 / 6 - 0.08, 2))
    assert table.loc["openai/gsm8k", "Items (kit)"] == 6
    assert table.loc["allenai/ai2_arc", "Contamination % (kit)"] == 0.0  # a kit-only benchmark
    assert table.isna().loc["cais/mmlu", "Contamination % (kit)"]  # not one of the kit's benchmarks
    assert "61 rows" in table.attrs["notes"][0] and "8-gram" in table.attrs["notes"][0]
    assert "16.67" in tables.to_markdown(table)
    # the preference and RLVR tables see no kit rows for their mixtures: paper numbers only
    assert list(tables.build_table(4, store).columns) == ["Contamination %"]


@pytest.mark.shared
def test_real_rlvr_math_prompts_contain_real_mmlu_pro_questions():
    """Real rows: MMLU-Pro took some questions from MATH, and the RLVR mixture's MATH prompts hold them."""
    mmlu = SHARED / "benchmarks" / "mmlu_pro" / "test.jsonl"
    gsm8k = SHARED / "benchmarks" / "gsm8k" / "test.jsonl"
    rlvr_dir = SHARED / "training_samples" / "RLVR-GSM-MATH-IF-Mixed-Constraints"
    rlvr = rlvr_dir / "train_sample100_gsm8k_math.jsonl"
    for path in (mmlu, gsm8k, rlvr):
        if not path.is_file():
            pytest.skip(f"real rows absent: {path} (set SMOLTULU_SHARED to the folder holding them)")
    read = lambda p: [json.loads(line) for line in p.read_text(encoding="utf-8").split("\n") if line.strip()]  # noqa: E731
    items = cont.items_from_rows("mmlu_pro", read(mmlu)) + cont.items_from_rows("gsm8k", read(gsm8k))
    result = cont.scan_rows(cont.NgramIndex(items), read(rlvr), kind="rlvr", mixture="rlvr_mixed")
    found = _contaminated(result)
    assert {("TIGER-Lab/MMLU-Pro", "7742"), ("TIGER-Lab/MMLU-Pro", "8273")} <= found
    assert not any(bench == "openai/gsm8k" for bench, _ in found)  # the GSM8K prompts come from train
    assert len(found) <= 5
