"""The LoRA chain: SFT (QLoRA) -> DPO (LoRA) -> RM (LoRA) -> RLVR (value model from the RM), on the tiny
model on a CPU. Each adapter run saves its adapter merged into float32 base weights, so every next stage
loads the previous folder as a plain model and trains all of its weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from smoltulu_utils.data import load_rows
from smoltulu_utils.dpo import train_dpo
from smoltulu_utils.manifest import read_manifest
from smoltulu_utils.memory import lora_config, qlora_quantization_config
from smoltulu_utils.models import tiny_model
from smoltulu_utils.paths import FIXTURES_DIR
from smoltulu_utils.profiles import get_profile, resolve
from smoltulu_utils.recipes import load_recipe
from smoltulu_utils.reward_model import load_reward_model, train_rm
from smoltulu_utils.sft import train_sft

pytestmark = pytest.mark.slow

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


class Watch(TrainerCallback):
    """Counts the trainable parameters when training starts and how many of them changed by its end."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
        self.trainable = sum(p.numel() for p in self.before.values())
        self.all = sum(p.numel() for p in model.parameters())

    def on_train_end(self, args, state, control, model=None, **kwargs):
        after = dict(model.named_parameters())
        self.changed = sum(int((after[n].detach().float() != p).sum()) for n, p in self.before.items())


def plan_for(recipe_name, *, batch=4, steps=2, lr=1e-3, **changes):
    recipe = load_recipe(recipe_name).replace(
        effective_batch_size=batch, learning_rate=lr, warmup_ratio=0.0, **changes
    )
    profile = get_profile("smoke").replace(model="tiny", per_device_batch_cap=batch, max_steps=steps)
    return resolve(recipe, profile, verbose=False)


def small_lora(**changes):
    return lora_config(rank=8, alpha=16, dropout=0.0, **changes)


def plain_checkpoint(folder, stage):
    """Check ``folder`` holds a merged, plain float32 model and return its weights."""
    assert not any((folder / name).exists() for name in ADAPTER_FILES), sorted(
        p.name for p in folder.iterdir()
    )
    extra = read_manifest(folder)["extra"]
    assert extra["merged"] is True and extra["method"] == stage[1] and extra["weights_dtype"] == "float32"
    weights = load_file(str(folder / "model.safetensors"))
    assert not any("lora" in k for k in weights) and {v.dtype for v in weights.values()} == {torch.float32}
    return weights


def differs(before, after, prefix="model.layers."):
    """Whether the block weights of two checkpoints differ (the merged adapter moved them)."""
    keys = [k for k in before if k.startswith(prefix)]
    assert keys and all(k in after for k in keys)
    return any(not torch.equal(before[k].float(), after[k].float()) for k in keys)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_sft_qlora_dpo_lora_rm_lora_then_ppo_from_the_rm(tmp_path, bundled_tokenizer, one_thread):
    start = tmp_path / "start"
    model, tok = tiny_model(seed=0, tokenizer=bundled_tokenizer)
    model.save_pretrained(start)
    tok.save_pretrained(start)
    start_weights = load_file(str(start / "model.safetensors"))
    sft_rows = [dict(r) for r in load_rows("tulu3_sft", mirror=FIXTURES_DIR, limit=8)]
    pairs = [dict(r) for r in load_rows("tulu3_preference", mirror=FIXTURES_DIR, limit=8)]

    # SFT with QLoRA: the base loads in 4-bit, the adapter merges into the float32 base reloaded from disk.
    watch = Watch()
    sft_plan = plan_for("sft_1130", packing=False)
    sft_plan = resolve(sft_plan.recipe, get_profile("smoke").replace(
        model=str(start), per_device_batch_cap=4, max_steps=2), verbose=False)  # fmt: skip
    quantization = qlora_quantization_config("fp32", require_cuda=False)
    sft = train_sft(sft_plan, tmp_path / "sft", rows=sft_rows, peft_config=small_lora(),
                    quantization_config=quantization, callbacks=[watch], verbose=False)  # fmt: skip
    assert sft.method == "qlora" and sft.steps == 2
    assert 0 < watch.trainable < watch.all and watch.changed > 0
    sft_weights = plain_checkpoint(tmp_path / "sft", ("sft", "qlora"))
    assert differs(start_weights, sft_weights)

    # DPO with LoRA from the merged SFT folder: a plain model, so the adapters train.
    watch = Watch()
    dpo = train_dpo(plan_for("dpo_1130"), tmp_path / "dpo", parent=tmp_path / "sft", rows=pairs,
                    peft_config=small_lora(), reference_cache=tmp_path / "cache", callbacks=[watch],
                    verbose=False)  # fmt: skip
    assert dpo.steps == 2 and 0 < watch.trainable < watch.all and watch.changed > 0
    dpo_weights = plain_checkpoint(tmp_path / "dpo", ("dpo", "lora"))
    assert differs(sft_weights, dpo_weights)

    # The reward model with LoRA (and a fully trained score head) from the merged DPO folder.
    watch = Watch()
    rm = train_rm(plan_for("rm_1130"), tmp_path / "rm", parent=tmp_path / "dpo", rows=pairs,
                  peft_config=small_lora(task_type="SEQ_CLS", modules_to_save=["score"]),
                  callbacks=[watch], verbose=False)  # fmt: skip
    assert rm.method == "lora" and 0 < watch.trainable < watch.all and watch.changed > 0
    rm_weights = plain_checkpoint(tmp_path / "rm", ("rm", "lora"))
    assert differs(dpo_weights, rm_weights) and "score.weight" in rm_weights
    fresh_head = load_reward_model(
        str(tmp_path / "dpo"), seed=42
    ).score.weight  # the head train_rm started from
    assert fresh_head.shape == rm_weights["score.weight"].shape == (1, 64)
    assert not torch.equal(
        fresh_head, rm_weights["score.weight"]
    )  # the trained head was merged, not the fresh one

    # RLVR: the value model starts from the merged RM and trains every weight, as the policy does.
    from smoltulu_utils import rlvr
    from smoltulu_utils.rlvr_data import toy_task_rows

    value_model, info = rlvr.load_value_model(tmp_path / "rm", bundled_tokenizer)
    assert info["stage"] == "rm" and all(p.requires_grad for p in value_model.parameters())
    torch.testing.assert_close(value_model.score.weight, rm_weights["score.weight"])
    before = {
        n: p.detach().clone() for n, p in value_model.named_parameters() if n.startswith("model.layers.")
    }
    plan = plan_for("rlvr_ppo", steps=None, rollout_batch_size=4, minibatch_size=4, response_length=4,
                    num_episodes=4, num_epochs=1, lr_scheduler="constant", penalize_non_stop=False)  # fmt: skip
    result = rlvr.train_rlvr(plan, tmp_path / "rlvr", parent=tmp_path / "dpo", value_model=value_model,
                             rows=toy_task_rows(["7"], copies=4), verbose=False)  # fmt: skip
    assert result.iterations == 1
    after = dict(value_model.named_parameters())
    assert any(not torch.equal(after[n].detach(), p) for n, p in before.items())  # the backbone trained
    assert differs(dpo_weights, load_file(str(tmp_path / "rlvr" / "model.safetensors")))
