"""PPO with verifiable rewards (Tulu 3's RLVR), written out: the formulas and a small trainer loop.

Why by hand: TRL no longer ships a PPO trainer (TRL 1.x keeps GRPO and RLOO), and the open-instruct PPO
that Tulu 3 and SmolTulu trained with has been removed from its repository. This module follows that
code (``ppo_vllm_thread_ray_gtrl.py``), one function per formula, so each can be read and tested alone.
transformers runs the models and samples, Accelerate places them on devices and wraps them for DDP.

One iteration, for a batch of prompts ``x`` and responses ``y = (a_1 .. a_T)`` sampled at temperature 1:

1. **Score** (per sequence): ``s = R_v`` (10) when the verifier accepts the response, else 0
   (:func:`~smoltulu_utils.verifiers.verify`); the score of a response that never emits end-of-sequence
   is replaced by the non-stop penalty, ``s = -10``, verified or not (:func:`apply_non_stop_penalty`, as
   open-instruct; ``PPOSettings(non_stop_replaces_score=False)`` adds the penalty instead).
2. **Per-token KL** to the frozen reference policy (open-instruct's ``kl1`` estimator, :func:`per_token_kl`):
   ``kl_t = log pi(a_t | s_t) - log pi_ref(a_t | s_t)``.
3. **Rewards** (:func:`token_rewards`): ``r_t = -beta * kl_t``, plus ``s`` on the last response token.
4. **GAE** (:func:`gae_advantages`): ``delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)``,
   ``A_t = delta_t + gamma * lambda * A_{t+1}`` (``V`` and ``A`` are 0 past the end), returns ``R_t = A_t + V(s_t)``.
5. **Whitening** (:func:`masked_whiten`): ``A <- (A - mean(A)) / sqrt(var(A) + 1e-8)`` over the batch's
   response tokens.
6. **Clipped policy loss** (:func:`policy_loss`): ``rho_t = exp(log pi_new - log pi_old)``,
   ``L_pi = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps))``; the clip fraction is the share of
   tokens where the clipped term is the larger.
7. **Clipped value loss** (:func:`value_loss`): ``V_clip = V_old + clip(V - V_old, -eps_v, eps_v)``,
   ``L_V = 0.5 * mean_t max((V - R_t)^2, (V_clip - R_t)^2)``.
8. **Update**: AdamW on ``L_pi + c_v * L_V`` for ``num_epochs`` passes (Tulu 3: 4) over the rollout batch,
   one optimizer step per minibatch.

Batch sizes are counted as open-instruct counts them (:func:`batch_sizes`): the recipe's rollout and
minibatch sizes are per process (``local_rollout_batch_size``, ``local_mini_batch_size``) and the global
batch is that times the number of processes. Rollouts come from transformers' ``generate``, or from vLLM
through TRL's colocated engine when asked for (``generator="vllm"``, :func:`choose_generator`).

Where the kit differs from open-instruct, for clarity: the score sits on the last response token (the
end-of-sequence token when there is one), where open-instruct adds it one position later and lets GAE
carry it back with a factor lambda; policy and value models step with one optimizer (open-instruct runs
two DeepSpeed engines with the same learning rate), as TRL's PPOv2 did. The value model starts from a
reward model: a sequence-classification model whose one-label ``score`` head is applied to every position.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import KitError
from .verifiers import VERIFIED_REWARD, Verdict, verify

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

#: Logits given to tokens outside a restricted vocabulary (finite, so entropies stay finite).
MASKED_LOGIT = -1e9


class PPOError(KitError, ValueError):
    """A PPO run that cannot start or go on; the message names the problem and the fix."""


@dataclass(frozen=True)
class PPOSettings:
    """PPO's own constants (open-instruct's defaults, which Tulu 3's RLVR kept); the recipe holds the rest."""

    gamma: float = 1.0  # Tulu 3: discount factor
    lam: float = 0.95  # Tulu 3: GAE lambda
    cliprange: float = 0.2  # Tulu 3: policy ratio clip
    cliprange_value: float = 0.2  # Tulu 3: value clip
    vf_coef: float = 0.1  # Tulu 3: weight of the value loss
    whiten_advantages: bool = True  # Tulu 3: advantages whitened over the batch
    max_grad_norm: float = 1.0  # Tulu 3: DeepSpeed gradient clipping 1.0
    adam_eps: float = 1e-5  # Tulu 3: AdamW epsilon
    forward_batch_size: int | None = None  # kit choice: no-grad forward batch; None = the micro-batch
    min_response_length: int = 0  # Tulu 3: a response shorter than this (before its EOS) counts as non-stop
    penalize_non_stop: bool = True  # Tulu 3: open-instruct's non_stop_penalty switch (on for RLVR)
    non_stop_replaces_score: bool = True  # Tulu 3: the penalty replaces the score (False: it is added)
    samples_kept: int = 8  # kit choice: responses of the last iteration kept for display


