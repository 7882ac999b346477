"""The tidy results store: schema checks, reads that survive bad lines, skip keys, atomic appends."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from smoltulu_utils.paths import KIT_ROOT
from smoltulu_utils.results import (
    REQUIRED_FIELDS,
    ResultsError,
    ResultsStore,
    ResultsWarning,
    curves_frame,
    default_path,
)


def make_row(**overrides):
    row = {
        "run_id": "sft_1130_smoke",
        "stage": "sft",
        "model": "SmolTulu SFT-1130",
        "benchmark": "GSM8K (5-shot)",
        "metric": "em",
        "value": 12.5,
        "stderr": 0.9,
        "n": 1319,
        "settings": {"lr": 9e-5, "effective_batch": 8, "profile": "smoke"},
    }
    row.update(overrides)
    return row


@pytest.fixture
def store(tmp_path):
    return ResultsStore(tmp_path / "results.jsonl")


def test_default_path_follows_results_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SMOLTULU_RESULTS_DIR", str(tmp_path))
    assert default_path() == tmp_path / "results.jsonl"
    assert ResultsStore().path == tmp_path / "results.jsonl"


def test_append_then_read_round_trips(store):
    written = store.append([make_row(), make_row(benchmark="PIQA", metric="acc_norm", value=61.0, seed=3)])
    assert [w["benchmark"] for w in written] == ["GSM8K (5-shot)", "PIQA"]
    assert all(w["created_at"] for w in written)
    frame = store.read()
    assert list(frame.columns[: len(REQUIRED_FIELDS)]) == list(REQUIRED_FIELDS)
    assert frame["value"].tolist() == [12.5, 61.0]
    assert frame.loc[0, "settings"] == {"lr": 9e-5, "effective_batch": 8, "profile": "smoke"}
    assert frame.loc[1, "seed"] == 3  # extra keys are kept
    assert str(frame["created_at"].dt.tz) == "UTC"
    expanded = store.read(expand_settings=True)
    assert expanded.loc[0, "settings.lr"] == 9e-5
    assert len(store) == 2


def test_single_mapping_and_optional_fields(store):
    store.append({k: v for k, v in make_row().items() if k not in ("stderr", "n", "settings")})
    frame = store.read()
    assert len(frame) == 1 and frame.loc[0, "settings"] == {}


def test_read_of_missing_file_is_empty_with_schema(store):
    frame = store.read()
    assert frame.empty and "value" in frame.columns and "settings" in frame.columns


@pytest.mark.parametrize("field", REQUIRED_FIELDS)
def test_missing_required_field_names_row_and_field(store, field):
    bad = make_row()
    del bad[field]
    with pytest.raises(ResultsError, match=rf"row 1\b.*{field}"):
        store.append([make_row(), bad])
    assert not store.path.exists(), "a batch with a bad row must write nothing"


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "12.5", None, True])
def test_value_must_be_a_finite_number(store, value):
    with pytest.raises(ResultsError, match=r"row 0 .*'value'"):
        store.append(make_row(value=value))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("stderr", math.nan),
        ("stderr", -1.0),
        ("n", -3),
        ("n", 2.5),
        ("settings", [1, 2]),
        ("created_at", "yesterday"),
        ("model", 17),
        ("benchmark", ""),
    ],
)
def test_bad_optional_fields_are_named(store, field, value):
    with pytest.raises(ResultsError, match=field):
        store.append(make_row(**{field: value}))


def test_unserialisable_extra_key_is_rejected(store):
    with pytest.raises(ResultsError, match="JSON"):
        store.append(make_row(handle=object()))


def test_has_and_done_keys(store):
    store.append(
        [
            make_row(run_id="a", benchmark="GSM8K (5-shot)"),
            make_row(run_id="a", benchmark="PIQA"),
            make_row(run_id="b", benchmark="PIQA", settings={"lr": 3.1e-6, "effective_batch": 32}),
        ]
    )
    assert store.has(run_id="a", benchmark="PIQA")
    assert not store.has(run_id="b", benchmark="GSM8K (5-shot)")
    assert store.has(settings={"lr": 3.1e-6})
    assert not store.has(settings={"lr": 1.0})
    assert not store.has(no_such_field=1)
    assert store.done_keys("run_id") == {"a", "b"}
    assert store.done_keys("run_id", "benchmark") == {("a", "GSM8K (5-shot)"), ("a", "PIQA"), ("b", "PIQA")}
    assert store.done_keys("benchmark", run_id="b") == {"PIQA"}
    assert store.done_keys("settings.lr") == {9e-5, 3.1e-6}
    assert ("a", "sft", "SmolTulu SFT-1130", "PIQA", "em") in store.done_keys()


def test_latest_prefers_newest_created_at_then_last_written(store):
    store.append(make_row(value=3.0, created_at="2025-01-02T00:00:00+00:00"))
    store.append(make_row(value=1.0, created_at="2025-01-01T00:00:00Z"))  # older, written later
    store.append(make_row(benchmark="PIQA", value=5.0, created_at="2025-01-01T00:00:00+00:00"))
    store.append(make_row(benchmark="PIQA", value=6.0, created_at="2025-01-01T00:00:00+00:00"))
    latest = store.latest()
    assert dict(zip(latest["benchmark"], latest["value"], strict=True)) == {
        "GSM8K (5-shot)": 3.0,
        "PIQA": 6.0,
    }
    only = store.latest(benchmark="PIQA")
    assert only["value"].tolist() == [6.0]
    per_run = store.latest("run_id")
    assert len(per_run) == 1


def test_partial_last_line_is_reported_and_good_rows_kept(store):
    store.append([make_row(run_id="a"), make_row(run_id="b")])
    with open(store.path, "a", encoding="utf-8") as handle:
        handle.write('{"run_id": "c", "stage": "sf')  # another tool died mid-write
    with pytest.warns(ResultsWarning, match=r"line 3.*partial"):
        frame = store.read()
    assert frame["run_id"].tolist() == ["a", "b"]
    assert [b.lineno for b in store.bad_lines] == [3]
    with pytest.raises(ResultsError, match="line 3"):
        store.read(strict=True)

    # Appending keeps the partial line (closed off as its own bad line) and writes whole rows after it.
    with pytest.warns(ResultsWarning):
        store.append(make_row(run_id="d"))
    with pytest.warns(ResultsWarning, match="line 3"):
        assert store.read()["run_id"].tolist() == ["a", "b", "d"]

    rejected = store.repair()
    assert rejected is not None and '"run_id": "c"' in rejected.read_text()
    with warnings_as_errors():
        assert store.read()["run_id"].tolist() == ["a", "b", "d"]


def test_bad_middle_line_is_skipped_not_fatal(store):
    store.append(make_row(run_id="a"))
    with open(store.path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(make_row(run_id="x", value=None)) + "\n")
    store.append(make_row(run_id="b"))
    with pytest.warns(ResultsWarning, match="line 2"):
        assert store.read()["run_id"].tolist() == ["a", "b"]


class warnings_as_errors:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error", ResultsWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


# --- atomicity ---------------------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys
    from smoltulu_utils.results import ResultsStore

    store = ResultsStore(sys.argv[1])
    tag, batches, size = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    pad = "p" * 3000  # big rows: a non-atomic writer would be caught mid-row
    print("ready", flush=True)
    i = 0
    while batches < 0 or i < batches:
        store.append(
            [
                {"run_id": f"{tag}-{i}", "stage": "sft", "model": "m", "benchmark": f"b{j}",
                 "metric": "acc", "value": i + j / 10, "settings": {"lr": 1e-5}, "pad": pad}
                for j in range(size)
            ]
        )
        i += 1
    """
)


