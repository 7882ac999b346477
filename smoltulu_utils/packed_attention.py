"""Attention for padding-free rows that costs what the examples cost, not what the whole row costs.

In a padding-free row (examples end to end, ``position_ids`` restarting at 0) transformers' block-diagonal
mask still makes sdpa score every pair of positions in the row, with its slowest kernel. Nothing in torch
or transformers runs variable-length attention on a CPU, so this module registers ``"sdpa_packed"``: causal
sdpa on each example, transformers' sdpa for anything else; the result equals the block-diagonal sdpa.

::

    use_packed_attention(model)      # while training on padding-free batches
    restore_attention(model, "sdpa")  # before saving, so the checkpoint loads anywhere
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_packed"


def sequence_starts(position_ids: torch.Tensor) -> list[int]:
    """Where each example of a one-row padding-free batch begins, plus the row's length at the end."""
    row = position_ids.reshape(-1)
    starts = (row == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return [*starts, row.numel()]


def _packed_row(query: torch.Tensor, key: torch.Tensor, attention_mask: Any, kwargs: dict) -> bool:
    position_ids = kwargs.get("position_ids")
    return (
        position_ids is not None
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2] == position_ids.shape[-1]
        and kwargs.get("past_key_values") is None
        and (attention_mask is None or attention_mask.dim() == 4)  # a 2D mask means padded rows
    )


def packed_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal sdpa on each example of a padding-free row; transformers' sdpa for every other input.

    Shapes follow transformers' attention interface: query ``(1, heads, L, d)``, key and value
    ``(1, kv_heads, L, d)``; returns ``(1, L, heads, d)``.
    """
    if not _packed_row(query, key, attention_mask, kwargs):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    dropout = dropout if module.training else 0.0
    bounds = sequence_starts(kwargs["position_ids"])
    pieces = [
        F.scaled_dot_product_attention(
            query[:, :, a:b],
            key[:, :, a:b],
            value[:, :, a:b],
            dropout_p=dropout,
            is_causal=True,
            scale=scaling,
        )
        for a, b in zip(bounds[:-1], bounds[1:], strict=False)
        if b > a
    ]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make ``"sdpa_packed"`` a known attention implementation (idempotent); returns its name."""
    AttentionInterface.register(NAME, packed_sdpa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # the fallback needs sdpa's own masks
    return NAME


def use_packed_attention(model: Any) -> str | None:
    """Switch an sdpa model to ``"sdpa_packed"``; returns the implementation it had (None: unchanged).

    FlashAttention already runs each example apart, and eager is what one asks for to inspect weights.
    """
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if before != "sdpa":
        return None
    register()
    model.set_attn_implementation(NAME)
    return before


def restore_attention(model: Any, implementation: str | None) -> None:
    """Put back the attention implementation :func:`use_packed_attention` replaced (None: nothing)."""
    if implementation is not None:
        model.set_attn_implementation(implementation)
