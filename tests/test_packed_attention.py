"""Per-example sdpa for padding-free rows: equal to transformers' block-diagonal sdpa, and put back on save."""

from __future__ import annotations

import pytest
import torch

from smoltulu_utils.models import tiny_model
from smoltulu_utils.packed_attention import (
    NAME,
    restore_attention,
    sequence_starts,
    use_packed_attention,
)

LENGTHS = [5, 11, 3, 9]


def packed_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (1, sum(LENGTHS)), generator=generator)
    positions = torch.cat([torch.arange(n) for n in LENGTHS]).unsqueeze(0)
    return ids, positions


def test_sequence_starts():
    _, positions = packed_inputs()
    assert sequence_starts(positions) == [0, 5, 16, 19, 28]
    assert sequence_starts(torch.arange(4)[None]) == [0, 4]


def logits_and_grads(model, ids, positions):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    (logits.float().square().mean()).backward()
    return logits.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


def test_packed_attention_equals_block_diagonal_sdpa_and_separate_examples():
    model, _ = tiny_model(seed=0)
    assert model.config.num_attention_heads > model.config.num_key_value_heads  # grouped-query path
    model.train()
    ids, positions = packed_inputs()
    reference, reference_grads = logits_and_grads(model, ids, positions)  # transformers' block mask

    before = use_packed_attention(model)
    assert before == "sdpa" and model.config._attn_implementation == NAME
    packed, packed_grads = logits_and_grads(model, ids, positions)
    torch.testing.assert_close(packed, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(packed_grads, reference_grads, rtol=1e-3, atol=1e-6)

    # ...and each example alone gives the same logits: nothing leaks between examples.
    model.eval()
    with torch.no_grad():
        alone = []
        for a, b in zip(sequence_starts(positions)[:-1], sequence_starts(positions)[1:], strict=True):
            alone.append(model(input_ids=ids[:, a:b], use_cache=False).logits)
        torch.testing.assert_close(torch.cat(alone, 1), packed, rtol=1e-4, atol=1e-5)
        # ...while one causal mask over the whole row (what a leak would be) differs.
        leaky = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        assert (leaky - packed).abs().max() > 1e-3
    restore_attention(model, before)
    assert model.config._attn_implementation == "sdpa"


def test_padded_batches_and_generation_fall_back_to_sdpa():
    model, _ = tiny_model(seed=1)
    model.eval()
    ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        greedy = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        use_packed_attention(model)
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, plain)
        assert torch.equal(
            model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False), greedy
        )


@pytest.mark.parametrize("implementation", ["eager"])
def test_only_sdpa_models_switch(implementation):
    model, _ = tiny_model(seed=0)
    model.set_attn_implementation(implementation)
    assert use_packed_attention(model) is None
    assert model.config._attn_implementation == implementation


def test_trainer_saves_checkpoints_with_sdpa(bundled_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from smoltulu_utils.data import load_rows
    from smoltulu_utils.paths import FIXTURES_DIR
    from smoltulu_utils.profiles import get_profile, resolve
    from smoltulu_utils.recipes import load_recipe
    from smoltulu_utils.sft import build_trainer, prepare_sft_rows

    model, tok = tiny_model(seed=0, tokenizer=bundled_tokenizer)
    rows = [dict(r) for r in load_rows("tulu3_sft", mirror=FIXTURES_DIR, limit=4)]
    dataset, _ = prepare_sft_rows(rows, tok, max_length=128)
    recipe = load_recipe("sft_1130").replace(effective_batch_size=4)
    plan = resolve(recipe, get_profile("smoke").replace(model="tiny", max_steps=1), verbose=False)
    trainer = build_trainer(plan, model, tok, dataset, tmp_path / "run", padding_free=True)
    assert trainer.attention_before == "sdpa" and model.config._attn_implementation == NAME
    trainer.save_model(str(tmp_path / "saved"))
    assert NAME not in (tmp_path / "saved" / "config.json").read_text()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "saved").config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == NAME  # training goes on with the packed attention
