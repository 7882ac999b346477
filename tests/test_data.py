"""The dataset registry, the JSONL mirror loader, the row checks and the data tour (all offline)."""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import datasets
import pytest

from smoltulu_utils import data
from smoltulu_utils.data import (
    BBH_SUBSETS,
    DATASETS,
    DataError,
    DataSourceError,
    MirrorFileMissing,
    describe_rows,
    example_lengths,
    get_spec,
    load_rows,
    mirror_path,
    mixture_spec,
    read_jsonl,
    schema_of,
    stream_rows,
    to_dataset,
    validate_rows,
    write_jsonl,
    write_mirror,
)
from smoltulu_utils.paths import FIXTURES_DIR, KIT_ROOT

SHARED = Path(os.environ.get("SMOLTULU_SHARED") or KIT_ROOT.parent / "shared")
FIXTURE_FILES = [
    (name, config, split)
    for name, spec in DATASETS.items()
    for config in spec.configs
    for split in spec.splits
]
# Fixture file -> real rows in ../shared with the same schema (CONSTRUCTED_* files are the documented
# examples that stand in where no real rows are public: RLVR IF rows and UltraFeedback).
REAL = {
    ("tulu3_sft", "default", "train"): ["training_samples/tulu-3-sft-mixture/train_sample100.jsonl"],
    ("tulu3_preference", "default", "train"): [
        "training_samples/llama-3.1-tulu-3-8b-preference-mixture/train_sample100.jsonl"
    ],
    ("rlvr_mixed", "default", "train"): [
        "training_samples/RLVR-GSM-MATH-IF-Mixed-Constraints/train_sample100_gsm8k_math.jsonl",
        "training_samples/RLVR-GSM-MATH-IF-Mixed-Constraints/CONSTRUCTED_if_row_example.json",
    ],
    ("ultrafeedback", "default", "test_prefs"): [
        "training_samples/ultrafeedback_binarized_cleaned/CONSTRUCTED_test_prefs_row_example.json"
    ],
    ("arc", "ARC-Easy", "test"): ["benchmarks/arc/ARC-Easy/test.jsonl"],
    ("arc", "ARC-Challenge", "test"): ["benchmarks/arc/ARC-Challenge/test.jsonl"],
    ("gsm8k", "main", "test"): ["benchmarks/gsm8k/test.jsonl"],
    ("gsm8k", "main", "train"): ["benchmarks/gsm8k/train_first200.jsonl"],
    ("hellaswag", "default", "validation"): ["benchmarks/hellaswag/validation_head10.jsonl"],
    ("ifeval", "default", "train"): ["benchmarks/ifeval/input_data.jsonl"],
    ("mmlu_pro", "default", "test"): ["benchmarks/mmlu_pro/test.jsonl"],
    ("mmlu_pro", "default", "validation"): ["benchmarks/mmlu_pro/validation.jsonl"],
    ("piqa", "default", "validation"): ["benchmarks/piqa/validation.jsonl"],
    **{("bbh", s, "test"): [f"benchmarks/bbh/data/{s}.jsonl"] for s in BBH_SUBSETS},
}
REAL_ONLY = {  # real files with no fixture twin that must still pass the checks
    ("arc", "train"): [
        "benchmarks/arc/ARC-Easy/train.jsonl",
        "benchmarks/arc/ARC-Challenge/validation.jsonl",
    ],
}


def _id(param) -> str:
    return "-".join(str(p) for p in param)


def _real_rows(rel: str) -> list[dict]:
    path = SHARED / rel
    if not path.is_file():
        pytest.skip(f"real rows absent: {path} (set SMOLTULU_SHARED to the folder holding benchmarks/)")
    if path.suffix == ".json":  # one documented example row, flagged as constructed
        row = json.loads(path.read_text(encoding="utf-8"))
        row.pop("_CONSTRUCTED_EXAMPLE_NOT_REAL_DATA", None)
        return [row]
    return read_jsonl(path)


def _fixture_rows(name: str, split: str | None = None, config: str | None = None) -> list[dict]:
    return read_jsonl(mirror_path(name, split, config, FIXTURES_DIR))


# ---------------------------------------------------------------- registry


