"""The SFT stage: which tokens train, sum vs mean, padding-free batches, learning, manifests and bad rows.

Everything runs offline on a CPU: the tiny SmolLM2 (random, 3.2M parameters) for the learning and
gradient checks, the bundled SmolLM2-135M-Instruct for a three-step run, fixture rows for data.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from smoltulu_utils.chat_template import template_fingerprint
from smoltulu_utils.data import load_rows
from smoltulu_utils.hardware import hardware_from_facts
from smoltulu_utils.manifest import ManifestError, read_manifest, write_manifest
from smoltulu_utils.memory import MemoryDoesNotFitError, MemoryPlanError
from smoltulu_utils.models import load_tokenizer
from smoltulu_utils.models import tiny_model as make_tiny
from smoltulu_utils.packed_attention import restore_attention
from smoltulu_utils.paths import FIXTURES_DIR
from smoltulu_utils.profiles import get_profile, resolve
from smoltulu_utils.recipes import load_recipe
from smoltulu_utils.sft import (
    SFTError,
    build_trainer,
    padding_free_supported,
    prepare_sft_rows,
    train_sft,
)
from smoltulu_utils.training import TrainingMethodError, training_method

IGNORE = -100


def fixture_rows(limit=None):
    return [dict(r) for r in load_rows("tulu3_sft", mirror=FIXTURES_DIR, limit=limit)]


def small_plan(*, batch=4, cap=4, steps=2, model="tiny", max_length=None, **recipe_changes):
    """The smoke plan of sft_1130 with a smaller effective batch and a few steps."""
    recipe_changes.setdefault("packing", False)  # padded batches unless a test asks for padding-free
    recipe = load_recipe("sft_1130").replace(effective_batch_size=batch, **recipe_changes)
    if max_length:
        recipe = recipe.replace(max_length=max_length)
    profile = get_profile("smoke").replace(per_device_batch_cap=cap, max_steps=steps, model=model)
    return resolve(recipe, profile, verbose=False)


def bad_rows():
    """Rows a run must skip: an empty reply, a whitespace-led reply, no assistant turn, no messages."""
    user = {"role": "user", "content": "Say hi."}
    return [
        {"messages": [user, {"role": "assistant", "content": ""}]},
        {"messages": [user, {"role": "assistant", "content": "  Hi, with two leading spaces."}]},
        {"messages": [user]},
        {"id": "no-messages"},
    ]


def assistant_positions(tokenizer, ids):
    """Positions of every assistant turn's content and its <|im_end|>, found by reading the tokens."""
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    positions, i = set(), 0
    while i < len(ids):
        if ids[i] != start:
            i += 1
            continue
        j, header = i + 1, ""
        while j < len(ids) and "\n" not in header:
            header += tokenizer.decode([ids[j]])
            j += 1
        if header.strip() != "assistant":
            i = j
            continue
        while j < len(ids) and ids[j] != end:
            positions.add(j)
            j += 1
        if j < len(ids):
            positions.add(j)
        i = j + 1
    return positions


def trained_text(tokenizer, ids, labels):
    return tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE])


# ======================================================================================================
# Rows
# ======================================================================================================
def test_prepare_rows_skips_and_counts_bad_rows(bundled_tokenizer):
    good = fixture_rows(3)
    long_prompt = {
        "messages": [
            {"role": "user", "content": "word " * 200},
            {"role": "assistant", "content": "Short answer."},
        ]
    }
    rows = [good[0], *bad_rows(), good[1], long_prompt, good[2]]
    dataset, report = prepare_sft_rows(rows, bundled_tokenizer, max_length=64)

    assert report.n_rows == 8 and report.n_kept == 3 and len(dataset) == 3
    assert [s.index for s in report.skipped] == [1, 2, 3, 4, 6]
    reasons = [s.reason for s in report.skipped]
    assert reasons[0].startswith("empty assistant reply")
    assert reasons[1].startswith("chat template")  # two leading spaces break prefix tokenization
    assert reasons[2].startswith("no assistant turn")
    assert reasons[3].startswith("no conversation")
    assert reasons[4].startswith("nothing to train after truncation")
    assert "skipped row 1: empty assistant reply" in report.describe()
    assert set(dataset.column_names) == {"input_ids", "assistant_masks"}
    for ids, mask in zip(dataset["input_ids"], dataset["assistant_masks"], strict=True):
        assert len(ids) == len(mask) <= 64 and any(mask)
        assert {p for p, m in enumerate(mask) if m} == assistant_positions(bundled_tokenizer, ids)


