"""How the stages load what they train: a base model's tokenizer gets the kit's chat template, and full
fine-tuning keeps float32 master weights whatever the checkpoint's dtype (Hub checkpoints are bf16)."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from smoltulu_utils.chat_template import template_fingerprint
from smoltulu_utils.data import load_rows
from smoltulu_utils.dpo import train_dpo
from smoltulu_utils.manifest import read_manifest, write_manifest
from smoltulu_utils.models import load_tokenizer, tiny_model
from smoltulu_utils.paths import FIXTURES_DIR
from smoltulu_utils.profiles import get_profile, resolve
from smoltulu_utils.recipes import load_recipe
from smoltulu_utils.reward_model import load_reward_model, train_rm
from smoltulu_utils.sft import train_sft
from smoltulu_utils.training import TrainingMethodError, full_precision, stage_load_kwargs, training_method


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def plan_for(recipe_name, model, *, batch=4, steps=1, **changes):
    """The smoke plan of a recipe on ``model`` (a folder), with a small batch and a few steps."""
    recipe = load_recipe(recipe_name).replace(effective_batch_size=batch, **changes)
    profile = get_profile("smoke").replace(model=str(model), per_device_batch_cap=batch, max_steps=steps)
    return resolve(recipe, profile, verbose=False)


def sft_rows(limit=4):
    return [dict(r) for r in load_rows("tulu3_sft", mirror=FIXTURES_DIR, limit=limit)]


def pairs(limit=4):
    return [dict(r) for r in load_rows("tulu3_preference", mirror=FIXTURES_DIR, limit=limit)]


def layer_weights(folder):
    """The float32 values of a checkpoint's transformer blocks and final norm (not the embeddings, whose
    rows of unseen tokens get no gradient in some stages, nor a score head)."""
    tensors = load_file(str(folder / "model.safetensors"))
    return {k: v for k, v in tensors.items() if k.startswith("model.") and "embed_tokens" not in k}


def changed_share(before: dict, after: dict) -> float:
    """The share of the weights whose value differs between two sets of the same tensors."""
    assert set(before) == set(after) and before
    changed = sum(int((before[k].float() != after[k].float()).sum()) for k in before)
    return changed / sum(v.numel() for v in before.values())


# ======================================================================================================
# A base model (no chat template, eos <|endoftext|>, no pad) starts the pipeline
# ======================================================================================================
@pytest.fixture
def base_folder(tmp_path, bundled_tokenizer):
    """A tiny model with a base SmolLM2 tokenizer and config, as the base Hub checkpoints ship them."""
    folder = tmp_path / "base"
    model, _ = tiny_model(seed=0, tokenizer=bundled_tokenizer)
    for config in (model.config, model.generation_config):
        config.bos_token_id, config.eos_token_id, config.pad_token_id = 0, 0, None
    model.save_pretrained(folder)
    base = copy.deepcopy(bundled_tokenizer)
    base.chat_template = None
    base.bos_token = base.eos_token = "<|endoftext|>"
    base.pad_token = None
    base.save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_sft_from_a_base_model_adapts_its_tokenizer_and_dpo_accepts_the_checkpoint(
    base_folder, tmp_path, bundled_tokenizer, one_thread
):
    assert load_tokenizer(base_folder).chat_template is None
    sft_out = tmp_path / "sft"
    result = train_sft(
        plan_for("sft_1130", base_folder, packing=False), sft_out, rows=sft_rows(), verbose=False
    )
    assert result.steps == 1
    manifest = read_manifest(sft_out)
    adapted = manifest["extra"]["tokenizer_adapted"]
    assert any("chat_template" in line for line in adapted)
    assert any("eos_token: '<|endoftext|>' -> '<|im_end|>'" in line for line in adapted)
    assert any("generation_config.eos_token_id: 0 -> 2" in line for line in adapted)
    saved = load_tokenizer(sft_out)
    assert saved.chat_template and saved.eos_token == "<|im_end|>"
    # The saved tokenizer is what the manifest records: SmolLM2-Instruct's tokenizer and template.
    assert (
        manifest["tokenizer"]["chat_template_hash"]
        == template_fingerprint(bundled_tokenizer)["chat_template_hash"]
    )
    assert (
        read_manifest(sft_out)["tokenizer"]["tokenizer_hash"] == template_fingerprint(saved)["tokenizer_hash"]
    )

    dpo = train_dpo(
        plan_for("dpo_1130", "tiny"), tmp_path / "dpo", parent=sft_out, rows=pairs(),
        reference_cache=tmp_path / "cache", verbose=False,
    )  # fmt: skip
    assert dpo.steps == 1
    dpo_manifest = read_manifest(tmp_path / "dpo")
    assert dpo_manifest["parent"]["stage"] == "sft" and dpo_manifest["extra"]["tokenizer_adapted"] == []


# ======================================================================================================
# Full fine-tuning of a bf16 checkpoint trains float32 master weights
# ======================================================================================================
@pytest.fixture
def bf16_folder(tmp_path, bundled_tokenizer):
    """The tiny model saved in bf16 with its tokenizer, as a Hub checkpoint is."""
    folder = tmp_path / "bf16"
    model, tok = tiny_model(seed=0, tokenizer=bundled_tokenizer, dtype="bf16")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    assert next(iter(load_file(str(folder / "model.safetensors")).values())).dtype == torch.bfloat16
    return folder


def test_full_fine_tuning_loads_float32_on_every_device(bundled_tokenizer):
    cpu_plan = plan_for("dpo_1130", "tiny")
    assert training_method(cpu_plan).load_kwargs == {"dtype": "float32"}
    model, _ = tiny_model(tokenizer=bundled_tokenizer, dtype="bf16")
    assert "bfloat16" in full_precision(model) and next(model.parameters()).dtype == torch.float32
    assert full_precision(model) is None  # float32 stays as it is


def test_qlora_needs_a_checkpoint_the_stage_loads_itself():
    from smoltulu_utils.memory import lora_config, qlora_quantization_config

    plan = plan_for("sft_1130", "tiny")
    quantization = qlora_quantization_config("fp32", require_cuda=False)
    chosen = training_method(plan, lora_config(), quantization_config=quantization)
    assert chosen.method == "qlora" and chosen.load_kwargs == {"quantization_config": quantization}
    with pytest.raises(TrainingMethodError, match="model=None"):
        training_method(plan, lora_config(), model_given=True, quantization_config=quantization)
    with pytest.raises(TrainingMethodError, match="save_pretrained"):
        stage_load_kwargs(chosen, "tiny")
    lora = training_method(plan, lora_config())
    assert lora.method == "lora" and lora.load_kwargs == {"dtype": "float32"}  # a CPU plan computes in fp32


@pytest.mark.slow
def test_dpo_at_the_paper_learning_rate_updates_float32_weights(bf16_folder, tmp_path, one_thread):
    plan = plan_for("dpo_1130", bf16_folder, learning_rate=8e-7, warmup_ratio=0.0)
    result = train_dpo(
        plan, tmp_path / "dpo", rows=pairs(), reference_cache=tmp_path / "cache", verbose=False
    )
    assert result.steps == 1
    after = layer_weights(tmp_path / "dpo")
    assert {v.dtype for v in after.values()} == {torch.float32}
    share = changed_share(layer_weights(bf16_folder), after)
    assert share > 0.9, f"only {share:.1%} of the weights moved at LR 8e-7"
    assert read_manifest(tmp_path / "dpo")["extra"]["weights_dtype"] == "float32"


def test_the_reward_model_updates_float32_weights(bf16_folder, tmp_path, one_thread):
    plan = plan_for("rm_1130", bf16_folder, learning_rate=3e-6, warmup_ratio=0.0)
    result = train_rm(plan, tmp_path / "rm", rows=pairs(), verbose=False)
    assert result.steps == 1
    after = layer_weights(tmp_path / "rm")
    assert {v.dtype for v in after.values()} == {torch.float32}
    share = changed_share(layer_weights(bf16_folder), after)
    assert share > 0.9, f"only {share:.1%} of the weights moved at LR 3e-6"


def test_ppo_updates_float32_policy_and_value_weights(bf16_folder, tmp_path, bundled_tokenizer, one_thread):
    from smoltulu_utils import rlvr
    from smoltulu_utils.rlvr_data import toy_task_rows

    # A bf16 reward-model checkpoint (as the SmolTulu RM on the Hub) for the value model to start from.
    rm_folder = tmp_path / "rm_bf16"
    reward_model = load_reward_model(tiny_model(seed=1, tokenizer=bundled_tokenizer)[0]).to(torch.bfloat16)
    reward_model.save_pretrained(rm_folder)
    bundled_tokenizer.save_pretrained(rm_folder)
    write_manifest(rm_folder, stage="rm", recipe={"name": "rm"}, data=[], tokenizer=bundled_tokenizer, seed=0)
    value_model, _ = rlvr.load_value_model(rm_folder, bundled_tokenizer)
    assert next(value_model.parameters()).dtype == torch.float32
    value_before = {k: v.detach().clone() for k, v in value_model.named_parameters() if "embed" not in k}

    plan = plan_for(
        "rlvr_ppo", bf16_folder, learning_rate=3e-6, warmup_ratio=0.0, rollout_batch_size=4,
        minibatch_size=4, response_length=2, num_episodes=4, num_epochs=1, lr_scheduler="constant", steps=None,
        penalize_non_stop=False,
    )  # fmt: skip
    result = rlvr.train_rlvr(
        plan, tmp_path / "ppo", rows=toy_task_rows(["7"], copies=4), value_model=value_model, verbose=False
    )
    assert result.iterations == 1
    after = layer_weights(tmp_path / "ppo")
    assert {v.dtype for v in after.values()} == {torch.float32}
    share = changed_share(layer_weights(bf16_folder), after)
    assert share > 0.9, f"only {share:.1%} of the policy's weights moved at LR 3e-6"
    value_after = {k: v.detach() for k, v in value_model.named_parameters() if k in value_before}
    assert {v.dtype for v in value_after.values()} == {torch.float32}
    share = changed_share(value_before, value_after)
    assert share > 0.9, f"only {share:.1%} of the value model's weights moved at LR 3e-6"


def test_a_value_model_made_from_a_bf16_policy_is_float32(bundled_tokenizer):
    from smoltulu_utils.ppo import value_model_from_policy

    policy, _ = tiny_model(tokenizer=bundled_tokenizer, dtype="bf16")
    value_model = value_model_from_policy(policy)
    assert {p.dtype for p in value_model.parameters()} == {torch.float32}
    torch.testing.assert_close(
        value_model.model.layers[0].mlp.up_proj.weight, policy.model.layers[0].mlp.up_proj.weight.float()
    )
