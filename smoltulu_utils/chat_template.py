"""The chat-template doctor every training stage runs, and the SFT assistant mask the stages share.

Tulu 3-style SFT trains the content of every assistant turn and the end-of-turn token closing it.
transformers returns such a mask only for templates with ``{% generation %}`` markers, which SmolLM2's
lacks, so the mask is computed here by rendering prefixes of the conversation with the tokenizer's own
template. :func:`doctor` checks what silently breaks training: no template, a double BOS, an untrained
end-of-turn token, and padding that masks EOS (SmolLM2 ships pad == eos).
"""

from __future__ import annotations

import hashlib
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import KitError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100

#: The conversation :func:`doctor` renders when none is given: system, then two user/assistant exchanges.
SAMPLE_CONVERSATION: list[dict[str, str]] = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome is the capital of Italy."},
]


class ChatTemplateError(KitError, ValueError):
    """A tokenizer or chat template that would train the wrong tokens; the message says how to fix it."""


def _name(tokenizer: PreTrainedTokenizerBase) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def _require_template(tokenizer: PreTrainedTokenizerBase) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"The tokenizer '{_name(tokenizer)}' ({type(tokenizer).__name__}) has no chat template, so a "
            "conversation cannot be rendered for training. Fixes: load the -Instruct tokenizer of the "
            "model family (e.g. load_tokenizer('bundled') or 'HuggingFaceTB/SmolLM2-1.7B-Instruct'), or give "
            "it the kit's template and special tokens with smoltulu_utils.models.adapt_tokenizer(tokenizer) "
            "(the stages do this for a tokenizer they load), or set only the template: "
            "tokenizer.chat_template = smoltulu_utils.models.SMOLLM2_CHAT_TEMPLATE."
        )


def _render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation_prompt
    )


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # The template renders its own special tokens (BOS included), as apply_chat_template(tokenize=True) does.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _end_of_turn_id(tokenizer: PreTrainedTokenizerBase, end_of_turn: str | None) -> int | None:
    token = end_of_turn or tokenizer.eos_token
    if token is None:
        return None
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int) or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None  # not in the vocabulary
    return token_id


def _check_prefix(full: list[int], prefix: list[int], tokenizer, what: str) -> None:
    if full[: len(prefix)] == prefix:
        return
    at = next(
        (i for i, (a, b) in enumerate(zip(full, prefix, strict=False)) if a != b), min(len(full), len(prefix))
    )
    raise ChatTemplateError(
        f"The chat template of '{_name(tokenizer)}' does not tokenize consistently: the conversation "
        f"rendered {what} is not a token prefix of the whole conversation: at token {at} the prefix has "
        f"{tokenizer.convert_ids_to_tokens(prefix[at : at + 3])} where the whole has "
        f"{tokenizer.convert_ids_to_tokens(full[at : at + 3])}. "
        "Usually a message starts or ends with whitespace that merges with the template's text; strip the "
        "message contents, or fix the template so each turn ends at a token boundary."
    )


def assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict], end_of_turn: str | None = None
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of the rendered conversation and, per assistant turn, the ``[start, stop)`` span it trains:
    from after the header through the turn's last end-of-turn token (default eos), else to the next turn."""
    _require_template(tokenizer)
    messages = list(messages)
    ids = _encode(tokenizer, _render(tokenizer, messages, generation_prompt=False))
    eot_id = _end_of_turn_id(tokenizer, end_of_turn)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = _encode(tokenizer, _render(tokenizer, messages[:i], generation_prompt=True))
        through = _encode(tokenizer, _render(tokenizer, messages[: i + 1], generation_prompt=False))
        _check_prefix(ids, before, tokenizer, f"up to the header of message {i}")
        _check_prefix(ids, through, tokenizer, f"through message {i}")
        start, stop = len(before), len(through)
        eot_positions = [p for p in range(start, stop) if ids[p] == eot_id]
        spans.append((start, eot_positions[-1] + 1 if eot_positions else stop))
    return ids, spans


def assistant_token_mask(
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[dict],
    max_length: int | None = None,
    end_of_turn: str | None = None,
) -> tuple[list[int], list[bool]]:
    """``(input_ids, mask)``: the rendered conversation and True on every token a Tulu 3-style SFT trains.

    Trained: each assistant turn's content and its end-of-turn token (SmolLM2: ``<|im_end|>``). Not
    trained: system and user turns, the assistant header, and the newline after ``<|im_end|>``, which
    generation never samples (open-instruct trains it; the effect is small). Raises
    :class:`ChatTemplateError` when a rendered prefix is not a token prefix of the whole.
    ``max_length`` truncates on the right.
    """
    ids, spans = assistant_spans(tokenizer, messages, end_of_turn)
    mask = _span_mask(len(ids), spans)
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    return ids, mask


