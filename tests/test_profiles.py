"""Hardware facts, dtype rules and the profile resolver that keeps every recipe's effective batch."""

from __future__ import annotations

import json

import pytest

from smoltulu_utils.hardware import (
    cuda_supports_bf16,
    detect_hardware,
    explain_dtype,
    hardware_from_facts,
    hardware_report,
)
from smoltulu_utils.profiles import (
    PROFILES,
    auto_profile_name,
    get_profile,
    resolve,
    split_batch,
)
from smoltulu_utils.recipes import RecipeError, list_recipes, load_recipe

CPU = hardware_from_facts("cpu", device_name="test CPU", memory_gib=8.0, cpu_cores=2)
MPS = hardware_from_facts("mps", device_name="Apple MPS", memory_gib=16.0, cpu_cores=8)
T4 = hardware_from_facts("cuda", 1, "Tesla T4", 15.0, 2, compute_capability=(7, 5))
A100 = hardware_from_facts("cuda", 1, "NVIDIA A100-SXM4-40GB", 39.4, 12, compute_capability=(8, 0))
H100_X8 = hardware_from_facts("cuda", 8, "NVIDIA H100 80GB HBM3", 79.1, 96, compute_capability=(9, 0))
T4_X2 = hardware_from_facts("cuda", 2, "Tesla T4", 15.0, 4, compute_capability=(7, 5))  # Kaggle
MACHINES = {"cpu": CPU, "mps": MPS, "t4": T4, "a100": A100, "h100x8": H100_X8, "t4x2": T4_X2}


# -- dtype rules -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("device", "cc", "dtype"),
    [
        ("cpu", None, "fp32"),
        ("mps", None, "fp32"),
        ("cuda", (7, 0), "fp16"),  # V100
        ("cuda", (7, 5), "fp16"),  # T4 (Colab)
        ("cuda", (8, 0), "bf16"),  # A100
        ("cuda", (8, 9), "bf16"),  # L4, RTX 40xx
        ("cuda", (9, 0), "bf16"),  # H100
    ],
)
def test_explain_dtype(device, cc, dtype):
    assert explain_dtype(device, cc)[0] == dtype


def test_dtype_facts_and_errors():
    assert not cuda_supports_bf16((7, 5)) and cuda_supports_bf16((8, 0))
    assert (T4.bf16_supported, A100.bf16_supported, CPU.bf16_supported) == (False, True, False)
    assert "7.5 < 8.0" in T4.dtype_reason and "CPU" in CPU.dtype_reason
    assert explain_dtype("cuda", (9, 0), override="fp32") == ("fp32", "asked for explicitly")
    with pytest.raises(ValueError, match="compute capability"):
        explain_dtype("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        explain_dtype("tpu")
    with pytest.raises(ValueError, match="unknown dtype"):
        explain_dtype("cpu", override="fp8")


def test_detect_hardware_on_this_machine():
    import torch

    hw = detect_hardware()
    assert hw.device == ("cuda" if torch.cuda.is_available() else hw.device)
    assert hw.n_devices >= 1 and hw.cpu_cores >= 1
    if hw.device == "cpu":
        assert hw.dtype == "fp32" and hw.memory_gib and hw.memory_gib > 0


def test_hardware_report():
    report = hardware_report(T4)
    assert "cuda x1 (Tesla T4, compute capability 7.5)" in report
    assert (
        "15.0 GiB per GPU" in report and "fp16" in report and "torch " in report and "transformers " in report
    )
    assert "RAM" in hardware_report(CPU) and len(hardware_report(CPU).splitlines()) == 5


# -- profiles ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("machine", "profile"),
    [
        ("cpu", "smoke"),
        ("mps", "smoke"),
        ("t4", "single_gpu"),
        ("a100", "single_gpu"),
        ("h100x8", "paper"),
        ("t4x2", "single_gpu"),  # two small GPUs cannot hold the full 1.7B recipe: not 'paper'
    ],
)
def test_auto_profile(machine, profile):
    hw = MACHINES[machine]
    assert auto_profile_name(hw) == profile
    assert resolve("sft_1207", "auto", hardware=hw, verbose=False).profile == profile


def test_profile_values():
    smoke, single, paper = PROFILES["smoke"], PROFILES["single_gpu"], PROFILES["paper"]
    assert (smoke.model, smoke.data, smoke.max_length, smoke.per_device_batch_cap) == (
        "bundled",
        "fixtures",
        256,
        4,
    )
    assert smoke.report_to == "none" and smoke.eval_limit and smoke.max_steps
    assert single.model is None and single.gradient_checkpointing and single.peft == "auto"
    assert (
        paper.model is None and paper.data == "full" and paper.max_length is None and paper.max_steps is None
    )
    assert get_profile(smoke) is smoke
    with pytest.raises(ValueError, match="did you mean 'smoke'"):
        get_profile("smok")
    with pytest.raises(ValueError, match="data"):
        smoke.replace(data="everything")


