"""How much GPU memory a training stage needs, which method fits (full, LoRA, QLoRA), and for how long.

:func:`estimate_stage` splits one device's memory into the parts of :data:`PART_ORDER` (GiB): the
trained model's weights, gradients, AdamW states, activations and logits (PPO: policy and value model
both), a frozen ``reference`` (a DPO live reference in full fine-tuning; PPO's reference policy), a
frozen ``reward_model`` when its score is used, PPO's generation ``kv_cache``, and a fixed overhead.
:func:`plan_memory` picks the first method that fits in 90% of the GPU, in the order of quality per
byte (full, LoRA on 16-bit weights, QLoRA on 4-bit weights), or names the fixes.
:func:`estimate_hours` turns a plan into training time on a GPU of :data:`GPUS`;
``benchmarks/memory_table.py`` prints the README's "Memory and time per GPU" section from both.

Written by hand: neither transformers, PEFT nor accelerate estimates training memory for a sequence
length and batch (accelerate's ``estimate-memory`` counts weights only). It is an estimate that ignores
fragmentation peaks and kernel workspaces beyond the fixed overhead, hence the 10% margin.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import KitError

GIB = 2**30
METHODS = ("full", "lora", "qlora")
#: The stages the planner knows (a recipe's ``stage``); ``"ppo"`` is read as ``"rlvr"``.
STAGES = ("sft", "rm", "dpo", "rlvr")
#: Where DPO's reference log-probs come from: computed once before training, or a live frozen model.
REFERENCES = ("cache", "live")
#: The parts of an estimate, in the order ``describe`` prints them.
PART_ORDER = (
    "weights", "gradients", "optimizer", "activations", "logits", "reference", "reward_model", "kv_cache",
    "overhead",
)  # fmt: skip
USABLE_FRACTION = 0.9  # kit choice: a 10% margin for fragmentation and estimate error
OVERHEAD_GIB = 1.0  # kit choice: CUDA context (0.3-0.5 GiB alone), cuBLAS/cuDNN workspaces, allocator slack
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
#: NF4 with double quantization: 4 bits + 0.127 bits of constants (QLoRA, Dettmers et al. 2023, sec. 3).
NF4_BYTES = (4 + 0.127) / 8
#: Activation bytes per token, layer and hidden unit in 16-bit (Korthikanti et al. 2022, eq. 1), without
#: the attention-score term: SDPA and FlashAttention never keep the seq x seq matrix.
ACTIVATION_BYTES_PER_HIDDEN = 34
#: Gradient checkpointing keeps only each layer's 16-bit input, and rebuilds one layer at a time.
CHECKPOINT_BYTES_PER_HIDDEN = 2
#: The tile TRL's fused LM head projects at once (trl 1.16: kernels/chunked_logprob.py, trainer/utils.py).
FUSED_TOKEN_TILE = 4096
FUSED_VOCAB_TILE = 32768
#: LoRA adapters on every projection of the attention and MLP blocks (see :func:`lora_config`).
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_RANK = 64  # Tulu 3: open-instruct finetune.py default lora_rank
LORA_ALPHA = 16  # Tulu 3: open-instruct finetune.py default lora_alpha
LORA_DROPOUT = 0.1  # Tulu 3: open-instruct finetune.py default lora_dropout


class MemoryPlanError(KitError, ValueError):
    """A model shape or method the memory planner cannot use; the message says what to give instead."""


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder-only transformer that set its training memory."""

    name: str
    n_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    n_heads: int
    n_kv_heads: int
    n_params: int | None = None  # None: computed from the shape (Llama layout, tied embeddings)
    tied_embeddings: bool = True

    @property
    def kv_size(self) -> int:
        """Width of the key and value projections (smaller than hidden with grouped-query attention)."""
        return self.n_kv_heads * (self.hidden_size // self.n_heads)

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)

    @property
    def parameters(self) -> int:
        """``n_params`` when given, else the count of a Llama block stack with RMSNorm and SwiGLU."""
        if self.n_params is not None:
            return self.n_params
        h, i, kv = self.hidden_size, self.intermediate_size, self.kv_size
        per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q, o; k, v; gate, up, down; 2 norms
        return self.embedding_params + self.n_layers * per_layer + h

    def lora_parameters(self, rank: int = LORA_RANK) -> int:
        """Trainable parameters of rank-``rank`` adapters on the seven projections of every layer."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.kv_size
        fan_sums = [h + h, h + kv, h + kv, h + h, h + i, h + i, i + h]  # q, k, v, o, gate, up, down
        return self.n_layers * rank * sum(fan_sums)


_SMOLLM2_17B, _SMOLLM2_135M = "HuggingFaceTB/SmolLM2-1.7B", "HuggingFaceTB/SmolLM2-135M"
#: Shapes of the models the kit trains, from their Hub config.json files.
KNOWN_SHAPES: dict[str, ModelShape] = {
    _SMOLLM2_17B: ModelShape(
        _SMOLLM2_17B, n_layers=24, hidden_size=2048, intermediate_size=8192, vocab_size=49152, n_heads=32,
        n_kv_heads=32,
    ),
    _SMOLLM2_135M: ModelShape(
        _SMOLLM2_135M, n_layers=30, hidden_size=576, intermediate_size=1536, vocab_size=49152, n_heads=9,
        n_kv_heads=3,
    ),
}  # fmt: skip
for _name, _base in {
    f"{_SMOLLM2_17B}-Instruct": _SMOLLM2_17B,
    f"{_SMOLLM2_135M}-Instruct": _SMOLLM2_135M,
    "SultanR/SmolTulu-1.7b-Instruct": _SMOLLM2_17B,
    "SultanR/SmolTulu-1.7b-RM": _SMOLLM2_17B,  # the value model's start (a score head)
    "bundled": _SMOLLM2_135M,
}.items():
    KNOWN_SHAPES[_name] = dataclasses.replace(KNOWN_SHAPES[_base], name=_name)


def model_shape(model_config_or_name: Any) -> ModelShape:
    """A :class:`ModelShape` from a known name, a transformers config, a model, a mapping or a shape."""
    source = model_config_or_name
    if isinstance(source, ModelShape):
        return source
    if isinstance(source, str):
        if source in KNOWN_SHAPES:
            return KNOWN_SHAPES[source]
        raise MemoryPlanError(
            f"no known shape for {source!r} (known: {', '.join(KNOWN_SHAPES)}). Pass its config instead: "
            f"plan_memory(AutoConfig.from_pretrained({source!r}), ...)."
        )
    config = getattr(source, "config", source)  # a model carries its config
    if not isinstance(config, Mapping) and hasattr(config, "get_text_config"):
        config = config.get_text_config()

    def get(key: str, default: Any = None) -> Any:
        return config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)

    try:
        n_heads = int(get("num_attention_heads"))
        shape = ModelShape(
            name=str(get("_name_or_path", "") or get("name", "") or type(config).__name__),
            n_layers=int(get("num_hidden_layers")),
            hidden_size=int(get("hidden_size")),
            intermediate_size=int(get("intermediate_size")),
            vocab_size=int(get("vocab_size")),
            n_heads=n_heads,
            n_kv_heads=int(get("num_key_value_heads") or n_heads),
            n_params=get("n_params"),
            tied_embeddings=bool(get("tie_word_embeddings", True)),
        )
    except (TypeError, ValueError) as exc:
        raise MemoryPlanError(
            f"cannot read a decoder shape from {type(config).__name__}: it needs num_hidden_layers, "
            "hidden_size, intermediate_size, vocab_size and num_attention_heads."
        ) from exc
    if hasattr(source, "parameters") and callable(source.parameters) and shape.n_params is None:
        shape = dataclasses.replace(shape, n_params=sum(p.numel() for p in source.parameters()))
    return shape


def _dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise MemoryPlanError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def _stage_name(stage: str) -> str:
    name = "rlvr" if stage == "ppo" else stage
    if name not in STAGES:
        raise MemoryPlanError(f"unknown stage {stage!r}; use one of {', '.join(STAGES)} ('ppo' means rlvr)")
    return name


def _frozen_bytes(shape: ModelShape, method: str, half: int) -> float:
    """A frozen model's weights: 16-bit, or with QLoRA NF4 blocks and a 16-bit embedding (not quantized)."""
    if method == "qlora":
        return NF4_BYTES * (shape.parameters - shape.embedding_params) + half * shape.embedding_params
    return half * shape.parameters


