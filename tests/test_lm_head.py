"""The plain LM head answers TRL's fused-head calls with the same values and gradients as TRL's kernel."""

from __future__ import annotations

import copy

import torch
from trl.trainer.utils import add_fused_lm_head

from smoltulu_utils.lm_head import _plain_projection, use_plain_lm_head
from smoltulu_utils.models import tiny_model

FIELDS = ("log_probs", "entropy", "mean_logits", "is_top1", "label_mask")


def batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (3, 12), generator=generator)
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt
    labels[2, 9:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[2, 9:] = 0
    return ids, labels, mask


def test_plain_head_equals_trl_kernel_values_and_gradients():
    model, _ = tiny_model(seed=0)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    plain_model = copy.deepcopy(model)
    assert _plain_projection(plain_model)  # SmolLM2: only the labelled positions are projected
    assert use_plain_lm_head(plain_model)
    assert not use_plain_lm_head(plain_model)  # once is enough
    ids, labels, mask = batch()
    outs, grads = {}, {}
    for name, m in (("trl", model), ("plain", plain_model)):
        out = m(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, num_items_in_batch=17)
        out.loss.backward()
        outs[name] = out
        grads[name] = torch.cat([p.grad.flatten() for p in m.parameters()])
    for field in FIELDS:
        a, b = getattr(outs["trl"], field), getattr(outs["plain"], field)
        assert a.shape == b.shape == (3, 11), field
        torch.testing.assert_close(b.float(), a.float(), rtol=1e-4, atol=1e-4, msg=field)
    assert outs["plain"].log_probs[:, :3].eq(0).all()  # prompt positions carry nothing
    torch.testing.assert_close(outs["plain"].loss, outs["trl"].loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads["plain"], grads["trl"], rtol=1e-3, atol=1e-6)


def test_other_calls_go_to_the_model_forward():
    model, _ = tiny_model(seed=1)
    add_fused_lm_head(model)
    ids, labels, mask = batch(1)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, labels=labels)
        use_plain_lm_head(model)
        after = model(input_ids=ids, attention_mask=mask, labels=labels)
        torch.testing.assert_close(after.logits, before.logits)
        torch.testing.assert_close(after.loss, before.loss)
        generated = model.generate(ids[:1, :5], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 8)


def test_a_model_without_trl_forward_is_left_alone():
    model, _ = tiny_model(seed=0)
    assert not use_plain_lm_head(model)
    assert "forward" not in model.__dict__
