"""PPO's formulas against hand-computed examples, and the model helpers the trainer loop uses."""

from __future__ import annotations

import math

import pytest
import torch

from smoltulu_utils import ppo


def close(a, b, tol=1e-5):
    return torch.allclose(
        torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol
    )


# ---------------------------------------------------------------------------------------------- formulas
def test_masked_mean_and_whitening():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert close(ppo.masked_mean(values, mask), 2.0)
    assert close(ppo.masked_var(values, mask), 1.0)  # unbiased: ((1-2)^2 + 0 + (3-2)^2) / (3 - 1)
    assert close(ppo.masked_var(values, mask, unbiased=False), 2 / 3)
    # (v - 2) / sqrt(1 + 1e-8); the masked entry is 0
    assert close(ppo.masked_whiten(values, mask), [[-1.0, 0.0, 1.0, 0.0]])
    assert close(ppo.masked_whiten(values, mask, shift_mean=False), [[1.0, 2.0, 3.0, 0.0]])


def test_per_token_kl_is_the_log_ratio_to_the_reference():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -9.0]])
    kl = ppo.per_token_kl(logprobs, ref, torch.tensor([[1, 1, 0]]))
    assert close(kl, [[0.5, -1.0, 0.0]])


def test_response_mask_keeps_tokens_up_to_the_first_end():
    responses = torch.tensor([[5, 2, 2, 2], [5, 6, 7, 8], [2, 9, 2, 2]])
    mask, ended = ppo.response_mask(responses, eos_token_ids=[2])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


def test_non_stop_penalty_is_added_to_the_score_of_a_response_that_never_ends():
    scores = torch.tensor([10.0, 10.0, 0.0, 0.0])
    ended = torch.tensor([True, False, True, False])
    assert ppo.apply_non_stop_penalty(scores, ended, -10.0).tolist() == [10.0, 0.0, 0.0, -10.0]
    # open-instruct's variant: the penalty replaces the score
    assert ppo.apply_non_stop_penalty(scores, ended, -10.0, replace=True).tolist() == [
        10.0,
        -10.0,
        0.0,
        -10.0,
    ]


def test_token_rewards_put_the_score_on_the_last_response_token():
    scores = torch.tensor([10.0, -10.0])
    kl = torch.tensor([[0.2, 0.4, 0.0], [1.0, 0.0, 0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    rewards = ppo.token_rewards(scores, kl, mask, kl_beta=0.1)
    # r_t = -0.1 * kl_t; + score at index (length - 1)
    assert close(rewards, [[-0.02, -0.04 + 10.0, 0.0], [-0.1, 0.0, -0.05 - 10.0]])


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 1.0]])
    values = torch.tensor([[0.5, 0.25]])
    advantages, returns = ppo.gae_advantages(rewards, values, torch.ones(1, 2), gamma=1.0, lam=0.5)
    # t=1: delta = 1 + 0 - 0.25 = 0.75 -> A1 = 0.75
    # t=0: delta = 0 + 0.25 - 0.5 = -0.25 -> A0 = -0.25 + 1 * 0.5 * 0.75 = 0.125
    assert close(advantages, [[0.125, 0.75]])
    assert close(returns, [[0.625, 1.0]])


