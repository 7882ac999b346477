"""PPO with verifiable rewards (Tulu 3's RLVR), written out: one function per formula and a small trainer.

Written by hand because TRL 1.x ships no PPO trainer and open-instruct's PPO, which Tulu 3 and SmolTulu
trained with, has left its repository; this follows its ``ppo_vllm_thread_ray_gtrl.py``. One iteration
samples responses, scores them with the verifiers and the non-stop penalty, adds the per-token KL to a
frozen reference, runs GAE, and steps AdamW on the clipped policy and value losses for ``num_epochs``
passes. Where the kit differs from open-instruct: the score sits on the last response token (open-instruct
adds it one position later and lets GAE carry it back), and policy and value share one optimizer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from .errors import KitError
from .verifiers import Verdict, verify

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .recipes import RLVRRecipe

log = logging.getLogger(__name__)

#: Logits given to tokens outside a restricted vocabulary (finite, so entropies stay finite).
MASKED_LOGIT = -1e9


class PPOError(KitError, ValueError):
    """A PPO run that cannot start or go on; the message names the problem and the fix."""


@dataclass(frozen=True)
class PPOSettings:
    """Every number of a PPO run but the learning rate and batch sizes; the RLVR recipe's, each cited there."""

    response_length: int
    num_epochs: int  # passes over each rollout batch
    kl_beta: float
    temperature: float
    verifiable_reward: float
    non_stop_penalty: float
    penalize_non_stop: bool
    non_stop_replaces_score: bool  # False: the penalty is added to the score
    min_response_length: int  # a response shorter than this (before its EOS) counts as non-stop
    gamma: float
    lam: float
    cliprange: float
    cliprange_value: float
    vf_coef: float
    whiten_advantages: bool
    max_grad_norm: float
    adam_eps: float
    lr_scheduler: str
    warmup_ratio: float
    weight_decay: float
    seed: int
    samples_kept: int = 8  # kit choice: responses of the last iteration kept for display

    @classmethod
    def from_recipe(cls, recipe: RLVRRecipe, **changes: Any) -> PPOSettings:
        """The settings of an RLVR recipe (``num_epochs`` rounded, at least 1), with ``changes``."""
        values = {f.name: getattr(recipe, f.name) for f in dataclasses.fields(cls) if hasattr(recipe, f.name)}
        return cls(**{**values, "num_epochs": max(1, round(recipe.num_epochs)), **changes})


# -- the formulas ----------------------------------------------------------------------------------
def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1: ``sum(v * m) / sum(m)``."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


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
    """The score of a response that never ends becomes ``penalty``, verified or not (open-instruct's
    ``torch.where(contain_stop_token, scores, penalty_reward_value)``); ``replace=False`` adds it instead."""
    penalty_t = torch.full_like(scores, float(penalty))
    return torch.where(ended, scores, penalty_t if replace else scores + penalty_t)


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


# -- models ----------------------------------------------------------------------------------------
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
    """``log pi(a_t | s_t)`` of the last ``response_length`` tokens of ``input_ids``, at ``temperature``."""
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
    """A one-label sequence-classification model with the policy's backbone weights and a new ``score`` head
    (``value_model_from: policy``, and tests), in float32 whatever the policy's dtype: it trains in full."""
    from transformers import AutoModelForSequenceClassification

    config = policy.config.__class__.from_dict(policy.config.to_dict())
    config.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        value_model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    backbone = getattr(policy, policy.base_model_prefix)
    getattr(value_model, value_model.base_model_prefix).load_state_dict(backbone.state_dict())
    return value_model.to(device=next(policy.parameters()).device, dtype=torch.float32)


def restrict_vocabulary(model: nn.Module, token_ids: Sequence[int]) -> SimpleNamespace:
    """Let ``model`` produce only ``token_ids`` (the toy task): other logits are lowered by :data:`MASKED_LOGIT`.

    A frozen bias on the output layer does it, so sampling, log-probabilities and TRL's fused LM head all
    see the same policy. The handle's ``remove()`` lifts it; do not save a model while it is on.
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
    return SimpleNamespace(remove=lambda: setattr(head, "bias", previous))


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


# -- generation ------------------------------------------------------------------------------------
def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, device: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of prompts padded on the left to the longest."""
    rows = [torch.as_tensor(list(p), dtype=torch.long) for p in prompts]
    ids = pad_sequence(rows, batch_first=True, padding_value=pad_id, padding_side="left")
    mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_side="left")
    return ids.to(device), mask.to(device)