# ======================================================================================================
# The formulas
# ======================================================================================================
def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1: ``sum(v * m) / sum(m)`` (over ``dim``, or over everything)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``values`` where ``mask`` is 1; ``unbiased`` multiplies by ``n / (n - 1)`` (Bessel)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n > 1:
            var = var * n / (n - 1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Advantage whitening over the masked entries: ``(v - mean) / sqrt(var + 1e-8)``, 0 where ``mask`` is 0.

    ``var`` is the unbiased variance (as open-instruct and TRL). ``shift_mean=False`` keeps the mean:
    ``v / sqrt(var + 1e-8)`` (the reward whitening variant).
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def per_token_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The ``kl1`` estimator per token: ``kl_t = log pi(a_t) - log pi_ref(a_t)``, 0 past the response end.

    Its expectation over sampled tokens is KL(pi || pi_ref); one sample can be negative.
    """
    return (logprobs - ref_logprobs) * mask.to(logprobs.dtype)


def response_mask(responses: torch.Tensor, eos_token_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, ended)`` for padded response ids: mask is 1 up to and including the first end-of-sequence
    token (every token when there is none); ``ended`` says whether the response emitted one."""
    is_eos = torch.isin(responses, torch.as_tensor(list(eos_token_ids), device=responses.device))
    ended = is_eos.any(dim=1)
    # tokens strictly after the first EOS: some EOS came before them
    after_end = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    return (~after_end).long(), ended


def apply_non_stop_penalty(
    scores: torch.Tensor, ended: torch.Tensor, penalty: float, replace: bool = True
) -> torch.Tensor:
    """The non-stop penalty: the score of a response that never ends becomes ``penalty`` (-10).

    ``score_i = scores_i if ended_i else penalty`` (open-instruct's ``torch.where(contain_stop_token,
    scores, penalty_reward_value)``, which Tulu 3 trained with): a verified answer that never stops scores
    -10, as a wrong one. With ``replace=False`` the penalty is added instead,
    ``score_i = scores_i + (0 if ended_i else penalty)``, so a verified answer that never stops scores 0.
    """
    penalty_t = torch.full_like(scores, float(penalty))
    if replace:
        return torch.where(ended, scores, penalty_t)
    return torch.where(ended, scores, scores + penalty_t)


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_beta: float) -> torch.Tensor:
    """Per-token rewards: ``r_t = -beta * kl_t``, plus the sequence score on the last response token.

    ``mask`` marks the response tokens (1 up to the end); the last one is at ``mask.sum(1) - 1``.
    """
    rewards = -kl_beta * kl * mask.to(kl.dtype)
    last = (mask.sum(dim=1) - 1).clamp(min=0).long()
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens: ``(advantages, returns)``.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``, computed
    backwards from the last token, with ``V`` and ``A`` taken as 0 past the response end (``mask`` 0);
    ``returns = A + V`` (the value target). Both are 0 where ``mask`` is 0.
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


@dataclass
class LossInfo:
    """A loss with the statistics PPO logs beside it."""

    loss: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor | None = None


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> LossInfo:
    """PPO's clipped surrogate: ``mean_t max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps))``.

    ``rho_t = exp(log pi_new(a_t) - log pi_old(a_t))``. ``clip_fraction``: share of tokens where the clipped
    term is the larger (its gradient is 0 there). ``approx_kl``: ``0.5 * mean((log rho)^2)``.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = 0.5 * masked_mean(log_ratio**2, mask)
    return LossInfo(loss, clip_fraction, approx_kl)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float,
) -> LossInfo:
    """PPO's clipped value loss: ``0.5 * mean_t max((V - R)^2, (V_clip - R)^2)``,
    ``V_clip = V_old + clip(V - V_old, -eps_v, eps_v)``; ``clip_fraction`` as in :func:`policy_loss`."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((loss_clipped > loss_unclipped).float(), mask)
    return LossInfo(loss, clip_fraction)


