"""The memory planner: estimates by part and stage, the full -> LoRA -> QLoRA -> refuse choice, the time
estimates and the README table they print, and the PEFT/bitsandbytes configs."""

from __future__ import annotations

import math

import pytest
import torch

from smoltulu_utils.hardware import hardware_from_facts
from smoltulu_utils.memory import (
    GIB,
    GPUS,
    KNOWN_SHAPES,
    MemoryDoesNotFitError,
    MemoryPlanError,
    estimate_hours,
    estimate_stage,
    lora_config,
    model_shape,
    plan_memory,
    plan_memory_from,
    qlora_quantization_config,
    zero3_gpus,
)
from smoltulu_utils.paths import KIT_ROOT
from smoltulu_utils.profiles import resolve

SMOLLM2_17B = "HuggingFaceTB/SmolLM2-1.7B"
PARTS = {"weights", "gradients", "optimizer", "activations", "logits", "overhead", "total"}


def test_known_shape_of_smollm2_17b_counts_its_parameters():
    shape = KNOWN_SHAPES[SMOLLM2_17B]
    assert (shape.n_layers, shape.hidden_size, shape.intermediate_size, shape.vocab_size) == (
        24,
        2048,
        8192,
        49152,
    )
    assert shape.parameters == pytest.approx(1.71e9, rel=0.005)
    assert KNOWN_SHAPES["bundled"].parameters == pytest.approx(134.5e6, rel=0.005)  # SmolLM2-135M
    # rank-64 adapters on the 7 projections of 24 layers: 64 x (4 x 4096 + 3 x 10240) x 24
    assert shape.lora_parameters(64) == 64 * (4 * 4096 + 3 * 10240) * 24


def test_shape_from_a_transformers_config_and_a_model(tiny_model):
    model, _ = tiny_model
    from_model = model_shape(model)
    assert from_model.n_layers == 2 and from_model.hidden_size == 64 and from_model.n_kv_heads == 2
    assert from_model.parameters == sum(p.numel() for p in model.parameters())
    from_config = model_shape(model.config)
    assert from_config.parameters == from_model.parameters  # the Llama count matches the real one
    with pytest.raises(MemoryPlanError, match="AutoConfig"):
        model_shape("someone/unknown-model")


def test_full_fine_tuning_takes_16_bytes_per_parameter_plus_activations():
    parts = estimate_stage(SMOLLM2_17B, max_length=4096, per_device_batch=1, dtype="bf16", method="full")
    assert set(parts) == PARTS
    n = KNOWN_SHAPES[SMOLLM2_17B].parameters / 2**30
    assert parts["weights"] + parts["gradients"] + parts["optimizer"] == pytest.approx(16 * n)
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))


def test_estimates_grow_with_length_and_batch():
    def total(**kw):
        settings = {"max_length": 1024, "per_device_batch": 1, "dtype": "bf16", "method": "lora"} | kw
        return estimate_stage(SMOLLM2_17B, **settings)

    for method in ("full", "lora", "qlora"):
        base = total(method=method)
        longer, bigger = total(method=method, max_length=4096), total(method=method, per_device_batch=8)
        assert longer["activations"] == pytest.approx(4 * base["activations"])
        assert bigger["activations"] == pytest.approx(8 * base["activations"])
        assert base["total"] < longer["total"] and base["total"] < bigger["total"]
        assert longer["weights"] == base["weights"]  # weights do not depend on the data
    with_ckpt = total(max_length=4096, per_device_batch=4)
    without = total(max_length=4096, per_device_batch=4, gradient_checkpointing=False)
    assert without["activations"] > 5 * with_ckpt["activations"]


def test_methods_shrink_weights_in_order():
    kw = {"max_length": 2048, "per_device_batch": 1, "dtype": "bf16"}
    full, lora, qlora = (estimate_stage(SMOLLM2_17B, method=m, **kw) for m in ("full", "lora", "qlora"))
    assert full["weights"] > lora["weights"] > qlora["weights"]
    assert qlora["weights"] < 0.4 * lora["weights"]  # 4-bit blocks, 16-bit embedding
    assert lora["optimizer"] < 0.1 * full["optimizer"]  # only the adapters have AdamW states