# -- the batch solver --------------------------------------------------------------------------------
@pytest.mark.parametrize("effective", [1, 4, 8, 12, 32, 128, 256])
def test_split_batch_invariant(effective):
    for processes in range(1, 9):
        for cap in range(1, 17):
            if effective % processes:
                with pytest.raises(RecipeError, match="cannot be split"):
                    split_batch(effective, processes, cap)
                continue
            per_device, accumulation = split_batch(effective, processes, cap)
            assert per_device * accumulation * processes == effective
            assert 1 <= per_device <= cap
            per_process = effective // processes
            larger = [d for d in range(per_device + 1, cap + 1) if per_process % d == 0]
            assert not larger, "per-device batch is the largest divisor under the cap"


def test_split_batch_examples():
    assert split_batch(12, 1, 4) == (4, 3)
    assert split_batch(12, 1, 8) == (6, 2)
    assert split_batch(32, 8, 8) == (4, 1)
    assert split_batch(7, 1, 4) == (1, 7)


@pytest.mark.parametrize("machine", MACHINES)
@pytest.mark.parametrize("profile", ["smoke", "single_gpu", "paper"])
@pytest.mark.parametrize("name", list_recipes())
def test_resolve_keeps_effective_batch_and_ratio(machine, profile, name):
    recipe = load_recipe(name)
    hw = MACHINES[machine]
    for processes in (None, 1, 2, 4):
        expected = processes or (hw.n_devices if hw.device == "cuda" else 1)
        if recipe.effective_batch_size % expected:  # e.g. DPO-1130's 12 on 8 GPUs
            with pytest.raises(RecipeError, match="cannot be split"):
                resolve(recipe, profile, hardware=hw, num_processes=processes, verbose=False)
            continue
        plan = resolve(recipe, profile, hardware=hw, num_processes=processes, verbose=False)
        assert plan.num_processes == expected
        assert plan.per_device_batch_size * plan.gradient_accumulation_steps * plan.num_processes == (
            recipe.effective_batch_size
        )
        assert plan.effective_batch_size == plan.recipe.effective_batch_size == recipe.effective_batch_size
        assert plan.per_device_batch_size <= PROFILES[profile].per_device_batch_cap
        assert plan.learning_rate == recipe.learning_rate and plan.lr_bs_ratio == recipe.lr_bs_ratio
        assert plan.dtype == hw.dtype
        assert plan.max_length <= recipe.max_length


def test_impossible_split_names_file_key_and_fix():
    # DPO-1130's batch of 12 cannot be shared by 8 GPUs.
    with pytest.raises(RecipeError) as info:
        resolve("dpo_1130", "paper", hardware=H100_X8, verbose=False)
    message = str(info.value)
    assert "dpo_1130.yaml" in message and "'effective_batch_size'" in message
    assert "12" in message and "8 processes" in message and "1, 2, 3, 4, 6, 12" in message


def test_smoke_plan_caps_size_not_batch():
    plan = resolve("sft_1130", "smoke", hardware=CPU, verbose=False)
    assert plan.model == "bundled" and plan.data == "fixtures" and plan.report_to == "none"
    assert plan.max_length == plan.recipe.max_length == 256 and plan.max_steps == PROFILES["smoke"].max_steps
    assert plan.recipe.learning_rate == 9e-5 and plan.recipe.effective_batch_size == 8
    assert any("max_length capped from 4096 to 256" in note for note in plan.notes)

    rlvr = resolve("rlvr_ppo", "smoke", hardware=CPU, verbose=False).recipe
    assert rlvr.prompt_length + rlvr.response_length <= 256
    assert rlvr.num_episodes == PROFILES["smoke"].max_steps * rlvr.rollout_batch_size


def test_paper_plan_uses_the_recipe_as_written():
    plan = resolve("sft_1207", "paper", hardware=H100_X8, verbose=False)
    assert plan.recipe == load_recipe("sft_1207") and not plan.notes
    assert plan.model == "HuggingFaceTB/SmolLM2-1.7B" and plan.dtype == "bf16"
    assert (plan.per_device_batch_size, plan.gradient_accumulation_steps, plan.num_processes) == (4, 1, 8)


def test_describe_says_why(capsys):
    plan = resolve("dpo_1130", "smoke", hardware=CPU)
    printed = capsys.readouterr().out
    assert printed.strip() == plan.describe()
    assert "effective batch 12 = 4 per device x 3 accumulation x 1 process" in printed
    assert "LR/BS : 8e-07 / 12 = 6.67e-08 (0.6667 x 1e-7; Table 5 reports it scaled x1e7)" in printed
    assert "fp32" in printed and "sft_1130 checkpoint" in printed
    assert "11.25 x 1e-6" in resolve("sft_1130", "smoke", hardware=CPU, verbose=False).describe()