def test_registry_covers_every_dataset_with_a_pinned_or_flagged_revision():
    assert set(DATASETS) == {
        "tulu3_sft", "tulu3_preference", "rlvr_mixed", "ultrafeedback", "rewardbench",
        "arc", "bbh", "gsm8k", "hellaswag", "ifeval", "mmlu_pro", "piqa",
    }  # fmt: skip
    for name, spec in DATASETS.items():
        assert spec.name == name and "/" in spec.hub_id and spec.splits and spec.configs and spec.description
        assert spec.revision == "main" or re.fullmatch(r"[0-9a-f]{40}", spec.revision), name
        assert list(spec.features), name
    assert DATASETS["tulu3_sft"].revision == "b14afda60f1bbebe55d5d2fa1e4df5042f97f8be"
    assert DATASETS["gsm8k"].revision == "e53f048856ff4f594e959d75785d2c2d37b678ee"
    assert len(DATASETS["bbh"].configs) == 27 and DATASETS["bbh"].splits == ("test",)
    assert DATASETS["arc"].configs == ("ARC-Easy", "ARC-Challenge")


def test_unpinned_revisions_are_flagged_in_the_source():
    source = Path(data.__file__).read_text(encoding="utf-8")
    unpinned = [spec for spec in DATASETS.values() if spec.revision == "main"]
    assert source.count("# not pinned: no public commit id found; pin before a paper run") >= len(unpinned)


def test_get_spec_accepts_names_and_hub_ids_and_rejects_unknown_splits():
    assert get_spec("openai/gsm8k") is DATASETS["gsm8k"]
    with pytest.raises(KeyError, match="known:"):
        get_spec("squad")
    with pytest.raises(ValueError, match="splits: test, train"):
        load_rows("gsm8k", "validation", mirror=FIXTURES_DIR)
    with pytest.raises(ValueError, match="configs"):
        load_rows("arc", config="ARC-Hard", mirror=FIXTURES_DIR)


def test_mirror_path_layout():
    assert mirror_path("gsm8k", "train", root="/m") == Path("/m/openai/gsm8k/main/train.jsonl")
    assert mirror_path("tulu3_sft", root="/m") == Path("/m/allenai/tulu-3-sft-mixture/default/train.jsonl")
    assert mirror_path("bbh", config="snarks", root="/m") == Path("/m/lukaemon/bbh/snarks/test.jsonl")


# ---------------------------------------------------------------- fixtures


@pytest.mark.parametrize("name,config,split", FIXTURE_FILES, ids=[_id(p) for p in FIXTURE_FILES])
def test_every_fixture_loads_validates_and_has_the_hub_columns(name, config, split):
    ds = load_rows(name, split, config, mirror=FIXTURES_DIR)
    assert isinstance(ds, datasets.Dataset) and len(ds) > 0
    assert ds.column_names == list(get_spec(name).features)
    assert ds.features == get_spec(name).features


@pytest.mark.parametrize("name,config,split", FIXTURE_FILES, ids=[_id(p) for p in FIXTURE_FILES])
def test_fixture_round_trip_through_a_dataset_is_byte_stable(name, config, split, tmp_path):
    path = mirror_path(name, split, config, FIXTURES_DIR)
    out = write_jsonl(load_rows(name, split, config, mirror=FIXTURES_DIR), tmp_path / "rows.jsonl")
    assert out.read_bytes() == path.read_bytes()


def test_fixture_sizes():
    sizes = {(n, c, s): len(read_jsonl(mirror_path(n, s, c, FIXTURES_DIR))) for n, c, s in FIXTURE_FILES}
    assert sizes[("tulu3_sft", "default", "train")] >= 50
    assert sizes[("tulu3_preference", "default", "train")] >= 35
    assert sizes[("rlvr_mixed", "default", "train")] >= 25
    assert sizes[("ultrafeedback", "default", "test_prefs")] >= 15
    assert sizes[("gsm8k", "main", "train")] >= 10  # enough for 5-shot prompts
    assert all(4 <= sizes[("bbh", s, "test")] <= 5 for s in BBH_SUBSETS)  # 3 shots + the evaluated row