# ======================================================================================================
# Models
# ======================================================================================================
def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting only attended tokens (left padding gets position 0)."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


def response_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_length: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``log pi(a_t | s_t)`` of the last ``response_length`` tokens of ``input_ids``, at ``temperature``.

    Only the logits that predict response tokens are computed (``logits_to_keep``).
    """
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_for(attention_mask),
        logits_to_keep=response_length + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1].float() / temperature
    targets = input_ids[:, -response_length:]
    return torch.gather(logits.log_softmax(dim=-1), 2, targets.unsqueeze(-1)).squeeze(-1)


def response_values(
    value_model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int
) -> torch.Tensor:
    """``V(s_t)`` for each response token: the value head on the hidden state just before the token."""
    backbone = getattr(value_model, value_model.base_model_prefix)
    hidden = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_for(attention_mask),
        use_cache=False,
    ).last_hidden_state
    values = value_model.score(hidden[:, -response_length - 1 : -1]).squeeze(-1)
    return values.float()


def value_model_from_policy(policy: PreTrainedModel) -> PreTrainedModel:
    """A one-label sequence-classification model with the policy's architecture and backbone weights.

    For ``value_model_from: policy`` and for tests with the tiny model (its ``score`` head is newly
    initialised, as when a causal LM checkpoint is loaded with ``head="reward"``). The value model trains
    in full, so its weights are float32 whatever the policy's dtype (bf16 weights would round away most
    AdamW steps; Accelerate's autocast computes in bf16 over them).
    """
    from transformers import AutoModelForSequenceClassification

    config = policy.config.__class__.from_dict(policy.config.to_dict())
    config.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        value_model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    backbone = getattr(policy, policy.base_model_prefix)
    getattr(value_model, value_model.base_model_prefix).load_state_dict(backbone.state_dict())
    return value_model.to(device=next(policy.parameters()).device, dtype=torch.float32)


class VocabularyRestriction:
    """The handle :func:`restrict_vocabulary` returns: :meth:`remove` gives the output layer its bias back."""

    def __init__(self, head: nn.Module, previous: nn.Parameter | None):
        self.head, self.previous = head, previous

    def remove(self) -> None:
        """Lift the restriction (the output layer gets the bias it had before)."""
        self.head.bias = self.previous


def restrict_vocabulary(model: nn.Module, token_ids: Sequence[int]) -> VocabularyRestriction:
    """Let ``model`` produce only ``token_ids``: every other logit is lowered by :data:`MASKED_LOGIT`.

    The output layer gets a frozen bias (0 on the allowed tokens), so sampling, log-probabilities and
    entropies all see the same restricted policy, including TRL's fused LM head, which reads the layer's
    weight and bias directly. Used by the kit's toy task (a tiny random model then finds a right answer by
    chance). Returns a handle whose ``remove()`` lifts the restriction; do not save a model while it is on.
    """
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0]
    allowed = torch.as_tensor(sorted({int(t) for t in token_ids}), dtype=torch.long)
    if allowed.numel() == 0 or int(allowed.min()) < 0 or int(allowed.max()) >= vocab:
        raise PPOError(
            f"restricted vocabulary {list(token_ids)!r} is empty or outside the model's {vocab} tokens"
        )
    previous = head.bias
    bias = torch.full((vocab,), MASKED_LOGIT, dtype=head.weight.dtype, device=head.weight.device)
    bias[allowed] = 0.0
    if previous is not None:
        bias = bias + previous.detach()
    head.bias = nn.Parameter(bias, requires_grad=False)
    return VocabularyRestriction(head, previous)


class PolicyAndValue(nn.Module):
    """Policy and value model as one module, so one optimizer and one DDP wrapper hold both."""

    def __init__(self, policy: nn.Module, value_model: nn.Module):
        super().__init__()
        self.policy = policy
        self.value_model = value_model

    def forward(self, input_ids, attention_mask, response_length: int, temperature: float = 1.0):
        """``(log pi(a_t), V(s_t))`` of the response tokens."""
        logprobs = response_logprobs(self.policy, input_ids, attention_mask, response_length, temperature)
        values = response_values(self.value_model, input_ids, attention_mask, response_length)
        return logprobs, values


# ======================================================================================================
# Generation
# ======================================================================================================
def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of prompts padded on the left to the longest."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        if prompt:
            ids[i, width - len(prompt) :] = torch.as_tensor(list(prompt))
            mask[i, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def right_pad(
    responses: Sequence[Sequence[int]], pad_id: int, width: int, device: Any = None
) -> torch.Tensor:
    """Response ids padded (or cut) on the right to ``width``."""
    out = torch.full((len(responses), width), pad_id, dtype=torch.long)
    for i, response in enumerate(responses):
        response = list(response)[:width]
        if response:
            out[i, : len(response)] = torch.as_tensor(response)
    return out.to(device)


#: Rollout generators: ``auto`` is transformers' ``generate``; vLLM is used only when asked for.
GENERATORS = ("auto", "transformers", "vllm")


def vllm_available() -> bool:
    """True when vLLM is installed and a CUDA GPU is present (vLLM generation is possible)."""
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def choose_generator(generator: str = "auto") -> str:
    """The rollout generator to use: ``"transformers"`` or ``"vllm"``.

    ``"auto"`` and ``"transformers"`` give transformers' ``generate`` (it runs everywhere, and is the path
    the kit's tests run); vLLM is opt-in: ``"vllm"`` needs vLLM installed and a CUDA GPU, else a
    :class:`PPOError` says what is missing and how to fix it.
    """
    if generator not in GENERATORS:
        raise PPOError(f"unknown generator {generator!r}; use one of {', '.join(GENERATORS)}")
    if generator != "vllm":
        if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available():
            log.info("vLLM is installed; rollouts use transformers' generate unless generator='vllm'")
        return "transformers"
    missing = []
    if importlib.util.find_spec("vllm") is None:
        missing.append("vLLM is not installed (pip install vllm, a version TRL supports)")
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible")
    if missing:
        raise PPOError(
            f"generator='vllm' cannot run here: {'; '.join(missing)}. Fix: install vLLM on a CUDA GPU "
            "machine, or use generator='transformers' (or 'auto'), which samples with transformers' generate."
        )
    return "vllm"


class VLLMGenerator:
    """Rollouts by a vLLM engine colocated on each training GPU, through TRL's ``VLLMGeneration``.

    The engine and the weight copy are TRL's, as ``GRPOTrainer`` uses them with ``vllm_mode="colocate"``:
    one engine per process (vLLM's ``external_launcher`` executor), loaded from the policy's
    ``name_or_path`` (a folder or Hub id with its config and weights); :meth:`load_weights` pushes the
    policy's current weights into it (gathering them under DeepSpeed ZeRO-3, merging LoRA adapters).
    Sampling is at the PPO temperature with no top-k or top-p. Needs vLLM and a CUDA GPU.
    """

    def __init__(
        self,
        policy: nn.Module,
        accelerator: Any,
        tokenizer: PreTrainedTokenizerBase,
        max_new_tokens: int,
        temperature: float,
        gpu_memory_utilization: float = 0.3,
        max_model_length: int | None = None,
    ):
        from trl.generation.vllm_generation import VLLMGeneration

        self.engine = VLLMGeneration(
            model=policy,
            accelerator=accelerator,
            processing_class=tokenizer,
            mode="colocate",
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_length=max_model_length,
            temperature=temperature,
            top_p=1.0,
            top_k=0,
            max_completion_length=max_new_tokens,
            logprobs=None,
        )

    def load_weights(self, policy: nn.Module | None = None) -> None:
        """Copy the policy's current weights into the engine (TRL's ``sync_weights``)."""
        self.engine.sync_weights()

    def generate(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        """Sampled response ids (end-of-sequence included when emitted) for each prompt."""
        _, completions, _, _ = self.engine.generate([list(p) for p in prompts], None, num_generations=1)
        return [list(ids) for ids in completions]


@torch.no_grad()
def sample_responses(
    policy: PreTrainedModel,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    eos_token_ids: Sequence[int],
    pad_id: int,
) -> torch.Tensor:
    """Responses sampled by ``generate`` at ``temperature`` (no top-k or top-p), padded to ``max_new_tokens``."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(eos_token_ids),
        pad_token_id=pad_id,
    )
    out = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config)
    responses = out[:, prompt_ids.shape[1] :]
    if responses.shape[1] < max_new_tokens:
        fill = torch.full(
            (responses.shape[0], max_new_tokens - responses.shape[1]), pad_id, device=responses.device
        )
        responses = torch.cat([responses, fill.to(responses.dtype)], dim=1)
    return responses


