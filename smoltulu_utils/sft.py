"""The SFT stage: TRL's ``SFTTrainer`` with Tulu 3's semantics, driven by a resolved :class:`Plan`.

::

    plan = resolve("sft_1130", profile="auto")
    result = train_sft(plan, "runs/sft_1130")      # model, tokenizer and rows follow the plan
    result.train_loss[-1], result.trained_tokens    # per-token loss after the last step, tokens seen

TRL does the training loop, batching, labels from an assistant mask, gradient accumulation and
distributed training. Written by hand, because neither TRL nor transformers offers it:

- **Which tokens train.** SmolLM2's chat template has no ``{% generation %}`` markers, so TRL's
  ``assistant_only_loss`` cannot find the assistant turns: :func:`prepare_sft_rows` hands TRL
  ``input_ids`` and ``assistant_masks`` from :func:`~smoltulu_utils.chat_template.assistant_token_mask`
  and skips (and reports) rows that cannot train.
- **The loss reduction** (:class:`TuluSFTTrainer`). TRL averages the token losses over the effective
  batch; Tulu 3 sums them. "sum" is TRL's mean times ``num_items_in_batch``, the trained-token count of
  the whole effective batch, so ``grad L_sum = |T| * grad L_mean``. AdamW cancels the constant factor
  up to a re-weighting between steps, and the recipes' gradient clip at 1.0 (Tulu 3's DeepSpeed
  ``gradient_clipping: auto``) rescales nearly every summed gradient to norm 1, so the paper's LR/BS
  ratio keeps its meaning. Notebook 02 derives this step by step.
- **Padding-free batches** for ``packing: true``: each per-device batch laid end to end with
  ``position_ids`` restarting per example (TRL's ``padding_free``; transformers builds the
  block-diagonal mask), so the effective batch stays the recipe's (TRL's bin packing would change it).
  An sdpa model runs :mod:`~smoltulu_utils.packed_attention` meanwhile; an attention implementation the
  kit has not checked against padded batches falls back to padding, with a note.
- **The LM head on a CPU** (:mod:`~smoltulu_utils.lm_head`): the plain head and one log-softmax, several
  times faster there than TRL's chunked loss (same loss and gradient).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from trl import SFTTrainer

from .chat_template import IGNORE_INDEX, ChatTemplateError, assistant_token_mask
from .data_checks import SkippedRow, SkipReport, conversation_problem
from .errors import KitError, first_line
from .lm_head import use_plain_lm_head
from .packed_attention import restore_attention, use_packed_attention
from .recipes import SFTRecipe
from .training import StageResult, describe_batch, log_history, start_stage, trainer_settings

if TYPE_CHECKING:  # pragma: no cover
    import datasets
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from trl import SFTConfig

    from .profiles import Plan

log = logging.getLogger(__name__)

#: Attention implementations that keep the examples of a padding-free row apart: sdpa and eager through
#: transformers' block-diagonal mask (checked against padded batches in the kit's tests), FlashAttention
#: through the sequence boundaries (cu_seq_lens) TRL's collator passes, TRL's own padding-free path.
PADDING_FREE_ATTENTION = ("sdpa", "sdpa_packed", "eager", "flash_attention_2", "flash_attention_3")
#: How many skipped rows a log message or a manifest lists by index (the count is always complete).


class SFTError(KitError, ValueError):
    """An SFT run that cannot start: no usable rows, a plan for another stage, an unsupported method."""


# ======================================================================================================
# Rows -> token ids and assistant masks
# ======================================================================================================
@dataclass
class SFTDataReport(SkipReport):
    """What :func:`prepare_sft_rows` kept and skipped."""

    n_rows: int
    n_kept: int
    n_truncated: int  # kept rows cut to max_length (a cut last reply loses its end-of-turn token)
    trained_tokens: int  # tokens of the kept rows that carry a label
    total_tokens: int  # all tokens of the kept rows
    max_length: int
    skipped: list[SkippedRow] = field(default_factory=list)

    def describe(self) -> str:
        lines = [
            f"{self.n_kept} of {self.n_rows} rows kept ({self.n_truncated} truncated to {self.max_length} "
            f"tokens), {self.trained_tokens} of {self.total_tokens} tokens trained; {self.n_skipped} skipped"
        ]
        return "\n".join(lines + self.skipped_lines())


def prepare_sft_rows(
    rows: Iterable[Mapping], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> tuple[datasets.Dataset, SFTDataReport]:
    """Tokenize conversations for TRL: ``(Dataset with input_ids and assistant_masks, report)``.

    Each row's ``messages`` are rendered with the tokenizer's chat template; ``assistant_masks`` is 1 on
    every assistant turn's content and its end-of-turn token (the kit's
    :func:`~smoltulu_utils.chat_template.assistant_token_mask`), and SFTTrainer builds the labels from it
    (``input_ids`` where the mask is 1, -100 elsewhere). Sequences are cut to ``max_length`` tokens.

    A row is skipped, with its index and reason in ``report.skipped`` and a warning in the log, when it
    has no usable conversation (missing messages, unknown role, no assistant turn, an empty reply), when
    the template does not tokenize it consistently (e.g. a message starting with two spaces or
    newlines), or when no trained token is left after truncation.
    """
    import datasets

    if max_length < 2:
        raise SFTError(f"max_length must be at least 2 tokens, got {max_length}")
    ids_column: list[list[int]] = []
    mask_column: list[list[int]] = []
    skipped: list[SkippedRow] = []
    n_rows = n_truncated = trained = total = 0
    for index, row in enumerate(rows):
        n_rows += 1
        problem = conversation_problem(row.get("messages") if isinstance(row, Mapping) else None)
        if problem is None:
            try:
                ids, mask = assistant_token_mask(tokenizer, list(row["messages"]))
            except ChatTemplateError as exc:
                problem = f"chat template: {first_line(exc)}"
            except Exception as exc:  # a template's own error (e.g. jinja raise_exception) on one row
                problem = f"chat template: {type(exc).__name__}: {first_line(exc)}"
        if problem is None:
            cut = len(ids) > max_length
            ids, mask = ids[:max_length], mask[:max_length]
            # Position 0 is never a target (the label of token t is predicted from the tokens before it).
            if not any(mask[1:]):
                first = next((p for p, m in enumerate(mask) if m), None)
                problem = (
                    f"nothing to train after truncation: the first trained token is past {max_length} tokens"
                    if cut or first is None
                    else "nothing to train: no assistant token after the first position"
                )
        if problem is not None:
            skipped.append(SkippedRow(index, problem))
            continue
        n_truncated += cut
        trained += sum(mask[1:])
        total += len(ids)
        ids_column.append([int(t) for t in ids])
        mask_column.append([int(m) for m in mask])
    report = SFTDataReport(
        n_rows=n_rows,
        n_kept=len(ids_column),
        n_truncated=n_truncated,
        trained_tokens=trained,
        total_tokens=total,
        max_length=max_length,
        skipped=skipped,
    )
    if skipped:
        log.warning("SFT data: skipped %d of %d rows\n%s", len(skipped), n_rows, report.describe())
    features = datasets.Features(
        {
            "input_ids": datasets.List(datasets.Value("int32")),
            "assistant_masks": datasets.List(datasets.Value("int8")),
        }
    )
    dataset = datasets.Dataset.from_dict(
        {"input_ids": ids_column, "assistant_masks": mask_column}, features=features
    )
    return dataset, report


# ======================================================================================================
# The trainer
# ======================================================================================================
def _count_labels(batch: Mapping) -> int:
    labels = batch.get("labels")
    return 0 if labels is None else int((labels[..., 1:] != IGNORE_INDEX).sum())


class TuluSFTTrainer(SFTTrainer):
    """TRL's ``SFTTrainer`` with a choice of loss reduction and a per-token loss in the logs.

    ``loss_reduction="mean"`` is TRL's loss unchanged. ``"sum"`` multiplies it by the trained-token count
    of the whole effective batch (see the module docstring). Training logs gain ``loss_per_token`` (the
    mean NLL of the step's trained tokens, comparable across reductions; equal to ``loss`` for "mean")
    and ``trained_tokens`` (cumulative); ``evaluate()`` adds ``eval_loss_per_token``, averaged over
    tokens rather than batches.
    """

    def __init__(
        self, *args: Any, loss_reduction: str = "mean", fused_lm_head: bool | None = None, **kwargs: Any
    ):
        if loss_reduction not in ("sum", "mean"):
            raise SFTError(f"loss_reduction must be 'sum' or 'mean', got {loss_reduction!r}")
        self.loss_reduction = loss_reduction
        self.fused_lm_head = torch.cuda.is_available() if fused_lm_head is None else bool(fused_lm_head)
        self.trained_tokens = 0
        self._tokens_since_log: list[float] = []
        self._eval_totals = [0.0, 0.0]
        super().__init__(*args, **kwargs)
        if not self.fused_lm_head:
            use_plain_lm_head(self.model)
        if loss_reduction == "sum":
            # The summed loss is never divided by the accumulation steps, whoever counted the tokens.
            self.loss_is_scaled_for_ga = True

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if num_items is not None:
            tokens = float(torch.as_tensor(num_items).reshape(-1)[0])
        else:  # a model without loss kwargs: count this process's tokens, then every process's
            tokens = float(sum(_count_labels(b) for b in batch_samples))
            if self.args.world_size > 1:
                total = torch.tensor(tokens, device=self.args.device)
                tokens = float(self.accelerator.reduce(total, reduction="sum"))
        self.trained_tokens += int(round(tokens))
        self._tokens_since_log.append(tokens)
        return batch_samples, num_items

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.get("labels")
        local = (labels[..., 1:] != IGNORE_INDEX).sum() if labels is not None else None
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        loss, outputs = result if return_outputs else (result, None)
        if not self.model.training:  # evaluation: TRL's per-batch mean; keep token-weighted totals
            if local is not None:
                count = float(local)
                self._eval_totals[0] += float(loss.detach()) * count
                self._eval_totals[1] += count
            return result
        if self.loss_reduction == "sum":
            if num_items_in_batch is not None:
                loss = loss * num_items_in_batch
            elif local is not None:  # TRL divided by this micro-batch's own count
                loss = loss * local * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._tokens_since_log:
            per_step = sum(self._tokens_since_log) / len(self._tokens_since_log)
            logs["loss_per_token"] = (
                logs["loss"] / per_step if self.loss_reduction == "sum" and per_step else logs["loss"]
            )
            logs["trained_tokens"] = self.trained_tokens
            self._tokens_since_log = []
        super().log(logs, start_time)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save with the attention implementation the model came with, so the checkpoint loads anywhere."""
        before = getattr(self, "attention_before", None)
        restore_attention(self.accelerator.unwrap_model(self.model), before)
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            if before is not None:
                use_packed_attention(self.accelerator.unwrap_model(self.model))

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        self._eval_totals = [0.0, 0.0]
        metrics = super().evaluate(
            eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix
        )
        nll, count = self._eval_totals
        if self.args.world_size > 1:
            totals = self.accelerator.reduce(torch.tensor([nll, count], device=self.args.device), "sum")
            nll, count = float(totals[0]), float(totals[1])
        if count:
            metrics[f"{metric_key_prefix}_loss_per_token"] = nll / count
        return metrics


def padding_free_supported(model: PreTrainedModel) -> tuple[bool, str]:
    """Whether the model's attention builds a block-diagonal mask for padding-free batches, and why."""
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation in PADDING_FREE_ATTENTION:
        return True, (
            f"attention '{implementation}': transformers builds a block-diagonal causal mask from the "
            "position ids, so each example attends only to itself"
        )
    return False, (
        f"attention {implementation!r} is not one the kit checked for padding-free batches "
        f"({', '.join(PADDING_FREE_ATTENTION)}); using padded batches instead"
    )


def sft_config(
    plan: Plan,
    output_dir: str | Path,
    *,
    padding_free: bool = False,
    max_grad_norm: float | None = None,
    **overrides: Any,
) -> SFTConfig:
    """TRL ``SFTConfig`` from a plan: batch split, schedule, length, seed, precision, device and logs.

    Per-device batch and accumulation come from the plan (their product with the processes is the
    recipe's effective batch); learning rate, scheduler, warmup, weight decay, epochs and seed from the
    recipe; ``plan.max_steps`` (when set) caps the optimizer steps. bf16/fp16 follow ``plan.dtype``;
    ``use_cpu`` is set when there is no CUDA GPU (which also makes a multi-process launch use gloo).
    Logs every step (a NaN or infinite loss is logged as it is), progress bar on, no intermediate
    checkpoints (the stage saves once at the end).
    With ``padding_free`` the rows must already be cut to the plan's length (``prepare_sft_rows`` does),
    so TRL's own truncation is off. ``overrides`` go to ``SFTConfig`` last.
    """
    from trl import SFTConfig

    settings = trainer_settings(plan, output_dir, max_grad_norm=max_grad_norm)
    settings.update(
        {
            "max_length": None if padding_free else plan.max_length,
            "padding_free": padding_free,
            "packing": False,
        }
    )
    settings.update(overrides)
    return SFTConfig(**settings)


def build_trainer(
    plan: Plan,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: datasets.Dataset,
    output_dir: str | Path,
    *,
    eval_dataset: datasets.Dataset | None = None,
    padding_free: bool | None = None,
    loss_reduction: str | None = None,
    callbacks: list | None = None,
    peft_config: Any = None,
    max_grad_norm: float | None = None,
    fused_lm_head: bool | None = None,
    **config_overrides: Any,
) -> TuluSFTTrainer:
    """A :class:`TuluSFTTrainer` for a plan and datasets made by :func:`prepare_sft_rows`.

    ``padding_free`` defaults to the recipe's ``packing`` where the model's attention supports it;
    ``loss_reduction`` to the recipe's. Padding-free training on an sdpa model switches it to
    :mod:`~smoltulu_utils.packed_attention` (saved checkpoints keep sdpa). ``fused_lm_head`` (default: on a
    GPU only) chooses TRL's chunked LM-head loss over the full logits. Useful to look at batches as the trainer builds them
    (``next(iter(trainer.get_train_dataloader()))``) before a run.
    """
    recipe = plan.recipe
    if padding_free is None:
        padding_free = bool(getattr(recipe, "packing", False)) and padding_free_supported(model)[0]
    config = sft_config(
        plan, output_dir, padding_free=padding_free, max_grad_norm=max_grad_norm, **config_overrides
    )
    attention_before = use_packed_attention(model) if padding_free else None
    trainer = TuluSFTTrainer(
        model=model,
        args=config,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
        peft_config=peft_config,
        loss_reduction=loss_reduction or getattr(recipe, "loss_reduction", "mean"),
        fused_lm_head=fused_lm_head,
    )
    trainer.attention_before = attention_before
    return trainer


# ======================================================================================================
# The stage
# ======================================================================================================
@dataclass
class SFTResult(StageResult):
    """What one SFT run did. Losses are per trained token (comparable across reductions)."""

    eval_loss: float | None = None  # mean NLL over the eval rows' trained tokens; None without eval_rows
    trained_tokens: int = 0  # tokens with a label over all steps (padding never counts)
    loss_reduction: str = "sum"
    padding_free: bool = False
    objective: list[tuple[int, float]] = field(default_factory=list)  # the logged loss (summed for "sum")


def train_sft(
    plan: Plan,
    output_dir: str | Path,
    *,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    rows: Iterable[Mapping] | None = None,
    eval_rows: Iterable[Mapping] | None = None,
    parent: str | Path | None = None,
    callbacks: list | None = None,
    peft_config: Any = None,
    max_grad_norm: float | None = None,
    verbose: bool = True,
    quantization_config: Any = None,
) -> SFTResult:
    """Run the SFT stage of ``plan`` and save model, tokenizer and ``manifest.json`` in ``output_dir``.

    The stage skeleton (:func:`~smoltulu_utils.training.start_stage`) loads the tokenizer and model from
    ``parent`` (a kit checkpoint folder, checked against the tokenizer and template, or a Hub id) or
    ``plan.model``, gives a base model's tokenizer the kit's chat template, and picks full fine-tuning
    (float32 master weights), LoRA (``peft_config``) or QLoRA (with ``quantization_config``; or the
    memory plan on a GPU); adapters are merged into the saved model. The rows default to the recipe's
    dataset from the profile's data, at most ``plan.max_train_samples``. Bad rows are skipped and
    reported (``result.data_report``); a run with no usable row raises :class:`SFTError`.
    """
    recipe = plan.recipe
    run = start_stage(
        plan, SFTRecipe, output_dir, caller="train_sft", error=SFTError, tokenizer=tokenizer, parent=parent
    )
    tokenizer, output_dir, notes = run.tokenizer, run.output_dir, run.notes
    model = run.load_model(model, peft_config=peft_config, quantization_config=quantization_config)
    train_dataset, report = prepare_sft_rows(run.rows(rows), tokenizer, plan.max_length)
    if report.n_kept == 0:
        raise SFTError(f"no usable SFT rows: {report.describe()}")
    eval_dataset = None
    if eval_rows is not None:
        eval_dataset, eval_report = prepare_sft_rows(eval_rows, tokenizer, plan.max_length)
        notes.append(f"eval rows: {eval_report.describe().splitlines()[0]}")
        if eval_report.n_kept == 0:
            eval_dataset = None

    padding_free = False
    if recipe.packing:
        padding_free, why = padding_free_supported(model)
        notes.append(("padding-free batches: " if padding_free else "") + why)

    trainer = build_trainer(
        plan,
        model,
        tokenizer,
        train_dataset,
        output_dir,
        eval_dataset=eval_dataset,
        padding_free=padding_free,
        loss_reduction=recipe.loss_reduction,
        callbacks=callbacks,
        peft_config=run.chosen.peft_config,
        max_grad_norm=max_grad_norm,
    )
    main = trainer.is_world_process_zero()
    if verbose and main:
        print(
            f"SFT {recipe.name}: {report.describe().splitlines()[0]}\n"
            f"  {run.chosen.method} fine-tuning, loss {recipe.loss_reduction} over tokens, "
            f"{'padding-free' if padding_free else 'padded'} batches, {describe_batch(plan)}, "
            f"LR {plan.learning_rate:g}, {plan.max_steps or recipe.num_epochs} "
            f"{'steps' if plan.max_steps else 'epochs'}"
        )
    wall = run.train(trainer)
    eval_loss = None
    if eval_dataset is not None:
        metrics = trainer.evaluate()
        eval_loss = metrics.get("eval_loss_per_token", metrics.get("eval_loss"))

    restore_attention(model, trainer.attention_before)  # the trained model leaves as it came
    trainer.attention_before = None
    result = run.result(
        SFTResult,
        trainer,
        "loss_per_token",
        wall,
        report,
        eval_loss=eval_loss,
        trained_tokens=int(trainer.trained_tokens),
        loss_reduction=recipe.loss_reduction,
        padding_free=padding_free,
        objective=log_history(trainer.state.log_history, "loss"),
    )
    extra = {"loss_reduction": recipe.loss_reduction, "padding_free": padding_free, "eval_loss": eval_loss}
    extra.update(max_grad_norm=trainer.args.max_grad_norm, trained_tokens=result.trained_tokens)
    run.finish("sft", result, extra, trainer=trainer)
    if verbose and main:
        first = result.train_loss[0][1] if result.train_loss else float("nan")
        final = result.final_train_loss
        print(
            f"  done: {result.steps} steps in {wall:.1f} s, loss per token {first:.3f} -> "
            f"{final if final is not None else float('nan'):.3f}, {result.trained_tokens} tokens trained"
            + (f", eval loss {eval_loss:.3f}" if eval_loss is not None else "")
            + f"; saved to {output_dir}"
        )
    return result