def _span_mask(length: int, spans: list[tuple[int, int]]) -> list[bool]:
    mask = [False] * length
    for start, stop in spans:
        mask[start:stop] = [True] * (stop - start)
    return mask


def sft_labels(input_ids: Any, mask: Any, ignore_index: int = IGNORE_INDEX) -> Any:
    """Labels for SFT, a list or a tensor: ``input_ids`` where ``mask`` is true, ``ignore_index`` elsewhere.

    Build labels from the mask, never from ``input_ids != pad_token_id``: SmolLM2's pad is its eos.
    """
    if hasattr(input_ids, "masked_fill"):
        import torch

        mask_t = torch.as_tensor(mask, dtype=torch.bool, device=input_ids.device)
        return input_ids.masked_fill(~mask_t, ignore_index)
    if len(input_ids) != len(mask):
        raise ValueError(f"input_ids ({len(input_ids)}) and mask ({len(mask)}) differ in length")
    return [int(t) if m else ignore_index for t, m in zip(input_ids, mask, strict=True)]


def pad_batch(
    examples: Sequence[tuple[Sequence[int], Sequence[bool]]],
    pad_token_id: int,
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, list[list[int]]]:
    """Right-pad ``(input_ids, mask)`` pairs into ``input_ids``, ``attention_mask`` and ``labels`` lists,
    by length, never by comparing ids with ``pad_token_id`` (an eos equal to pad stays trained)."""
    width = max((len(ids) for ids, _ in examples), default=0)
    batch: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for ids, mask in examples:
        extra = width - len(ids)
        batch["input_ids"].append(list(ids) + [pad_token_id] * extra)
        batch["attention_mask"].append([1] * len(ids) + [0] * extra)
        batch["labels"].append(sft_labels(list(ids), list(mask), ignore_index) + [ignore_index] * extra)
    return batch


def _sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _merges(tokenizer: PreTrainedTokenizerBase) -> list[str] | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        merges = json.loads(backend.to_str())["model"].get("merges")
    except (ValueError, KeyError, TypeError):
        return None
    if merges is None:
        return None
    return [" ".join(m) if isinstance(m, list | tuple) else str(m) for m in merges]


