"""The assistant mask, the fingerprint and the doctor, on the real SmolLM2-135M-Instruct tokenizer."""

from __future__ import annotations

import copy

import pytest
import torch

from smoltulu_utils.chat_template import (
    IGNORE_INDEX,
    SAMPLE_CONVERSATION,
    ChatTemplateError,
    assistant_token_mask,
    doctor,
    pad_batch,
    sft_labels,
    template_fingerprint,
)

EOT = "<|im_end|>"


def _runs(mask):
    """[start, stop) of each run of True."""
    runs, start = [], None
    for i, m in enumerate([*mask, False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


@pytest.fixture
def tok_copy(bundled_tokenizer):
    return copy.deepcopy(bundled_tokenizer)


def test_mask_token_by_token_single_turn(bundled_tokenizer):
    tok = bundled_tokenizer
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ]
    ids, mask = assistant_token_mask(tok, messages)
    tokens = tok.convert_ids_to_tokens(ids)
    assert tokens[-8:] == ["<|im_start|>", "ass", "istant", "Ċ", "Paris", ".", "<|im_end|>", "Ċ"]
    trained = [t for t, m in zip(tokens, mask, strict=True) if m]
    assert trained == ["Paris", ".", "<|im_end|>"]
    # header and the newline after <|im_end|> are not trained
    assert tokens[-1] == "Ċ" and not mask[-1]
    assert not any(mask[: len(ids) - 4])
    assert _decode(tok, [i for i, m in zip(ids, mask, strict=True) if m]) == "Paris." + EOT
    assert ids == tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


def test_mask_multi_turn_trains_each_assistant_turn(bundled_tokenizer):
    ids, mask = assistant_token_mask(bundled_tokenizer, SAMPLE_CONVERSATION)
    runs = _runs(mask)
    replies = [m["content"] for m in SAMPLE_CONVERSATION if m["role"] == "assistant"]
    assert len(runs) == len(replies) == 2
    for (start, stop), reply in zip(runs, replies, strict=True):
        assert _decode(bundled_tokenizer, ids[start:stop]) == reply + EOT
        assert _decode(bundled_tokenizer, ids[start - 4 : start]) == "<|im_start|>assistant\n"
    untrained = _decode(bundled_tokenizer, [i for i, m in zip(ids, mask, strict=True) if not m])
    assert "What is the capital of France?" in untrained and "You are a concise assistant." in untrained


def test_default_system_prompt_is_rendered_but_not_trained(bundled_tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}]
    ids, mask = assistant_token_mask(bundled_tokenizer, messages)
    assert _decode(bundled_tokenizer, ids).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>"
    )
    ((start, stop),) = _runs(mask)
    assert _decode(bundled_tokenizer, ids[start:stop]) == "Hello! How can I help?" + EOT


def test_max_length_truncates_ids_and_mask(bundled_tokenizer):
    ids, mask = assistant_token_mask(bundled_tokenizer, SAMPLE_CONVERSATION, max_length=30)
    full_ids, full_mask = assistant_token_mask(bundled_tokenizer, SAMPLE_CONVERSATION)
    assert (ids, mask) == (full_ids[:30], full_mask[:30])


def test_inconsistent_prefix_tokenization_is_an_error(bundled_tokenizer):
    # A reply starting with two spaces: the header's newline and the first space merge into one token.
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  Hello"}]
    with pytest.raises(ChatTemplateError, match="does not tokenize consistently"):
        assistant_token_mask(bundled_tokenizer, messages)
    report = doctor(bundled_tokenizer, messages)
    assert not report.ok and report.checks[0].name == "renders_consistently"


def test_tokenizer_without_template_is_refused(tok_copy):
    tok_copy.chat_template = None
    for call in (lambda: doctor(tok_copy), lambda: assistant_token_mask(tok_copy, SAMPLE_CONVERSATION)):
        with pytest.raises(ChatTemplateError) as info:
            call()
        text = str(info.value)
        assert "has no chat template" in text and "-Instruct" in text and "tokenizer.chat_template" in text


def test_naive_pad_eos_collator_drops_eos_but_kit_labels_keep_it(bundled_tokenizer):
    tok = bundled_tokenizer
    assert tok.pad_token_id == tok.eos_token_id
    long = assistant_token_mask(tok, SAMPLE_CONVERSATION)
    short = assistant_token_mask(tok, SAMPLE_CONVERSATION[:3])
    batch = pad_batch([long, short], tok.pad_token_id)
    input_ids = torch.tensor(batch["input_ids"])
    kit_labels = torch.tensor(batch["labels"])
    naive_labels = input_ids.masked_fill(input_ids == tok.pad_token_id, IGNORE_INDEX)
    eos = tok.eos_token_id
    trained_eos = sum(
        sum(1 for t, m in zip(ids, mask, strict=True) if m and t == eos) for ids, mask in (long, short)
    )
    assert trained_eos == 3
    assert int((naive_labels == eos).sum()) == 0  # every EOS, trained or padding, is gone
    assert int((kit_labels == eos).sum()) == trained_eos
    assert int((kit_labels[1, len(short[0]) :] != IGNORE_INDEX).sum()) == 0  # padding is not trained
    check = next(c for c in doctor(tok).checks if c.name == "pad_keeps_eos")
    assert check.passed and "pad == eos" in check.detail and "drops 3 of the 3" in check.detail


