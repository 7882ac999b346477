"""The DPO stage: TRL's ``DPOTrainer`` with Tulu 3's length-normalised loss and cached reference log-probs.

::

    plan = resolve("dpo_1130", profile="auto")
    result = train_dpo(plan, "runs/dpo_1130", parent="runs/sft_1130")
    result.curves["margins"][-1], result.reference  # (step, margin); {"found": "hit", "forward_passes": 0, ...}

The loss
--------
Tulu 3 trains with ``dpo_norm``: the DPO loss on *length-normalised* log-probabilities. With
``pi(y|x)`` and ``ref(y|x)`` the summed log-probabilities of a reply under the policy and the frozen
reference, ``|y|`` its token count, and chosen ``c`` / rejected ``r``::

    margin = (pi(c|x) - ref(c|x)) / |c|  -  (pi(r|x) - ref(r|x)) / |r|
    loss   = -log sigmoid(beta * margin)            (beta = 5 in Tulu 3)

TRL implements exactly this as ``loss_type="sigmoid_norm"`` (plain ``dpo`` is ``"sigmoid"``); the kit maps
the recipe's name to TRL's in :data:`TRL_LOSS_TYPES`, and ``tests/test_dpo.py`` checks the loss against
this formula computed by hand from the model's logits.

Reference log-probabilities
---------------------------
The trainer always precomputes the reference log-probs in one pass before training (TRL's
``precompute_ref_log_probs``), from the starting model itself, so no second model is held in memory;
and the kit keeps them on disk (:mod:`smoltulu_utils.reference_cache`), keyed by the reference weights,
the tokenized pairs, the tokenizer and template, and the length settings. A later run with the same key
(every cell of a DPO learning-rate x batch-size sweep) reads them and runs no reference forward pass
at all; ``trainer.reference_forward_passes`` counts them. Pass ``reference_cache=None`` for TRL's own
behaviour. Sharded runs compute them as TRL does: under DeepSpeed the starting model runs in one
DeepSpeed inference engine (ZeRO-3 gathers each layer for its forward), under FSDP an FSDP-wrapped copy
of it does; a ZeRO-3-partitioned model's weights are gathered to be hashed, so a 2-process run and a
1-process run share one cache entry (``tests/test_scale_out.py`` checks both on two CPU processes).

What is written by hand here: the loss-name mapping, the disk cache (override of one TRL method),
the implicit-reward accuracy that counts ties as half (:func:`pair_rewards`), and the run's bookkeeping
(manifest, parent check, results).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from trl import DPOTrainer

from .chat_template import doctor, template_fingerprint
from .errors import KitError
from .lm_head import use_plain_lm_head
from .manifest import MANIFEST_NAME, check_parent, read_manifest, write_manifest
from .preferences import PreferenceDataReport, prepare_preference_rows
from .recipes import DPORecipe
from .reference_cache import (
    ReferenceCache,
    cache_key,
    data_fingerprint,
    is_zero3_partitioned,
    module_fingerprint,
)
from .training import (
    check_world_size,
    data_entry,
    full_precision,
    log_history,
    save_trained_model,
    stage_load_kwargs,
    trainer_settings,
    training_method,
)

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
        counted = trainer.reference_forward_passes if isinstance(trainer, KitDPOTrainer) else None
        # TRL's reference pass turns a PEFT model's adapters off when there is no separate reference
        # model; naming the policy as the reference keeps them on, so these are the policy's log-probs.
        reference, trainer.ref_model = trainer.ref_model, model
        try:
            policy = DPOTrainer.compute_ref_log_probs(trainer, model, batch)
        finally:
            trainer.ref_model = reference
        if counted is not None:
            trainer.reference_forward_passes = counted
        lengths = batch["completion_mask"][..., 1:].sum(dim=1).float().chunk(2)
        for i, side in enumerate(("chosen", "rejected")):
            delta = policy[i].float() - batch[f"ref_{side}_logps"].float()
            rewards[side].append((trainer.beta * (delta / lengths[i].clamp(min=1) if norm else delta)).cpu())
    model.train(was_training)
    chosen, rejected = torch.cat(rewards["chosen"]), torch.cat(rewards["rejected"])
    accuracy = ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).mean()
    return {"chosen": chosen, "rejected": rejected, "accuracy": accuracy}


# ======================================================================================================
# The stage
# ======================================================================================================
@dataclass
class DPOResult:
    """What one DPO run did; histories are ``(optimizer step, value)`` from TRL's logs."""

    output_dir: Path
    steps: int
    train_loss: list[tuple[int, float]]
    final_train_loss: float | None
    curves: dict[str, list[tuple[int, float]]]  # TRL's rewards/{chosen,rejected,margins,accuracies} per step
    eval_loss: float | None  # the DPO loss on the held-out pairs after training
    eval_accuracy: float | None  # held-out pair accuracy after training (ties count one half)
    eval_accuracy_before: float | None
    tokens_seen: int  # non-padding tokens of every chosen and rejected sequence trained on
    wall_seconds: float
    learning_rate: float
    effective_batch_size: int
    loss_type: str
    reference: dict[str, Any] = field(default_factory=dict)  # cache key/file/lookup, forward passes
    data_report: PreferenceDataReport | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["output_dir"] = str(self.output_dir)
        out["data_report"] = self.data_report.to_dict() if self.data_report else None
        return out