def test_fixtures_cover_the_shapes_loaders_must_handle():
    sft = _fixture_rows("tulu3_sft")
    assert any(r["messages"][0]["role"] == "system" for r in sft)
    assert any(len(r["messages"]) >= 4 for r in sft)
    rlvr = _fixture_rows("rlvr_mixed")
    assert {r["dataset"] for r in rlvr} == {"gsm8k", "MATH", "ifeval"}
    assert any(r["constraint"] is None for r in rlvr) and any(isinstance(r["constraint"], str) for r in rlvr)
    assert any("\\boxed" in r["messages"][0]["content"] for r in rlvr if r["dataset"] == "MATH")
    for row in rlvr:
        if row["dataset"] == "ifeval":
            assert json.loads(row["ground_truth"])["func_name"]
    labels = {tuple(r["choices"]["label"]) for r in _fixture_rows("arc", config="ARC-Easy")}
    labels |= {tuple(r["choices"]["label"]) for r in _fixture_rows("arc", config="ARC-Challenge")}
    assert (
        ("1", "2", "3", "4") in labels and ("A", "B", "C") in labels and ("A", "B", "C", "D", "E") in labels
    )


def test_fixture_shots_are_label_balanced_enough_for_bbh():
    for subset in BBH_SUBSETS:
        targets = [r["target"] for r in _fixture_rows("bbh", config=subset)]
        assert len(set(targets)) >= 2, subset


# ---------------------------------------------------------------- real rows (../shared)


def _leaf_types(value, path: str, out: set) -> set:
    """(path, type) pairs of every non-null leaf, plus the key order of every dict outside IFEval kwargs."""
    if value is None:
        return out
    if isinstance(value, dict):
        if not path.startswith("kwargs"):  # IFEval kwargs: the raw file keeps only the keys in use
            out.add((path, "keys=" + ",".join(value)))
        for key, item in value.items():
            _leaf_types(item, f"{path}.{key}", out)
    elif isinstance(value, list):
        for item in value:
            _leaf_types(item, f"{path}[]", out)
    else:
        out.add((path, type(value).__name__))
    return out


@pytest.mark.shared
@pytest.mark.parametrize("key", list(REAL), ids=[_id(k) for k in REAL])
def test_fixture_keys_order_and_types_match_the_real_rows(key):
    name, config, split = key
    real = [row for rel in REAL[key] for row in _real_rows(rel)]
    fixture = _fixture_rows(name, split, config)
    hub_order = list(get_spec(name).features)
    assert {tuple(r) for r in fixture} == {tuple(hub_order)}
    real_orders = {tuple(r) for r in real}
    if name == "tulu3_preference":
        # The shared sample stores `source` second; the Hub (and a mirror of it) has id, prompt, chosen,
        # rejected, source. Same keys, same types.
        assert {frozenset(o) for o in real_orders} == {frozenset(hub_order)}
    else:
        assert real_orders == {tuple(hub_order)}
    real_types = set().union(*(_leaf_types(v, k, set()) for row in real for k, v in row.items()))
    fixture_types = set().union(*(_leaf_types(v, k, set()) for row in fixture for k, v in row.items()))
    assert fixture_types <= real_types, sorted(fixture_types - real_types)


@pytest.mark.shared
@pytest.mark.parametrize(
    "key", list(REAL) + list(REAL_ONLY), ids=[_id(k) for k in list(REAL) + list(REAL_ONLY)]
)
def test_real_rows_pass_the_checks(key):
    for rel in {**REAL, **REAL_ONLY}[key]:
        rows = _real_rows(rel)
        clean, problems = validate_rows(key[0], rows)
        assert not problems and len(clean) == len(rows)


@pytest.mark.shared
def test_real_rows_with_null_or_sparse_fields_load_as_hub_types():
    rlvr = to_dataset("rlvr_mixed", _real_rows(REAL[("rlvr_mixed", "default", "train")][0]))
    assert rlvr.features["constraint"] == datasets.Value("string")  # all null here, still a string column
    ifeval = to_dataset("ifeval", _real_rows("benchmarks/ifeval/input_data.jsonl"))
    first = ifeval[0]["kwargs"]
    assert len(first[1]) == 24 and first[1]["num_highlights"] == 3 and first[1]["relation"] is None
    pref = to_dataset("tulu3_preference", _real_rows(REAL[("tulu3_preference", "default", "train")][0]))
    assert pref.column_names == ["id", "prompt", "chosen", "rejected", "source"]