def test_sft_labels_on_lists_and_tensors():
    assert sft_labels([5, 6, 7], [False, True, True]) == [IGNORE_INDEX, 6, 7]
    ids = torch.tensor([[5, 6, 7]])
    assert sft_labels(ids, torch.tensor([[True, False, True]])).tolist() == [[5, IGNORE_INDEX, 7]]
    with pytest.raises(ValueError):
        sft_labels([1, 2], [True])


def test_doctor_report_on_smollm2(bundled_tokenizer):
    report = doctor(bundled_tokenizer)
    assert report.ok, str(report)
    names = [c.name for c in report.checks]
    for name in ("single_bos", "end_of_turn_trained", "mask_is_assistant_content", "pad_keeps_eos"):
        assert name in names
    assert report.raise_for_problems() is report
    assert report.fingerprint == template_fingerprint(bundled_tokenizer)
    assert report.rendered.startswith("<|im_start|>system\nYou are a concise assistant.")
    frame = report.to_frame()
    assert list(frame.columns) == ["position", "token", "id", "trained"]
    assert len(frame) == len(report.input_ids) and frame["trained"].sum() == sum(report.mask)
    text = str(report)
    assert "[The capital of France is Paris.<|im_end|>]" in text
    assert "[Rome is the capital of Italy.<|im_end|>]" in text
    assert "background" in report._repr_html_()


def test_doctor_catches_double_bos_and_untrained_end_of_turn(tok_copy):
    tok_copy.chat_template = "{{ bos_token }}" + tok_copy.chat_template
    report = doctor(tok_copy)
    assert not next(c for c in report.checks if c.name == "single_bos").passed

    no_eot = (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    tok_copy.chat_template = no_eot
    report = doctor(tok_copy)
    assert not next(c for c in report.checks if c.name == "end_of_turn_trained").passed
    with pytest.raises(ChatTemplateError, match="end_of_turn_trained"):
        report.raise_for_problems()


def test_fingerprint_is_stable_and_sensitive(bundled_tokenizer, tok_copy, tmp_path):
    fp = template_fingerprint(bundled_tokenizer)
    assert len(fp["tokenizer_hash"]) == len(fp["chat_template_hash"]) == 64
    bundled_tokenizer.save_pretrained(tmp_path)
    from smoltulu_utils.models import load_tokenizer

    assert template_fingerprint(load_tokenizer(tmp_path)) == fp
    tok_copy.chat_template = tok_copy.chat_template.replace("helpful", "harmless")
    changed = template_fingerprint(tok_copy)
    assert changed["tokenizer_hash"] == fp["tokenizer_hash"]
    assert changed["chat_template_hash"] != fp["chat_template_hash"]
    tok_copy.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    assert template_fingerprint(tok_copy)["tokenizer_hash"] != fp["tokenizer_hash"]


# ======================================================================================================
# Base-model tokenizers get the kit's template
# ======================================================================================================
def base_like(tokenizer):
    """A copy of SmolLM2's tokenizer as the base checkpoints ship it: no template, eos <|endoftext|>, no pad."""
    base = copy.deepcopy(tokenizer)
    base.chat_template = None
    base.bos_token = base.eos_token = "<|endoftext|>"
    base.pad_token = None
    return base


def test_a_base_tokenizer_gets_the_instruct_template_and_special_tokens(bundled_tokenizer, tmp_path):
    from smoltulu_utils.models import adapt_tokenizer, load_tokenizer

    base_like(bundled_tokenizer).save_pretrained(tmp_path)
    base = load_tokenizer(tmp_path)  # as a stage reads a base checkpoint's folder
    assert base.chat_template is None and base.eos_token == "<|endoftext|>" and base.pad_token is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        doctor(base)
    changes = adapt_tokenizer(base)
    assert any("chat_template" in c for c in changes) and any("eos_token" in c for c in changes)
    assert not any("added" in c for c in changes)  # SmolLM2's vocabulary holds the ChatML tokens
    assert (base.bos_token, base.eos_token, base.pad_token) == ("<|im_start|>", EOT, EOT)
    assert doctor(base).raise_for_problems().ok
    # The adapted base tokenizer is SmolLM2-Instruct's: same vocabulary, specials and template.
    assert template_fingerprint(base) == template_fingerprint(bundled_tokenizer)
    assert adapt_tokenizer(base) == [] and adapt_tokenizer(copy.deepcopy(bundled_tokenizer)) == []


def test_a_tokenizer_without_the_chatml_tokens_gets_them_and_the_model_grows(bundled_tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from smoltulu_utils.models import adapt_tokenizer, match_model_to_tokenizer, tiny_model

    words = ["<|endoftext|>", *"abcdefghijklmnopqrstuvwxyz"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )
    changes = adapt_tokenizer(tok)
    assert "added ['<|im_start|>', '<|im_end|>']" in changes[0] and len(tok) == len(words) + 2
    assert tok("<|im_start|>a b<|im_end|>", add_special_tokens=False)["input_ids"] == [
        len(words), 1, 2, len(words) + 1
    ]  # fmt: skip
    model, _ = tiny_model(tokenizer=bundled_tokenizer)
    model.resize_token_embeddings(len(words))  # a model of the small vocabulary
    grown = match_model_to_tokenizer(model, tok)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.config.eos_token_id == model.generation_config.eos_token_id == tok.convert_tokens_to_ids(EOT)
    assert any("resized" in c for c in grown)