# ======================================================================================================
# Labels as the trainer builds them
# ======================================================================================================
@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding_free"])
def test_collator_labels_only_assistant_tokens(bundled_tokenizer, tmp_path, padding_free):
    rows = fixture_rows()
    wanted = ["smoltulu-kit/multi-turn", "smoltulu-kit/system-prompts", "smoltulu-kit/chat"]
    picked = [next(r for r in rows if r["source"] == s) for s in wanted] + [rows[0]]
    assert any(len(r["messages"]) > 3 for r in picked)  # a multi-turn conversation is in the batch
    dataset, report = prepare_sft_rows(picked, bundled_tokenizer, max_length=256)
    assert report.n_kept == 4
    model, tok = make_tiny(seed=0, tokenizer=bundled_tokenizer)
    trainer = build_trainer(small_plan(), model, tok, dataset, tmp_path, padding_free=padding_free)
    batch = next(iter(trainer.get_train_dataloader()))

    if padding_free:
        assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
        flat_ids, flat_labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
        starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [len(flat_ids)]
        examples = [(flat_ids[a:b], flat_labels[a:b]) for a, b in zip(starts, starts[1:], strict=False)]
    else:
        examples = []
        for ids, labels, attention in zip(
            batch["input_ids"].tolist(),
            batch["labels"].tolist(),
            batch["attention_mask"].tolist(),
            strict=True,
        ):
            n = sum(attention)
            assert all(lab == IGNORE for lab in labels[n:])  # padding never trains
            examples.append((ids[:n], labels[:n]))
    assert len(examples) == 4

    by_ids = {tuple(ids): row for ids, row in zip(dataset["input_ids"], picked, strict=True)}
    for ids, labels in examples:
        row = by_ids[tuple(ids)]
        trained = {p for p, lab in enumerate(labels) if lab != IGNORE}
        assert trained == assistant_positions(tok, ids), tok.decode(ids)
        assert all(labels[p] == ids[p] for p in trained)
        replies = [m["content"] + "<|im_end|>" for m in row["messages"] if m["role"] == "assistant"]
        assert trained_text(tok, ids, labels) == "".join(replies)


