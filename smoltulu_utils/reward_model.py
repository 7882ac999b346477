"""The reward-model stage: a one-output sequence classifier trained with TRL's ``RewardTrainer``.

::

    plan = resolve("rm_1130", profile="auto")
    result = train_rm(plan, "runs/rm_1130")            # model, tokenizer and rows follow the plan
    result.final_train_loss, result.eval_accuracy       # Bradley-Terry loss, held-out pair accuracy

The model (:func:`load_reward_model`) is the start checkpoint with a score head, reading one hidden state
per conversation, at its last real token. It trains on pairs with TRL's Bradley-Terry loss
``-log sigmoid(r(chosen) - r(rejected))`` (mean over a batch's pairs); a pair is correct when
``r(chosen) > r(rejected)``, a tie counting as wrong, as in RewardBench. Evaluation for Table 8 is in
:mod:`smoltulu_utils.rm_evaluation`.

Written by hand: **which token is scored.** transformers' sequence-classification head scores the
rightmost token that is not the pad id, and SmolLM2 pads with its eos ``<|im_end|>``, so any sequence
that ends on eos is scored one token early. The kit trains with a pad id distinct from eos
(:func:`score_pad_token_id`; ``<|endoftext|>`` for SmolLM2), checks in every step that the head reads the
last attended token (:class:`KitRewardTrainer`), and scores evaluation batches at the attention mask's
last position (:func:`reward_scores`), whatever the checkpoint's pad id. Also by hand: every pair's two
scores (:func:`score_preferences`) and the run's bookkeeping.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from trl import RewardTrainer

from .errors import KitError
from .preferences import PreferenceDataReport, chat_ids, prepare_preference_rows
from .recipes import RMRecipe
from .training import StageResult, describe_batch, log_history, start_stage, trainer_settings, training_method

if TYPE_CHECKING:  # pragma: no cover
    import datasets
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from trl import RewardConfig

    from .profiles import Plan

#: Evaluation batch size (pairs are scored as 2 x this many sequences, longest first).
EVAL_BATCH_SIZE = 8
#: Tokens a scored conversation keeps (kit choice: the recipes' max_length; longer ones are cut and counted).
EVAL_MAX_LENGTH = 2048


class RMError(KitError, ValueError):
    """A reward-model run or evaluation that cannot go on; the message says why and how to fix it."""


# ======================================================================================================
# Which token is scored
# ======================================================================================================
def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the position of the last attended token (the last 1 of the mask); left or right padding."""
    mask = attention_mask.to(torch.long)
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (positions * mask).argmax(-1)


