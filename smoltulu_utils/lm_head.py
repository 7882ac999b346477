"""The plain LM head behind TRL's fused-head interface, for training on a CPU.

TRL's SFT and DPO trainers call ``model(..., labels=..., fused_lm_head=True)`` and read per-token
log-probs from a kernel that projects through the LM head in tiles. That saves GPU memory but runs
several times slower on a CPU than one matmul and one log-softmax (about 5 s of a 20 s step of the 135M
model). No library offers the switch, so :func:`use_plain_lm_head` is written by hand: it answers
``fused_lm_head=True`` from plain logits of the labelled positions only, with the same fields and values
as TRL's kernel (``tests/test_lm_head.py``), and leaves every other call to TRL's forward.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from trl.trainer.utils import FusedCausalLMOutput

from .chat_template import IGNORE_INDEX


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
    """Whether the logits are the LM head on the backbone's last hidden state and nothing more (not for a
    model that scales or soft-caps them, which keeps its full forward)."""
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