# ======================================================================================================
# The trainer
# ======================================================================================================
@dataclass(frozen=True)
class BatchSizes:
    """PPO's batch sizes as open-instruct counts them: per process, times the number of processes.

    open-instruct: ``rollout_batch_size = local_rollout_batch_size * world_size`` and
    ``mini_batch_size = local_mini_batch_size * world_size``; one minibatch is one optimizer step,
    accumulated over micro-batches of ``per_device_train_batch_size``.
    """

    num_processes: int
    local_rollout: int  # prompts per process per iteration (local_rollout_batch_size)
    local_minibatch: int  # responses per process per optimizer step (local_mini_batch_size)
    micro: int  # responses per process per forward and backward pass (per_device_train_batch_size)

    @property
    def rollout(self) -> int:
        """Prompts per iteration over all processes."""
        return self.local_rollout * self.num_processes

    @property
    def minibatch(self) -> int:
        """Responses per optimizer step over all processes."""
        return self.local_minibatch * self.num_processes

    @property
    def accumulation(self) -> int:
        """Micro-batches accumulated into one optimizer step."""
        return self.local_minibatch // self.micro

    @property
    def minibatches(self) -> int:
        """Optimizer steps per pass (epoch) over one rollout batch."""
        return self.local_rollout // self.local_minibatch


