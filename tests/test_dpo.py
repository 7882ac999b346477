"""DPO: the dpo_norm loss by hand, the reference log-prob cache, learning, parents and bad input."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from smoltulu_utils.data import load_rows
from smoltulu_utils.dpo import (
    TRL_LOSS_TYPES,
    DPOError,
    build_dpo_trainer,
    pair_rewards,
    train_dpo,
)
from smoltulu_utils.manifest import read_manifest, write_manifest
from smoltulu_utils.models import tiny_model
from smoltulu_utils.paths import FIXTURES_DIR
from smoltulu_utils.preferences import PreferenceDataError, prepare_preference_rows
from smoltulu_utils.profiles import get_profile, resolve
from smoltulu_utils.recipes import load_recipe
from smoltulu_utils.reference_cache import ReferenceCache


def dpo_plan(*, batch=4, cap=4, steps=2, lr=None, max_length=None, **recipe_changes):
    recipe = load_recipe("dpo_1130").replace(effective_batch_size=batch, **recipe_changes)
    if lr is not None:
        recipe = recipe.replace(learning_rate=lr, warmup_ratio=0.0)
    profile = get_profile("smoke").replace(model="tiny", per_device_batch_cap=cap, max_steps=steps)
    if max_length:
        profile = profile.replace(max_length=max_length)
    return resolve(recipe, profile, verbose=False)


def fixture_pairs(limit=8):
    return [dict(r) for r in load_rows("tulu3_preference", mirror=FIXTURES_DIR, limit=limit)]


def completion_logps(model, batch):
    """Summed log-probs of each sequence's completion tokens and their counts, straight from the logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logps = torch.log_softmax(logits[:, :-1], dim=-1)
    targets = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].float()
    per_token = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * mask
    return per_token.sum(1), mask.sum(1)


def test_recipe_loss_names_map_to_trl():
    assert TRL_LOSS_TYPES == {"dpo": "sigmoid", "dpo_norm": "sigmoid_norm"}
    assert load_recipe("dpo_1130").loss_type == "dpo_norm" and load_recipe("dpo_1130").beta == 5.0