def start_writer(script: Path, path: Path, tag: str, batches: int, size: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(KIT_ROOT))
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path), tag, str(batches), str(size)],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def check_whole_rows(path: Path, size: int) -> int:
    """Every line parses, every row is whole, every batch is complete; returns the row count."""
    data = path.read_bytes()
    assert data.endswith(b"\n"), "the file ends in a partial line"
    batches: dict[str, int] = {}
    for line in data.decode("utf-8").splitlines():
        row = json.loads(line)
        assert set(REQUIRED_FIELDS) <= set(row) and len(row["pad"]) == 3000
        batches[row["run_id"]] = batches.get(row["run_id"], 0) + 1
    assert all(count == size for count in batches.values()), "a batch was written in part"
    return sum(batches.values())


def test_sigkill_at_random_moments_never_leaves_a_partial_row(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    path = tmp_path / "results.jsonl"
    rng = random.Random(1234)
    counts = []
    started = time.monotonic()
    for round_ in range(6):
        proc = start_writer(script, path, f"r{round_}", batches=-1, size=3)
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        if path.exists():
            counts.append(check_whole_rows(path, size=3))
    assert counts and counts[-1] > 0, "the writer never wrote anything before being killed"
    assert counts == sorted(counts), "rows disappeared between kills"
    with warnings_as_errors():
        frame = ResultsStore(path).read(strict=True)
    assert len(frame) == counts[-1]
    # A temp file left by a killed writer is swept by the next append.
    ResultsStore(path).append(make_row())
    assert not list(tmp_path.glob(".results.jsonl.*.tmp"))
    assert time.monotonic() - started < 15


def test_concurrent_writers_lose_nothing(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    path = tmp_path / "results.jsonl"
    procs = [start_writer(script, path, tag, batches=25, size=2) for tag in ("w1", "w2", "w3")]
    for proc in procs:
        assert proc.wait(timeout=60) == 0
    assert check_whole_rows(path, size=2) == 3 * 25 * 2


KILL_INSIDE_APPEND = textwrap.dedent(
    """
    import os, random, signal, sys
    from smoltulu_utils.results import ResultsStore

    store = ResultsStore(sys.argv[1])
    rng = random.Random(int(sys.argv[2]))
    pad = "p" * 3000
    IO = {"open", "read", "write", "writelines", "flush", "fsync", "close", "truncate", "replace",
          "rename", "unlink", "remove", "ftruncate", "fdopen", "mkstemp"}

    def batch(tag):
        return [{"run_id": tag, "stage": "sft", "model": "m", "benchmark": f"b{j}", "metric": "acc",
                 "value": float(j), "pad": pad} for j in range(3)]

    calls = 0
    target = None

    def profile(frame, event, arg):
        global calls
        if event == "c_call" and getattr(arg, "__name__", "") in IO:
            calls += 1
            if calls == target:
                os.kill(os.getpid(), signal.SIGKILL)

    # Count the I/O calls of one append, then die just before a random one of them in the next.
    store.append(batch(f"{sys.argv[2]}-warmup"))
    sys.setprofile(profile)
    store.append(batch(f"{sys.argv[2]}-count"))
    sys.setprofile(None)
    total, calls = calls, 0
    target = rng.randint(1, total)
    sys.setprofile(profile)
    store.append(batch(f"{sys.argv[2]}-killed"))
    sys.setprofile(None)
    print(f"survived {total}", flush=True)
    """
)


def test_kill_inside_append_at_a_random_io_call_leaves_old_or_new_file(tmp_path):
    """Die just before a random I/O call inside ``append`` (copy, write, fsync, rename...)."""
    script = tmp_path / "killer.py"
    script.write_text(KILL_INSIDE_APPEND)
    path = tmp_path / "results.jsonl"
    env = dict(os.environ, PYTHONPATH=str(KIT_ROOT))
    before = 0
    for seed in range(12):
        proc = subprocess.run(
            [sys.executable, str(script), str(path), str(seed)], env=env, capture_output=True, timeout=30
        )
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
        rows = check_whole_rows(path, size=3)
        # The two appends that returned are kept; the killed one is either all there or absent.
        assert rows in (before + 6, before + 9), (before, rows)
        before = rows
    with warnings_as_errors():
        ResultsStore(path).read(strict=True)


def test_make_row_validates_and_fills_created_at():
    from smoltulu_utils import results

    row = results.make_row("r", "sft", "M", "PIQA", "acc_norm", 61.0, stderr=0.5, n=10, settings={"seed": 1})
    assert row["settings"] == {"seed": 1} and row["stderr"] == 0.5 and row["n"] == 10
    assert row["created_at"]
    bare = results.make_row("r", "sft", "M", "PIQA", "acc_norm", 1)
    assert "stderr" not in bare and "n" not in bare and bare["settings"] == {}
    with pytest.raises(ResultsError, match="'value'"):
        results.make_row("r", "sft", "M", "PIQA", "acc_norm", math.nan)
    with pytest.raises(ResultsError, match="'run_id'"):
        results.make_row("", "sft", "M", "PIQA", "acc_norm", 1.0)


def test_curve_rows_round_trip_through_the_store(store):
    from smoltulu_utils.results import TRAINING_BENCHMARK, curve_rows, curves_frame, latest_rows

    curves = {"train_loss": [(10, 2.5), (20, 2.1)], "verifiable_reward": [(10, 0.25)]}
    rows = curve_rows("rlvr_smoke", "rlvr", "M", curves, settings={"learning_rate": 1e-6})
    assert len(rows) == 3
    assert {r["benchmark"] for r in rows} == {TRAINING_BENCHMARK}
    store.append(rows)
    store.append(make_row())
    frame = latest_rows(store.read())
    assert len(frame) == 4  # every step keeps its own key
    got = curves_frame(frame)
    assert list(got.columns) == ["run_id", "stage", "model", "curve", "step", "value"]
    assert got[["curve", "step", "value"]].values.tolist() == [
        ["train_loss", 10, 2.5],
        ["train_loss", 20, 2.1],
        ["verifiable_reward", 10, 0.25],
    ]
    assert set(got["run_id"]) == {"rlvr_smoke"}


def test_curves_frame_of_a_frame_without_curves(store):
    from smoltulu_utils.results import curves_frame

    assert curves_frame(store.read()).empty
    store.append(make_row())
    assert list(curves_frame(store.read()).columns) == ["run_id", "stage", "model", "curve", "step", "value"]
    assert curves_frame(store.read()).empty


def test_every_stage_result_puts_its_training_curves_in_the_store(tmp_path):
    """SFT, DPO, RM and RLVR results all write their curves as rows; a NaN point (a diverged step) has none."""
    from smoltulu_utils.dpo import DPOResult
    from smoltulu_utils.reward_model import RMResult
    from smoltulu_utils.rlvr import RLVRResult, results_rows
    from smoltulu_utils.rlvr_data import RLVRDataReport
    from smoltulu_utils.sft import SFTResult

    common = dict(output_dir=tmp_path, steps=2, learning_rate=1e-5, effective_batch_size=8)
    sft = SFTResult(train_loss=[(1, 2.0), (2, float("nan"))], **common)
    dpo = DPOResult(train_loss=[(1, 0.69), (2, 0.6)], curves={"margins": [(1, 0.0), (2, 0.3)]}, **common)
    rm = RMResult(train_loss=[(1, 0.7)], train_accuracy=[(1, 0.5), (2, 0.75)], **common)
    logs = [{"iteration": i, "episodes": 4 * i, "verifiable_reward": r} for i, r in ((1, 0.25), (2, 0.5))]
    rlvr = RLVRResult("ppo", tmp_path, 2, logs, [], 1.0, 1e-6, 4, RLVRDataReport(4, 4, 64))
    store = ResultsStore(tmp_path / "results.jsonl")
    for stage, result in (("sft", sft), ("dpo", dpo), ("rm", rm)):
        store.append(result.curve_rows(f"{stage}_run", stage))
    store.append(results_rows(rlvr, "rlvr_run", "policy"))

    curves = curves_frame(store.read())
    got = {key: list(zip(g.step, g.value, strict=True)) for key, g in curves.groupby(["stage", "curve"])}
    assert got[("sft", "train_loss")] == [(1, 2.0)]
    assert got[("dpo", "rewards/margins")] == [(1, 0.0), (2, 0.3)]
    assert got[("rm", "train_accuracy")] == [(1, 0.5), (2, 0.75)]
    assert got[("rlvr", "verifiable_reward")] == [(1, 0.25), (2, 0.5)]
    sft_rows = [r for r in store.read().to_dict("records") if r["stage"] == "sft"]
    assert sft_rows[0]["settings"]["learning_rate"] == 1e-5
