"""Every stage as a command: the stage table, the dpo / rm / rlvr / eval commands, and 2-process CPU runs.

The fast tests check the table, the commands' options and input checks, and the result file and summary
of a training command with a stand-in train function. The slow tests run the DPO, reward-model and
PPO commands on two CPU processes joined over gloo (``recipes/accelerate/cpu_2proc.yaml``) with the
tiny SmolLM2 for 2 steps: the effective batch is split over the processes, the run finishes with one
summary, the checkpoint loads; the DPO reference log-probs gathered from both processes equal a
one-process pass, and the PPO processes train on different prompts with synchronised weights and logs.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import subprocess
import sys
import textwrap
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from smoltulu_utils import cli, launch, sweep
from smoltulu_utils.launch import LAUNCHED_ENV, run_stage
from smoltulu_utils.paths import KIT_ROOT, RECIPES_DIR
from smoltulu_utils.recipes import STAGES as RECIPE_CLASSES
from smoltulu_utils.recipes import DPORecipe, RMRecipe, SFTRecipe, load_recipe
from smoltulu_utils.stages import STAGES, StageError, check_parent_stage, get_stage


@pytest.fixture
def no_launcher(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", LAUNCHED_ENV):
        monkeypatch.delenv(name, raising=False)


# ======================================================================================================
# The table
# ======================================================================================================
def test_the_table_has_every_recipe_stage_with_a_train_function_that_takes_its_inputs():
    assert list(STAGES) == list(RECIPE_CLASSES) == ["sft", "dpo", "rm", "rlvr"]
    for name, stage in STAGES.items():
        assert stage.recipe_class is RECIPE_CLASSES[name]
        assert stage.result_file == f"{name}_result.json"
        assert load_recipe(stage.default_recipe).stage == name
        assert all(parent in STAGES for parent in stage.parents)
        train = stage.train_function()
        assert train.__name__ == f"train_{name}"
        parameters = inspect.signature(train).parameters
        for keyword in ("parent", "verbose", *stage.inputs):
            assert keyword in parameters, f"{train.__name__} takes no {keyword}"
    with pytest.raises(StageError, match="did you mean 'dpo'"):
        get_stage("dp")


def test_the_sweep_picks_its_trainer_and_stages_from_the_table():
    from smoltulu_utils.dpo import train_dpo
    from smoltulu_utils.reward_model import train_rm
    from smoltulu_utils.sft import train_sft

    assert sweep.SWEEP_STAGES == {"sft": SFTRecipe, "dpo": DPORecipe, "rm": RMRecipe}
    assert sweep._stage_trainer("sft") is train_sft
    assert sweep._stage_trainer("dpo") is train_dpo
    assert sweep._stage_trainer("rm") is train_rm


def _manifest(folder: Path, stage: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"manifest_version": 1, "stage": stage, "tokenizer": {}, "created_at": "2026-01-01T00:00:00Z"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_a_parent_of_the_wrong_stage_is_refused_before_anything_starts(tmp_path, capsys, no_launcher):
    rm = _manifest(tmp_path / "rm_run", "rm")
    sft = _manifest(tmp_path / "sft_run", "sft")
    assert check_parent_stage("dpo", sft) == "sft"
    assert check_parent_stage("dpo", "HuggingFaceTB/SmolLM2-135M-Instruct") is None  # a Hub id
    assert check_parent_stage("rlvr", "SultanR/SmolTulu-1.7b-Instruct") is None
    assert check_parent_stage("sft", "bundled") is None
    with pytest.raises(StageError, match="no manifest.json"):
        check_parent_stage("dpo", tmp_path)
    with pytest.raises(StageError, match="not a folder"):
        check_parent_stage("rm", tmp_path / "runs" / "dpo" / "missing")
    out = ["--profile", "smoke", "--output", str(tmp_path / "out")]
    assert cli.main(["dpo", "--parent", str(rm), "--processes", "2", *out]) == 2
    assert (
        "is a 'rm' checkpoint; the dpo stage starts from a sft or dpo checkpoint" in capsys.readouterr().err
    )


# ======================================================================================================
# The commands' input checks and the launch (no training)
# ======================================================================================================
@pytest.mark.parametrize(
    "stage, other, label",
    [("dpo", "sft_1130", "a DPO"), ("rm", "dpo_1130", "a reward-model"), ("rlvr", "rm_1130", "an RLVR")],
)
def test_each_command_refuses_a_recipe_of_another_stage(stage, other, label, tmp_path, capsys, no_launcher):
    assert cli.main([stage, "--recipe", other, "--profile", "smoke", "--output", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"smoltulu {stage}: ") and f"give {label} recipe" in err and "Traceback" not in err


@pytest.mark.parametrize("stage", ["dpo", "rm", "rlvr"])
def test_processes_start_the_command_under_accelerate(stage, monkeypatch, tmp_path, no_launcher):
    calls = []
    monkeypatch.setattr(
        launch, "run_stage", lambda args, num_processes, **kw: calls.append((args, num_processes, kw))
    )
    argv = [stage, "--profile", "smoke", "--processes", "2", "--output", str(tmp_path)]
    assert cli.main(argv) == 0
    assert calls == [(argv, 2, {})]


def test_the_accelerate_config_is_passed_to_the_launcher(monkeypatch, tmp_path, capsys, no_launcher):
    from smoltulu_utils.launch import ACCELERATE_CONFIGS

    calls = []
    monkeypatch.setattr(
        launch, "run_stage", lambda args, num_processes, **kw: calls.append((num_processes, kw))
    )
    out = ["--profile", "smoke", "--output", str(tmp_path)]
    assert cli.main(["rm", "--processes", "2", "--accelerate-config", "deepspeed_zero3", *out]) == 0
    assert calls.pop() == (2, {"config": (ACCELERATE_CONFIGS / "deepspeed_zero3.yaml").resolve()})
    # one process with a config still goes through accelerate launch (DeepSpeed or FSDP set up there)
    assert cli.main(["sft", "--accelerate-config", "single_gpu", *out]) == 0
    assert calls.pop() == (1, {"config": (ACCELERATE_CONFIGS / "single_gpu.yaml").resolve()})
    # without --processes the config's own count is used, and checked against the recipe's batch
    assert cli.main(["dpo", "--accelerate-config", "fsdp", *out]) == 2
    assert "cannot be split over 8 processes" in capsys.readouterr().err
    assert cli.main(["dpo", "--accelerate-config", "no_such_config", *out]) == 2
    assert "no Accelerate config 'no_such_config'" in capsys.readouterr().err
    assert not calls


def test_run_stage_with_a_config_launches_accelerate_once(monkeypatch):
    seen = {}

    def fake_popen(command, **kwargs):
        seen.update(command=command, env=kwargs["env"])
        raise OSError("not started")

    monkeypatch.setattr(launch.subprocess, "Popen", fake_popen)
    with pytest.raises(launch.LaunchError, match="could not start"):
        run_stage(["sft", "--output", "x"], num_processes=1, config="cpu_2proc", echo=False)
    assert seen["command"][1:3] == ["-m", "accelerate.commands.launch"]
    assert seen["env"][LAUNCHED_ENV] == "1"  # the launched command does not launch itself again
    with pytest.raises(launch.LaunchError):
        run_stage(["plan"], echo=False)
    assert seen["command"][1:3] == ["-m", "smoltulu_utils"] and LAUNCHED_ENV not in seen["env"]


# ======================================================================================================
# A training command with a stand-in train function: what it passes, writes and prints
# ======================================================================================================
@dataclass
class _Result:
    output_dir: Path
    steps: int = 2
    train_loss: list = field(default_factory=lambda: [(1, 0.7), (2, 0.6)])
    final_train_loss: float = 0.6
    tokens_seen: int = 123
    reference: dict = field(default_factory=lambda: {"found": "hit", "forward_passes": 0})

    def to_dict(self):
        return {"output_dir": str(self.output_dir), "steps": self.steps, "train_loss": self.train_loss}


def test_a_launched_command_trains_in_place_and_writes_its_result(monkeypatch, tmp_path, capsys, no_launcher):
    calls = []

    def train_dpo(plan, output_dir, **kwargs):
        calls.append((plan, output_dir, kwargs))
        return _Result(output_dir)

    monkeypatch.setitem(sys.modules, "smoltulu_utils.dpo", types.SimpleNamespace(train_dpo=train_dpo))
    monkeypatch.setattr(launch, "run_stage", lambda *a, **k: pytest.fail("launched again"))
    monkeypatch.setenv(LAUNCHED_ENV, "1")  # started by run_stage under a one-process config
    sft = _manifest(tmp_path / "sft_run", "sft")
    out = tmp_path / "dpo_run"
    argv = [
        "dpo",
        "--profile",
        "smoke",
        "--model",
        "tiny",
        "--max-steps",
        "3",
        "--accelerate-config",
        "single_gpu",
    ]
    argv += ["--parent", str(sft), "--reference-cache", "none", "--output", str(out)]
    assert cli.main(argv) == 0
    ((plan, output_dir, kwargs),) = calls
    assert output_dir == out and plan.num_processes == 1 and plan.max_steps == 3 and plan.model == "tiny"
    assert kwargs == {"parent": str(sft), "verbose": True, "reference_cache": None}
    result = json.loads((out / "dpo_result.json").read_text())
    assert (
        result["steps"] == 2 and result["stage"] == "dpo" and result["plan"]["recipe"]["name"] == "dpo_1130"
    )
    printed = capsys.readouterr().out
    assert "dpo dpo_1130 (smoke, 1 process): 2 steps, DPO loss 0.7000 -> 0.6000, 123 tokens seen" in printed

    # rank 1 of a launched run trains but neither writes nor prints; the default output is runs/<stage>/<recipe>
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("SMOLTULU_RUNS_DIR", str(tmp_path / "runs"))
    assert cli.main(["dpo", "--profile", "smoke", "--processes", "2"]) == 0
    plan, output_dir, kwargs = calls[-1]
    assert plan.num_processes == 2 and output_dir == tmp_path / "runs" / "dpo" / "dpo_1130"
    assert kwargs == {"parent": None, "verbose": False}
    assert not output_dir.exists() and capsys.readouterr().out == ""


def test_eval_command_scores_a_model_and_writes_its_rows(monkeypatch, tmp_path, capsys, no_launcher):
    from smoltulu_utils import evaluation

    calls = []

    def fake_evaluate(model, **kwargs):
        calls.append((model, kwargs))
        row = {"run_id": "r", "stage": "eval", "model": model, "benchmark": "GSM8K (5-shot)", "value": 12.5}
        return evaluation.Evaluation(rows=[row], scores={"GSM8K (5-shot)": 12.5}, raw={}, seconds=1.0)

    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    folder = _manifest(tmp_path / "dpo_run", "dpo")
    assert cli.main(["eval", "--model", str(folder), "--profile", "smoke", "--tasks", "gsm8k"]) == 0
    ((model, kwargs),) = calls
    assert model == str(folder) and kwargs["benchmarks"] == ["gsm8k"]
    assert kwargs["limit"] == 4 and kwargs["max_gen_toks"] == 96  # the smoke profile's
    written = json.loads((folder / "eval_result.json").read_text())
    assert written["rows"][0]["value"] == 12.5 and written["limit"] == 4
    assert "GSM8K (5-shot)          : 12.5" in capsys.readouterr().out
    assert cli.main(["eval", "--model", "bundled", "--limit", "2", "--output", str(tmp_path / "e")]) == 0
    assert calls[-1][1]["limit"] == 2 and (tmp_path / "e" / "eval_result.json").is_file()
    assert cli.main(["eval", "--model", "bundled", "--processes", "2"]) == 2
    assert "eval runs on one process" in capsys.readouterr().err


# ======================================================================================================
# Two CPU processes
# ======================================================================================================
TINY = ["--profile", "smoke", "--model", "tiny", "--max-steps", "2", "--max-length", "64"]


def _summary_count(stdout: str, head: str) -> int:
    return sum(1 for line in stdout.splitlines() if line.startswith(head))


@pytest.mark.slow
def test_two_process_dpo_splits_the_batch_and_gathers_the_reference_log_probs(tmp_path):
    from smoltulu_utils.dpo import build_dpo_trainer
    from smoltulu_utils.models import load_model, load_tokenizer
    from smoltulu_utils.preferences import prepare_preference_rows
    from smoltulu_utils.profiles import get_profile, resolve
    from smoltulu_utils.reference_cache import ReferenceCache

    out, cache = tmp_path / "dpo", tmp_path / "reference_logps"
    args = ["dpo", *TINY, "--output", str(out), "--reference-cache", str(cache)]
    done = run_stage(args, num_processes=2, echo=False, timeout=300)
    assert done.args[1:3] == ["-m", "accelerate.commands.launch"]
    assert _summary_count(done.stdout, "dpo dpo_1130 (smoke, 2 processes): 2 steps") == 1  # main process only
    result = json.loads((out / "dpo_result.json").read_text())
    plan = result["plan"]
    assert plan["num_processes"] == 2 and result["steps"] == 2
    assert plan["per_device_batch_size"] * plan["gradient_accumulation_steps"] * 2 == 12  # dpo_1130's batch
    assert result["effective_batch_size"] == 12 and result["tokens_seen"] > 0
    assert result["reference"]["found"] == "missing" and result["reference"]["forward_passes"] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "dpo" and manifest["extra"]["plan"]["num_processes"] == 2
    assert load_model(str(out)).config.num_hidden_layers == 2  # the checkpoint loads

    # The reference log-probs both processes computed and rank 0 gathered: every pair, in order.
    (two,) = ReferenceCache(cache).entries()
    one_plan = resolve(
        "dpo_1130", get_profile("smoke").replace(model="tiny", max_length=64), num_processes=1, verbose=False
    )
    tokenizer = load_tokenizer("tiny")
    from smoltulu_utils.data import load_rows
    from smoltulu_utils.profiles import data_mirror

    rows = load_rows(
        "tulu3_preference", mirror=data_mirror("smoke"), limit=one_plan.max_train_samples, validate=False
    )
    dataset, _ = prepare_preference_rows(rows, tokenizer, 64, drop_too_long=False)
    trainer = build_dpo_trainer(
        one_plan,
        load_model("tiny"),
        tokenizer,
        dataset,
        tmp_path / "one",
        reference_cache=tmp_path / "one_cache",
    )
    key = trainer.reference_lookups["train"]["key"]
    assert two["path"].stem == key and two["n_rows"] == len(
        dataset
    )  # the same key: same data, weights, lengths
    two_values = ReferenceCache(cache).load(key, len(dataset))
    one_values = ReferenceCache(tmp_path / "one_cache").load(key, len(dataset))
    assert two_values.hit and one_values.hit
    for side in ("chosen", "rejected"):
        assert getattr(two_values, side).tolist() == pytest.approx(
            getattr(one_values, side).tolist(), rel=1e-4, abs=1e-4
        )


@pytest.mark.slow
def test_two_process_reward_model_splits_the_batch_and_saves_a_loadable_model(tmp_path):
    from smoltulu_utils.reward_model import load_reward_model

    out = tmp_path / "rm"
    done = run_stage(["rm", *TINY, "--output", str(out)], num_processes=2, echo=False, timeout=300)
    assert _summary_count(done.stdout, "rm rm_1130 (smoke, 2 processes): 2 steps, Bradley-Terry loss") == 1
    result = json.loads((out / "rm_result.json").read_text())
    plan = result["plan"]
    assert plan["num_processes"] == 2 and result["steps"] == 2 and len(result["train_loss"]) == 2
    assert plan["per_device_batch_size"] * plan["gradient_accumulation_steps"] * 2 == 4  # rm_1130's batch
    assert result["trained_tokens"] > 0
    assert json.loads((out / "manifest.json").read_text())["stage"] == "rm"
    model = load_reward_model(str(out))
    assert model.config.num_labels == 1


#: Runs the rlvr command on each process with PPOTrainer instrumented: the prompts each process drew,
#: every number it averaged over the processes for the logs, and its weights before and after training.
PPO_PROBE = textwrap.dedent(
    """
    import hashlib, json, os, sys
    import torch
    from smoltulu_utils import cli
    from smoltulu_utils.ppo import PPOTrainer

    record = {"batches": [], "means": []}

    def digest(module):
        h = hashlib.sha256()
        for name, p in module.named_parameters():
            h.update(name.encode()); h.update(p.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()

    next_batch, mean, train = PPOTrainer._next_batch, PPOTrainer._mean, PPOTrainer.train
    generate = PPOTrainer._generate

    def _generate(self, batch):
        state = torch.random.get_rng_state().numpy().tobytes()
        record.setdefault("sampling_rng", hashlib.sha256(state).hexdigest())
        return generate(self, batch)

    def _next_batch(self):
        batch = next_batch(self)
        record["batches"].append([list(map(int, ex.prompt_ids)) for ex in batch])
        return batch

    def _mean(self, value):
        out = mean(self, value)
        record["means"].append([float(value), out])
        return out

    def _train(self, *args, **kwargs):
        record["policy_before"] = digest(self.unwrapped.policy)
        logs = train(self, *args, **kwargs)
        record["policy_after"] = digest(self.unwrapped.policy)
        record["value_after"] = digest(self.unwrapped.value_model)
        record["rank"], record["world"] = self.accelerator.process_index, self.accelerator.num_processes
        return logs

    PPOTrainer._next_batch, PPOTrainer._mean, PPOTrainer.train = _next_batch, _mean, _train
    PPOTrainer._generate = _generate
    code = cli.main(sys.argv[1:])
    path = os.path.join(os.environ["PPO_PROBE_DIR"], f"rank{os.environ.get('RANK', '0')}.json")
    with open(path, "w") as fh:
        json.dump(record, fh)
    sys.exit(code)
    """
)


def _small_rlvr_recipe(folder: Path) -> Path:
    """rlvr_ppo with 16-token responses and 4 prompts per process per iteration (minibatches of 2)."""
    text = (RECIPES_DIR / "rlvr_ppo.yaml").read_text()
    for key, value in {"name": "rlvr_probe", "response_length": 16, "rollout_batch_size": 4,
                       "minibatch_size": 2, "effective_batch_size": 4, "num_epochs": 2}.items():  # fmt: skip
        text, n = re.subn(rf"^{key}:\s*\S+", f"{key}: {value}", text, flags=re.M)
        assert n == 1, key
    path = folder / "rlvr_probe.yaml"
    path.write_text(text)
    return path


@pytest.mark.slow
def test_two_process_ppo_splits_the_rollouts_and_keeps_the_weights_in_sync(tmp_path):
    from smoltulu_utils.launch import free_port
    from smoltulu_utils.models import load_model

    script, probes, out = tmp_path / "probe.py", tmp_path / "probes", tmp_path / "rlvr"
    script.write_text(PPO_PROBE)
    probes.mkdir()
    recipe = _small_rlvr_recipe(tmp_path)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(launch.accelerate_config("cpu_2proc")), "--num_processes", "2",
               "--main_process_port", str(free_port()), str(script),
               "rlvr", "--recipe", str(recipe), "--profile", "smoke", "--model", "tiny", "--max-steps", "2",
               "--output", str(out)]  # fmt: skip
    env = {**launch._child_env({"PPO_PROBE_DIR": str(probes)}), LAUNCHED_ENV: "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=KIT_ROOT, timeout=300)
    assert done.returncode == 0, launch.output_tail(done.stdout + done.stderr)
    assert _summary_count(done.stdout, "rlvr rlvr_probe (smoke, 2 processes): 2 PPO iterations") == 1

    ranks = [json.loads((probes / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 for r in ranks)
    # data: each process draws its own 4 prompts per iteration, none shared in the first iteration
    for r in ranks:
        assert [len(b) for b in r["batches"]] == [4, 4]
    first = [{tuple(p) for p in r["batches"][0]} for r in ranks]
    assert len(first[0]) + len(first[1]) == 8 and not first[0] & first[1]
    # sampling: each process draws its own random numbers (the same prompt gets different responses)
    assert ranks[0]["sampling_rng"] != ranks[1]["sampling_rng"]
    # gradients: both processes start and end with the same weights, and training changed them
    assert ranks[0]["policy_before"] == ranks[1]["policy_before"]
    assert ranks[0]["policy_after"] == ranks[1]["policy_after"] != ranks[0]["policy_before"]
    assert ranks[0]["value_after"] == ranks[1]["value_after"]
    # logs: every logged number is the mean of the two processes' own values
    assert len(ranks[0]["means"]) == len(ranks[1]["means"]) > 0
    for (a, mean_a), (b, mean_b) in zip(ranks[0]["means"], ranks[1]["means"], strict=True):
        assert mean_a == pytest.approx((a + b) / 2, rel=1e-5, abs=1e-6) and mean_a == pytest.approx(mean_b)

    result = json.loads((out / "rlvr_result.json").read_text())
    assert result["plan"]["num_processes"] == 2 and result["iterations"] == 2
    assert [e["episodes"] for e in result["logs"]] == [8, 16]  # 4 prompts x 2 processes per iteration
    saved = hashlib.sha256()
    for name, p in load_model(str(out)).named_parameters():
        saved.update(name.encode())
        saved.update(p.detach().float().cpu().numpy().tobytes())
    assert saved.hexdigest() == ranks[0]["policy_after"]  # the checkpoint is the trained policy