def estimate_stage(
    model_config_or_name: Any,
    *,
    stage: str = "sft",
    max_length: int,
    per_device_batch: int,
    dtype: str,
    method: str,
    gradient_checkpointing: bool = True,
    lora_rank: int = LORA_RANK,
    reference: str = "cache",
    prompt_length: int | None = None,
    response_length: int | None = None,
    rollout_batch: int | None = None,
    value_model: Any = None,
    reward_model: Any = None,
) -> dict[str, float]:
    """Memory of one device for one stage and method, in GiB per part plus ``total``.

    ``per_device_batch`` counts sequences for sft, pairs for rm and dpo (chosen and rejected run
    together, as TRL concatenates them; rm through a one-output score head) and the PPO micro-batch for
    rlvr. dpo holds a frozen ``reference`` copy only in full fine-tuning with ``reference="live"``
    (cached log-probs need none; with adapters the reference is the model with them off). rlvr needs
    ``prompt_length`` and ``response_length``; ``rollout_batch``: prompts one device generates for at
    once (default ``per_device_batch``); ``value_model``: its shape or name when it differs from the
    policy's; ``reward_model``: the frozen reward model's, or None when its score is not used.
    """
    stage = _stage_name(stage)
    if method not in METHODS:
        raise MemoryPlanError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if reference not in REFERENCES:
        raise MemoryPlanError(f"unknown reference {reference!r}; use 'cache' or 'live'")
    shape = model_shape(model_config_or_name)
    half = _dtype_bytes(dtype)

    def trained(model: ModelShape, length: int, sequences: int, vocab: int, logit_tokens: int | None = None):
        # Full fine-tuning: fp32 weights, gradients and AdamW moments, 16 bytes per parameter (ZeRO's
        # mixed-precision accounting); adapters: frozen weights plus 16 bytes per adapter parameter.
        # Logits: TRL's fused tile, or with logit_tokens (PPO, unfused) every projected token (fp32, and
        # its gradient).
        if min(length, sequences, model.parameters, model.n_layers, model.hidden_size, vocab) <= 0:
            raise MemoryPlanError("max_length, per_device_batch and the shape must all be positive")
        tokens = length * sequences
        if method == "full":
            trainable = model.parameters
            weights = 4 * model.parameters
        else:
            trainable = model.lora_parameters(lora_rank)
            weights = _frozen_bytes(model, method, half) + 4 * trainable
        layers = model.n_layers
        if gradient_checkpointing:  # one layer's full activations are rebuilt at a time
            per_hidden = CHECKPOINT_BYTES_PER_HIDDEN * layers + ACTIVATION_BYTES_PER_HIDDEN
        else:
            per_hidden = ACTIVATION_BYTES_PER_HIDDEN * layers
        activations = half / 2 * (per_hidden * model.hidden_size) * tokens  # the bytes are for 16-bit
        if logit_tokens is None:
            logits = 2 * 4 * min(tokens, FUSED_TOKEN_TILE) * min(vocab, FUSED_VOCAB_TILE)
        else:
            logits = 2 * 4 * logit_tokens * vocab
        return {
            "weights": weights / GIB,
            "gradients": 4 * trainable / GIB,
            "optimizer": 8 * trainable / GIB,
            "activations": activations / GIB,
            "logits": logits / GIB,
        }

    frozen_copy = (half * shape.parameters if method == "full" else 0.0) / GIB
    if stage != "rlvr":
        sequences = per_device_batch if stage == "sft" else 2 * per_device_batch
        parts = trained(shape, max_length, sequences, 1 if stage == "rm" else shape.vocab_size)
        if stage == "dpo":
            parts["reference"] = frozen_copy if reference == "live" else 0.0
    else:
        if prompt_length is None or response_length is None:
            raise MemoryPlanError(
                "stage 'rlvr' needs prompt_length and response_length (the recipe's); "
                "plan_memory_from(plan) reads them from a plan."
            )
        length = prompt_length + response_length
        projected = per_device_batch * response_length  # PPO takes log-probs of the response tokens only
        value_shape = model_shape(value_model) if value_model is not None else shape
        policy = trained(shape, length, per_device_batch, shape.vocab_size, logit_tokens=projected)
        value = trained(value_shape, length, per_device_batch, 1, logit_tokens=projected)
        parts = {k: policy[k] + value[k] for k in policy}
        parts["reference"] = frozen_copy
        reward = model_shape(reward_model) if reward_model is not None else None
        parts["reward_model"] = (_frozen_bytes(reward, method, half) if reward else 0.0) / GIB
        kv_per_token = 2 * shape.n_layers * shape.kv_size * half  # keys and values of every layer
        parts["kv_cache"] = (rollout_batch or per_device_batch) * length * kv_per_token / GIB
    parts["overhead"] = OVERHEAD_GIB
    ordered = {k: parts[k] for k in PART_ORDER if k in parts}
    ordered["total"] = sum(ordered.values())
    return ordered


