"""The plain LM head behind TRL's fused-head interface, for training on a CPU.

TRL's trainers (SFT, DPO) call ``model(..., labels=..., fused_lm_head=True)`` and read per-token
log-probabilities (and entropy, top-1 hits, mean logits) from a kernel that projects the hidden states
through the LM head in tiles, so the ``(tokens x vocabulary)`` logits never exist at once. On a GPU
that saves gigabytes. On a CPU the tiles run several times slower than one matmul and one
log-softmax (measured in the SFT profile: about 5 s of a 20 s step of the 135M model on 2 000 tokens,
against well under 1 s for the plain head), and the logits of a CPU-sized batch fit in memory. No
library offers the switch, so this module is written by hand: :func:`use_plain_lm_head` gives a model
a forward that answers ``fused_lm_head=True`` from the full logits, with the same fields and the
same values as TRL's kernel (checked in ``tests/test_lm_head.py``), and leaves every other call
(generation, evaluation) to the forward TRL installed. Like TRL's kernel on a GPU, it projects only the
positions that carry a label (the prompt tokens of an SFT batch and the prompts and padding of a DPO
batch need no logits), which also takes part of the LM head's FLOPs off every step.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from trl.trainer.utils import FusedCausalLMOutput

IGNORE_INDEX = -100


def plain_head_outputs(
    logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: Any = None
) -> FusedCausalLMOutput:
    """TRL's fused-head fields from already shifted ``logits`` (B, T, V) and ``labels`` (B, T).

    Every per-token field is zero where the label is ``-100``; ``loss`` is the summed NLL over
    ``num_items_in_batch`` (the count of labels when None), as TRL's kernel returns it.
    """
    logits = logits.float()
    mask = labels != IGNORE_INDEX
    log_softmax = torch.log_softmax(logits, dim=-1)
    log_probs = log_softmax.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    with torch.no_grad():
        entropy = -(log_softmax.exp() * log_softmax).sum(-1) * mask
        mean_logits = logits.mean(-1) * mask
        is_top1 = (logits.argmax(-1) == labels) & mask
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedCausalLMOutput(
        loss=-log_probs.sum() / count,
        log_probs=log_probs,
        entropy=entropy,
        mean_logits=mean_logits,
        is_top1=is_top1,
        label_mask=mask,
    )


def use_plain_lm_head(model: Any) -> bool:
    """Answer ``fused_lm_head=True`` calls of ``model`` with the plain head; returns whether it switched.

    Call it after the TRL trainer is built (TRL installs its own forward then). A PEFT model, or one
    without TRL's fused forward, is left unchanged.
    """
    fused = model.__dict__.get("forward")  # TRL's forward, set on the instance
    if fused is None or getattr(fused, "_kit_plain_head", False) or hasattr(model, "peft_config"):
        return False
    original = type(model).forward
    compact = _plain_projection(model)

    @functools.wraps(original)
    def forward(
        *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs
    ):
        if not fused_lm_head:
            return fused(*args, labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch,
                         **kwargs)  # fmt: skip
        kwargs["use_cache"] = False
        if not compact:  # logits of every position from the model's own forward
            logits = original(model, *args, **kwargs).logits
            if shift_labels is None:
                logits, shift_labels = logits[:, :-1], labels[:, 1:]
            return plain_head_outputs(logits, shift_labels, num_items_in_batch)
        hidden = model.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, shift_labels = hidden[:, :-1], labels[:, 1:]
        mask = shift_labels != IGNORE_INDEX  # project only the positions that have a label
        logits = model.get_output_embeddings()(hidden[mask]).unsqueeze(0)
        return _scatter(plain_head_outputs(logits, shift_labels[mask].unsqueeze(0), num_items_in_batch), mask)

    forward._kit_plain_head = True
    model.forward = forward
    return True


def _plain_projection(model: Any) -> bool:
    """Whether the logits are the LM head applied to the backbone's last hidden state, and nothing more.

    True for Llama-style models (SmolLM2); a model that scales or soft-caps its logits keeps the full
    forward, which applies those steps itself.
    """
    config = model.config.get_text_config()
    keys = (
        "final_logit_softcapping",
        "logit_scale",
        "output_multiplier",
        "lm_head_multiplier",
        "logits_scaling",
    )
    scaled = any(getattr(config, k, None) not in (None, 1.0) for k in keys)
    backbone = getattr(model, "base_model", model)
    return not scaled and backbone is not model and model.get_output_embeddings() is not None


def _scatter(picked: FusedCausalLMOutput, mask: torch.Tensor) -> FusedCausalLMOutput:
    """Per-token fields of the labelled positions put back in the ``(batch, length)`` layout, zero elsewhere."""
    out = {"loss": picked.loss, "label_mask": mask}
    for name in ("log_probs", "entropy", "mean_logits", "is_top1"):
        values = getattr(picked, name)[0]
        out[name] = values.new_zeros(mask.shape).masked_scatter(mask, values)
    return FusedCausalLMOutput(**out)