def _special_tokens(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    names = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token")
    out = {
        name: str(getattr(tokenizer, name)) for name in names if getattr(tokenizer, name, None) is not None
    }
    extra = getattr(tokenizer, "extra_special_tokens", None) or getattr(
        tokenizer, "additional_special_tokens", None
    )
    if extra:
        out["extra"] = sorted(str(t) for t in (extra.values() if isinstance(extra, dict) else extra))
    return out


def template_fingerprint(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Hashes that tell whether two tokenizers encode and render conversations the same way: sha256 of
    the vocabulary, merges, special and added tokens, and of the chat template (None without one)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
        "merges": _merges(tokenizer),
        "special_tokens": _special_tokens(tokenizer),
        "added_tokens": sorted(
            [int(i), str(tok), bool(getattr(tok, "special", False))] for i, tok in added.items()
        ),
    }
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    return {
        "tokenizer_hash": _sha256(payload),
        "chat_template_hash": hashlib.sha256(template.encode("utf-8")).hexdigest() if template else None,
        "vocab_size": len(tokenizer),
        "tokenizer_class": type(tokenizer).__name__,
    }


@dataclass
class Check:
    """One check of :func:`doctor`: its name, whether it passed, and what it found."""

    name: str
    passed: bool
    detail: str


@dataclass
class TemplateReport:
    """What :func:`doctor` found: checks, fingerprint, and the rendered sample with its trained tokens."""

    tokenizer_name: str
    checks: list[Check]
    fingerprint: dict[str, Any]
    rendered: str
    input_ids: list[int] = field(default_factory=list)
    mask: list[bool] = field(default_factory=list)
    token_texts: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return all(c.passed for c in self.checks)

    @property
    def problems(self) -> list[Check]:
        """The checks that failed."""
        return [c for c in self.checks if not c.passed]

    def to_frame(self) -> pd.DataFrame:
        """One row per token of the rendered sample: position, token (its text), id, trained."""
        import pandas as pd

        return pd.DataFrame(
            {
                "position": range(len(self.input_ids)),
                "token": self.token_texts,
                "id": self.input_ids,
                "trained": self.mask,
            }
        )

    def marked_text(self, open_mark: str = "[", close_mark: str = "]") -> str:
        """The rendered sample with each run of trained tokens wrapped in ``open_mark``/``close_mark``."""
        out, inside = [], False
        for text, trained in zip(self.token_texts, self.mask, strict=True):
            if trained != inside:
                out.append(open_mark if trained else close_mark)
                inside = trained
            out.append(text)
        if inside:
            out.append(close_mark)
        return "".join(out)

    def __str__(self) -> str:
        status = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        lines = [f"Chat template doctor for '{self.tokenizer_name}': {status}"]
        lines += [f"  [{'PASS' if c.passed else 'FAIL'}] {c.name}: {c.detail}" for c in self.checks]
        lines.append(
            f"  tokenizer_hash {str(self.fingerprint.get('tokenizer_hash'))[:16]}..., "
            f"chat_template_hash {str(self.fingerprint.get('chat_template_hash'))[:16]}..."
        )
        lines.append("Rendered sample, trained tokens in [brackets]:")
        lines.append(self.marked_text())
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{'&#10004;' if c.passed else '&#10008;'}</td><td>{html.escape(c.name)}</td>"
            f"<td>{html.escape(c.detail)}</td></tr>"
            for c in self.checks
        )
        spans = "".join(
            f'<span style="background:#c8f7c5" title="trained">{html.escape(t)}</span>'
            if m
            else f'<span style="color:#888">{html.escape(t)}</span>'
            for t, m in zip(self.token_texts, self.mask, strict=True)
        )
        status = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        return (
            f"<div><b>Chat template doctor for {html.escape(self.tokenizer_name)}: {status}</b>"
            f"<table>{rows}</table>"
            f"<p>tokenizer_hash <code>{self.fingerprint.get('tokenizer_hash')}</code><br>"
            f"chat_template_hash <code>{self.fingerprint.get('chat_template_hash')}</code></p>"
            "<p>Trained tokens are highlighted in green.</p>"
            f'<pre style="white-space:pre-wrap">{spans}</pre></div>'
        )

    def raise_for_problems(self) -> TemplateReport:
        """Raise :class:`ChatTemplateError` listing the failed checks; return the report when all pass."""
        if not self.ok:
            listed = "\n".join(f"  - {c.name}: {c.detail}" for c in self.problems)
            raise ChatTemplateError(
                f"The chat template of '{self.tokenizer_name}' is not safe to train:\n{listed}"
            )
        return self


def _check_bos(tokenizer, ids: list[int], rendered: str) -> Check:
    bos_id = tokenizer.bos_token_id
    if bos_id is None:
        return Check("single_bos", True, "the tokenizer defines no BOS token; nothing to double")
    leading = next((i for i, t in enumerate(ids) if t != bos_id), len(ids))
    adds_bos = tokenizer("x")["input_ids"][:1] == [bos_id]
    renders_bos = rendered.startswith(str(tokenizer.bos_token))
    expected = 1 if (adds_bos or renders_bos) else 0
    naive = tokenizer(rendered)["input_ids"]
    naive_leading = next((i for i, t in enumerate(naive) if t != bos_id), len(naive))
    detail = (
        f"BOS {tokenizer.bos_token!r} (id {bos_id}): the template {'renders' if renders_bos else 'does not render'} "
        f"it and the tokenizer {'adds' if adds_bos else 'does not add'} it; the kit's ids start with {leading} "
        f"(expected {expected})."
    )
    if naive_leading > 1:
        detail += (
            f" Tokenizing the rendered text with add_special_tokens=True would give {naive_leading}: don't."
        )
    if tokenizer.bos_token == "<|im_start|>":
        detail += (
            " (SmolLM2's BOS is <|im_start|>, so it also opens every later turn; only the start counts.)"
        )
    return Check("single_bos", leading == expected, detail)