def test_planner_picks_full_on_an_80_gib_gpu():
    plan = plan_memory(SMOLLM2_17B, 4096, 8, "bf16", 80)
    assert plan.method == "full" and plan.fits
    assert plan.estimate["total"] <= 0.9 * 80
    assert "FULL" in plan.describe() and "full needs" in plan.reason


def test_planner_picks_lora_on_a_24_gib_gpu():
    plan = plan_memory(SMOLLM2_17B, 4096, 4, "bf16", 24)
    assert plan.method == "lora" and plan.fits
    assert plan.estimates["full"]["total"] > 0.9 * 24 >= plan.estimates["lora"]["total"]
    assert "full needs" in plan.reason and "lora needs" in plan.reason


def test_planner_on_a_15_gib_t4_keeps_16_bit_weights_with_lora():
    """A T4 (15 GiB, fp16, no bf16): LoRA on fp16 weights fits, so QLoRA's 4-bit weights are not needed.

    At 4096 tokens LoRA needs about 7 GiB at per-device batch 1 and 11.5 GiB at 8 (gradient
    checkpointing on), below the 13.5 GiB usable; QLoRA would save only the weights' 2.3 GiB while
    adding quantization error and dequantization time.
    """
    for batch in (1, 8):
        plan = plan_memory(SMOLLM2_17B, 4096, batch, "fp16", 15)
        assert plan.method == "lora" and plan.fits, plan.describe()
    assert plan.estimates["qlora"]["total"] < plan.estimates["lora"]["total"] <= 13.5


def test_planner_falls_back_to_qlora_then_says_nothing_fits():
    small = plan_memory(SMOLLM2_17B, 4096, 1, "fp16", 6)
    assert small.method == "qlora" and small.fits
    tiny_gpu = plan_memory(SMOLLM2_17B, 4096, 8, "fp16", 4)
    assert tiny_gpu.method == "qlora" and not tiny_gpu.fits
    assert "no method fits" in tiny_gpu.reason and "per-device batch" in tiny_gpu.reason
    assert "does NOT fit" in tiny_gpu.describe()


def test_planner_refuses_with_a_clear_error_when_asked():
    with pytest.raises(MemoryDoesNotFitError) as info:
        plan_memory(SMOLLM2_17B, 4096, 8, "fp16", 4, refuse=True)
    refused = info.value.plan
    assert refused.method == "qlora" and not refused.fits and isinstance(info.value, MemoryPlanError)
    assert str(info.value) == refused.reason == plan_memory(SMOLLM2_17B, 4096, 8, "fp16", 4).reason
    assert plan_memory(SMOLLM2_17B, 4096, 1, "fp16", 6, refuse=True).method == "qlora"


def test_bad_inputs_are_refused():
    with pytest.raises(MemoryPlanError, match="method"):
        estimate_stage(SMOLLM2_17B, max_length=1, per_device_batch=1, dtype="bf16", method="ia3")
    with pytest.raises(MemoryPlanError, match="dtype"):
        plan_memory(SMOLLM2_17B, 4096, 1, "int8", 24)
    with pytest.raises(MemoryPlanError, match="positive"):
        estimate_stage(SMOLLM2_17B, max_length=0, per_device_batch=1, dtype="bf16", method="lora")