# ======================================================================================================
# Loss reduction
# ======================================================================================================
def test_sum_gradient_is_mean_gradient_times_trained_tokens(bundled_tokenizer, tmp_path):
    """One optimizer step of 2 micro-batches x 2 examples: grad(sum) == N x grad(mean) == grad(token sum)."""
    model, tok = make_tiny(seed=1, tokenizer=bundled_tokenizer)
    dataset, _ = prepare_sft_rows(fixture_rows(4), tok, max_length=256)
    grads, tokens = {}, {}
    for reduction in ("mean", "sum"):
        plan = small_plan(batch=4, cap=2, loss_reduction=reduction)
        assert (plan.per_device_batch_size, plan.gradient_accumulation_steps) == (2, 2)
        trainer = build_trainer(plan, model, tok, dataset, tmp_path / reduction)
        examples = [trainer.train_dataset[i] for i in range(4)]
        micro = [trainer.data_collator(examples[:2]), trainer.data_collator(examples[2:])]
        micro, n_items = trainer.get_batch_samples(iter(micro), 2, trainer.args.device)
        trainer.current_gradient_accumulation_steps = 2
        model.zero_grad(set_to_none=True)
        for batch in micro:
            trainer.training_step(model, batch, n_items)
        grads[reduction] = torch.cat([p.grad.flatten() for p in model.parameters()])
        tokens[reduction] = float(n_items)

    n = tokens["sum"]
    counted = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
    assert n == tokens["mean"] == counted > 20  # both micro-batches: the whole effective batch
    scale = float(grads["sum"].abs().max())
    torch.testing.assert_close(grads["sum"], grads["mean"] * n, rtol=1e-4, atol=1e-6 * scale)

    # The same gradient from a plain summed cross-entropy over both micro-batches (no TRL, no Trainer).
    model.zero_grad(set_to_none=True)
    for batch in micro:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), reduction="sum"
        )
        loss.backward()
    reference = torch.cat([p.grad.flatten() for p in model.parameters()])
    torch.testing.assert_close(grads["sum"], reference, rtol=1e-3, atol=1e-5 * scale)


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding_free"])
def test_full_logits_loss_equals_trl_fused_loss(bundled_tokenizer, tmp_path, padding_free):
    """The CPU loss path (plain LM head + one cross-entropy) = TRL's chunked LM-head loss, value and gradient."""
    model, tok = make_tiny(seed=3, tokenizer=bundled_tokenizer)
    dataset, _ = prepare_sft_rows(fixture_rows(4), tok, max_length=256)
    losses, grads, accuracy = {}, {}, {}
    for fused in (True, False):
        trainer = build_trainer(
            small_plan(),
            model,
            tok,
            dataset,
            tmp_path / str(fused),
            padding_free=padding_free,
            fused_lm_head=fused,
        )
        batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
        n_items = int((batch["labels"][:, 1:] != IGNORE).sum())
        model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(n_items))
        loss.backward()
        losses[fused], grads[fused] = float(loss), torch.cat([p.grad.flatten() for p in model.parameters()])
        accuracy[fused] = trainer._metrics["train"]["mean_token_accuracy"][-1]
    assert math.isfinite(losses[True]) and losses[True] > 1.0
    assert abs(losses[True] - losses[False]) < 1e-4 * losses[True]
    torch.testing.assert_close(
        grads[False], grads[True], rtol=1e-3, atol=1e-5 * float(grads[True].abs().max())
    )
    assert accuracy[True] == pytest.approx(accuracy[False])


# ======================================================================================================
# Padding-free batches
# ======================================================================================================
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_padding_free_loss_equals_padded_loss(bundled_tokenizer, tmp_path, attention):
    model, tok = make_tiny(seed=2, tokenizer=bundled_tokenizer)
    model.set_attn_implementation(attention)
    assert padding_free_supported(model)[0]
    dataset, _ = prepare_sft_rows(fixture_rows(6), tok, max_length=256)
    losses = {}
    for padding_free in (False, True):
        trainer = build_trainer(
            small_plan(), model, tok, dataset, tmp_path / str(padding_free), padding_free=padding_free
        )
        assert ("position_ids" in trainer.data_collator([trainer.train_dataset[0]])) == padding_free
        batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(6)]))
        model.eval()
        with torch.no_grad():
            losses[padding_free] = float(trainer.compute_loss(model, dict(batch)))
            if padding_free:  # the same flat row with a plain causal mask: examples see each other
                assert model.config._attn_implementation == (
                    "sdpa_packed" if attention == "sdpa" else attention
                )
                restore_attention(model, trainer.attention_before)
                leaky = {**batch, "attention_mask": torch.ones_like(batch["input_ids"])}
                losses["leaky"] = float(trainer.compute_loss(model, leaky))
    print(
        f"{attention}: padded {losses[False]:.6f}, padding-free {losses[True]:.6f}, leaky {losses['leaky']:.6f}"
    )
    assert abs(losses[True] - losses[False]) < 1e-4
    assert abs(losses["leaky"] - losses[False]) > 5e-4  # the block-diagonal mask is what makes them equal


def test_unknown_attention_falls_back_to_padded_batches():
    class Config:
        _attn_implementation = "some_kernel"

    class Model:
        config = Config()

    ok, why = padding_free_supported(Model())
    assert not ok and "padded batches" in why