@dataclass(frozen=True)
class MemoryPlan:
    """The method chosen for one GPU, the estimate of every method, and why."""

    method: str
    fits: bool
    gpu_gib: float
    budget_gib: float
    estimates: dict[str, dict[str, float]] = field(repr=False)
    reason: str
    model: str
    max_length: int
    per_device_batch: int
    dtype: str
    gradient_checkpointing: bool
    stage: str = "sft"
    gpu_name: str = ""
    settings: dict[str, Any] = field(default_factory=dict, repr=False)  # the stage's own arguments

    @property
    def estimate(self) -> dict[str, float]:
        """The estimate of the chosen method."""
        return self.estimates[self.method]

    @property
    def gpu(self) -> str:
        """The GPU in words: its name when known, and its size."""
        return f"{self.gpu_name} ({self.gpu_gib:g} GiB)" if self.gpu_name else f"a {self.gpu_gib:g} GiB GPU"

    def describe(self) -> str:
        """A few lines: the choice and why, then each method's parts in GiB."""
        s = self.settings
        unit = " pairs" if self.stage in ("rm", "dpo") else ""
        run = f"{self.max_length} tokens x {self.per_device_batch}{unit} per device"
        if self.stage == "dpo":
            run += f", reference log-probs {'cached' if s.get('reference') == 'cache' else 'live'}"
        if self.stage == "rlvr":
            run = (
                f"prompt {s.get('prompt_length')} + response {s.get('response_length')} tokens, "
                f"micro-batch {self.per_device_batch}, {s.get('rollout_batch') or self.per_device_batch} "
                f"rollouts per device, reward model {'loaded' if s.get('reward_model') else 'not loaded'}"
            )
        lines = [
            f"Memory plan for {self.model} ({self.stage}): {self.method.upper()}"
            + ("" if self.fits else " (does NOT fit)")
            + f" on {self.gpu} ({self.budget_gib:.1f} GiB usable)",
            f"  run   : {run}, {self.dtype}, "
            f"gradient checkpointing {'on' if self.gradient_checkpointing else 'off'}",
            f"  why   : {self.reason}",
        ]
        for method in METHODS:
            parts = self.estimates[method]
            detail = ", ".join(f"{k} {v:.1f}" for k, v in parts.items() if k != "total")
            lines.append(f"  {method:<6}: {parts['total']:6.1f} GiB ({detail})")
        return "\n".join(lines)