def test_gae_treats_values_past_the_end_as_zero_and_discounts():
    rewards = torch.tensor([[2.0, 5.0]])
    values = torch.tensor([[1.0, 3.0]])
    advantages, returns = ppo.gae_advantages(rewards, values, torch.tensor([[1.0, 0.0]]), gamma=1.0, lam=0.95)
    assert close(advantages, [[1.0, 0.0]]) and close(returns, [[2.0, 0.0]])  # delta_0 = 2 + 0 - 1
    advantages, _ = ppo.gae_advantages(
        torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2), torch.ones(1, 2), 0.9, 1.0
    )
    assert close(advantages, [[0.9, 1.0]])  # gamma discounts the later reward


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.5]]))
    advantages = torch.tensor([[1.0, 1.0, -1.0]])
    info = ppo.policy_loss(new, old, advantages, torch.ones(1, 3), cliprange=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5; token 2: max(1.5, 1.2) = 1.5
    assert close(info.loss, (-1.2 - 0.5 + 1.5) / 3)
    assert close(info.clip_fraction, 1 / 3)
    assert close(info.approx_kl, 0.5 * (2 * math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3)


def test_clipped_policy_loss_gradient_is_zero_where_clipped():
    new = torch.log(torch.tensor([[1.5, 1.1]])).requires_grad_()
    info = ppo.policy_loss(new, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), cliprange=0.2)
    info.loss.backward()
    assert new.grad[0, 0] == 0 and new.grad[0, 1] < 0  # the clipped token gets no push


def test_clipped_value_loss_by_hand():
    values = torch.tensor([[2.0, 1.1]])
    old = torch.tensor([[1.0, 1.0]])
    returns = torch.tensor([[3.0, 0.0]])
    info = ppo.value_loss(values, old, returns, torch.ones(1, 2), cliprange_value=0.2)
    # token 0: V_clip = 1.2; max((2-3)^2, (1.2-3)^2) = 3.24. token 1: V_clip = 1.1; max(1.21, 1.21) = 1.21
    assert close(info.loss, 0.5 * (3.24 + 1.21) / 2)
    assert close(info.clip_fraction, 0.5)


# ------------------------------------------------------------------------------------------ model helpers
@pytest.fixture(scope="module")
def tiny(bundled_tokenizer):
    from smoltulu_utils.models import tiny_model

    return tiny_model(seed=1, tokenizer=bundled_tokenizer)


def test_response_logprobs_do_not_depend_on_left_padding(tiny):
    model, _ = tiny
    prompt, response = [5, 6, 7, 8], [9, 10]
    short = [7, 8]
    ids, mask = ppo.left_pad([prompt, short], pad_id=2)
    full = torch.cat([ids, torch.tensor([response, response])], dim=1)
    full_mask = torch.cat([mask, torch.ones(2, 2, dtype=torch.long)], dim=1)
    with torch.no_grad():
        batched = ppo.response_logprobs(model, full, full_mask, 2)
        alone = ppo.response_logprobs(
            model, torch.tensor([short + response]), torch.ones(1, 4, dtype=torch.long), 2
        )
        logits = model(torch.tensor([short + response])).logits[0, 1:3].log_softmax(-1)
    assert close(batched[1], alone[0], tol=1e-4)
    assert close(alone[0], logits[[0, 1], [9, 10]], tol=1e-4)


def test_value_model_from_policy_shares_the_backbone_and_gives_one_value_per_token(tiny):
    model, _ = tiny
    value_model = ppo.value_model_from_policy(model)
    assert value_model.config.num_labels == 1
    assert torch.equal(value_model.model.embed_tokens.weight, model.model.embed_tokens.weight)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    values = ppo.response_values(value_model, ids, torch.ones_like(ids), 2)
    assert values.shape == (1, 2) and torch.isfinite(values).all()


def test_restrict_vocabulary_limits_sampling_and_is_removable(tiny):
    model, tokenizer = tiny
    allowed = [33, 34, 2]
    ids = torch.tensor([[5, 6, 7]] * 8)
    handle = ppo.restrict_vocabulary(model, allowed)
    try:
        torch.manual_seed(0)
        out = ppo.sample_responses(model, ids, torch.ones_like(ids), 4, 1.0, [2], 2)
        assert set(out.flatten().tolist()) <= set(allowed)
        probs = model(ids[:1]).logits[0, -1].softmax(-1)
        assert close(probs[allowed].sum(), 1.0)
    finally:
        handle.remove()
    assert model.get_output_embeddings().bias is None
    with pytest.raises(ppo.PPOError):
        ppo.restrict_vocabulary(model, [10**9])