# ---------------------------------------------------------------- row checks


def _sft_rows(n=20):
    base = _fixture_rows("tulu3_sft")
    return [copy.deepcopy(base[i % len(base)]) for i in range(n)]


def _drop(key):
    return lambda row: row.pop(key)


BAD_ROWS = [  # (dataset, mutation, expected reason)
    ("tulu3_sft", lambda r: r["messages"].append({"content": "hi"}), "messages[{n}] has no 'role'"),
    ("tulu3_sft", _drop("source"), "missing key 'source'"),
    ("tulu3_sft", lambda r: r.update(id=17), "'id' is int, expected str"),
    ("tulu3_sft", lambda r: r["messages"][0].update(role="bot"), "messages[0] has unknown role 'bot'"),
    (
        "tulu3_sft",
        lambda r: r["messages"][-1].update(content="  "),
        "messages[{last}] is an assistant turn with empty content",
    ),
    (
        "tulu3_sft",
        lambda r: r.update(messages=[m for m in r["messages"] if m["role"] != "assistant"]),
        "no assistant turn in 'messages'",
    ),
    ("tulu3_sft", lambda r: r.update(extra=1), "unexpected key 'extra'"),
    ("tulu3_preference", lambda r: r["chosen"].pop(), "'chosen' does not end with an assistant turn"),
    (
        "tulu3_preference",
        lambda r: r.update(rejected=copy.deepcopy(r["chosen"])),
        "chosen and rejected responses are identical",
    ),
    (
        "tulu3_preference",
        lambda r: r["rejected"][0].update(content="Another prompt"),
        "prompt differs between chosen and rejected",
    ),
    (
        "ultrafeedback",
        lambda r: r.update(score_chosen=1.0, score_rejected=9.0),
        "score_chosen (1.0) is below score_rejected (9.0)",
    ),
    ("rlvr_mixed", _drop("ground_truth"), "missing key 'ground_truth'"),
    ("rlvr_mixed", lambda r: r.update(ground_truth=None), "'ground_truth' is null"),
    ("rlvr_mixed", lambda r: r.update(ground_truth=""), "empty ground_truth"),
    ("rlvr_mixed", lambda r: r.update(dataset="trivia"), "unknown dataset 'trivia'"),
    (
        "rlvr_mixed",
        lambda r: r.update(dataset="ifeval", ground_truth='{"func_name": "verify_bullet_points"}'),
        "ifeval ground_truth for verify_bullet_points has no 'N'",
    ),
    (
        "rlvr_mixed",
        lambda r: r["messages"].append({"content": "42", "role": "assistant"}),
        "an RLVR prompt ends with the user turn",
    ),
    ("arc", lambda r: r.update(answerKey="Z"), "answerKey 'Z' is not one of the labels"),
    ("arc", lambda r: r["choices"]["text"].pop(), "texts but"),
    ("arc", lambda r: r["choices"].pop("label"), "'choices' has no 'label'"),
    ("bbh", lambda r: r.update(target=""), "empty target"),
    ("gsm8k", lambda r: r.update(answer="It is 72."), "answer does not end with a '#### <number>' line"),
    ("hellaswag", lambda r: r["endings"].pop(), "3 endings, expected 4"),
    ("hellaswag", lambda r: r.update(label=3), "'label' is int, expected str"),
    ("ifeval", lambda r: r["kwargs"].append({}), "instruction ids but"),
    (
        "ifeval",
        lambda r: r.update(instruction_id_list=["made:up"] * len(r["kwargs"])),
        "unknown instruction id 'made:up'",
    ),
    ("ifeval", lambda r: r["kwargs"][0].update(colour="red"), "has unknown key 'colour'"),
    (
        "mmlu_pro",
        lambda r: r.update(answer="J", options=r["options"][:3]),
        "answer 'J' is not a letter of one of the 3 options",
    ),
    ("mmlu_pro", lambda r: r.update(answer_index=12), "answer_index 12 is out of range"),
    ("piqa", lambda r: r.update(label=2), "'label' is 2, expected a class index below 2"),
]