class MemoryDoesNotFitError(MemoryPlanError):
    """No method fits the GPU. ``plan`` holds every estimate (method ``qlora``, ``fits=False``)."""

    def __init__(self, message: str, plan: MemoryPlan):
        super().__init__(message)
        self.plan = plan


_WHY = {
    "full": "full fine-tuning trains every weight, the paper's method",
    "lora": "LoRA freezes the weights in {dtype} and trains rank-{rank} adapters; it keeps the weights "
    "exact, so it is preferred over QLoRA whenever it fits",
    "qlora": "QLoRA stores the frozen weights in 4-bit NF4 and trains rank-{rank} adapters; the smallest "
    "footprint, at the cost of quantization error and slower steps",
}
#: Parts that DeepSpeed ZeRO-3 shards over the GPUs; activations, logits, the generation cache and the
#: overhead stay whole on every GPU.
ZERO3_SHARDED = ("weights", "gradients", "optimizer", "reference", "reward_model")
ZERO3_GPU_COUNTS = (2, 4, 8, 16, 32, 64)


def plan_memory(
    model_config_or_name: Any,
    max_length: int,
    per_device_batch: int,
    dtype: str,
    gpu_gib: float,
    *,
    gradient_checkpointing: bool = True,
    lora_rank: int = LORA_RANK,
    usable_fraction: float = USABLE_FRACTION,
    gpu_name: str = "",
    refuse: bool = False,
    **stage: Any,
) -> MemoryPlan:
    """Pick full fine-tuning, LoRA or QLoRA for one stage on one GPU of ``gpu_gib`` GiB.

    ``stage``: :func:`estimate_stage`'s stage keywords (``stage``, default sft; ``reference``; rlvr's
    lengths, rollout batch and models). The plan takes the first method, in the order full -> LoRA ->
    QLoRA, whose estimate fits in ``usable_fraction`` of the GPU. When none fits, its reason names the
    GPU (``gpu_name`` when given), the need and the fixes; with ``refuse`` it is raised as
    :class:`MemoryDoesNotFitError`, else the plan says QLoRA with ``fits=False``.
    """
    if gpu_gib <= 0:
        raise MemoryPlanError(f"gpu_gib must be positive, got {gpu_gib}")
    shape = model_shape(model_config_or_name)
    name = _stage_name(stage.pop("stage", "sft"))
    budget = usable_fraction * gpu_gib
    settings: dict[str, Any] = {"reference": stage.get("reference", "cache")} if name == "dpo" else {}
    if name == "rlvr":
        settings = {key: stage.get(key) for key in ("prompt_length", "response_length", "rollout_batch")}
        for key in ("value_model", "reward_model"):
            settings[key] = None if stage.get(key) is None else model_shape(stage[key]).name
    run = {
        "stage": name, "max_length": max_length, "per_device_batch": per_device_batch, "dtype": dtype,
        "gradient_checkpointing": gradient_checkpointing, "lora_rank": lora_rank,
    } | stage  # fmt: skip

    def estimate(method: str, **changes: Any) -> dict[str, float]:
        return estimate_stage(shape, method=method, **(run | changes))

    estimates = {method: estimate(method) for method in METHODS}
    chosen = next((m for m in METHODS if estimates[m]["total"] <= budget), None)
    plan = MemoryPlan(
        method=chosen or "qlora",
        fits=chosen is not None,
        gpu_gib=float(gpu_gib),
        budget_gib=budget,
        estimates=estimates,
        reason="",
        model=shape.name,
        max_length=max_length,
        per_device_batch=per_device_batch,
        dtype=dtype,
        gradient_checkpointing=gradient_checkpointing,
        stage=name,
        gpu_name=gpu_name,
        settings=settings,
    )
    if chosen is None:
        plan = dataclasses.replace(plan, reason=_refusal(plan, estimate, usable_fraction))
        if refuse:
            raise MemoryDoesNotFitError(plan.reason, plan)
        return plan
    before = METHODS[: METHODS.index(chosen)]
    too_big = "; ".join(f"{m} needs {estimates[m]['total']:.1f} GiB > {budget:.1f}" for m in before)
    why = _WHY[chosen].format(dtype=dtype, rank=lora_rank)
    reason = f"{chosen} needs {estimates[chosen]['total']:.1f} GiB <= {budget:.1f}: {why}."
    return dataclasses.replace(plan, reason=f"{too_big}. {reason}" if too_big else reason)