# ======================================================================================================
# Full, LoRA or QLoRA
# ======================================================================================================
def gpu_plan(memory_gib, compute_capability=(8, 0)):
    hardware = hardware_from_facts("cuda", memory_gib=memory_gib, compute_capability=compute_capability)
    return resolve("sft_1130", "single_gpu", hardware=hardware, verbose=False)


def test_training_method_follows_the_memory_plan():
    assert training_method(small_plan()).method == "full"  # this CPU: the smoke profile trains in full
    big = training_method(gpu_plan(80))
    assert big.method == "full" and big.peft_config is None and big.load_kwargs == {"dtype": "float32"}
    lora = training_method(gpu_plan(24))
    assert lora.method == "lora" and lora.peft_config.r == 64 and lora.load_kwargs == {"dtype": "bf16"}
    assert "LORA" in lora.notes[0]
    # An 8 GiB fp16 GPU needs 4-bit weights, which the stage must load itself, on a CUDA machine.
    with pytest.raises(TrainingMethodError, match="QLoRA"):
        training_method(gpu_plan(8, (7, 5)), model_given=True)
    if not torch.cuda.is_available():
        with pytest.raises(MemoryPlanError, match="CUDA"):
            training_method(gpu_plan(8, (7, 5)))
    # On 4 GiB not even QLoRA fits: the stage refuses, naming the GPU and the fixes, before loading anything.
    with pytest.raises(MemoryDoesNotFitError, match="4 GiB"):
        training_method(gpu_plan(4, (7, 5)))


# ======================================================================================================
# Learning
# ======================================================================================================
@pytest.fixture(scope="module")
def learned(bundled_tokenizer, tmp_path_factory):
    """The tiny model trained 14 steps (batch 4, summed loss) on 16 fixture rows plus 4 bad rows."""
    out = tmp_path_factory.mktemp("sft_tiny")
    plan = small_plan(batch=4, steps=14, learning_rate=1.5e-2)
    model, tok = make_tiny(seed=0, tokenizer=bundled_tokenizer)
    rows = fixture_rows(20)
    result = train_sft(
        plan, out, model=model, tokenizer=tok, rows=rows[:16] + bad_rows(), eval_rows=rows[16:]
    )
    return result, out, plan, model


def test_tiny_model_learns_the_fixture_rows(learned):
    result, out, plan, _ = learned
    first, final = result.train_loss[0][1], result.final_train_loss
    print(
        f"tiny SFT: loss per token {first:.3f} -> {final:.3f} in {result.steps} steps ({result.wall_seconds:.1f} s)"
    )
    assert result.steps == 14 and len(result.train_loss) == 14
    assert math.isfinite(final) and final <= first / 2
    assert result.loss_reduction == "sum" and not result.padding_free and result.method == "full"
    assert result.learning_rate == 1.5e-2 and result.effective_batch_size == 4
    # "sum": the logged objective is the summed NLL, i.e. the per-token loss times the step's tokens
    step_tokens = [
        obj / per_token for (_, obj), (_, per_token) in zip(result.objective, result.train_loss, strict=True)
    ]
    assert all(t == pytest.approx(round(t), abs=1e-3) and t > 4 for t in step_tokens)
    assert result.trained_tokens == round(sum(step_tokens))
    assert result.data_report.n_kept == 16 and result.data_report.n_skipped == 4


def test_eval_loss_is_the_mean_nll_of_the_eval_tokens(learned, bundled_tokenizer):
    result, _, _, model = learned
    dataset, _ = prepare_sft_rows(fixture_rows(20)[16:], bundled_tokenizer, max_length=256)
    nll, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for ids, mask in zip(dataset["input_ids"], dataset["assistant_masks"], strict=True):
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            labels = torch.tensor([t if m else IGNORE for t, m in zip(ids, mask, strict=True)])[1:]
            nll += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            count += int((labels != IGNORE).sum())
    assert result.eval_loss == pytest.approx(nll / count, rel=1e-4)
    assert result.eval_loss < result.train_loss[0][1] - 1  # held-out rows improve too (10.8 -> 7.9 here)