def right_pad(
    responses: Sequence[Sequence[int]], pad_id: int, width: int, device: Any = None
) -> torch.Tensor:
    """Response ids padded (or cut) on the right to ``width``."""
    rows = [torch.as_tensor(list(r)[:width], dtype=torch.long) for r in responses]
    out = pad_sequence(rows, batch_first=True, padding_value=pad_id)
    return nn.functional.pad(out, (0, width - out.shape[1]), value=pad_id).to(device)


#: Rollout generators: ``auto`` is transformers' ``generate``; vLLM is used only when asked for.
GENERATORS = ("auto", "transformers", "vllm")


def choose_generator(generator: str = "auto") -> str:
    """The rollout generator: ``"transformers"`` (``generate``, for ``"auto"`` too) or ``"vllm"`` (opt-in:
    it needs vLLM and a CUDA GPU, else a :class:`PPOError` says what is missing)."""
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
    return nn.functional.pad(responses, (0, max_new_tokens - responses.shape[1]), value=pad_id)


def decode_responses(
    tokenizer: PreTrainedTokenizerBase,
    responses: torch.Tensor,
    mask: torch.Tensor,
    eos_token_ids: Sequence[int],
) -> list[str]:
    """The text of each response: its tokens up to the end (``mask``), end-of-sequence left out."""
    rows = zip(responses.tolist(), mask.tolist(), strict=True)
    tokens = [
        [t for t, k in zip(row, keep, strict=True) if k and t not in eos_token_ids] for row, keep in rows
    ]
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in tokens]


@torch.no_grad()
def sample_and_verify(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Any],
    response_length: int,
    temperature: float,
) -> tuple[list[str], list[Verdict], list[bool], list[int]]:
    """One sampled response per example (``prompt_ids``, verifier ``target``), verified in eval mode:
    ``(texts, verdicts, ended, lengths)``."""
    eos = [int(tokenizer.eos_token_id)]
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0])
    ids, mask = left_pad([list(ex.prompt_ids) for ex in examples], pad, next(model.parameters()).device)
    was_training = model.training
    model.eval()
    responses = sample_responses(model, ids, mask, response_length, temperature, eos, pad)
    model.train(was_training)
    keep, ended = response_mask(responses, eos)
    texts = decode_responses(tokenizer, responses, keep, eos)
    verdicts = [verify(text, ex.target) for text, ex in zip(texts, examples, strict=True)]
    return texts, verdicts, ended.tolist(), keep.sum(dim=1).tolist()