def zero3_gpus(parts: dict[str, float], budget_gib: float) -> int | None:
    """The fewest GPUs (of :data:`ZERO3_GPU_COUNTS`) over which ZeRO-3 brings ``parts`` under the budget,
    dividing the :data:`ZERO3_SHARDED` parts only; None when no count is enough."""
    for n in ZERO3_GPU_COUNTS:
        per_gpu = sum(v / n if k in ZERO3_SHARDED else v for k, v in parts.items() if k != "total")
        if per_gpu <= budget_gib:
            return n
    return None


def _refusal(plan: MemoryPlan, estimate: Any, usable_fraction: float) -> str:
    """The message of a plan no method fits: the GPU, the need, and each fix with its new estimate."""
    e, budget, s = plan.estimates, plan.budget_gib, plan.settings
    need = e["qlora"]["total"]
    lines = [
        f"no method fits {plan.stage} of {plan.model} on {plan.gpu}: {budget:.1f} GiB usable, and even QLoRA "
        f"needs {need:.1f} GiB (LoRA {e['lora']['total']:.1f}, full fine-tuning {e['full']['total']:.1f}). "
        "Fixes:",
        f"  - a bigger GPU: at least {math.ceil(need / usable_fraction)} GiB for QLoRA, "
        f"{math.ceil(e['lora']['total'] / usable_fraction)} for LoRA, "
        f"{math.ceil(e['full']['total'] / usable_fraction)} for full fine-tuning;",
    ]
    gpus = zero3_gpus(e["full"], budget)
    lines.append(
        f"  - the 'paper' profile on {gpus} such GPUs with DeepSpeed ZeRO-3 "
        "(recipes/accelerate/deepspeed_zero3.yaml), which shards weights, gradients and optimizer "
        "states: full fine-tuning, the paper's method;"
        if gpus
        else "  - ZeRO-3 over several GPUs ('paper' profile) shards the weights and optimizer states, but "
        "what stays whole on each GPU (activations, logits, generation cache) exceeds it at these sizes;"
    )
    if plan.stage == "rlvr":
        prompt, response = s["prompt_length"], s["response_length"]
        while prompt + response > 128:
            prompt, response = max(1, prompt // 2), max(1, response // 2)
            shorter = estimate("qlora", prompt_length=prompt, response_length=response)["total"]
            if shorter <= budget:
                lines.append(
                    f"  - shorter sequences: prompt_length {prompt} and response_length {response} "
                    f"(QLoRA {shorter:.1f} GiB; the generation cache of the rollout batch grows with both, "
                    f"{e['qlora']['kv_cache']:.1f} GiB now);"
                )
                break
    else:
        length = plan.max_length
        while length > 64:
            length //= 2
            shorter = estimate("qlora", max_length=length)["total"]
            if shorter <= budget:
                lines.append(f"  - a shorter max_length: {length} (QLoRA {shorter:.1f} GiB);")
                break
    smaller = None
    for batch in range(plan.per_device_batch - 1, 0, -1):
        smaller = estimate("qlora", per_device_batch=batch)["total"]
        if smaller <= budget:
            lines.append(
                f"  - a smaller per-device batch: {batch} (QLoRA {smaller:.1f} GiB; the profile keeps the "
                "effective batch through gradient accumulation: lower its per_device_batch_cap);"
            )
            break
    else:
        if smaller is not None:
            lines.append(
                f"  - a smaller per-device batch alone is not enough: at 1, QLoRA needs {smaller:.1f} GiB;"
            )
    if not plan.gradient_checkpointing:
        lines.append("  - gradient checkpointing on (the profile's gradient_checkpointing).")
    lines[-1] = lines[-1].rstrip(";") + "."
    return "\n".join(lines)


def stage_settings(recipe: Any) -> dict[str, Any]:
    """The :func:`plan_memory` stage keywords of a recipe: ``stage``, and for RLVR its lengths and models
    (the reward model is loaded only when ``reward_model_multiplier`` is not 0)."""
    stage = _stage_name(recipe.stage)
    if stage != "rlvr":
        return {"stage": stage}
    return {
        "stage": stage,
        "prompt_length": recipe.prompt_length,
        "response_length": recipe.response_length,
        "rollout_batch": recipe.rollout_batch_size,
        "value_model": recipe.reward_model if recipe.value_model_from == "reward_model" else None,
        "reward_model": recipe.reward_model if recipe.reward_model_multiplier else None,
    }


def plan_memory_from(
    plan: Any, *, gpu_gib: float | None = None, reference: str = "cache", refuse: bool = True, **kwargs: Any
) -> MemoryPlan:
    """:func:`plan_memory` for a profile's plan (its model, sizes, dtype, GPU and stage); refuses by default.

    ``gpu_gib`` defaults to the plan's ``hardware.memory_gib``; other keywords go to :func:`plan_memory`.
    """
    gpu_gib = gpu_gib or plan.hardware.memory_gib
    if not gpu_gib:
        raise MemoryPlanError("the plan's hardware does not say its GPU memory; pass gpu_gib=")
    settings = stage_settings(plan.recipe)
    if settings["stage"] == "dpo":
        settings["reference"] = reference
    return plan_memory(
        plan.model, plan.max_length, plan.per_device_batch_size, plan.dtype, gpu_gib,
        gradient_checkpointing=plan.gradient_checkpointing, gpu_name=plan.hardware.device_name, refuse=refuse,
        **(settings | kwargs),
    )  # fmt: skip


def lora_config(
    rank: int = LORA_RANK, alpha: float = LORA_ALPHA, dropout: float = LORA_DROPOUT, **kwargs: Any
):
    """PEFT ``LoraConfig``: open-instruct's rank 64, alpha 16, dropout 0.1 on the seven projections of a
    Llama block (kit choice: QLoRA, Dettmers et al. 2023, needs adapters on all linear layers to match full
    fine-tuning; TRL refuses an adapter on ``lm_head``)."""
    from peft import LoraConfig

    targets = list(LORA_TARGET_MODULES)
    settings = {"r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": targets}
    return LoraConfig(**(settings | {"bias": "none", "task_type": "CAUSAL_LM"} | kwargs))


def qlora_quantization_config(compute_dtype: str = "bf16", *, require_cuda: bool = True):
    """transformers ``BitsAndBytesConfig`` for QLoRA: 4-bit NF4 weights, double quantization, bf16 compute.

    Raises :class:`MemoryPlanError` without CUDA unless ``require_cuda=False`` (bitsandbytes' 4-bit
    kernels need it). On a GPU without bf16 (T4, V100) pass ``compute_dtype="fp16"``.
    """
    import torch
    from transformers import BitsAndBytesConfig

    if require_cuda and not torch.cuda.is_available():
        raise MemoryPlanError(
            "QLoRA needs a CUDA GPU: bitsandbytes' 4-bit weights have no CPU training kernels. On this "
            "machine train the small models in full (profile 'smoke'), or use LoRA (lora_config()) "
            "without quantization."
        )
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if compute_dtype not in dtypes:
        raise MemoryPlanError(f"compute_dtype must be one of {', '.join(dtypes)}, got {compute_dtype!r}")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtypes[compute_dtype],
    )