def test_manifest_records_the_run_and_template(learned, bundled_tokenizer):
    result, out, plan, _ = learned
    manifest = read_manifest(out)
    assert manifest["stage"] == "sft"
    assert manifest["tokenizer"] == json.loads(json.dumps(template_fingerprint(bundled_tokenizer)))
    assert manifest["tokenizer"]["chat_template_hash"]
    assert manifest["recipe"]["loss_reduction"] == "sum" and manifest["seed"] == 42
    assert manifest["data"][0]["id"] == "allenai/tulu-3-sft-mixture" and manifest["data"][0]["n_rows"] == 16
    assert manifest["data"][0]["rows_skipped"] == 4
    assert manifest["extra"]["steps"] == 14 and manifest["extra"]["trained_tokens"] == result.trained_tokens
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()


def test_parent_with_the_same_template_is_continued(learned, tmp_path):
    _, parent, _, _ = learned
    result = train_sft(small_plan(steps=1), tmp_path, parent=parent, rows=fixture_rows(4), verbose=False)
    manifest = read_manifest(tmp_path)
    assert result.steps == 1 and manifest["parent"]["stage"] == "sft"
    assert manifest["parent"]["chat_template_hash"] == manifest["tokenizer"]["chat_template_hash"]


def test_parent_with_another_chat_template_is_refused(bundled_tokenizer, tmp_path):
    other = load_tokenizer("bundled")  # a fresh copy: the session's tokenizer stays unchanged
    other.chat_template = other.chat_template.replace("You are a helpful AI assistant", "You are a pirate")
    parent = tmp_path / "parent"
    write_manifest(parent, stage="sft", recipe=None, data=None, tokenizer=other, seed=0)
    model, tok = make_tiny(seed=0, tokenizer=bundled_tokenizer)
    with pytest.raises(ManifestError, match="chat_template_hash"):
        train_sft(
            small_plan(), tmp_path / "out", model=model, tokenizer=tok, parent=parent, rows=fixture_rows(4)
        )
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_run_without_usable_rows_says_why(bundled_tokenizer, tmp_path):
    model, tok = make_tiny(seed=0, tokenizer=bundled_tokenizer)
    with pytest.raises(SFTError, match="empty assistant reply"):
        train_sft(small_plan(), tmp_path, model=model, tokenizer=tok, rows=bad_rows(), verbose=False)


# ======================================================================================================
# The bundled SmolLM2-135M-Instruct
# ======================================================================================================
def test_bundled_model_takes_falling_padding_free_steps(bundled_tokenizer, tmp_path):
    """Two steps of batch 2 on the same two rows: finite, falling loss (padding-free, summed).

    Warmup is off: transformers rounds 3% of 2 steps up to one warmup step, whose learning rate is 0.
    """
    plan = small_plan(
        batch=2, cap=2, steps=2, model="bundled", max_length=128, packing=True, warmup_ratio=0.0
    )
    result = train_sft(plan, tmp_path, tokenizer=bundled_tokenizer, rows=fixture_rows(2))
    losses = [loss for _, loss in result.train_loss]
    print(f"bundled SFT: loss per token {losses}")
    assert result.padding_free and len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert read_manifest(tmp_path)["parent"]["path"] == "bundled"


def test_a_plan_for_several_processes_is_refused_in_one(tmp_path, monkeypatch):
    """A notebook kernel is one process: a plan split over 2 would silently halve the effective batch."""
    from smoltulu_utils.training import WorldSizeError

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    recipe = load_recipe("sft_1130").replace(effective_batch_size=4)
    profile = get_profile("smoke").replace(per_device_batch_cap=2, max_steps=1, model="tiny")
    plan = resolve(recipe, profile, num_processes=2, verbose=False)
    with pytest.raises(WorldSizeError, match=r"num_processes=1.*--processes 2"):
        train_sft(plan, tmp_path / "out", rows=[])
    assert not (tmp_path / "out").exists()  # refused before anything loaded or was written
