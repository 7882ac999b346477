"""PPO's formulas against hand-computed examples, and the model helpers the trainer loop uses."""

from __future__ import annotations

import math

import pytest
import torch

from smoltulu_utils import ppo
from smoltulu_utils.recipes import load_recipe, recipe_sources


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


def test_non_stop_penalty_replaces_the_score_of_a_response_that_never_ends():
    scores = torch.tensor([10.0, 10.0, 0.0, 0.0])
    ended = torch.tensor([True, False, True, False])
    # Tulu 3 (open-instruct): torch.where(contain_stop_token, scores, penalty), a right answer included
    assert ppo.apply_non_stop_penalty(scores, ended, -10.0).tolist() == [10.0, -10.0, 0.0, -10.0]
    assert ppo.PPOSettings.from_recipe(load_recipe("rlvr_ppo")).non_stop_replaces_score is True
    assert recipe_sources("rlvr_ppo")["non_stop_replaces_score"].startswith("Tulu 3")
    # the other variant stays available: the penalty is added
    assert ppo.apply_non_stop_penalty(scores, ended, -10.0, replace=False).tolist() == [10.0, 0.0, 0.0, -10.0]


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


# ---------------------------------------------------------------------------------------- batch sizes
def test_batch_sizes_are_per_process_and_multiply_by_the_world_size():
    # open-instruct: rollout_batch_size = local_rollout_batch_size * world_size, same for mini_batch
    sizes = ppo.batch_sizes(32, 16, num_processes=2, micro_cap=4)
    assert (sizes.local_rollout, sizes.local_minibatch, sizes.micro) == (32, 16, 4)
    assert (sizes.rollout, sizes.minibatch) == (64, 32)
    assert sizes.accumulation == 4 and sizes.minibatches == 2  # 2 optimizer steps per pass over a batch
    one = ppo.batch_sizes(32, 32, num_processes=1, micro_cap=6)
    assert (one.rollout, one.micro, one.accumulation) == (32, 4, 8)  # 4: the largest divisor of 32 up to 6
    with pytest.raises(ppo.PPOError, match="does not divide"):
        ppo.batch_sizes(32, 12, num_processes=2, micro_cap=4)


# ------------------------------------------------------------------------------------------- generator
def _pretend(monkeypatch, vllm: bool, cuda: bool):
    """Make vLLM look installed or not and a GPU present or not (vLLM is never imported here)."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a, **k: (object() if vllm else None) if name == "vllm" else find_spec(name, *a, **k),
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)


def test_auto_generator_samples_with_generate_even_where_vllm_is_installed(monkeypatch):
    for vllm, cuda in ((False, False), (True, True), (True, False)):
        _pretend(monkeypatch, vllm, cuda)
        assert ppo.choose_generator("auto") == "transformers"
        assert ppo.choose_generator("transformers") == "transformers"
    _pretend(monkeypatch, True, True)
    assert ppo.choose_generator("vllm") == "vllm"


def test_vllm_generator_without_vllm_or_a_gpu_is_a_clear_error(monkeypatch):
    from smoltulu_utils.errors import KitError

    _pretend(monkeypatch, vllm=False, cuda=True)
    with pytest.raises(KitError, match="pip install vllm") as info:
        ppo.choose_generator("vllm")
    assert "generator='transformers'" in str(info.value)
    _pretend(monkeypatch, vllm=True, cuda=False)
    with pytest.raises(KitError, match="no CUDA GPU"):
        ppo.choose_generator("vllm")
    with pytest.raises(KitError, match="unknown generator"):
        ppo.choose_generator("sglang")


# ------------------------------------------------------------------------------------------- the trainer
@pytest.fixture
def small_trainer(bundled_tokenizer):
    """A PPOTrainer on the tiny model with the recipe's settings: 4 prompts, minibatches of 2."""
    import copy

    from smoltulu_utils.models import tiny_model
    from smoltulu_utils.rlvr_data import prepare_rlvr_rows, toy_task_rows

    model, tokenizer = tiny_model(seed=2, tokenizer=bundled_tokenizer)
    examples, _ = prepare_rlvr_rows(toy_task_rows(["7"], copies=4), tokenizer, prompt_length=64)
    reference = copy.deepcopy(model).eval().requires_grad_(False)

    def make(num_epochs: int, **kwargs) -> ppo.PPOTrainer:
        settings = ppo.PPOSettings.from_recipe(load_recipe("rlvr_ppo"), response_length=2, num_epochs=num_epochs,
                                               seed=0)  # fmt: skip
        return ppo.PPOTrainer(
            policy=model, ref_policy=reference, value_model=ppo.value_model_from_policy(model),
            tokenizer=tokenizer, examples=examples, settings=settings, sizes=ppo.batch_sizes(4, 2, 1, 1),
            learning_rate=1e-4, total_iterations=2, **kwargs,
        )  # fmt: skip

    return make