def test_to_dict_is_json_ready():
    data = resolve("rm_1130", "single_gpu", hardware=T4, verbose=False).to_dict()
    text = json.dumps(data)
    assert data["effective_batch_size"] == 4 and data["recipe"]["learning_rate"] == 4e-5
    assert data["hardware"]["dtype"] == "fp16" and "Tesla T4" in text


def test_data_mirror_follows_the_profile(monkeypatch):
    from smoltulu_utils.paths import FIXTURES_DIR
    from smoltulu_utils.profiles import data_mirror

    monkeypatch.delenv("SMOLTULU_DATA_MIRROR", raising=False)
    assert data_mirror("smoke") == FIXTURES_DIR
    assert data_mirror("paper") is None  # the Hub
    monkeypatch.setenv("SMOLTULU_DATA_MIRROR", "/srv/mirror")
    assert str(data_mirror("single_gpu")) == "/srv/mirror"
    assert data_mirror("smoke") == FIXTURES_DIR


def test_plan_table_reports_an_impossible_split_without_stopping_the_others():
    from smoltulu_utils.profiles import plan_table

    table = plan_table(["sft_1130", "dpo_1130"], "paper", hardware=H100_X8).set_index("recipe")
    assert table.loc["sft_1130", "problem"] == ""
    assert table.loc["sft_1130", "per_device"] * table.loc["sft_1130", "processes"] == 8
    assert "cannot" in table.loc["dpo_1130", "problem"] and "12" in table.loc["dpo_1130", "problem"]


def test_smoke_rlvr_plan_does_not_point_at_the_hub():
    plan = resolve("rlvr_ppo", "smoke", hardware=CPU, verbose=False)
    assert plan.model == "bundled" and plan.recipe.reward_model == "bundled"
    assert any("reward_model" in note for note in plan.notes)
    assert resolve("rlvr_ppo", "paper", hardware=H100_X8, verbose=False).recipe.reward_model == (
        "SultanR/SmolTulu-1.7b-RM"
    )


def test_single_gpu_caps_rlvr_episodes_and_says_so():
    """The card's 10M episodes are 312,500 PPO iterations; the single_gpu profile stops far earlier."""
    cap = PROFILES["single_gpu"].max_episodes
    assert cap and cap < 10_000_000 and PROFILES["paper"].max_episodes is None
    for hw in (T4, A100):
        plan = resolve("rlvr_ppo", "single_gpu", hardware=hw, verbose=False)
        assert plan.recipe.num_episodes == cap
        iterations = cap // plan.recipe.rollout_batch_size
        note = (
            f"num_episodes capped from 10000000 to {cap} by the single_gpu profile ({iterations:,} iterations"
        )
        assert note in plan.describe()
    paper = resolve("rlvr_ppo", "paper", hardware=H100_X8, verbose=False)
    assert paper.recipe.num_episodes == 10_000_000 and not any("num_episodes" in n for n in paper.notes)
    # the smoke profile's steps still cap it further; a cap above the recipe's episodes changes nothing
    assert resolve("rlvr_ppo", "smoke", hardware=CPU, verbose=False).recipe.num_episodes < cap
    generous = get_profile("single_gpu").replace(max_episodes=20_000_000)
    assert resolve("rlvr_ppo", generous, hardware=A100, verbose=False).recipe.num_episodes == 10_000_000
    assert resolve("sft_1130", "single_gpu", hardware=A100, verbose=False).recipe == load_recipe(
        "sft_1130"
    ).replace(max_length=2048)
    with pytest.raises(ValueError, match="max_episodes"):
        get_profile("single_gpu").replace(max_episodes=0)


def test_an_rlvr_plan_says_its_rollouts_are_per_process():
    """PPO counts rollouts per process (as Tulu 3): the plan prints the global sizes, not a split of 32."""
    text = resolve("rlvr_ppo", "smoke", num_processes=2, verbose=False).describe()
    assert "32 rollouts and a minibatch of 32 per process x 2 processes = 64 prompts per iteration" in text
    assert "effective batch 32 = " not in text


def test_a_profile_caps_one_stage_below_its_max_steps_until_max_steps_is_set():
    smoke = get_profile("smoke")
    assert resolve("dpo_1130", smoke, hardware=CPU, verbose=False).max_steps == 1
    assert resolve("sft_1130", smoke, hardware=CPU, verbose=False).max_steps == smoke.max_steps == 2
    assert resolve("dpo_1130", smoke.replace(max_steps=5), hardware=CPU, verbose=False).max_steps == 5
    assert smoke.replace(model="tiny").steps_for("dpo") == 1