@dataclass(frozen=True)
class GPUSpec:
    """One GPU model: memory as torch reports it, dense 16-bit tensor-core peak, memory bandwidth."""

    name: str
    memory_gib: float  # torch.cuda.get_device_properties().total_memory / 2**30 (below the marketed GB)
    tflops: float  # dense bf16 peak (fp16 where the GPU has no bf16), TFLOP/s
    bandwidth_gbs: float  # GB/s
    compute_capability: tuple[int, int]


#: The GPUs of the README table, from NVIDIA's datasheets (SXM parts for A100, H100, H200).
GPUS: tuple[GPUSpec, ...] = (
    GPUSpec("T4 16 GB", 14.7, 65.0, 320.0, (7, 5)),  # fp16 tensor cores; no bf16
    GPUSpec("A100 40 GB", 39.4, 312.0, 1555.0, (8, 0)),
    GPUSpec("A100 80 GB", 79.2, 312.0, 2039.0, (8, 0)),
    GPUSpec("H100 80 GB", 79.1, 989.0, 3350.0, (9, 0)),
    GPUSpec("H200 141 GB", 139.8, 989.0, 4800.0, (9, 0)),
)
#: Model FLOPs utilisation of training: the share of the peak a well-fed step reaches.
MFU = 0.40  # kit choice: typical of a 1-2B model in bf16 with FlashAttention/SDPA on one GPU
#: QLoRA dequantizes the 4-bit weights for every matmul: the same FLOPs at this share of the MFU.
QLORA_MFU_FACTOR = 0.5  # kit choice: QLoRA steps run about half as fast as LoRA's
#: Decoding reads the weights and the cache once per generated token: memory-bound, at this share
#: of the GPU's bandwidth.
GENERATION_BANDWIDTH_UTILISATION = 0.40  # kit choice: vLLM-like decoding; transformers' generate is slower
#: Rows of each training mixture: the Hub cards' dataset_info num_examples
#: (/work/shared/training_samples/*/README.md); RLVR's is the prompt count (GSM8K 7,473, MATH 7,500, IF 14,973).
DATASET_ROWS = {"tulu3_sft": 939_343, "tulu3_preference": 271_409, "rlvr_mixed": 29_946}
#: Tokens per row, chat template included (both sequences of a preference pair).
TOKENS_PER_ROW = {
    # kit choice: the card's 2,914,250,826 bytes / 939,343 rows = 3,102 bytes per conversation, at 3.66
    # bytes per SmolLM2 token (measured on 100 real preference rows; the mixture is 83% English, Table 10)
    "tulu3_sft": 850,
    # kit choice: 1,494 tokens per pair measured on 100 real rows with the SmolLM2 tokenizer (the card's
    # 6,192 bytes per row, holding the prompt three times, give 1,690)
    "tulu3_preference": 1_500,
}
#: Prompt tokens of one PPO episode: the kit left-pads a rollout batch to its longest prompt.
RLVR_PROMPT_TOKENS = 1_000  # kit choice: GSM8K's 8-shot prompts average 830 tokens (up to 1,249 in 100 real rows), MATH's 706, IF's about 64