def head_token_index(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Per row, the position transformers' sequence-classification head scores: the rightmost non-pad id.

    The same expression as ``GenericForSequenceClassification.forward`` (transformers 5.x). With
    ``pad == eos`` a row that ends with eos is scored before its last real token.
    """
    non_pad = (input_ids != pad_token_id).to(torch.long)
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (positions * non_pad).argmax(-1)


#: Tokens the kit may pad reward-model batches with when the tokenizer's pad is its eos, in order.
_PAD_CANDIDATES = ("unk_token", "<|endoftext|>", "<|finetune_right_pad_id|>", "<pad>", "[PAD]")


def score_pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """A pad id for reward-model batches that is not eos (so the head finds the last real token).

    The tokenizer's own pad when it differs from eos; otherwise its unk token, or another special token
    of the vocabulary that the chat template does not render (``<|endoftext|>`` for SmolLM2, id 0).
    Raises :class:`RMError` when there is none; then add a pad token to the tokenizer and resize the
    model's embeddings.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if pad is not None and pad != eos:
        return int(pad)
    avoid = {eos, tokenizer.bos_token_id}
    vocab = tokenizer.get_vocab()
    for candidate in _PAD_CANDIDATES:
        token = getattr(tokenizer, candidate, None) if candidate.endswith("_token") else candidate
        token_id = vocab.get(token) if isinstance(token, str) else None
        if token_id is not None and token_id not in avoid:
            return int(token_id)
    raise RMError(
        f"the tokenizer pads with its eos token {tokenizer.eos_token!r} and has no other special token to "
        "pad reward-model batches with, so the score head could not find the last real token. Fix: "
        "tokenizer.add_special_tokens({'pad_token': '<|pad|>'}) and model.resize_token_embeddings(len(tokenizer))."
    )


def _score_head(model: torch.nn.Module) -> torch.nn.Module:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model
    head = getattr(base, "score", None)
    if not isinstance(head, torch.nn.Module):
        raise RMError(
            f"{type(base).__name__} has no 'score' head: load the reward model with "
            "load_reward_model(...) (AutoModelForSequenceClassification with num_labels=1)."
        )
    return head


def reward_scores(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """One score per row, read at the last attended token (the attention mask's last 1), shape ``[B]``.

    The model runs as it is (its own forward, attention and head); the head's output at every position
    is caught on the way out and read at :func:`last_token_index`, so the result does not depend on the
    pad id, and equals the score of the unpadded conversation at its last real token.
    """
    caught: list[torch.Tensor] = []
    handle = _score_head(model).register_forward_hook(lambda _m, _args, out: caught.append(out))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        handle.remove()
    per_position = caught[-1]  # [B, T, num_labels]
    index = last_token_index(attention_mask).to(per_position.device)
    return per_position[torch.arange(per_position.shape[0], device=per_position.device), index, 0]


# ======================================================================================================
# The model
# ======================================================================================================
def _head_from_causal_lm(causal_lm: PreTrainedModel, seed: int) -> PreTrainedModel:
    """A one-output sequence classifier with the causal LM's backbone and a fresh score head."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(causal_lm.config)
    config.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(config)
    prefix = model.base_model_prefix
    getattr(model, prefix).load_state_dict(getattr(causal_lm, prefix).state_dict(), strict=True)
    return model.to(dtype=next(causal_lm.parameters()).dtype)


def load_reward_model(
    source: str | Path | PreTrainedModel, *, seed: int = 42, dtype: Any = None, **load_kwargs: Any
) -> PreTrainedModel:
    """A reward model (one-output sequence classifier) from ``"bundled"``, ``"tiny"``, a folder or a Hub id.

    A causal-LM checkpoint (the DPO model the RM starts from) gets a new score head, initialised from
    ``seed`` (transformers' normal(0, initializer_range)); a reward-model checkpoint (a kit RM run, the
    SmolTulu RM) keeps its head. A model object is converted the same way (a causal LM gets a head).
    """
    from transformers import set_seed

    from .models import ensure_bundled_cache, load_model, tiny_model

    if not isinstance(source, str | Path):
        model = source
    elif str(source) == "tiny":
        model = tiny_model(dtype=dtype, **load_kwargs)[0]
    else:
        from trl.trainer.reward_trainer import suppress_seqcls_warning

        path = ensure_bundled_cache() if str(source) == "bundled" else source
        set_seed(seed)  # the new score head's initialisation
        with suppress_seqcls_warning():
            model = load_model(str(path), head="reward", dtype=dtype, **load_kwargs)
    if getattr(model.config, "num_labels", None) == 1 and hasattr(model, "score"):
        return model
    if not hasattr(model, getattr(model, "base_model_prefix", None) or "-"):
        raise RMError(f"cannot make a reward model from {type(model).__name__}: it has no backbone to reuse")
    return _head_from_causal_lm(model, seed)


# ======================================================================================================
# Scoring conversations and preference pairs
# ======================================================================================================
@torch.no_grad()
def score_conversations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[list[dict]],
    *,
    batch_size: int = EVAL_BATCH_SIZE,
    max_length: int | None = EVAL_MAX_LENGTH,
) -> tuple[list[float], int]:
    """Scores of whole conversations, read at each one's last real token: ``(scores, n_truncated)``.

    Each conversation is rendered with the chat template (as TRL renders it for training), cut to
    ``max_length`` tokens (counted in ``n_truncated``), batched longest first with right padding, and
    scored with :func:`reward_scores`. The model is put in eval mode and left so; a model config
    without a pad id gets the kit's (the head refuses batches otherwise; it does not change the scores).
    """
    if batch_size < 1:
        raise RMError(f"batch_size must be at least 1, got {batch_size}")
    model.eval()
    device = next(model.parameters()).device
    pad = score_pad_token_id(tokenizer)
    if getattr(model.config, "pad_token_id", None) is None:  # the head refuses batches without one
        model.config.pad_token_id = pad
    encoded = [chat_ids(tokenizer, c) for c in conversations]
    truncated = sum(max_length is not None and len(ids) > max_length for ids in encoded)
    if max_length is not None:
        encoded = [ids[:max_length] for ids in encoded]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    scores = [0.0] * len(encoded)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids[row, : len(encoded[i])] = torch.tensor(encoded[i])
            mask[row, : len(encoded[i])] = 1
        values = reward_scores(model, ids.to(device), mask.to(device)).float().cpu().tolist()
        for i, value in zip(batch, values, strict=True):
            scores[i] = float(value)
    return scores, truncated


@dataclass
class PreferenceScores:
    """Both scores of every usable pair; ``accuracy`` is the share with ``chosen > rejected`` (ties wrong)."""

    chosen: list[float]
    rejected: list[float]
    report: PreferenceDataReport
    n_truncated: int = 0  # conversations cut to max_length before scoring
    groups: list[str] | None = None  # per pair (e.g. its RewardBench subset), when the rows carry one

    @property
    def n(self) -> int:
        return len(self.chosen)

    @property
    def correct(self) -> list[bool]:
        return [c > r for c, r in zip(self.chosen, self.rejected, strict=True)]

    @property
    def accuracy(self) -> float:
        """Share of pairs whose chosen reply scores strictly higher (0 to 1)."""
        return sum(self.correct) / self.n if self.n else float("nan")

    @property
    def loss(self) -> float:
        """Mean Bradley-Terry loss ``-log sigmoid(r(chosen) - r(rejected))`` over the pairs."""
        diffs = torch.tensor([c - r for c, r in zip(self.chosen, self.rejected, strict=True)])
        return float(-torch.nn.functional.logsigmoid(diffs).mean()) if self.n else float("nan")

    def by_group(self) -> dict[str, float]:
        """Accuracy per group (e.g. RewardBench subset), in first-seen order."""
        if self.groups is None:
            return {}
        totals: dict[str, list[int]] = {}
        for group, ok in zip(self.groups, self.correct, strict=True):
            totals.setdefault(group, [0, 0])
            totals[group][0] += ok
            totals[group][1] += 1
        return {g: right / count for g, (right, count) in totals.items()}


def score_preferences(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Iterable[Mapping],
    *,
    group_field: str | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
    max_length: int | None = EVAL_MAX_LENGTH,
) -> PreferenceScores:
    """Score both sides of every preference row; bad rows are skipped and reported (``report``).

    Rows of any layout :func:`~smoltulu_utils.preferences.prepare_preference_rows` reads. Long
    conversations are cut to ``max_length`` (and counted), not dropped, so every usable pair is scored.
    ``group_field`` names a row field to group accuracy by (``"subset"`` for RewardBench).
    """
    rows = list(rows)
    dataset, report = prepare_preference_rows(rows, tokenizer, max_length, drop_too_long=False)
    conversations = [p + c for p, c in zip(dataset["prompt"], dataset["chosen"], strict=True)]
    conversations += [p + r for p, r in zip(dataset["prompt"], dataset["rejected"], strict=True)]
    scores, truncated = score_conversations(
        model, tokenizer, conversations, batch_size=batch_size, max_length=max_length
    )
    n = len(dataset)
    groups = [str(rows[i].get(group_field)) for i in report.kept_indices] if group_field else None
    return PreferenceScores(scores[:n], scores[n:], report, truncated, groups)


# ======================================================================================================
# The trainer
# ======================================================================================================
class KitRewardTrainer(RewardTrainer):
    """TRL's ``RewardTrainer`` that checks, every step, that each sequence is scored at its last real token.

    Give it a tokenizer whose pad differs from eos (:func:`build_rm_trainer` does); TRL then pads with
    that id and sets the model's ``pad_token_id`` to it, and transformers' head reads the rightmost
    non-pad token. :meth:`compute_loss` compares that position with the attention mask's last 1 and
    raises :class:`RMError` on any difference (a conversation whose last token is the pad id).
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pad = self.model.config.get_text_config().pad_token_id
        head = head_token_index(inputs["input_ids"], pad)
        wanted = last_token_index(inputs["attention_mask"])
        if not torch.equal(head, wanted):
            rows = (head != wanted).nonzero().flatten().tolist()
            raise RMError(
                f"the score head would read rows {rows} of this batch at the wrong token (pad id {pad} "
                "ends those sequences). Fix: pad with a token that never ends a conversation "
                "(score_pad_token_id) or score with reward_scores()."
            )
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def rm_config(
    plan: Plan, output_dir: str | Path, *, max_grad_norm: float | None = None, **overrides: Any
) -> RewardConfig:
    """TRL's ``RewardConfig`` for a plan: batch, accumulation, LR, schedule, epochs or steps, precision.

    The effective batch counts preference pairs (each pair is two sequences). ``max_length`` is the
    plan's (the kit drops longer pairs before, and reports them). Logs every step, no intermediate
    checkpoints, no evaluation inside the loop (the stage scores its eval rows itself, before and after).
    ``max_grad_norm`` None is the recipe's (1.0, as Tulu 3).
    """
    from trl import RewardConfig

    settings = trainer_settings(plan, output_dir, max_grad_norm=max_grad_norm)
    settings["max_length"] = plan.max_length
    settings.update(overrides)
    return RewardConfig(**settings)


def build_rm_trainer(
    plan: Plan,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: datasets.Dataset,
    output_dir: str | Path,
    *,
    callbacks: list | None = None,
    peft_config: Any = None,
    max_grad_norm: float | None = None,
    **config_overrides: Any,
) -> KitRewardTrainer:
    """A :class:`KitRewardTrainer` for a plan and a dataset made by ``prepare_preference_rows``.

    The trainer gets a copy of ``tokenizer`` whose pad is :func:`score_pad_token_id` (``tokenizer``
    itself is left as it is, so the saved checkpoint keeps its parent's tokenizer and fingerprint).
    """
    train_tokenizer = copy.deepcopy(tokenizer)
    pad_id = score_pad_token_id(tokenizer)
    train_tokenizer.pad_token = train_tokenizer.convert_ids_to_tokens(pad_id)
    config = rm_config(plan, output_dir, max_grad_norm=max_grad_norm, **config_overrides)
    return KitRewardTrainer(
        model=model,
        args=config,
        train_dataset=train_dataset,
        processing_class=train_tokenizer,
        callbacks=callbacks,
        peft_config=peft_config,
    )


# ======================================================================================================
# The stage
# ======================================================================================================
@dataclass
class RMResult(StageResult):
    """What one reward-model run did. Accuracies are shares of held-out pairs (0 to 1), losses Bradley-Terry."""

    eval_loss: float | None = None  # mean Bradley-Terry loss on the eval rows after training
    eval_accuracy: float | None = None  # share of eval pairs with r(chosen) > r(rejected), after training
    eval_accuracy_before: float | None = None  # the same before training (the fresh head)
    trained_tokens: int = 0  # tokens of chosen and rejected sequences seen in training (never padding)
    train_accuracy: list[tuple[int, float]] = field(default_factory=list)  # TRL's batch accuracy per step
    eval_scores: PreferenceScores | None = None
    manifest: dict[str, Any] | None = None

    @property
    def tokens_seen(self) -> int:
        """Same as ``trained_tokens`` (the sweep's name)."""
        return self.trained_tokens

    def training_curves(self) -> dict[str, list[tuple[int, float]]]:
        return {"train_loss": self.train_loss, "train_accuracy": self.train_accuracy}

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("eval_scores")
        return out


def _method(plan: Plan, peft_config: Any, model_given: bool, quantization_config: Any = None):
    """:func:`~smoltulu_utils.training.training_method`, with LoRA adapters for a score head (the head
    itself trains in full and is saved with the adapters)."""
    chosen = training_method(plan, peft_config, model_given, quantization_config)
    if peft_config is None and chosen.method in ("lora", "qlora"):
        from .memory import lora_config

        chosen.peft_config = lora_config(task_type="SEQ_CLS", modules_to_save=["score"])
    return chosen


def train_rm(
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
    eval_before: bool = True,
    verbose: bool = True,
    quantization_config: Any = None,
) -> RMResult:
    """Train the reward model of ``plan`` and save model, tokenizer and ``manifest.json`` in ``output_dir``.

    The stage skeleton (:func:`~smoltulu_utils.training.start_stage`) loads the tokenizer and model from
    ``parent`` (a kit checkpoint folder, e.g. the DPO run, checked against the tokenizer, or a Hub id) or
    ``plan.model``, as :func:`~smoltulu_utils.sft.train_sft` does; a causal LM, loaded or passed in, gets
    a fresh score head seeded by the recipe (:func:`load_reward_model`), and a reward model passed in
    trains in place. Bad pairs are skipped and reported (``result.data_report``); no usable pair raises
    :class:`~smoltulu_utils.preferences.PreferenceDataError`. With ``eval_rows`` the held-out pairs are
    scored before (``eval_before``) and after training. LoRA/QLoRA adapters are merged with the trained
    score head into the saved model, so the PPO value model starts from a plain checkpoint.
    """
    recipe = plan.recipe
    run = start_stage(
        plan, RMRecipe, output_dir, caller="train_rm", error=RMError, tokenizer=tokenizer, parent=parent
    )
    tokenizer, output_dir, notes = run.tokenizer, run.output_dir, run.notes
    chosen = _method(plan, peft_config, model is not None, quantization_config)
    if model is not None:
        model = load_reward_model(model, seed=recipe.seed)
    model = run.load_model(model, chosen=chosen, load=functools.partial(load_reward_model, seed=recipe.seed))
    train_dataset, report = prepare_preference_rows(run.rows(rows), tokenizer, plan.max_length)
    eval_list = list(eval_rows) if eval_rows is not None else None
    accuracy_before = None
    if eval_list is not None and eval_before:
        accuracy_before = score_preferences(model, tokenizer, eval_list, max_length=plan.max_length).accuracy
        model.train()

    trainer = build_rm_trainer(
        plan,
        model,
        tokenizer,
        train_dataset,
        output_dir,
        callbacks=callbacks,
        peft_config=chosen.peft_config,
        max_grad_norm=max_grad_norm,
    )
    main = trainer.is_world_process_zero()
    pad_id = trainer.processing_class.pad_token_id
    notes.append(
        f"scored at the last real token: batches padded with {trainer.processing_class.pad_token!r} "
        f"(id {pad_id}), eos is {tokenizer.eos_token!r} (id {tokenizer.eos_token_id})"
    )
    if verbose and main:
        print(
            f"RM {recipe.name}: {report.describe().splitlines()[0]}\n"
            f"  {chosen.method} fine-tuning, Bradley-Terry loss, {describe_batch(plan)} pairs, "
            f"LR {plan.learning_rate:g}, {plan.max_steps or recipe.num_epochs} "
            f"{'steps' if plan.max_steps else 'epochs'}"
        )
    wall = run.train(trainer)
    trained = trainer.model
    # The checkpoint keeps its parent's tokenizer and pad id; the kit scores by attention mask.
    trained.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    eval_scores = None
    if eval_list is not None:
        eval_scores = score_preferences(trained, tokenizer, eval_list, max_length=plan.max_length)
    tokens = log_history(trainer.state.log_history, "num_tokens")
    result = run.result(
        RMResult,
        trainer,
        "loss",
        wall,
        report,
        eval_loss=eval_scores.loss if eval_scores else None,
        eval_accuracy=eval_scores.accuracy if eval_scores else None,
        eval_accuracy_before=accuracy_before,
        trained_tokens=int(tokens[-1][1]) if tokens else int(getattr(trainer, "_total_train_tokens", 0)),
        train_accuracy=log_history(trainer.state.log_history, "accuracy"),
        eval_scores=eval_scores,
    )
    extra = {
        "loss": "bradley_terry_mean",
        "score_position": "last real token (attention mask); training pad id "
        f"{pad_id}, distinct from eos {tokenizer.eos_token_id}",
        "max_grad_norm": trainer.args.max_grad_norm,
        "eval_loss": result.eval_loss,
        "eval_accuracy": result.eval_accuracy,
        "eval_accuracy_before": accuracy_before,
        "trained_tokens": result.trained_tokens,
    }
    result.manifest = run.finish("rm", result, extra, trainer=trainer)
    if verbose and main:
        first = result.train_loss[0][1] if result.train_loss else float("nan")
        final = result.final_train_loss
        accuracy = (
            f", eval accuracy {accuracy_before if accuracy_before is not None else float('nan'):.3f} -> "
            f"{result.eval_accuracy:.3f}"
            if result.eval_accuracy is not None
            else ""
        )
        print(
            f"  done: {result.steps} steps in {wall:.1f} s, loss {first:.3f} -> "
            f"{final if final is not None else float('nan'):.3f}, {result.trained_tokens} tokens seen"
            f"{accuracy}; saved to {output_dir}"
        )
    return result