def test_lora_config_follows_open_instruct_defaults():
    config = lora_config()
    assert (config.r, config.lora_alpha, config.lora_dropout) == (64, 16, 0.1)
    assert set(config.target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert "lm_head" not in config.target_modules
    assert lora_config(rank=8).r == 8


def test_lora_config_applies_to_the_tiny_model(bundled_tokenizer):
    from peft import get_peft_model

    from smoltulu_utils.models import tiny_model

    model, _ = tiny_model(seed=0, tokenizer=bundled_tokenizer)
    peft_model = get_peft_model(model, lora_config(rank=4))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == model_shape(model.config).lora_parameters(4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_qlora_needs_cuda():
    with pytest.raises(MemoryPlanError, match="CUDA"):
        qlora_quantization_config()


def test_qlora_quantization_settings():
    config = qlora_quantization_config(require_cuda=False)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant and config.bnb_4bit_compute_dtype == torch.bfloat16
    assert qlora_quantization_config("fp16", require_cuda=False).bnb_4bit_compute_dtype == torch.float16


# -- stages ------------------------------------------------------------------------------------------
H100 = hardware_from_facts("cuda", 1, "NVIDIA H100 80GB HBM3", 79.1, 16, compute_capability=(9, 0))
A100_80 = hardware_from_facts("cuda", 1, "NVIDIA A100-SXM4-80GB", 79.2, 16, compute_capability=(8, 0))
PPO_LENGTHS = {"prompt_length": 1024, "response_length": 1024, "rollout_batch": 32}


def stage_estimate(stage, method="full", **kw):
    settings = {"max_length": 2048, "per_device_batch": 4, "dtype": "bf16", "method": method} | kw
    return estimate_stage(SMOLLM2_17B, stage=stage, **settings)


def test_dpo_live_reference_holds_a_frozen_copy_a_cached_one_does_not():
    """A live reference is a second, frozen model in the compute dtype; cached log-probs need no weights.

    With adapters the reference is the model with its adapters off, so live and cached are the same.
    """
    cache, live = stage_estimate("dpo", reference="cache"), stage_estimate("dpo", reference="live")
    assert cache["reference"] == 0
    n = KNOWN_SHAPES[SMOLLM2_17B].parameters
    assert live["reference"] == pytest.approx(2 * n / GIB)  # bf16: 2 bytes per parameter, 3.2 GiB
    assert live["total"] - cache["total"] == pytest.approx(2 * n / GIB)
    for method in ("lora", "qlora"):
        assert stage_estimate("dpo", method, reference="live") == stage_estimate("dpo", method)
    # each pair runs the chosen and the rejected sequence: twice SFT's activations at the same batch
    assert cache["activations"] == pytest.approx(2 * stage_estimate("sft")["activations"])
    with pytest.raises(MemoryPlanError, match="reference"):
        stage_estimate("dpo", reference="precomputed")


def test_dpo_live_reference_can_change_the_choice():
    cached = plan_memory(SMOLLM2_17B, 2048, 8, "bf16", 38, stage="dpo", reference="cache")
    live = plan_memory(SMOLLM2_17B, 2048, 8, "bf16", 38, stage="dpo", reference="live")
    assert (cached.method, live.method) == ("full", "lora")
    assert "reference log-probs cached" in cached.describe() and "live" in live.describe()


def test_reward_model_has_a_score_head_not_a_vocabulary():
    rm, dpo = stage_estimate("rm"), stage_estimate("dpo")
    assert rm["activations"] == dpo["activations"] and rm["logits"] < 0.01 < dpo["logits"]
    assert "reference" not in rm


def test_ppo_needs_more_than_sft_for_the_same_model():
    """PPO trains a value model beside the policy, keeps a reference and a generation cache."""
    for method in ("full", "lora", "qlora"):
        sft, ppo = stage_estimate("sft", method), stage_estimate("rlvr", method, **PPO_LENGTHS)
        assert ppo["total"] > sft["total"] + ppo["kv_cache"]
        assert ppo["kv_cache"] > 0 and ppo["reward_model"] == 0  # Tulu 3: the RM is not loaded
    full = stage_estimate("rlvr", **PPO_LENGTHS)
    sft_full = stage_estimate("sft")
    for part in ("weights", "gradients", "optimizer", "activations"):  # policy and value model, same size
        assert full[part] == pytest.approx(2 * sft_full[part])
    assert full["reference"] == pytest.approx(2 * KNOWN_SHAPES[SMOLLM2_17B].parameters / GIB)
    # 32 rollouts x 2048 tokens x (keys + values) x 24 layers x 2048 wide x 2 bytes
    assert full["kv_cache"] == pytest.approx(32 * 2048 * 2 * 24 * 2048 * 2 / GIB)
    with_rm = stage_estimate("rlvr", reward_model=SMOLLM2_17B, **PPO_LENGTHS)
    assert with_rm["reward_model"] == pytest.approx(full["reference"])
    small_value = stage_estimate("rlvr", value_model="HuggingFaceTB/SmolLM2-135M", **PPO_LENGTHS)
    assert small_value["optimizer"] < 0.6 * full["optimizer"]
    with pytest.raises(MemoryPlanError, match="response_length"):
        stage_estimate("rlvr")
    with pytest.raises(MemoryPlanError, match="stage"):
        stage_estimate("kto")
    assert stage_estimate("ppo", **PPO_LENGTHS) == full


def test_choice_ladder_full_lora_qlora_then_refusal_with_the_fixes():
    """Shrinking GPUs walk the ladder; past QLoRA the error names the GPU, the need and the fixes."""
    ppo = {"stage": "rlvr", **PPO_LENGTHS}
    methods = [plan_memory(SMOLLM2_17B, 2048, 8, "bf16", gib, **ppo).method for gib in (96, 48, 31)]
    assert methods == ["full", "lora", "qlora"]
    with pytest.raises(MemoryDoesNotFitError) as info:
        plan_memory(SMOLLM2_17B, 2048, 8, "fp16", 14.7, gpu_name="Tesla T4", refuse=True, **ppo)
    message = str(info.value)
    need = info.value.plan.estimates["qlora"]["total"]
    assert "Tesla T4 (14.7 GiB)" in message and f"QLoRA needs {need:.1f} GiB" in message
    assert f"bigger GPU: at least {math.ceil(need / 0.9)} GiB for QLoRA" in message
    assert "ZeRO-3 over several GPUs ('paper' profile)" in message  # the cache stays whole on each GPU
    assert "prompt_length 256 and response_length 256" in message
    with pytest.raises(MemoryDoesNotFitError) as info:
        plan_memory(SMOLLM2_17B, 4096, 8, "fp16", 6, gpu_name="a small GPU", refuse=True)
    message = str(info.value)
    assert "a shorter max_length: 1024" in message and "a smaller per-device batch: 2" in message
    assert "for full fine-tuning" in message and "ZeRO-3" in message
    # ZeRO-3 shards the 25.5 GiB of full fine-tuning's states; 7.1 GiB stays whole on each GPU
    with pytest.raises(MemoryDoesNotFitError, match="'paper' profile on 32 such GPUs with DeepSpeed ZeRO-3"):
        plan_memory(SMOLLM2_17B, 4096, 8, "bf16", 8.9, refuse=True)
    full = estimate_stage(SMOLLM2_17B, max_length=4096, per_device_batch=8, dtype="bf16", method="full")
    assert zero3_gpus(full, 0.9 * 16) == 4 and zero3_gpus(full, 0.9 * 8) is None


def test_plan_memory_from_reads_the_stage_from_a_plan():
    rlvr = resolve("rlvr_ppo", "single_gpu", hardware=A100_80, verbose=False)
    memory = plan_memory_from(rlvr)
    assert memory.stage == "rlvr" and memory.settings["prompt_length"] == rlvr.recipe.prompt_length
    assert memory.settings["rollout_batch"] == rlvr.recipe.rollout_batch_size
    assert memory.settings["value_model"] == "SultanR/SmolTulu-1.7b-RM"
    assert memory.settings["reward_model"] is None and memory.estimate["reward_model"] == 0
    assert "NVIDIA A100-SXM4-80GB" in memory.describe() and memory.method == "lora"
    scored = rlvr.recipe.replace(reward_model_multiplier=1.0)
    with_rm = plan_memory_from(resolve(scored, "single_gpu", hardware=A100_80, verbose=False))
    assert with_rm.estimates["lora"]["reward_model"] > 3
    dpo = resolve("dpo_1207", "paper", hardware=H100, verbose=False)
    assert plan_memory_from(dpo, reference="live").estimate["reference"] > 3
    assert plan_memory_from(dpo).estimate["reference"] == 0
    t4 = hardware_from_facts("cuda", 1, "Tesla T4", 14.7, 2, compute_capability=(7, 5))
    on_t4 = resolve("rlvr_ppo", "single_gpu", hardware=t4, verbose=False)
    with pytest.raises(MemoryDoesNotFitError, match="Tesla T4"):
        plan_memory_from(on_t4)
    assert not plan_memory_from(on_t4, refuse=False).fits
    sft = resolve("sft_1130", "single_gpu", hardware=A100_80, verbose=False)
    assert (
        plan_memory_from(sft).estimates
        == plan_memory(sft.model, sft.max_length, sft.per_device_batch_size, sft.dtype, 79.2).estimates
    )


# -- time --------------------------------------------------------------------------------------------
def test_hours_follow_flops_and_the_gpu():
    a100, h100 = (g for g in GPUS if g.name in ("A100 80 GB", "H100 80 GB"))
    sft = resolve("sft_1130", "paper", hardware=H100, verbose=False)
    hours = {m: estimate_hours(sft, m, h100)["hours"] for m in ("full", "lora", "qlora")}
    assert hours["lora"] == pytest.approx(0.75 * hours["full"])  # 6N against 8N per token
    assert hours["qlora"] == pytest.approx(2 * hours["lora"])
    assert estimate_hours(sft, "full", a100)["hours"] == pytest.approx(hours["full"] * 989 / 312)
    tokens = estimate_hours(sft, "full", h100)["tokens"]
    assert tokens == 939_343 * 850 * 2  # rows x tokens per row x epochs
    small = resolve("sft_1130", "single_gpu", hardware=H100, verbose=False)
    assert estimate_hours(small, "full", h100)["tokens"] == 10_000 * 850 * 2
    dpo = resolve("dpo_1130", "paper", hardware=H100, verbose=False)
    assert (
        estimate_hours(dpo, "full", h100, reference="live")["hours"]
        >= estimate_hours(dpo, "full", h100)["hours"]
    )
    ppo = resolve("rlvr_ppo", "paper", hardware=H100, verbose=False)
    capped = resolve("rlvr_ppo", "single_gpu", hardware=H100, verbose=False)
    full_run, short_run = estimate_hours(ppo, "lora", h100), estimate_hours(capped, "lora", h100)
    assert 0 < full_run["generation_hours"] < full_run["hours"]
    assert full_run["hours"] > 100 * short_run["hours"]  # 10M episodes against the profile's cap


# -- the README table --------------------------------------------------------------------------------
def memory_table_script():
    """``benchmarks/memory_table.py``, the script that prints the README's memory table, as a module."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(
        "memory_table_script", KIT_ROOT / "benchmarks" / "memory_table.py"
    )
    script = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_readme_memory_section_is_what_the_planner_prints_today():
    """The README's "Memory and time per GPU" section is computed, never typed: regenerate it with
    ``python benchmarks/memory_table.py --update README.md`` after changing the planner."""
    section = memory_table_script().readme_section()
    readme = (KIT_ROOT / "README.md").read_text(encoding="utf-8")
    assert section.startswith("## Memory and time per GPU\n")
    for stage in ("SFT-1130/1207 1.7B", "DPO-1130/1207 1.7B", "RM-1130/1207 1.7B", "RLVR PPO 1.7B", "135M"):
        assert section.count(f"| {stage}") == 2  # one row in each table
    for gpu in ("T4 16 GB", "A100 40 GB", "A100 80 GB", "H100 80 GB", "H200 141 GB"):
        assert f" {gpu} |" in section
    assert "refused (needs" in section and "LoRA," in section and "full," in section
    assert section in readme, "README.md is out of date: python benchmarks/memory_table.py --update README.md"


def test_memory_table_script_replaces_only_its_section():
    script = memory_table_script()
    text = "# Kit\n\n## Memory and time per GPU\n\nold table\n\n## Recipes\n\nkept\n"
    assert script.replace_section(text, "## Memory and time per GPU\n\nnew") == (
        "# Kit\n\n## Memory and time per GPU\n\nnew\n\n## Recipes\n\nkept\n"
    )
    assert script.replace_section(
        "# Kit\n\n## Memory and time per GPU\n\nold\n", "## Memory and time per GPU\n\nnew"
    ) == ("# Kit\n\n## Memory and time per GPU\n\nnew\n")