def batch_sizes(
    rollout_per_process: int, minibatch_per_process: int, num_processes: int, micro_cap: int
) -> BatchSizes:
    """The sizes of a run on ``num_processes``, from per-process rollout and minibatch sizes (the recipe's).

    The micro-batch is the largest divisor of the minibatch up to ``micro_cap`` (the profile's per-device
    cap). Raises :class:`PPOError` when the minibatch does not divide the rollout batch.
    """
    if min(rollout_per_process, minibatch_per_process, num_processes, micro_cap) < 1:
        raise PPOError(
            f"batch sizes must be positive: rollout {rollout_per_process}, minibatch {minibatch_per_process}, "
            f"{num_processes} process(es), micro-batch cap {micro_cap}"
        )
    if rollout_per_process % minibatch_per_process:
        raise PPOError(
            f"minibatch_size {minibatch_per_process} does not divide rollout_batch_size {rollout_per_process} "
            "(both per process); pick a divisor"
        )
    top = min(micro_cap, minibatch_per_process)
    micro = max(d for d in range(1, top + 1) if minibatch_per_process % d == 0)
    return BatchSizes(num_processes, rollout_per_process, minibatch_per_process, micro)


@dataclass
class RolloutBatch:
    """One iteration's rollouts, ready for the PPO epochs."""

    input_ids: torch.Tensor  # prompt (left-padded) + response
    attention_mask: torch.Tensor
    responses: torch.Tensor
    mask: torch.Tensor  # response tokens up to and including the end
    logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