def count_optimizer_steps(trainer: ppo.PPOTrainer) -> list[int]:
    """A one-item list counting the trainer's optimizer steps from now on."""
    calls = [0]
    step = trainer.optimizer.step

    def counted(*args, **kwargs):
        calls[0] += 1
        return step(*args, **kwargs)

    trainer.optimizer.step = counted
    return calls


def test_ppo_trainer_runs_num_epochs_passes_over_each_rollout_batch(small_trainer):
    trainer = small_trainer(3)
    calls = count_optimizer_steps(trainer)
    trainer.step()
    assert calls[0] == 3 * 2  # epochs x (rollout 4 / minibatch 2) optimizer steps per iteration
    assert trainer.scheduler.last_epoch == 3 * 2


def test_a_right_answer_that_never_ends_scores_minus_ten(small_trainer):
    trainer = small_trainer(1)  # the recipe's settings, as the kit runs them
    tokenizer = trainer.tokenizer
    ends = tokenizer.encode("The answer is 7", add_special_tokens=False) + [tokenizer.eos_token_id]
    never_ends = tokenizer.encode("The answer is 7.", add_special_tokens=False)
    responses = ppo.right_pad([ends, never_ends], trainer.pad_id, max(len(ends), len(never_ends)))
    mask, ended = ppo.response_mask(responses, trainer.eos_token_ids)
    scores, verdicts, _ = trainer._score(trainer.examples[:2], responses, mask, ended)
    assert [v.verified for v in verdicts] == [True, True]
    assert ended.tolist() == [True, False]
    assert scores.tolist() == [10.0, -10.0]  # the penalty replaces the verified score (Tulu 3), not 10 - 10


def test_vllm_rollouts_go_through_trls_colocated_engine(small_trainer, monkeypatch):
    """vLLM is not installed here: a stand-in with the signatures of TRL's VLLMGeneration checks the wiring
    (the engine gets the policy and the trainer's accelerator, weights are synced before each rollout)."""
    import inspect

    from trl.generation import vllm_generation

    real = vllm_generation.VLLMGeneration
    calls = []

    class StandIn:
        def __init__(self, *args, **kwargs):
            inspect.signature(real.__init__).bind(self, *args, **kwargs)
            self.kwargs = kwargs
            calls.append("init")

        def sync_weights(self):
            calls.append("sync")

        def generate(self, *args, **kwargs):
            bound = inspect.signature(real.generate).bind(self, *args, **kwargs).arguments
            calls.append("generate")
            tokenizer = self.kwargs["processing_class"]
            answer = tokenizer.encode("7", add_special_tokens=False) + [tokenizer.eos_token_id]
            return bound["prompts"], [answer for _ in bound["prompts"]], None, None

    monkeypatch.setattr(vllm_generation, "VLLMGeneration", StandIn)
    monkeypatch.setattr(ppo, "choose_generator", lambda generator: "vllm")
    trainer = small_trainer(1, generator="vllm")
    engine = trainer.engine
    assert engine.kwargs["model"] is trainer.unwrapped.policy
    assert engine.kwargs["accelerator"] is trainer.accelerator
    assert engine.kwargs["mode"] == "colocate" and engine.kwargs["max_completion_length"] == 2
    entry = trainer.step()
    assert calls == ["init", "sync", "generate"]
    assert entry["verifiable_reward"] == 1.0 and entry["non_stop_rate"] == 0.0