def flops_per_token(n_params: int, method: str, gradient_checkpointing: bool = True) -> float:
    """Training FLOPs per token: forward 2N, backward 4N (2N with adapters: no weight gradients), plus 2N
    to recompute the forward under gradient checkpointing."""
    if method not in METHODS:
        raise MemoryPlanError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    return ((6 if method == "full" else 4) + (2 if gradient_checkpointing else 0)) * n_params


def estimate_hours(plan: Any, method: str, gpu: GPUSpec, *, reference: str = "cache") -> dict[str, float]:
    """Training time of ``plan`` with ``method`` on ``plan.num_processes`` GPUs like ``gpu`` (linear scaling).

    sft, rm and dpo train ``rows x tokens per row x num_epochs`` tokens (dpo adds a no-grad reference
    forward, once when cached, every epoch when live). PPO runs ``num_episodes`` of
    :data:`RLVR_PROMPT_TOKENS` prompt tokens and a full-length response: per token, ``num_epochs``
    training passes of policy and value model, no-grad forwards of policy, value, reference and (when
    loaded) reward model, plus the prefill; its generation is bound by memory bandwidth. Returns
    ``tokens``, ``flops``, ``generation_hours`` and ``hours`` (the total).
    """
    recipe = plan.recipe
    stage = _stage_name(recipe.stage)
    shape = model_shape(plan.model)
    n = shape.parameters
    per_token = flops_per_token(n, method, plan.gradient_checkpointing)
    rate = gpu.tflops * 1e12 * MFU * (QLORA_MFU_FACTOR if method == "qlora" else 1.0)
    generation_s = 0.0
    if stage != "rlvr":
        if recipe.dataset not in TOKENS_PER_ROW:
            raise MemoryPlanError(
                f"no row count for dataset {recipe.dataset!r}; known: {', '.join(TOKENS_PER_ROW)}"
            )
        rows = min(DATASET_ROWS[recipe.dataset], plan.max_train_samples or DATASET_ROWS[recipe.dataset])
        row_tokens = min(TOKENS_PER_ROW[recipe.dataset], plan.max_length * (1 if stage == "sft" else 2))
        tokens = rows * row_tokens * recipe.num_epochs
        flops = tokens * per_token
        if stage == "dpo":
            flops += rows * row_tokens * (recipe.num_epochs if reference == "live" else 1) * 2 * n
    else:
        settings = stage_settings(recipe)
        value = model_shape(settings["value_model"]) if settings["value_model"] else shape
        reward = model_shape(settings["reward_model"]) if settings["reward_model"] else None
        prompt, response = min(RLVR_PROMPT_TOKENS, recipe.prompt_length), recipe.response_length
        length, epochs = prompt + response, max(1, round(recipe.num_epochs))
        no_grad = 2 * n + 2 * value.parameters + 2 * n + (2 * reward.parameters if reward else 0)
        train = epochs * (per_token + flops_per_token(value.parameters, method, plan.gradient_checkpointing))
        tokens = recipe.num_episodes * length
        flops = tokens * (train + no_grad) + recipe.num_episodes * prompt * 2 * n
        half = _dtype_bytes(plan.dtype)
        rollout = recipe.rollout_batch_size
        kv_per_token = 2 * shape.n_layers * shape.kv_size * half
        step_bytes = response * _frozen_bytes(shape, method, half) + rollout * kv_per_token * (
            response * prompt + response**2 / 2
        )
        iterations = math.ceil(recipe.num_episodes / rollout)
        generation_s = iterations * step_bytes / (gpu.bandwidth_gbs * 1e9 * GENERATION_BANDWIDTH_UTILISATION)
    processes = max(1, plan.num_processes)
    seconds = (flops / rate + generation_s) / processes
    return {
        "tokens": float(tokens),
        "flops": float(flops),
        "generation_hours": generation_s / processes / 3600,
        "hours": seconds / 3600,
    }