def check_sft_parent(folder: Path, tokenizer: Any) -> list[str]:
    """Check a parent checkpoint folder for DPO: kit manifest, same tokenizer/template, an SFT stage."""
    notes = []
    check_parent(folder, tokenizer)
    stage = read_manifest(folder).get("stage")
    if stage not in ("sft", "dpo"):
        raise DPOError(
            f"{folder} is a '{stage}' checkpoint; DPO starts from an SFT checkpoint. "
            "Pass the folder an SFT run saved (for example runs/sft_1130)."
        )
    if stage == "dpo":
        notes.append(f"parent {folder} is itself a DPO checkpoint: training continues from it")
    return notes


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

    The model and tokenizer come from ``parent`` (a kit SFT checkpoint, whose manifest is checked: same
    tokenizer and template, stage ``sft``; or a Hub id / ``"bundled"``), else from ``plan.model``. Rows
    default to ``load_rows(recipe.dataset)`` from the profile's data. Bad pairs are skipped and reported;
    no usable pair raises :class:`~smoltulu_utils.preferences.PreferenceDataError`. The reference
    log-probs come from the cache when their key matches (``result.reference``). Full fine-tuning trains
    float32 weights whatever the checkpoint's dtype; ``peft_config`` (LoRA), ``quantization_config``
    (QLoRA) or the memory plan choose adapters, merged into the saved model (as in
    :func:`~smoltulu_utils.sft.train_sft`). A tokenizer without a chat template gets the kit's.
    """
    from .data import load_rows
    from .models import adapt_tokenizer, load_model, load_tokenizer, match_model_to_tokenizer
    from .profiles import data_mirror

    recipe = plan.recipe
    if not isinstance(recipe, DPORecipe):
        raise DPOError(f"train_dpo needs a plan for a DPO recipe, got stage {recipe.stage!r} ({recipe.name})")
    check_world_size(plan)
    output_dir = Path(output_dir)
    source = str(parent) if parent is not None else plan.model
    folder = Path(source).expanduser()
    is_checkpoint = folder.is_dir() and (folder / MANIFEST_NAME).is_file()
    adapted: list[str] = []
    if tokenizer is None:
        tokenizer = load_tokenizer(source)
        adapted = adapt_tokenizer(tokenizer)  # a base model's tokenizer gets the kit's chat template
    notes: list[str] = []
    if folder.is_dir() and (parent is not None or is_checkpoint):
        notes += check_sft_parent(folder, tokenizer)
    elif model is None:
        notes.append(f"starting from {source}, not a kit SFT checkpoint: no manifest to check")
    doctor(tokenizer).raise_for_problems()
    chosen = training_method(
        plan, peft_config, model_given=model is not None, quantization_config=quantization_config
    )
    notes += chosen.notes
    if model is None:
        model = load_model(source, **stage_load_kwargs(chosen, source))
    if chosen.method == "full" and (cast := full_precision(model)):
        notes.append(cast)
    if adapted:
        adapted += match_model_to_tokenizer(model, tokenizer)
        notes.append("tokenizer adapted: " + "; ".join(adapted))

    given = rows is not None
    if rows is None:
        rows = load_rows(
            recipe.dataset, mirror=data_mirror(plan.profile), limit=plan.max_train_samples, validate=False
        )
    train_dataset, report = prepare_preference_rows(rows, tokenizer, plan.max_length, drop_too_long=False)
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
        peft_config=chosen.peft_config,
        max_grad_norm=max_grad_norm,
    )
    main = trainer.is_world_process_zero()
    lookup = trainer.reference_lookups.get("train", {})
    if verbose and main:
        print(
            f"DPO {recipe.name}: {report.describe().splitlines()[0]}\n"
            f"  loss {recipe.loss_type} (TRL {TRL_LOSS_TYPES[recipe.loss_type]}), beta {recipe.beta:g}, "
            f"effective batch {plan.effective_batch_size} = {plan.per_device_batch_size} x "
            f"{plan.gradient_accumulation_steps} x {plan.num_processes}, LR {plan.learning_rate:g}; reference "
            f"log-probs: {lookup.get('found', 'TRL precompute')} ({trainer.reference_forward_passes} forward passes)"
        )
    before = float(pair_rewards(trainer)["accuracy"]) if eval_dataset is not None else None
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    after = float(pair_rewards(trainer)["accuracy"]) if eval_dataset is not None else None
    eval_loss = float(trainer.evaluate()["eval_loss"]) if eval_dataset is not None else None

    history = trainer.state.log_history
    train_loss = log_history(history, "loss")
    final = train_loss[-1][1] if train_loss else None
    if final is not None and not math.isfinite(final):
        notes.append(f"the final training loss is {final}: lower the learning rate")
    result = DPOResult(
        output_dir=output_dir,
        steps=int(trainer.state.global_step),
        train_loss=train_loss,
        final_train_loss=final,
        curves={k: log_history(history, f"rewards/{k}") for k in CURVES},
        eval_loss=eval_loss,
        eval_accuracy=after,
        eval_accuracy_before=before,
        tokens_seen=int(trainer.state.num_input_tokens_seen),
        wall_seconds=wall,
        learning_rate=plan.learning_rate,
        effective_batch_size=plan.effective_batch_size,
        loss_type=recipe.loss_type,
        reference={**lookup, "forward_passes": trainer.reference_forward_passes},
        data_report=report,
        notes=notes,
    )

    def reload_base():  # QLoRA: the base in full precision, to merge the adapter into
        base = load_model(source, dtype="float32")
        if adapted:
            match_model_to_tokenizer(base, tokenizer)
        return base

    saved = save_trained_model(trainer, output_dir, chosen, reload_base=reload_base)
    if main:
        tokenizer.save_pretrained(output_dir)
        data = data_entry(plan, report, given, "train_dpo")
        write_manifest(
            output_dir,
            stage="dpo",
            recipe=recipe,
            data=[data],
            tokenizer=tokenizer,
            seed=recipe.seed,
            parent=source if is_checkpoint or not folder.is_dir() else None,
            extra={
                "started_from": source,
                "plan": plan.to_dict(),
                "trl_loss_type": TRL_LOSS_TYPES[recipe.loss_type],
                "method": chosen.method,
                "merged": saved["merged"],
                "weights_dtype": saved["dtype"],
                "tokenizer_adapted": adapted,
                "steps": result.steps,
                "final_train_loss": final,
                "eval_accuracy": after,
                "tokens_seen": result.tokens_seen,
                "wall_seconds": wall,
                "reference": result.reference,
                "data_report": report.to_dict(),
                "notes": notes,
            },
        )
    if verbose and main:
        acc = f", held-out accuracy {before:.2f} -> {after:.2f}" if after is not None else ""
        print(f"  done: {result.steps} steps in {wall:.1f} s, loss {final}{acc}; saved to {output_dir}")
    return result