@pytest.mark.parametrize("name,mutate,reason", BAD_ROWS, ids=[f"{b[0]}-{b[2][:40]}" for b in BAD_ROWS])
def test_each_bad_row_is_reported_with_its_index_and_reason(name, mutate, reason):
    config = "snarks" if name == "bbh" else None
    rows = (_fixture_rows(name, config=config) * 10)[:20]
    rows = [copy.deepcopy(r) for r in rows]
    index = 17
    bad = rows[index]
    n_messages = len(bad.get("messages", []))
    mutate(bad)
    reason = reason.format(n=n_messages, last=n_messages - 1)
    with pytest.raises(DataError) as err:
        validate_rows(name, rows)
    assert {p.index for p in err.value.problems} == {index}
    assert any(reason in p.reason for p in err.value.problems), err.value.problems
    assert f"{get_spec(name).hub_id} row {index}: {err.value.problems[0].reason}" in str(err.value)
    clean, problems = validate_rows(name, rows, strict=False)
    assert len(clean) == len(rows) - 1 and bad not in clean and problems[0].index == index


def test_the_issue_example_message():
    rows = _sft_rows()
    del rows[17]["messages"][1]["role"]
    with pytest.raises(
        DataError, match=re.escape("allenai/tulu-3-sft-mixture row 17: messages[1] has no 'role'")
    ):
        validate_rows("tulu3_sft", rows)


def test_all_problems_are_collected_and_raised_once_with_a_count():
    rows = _sft_rows(30)
    for i in range(3, 30, 2):  # 14 bad rows
        rows[i]["messages"][0]["role"] = "narrator"
    with pytest.raises(DataError) as err:
        validate_rows("tulu3_sft", rows)
    message = str(err.value)
    assert message.startswith("14 problem(s) in 14 row(s) of allenai/tulu-3-sft-mixture")
    assert "row 3:" in message and "row 21:" in message and "row 23:" not in message
    assert "... and 4 more" in message
    assert len(err.value.problems) == 14
    clean, problems = validate_rows("tulu3_sft", rows, strict=False)
    assert len(clean) == 16 and len(problems) == 14


def test_rows_that_are_not_objects_are_reported():
    _, problems = validate_rows("gsm8k", [["a list"], {"question": "q", "answer": "#### 1"}], strict=False)
    assert [(p.index, p.reason) for p in problems] == [(0, "row is list, expected a JSON object")]


def test_bad_mirror_file_fails_on_load_with_dataset_and_path(tmp_path):
    rows = _fixture_rows("gsm8k", "test")
    rows[2]["answer"] = "no final line"
    write_jsonl(rows, mirror_path("gsm8k", "test", root=tmp_path))
    with pytest.raises(DataError, match=r"openai/gsm8k:main row 2: answer does not end"):
        load_rows("gsm8k", "test", mirror=tmp_path)
    assert len(load_rows("gsm8k", "test", mirror=tmp_path, validate=False)) == len(rows)


def test_invalid_json_lines_are_reported_with_their_line_number(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"input": "a", "target": "b"}\n{"input": oops}\n\n{"input": "c", "target": "d"}\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        read_jsonl(path)


# ---------------------------------------------------------------- sources


def test_missing_mirror_file_names_the_dataset_the_path_and_the_fix(tmp_path):
    with pytest.raises(MirrorFileMissing) as err:
        load_rows("gsm8k", "train", mirror=tmp_path)
    message = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert "gsm8k" in message and "openai/gsm8k" in message
    assert str(tmp_path / "openai" / "gsm8k" / "main" / "train.jsonl") in message
    assert "python -m smoltulu_utils mirror --out" in message and "SMOLTULU_DATA_MIRROR" in message


def test_environment_mirror_is_used_when_no_argument_is_given(monkeypatch):
    monkeypatch.setenv("SMOLTULU_DATA_MIRROR", str(FIXTURES_DIR))
    monkeypatch.setattr(datasets, "load_dataset", _no_hub)
    assert len(load_rows("piqa")) == len(_fixture_rows("piqa"))


def _no_hub(*args, **kwargs):
    raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")


