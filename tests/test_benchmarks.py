"""benchmarks/eval_throughput.py runs end to end and writes its JSON (a functional check, no timings)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from smoltulu_utils.paths import KIT_ROOT


def _load_script(name: str):
    path = KIT_ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_throughput_writes_both_modes(tmp_path):
    script = _load_script("eval_throughput")
    out = tmp_path / "eval_throughput.json"
    report = script.main(["--model", "tiny", "--limit", "1", "--max-gen-toks", "4", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert set(saved["modes"]) == {"loglikelihood", "generation"}
    for mode in saved["modes"].values():
        assert mode["baseline"]["requests"] > 0
        assert mode["kit"]["requests"] == mode["baseline"]["requests"]
        assert mode["baseline"]["batch_size"] == 1
        assert mode["ratio"] > 0
        assert 0 <= mode["agreement"] <= 1
    # one item per ARC config, one request per answer choice; one generation request per GSM8K item
    assert saved["modes"]["loglikelihood"]["items"] == 2
    assert saved["modes"]["loglikelihood"]["baseline"]["requests"] >= 2 * 3
    assert saved["modes"]["generation"]["baseline"]["requests"] == 1
    assert saved["machine"]["cpu_cores"] >= 1


def test_sft_throughput_writes_both_sides(tmp_path):
    script = _load_script("sft_throughput")
    out = tmp_path / "sft_throughput.json"
    argv = ["--model", "tiny", "--steps", "1", "--max-length", "64", "--batch", "2", "--out", str(out)]
    report = script.main(argv)
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["same_inputs"] is True
    for side in ("baseline", "trl_best", "kit"):
        assert saved[side]["steps"] == 1
        assert 0 < saved[side]["trained_tokens"] <= saved[side]["real_tokens"]
    assert saved["baseline"]["real_tokens"] == saved["kit"]["real_tokens"]
    assert saved["kit"]["padding_free"] is True and saved["baseline"]["padding_free"] is False
    # padding-free: no padding cells; the baseline trains prompts too, so more of its tokens carry a label
    assert saved["kit"]["batch_cells"] == saved["kit"]["real_tokens"]
    assert saved["baseline"]["trained_tokens"] > saved["kit"]["trained_tokens"]
    # TRL's best CPU setup: bfd packing (padding-free), no gradient checkpointing, prompts without labels
    best = saved["trl_best"]
    assert best["padding_free"] is True and best["gradient_checkpointing"] is False
    assert best["completion_only_loss"] is True and best["batch_cells"] == best["real_tokens"]
    assert best["trained_tokens"] < best["real_tokens"] / 2 < saved["baseline"]["trained_tokens"]
    assert saved["ratio"] > 0 and saved["ratio_best"] > 0 and saved["mfu"] > 0
    assert (saved["ratio_target"], saved["ratio_best_target"]) == (1.5, 1.3)
    assert saved["ratio_best_met"] == (saved["ratio_best"] >= 1.3)
    assert saved["lengths"]["max"] <= 64


def test_contamination_scan_writes_its_rate_and_projection(tmp_path):
    script = _load_script("contamination_scan")
    out = tmp_path / "contamination_scan.json"
    report = script.main(["--min-rows", "300", "--baseline-rows", "5", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["kit"]["rows"] == 300 and saved["kit"]["rows_per_s"] > 0
    assert saved["items"] == 154 and saved["index_ngrams"] > 0  # the fixture benchmarks
    assert saved["full_rows"] == 939_344
    assert saved["projected_full_seconds"] == saved["full_rows"] / saved["kit"]["rows_per_s"]
    assert saved["agreement"] is True and saved["baseline"]["rows"] == 5


def test_dpo_reference_cache_counts_reference_passes(tmp_path):
    script = _load_script("dpo_reference_cache")
    out = tmp_path / "dpo_reference_cache.json"
    argv = ["--model", "tiny", "--steps", "1", "--batch", "2", "--max-length", "128", "--out", str(out)]
    report = script.main(argv)
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["baseline"]["reference_forward_passes"] >= 2  # one live reference forward per step
    assert saved["kit_first"]["reference_forward_passes"] > 0 and saved["kit_first"]["reference"] == "missing"
    assert saved["kit_cached"]["reference_forward_passes"] == 0 and saved["kit_cached"]["reference"] == "hit"
    assert saved["second_run_reference_passes"] == 0
    assert saved["step_time_ratio"] > 0 and saved["peak_memory_ratio"] > 0


def test_rlvr_iteration_writes_the_phase_split(tmp_path):
    script = _load_script("rlvr_iteration")
    out = tmp_path / "rlvr_iteration.json"
    argv = ["--model", "tiny", "--batch", "2", "--response-length", "4", "--iterations", "1"]
    report = script.main([*argv, "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert set(saved["phases_s"]) == {"generation_s", "scoring_s", "forward_s", "optimisation_s"}
    assert all(v >= 0 for v in saved["phases_s"].values()) and saved["iteration_s"] > 0
    assert saved["tokens_generated"] == 2 * 4  # a random tiny model never ends its responses
    assert saved["tokens_per_s"] > 0 and saved["peak_memory_mib"]["rss"] > 0
    assert len(saved["per_iteration"]) == 2  # the warm-up iteration is kept, not averaged


@pytest.mark.slow
def test_gpu_check_runs_every_check_in_its_cpu_version(tmp_path, capsys):
    """The prepared GPU script keeps up with the kit's API: every check passes on the CPU with the tiny model."""
    script = _load_script("gpu_check")
    report = script.main(["--cpu", "--out", str(tmp_path / "gpu_check.json")])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("gpu_check ")]
    assert report["failed"] == [], {n: o.get("traceback") for n, o in report["checks"].items() if not o["ok"]}
    assert [line.split(":")[0] for line in lines] == [f"gpu_check {name}" for name in script.CHECKS]
    checks = {name: outcome["result"] for name, outcome in report["checks"].items()}
    assert checks["sft_bf16"]["master_weights"] == "torch.float32" and checks["sft_bf16"]["tokens_per_s"] > 0
    assert checks["lora_chain"]["merged"] == {"sft": True, "dpo": True, "rm": True}
    assert checks["dpo_cache"]["reference_passes"][0] > 0 and checks["dpo_cache"]["reference_passes"][1] == 0
    assert checks["ppo_iteration"]["ppo_epochs"] == 4 and checks["eval"]["items"] > 0