@pytest.mark.parametrize("loss_type", ["dpo_norm", "dpo"])
def test_loss_equals_hand_computed_dpo(bundled_tokenizer, tmp_path, loss_type):
    """TRL's loss for the recipe's loss_type = -logsigmoid(beta * margin) computed here from the logits."""
    model, tok = tiny_model(seed=0, tokenizer=bundled_tokenizer)
    reference = copy.deepcopy(model).eval()
    dataset, _ = prepare_preference_rows(fixture_pairs(4), tok, 256)
    plan = dpo_plan(loss_type=loss_type, max_length=256)
    trainer = build_dpo_trainer(
        plan, model, tok, dataset, tmp_path / "run", reference_cache=tmp_path / "cache"
    )
    with torch.no_grad():  # move the policy away from the reference, so the margins are not all zero
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    model.eval()
    with torch.no_grad():
        kit = float(trainer.compute_loss(model, batch))
        pi, n = completion_logps(model, batch)
        ref, _ = completion_logps(reference, batch)
    (pi_c, pi_r), (ref_c, ref_r), (n_c, n_r) = pi.chunk(2), ref.chunk(2), n.chunk(2)
    torch.testing.assert_close(batch["ref_chosen_logps"].float(), ref_c, rtol=1e-4, atol=1e-3)
    if loss_type == "dpo_norm":
        margin = (pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r
    else:
        margin = (pi_c - ref_c) - (pi_r - ref_r)
    hand = float(-F.logsigmoid(5.0 * margin).mean())
    assert margin.abs().max() > 1e-3  # a real margin, not the untrained 0 (loss log 2)
    assert abs(hand - math.log(2)) > 1e-3
    assert kit == pytest.approx(hand, rel=1e-4, abs=1e-5)


def test_reference_cache_is_computed_once_and_reused(bundled_tokenizer, tmp_path):
    rows = fixture_pairs(6)
    cache = ReferenceCache(tmp_path / "cache")

    def build(rows=rows, max_length=256, seed=0):
        model, tok = tiny_model(seed=seed, tokenizer=bundled_tokenizer)
        dataset, _ = prepare_preference_rows(rows, tok, max_length)
        plan = dpo_plan(max_length=max_length)
        return build_dpo_trainer(plan, model, tok, dataset, tmp_path / "run", reference_cache=cache)

    first = build()
    assert first.reference_forward_passes > 0 and first.reference_lookups["train"]["found"] == "missing"
    assert len(cache.entries()) == 1 and cache.entries()[0]["n_rows"] == 6
    again = build()  # a second run, same key: no reference forward pass at all
    assert again.reference_forward_passes == 0 and again.reference_lookups["train"]["found"] == "hit"
    assert again.train_dataset["ref_chosen_logps"] == first.train_dataset["ref_chosen_logps"]

    keys = {first.reference_lookups["train"]["key"]}
    for changed in (build(max_length=128), build(rows=rows[:5]), build(seed=1)):  # length, data, weights
        assert (
            changed.reference_forward_passes > 0 and changed.reference_lookups["train"]["found"] == "missing"
        )
        keys.add(changed.reference_lookups["train"]["key"])
    assert len(keys) == 4 and len(cache.entries()) == 4


@pytest.mark.parametrize("damage", ["truncate", "flip", "foreign"])
def test_corrupt_reference_cache_is_rebuilt(bundled_tokenizer, tmp_path, damage):
    cache = ReferenceCache(tmp_path / "cache")
    model, tok = tiny_model(seed=0, tokenizer=bundled_tokenizer)
    dataset, _ = prepare_preference_rows(fixture_pairs(4), tok, 256)
    plan = dpo_plan(max_length=256)
    first = build_dpo_trainer(plan, model, tok, dataset, tmp_path / "a", reference_cache=cache)
    path = cache.path(first.reference_lookups["train"]["key"])
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flip":
        data[-3] ^= 0xFF  # a bit of the last stored value
        path.write_bytes(bytes(data))
    else:  # another key's file copied over this one
        other = cache.path("0" * 64)
        other.write_bytes(bytes(data))
        cache.save("0" * 64, torch.zeros(4), torch.zeros(4), {})
        path.write_bytes(other.read_bytes())
    model2, _ = tiny_model(seed=0, tokenizer=bundled_tokenizer)
    second = build_dpo_trainer(plan, model2, tok, dataset, tmp_path / "b", reference_cache=cache)
    assert second.reference_lookups["train"]["found"].startswith("corrupt")
    assert second.reference_forward_passes > 0
    assert second.train_dataset["ref_chosen_logps"] == pytest.approx(first.train_dataset["ref_chosen_logps"])
    third = build_dpo_trainer(plan, tiny_model(seed=0, tokenizer=bundled_tokenizer)[0], tok, dataset,
                              tmp_path / "c", reference_cache=cache)  # fmt: skip
    assert third.reference_lookups["train"]["found"] == "hit"  # the rebuilt file is whole again


def learnable_pairs(n, offset=0):
    """Pairs where the chosen reply always says 'yes' and the rejected one 'no': learnable from any prompt."""
    topics = ["apples", "rivers", "numbers", "music", "stars", "trains", "clouds", "books", "cats", "bridges"]
    rows = []
    for i in range(offset, offset + n):
        prompt = [{"role": "user", "content": f"Question {i}: do you like {topics[i % len(topics)]}?"}]
        rows.append({
            "chosen": [*prompt, {"role": "assistant", "content": "yes"}],
            "rejected": [*prompt, {"role": "assistant", "content": "no"}],
        })  # fmt: skip
    return rows


def test_dpo_learns_a_learnable_preference(bundled_tokenizer, tmp_path):
    """Held-out pair accuracy (ties count one half) rises from 0.5 to at least 0.9."""
    model, tok = tiny_model(seed=0, tokenizer=bundled_tokenizer)
    plan = dpo_plan(batch=8, cap=8, steps=12, lr=2e-3, max_length=128)
    result = train_dpo(
        plan,
        tmp_path / "dpo",
        model=model,
        tokenizer=tok,
        rows=learnable_pairs(48),
        eval_rows=learnable_pairs(16, offset=100),
        reference_cache=tmp_path / "cache",
        verbose=False,
    )
    print(
        f"held-out accuracy {result.eval_accuracy_before} -> {result.eval_accuracy}; losses {result.train_loss}"
    )
    assert result.eval_accuracy_before == pytest.approx(0.5)
    assert result.eval_accuracy >= 0.9
    assert result.train_loss[-1][1] < result.train_loss[0][1]
    assert result.curves["margins"][-1][1] > 0 and result.tokens_seen > 0
    assert len(result.curves["accuracies"]) == result.steps == 12
    manifest = read_manifest(tmp_path / "dpo")
    assert manifest["stage"] == "dpo" and manifest["extra"]["reference"]["forward_passes"] > 0


def test_train_dpo_reads_reference_from_cache_and_checks_parent(bundled_tokenizer, tmp_path):
    model, tok = tiny_model(seed=0, tokenizer=bundled_tokenizer)
    parent = tmp_path / "sft"
    model.save_pretrained(parent)
    tok.save_pretrained(parent)
    write_manifest(parent, stage="sft", recipe=None, data=None, tokenizer=tok, seed=0)
    plan = dpo_plan(steps=1, max_length=128)
    kwargs = dict(rows=learnable_pairs(8), reference_cache=tmp_path / "cache", verbose=False)
    first = train_dpo(plan, tmp_path / "a", parent=parent, **kwargs)
    second = train_dpo(plan, tmp_path / "b", parent=parent, **kwargs)
    assert first.reference["forward_passes"] > 0 and first.reference["found"] == "missing"
    assert second.reference["forward_passes"] == 0 and second.reference["found"] == "hit"
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["parent"]["path"].endswith("sft")

    rm = tmp_path / "rm"
    model.save_pretrained(rm)
    tok.save_pretrained(rm)
    write_manifest(rm, stage="rm", recipe=None, data=None, tokenizer=tok, seed=0)
    with pytest.raises(DPOError, match="starts from an SFT checkpoint"):
        train_dpo(plan, tmp_path / "c", parent=rm, **kwargs)


def test_bad_pairs_are_reported_and_an_empty_set_is_an_error(bundled_tokenizer, tmp_path):
    model, tok = tiny_model(seed=0, tokenizer=bundled_tokenizer)
    good = learnable_pairs(4)
    same = {"chosen": good[0]["chosen"], "rejected": good[0]["chosen"]}
    other_prompt = {"chosen": good[1]["chosen"], "rejected": good[2]["rejected"]}
    plan = dpo_plan(steps=1, max_length=128)
    result = train_dpo(plan, tmp_path / "a", model=model, tokenizer=tok, rows=[*good, same, other_prompt],
                       reference_cache=tmp_path / "cache", verbose=False)  # fmt: skip
    skipped = {s.index: s.reason for s in result.data_report.skipped}
    assert set(skipped) == {4, 5}
    assert "chosen equals rejected" in skipped[4] and "prompt" in skipped[5]
    with pytest.raises(PreferenceDataError, match="empty|no "):
        train_dpo(plan, tmp_path / "b", model=model, tokenizer=tok, rows=[], verbose=False)


def test_pair_rewards_of_the_untrained_policy_are_ties(bundled_tokenizer, tmp_path):
    model, tok = tiny_model(seed=0, tokenizer=bundled_tokenizer)
    dataset, _ = prepare_preference_rows(learnable_pairs(4), tok, 128)
    plan = dpo_plan(max_length=128)
    trainer = build_dpo_trainer(plan, model, tok, dataset, tmp_path, eval_dataset=dataset,
                                reference_cache=tmp_path / "cache")  # fmt: skip
    passes = trainer.reference_forward_passes
    rewards = pair_rewards(trainer)
    assert torch.all(rewards["chosen"] == 0) and float(rewards["accuracy"]) == 0.5
    assert trainer.reference_forward_passes == passes  # the policy pass is not counted as a reference pass