def test_hub_failure_offline_gives_the_same_advice(monkeypatch):
    monkeypatch.delenv("SMOLTULU_DATA_MIRROR", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", _no_hub)
    with pytest.raises(DataSourceError) as err:
        load_rows("gsm8k")
    message = str(err.value)
    assert "openai/gsm8k" in message and "e53f048856ff4f594e959d75785d2c2d37b678ee" in message
    assert "ConnectionError" in message and "python -m smoltulu_utils mirror --out" in message


class _FakeHub:
    """Stands in for ``datasets.load_dataset``: serves the fixtures and records the calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, hub_id, config=None, *, split, revision, streaming=False):
        self.calls.append((hub_id, config, split, revision, streaming))
        spec = get_spec(hub_id)
        dataset = to_dataset(spec.name, _fixture_rows(spec.name, split, config))
        return dataset.to_iterable_dataset() if streaming else dataset


def test_hub_loads_pass_the_pinned_revision_config_and_limit(monkeypatch):
    monkeypatch.delenv("SMOLTULU_DATA_MIRROR", raising=False)
    hub = _FakeHub()
    monkeypatch.setattr(datasets, "load_dataset", hub)
    assert len(load_rows("gsm8k", "train", limit=3)) == 3
    load_rows("ifeval")
    load_rows("bbh", config="navigate")
    assert hub.calls == [  # a limited load streams the first rows instead of downloading the split
        ("openai/gsm8k", "main", "train", DATASETS["gsm8k"].revision, True),
        ("google/IFEval", None, "train", DATASETS["ifeval"].revision, False),
        ("lukaemon/bbh", "navigate", "test", DATASETS["bbh"].revision, False),
    ]


def test_stream_rows_streams_a_mixture_from_the_hub(monkeypatch):
    monkeypatch.delenv("SMOLTULU_DATA_MIRROR", raising=False)
    hub = _FakeHub()
    monkeypatch.setattr(datasets, "load_dataset", hub)
    rows = list(stream_rows("tulu3_sft", limit=4))
    assert [r["id"] for r in rows] == [r["id"] for r in _fixture_rows("tulu3_sft")[:4]]
    assert hub.calls == [("allenai/tulu-3-sft-mixture", None, "train", DATASETS["tulu3_sft"].revision, True)]
    assert mixture_spec("rlvr_mixed").kind == "rlvr"
    with pytest.raises(ValueError, match="not a training mixture; choose from tulu3_sft"):
        mixture_spec("gsm8k")


def test_write_mirror_writes_the_layout_load_rows_reads(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "load_dataset", _FakeHub())
    paths = write_mirror(tmp_path, ["gsm8k", "ifeval", "tulu3_preference"])
    assert len(paths) == 4
    for name, config, split in [
        ("gsm8k", "main", "test"),
        ("gsm8k", "main", "train"),
        ("ifeval", "default", "train"),
    ]:
        written = mirror_path(name, split, config, tmp_path)
        assert written in paths
        assert written.read_bytes() == mirror_path(name, split, config, FIXTURES_DIR).read_bytes()
    assert len(load_rows("tulu3_preference", mirror=tmp_path)) == len(_fixture_rows("tulu3_preference"))


def test_limit_keeps_the_first_rows():
    ds = load_rows("tulu3_sft", mirror=FIXTURES_DIR, limit=5)
    assert len(ds) == 5
    assert ds.to_list() == _fixture_rows("tulu3_sft")[:5]


# ---------------------------------------------------------------- JSONL


def test_write_jsonl_is_atomic_utf8_one_row_per_line_and_round_trips(tmp_path):
    rows = [
        {"text": "línea uno\nlínea dos «ok» \u2028 tab\t", "n": 3, "x": 1.5, "none": None, "flag": True},
        {"text": "", "n": -1, "x": 2.0, "none": [{"a": None, "b": ["c"]}], "flag": False},
    ]
    path = write_jsonl(rows, tmp_path / "sub" / "rows.jsonl")
    raw = path.read_bytes()
    assert raw.count(b"\n") == 2 and "línea".encode() in raw
    assert read_jsonl(path) == rows
    again = write_jsonl(read_jsonl(path), tmp_path / "again.jsonl")
    assert again.read_bytes() == raw
    assert sorted(p.name for p in path.parent.iterdir()) == ["rows.jsonl"]  # no temporary file left


def test_write_jsonl_leaves_the_old_file_when_writing_fails(tmp_path):
    path = write_jsonl([{"a": 1}], tmp_path / "rows.jsonl")

    def rows():
        yield {"a": 2}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_jsonl(rows(), path)
    assert read_jsonl(path) == [{"a": 1}]
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


# ---------------------------------------------------------------- tour of the data


class _WordTokenizer:
    """A stand-in tokenizer: one token per whitespace-separated word."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [text.split() for text in texts]}


def test_describe_rows_splits_characters_and_tokens_by_role():
    rows = _fixture_rows("tulu3_sft")
    stats = describe_rows("tulu3_sft", rows, tokenizer=_WordTokenizer())
    assert stats["rows"] == len(rows)
    assert stats["turns"]["min"] == 2 and stats["turns"]["max"] >= 4
    assert {"user", "assistant", "system"} <= set(stats["chars"])
    assert stats["tokens"]["assistant"]["max"] > 0
    assert stats["chars"]["example"]["max"] == max(example_lengths(rows))


def test_describe_rows_for_preferences_and_benchmarks():
    pref = describe_rows("tulu3_preference", _fixture_rows("tulu3_preference"))
    assert set(pref["chars"]) == {"prompt", "chosen", "rejected", "example"}
    rlvr = describe_rows("rlvr_mixed", _fixture_rows("rlvr_mixed"))
    assert rlvr["subsets"] == {"gsm8k": 10, "MATH": 10, "ifeval": 10}
    gsm = describe_rows("gsm8k", load_rows("gsm8k", "train", mirror=FIXTURES_DIR))
    assert set(gsm["chars"]) == {"question", "answer", "example"} and "turns" not in gsm


def test_example_lengths_count_the_conversation():
    rows = [
        {
            "id": "a",
            "messages": [{"content": "one two", "role": "user"}, {"content": "three", "role": "assistant"}],
        }
    ]
    assert example_lengths(rows) == [len("one two\nthree")]
    assert example_lengths(rows, _WordTokenizer()) == [3]  # turns are not glued together
    assert example_lengths([{"input": "abc", "target": "de"}]) == [5]


def test_example_lengths_with_a_chat_template_count_what_training_sees(bundled_tokenizer):
    rows = [
        {
            "id": "a",
            "messages": [{"content": "Hi", "role": "user"}, {"content": "Hello!", "role": "assistant"}],
        }
    ]
    rendered = bundled_tokenizer.apply_chat_template(rows[0]["messages"], tokenize=False)
    expected = len(bundled_tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert example_lengths(rows, bundled_tokenizer) == [expected]
    assert expected > 20  # the default system prompt and the turn markers count


def test_schema_of_merges_types_over_rows():
    schema = schema_of(_fixture_rows("rlvr_mixed"))
    assert list(schema) == ["messages", "ground_truth", "dataset", "constraint_type", "constraint"]
    assert schema["messages"] == "list[{content: str, role: str}]"
    assert schema["constraint"] == "null | str"
    assert (
        schema_of(_fixture_rows("arc", config="ARC-Easy"))["choices"] == "{text: list[str], label: list[str]}"
    )


@pytest.mark.shared
def test_the_tour_describes_100_real_rows():
    rows = _real_rows(REAL[("tulu3_sft", "default", "train")][0])
    stats = describe_rows("tulu3_sft", rows, tokenizer=_WordTokenizer())
    assert stats["rows"] == 100
    assert schema_of(rows)["messages"] == "list[{content: str, role: str}]"
    assert len(example_lengths(rows)) == 100 and min(example_lengths(rows)) > 0


def test_rewardbench_rows_are_described_as_string_pairs(bundled_tokenizer):
    rows = load_rows("rewardbench", "filtered", mirror=FIXTURES_DIR)
    assert len(rows) == 46 and len({r["subset"] for r in rows}) == 23
    summary = describe_rows("rewardbench", rows, bundled_tokenizer)
    assert "turns" not in summary  # its chosen is a reply string, not a conversation
    assert {"prompt", "chosen", "rejected"} <= set(summary["chars"])
    assert all(n > 0 for n in example_lengths(rows, bundled_tokenizer))