@dataclass
class PPOTrainer:
    """The PPO loop. Build it with models already loaded; :meth:`train` runs the iterations.

    ``examples``: objects with ``prompt_ids`` (token ids of the rendered prompt) and ``target`` (a
    :class:`~smoltulu_utils.verifiers.Target`). The trainer's batch sizes are global (all processes):
    ``rollout_batch_size`` prompts per iteration, split into minibatches of ``minibatch_size`` (one optimizer
    step each, ``num_epochs`` passes), each accumulated over micro-batches of ``micro_batch_size`` per
    process; :func:`batch_sizes` forms them from the recipe's per-process counts. ``generator``: ``None``
    or ``"transformers"`` (``generate``), ``"vllm"`` (a :class:`VLLMGenerator` built on the trainer's
    accelerator, checked by :func:`choose_generator`), or an object with ``load_weights`` and ``generate``.
    """

    policy: PreTrainedModel
    ref_policy: PreTrainedModel
    value_model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    examples: Sequence[Any]
    learning_rate: float
    rollout_batch_size: int
    minibatch_size: int
    micro_batch_size: int
    response_length: int
    num_epochs: int = 1
    kl_beta: float = 0.05
    temperature: float = 1.0
    verifiable_reward: float = VERIFIED_REWARD
    non_stop_penalty: float = -10.0
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    total_iterations: int = 1
    seed: int = 0
    settings: PPOSettings = field(default_factory=PPOSettings)
    mixed_precision: str = "no"
    generator: Any = None  # None or "transformers": generate; "vllm": a VLLMGenerator; or such an object
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from transformers import get_scheduler

        if not self.examples:
            raise PPOError("no prompts to train on: every row was skipped (see the data report)")
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(), mixed_precision=self.mixed_precision
        )
        world = self.accelerator.num_processes
        for name in ("rollout_batch_size", "minibatch_size"):
            if getattr(self, name) % world:
                raise PPOError(f"{name} {getattr(self, name)} does not split over {world} processes")
        self.local_rollout = self.rollout_batch_size // world
        self.local_minibatch = self.minibatch_size // world
        if self.local_rollout % self.local_minibatch or self.local_minibatch % self.micro_batch_size:
            raise PPOError(
                f"batch sizes do not nest: rollout {self.rollout_batch_size}, minibatch {self.minibatch_size}, "
                f"micro-batch {self.micro_batch_size} per process on {world} process(es); pick divisors"
            )
        # seed + process index: each process samples its own responses (the weights are synced by DDP and
        # the prompt order by its own generator); one process keeps the seed as it is
        set_seed(self.seed, device_specific=True)
        self.eos_token_ids = sorted({int(self.tokenizer.eos_token_id)} | set(_eos_ids(self.policy)))
        self.pad_id = int(
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_token_ids[0]
        )
        for model in (self.ref_policy,):
            model.eval().requires_grad_(False)
        if self.gradient_checkpointing:
            for model in (self.policy, self.value_model):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = PolicyAndValue(self.policy, self.value_model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=self.learning_rate, eps=self.settings.adam_eps, weight_decay=self.weight_decay
        )
        steps = self.total_iterations * self.num_epochs * (self.local_rollout // self.local_minibatch)
        scheduler = get_scheduler(
            self.lr_scheduler,
            optimizer,
            num_warmup_steps=math.ceil(self.warmup_ratio * steps),
            num_training_steps=steps,
        )
        # The scheduler stays unprepared: Accelerate's wrapper would step it once per process.
        self.model, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        self.scheduler = scheduler
        self.ref_policy = self.ref_policy.to(self.accelerator.device)
        if isinstance(self.generator, str):
            if choose_generator(self.generator) == "vllm":
                self.generator = VLLMGenerator(
                    self.unwrapped.policy,
                    self.accelerator,
                    self.tokenizer,
                    self.response_length,
                    self.temperature,
                )
            else:
                self.generator = None
        self.iteration = 0
        self.episodes = 0
        self.samples: list[dict[str, Any]] = []
        self._order = self._prompt_order()

    # -- data --------------------------------------------------------------------------------------------
    def _prompt_order(self) -> Iterator[int]:
        """Example indices forever: a fresh seeded permutation per pass, the same on every process."""
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            yield from torch.randperm(len(self.examples), generator=generator).tolist()

    def _next_batch(self) -> list[Any]:
        indices = [next(self._order) for _ in range(self.rollout_batch_size)]
        rank = self.accelerator.process_index
        mine = indices[rank * self.local_rollout : (rank + 1) * self.local_rollout]
        return [self.examples[i] for i in mine]

    @property
    def unwrapped(self) -> PolicyAndValue:
        """The policy-and-value module without its DDP wrapper."""
        return self.accelerator.unwrap_model(self.model)

    # -- one iteration -----------------------------------------------------------------------------------
    def _generate(self, batch: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device = self.accelerator.device
        prompts = [list(ex.prompt_ids) for ex in batch]
        prompt_ids, prompt_mask = left_pad(prompts, self.pad_id, device)
        policy = self.unwrapped.policy
        if self.generator is not None:
            self.generator.load_weights(policy)
            ids = self.generator.generate(prompts)
            responses = right_pad(ids, self.pad_id, self.response_length, device)
        else:
            was_training = policy.training
            policy.eval()
            responses = sample_responses(
                policy,
                prompt_ids,
                prompt_mask,
                self.response_length,
                self.temperature,
                self.eos_token_ids,
                self.pad_id,
            )
            policy.train(was_training)
        return prompt_ids, prompt_mask, responses

    def _score(self, batch, responses, mask, ended) -> tuple[torch.Tensor, list[Verdict], list[str]]:
        texts = []
        for row, keep in zip(responses.tolist(), mask.tolist(), strict=True):
            tokens = [t for t, k in zip(row, keep, strict=True) if k and t not in self.eos_token_ids]
            texts.append(self.tokenizer.decode(tokens, skip_special_tokens=True))
        verdicts = [verify(text, ex.target) for text, ex in zip(texts, batch, strict=True)]
        scores = torch.tensor(
            [self.verifiable_reward if v.verified else 0.0 for v in verdicts], device=responses.device
        )
        if self.settings.penalize_non_stop:
            scores = apply_non_stop_penalty(
                scores, ended, self.non_stop_penalty, replace=self.settings.non_stop_replaces_score
            )
        return scores, verdicts, texts

    @torch.no_grad()
    def _forward(self, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Old log-probs, reference log-probs and values of the rollouts, in no-grad micro-batches."""
        size = self.settings.forward_batch_size or self.micro_batch_size
        model = self.unwrapped
        model.eval()
        logprobs, ref_logprobs, values = [], [], []
        for start in range(0, input_ids.shape[0], size):
            ids, att = input_ids[start : start + size], attention_mask[start : start + size]
            with self.accelerator.autocast():
                lp, v = model(ids, att, self.response_length, self.temperature)
                ref = response_logprobs(self.ref_policy, ids, att, self.response_length, self.temperature)
            logprobs.append(lp)
            values.append(v)
            ref_logprobs.append(ref)
        model.train()
        return torch.cat(logprobs), torch.cat(ref_logprobs), torch.cat(values)

    def _optimise(self, rollout: RolloutBatch) -> dict[str, float]:
        s = self.settings
        stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "clip_fraction",
                                                           "value_clip_fraction", "approx_kl")}  # fmt: skip
        accumulation = self.local_minibatch // self.micro_batch_size
        learning_rates: list[float] = []
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.iteration)
        self.model.train()
        for _ in range(self.num_epochs):
            order = torch.randperm(self.local_rollout, generator=generator)
            for mb_start in range(0, self.local_rollout, self.local_minibatch):
                minibatch = order[mb_start : mb_start + self.local_minibatch]
                for k, micro_start in enumerate(range(0, self.local_minibatch, self.micro_batch_size)):
                    idx = minibatch[micro_start : micro_start + self.micro_batch_size].to(
                        rollout.input_ids.device
                    )
                    last = k == accumulation - 1
                    sync = contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)
                    with sync, self.accelerator.autocast():
                        logprobs, values = self.model(
                            rollout.input_ids[idx],
                            rollout.attention_mask[idx],
                            self.response_length,
                            self.temperature,
                        )
                        mask = rollout.mask[idx]
                        pg = policy_loss(
                            logprobs, rollout.logprobs[idx], rollout.advantages[idx], mask, s.cliprange
                        )
                        vf = value_loss(
                            values, rollout.values[idx], rollout.returns[idx], mask, s.cliprange_value
                        )
                        loss = (pg.loss + s.vf_coef * vf.loss) / accumulation
                        self.accelerator.backward(loss)
                    stats["policy_loss"].append(pg.loss.item())
                    stats["value_loss"].append(vf.loss.item())
                    stats["clip_fraction"].append(pg.clip_fraction.item())
                    stats["value_clip_fraction"].append(vf.clip_fraction.item())
                    stats["approx_kl"].append(pg.approx_kl.item())
                learning_rates.append(self.scheduler.get_last_lr()[0])  # the rate this step uses
                if s.max_grad_norm and s.max_grad_norm > 0:
                    self.accelerator.clip_grad_norm_(self.model.parameters(), s.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        return {k: sum(v) / len(v) for k, v in stats.items()} | {"learning_rate": learning_rates[0]}

    def _mean(self, value: float | torch.Tensor) -> float:
        """The mean of a per-process number over all processes."""
        tensor = torch.as_tensor(float(value), device=self.accelerator.device)
        return float(self.accelerator.reduce(tensor, reduction="mean"))

    def step(self) -> dict[str, Any]:
        """One PPO iteration (rollouts, scoring, advantages, optimisation); returns its log entry."""
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        t0 = time.perf_counter()
        batch = self._next_batch()
        prompt_ids, prompt_mask, responses = self._generate(batch)
        sync()
        t1 = time.perf_counter()
        mask, ended = response_mask(responses, self.eos_token_ids)
        ended = ended & (mask.sum(dim=1) - 1 >= self.settings.min_response_length)
        scores, verdicts, texts = self._score(batch, responses, mask, ended)
        t2 = time.perf_counter()
        input_ids = torch.cat([prompt_ids, responses], dim=1)
        attention_mask = torch.cat([prompt_mask, mask], dim=1)
        logprobs, ref_logprobs, values = self._forward(input_ids, attention_mask)
        mask_f = mask.float()
        kl = per_token_kl(logprobs, ref_logprobs, mask_f)
        rewards = token_rewards(scores, kl, mask_f, self.kl_beta)
        advantages, returns = gae_advantages(rewards, values, mask_f, self.settings.gamma, self.settings.lam)
        if self.settings.whiten_advantages:
            advantages = masked_whiten(advantages, mask_f)
        sync()
        t3 = time.perf_counter()
        rollout = RolloutBatch(
            input_ids, attention_mask, responses, mask_f, logprobs, values, advantages, returns
        )
        losses = self._optimise(rollout)
        sync()
        t4 = time.perf_counter()

        self.iteration += 1
        self.episodes += self.rollout_batch_size
        lengths = mask.sum(dim=1).float()
        verified = torch.tensor([float(v.verified) for v in verdicts])
        entry: dict[str, Any] = {
            "iteration": self.iteration,
            "episodes": self.episodes,
            "verifiable_reward": self._mean(verified.mean()),
            "score": self._mean(scores.mean()),
            "kl": self._mean(kl.sum(dim=1).mean()),
            "rlhf_reward": self._mean((scores - self.kl_beta * kl.sum(dim=1)).mean()),
            "response_length": self._mean(lengths.mean()),
            "non_stop_rate": self._mean((~ended).float().mean()),
            "entropy": self._mean(masked_mean(-logprobs, mask_f)),
            **{k: self._mean(v) for k, v in losses.items()},
            "verifier_errors": int(
                self._mean(sum(v.error is not None for v in verdicts)) * self.accelerator.num_processes
            ),
            "tokens_generated": int(self._mean(lengths.sum()) * self.accelerator.num_processes),
            "generation_s": t1 - t0,
            "scoring_s": t2 - t1,
            "forward_s": t3 - t2,
            "optimisation_s": t4 - t3,
            "iteration_s": t4 - t0,
        }
        self.samples = [
            _sample(self.tokenizer, ex, text, verdict, float(score), bool(end), int(length))
            for ex, text, verdict, score, end, length in zip(
                batch, texts, verdicts, scores.tolist(), ended.tolist(), lengths.tolist(), strict=True
            )
        ][: self.settings.samples_kept]
        return entry

    def train(
        self, iterations: int | None = None, callback: Callable[[dict], Any] | None = None
    ) -> list[dict]:
        """Run ``iterations`` (default ``total_iterations``); returns one log entry per iteration."""
        logs = []
        for _ in range(iterations or self.total_iterations):
            entry = self.step()
            logs.append(entry)
            if callback is not None:
                callback(entry)
        return logs


def _eos_ids(model: Any) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])]


def _sample(tokenizer, example, text: str, verdict: Verdict, score: float, ended: bool, length: int) -> dict:
    """One response as a display row: the end of the prompt, the response and its verdict."""
    target = example.target
    prompt = tokenizer.decode(list(example.prompt_ids), skip_special_tokens=True)
    return {
        "prompt": prompt[-200:],
        "response": text,
        "subset": target.kind,
        "ground_truth": target.describe(),
        "extracted": verdict.extracted,
        "verified": verdict.verified,
        "ended": ended,
        "score": score,
        "length": length,
        "error": verdict.error,
    }


def summarize(logs: Sequence[Mapping[str, Any]], keys: Sequence[str], last: int = 1) -> dict[str, float]:
    """Means of ``keys`` over the last ``last`` log entries (NaN-free keys only)."""
    tail = list(logs)[-last:]
    out = {}
    for key in keys:
        values = [float(e[key]) for e in tail if e.get(key) is not None]
        if values:
            out[key] = sum(values) / len(values)
    return out