def _check_end_of_turn(tokenizer, ids, spans, mask, messages, eot_id) -> list[Check]:
    eot = tokenizer.convert_ids_to_tokens(eot_id) if eot_id is not None else None
    n_turns = len(spans)
    closed = sum(1 for _, stop in spans if stop > 0 and ids[stop - 1] == eot_id and mask[stop - 1])
    eot_check = Check(
        "end_of_turn_trained",
        n_turns > 0 and closed == n_turns,
        f"{closed} of {n_turns} assistant turns end with a trained {eot!r}"
        + ("" if n_turns else " (the sample has no assistant turn)"),
    )
    contents = [m["content"] for m in messages if m.get("role") == "assistant"]
    mismatched = []
    for k, ((start, stop), content) in enumerate(zip(spans, contents, strict=True)):
        decoded = tokenizer.decode(
            ids[start:stop], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        if decoded != content + (eot or ""):
            mismatched.append(f"turn {k}: trains {decoded!r}")
    content_check = Check(
        "mask_is_assistant_content",
        not mismatched and n_turns > 0,
        "the trained tokens of each assistant turn decode to its content + end-of-turn token"
        if not mismatched
        else "; ".join(mismatched),
    )
    return [eot_check, content_check]


def _check_pad(tokenizer, messages, ids, mask, eot_id) -> Check:
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        detail = "no pad token: a collator must be given one; never mask labels by comparing ids with it"
        return Check("pad_keeps_eos", True, detail)
    # A second, shorter conversation (the first exchange only), so the batch really needs padding.
    first_reply = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), len(messages) - 1)
    short_ids, short_mask = assistant_token_mask(tokenizer, list(messages)[: first_reply + 1])
    examples = [(ids, mask), (short_ids, short_mask)]
    batch = pad_batch(examples, pad_id)
    trained_eos = kept_kit = dropped_naive = 0
    for row_ids, row_labels, (orig_ids, orig_mask) in zip(
        batch["input_ids"], batch["labels"], examples, strict=True
    ):
        for p, (t, m) in enumerate(zip(orig_ids, orig_mask, strict=True)):
            if m and t == eot_id:
                trained_eos += 1
                kept_kit += row_labels[p] == t
                # A naive collator: labels = input_ids, then -100 wherever input_ids == pad_token_id.
                dropped_naive += row_ids[p] == pad_id
    if pad_id == tokenizer.eos_token_id:
        detail = (
            f"pad == eos ({tokenizer.pad_token!r}, id {pad_id}). A collator that sets labels to -100 where "
            f"input_ids == pad_token_id drops {dropped_naive} of the {trained_eos} trained end-of-turn tokens "
            "in a padded batch, so the model never learns to stop; the kit's labels come from the assistant "
            f"mask and pad by length, keeping {kept_kit} of {trained_eos}."
        )
    else:
        detail = (
            f"pad ({tokenizer.pad_token!r}, id {pad_id}) differs from eos; a padded batch keeps "
            f"{kept_kit} of {trained_eos} trained end-of-turn tokens (a naive collator would drop {dropped_naive})."
        )
    return Check("pad_keeps_eos", kept_kit == trained_eos, detail)


def doctor(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict] | None = None, end_of_turn: str | None = None
) -> TemplateReport:
    """Render a conversation (default :data:`SAMPLE_CONVERSATION`) and check the template is safe to train.

    Raises :class:`ChatTemplateError` when the tokenizer has no chat template. The report's checks:
    prefix-consistent rendering, one BOS, a trained end-of-turn token closing every assistant turn,
    trained tokens equal to the assistant contents, and padding that keeps EOS. Its
    ``.raise_for_problems()`` stops a stage on any failure.
    """
    _require_template(tokenizer)
    messages = list(messages or SAMPLE_CONVERSATION)
    name = _name(tokenizer)
    fingerprint = template_fingerprint(tokenizer)
    rendered = _render(tokenizer, messages, generation_prompt=False)
    eot_id = _end_of_turn_id(tokenizer, end_of_turn)
    try:
        ids, spans = assistant_spans(tokenizer, messages, end_of_turn)
    except ChatTemplateError as exc:
        checks = [Check("renders_consistently", False, str(exc))]
        return TemplateReport(name, checks, fingerprint, rendered)
    mask = _span_mask(len(ids), spans)
    checks = [
        Check(
            "renders_consistently",
            True,
            f"{len(messages)} messages -> {len(ids)} tokens; every prefix tokenizes to a prefix of the whole",
        ),
        _check_bos(tokenizer, ids, rendered),
        *_check_end_of_turn(tokenizer, ids, spans, mask, messages, eot_id),
    ]
    checks.append(_check_pad(tokenizer, messages, ids, mask, eot_id))
    checks.append(
        Check(
            "fingerprint",
            bool(fingerprint["tokenizer_hash"] and fingerprint["chat_template_hash"]),
            f"tokenizer {fingerprint['tokenizer_hash'][:12]}, chat template "
            f"{str(fingerprint['chat_template_hash'])[:12]} (recorded in every manifest)",
        )
    )
    token_texts = [
        tokenizer.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False) for t in ids
    ]
    return TemplateReport(name, checks, fingerprint, rendered, ids, mask, token_texts)
