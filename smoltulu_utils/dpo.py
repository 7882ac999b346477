"""The DPO stage: TRL's ``DPOTrainer`` with Tulu 3's length-normalised loss and cached reference log-probs.

::

    plan = resolve("dpo_1130", profile="auto")
    result = train_dpo(plan, "runs/dpo_1130", parent="runs/sft_1130")
    result.curves["margins"][-1], result.reference  # (step, margin); {"found": "hit", "forward_passes": 0, ...}

Tulu 3's ``dpo_norm`` is the DPO loss on length-normalised log-probabilities, TRL's ``sigmoid_norm``
(:data:`TRL_LOSS_TYPES`; ``tests/test_dpo.py`` checks it against the formula computed from the logits)::

    margin = (pi(c|x) - ref(c|x)) / |c|  -  (pi(r|x) - ref(r|x)) / |r|
    loss   = -log sigmoid(beta * margin)            (beta = 5 in Tulu 3)

The reference log-probs are computed once, before training, from the starting model (TRL's
``precompute_ref_log_probs``), and kept on disk (:mod:`smoltulu_utils.reference_cache`), so a later run
with the same key (every cell of a learning-rate x batch-size sweep) runs no reference forward pass.
Sharded runs compute them as TRL does (a DeepSpeed inference engine, an FSDP-wrapped copy). Written by
hand: the loss-name mapping, the disk cache (one TRL method overridden), and the implicit-reward
accuracy that counts ties as half (:func:`pair_rewards`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from trl import DPOTrainer

from .chat_template import template_fingerprint
from .errors import KitError
from .lm_head import use_plain_lm_head
from .preferences import prepare_preference_rows
from .recipes import DPORecipe
from .reference_cache import (
    ReferenceCache,
    cache_key,
    data_fingerprint,
    is_zero3_partitioned,
    module_fingerprint,
)
from .training import StageResult, describe_batch, log_history, start_stage, trainer_settings

if TYPE_CHECKING:  # pragma: no cover
    import datasets
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from trl import DPOConfig

    from .profiles import Plan

#: The recipe's loss names and TRL's: Tulu 3's ``dpo_norm`` is TRL's ``sigmoid_norm``.
TRL_LOSS_TYPES = {"dpo": "sigmoid", "dpo_norm": "sigmoid_norm"}
#: TRL's per-step logs of the implicit rewards (``rewards/<name>``); accuracies count ties as 0.
CURVES = ("chosen", "rejected", "margins", "accuracies")
#: Where a run's reference log-probs live unless told otherwise.
DEFAULT_CACHE = "default"


class DPOError(KitError, ValueError):
    """A DPO run that cannot start: wrong recipe, wrong parent, no usable pair; the message says the fix."""


def dpo_config(
    plan: Plan, output_dir: str | Path, *, max_grad_norm: float | None = None, **overrides: Any
) -> DPOConfig:
    """TRL ``DPOConfig`` from a plan: batch split, schedule, length, beta, loss, precision and logs.

    ``precompute_ref_log_probs`` is on (the reference pass happens once, before training); the recipe's
    ``loss_type`` is mapped to TRL's name; ``max_grad_norm`` None is the recipe's (Tulu 3: 1.0).
    ``overrides`` go to ``DPOConfig`` last.
    """
    from trl import DPOConfig

    recipe = plan.recipe
    settings = trainer_settings(plan, output_dir, max_grad_norm=max_grad_norm)
    settings.update({
        "max_length": plan.max_length,
        "beta": recipe.beta,
        "loss_type": [TRL_LOSS_TYPES[recipe.loss_type]],
        "precompute_ref_log_probs": True,
        "include_num_input_tokens_seen": "non_padding",
    })  # fmt: skip
    settings.update(overrides)
    return DPOConfig(**settings)


class KitDPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` whose precomputed reference log-probs go through a :class:`ReferenceCache`.

    ``reference_forward_passes`` counts the reference batches actually run; ``reference_lookups`` holds,
    per dataset name ("train", "eval"), the cache key, file and what the lookup found.
    """

    def __init__(self, *args: Any, reference_cache: ReferenceCache | None = None, **kwargs: Any):
        self.reference_cache = reference_cache
        self.reference_forward_passes = 0
        self.reference_lookups: dict[str, dict[str, Any]] = {}
        # Under FSDP, TRL reloads a second reference from the model's name to shard it for the pass; the
        # kit hands it a copy of the starting model instead (the weights the cache key hashes, also for a
        # model built or changed in memory), and frees it after the pass as TRL frees its own.
        self._reference_copy = _fsdp_reference_copy(args, kwargs)
        if self._reference_copy is not None:
            kwargs["ref_model"] = self._reference_copy
        super().__init__(*args, **kwargs)
        if self._reference_copy is not None:
            self.ref_model = self._reference_copy = None
        self._plain_head_on_cpu()

    def _plain_head_on_cpu(self) -> None:
        if not torch.cuda.is_available():  # TRL's tiled LM head is slow on a CPU (smoltulu_utils.lm_head)
            use_plain_lm_head(self.model)
            if getattr(self, "ref_model", None) is not None:
                use_plain_lm_head(self.ref_model)

    def compute_ref_log_probs(self, model, inputs):
        self.reference_forward_passes += 1
        return super().compute_ref_log_probs(model, inputs)

    def reference_key_parts(self, dataset: datasets.Dataset) -> dict[str, Any]:
        """What the reference log-probs of ``dataset`` depend on (hashed into the cache key)."""
        model = self.ref_model or self.model
        if is_zero3_partitioned(model):  # TRL hashed the empty local shards; hash the gathered weights
            self._precompute_model_hash = module_fingerprint(model)
        return {
            "reference_weights": self._precompute_model_hash,
            "reference_name": getattr(getattr(model, "config", None), "_name_or_path", ""),
            "data": data_fingerprint(dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])),
            "n_rows": len(dataset),
            "tokenizer": template_fingerprint(self._tokenizer),
            "max_length": self.args.max_length,
            "truncation_mode": self.args.truncation_mode,
            "ld_alpha": self.ld_alpha,
            "dtype": str(next(model.parameters()).dtype),
            "autocast": "bf16" if self.args.bf16 else "fp16" if self.args.fp16 else "none",
        }

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        self._plain_head_on_cpu()  # the reference pass runs inside TRL's __init__
        if self.reference_cache is None:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        from accelerate.utils import broadcast_object_list

        parts = self.reference_key_parts(dataset)
        key = [cache_key(parts)]
        broadcast_object_list(key, from_process=0)  # every rank reads the file rank 0 names
        key = key[0]
        found = self.reference_cache.load(key, len(dataset))
        if found.hit:
            chosen, rejected = found.chosen, found.rejected
        else:
            chosen, rejected = self._reference_pass(dataset, name, batch_size)
            if self.accelerator.is_main_process:
                self.reference_cache.save(key, chosen, rejected, parts)
            self.accelerator.wait_for_everyone()
        self.reference_lookups[name] = {"key": key, "path": str(found.path), "found": found.reason}
        dataset = dataset.add_column("ref_chosen_logps", chosen.tolist())
        return dataset.add_column("ref_rejected_logps", rejected.tolist())

    def _reference_pass(self, dataset, name: str, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass of the reference (the starting model) over ``dataset``, in order, every rank's share.

        As TRL's own precompute: under DeepSpeed the starting model runs inside one DeepSpeed inference
        engine (``prepare_deepspeed``, which places it and, with ZeRO-3, gathers each layer's shards for
        its forward), built once and reused by later passes; under FSDP the reference is TRL's
        FSDP-wrapped copy (``prepare_fsdp``); otherwise the model itself.
        """
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        loader = self.accelerator.prepare(
            DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False)
        )
        if self.ref_model is None and self.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed

            if getattr(self, "_precompute_engine", None) is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            model = self._precompute_engine
        else:
            model = self.ref_model or self.model
        chosen, rejected = [], []
        for batch in tqdm(loader, desc=f"Reference log-probs ({name})"):
            c, r = self.compute_ref_log_probs(model, batch)
            c, r = self.accelerator.gather_for_metrics((c, r))
            chosen.append(c.float().cpu())
            rejected.append(r.float().cpu())
        return torch.cat(chosen), torch.cat(rejected)


def _fsdp_reference_copy(args: tuple, kwargs: dict[str, Any]) -> Any:
    """A copy of the starting model to serve as the FSDP reference, or None when TRL needs none.

    TRL's ``DPOTrainer`` under FSDP with precomputed reference log-probs and no ``ref_model`` loads one
    from ``model.config._name_or_path`` (a checkpoint the kit may not have on disk: a model built in
    memory, a tokenizer-resized one); PEFT models need none (the adapter is disabled instead).
    """
    import copy

    from .scale_out import sharding

    config = kwargs.get("args", args[1] if len(args) > 1 else None)
    model = kwargs.get("model", args[0] if args else None)
    fsdp = sharding() == "fsdp" or bool(getattr(config, "fsdp", None))
    if (
        not fsdp
        or not getattr(config, "precompute_ref_log_probs", False)
        or kwargs.get("ref_model") is not None
        or kwargs.get("peft_config") is not None
        or model is None
        or isinstance(model, str)
        or hasattr(model, "peft_config")
    ):
        return None
    return copy.deepcopy(model)


def build_dpo_trainer(
    plan: Plan,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: datasets.Dataset,
    output_dir: str | Path,
    *,
    eval_dataset: datasets.Dataset | None = None,
    reference_cache: ReferenceCache | str | None = DEFAULT_CACHE,
    callbacks: list | None = None,
    peft_config: Any = None,
    max_grad_norm: float | None = None,
    **config_overrides: Any,
) -> KitDPOTrainer:
    """A :class:`KitDPOTrainer` for a plan and pairs made by :func:`~smoltulu_utils.preferences.prepare_preference_rows`.

    ``reference_cache``: ``"default"`` (the kit's cache folder), a :class:`ReferenceCache` or a folder,
    or None (TRL's own precompute, no disk cache). Building the trainer runs (or reads) the reference pass.
    """
    if reference_cache == DEFAULT_CACHE:
        reference_cache = ReferenceCache()
    elif reference_cache is not None and not isinstance(reference_cache, ReferenceCache):
        reference_cache = ReferenceCache(reference_cache)
    config = dpo_config(plan, output_dir, max_grad_norm=max_grad_norm, **config_overrides)
    return KitDPOTrainer(
        model=model,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
        peft_config=peft_config,
        reference_cache=reference_cache,
    )


@torch.no_grad()
def pair_rewards(trainer: DPOTrainer, dataset: datasets.Dataset | None = None) -> dict[str, torch.Tensor]:
    """The implicit rewards ``beta * (pi - ref)`` of every pair of a tokenized dataset (default: the eval set).

    Length-normalised for ``dpo_norm``, as the loss sees them. Returns ``chosen``, ``rejected`` and
    ``accuracy`` (chosen above rejected, a tie counting one half: 0.5 for the untrained policy, which
    equals its reference). The dataset must carry the reference columns (the trainer's own sets do).
    """
    from torch.utils.data import DataLoader

    dataset = trainer.eval_dataset if dataset is None else dataset
    model = trainer.model
    was_training = model.training
    model.eval()
    norm = "sigmoid_norm" in trainer.loss_types
    rewards: dict[str, list[torch.Tensor]] = {"chosen": [], "rejected": []}
    loader = DataLoader(
        dataset, batch_size=trainer.args.per_device_eval_batch_size, collate_fn=trainer.data_collator
    )
    for batch in loader:
        batch = trainer._prepare_inputs(batch)
        # TRL's reference pass turns a PEFT model's adapters off when there is no separate reference
        # model; naming the policy as the reference keeps them on, so these are the policy's log-probs
        # (the base method: a policy pass is not counted in reference_forward_passes).
        reference, trainer.ref_model = trainer.ref_model, model
        try:
            policy = DPOTrainer.compute_ref_log_probs(trainer, model, batch)
        finally:
            trainer.ref_model = reference
        lengths = batch["completion_mask"][..., 1:].sum(dim=1).float().chunk(2)
        for i, side in enumerate(("chosen", "rejected")):
            delta = policy[i].float() - batch[f"ref_{side}_logps"].float()
            rewards[side].append((trainer.beta * (delta / lengths[i].clamp(min=1) if norm else delta)).cpu())
    model.train(was_training)
    chosen, rejected = torch.cat(rewards["chosen"]), torch.cat(rewards["rejected"])
    accuracy = ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean()
    return {"chosen": chosen, "rejected": rejected, "accuracy": accuracy}


@dataclass
class DPOResult(StageResult):
    """What one DPO run did; histories are ``(optimizer step, value)`` from TRL's logs."""

    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # TRL's rewards/<name> per step
    eval_loss: float | None = None  # the DPO loss on the held-out pairs after training
    eval_accuracy: float | None = None  # held-out pair accuracy after training (ties count one half)
    eval_accuracy_before: float | None = None
    tokens_seen: int = 0  # non-padding tokens of every chosen and rejected sequence trained on
    loss_type: str = "dpo_norm"
    reference: dict[str, Any] = field(default_factory=dict)  # cache key/file/lookup, forward passes

    def training_curves(self) -> dict[str, list[tuple[int, float]]]:
        return {"train_loss": self.train_loss, **{f"rewards/{k}": v for k, v in self.curves.items()}}


def train_dpo(
    plan: Plan,
    output_dir: str | Path,
    *,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    rows: Iterable[Mapping] | None = None,
    eval_rows: Iterable[Mapping] | None = None,
    parent: str | Path | None = None,
    reference_cache: ReferenceCache | str | None = DEFAULT_CACHE,
    callbacks: list | None = None,
    max_grad_norm: float | None = None,
    verbose: bool = True,
    peft_config: Any = None,
    quantization_config: Any = None,
) -> DPOResult:
    """Run the DPO stage of ``plan`` and save model, tokenizer and ``manifest.json`` in ``output_dir``.

    The stage skeleton (:func:`~smoltulu_utils.training.start_stage`) loads the tokenizer and model from
    ``parent`` (a kit SFT or DPO checkpoint, whose manifest is checked, or a Hub id) or ``plan.model``,
    and picks full fine-tuning (float32), LoRA (``peft_config``) or QLoRA (``quantization_config``),
    as :func:`~smoltulu_utils.sft.train_sft` does. Rows default to the recipe's dataset; bad pairs are
    skipped and reported, and no usable pair raises :class:`~smoltulu_utils.preferences.PreferenceDataError`.
    The reference log-probs come from the cache when their key matches (``result.reference``).
    """
    recipe = plan.recipe
    run = start_stage(
        plan, DPORecipe, output_dir, caller="train_dpo", error=DPOError, tokenizer=tokenizer, parent=parent
    )
    tokenizer, output_dir, notes = run.tokenizer, run.output_dir, run.notes
    if run.parent_manifest is not None:
        if run.parent_stage not in ("sft", "dpo"):
            raise DPOError(
                f"{run.source} is a '{run.parent_stage}' checkpoint; DPO starts from an SFT checkpoint. "
                "Pass the folder an SFT run saved (for example runs/sft_1130)."
            )
        if run.parent_stage == "dpo":
            notes.append(f"parent {run.source} is itself a DPO checkpoint: training continues from it")
    elif model is None:
        notes.append(f"starting from {run.source}, not a kit SFT checkpoint: no manifest to check")
    model = run.load_model(model, peft_config=peft_config, quantization_config=quantization_config)
    train_dataset, report = prepare_preference_rows(
        run.rows(rows), tokenizer, plan.max_length, drop_too_long=False
    )
    eval_dataset = None
    if eval_rows is not None:
        eval_dataset, eval_report = prepare_preference_rows(
            eval_rows, tokenizer, plan.max_length, drop_too_long=False
        )
        notes.append(f"eval pairs: {eval_report.describe().splitlines()[0]}")

    trainer = build_dpo_trainer(
        plan,
        model,
        tokenizer,
        train_dataset,
        output_dir,
        eval_dataset=eval_dataset,
        reference_cache=reference_cache,
        callbacks=callbacks,
        peft_config=run.chosen.peft_config,
        max_grad_norm=max_grad_norm,
    )
    main = trainer.is_world_process_zero()
    lookup = trainer.reference_lookups.get("train", {})
    if verbose and main:
        print(
            f"DPO {recipe.name}: {report.describe().splitlines()[0]}\n"
            f"  loss {recipe.loss_type} (TRL {TRL_LOSS_TYPES[recipe.loss_type]}), beta {recipe.beta:g}, "
            f"{describe_batch(plan)}, LR {plan.learning_rate:g}; reference log-probs: "
            f"{lookup.get('found', 'TRL precompute')} ({trainer.reference_forward_passes} forward passes)"
        )
    before = float(pair_rewards(trainer)["accuracy"]) if eval_dataset is not None else None
    wall = run.train(trainer)
    after = float(pair_rewards(trainer)["accuracy"]) if eval_dataset is not None else None
    eval_loss = float(trainer.evaluate()["eval_loss"]) if eval_dataset is not None else None
    result = run.result(
        DPOResult,
        trainer,
        "loss",
        wall,
        report,
        curves={k: log_history(trainer.state.log_history, f"rewards/{k}") for k in CURVES},
        eval_loss=eval_loss,
        eval_accuracy=after,
        eval_accuracy_before=before,
        tokens_seen=int(trainer.state.num_input_tokens_seen),
        loss_type=recipe.loss_type,
        reference={**lookup, "forward_passes": trainer.reference_forward_passes},
    )
    extra = {"trl_loss_type": TRL_LOSS_TYPES[recipe.loss_type], "eval_accuracy": after}
    extra.update(tokens_seen=result.tokens_seen, reference=result.reference)
    run.finish("dpo", result, extra, trainer=trainer)
    if verbose and main:
        acc = f", held-out accuracy {before:.2f} -> {after:.2f}" if after is not None else ""
        print(
            f"  done: {result.steps} steps in {wall:.1f} s, loss {result.final_train_loss}{acc}; "
            f"saved to {output_dir}"
        )
    return result