# -- the trainer -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchSizes:
    """PPO's batch sizes (:func:`batch_sizes`) as open-instruct counts them: per process, times the number of
    processes (``rollout_batch_size = local_rollout_batch_size * world_size``, the same for the minibatch)."""

    num_processes: int
    local_rollout: int  # prompts per process per iteration (local_rollout_batch_size)
    local_minibatch: int  # responses per process per optimizer step (local_mini_batch_size)
    micro: int  # responses per process per forward and backward pass (per_device_train_batch_size)
    rollout: int  # prompts per iteration over all processes
    minibatch: int  # responses per optimizer step over all processes
    accumulation: int  # micro-batches accumulated into one optimizer step
    minibatches: int  # optimizer steps per pass (epoch) over one rollout batch


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
    rollout, minibatch, n = rollout_per_process, minibatch_per_process, num_processes
    micro = max(d for d in range(1, min(micro_cap, minibatch) + 1) if minibatch % d == 0)
    return BatchSizes(
        n, rollout, minibatch, micro, rollout * n, minibatch * n, minibatch // micro, rollout // minibatch
    )


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

    ``examples``: objects with ``prompt_ids`` (the rendered prompt's token ids) and a verifier ``target``.
    ``sizes``: the batch sizes on the processes running (:func:`batch_sizes`). ``generator``:
    ``"transformers"`` (``generate``) or ``"vllm"`` (TRL's ``VLLMGeneration`` colocated on each GPU, as
    ``GRPOTrainer`` runs it; it loads from the policy's ``name_or_path`` and gets its weights each iteration).
    """

    policy: PreTrainedModel
    ref_policy: PreTrainedModel
    value_model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    examples: Sequence[Any]
    settings: PPOSettings
    sizes: BatchSizes
    learning_rate: float
    total_iterations: int = 1
    mixed_precision: str = "no"
    generator: str = "transformers"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed
        from transformers import get_scheduler

        if not self.examples:
            raise PPOError("no prompts to train on: every row was skipped (see the data report)")
        cpu = not torch.cuda.is_available()
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=self.mixed_precision)
        world, s = self.accelerator.num_processes, self.settings
        if self.sizes.num_processes != world:
            raise PPOError(
                f"the batch sizes are for {self.sizes.num_processes} process(es) but {world} run; "
                f"form them with batch_sizes(..., num_processes={world})"
            )
        # seed + process index: each process samples its own responses (the weights are synced by DDP and
        # the prompt order by its own generator); one process keeps the seed as it is
        set_seed(s.seed, device_specific=True)
        eos = getattr(getattr(self.policy, "generation_config", None), "eos_token_id", None)
        eos = [] if eos is None else eos if isinstance(eos, list | tuple) else [eos]
        self.eos_token_ids = sorted({int(self.tokenizer.eos_token_id)} | {int(e) for e in eos})
        self.pad_id = int(
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_token_ids[0]
        )
        self.ref_policy.eval().requires_grad_(False)
        if self.gradient_checkpointing:
            for model in (self.policy, self.value_model):
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = PolicyAndValue(self.policy, self.value_model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=self.learning_rate, eps=s.adam_eps, weight_decay=s.weight_decay
        )
        steps = self.total_iterations * s.num_epochs * self.sizes.minibatches
        warmup = math.ceil(s.warmup_ratio * steps)
        scheduler = get_scheduler(
            s.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=steps
        )
        # The scheduler stays unprepared: Accelerate's wrapper would step it once per process.
        self.model, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        self.scheduler = scheduler
        self.ref_policy = self.ref_policy.to(self.accelerator.device)
        self.engine = None
        if choose_generator(self.generator) == "vllm":
            from trl.generation.vllm_generation import VLLMGeneration

            self.engine = VLLMGeneration(
                model=self.unwrapped.policy,
                accelerator=self.accelerator,
                processing_class=self.tokenizer,
                mode="colocate",
                gpu_memory_utilization=0.3,
                max_model_length=None,
                temperature=s.temperature,
                top_p=1.0,
                top_k=0,
                max_completion_length=s.response_length,
                logprobs=None,
            )
        self.iteration = 0
        self.episodes = 0
        self.samples: list[dict[str, Any]] = []
        self._order = self._prompt_order()

    # -- data --------------------------------------------------------------------------------------------
    def _prompt_order(self) -> Iterator[int]:
        """Example indices forever: a fresh seeded permutation per pass, the same on every process."""
        generator = torch.Generator().manual_seed(self.settings.seed)
        while True:
            yield from torch.randperm(len(self.examples), generator=generator).tolist()

    def _next_batch(self) -> list[Any]:
        indices = [next(self._order) for _ in range(self.sizes.rollout)]
        start = self.accelerator.process_index * self.sizes.local_rollout
        return [self.examples[i] for i in indices[start : start + self.sizes.local_rollout]]

    @property
    def unwrapped(self) -> PolicyAndValue:
        """The policy-and-value module without its DDP wrapper."""
        return self.accelerator.unwrap_model(self.model)

    # -- one iteration -----------------------------------------------------------------------------------
    def _generate(self, batch: Sequence[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s, device = self.settings, self.accelerator.device
        prompts = [list(ex.prompt_ids) for ex in batch]
        prompt_ids, prompt_mask = left_pad(prompts, self.pad_id, device)
        if self.engine is not None:
            self.engine.sync_weights()  # the policy's current weights into vLLM
            _, completions, _, _ = self.engine.generate(prompts, None, num_generations=1)
            return prompt_ids, prompt_mask, right_pad(completions, self.pad_id, s.response_length, device)
        policy = self.unwrapped.policy
        was_training = policy.training
        policy.eval()
        eos, pad = self.eos_token_ids, self.pad_id
        responses = sample_responses(
            policy, prompt_ids, prompt_mask, s.response_length, s.temperature, eos, pad
        )
        policy.train(was_training)
        return prompt_ids, prompt_mask, responses

    def _score(self, batch, responses, mask, ended) -> tuple[torch.Tensor, list[Verdict], list[str]]:
        s = self.settings
        texts = decode_responses(self.tokenizer, responses, mask, self.eos_token_ids)
        verdicts = [verify(text, ex.target) for text, ex in zip(texts, batch, strict=True)]
        scores = torch.tensor(
            [s.verifiable_reward if v.verified else 0.0 for v in verdicts], device=responses.device
        )
        if s.penalize_non_stop:
            scores = apply_non_stop_penalty(
                scores, ended, s.non_stop_penalty, replace=s.non_stop_replaces_score
            )
        return scores, verdicts, texts

    @torch.no_grad()
    def _forward(self, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Old log-probs, reference log-probs and values of the rollouts, in no-grad micro-batches."""
        s = self.settings
        size = self.sizes.micro
        model = self.unwrapped
        model.eval()
        logprobs, ref_logprobs, values = [], [], []
        for start in range(0, input_ids.shape[0], size):
            ids, att = input_ids[start : start + size], attention_mask[start : start + size]
            with self.accelerator.autocast():
                lp, v = model(ids, att, s.response_length, s.temperature)
                ref = response_logprobs(self.ref_policy, ids, att, s.response_length, s.temperature)
            logprobs.append(lp)
            values.append(v)
            ref_logprobs.append(ref)
        model.train()
        return torch.cat(logprobs), torch.cat(ref_logprobs), torch.cat(values)

    def _optimise(self, rollout: RolloutBatch) -> dict[str, float]:
        s, sizes = self.settings, self.sizes
        stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "clip_fraction",
                                                           "value_clip_fraction", "approx_kl")}  # fmt: skip
        learning_rates: list[float] = []
        generator = torch.Generator().manual_seed(s.seed * 100_003 + self.iteration)
        self.model.train()
        for _ in range(s.num_epochs):
            order = torch.randperm(sizes.local_rollout, generator=generator)
            for mb_start in range(0, sizes.local_rollout, sizes.local_minibatch):
                minibatch = order[mb_start : mb_start + sizes.local_minibatch]
                for k, micro_start in enumerate(range(0, sizes.local_minibatch, sizes.micro)):
                    idx = minibatch[micro_start : micro_start + sizes.micro].to(rollout.input_ids.device)
                    last = k == sizes.accumulation - 1
                    sync = contextlib.nullcontext() if last else self.accelerator.no_sync(self.model)
                    with sync, self.accelerator.autocast():
                        logprobs, values = self.model(
                            rollout.input_ids[idx],
                            rollout.attention_mask[idx],
                            s.response_length,
                            s.temperature,
                        )
                        mask = rollout.mask[idx]
                        pg = policy_loss(
                            logprobs, rollout.logprobs[idx], rollout.advantages[idx], mask, s.cliprange
                        )
                        vf = value_loss(
                            values, rollout.values[idx], rollout.returns[idx], mask, s.cliprange_value
                        )
                        loss = (pg.loss + s.vf_coef * vf.loss) / sizes.accumulation
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
        s = self.settings
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        t0 = time.perf_counter()
        batch = self._next_batch()
        prompt_ids, prompt_mask, responses = self._generate(batch)
        sync()
        t1 = time.perf_counter()
        mask, ended = response_mask(responses, self.eos_token_ids)
        ended = ended & (mask.sum(dim=1) - 1 >= s.min_response_length)
        scores, verdicts, texts = self._score(batch, responses, mask, ended)
        t2 = time.perf_counter()
        input_ids = torch.cat([prompt_ids, responses], dim=1)
        attention_mask = torch.cat([prompt_mask, mask], dim=1)
        logprobs, ref_logprobs, values = self._forward(input_ids, attention_mask)
        mask_f = mask.float()
        kl = per_token_kl(logprobs, ref_logprobs, mask_f)
        rewards = token_rewards(scores, kl, mask_f, s.kl_beta)
        advantages, returns = gae_advantages(rewards, values, mask_f, s.gamma, s.lam)
        if s.whiten_advantages:
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
        self.episodes += self.sizes.rollout
        lengths = mask.sum(dim=1).float()
        verified = torch.tensor([float(v.verified) for v in verdicts])
        world = self.accelerator.num_processes
        entry: dict[str, Any] = {
            "iteration": self.iteration,
            "episodes": self.episodes,
            "verifiable_reward": self._mean(verified.mean()),
            "score": self._mean(scores.mean()),
            "kl": self._mean(kl.sum(dim=1).mean()),
            "rlhf_reward": self._mean((scores - s.kl_beta * kl.sum(dim=1)).mean()),
            "response_length": self._mean(lengths.mean()),
            "non_stop_rate": self._mean((~ended).float().mean()),
            "entropy": self._mean(masked_mean(-logprobs, mask_f)),
            **{k: self._mean(v) for k, v in losses.items()},
            "verifier_errors": int(self._mean(sum(v.error is not None for v in verdicts)) * world),
            "tokens_generated": int(self._mean(lengths.sum()) * world),
            "generation_s": t1 - t0,
            "scoring_s": t2 - t1,
            "forward_s": t3 - t2,
            "optimisation_s": t4 - t3,
            "iteration_s": t4 - t0,
        }
        self.samples = [
            sample_row(self.tokenizer, ex, text, verdict, float(score), bool(end), int(length))
            for ex, text, verdict, score, end, length in zip(
                batch, texts, verdicts, scores.tolist(), ended.tolist(), lengths.tolist(), strict=True
            )
        ][: s.samples_kept]
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


def sample_row(
    tokenizer, example, text: str, verdict: Verdict, score: float, ended: bool, length: int
) -> dict:
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
