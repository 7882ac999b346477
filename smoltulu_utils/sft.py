"""The SFT stage: TRL's ``SFTTrainer`` with Tulu 3's semantics, driven by a resolved :class:`Plan`.

::

    plan = resolve("sft_1130", profile="auto")
    result = train_sft(plan, "runs/sft_1130")      # model, tokenizer and rows follow the plan
    result.train_loss[-1], result.trained_tokens    # per-token loss after the last step, tokens seen

What TRL does here: the training loop, batching and padding (or padding-free batches), labels from an
assistant mask, the fused LM head, gradient accumulation and distributed training through Accelerate.
What is written by hand, because neither TRL nor transformers offers it:

- **Which tokens train.** SmolLM2's chat template has no ``{% generation %}`` markers, so TRL's
  ``assistant_only_loss`` cannot find the assistant turns. :func:`prepare_sft_rows` tokenizes each
  conversation with the kit's :func:`~smoltulu_utils.chat_template.assistant_token_mask` (every
  assistant turn's content and its ``<|im_end|>``) and hands TRL ``input_ids`` and ``assistant_masks``,
  the columns TRL 1.16 turns into labels for pre-tokenized data. Rows that cannot train (no assistant
  turn, an empty reply, a template that does not tokenize consistently, nothing left to train after
  truncation) are skipped and reported with their index and reason instead of stopping the run.
- **The loss reduction** (:class:`TuluSFTTrainer`). TRL averages the token losses over the effective
  batch; Tulu 3 sums them.
- **The LM head on a CPU** (:mod:`~smoltulu_utils.lm_head`): TRL's chunked LM-head loss saves GPU
  memory but is several times slower than the plain LM head and one log-softmax on a CPU, so the kit
  uses the latter there (same loss and gradient).
- The run's bookkeeping: the per-token loss history, trained-token count, manifest and parent checks.

Loss reduction
--------------
With ``T`` the trained tokens of one optimizer step (every micro-batch of the gradient accumulation,
on every process) and ``l_t`` their negative log-likelihoods::

    mean:  L = (1/|T|) * sum_{t in T} l_t     (TRL's default: divided by ``num_items_in_batch``)
    sum:   L = sum_{t in T} l_t = |T| * L_mean

The kit computes "sum" as TRL's mean loss times ``num_items_in_batch``, the trained-token count of the
whole effective batch that the Trainer counts before the step, so the micro-batches' gradients add up
to the sum over the whole effective batch, and DDP's averaging over processes is undone by the factor
TRL already applies. Hence ``grad L_sum = |T| * grad L_mean``:

- With plain SGD, "sum" multiplies the learning rate by the trained tokens per step: LR x tokens per
  step is what sets the step size. The reasoning behind an LR/BS ratio (SGD's gradient noise scales as
  LR / BS) is made for a mean loss over BS sequences; with a summed loss and SGD, two runs with the
  same LR and BS but longer answers would take larger steps, and the ratio would not describe them.
- With AdamW (Tulu 3, SmolTulu and the kit) the update divides by the running RMS of the gradient, so a
  constant factor cancels (up to AdamW's epsilon). What remains is a re-weighting between steps: a step
  with more trained tokens than recent steps moves the weights more (its effective LR is about
  LR x |T_t| / RMS of recent |T|), i.e. every token weighs the same instead of every step. The paper's
  LR/BS ratio keeps its meaning up to this re-weighting.
- Gradient clipping at 1.0 (the recipes' ``max_grad_norm``; Tulu 3: open-instruct's ``finetune.py``
  leaves its own ``clip_grad_norm`` off, but its DeepSpeed configs say ``"gradient_clipping": "auto"``,
  which Accelerate fills with 1.0). The summed gradient's norm is |T| times the mean's, far above 1, so
  the clip rescales nearly every step's gradient to g / |g|, norm 1, before AdamW's normalisation: the
  step keeps the direction of the mean, its size no longer grows with |T|, and the re-weighting between
  steps above is gone (every step weighs the same; within a step, every token still does).
  ``max_grad_norm: 0.0`` in a recipe turns clipping off.
- open-instruct's own "sum" divides each micro-batch's sum by the accumulation steps (Accelerate's
  ``backward``) and averages over processes (DDP): its gradient is the kit's divided by a constant
  (accumulation steps x processes), which AdamW cancels.

Packing
-------
A recipe with ``packing: true`` trains *padding-free*: each per-device batch of whole examples is laid
end to end in one row with ``position_ids`` restarting at 0 for each example (TRL's
``padding_free``), and transformers (``masking_utils.find_packed_sequence_indices``) turns those
positions into a block-diagonal causal mask for sdpa and eager attention, so examples never attend to
each other. That mask still makes sdpa score every pair of positions in the row, so while it trains an
sdpa model runs :mod:`~smoltulu_utils.packed_attention` instead, one causal sdpa per example (same
result, a fraction of the work). TRL's bin packing (``packing=True``) is not used: it would change how many examples make
one optimizer step, and so the effective batch the LR/BS ratio is about. The kit checks on CPU that the
padding-free loss equals the padded loss (``tests/test_sft.py``); an attention implementation it has
not checked falls back to padded batches, with a note.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from trl import SFTTrainer

from .chat_template import ChatTemplateError, assistant_token_mask, doctor
from .data_checks import SkippedRow, SkipReport
from .errors import KitError
from .lm_head import use_plain_lm_head
from .manifest import MANIFEST_NAME, check_parent, write_manifest
from .packed_attention import restore_attention, use_packed_attention
from .recipes import SFTRecipe
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
    from trl import SFTConfig

    from .profiles import Plan

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
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


def _conversation_problem(row: Any) -> str | None:
    """Why a row cannot be an SFT conversation, or None."""
    messages = row.get("messages") if isinstance(row, Mapping) else None
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        return "no conversation: 'messages' is missing, empty or not a list"
    replies = 0
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            return f"bad message: message {i} is {type(message).__name__}, not a dict"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return f"bad message: message {i} has role {role!r} (expected one of {', '.join(ROLES)})"
        if not isinstance(content, str):
            return f"bad message: message {i} content is {type(content).__name__}, not str"
        if role == "assistant":
            replies += 1
            if not content.strip():
                return f"empty assistant reply: message {i} has no text"
    if not replies:
        return "no assistant turn: nothing to train"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


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
        problem = _conversation_problem(row)
        if problem is None:
            try:
                ids, mask = assistant_token_mask(tokenizer, list(row["messages"]))
            except ChatTemplateError as exc:
                problem = f"chat template: {_first_line(exc)}"
            except Exception as exc:  # a template's own error (e.g. jinja raise_exception) on one row
                problem = f"chat template: {type(exc).__name__}: {_first_line(exc)}"
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
class SFTResult:
    """What one SFT run did. Losses are per trained token (comparable across reductions)."""

    output_dir: Path
    steps: int
    train_loss: list[tuple[int, float]]  # (optimizer step, mean NLL of that step's trained tokens)
    final_train_loss: float | None
    eval_loss: float | None  # mean NLL over the eval rows' trained tokens; None without eval_rows
    trained_tokens: int  # tokens with a label over all steps (padding never counts)
    wall_seconds: float
    learning_rate: float
    effective_batch_size: int
    loss_reduction: str = "sum"
    padding_free: bool = False
    method: str = "full"
    objective: list[tuple[int, float]] = field(default_factory=list)  # the logged loss (summed for "sum")
    data_report: SFTDataReport | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["output_dir"] = str(self.output_dir)
        out["data_report"] = self.data_report.to_dict() if self.data_report else None
        return out


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

    Defaults: the tokenizer and model are loaded from ``parent`` when given (a kit checkpoint folder, or
    a Hub id), else from ``plan.model``; the rows are ``load_rows(recipe.dataset)`` from the profile's
    data (fixtures in the smoke profile), at most ``plan.max_train_samples``. A kit checkpoint ``parent``
    must have been trained with the same tokenizer and chat template (:func:`check_parent`), and the
    chat-template doctor must pass, before anything trains. With ``plan.peft == "auto"`` on a GPU the
    memory planner picks full fine-tuning, LoRA or QLoRA (``smoltulu_utils.memory``); ``peft_config``
    asks for LoRA, ``quantization_config`` with it for QLoRA (the stage loads the 4-bit model). Full
    fine-tuning trains float32 weights, whatever the checkpoint's dtype; a LoRA or QLoRA run saves the
    adapter merged into float32 base weights, a plain model the next stage loads as any checkpoint
    (:func:`~smoltulu_utils.training.save_trained_model`). A tokenizer without a chat template (a base
    model's) gets the kit's (:func:`~smoltulu_utils.models.adapt_tokenizer`), recorded in the manifest's
    ``extra["tokenizer_adapted"]``. Bad rows are skipped and reported (``result.data_report``), never
    fatal; a run with no usable row raises :class:`SFTError`.
    """
    from .data import load_rows
    from .models import adapt_tokenizer, load_model, load_tokenizer, match_model_to_tokenizer
    from .profiles import data_mirror

    recipe = plan.recipe
    if not isinstance(recipe, SFTRecipe):
        raise SFTError(
            f"train_sft needs a plan for an SFT recipe, got stage {recipe.stage!r} ({recipe.name})"
        )
    check_world_size(plan)
    output_dir = Path(output_dir)
    source = str(parent) if parent is not None else plan.model
    folder = Path(source).expanduser()
    is_checkpoint = folder.is_dir() and (folder / MANIFEST_NAME).is_file()
    adapted: list[str] = []
    if tokenizer is None:
        tokenizer = load_tokenizer(source)
        adapted = adapt_tokenizer(tokenizer)  # a base model's tokenizer gets the kit's chat template
    if folder.is_dir() and (parent is not None or is_checkpoint):
        check_parent(folder, tokenizer)  # a parent folder must be a kit checkpoint with our template
    doctor(tokenizer).raise_for_problems()

    chosen = training_method(
        plan, peft_config, model_given=model is not None, quantization_config=quantization_config
    )
    method, notes = chosen.method, list(chosen.notes)
    if model is None:
        model = load_model(source, **stage_load_kwargs(chosen, source))
    if method == "full" and (cast := full_precision(model)):
        notes.append(cast)
    if adapted:
        adapted += match_model_to_tokenizer(model, tokenizer)
        notes.append("tokenizer adapted: " + "; ".join(adapted))

    given = rows is not None
    if rows is None:
        rows = load_rows(
            recipe.dataset, mirror=data_mirror(plan.profile), limit=plan.max_train_samples, validate=False
        )
    train_dataset, report = prepare_sft_rows(rows, tokenizer, plan.max_length)
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
        peft_config=chosen.peft_config,
        max_grad_norm=max_grad_norm,
    )
    main = trainer.is_world_process_zero()
    if verbose and main:
        print(
            f"SFT {recipe.name}: {report.describe().splitlines()[0]}\n"
            f"  {method} fine-tuning, loss {recipe.loss_reduction} over tokens, "
            f"{'padding-free' if padding_free else 'padded'} batches, effective batch "
            f"{plan.effective_batch_size} = {plan.per_device_batch_size} x {plan.gradient_accumulation_steps} x "
            f"{plan.num_processes}, LR {plan.learning_rate:g}, "
            f"{plan.max_steps or recipe.num_epochs} {'steps' if plan.max_steps else 'epochs'}"
        )
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start

    eval_loss = None
    if eval_dataset is not None:
        metrics = trainer.evaluate()
        eval_loss = metrics.get("eval_loss_per_token", metrics.get("eval_loss"))

    restore_attention(model, trainer.attention_before)  # the trained model leaves as it came
    trainer.attention_before = None
    history = trainer.state.log_history
    train_loss = log_history(history, "loss_per_token")
    final = train_loss[-1][1] if train_loss else None
    result = SFTResult(
        output_dir=output_dir,
        steps=int(trainer.state.global_step),
        train_loss=train_loss,
        final_train_loss=final,
        eval_loss=eval_loss,
        trained_tokens=int(trainer.trained_tokens),
        wall_seconds=wall,
        learning_rate=plan.learning_rate,
        effective_batch_size=plan.effective_batch_size,
        loss_reduction=recipe.loss_reduction,
        padding_free=padding_free,
        method=method,
        objective=log_history(history, "loss"),
        data_report=report,
        notes=notes,
    )
    if final is not None and not math.isfinite(final):
        notes.append(f"the final training loss is {final}: lower the learning rate")

    def reload_base():  # QLoRA: the base in full precision, to merge the adapter into
        base = load_model(source, dtype="float32")
        if adapted:
            match_model_to_tokenizer(base, tokenizer)
        return base

    saved = save_trained_model(trainer, output_dir, chosen, reload_base=reload_base)
    if main:
        tokenizer.save_pretrained(output_dir)
        write_manifest(
            output_dir,
            stage="sft",
            recipe=recipe,
            data=[data_entry(plan, report, given, "train_sft")],
            tokenizer=tokenizer,
            seed=recipe.seed,
            parent=source if is_checkpoint or not folder.is_dir() else None,
            extra={
                "started_from": source,
                "plan": plan.to_dict(),
                "method": method,
                "merged": saved["merged"],
                "weights_dtype": saved["dtype"],
                "tokenizer_adapted": adapted,
                "loss_reduction": recipe.loss_reduction,
                "padding_free": padding_free,
                "max_grad_norm": trainer.args.max_grad_norm,
                "steps": result.steps,
                "final_train_loss": final,
                "eval_loss": eval_loss,
                "trained_tokens": result.trained_tokens,
                "wall_seconds": wall,
                "data_report": report.to_dict(),
                "notes": notes,
            },
        )
    if verbose and main:
        first = train_loss[0][1] if train_loss else float("nan")
        print(
            f"  done: {result.steps} steps in {wall:.1f} s, loss per token {first:.3f} -> "
            f"{final if final is not None else float('nan'):.3f}, {result.trained_tokens} tokens trained"
            + (f", eval loss {eval_loss:.3f}" if eval_loss is not None else "")
            + f"; saved to {output_dir}"
        )
    return result
