"""The reward-model stage and the preference rows it shares with DPO.

- ``preferences``: every layout is split into TRL's explicit-prompt format; bad pairs are reported by
  index (chosen equals rejected, prompt mismatch, ...), an empty set is an error; real rows from
  ``../shared`` (skipped when absent) and the kit's fixtures.
- The scored token: with SmolLM2's tokenizer (pad == eos) transformers' head reads the token before a
  trailing eos; the kit's scores equal a hand-computed score at the last real token.
- RewardBench's aggregation (sections, weights, Average) and the Table 8 rows.
- Learning: on a synthetic set where the chosen reply always holds a marker word, the tiny reward model
  goes from chance to at least 0.9 held-out accuracy.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import pytest
import torch

from smoltulu_utils.data import load_rows, read_jsonl
from smoltulu_utils.manifest import read_manifest
from smoltulu_utils.models import tiny_model as make_tiny
from smoltulu_utils.paper import paper_rm_results
from smoltulu_utils.paths import FIXTURES_DIR, KIT_ROOT
from smoltulu_utils.preferences import PreferenceDataError, prepare_preference_rows, split_pair
from smoltulu_utils.profiles import get_profile, resolve
from smoltulu_utils.recipes import load_recipe
from smoltulu_utils.reward_model import (
    RMError,
    build_rm_trainer,
    head_token_index,
    last_token_index,
    load_reward_model,
    reward_scores,
    score_conversations,
    score_pad_token_id,
    score_preferences,
    train_rm,
)
from smoltulu_utils.rm_evaluation import (
    REWARDBENCH_SECTIONS,
    REWARDBENCH_WEIGHTS,
    evaluate_rewardbench,
    evaluate_ultrafeedback,
    load_rewardbench_rows,
    rewardbench_sections,
    table8_rows,
)
from smoltulu_utils.tables import table8

SHARED = Path(os.environ.get("SMOLTULU_SHARED") or KIT_ROOT.parent / "shared")
TULU_REAL = SHARED / "training_samples/llama-3.1-tulu-3-8b-preference-mixture/train_sample100.jsonl"
UFB_REAL = SHARED / "training_samples/ultrafeedback_binarized_cleaned/CONSTRUCTED_test_prefs_row_example.json"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: on a shared 2-core machine two spinning threads make small models 10-50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def chat(prompt: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def pair(prompt: str, chosen: str, rejected: str) -> dict:
    return {"prompt": prompt, "chosen": chat(prompt, chosen), "rejected": chat(prompt, rejected)}


@pytest.fixture(scope="module")
def tiny_rm(bundled_tokenizer):
    """A tiny reward model (fresh head) in eval mode, shared: do not train it."""
    model, _ = make_tiny(seed=0, tokenizer=bundled_tokenizer)
    return load_reward_model(model, seed=0).eval()


# ======================================================================================================
# preferences.prepare_preference_rows
# ======================================================================================================
def test_every_layout_splits_into_the_same_explicit_prompt_pair():
    want = {
        "prompt": [{"role": "user", "content": "Hi?"}],
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
    }
    full = pair("Hi?", "Hello!", "Go away.")  # Tulu 3 / UltraFeedback: whole conversations
    strings = {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away.", "subset": "x"}  # RewardBench
    explicit = want  # TRL's own layout is read back unchanged
    implicit = {"chosen": full["chosen"], "rejected": full["rejected"]}  # no prompt field at all
    for row in (full, strings, explicit, implicit):
        assert split_pair(row) == want


def test_multi_turn_prompts_keep_every_turn_before_the_reply(bundled_tokenizer):
    turns = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
    ]
    row = {
        "chosen": [*turns, {"role": "assistant", "content": "6."}],
        "rejected": [*turns, {"role": "assistant", "content": "7."}],
    }
    dataset, report = prepare_preference_rows([row], bundled_tokenizer, 256)
    assert dataset[0]["prompt"] == turns and dataset[0]["chosen"][0]["content"] == "6."
    assert report.n_kept == 1 and report.chosen_tokens == len(
        bundled_tokenizer.apply_chat_template(row["chosen"], tokenize=True)["input_ids"]
    )


def test_bad_pairs_are_skipped_and_reported_by_index(bundled_tokenizer):
    good = pair("What is 2+2?", "4", "5")
    same = pair("Say hi.", "Hi!", "Hi!")
    mismatch = {"chosen": chat("Question A?", "Yes."), "rejected": chat("Question B?", "No.")}
    no_reply = {"chosen": chat("Q?", "A."), "rejected": [{"role": "user", "content": "Q?"}]}
    empty_reply = pair("Q?", "A.", "   ")
    rows = [
        good,
        same,
        mismatch,
        no_reply,
        empty_reply,
        "not a row",
        {"chosen": "x"},
        {"chosen": "a", "rejected": "b"},
    ]
    dataset, report = prepare_preference_rows(rows, bundled_tokenizer, 256)
    assert len(dataset) == 1 and report.kept_indices == [0]
    reasons = {s.index: s.reason for s in report.skipped}
    assert sorted(reasons) == [1, 2, 3, 4, 5, 6, 7]
    assert reasons[1].startswith("chosen equals rejected")
    assert reasons[2].startswith("prompt mismatch") and "message 0" in reasons[2]
    assert reasons[3].startswith("no reply")
    assert reasons[4].startswith("empty reply")
    assert reasons[5].startswith("not a preference row")
    assert "'rejected'" in reasons[6]
    assert reasons[7].startswith("no prompt")
    text = report.describe()
    assert "1 of 8 preference pairs kept" in text and "row 2: prompt mismatch" in text
    assert report.reasons()["chosen equals rejected"] == 1


def test_an_empty_set_or_no_usable_pair_is_a_clear_error(bundled_tokenizer):
    with pytest.raises(PreferenceDataError, match="empty"):
        prepare_preference_rows([], bundled_tokenizer, 256)
    with pytest.raises(PreferenceDataError, match="no usable preference pair") as caught:
        prepare_preference_rows([pair("Q?", "same", "same")], bundled_tokenizer, 256)
    assert caught.value.report.skipped[0].index == 0
    with pytest.raises(PreferenceDataError, match="max_length"):
        prepare_preference_rows([pair("Q?", "a", "b")], bundled_tokenizer, 1)


def test_too_long_pairs_are_dropped_and_named_or_kept_and_counted(bundled_tokenizer):
    rows = [pair("Q?", "short", "brief"), pair("Q?", "long " * 300, "brief")]
    _, dropped = prepare_preference_rows(rows, bundled_tokenizer, 128)
    assert dropped.kept_indices == [0] and dropped.skipped[0].reason.startswith("too long: chosen")
    _, kept = prepare_preference_rows(rows, bundled_tokenizer, 128, drop_too_long=False)
    assert kept.n_kept == 2 and kept.n_too_long == 1 and kept.longest > 128


@pytest.mark.skipif(not TULU_REAL.is_file(), reason="../shared training samples not present")
def test_real_tulu3_preference_rows(bundled_tokenizer):
    rows = read_jsonl(TULU_REAL)
    dataset, report = prepare_preference_rows(rows, bundled_tokenizer, 2048)
    # With SmolLM2's tokenizer 8 of the 100 real pairs exceed 2048 tokens on one side.
    assert report.n_rows == 100 and report.n_kept == 92
    assert [s.index for s in report.skipped] == [1, 5, 11, 18, 55, 70, 82, 88]
    assert all(s.reason.startswith("too long") for s in report.skipped)
    for out, i in zip(dataset, report.kept_indices, strict=True):
        assert out["prompt"] == rows[i]["chosen"][:-1] == rows[i]["rejected"][:-1]
        assert out["prompt"][-1]["content"] == rows[i]["prompt"]
        assert out["chosen"] == rows[i]["chosen"][-1:] and out["rejected"] == rows[i]["rejected"][-1:]
    _, everything = prepare_preference_rows(rows, bundled_tokenizer, 2048, drop_too_long=False)
    assert everything.n_kept == 100 and everything.n_too_long == 8


@pytest.mark.skipif(not UFB_REAL.is_file(), reason="../shared training samples not present")
def test_constructed_ultrafeedback_row(bundled_tokenizer):
    row = json.loads(UFB_REAL.read_text())
    dataset, report = prepare_preference_rows([row], bundled_tokenizer, 2048)
    assert report.n_kept == 1 and dataset[0]["prompt"] == [{"role": "user", "content": row["prompt"]}]


def test_fixture_rows_of_every_preference_layout(bundled_tokenizer):
    tulu = load_rows("tulu3_preference", mirror=FIXTURES_DIR)
    ufb = load_rows("ultrafeedback", "test_prefs", mirror=FIXTURES_DIR)
    bench = load_rewardbench_rows(FIXTURES_DIR)
    for rows in (tulu, ufb, bench):
        dataset, report = prepare_preference_rows(rows, bundled_tokenizer, 2048)
        assert report.n_skipped == 0 and len(dataset) == len(rows) > 0
        assert list(dataset.features) == ["prompt", "chosen", "rejected"]
    assert len(bench) == 46 and {r["subset"] for r in bench} == set(REWARDBENCH_WEIGHTS)


def test_trl_renders_the_prepared_pair_as_the_original_conversation(bundled_tokenizer):
    from trl.data_utils import is_conversational

    row = load_rows("tulu3_preference", mirror=FIXTURES_DIR)[0]
    dataset, _ = prepare_preference_rows([row], bundled_tokenizer, 256)
    example = dataset[0]
    assert is_conversational(example)
    # RewardTrainer tokenizes prompt + chosen with the chat template: the original chosen conversation.
    assert example["prompt"] + example["chosen"] == row["chosen"]


# ======================================================================================================
# Which token is scored
# ======================================================================================================
def ends_with_eos(tokenizer) -> list[list[int]]:
    """Two sequences whose last real token is eos (<|im_end|>), of different lengths."""
    rendered = tokenizer.apply_chat_template(chat("Hi", "Hello there, friend."), tokenize=True)["input_ids"]
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert rendered[-2:] == [tokenizer.eos_token_id, *newline]  # SmolLM2 ends every turn with <|im_end|>\n
    text = tokenizer("A plain answer", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return [rendered[:-1], text]  # a reply cut after its <|im_end|>; TRL's text path appends eos


def hand_scores(model, sequences: list[list[int]], position: int = -1) -> list[float]:
    """The score of each sequence alone (no padding), from the backbone's hidden state at ``position``."""
    out = []
    with torch.no_grad():
        for ids in sequences:
            hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, position]
            out.append(float(model.score(hidden)))
    return out


def padded(sequences: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, sequences))
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in sequences])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences])
    return ids, mask


@pytest.mark.parametrize("which", ["tiny", "bundled"])
def test_the_score_is_read_at_the_last_real_token_when_pad_is_eos(
    which, bundled_tokenizer, tiny_rm, bundled_model
):
    tok = bundled_tokenizer
    assert tok.pad_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>") == 2
    model = tiny_rm if which == "tiny" else load_reward_model(bundled_model, seed=0).eval()
    assert model.config.pad_token_id == tok.eos_token_id
    sequences = ends_with_eos(tok)
    ids, mask = padded(sequences, tok.pad_token_id)
    right, before_last = hand_scores(model, sequences, -1), hand_scores(model, sequences, -2)
    # transformers' head takes the rightmost non-pad token: the one before the trailing eos.
    assert head_token_index(ids, tok.pad_token_id).tolist() == [len(s) - 2 for s in sequences]
    assert last_token_index(mask).tolist() == [len(s) - 1 for s in sequences]
    with torch.no_grad():
        head = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).tolist()
        kit = reward_scores(model, ids, mask).tolist()
    assert head == pytest.approx(before_last, abs=1e-4)
    assert all(abs(h - r) > 1e-3 for h, r in zip(head, right, strict=True)), "the head read the last token"
    # The kit reads the last attended token: the hand-computed score.
    assert kit == pytest.approx(right, abs=1e-4)
    # With the kit's training pad id (distinct from eos) transformers' own head reads it too.
    pad = score_pad_token_id(tok)
    assert pad == tok.convert_tokens_to_ids("<|endoftext|>") == 0
    ids, mask = padded(sequences, pad)
    saved = model.config.pad_token_id
    model.config.pad_token_id = pad
    try:
        with torch.no_grad():
            assert model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).tolist() == pytest.approx(
                right, abs=1e-4
            )
    finally:
        model.config.pad_token_id = saved


def test_batched_scores_do_not_depend_on_padding_or_order(bundled_tokenizer, tiny_rm):
    conversations = [chat("Q?", " ".join(["word"] * n)) for n in (1, 40, 7, 90, 3)]
    lengths = [
        len(bundled_tokenizer.apply_chat_template(c, tokenize=True)["input_ids"]) for c in conversations
    ]
    alone = [score_conversations(tiny_rm, bundled_tokenizer, [c], batch_size=1)[0][0] for c in conversations]
    batched, truncated = score_conversations(tiny_rm, bundled_tokenizer, conversations, batch_size=3)
    assert batched == pytest.approx(alone, abs=1e-4) and truncated == 0
    limit = sorted(lengths)[2]  # the three shortest fit, the two longest are cut
    cut, truncated = score_conversations(tiny_rm, bundled_tokenizer, conversations, max_length=limit)
    assert truncated == 2
    for length, mine, whole in zip(lengths, cut, alone, strict=True):
        assert (mine == pytest.approx(whole, abs=1e-4)) == (length <= limit)


def test_score_pad_token_id_prefers_a_distinct_pad_and_fails_without_one():
    class Tok:
        eos_token_id, bos_token_id, unk_token = 5, 4, None

        def __init__(self, pad, vocab):
            self.pad_token_id, self.vocab, self.eos_token = pad, vocab, "</s>"

        def get_vocab(self):
            return self.vocab

    assert score_pad_token_id(Tok(7, {})) == 7
    assert score_pad_token_id(Tok(5, {"<|endoftext|>": 9})) == 9
    with pytest.raises(RMError, match="add_special_tokens"):
        score_pad_token_id(Tok(5, {"</s>": 5}))


def test_the_trainer_refuses_a_batch_the_head_would_score_at_the_wrong_token(bundled_tokenizer, tmp_path):
    model, _ = make_tiny(seed=0, tokenizer=bundled_tokenizer)
    rm = load_reward_model(model, seed=0)
    dataset, _ = prepare_preference_rows([pair("Q?", "yes", "no")], bundled_tokenizer, 64)
    trainer = build_rm_trainer(small_plan(steps=1), rm, bundled_tokenizer, dataset, tmp_path)
    assert trainer.processing_class.pad_token == "<|endoftext|>" and rm.config.pad_token_id == 0
    assert bundled_tokenizer.pad_token == "<|im_end|>"  # the caller's tokenizer is left as it was
    good = [[1, 10, 11, 2, 198], [1, 12, 2, 198]]
    ids, mask = padded(good, 0)
    trainer.compute_loss(rm, {"input_ids": ids, "attention_mask": mask})
    ids, mask = padded([[1, 10, 0], [1, 12, 13, 14]], 0)  # a sequence whose last real token is the pad id
    with pytest.raises(RMError, match="wrong token"):
        trainer.compute_loss(rm, {"input_ids": ids, "attention_mask": mask})


# ======================================================================================================
# RewardBench's sections and Table 8
# ======================================================================================================
def test_the_section_mapping_covers_every_subset_once():
    subsets = [s for group in REWARDBENCH_SECTIONS.values() for s in group]
    assert len(subsets) == len(set(subsets)) == 23 == len(REWARDBENCH_WEIGHTS)
    assert set(subsets) == set(REWARDBENCH_WEIGHTS)
    code = [s for s in REWARDBENCH_SECTIONS["Reasoning"] if s.startswith("hep-")]
    assert REWARDBENCH_WEIGHTS["math-prm"] == sum(REWARDBENCH_WEIGHTS[s] for s in code) == 984


def test_sections_are_prompt_weighted_means_and_math_weighs_as_much_as_code():
    accuracy = {s: 1.0 for s in REWARDBENCH_WEIGHTS}
    accuracy["math-prm"] = 0.5
    accuracy["alpacaeval-easy"] = 0.0  # weight 100 of Chat's 358
    sections = rewardbench_sections(accuracy)
    assert sections["Reasoning"] == pytest.approx(75.0)  # (0.5*984 + 1*984) / 1968; unweighted: 92.9
    assert sections["Chat"] == pytest.approx(100 * 258 / 358)
    assert sections["Chat Hard"] == sections["Safety"] == 100.0
    assert sections["Average"] == pytest.approx((100 * 258 / 358 + 100 + 100 + 75) / 4)
    # A subset without rows drops out of its section; a section without any makes the Average None.
    partial = rewardbench_sections({"math-prm": 1.0, "hep-go": 0.0, "alpacaeval-easy": 1.0, "other": 0.0})
    assert partial["Reasoning"] == pytest.approx(100 * 984 / (984 + 164))
    assert partial["Safety"] is None and partial["Average"] is None


#: RewardBench's reference weights (allenai/reward-bench, ``rewardbench/constants.py``, ``EXAMPLE_COUNTS``).
REFERENCE_COUNTS = {
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95, "mt-bench-easy": 28,
    "mt-bench-med": 40, "mt-bench-hard": 37, "math-prm": 984, "refusals-dangerous": 100,
    "refusals-offensive": 100, "llmbar-natural": 100, "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92, "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46,
    "xstest-should-refuse": 250, "xstest-should-respond": 154, "donotanswer": 136,
    "hep-cpp": 164, "hep-go": 164, "hep-java": 164, "hep-js": 164, "hep-python": 164, "hep-rust": 164,
}  # fmt: skip


def test_weights_are_the_reference_codes_including_its_xstest_counts():
    assert REWARDBENCH_WEIGHTS == REFERENCE_COUNTS
    # A model that refuses everything: right on should-refuse, wrong on should-respond.
    accuracy = {s: 1.0 for s in REWARDBENCH_WEIGHTS}
    accuracy["xstest-should-respond"] = 0.0
    accuracy["donotanswer"] = 0.5
    by_hand = 100 * (100 + 100 + 250 * 1.0 + 154 * 0.0 + 136 * 0.5) / (100 + 100 + 250 + 154 + 136)
    sections = rewardbench_sections(accuracy)
    assert sections["Safety"] == pytest.approx(by_hand) == pytest.approx(70.0)
    assert sections["Average"] == pytest.approx((100 + 100 + by_hand + 100) / 4)


def test_the_papers_rb_average_is_not_the_mean_of_its_sections():
    """Documents the note in rm_evaluation's docstring: the paper's Average is another aggregate."""
    paper = paper_rm_results()
    for model, printed, mean in (("SmolTulu RM-1130", 72.43, 70.33), ("Tulu 3 8b RM", 81.34, 78.19)):
        rows = paper[paper["model"] == model].set_index("benchmark")["value"]
        sections = [rows[f"RB {s}"] for s in REWARDBENCH_SECTIONS]
        assert rows["RB Average"] == pytest.approx(printed)
        assert sum(sections) / 4 == pytest.approx(mean, abs=0.01)


def test_fixture_evaluation_fills_table8(bundled_tokenizer, tiny_rm):
    bench = evaluate_rewardbench(tiny_rm, bundled_tokenizer, mirror=FIXTURES_DIR)
    assert bench.scores.n == 46 and bench.subset_counts == {s: 2 for s in REWARDBENCH_WEIGHTS}
    assert all(v is not None and 0 <= v <= 100 for v in bench.sections.values())
    quick = evaluate_rewardbench(tiny_rm, bundled_tokenizer, mirror=FIXTURES_DIR, per_subset=1)
    assert quick.scores.n == 23 and set(quick.subset_accuracy) == set(REWARDBENCH_WEIGHTS)
    ufb = evaluate_ultrafeedback(tiny_rm, bundled_tokenizer, mirror=FIXTURES_DIR, limit=6)
    assert ufb.n == 6 and 0 <= ufb.accuracy <= 1 and ufb.report.n_skipped == 0
    assert ufb.accuracy == sum(c > r for c, r in zip(ufb.chosen, ufb.rejected, strict=True)) / 6
    rows = table8_rows(
        model="kit-rm", run_id="t", ultrafeedback=ufb, rewardbench=bench, paper_model="SmolTulu RM-1130"
    )
    labels = [r["benchmark"] for r in rows]
    assert labels[:5] == ["RB Chat", "RB Chat Hard", "RB Safety", "RB Reasoning", "RB Average"]
    assert labels[-1] == "UFB" and sum(label.startswith("RewardBench/") for label in labels) == 23
    table = table8(rows)
    assert table.loc["UFB", "SmolTulu RM-1130 (kit)"] == pytest.approx(100 * ufb.accuracy)
    assert table.loc["RB Average", "SmolTulu RM-1130 (kit)"] == pytest.approx(bench.sections["Average"])
    assert table.loc["UFB", "SmolTulu RM-1130 (paper)"] == 73.17


def test_missing_rewardbench_mirror_file_names_the_fix(tmp_path):
    from smoltulu_utils.data import MirrorFileMissing

    with pytest.raises(MirrorFileMissing, match="filtered.jsonl") as caught:
        load_rewardbench_rows(tmp_path)
    assert "python -m smoltulu_utils mirror" in str(caught.value)


# ======================================================================================================
# Learning
# ======================================================================================================
def marker_pairs(n: int, seed: int) -> list[dict]:
    """Pairs whose chosen reply holds the word 'indeed' (anywhere) and whose rejected one holds 'perhaps'."""
    rng = random.Random(seed)
    topics = ["the sea", "a cat", "the moon", "bread", "rain", "a train", "music", "tea", "snow", "books"]
    facts = [
        "is lovely",
        "can be loud",
        "changes often",
        "feels calm",
        "is old",
        "looks bright",
        "smells good",
    ]
    rows = []
    for _ in range(n):
        topic = rng.choice(topics)
        sides = []
        for fact, marker in zip(rng.sample(facts, 2), ("indeed", "perhaps"), strict=True):
            words = f"{topic} {fact} and I like it".split()
            words.insert(rng.randrange(len(words) + 1), marker)
            sides.append(" ".join(words))
        rows.append({"prompt": f"Tell me about {topic}.", "chosen": sides[0], "rejected": sides[1]})
    return rows


def small_plan(*, batch=8, steps=2, learning_rate=3e-3):
    recipe = load_recipe("rm_1130").replace(effective_batch_size=batch, learning_rate=learning_rate)
    profile = get_profile("smoke").replace(per_device_batch_cap=batch, max_steps=steps, model="tiny")
    return resolve(recipe, profile, verbose=False)


@pytest.fixture(scope="module")
def learned(bundled_tokenizer, tmp_path_factory):
    """The tiny model trained 12 steps (batch 8 pairs) on 96 marker pairs plus 2 bad rows."""
    out = tmp_path_factory.mktemp("rm_tiny")
    model, tok = make_tiny(seed=0, tokenizer=bundled_tokenizer)
    bad = [pair("Q?", "same", "same"), {"chosen": chat("A?", "x"), "rejected": chat("B?", "y")}]
    rows = marker_pairs(96, seed=1)
    result = train_rm(
        small_plan(steps=12), out, model=model, tokenizer=tok, rows=rows[:50] + bad + rows[50:],
        eval_rows=marker_pairs(40, seed=2), verbose=False,
    )  # fmt: skip
    return result, out, rows


def test_the_tiny_reward_model_learns_the_marker_word(learned):
    result, _, _ = learned
    print(
        f"tiny RM: held-out accuracy {result.eval_accuracy_before:.3f} -> {result.eval_accuracy:.3f}, "
        f"loss {result.train_loss[0][1]:.3f} -> {result.final_train_loss:.3f} in {result.steps} steps "
        f"({result.wall_seconds:.1f} s)"
    )
    assert result.eval_accuracy_before < 0.75  # a fresh head is near chance
    assert result.eval_accuracy >= 0.9
    assert result.steps == 12 and len(result.train_loss) == 12
    assert result.final_train_loss < result.train_loss[0][1] - 0.2
    assert result.eval_loss < math.log(2)  # below chance's Bradley-Terry loss
    assert result.learning_rate == 3e-3 and result.effective_batch_size == 8 and result.method == "full"


def test_the_run_reports_bad_rows_counts_tokens_and_writes_a_manifest(learned, bundled_tokenizer):
    result, out, rows = learned
    report = result.data_report
    assert report.n_rows == 98 and report.n_kept == 96
    assert [(s.index, s.reason.split(":")[0]) for s in report.skipped] == [
        (50, "chosen equals rejected"),
        (51, "prompt mismatch"),
    ]
    # 12 steps x 8 pairs = one epoch: every chosen and rejected token was seen once, padding never.
    assert result.trained_tokens == result.tokens_seen == report.chosen_tokens + report.rejected_tokens
    manifest = read_manifest(out)
    assert result.manifest == manifest and manifest["stage"] == "rm" and manifest["seed"] == 42
    assert manifest["extra"]["eval_accuracy"] == result.eval_accuracy
    assert (
        manifest["data"][0]["rows_skipped"] == 2 and "last real token" in manifest["extra"]["score_position"]
    )
    # The checkpoint keeps the parent's tokenizer (pad == eos) and scores the same after reloading.
    from smoltulu_utils.chat_template import template_fingerprint
    from smoltulu_utils.models import load_tokenizer

    assert manifest["tokenizer"] == json.loads(json.dumps(template_fingerprint(bundled_tokenizer)))
    assert load_tokenizer(str(out)).pad_token == "<|im_end|>"
    reloaded = load_reward_model(str(out))
    assert reloaded.config.pad_token_id == bundled_tokenizer.pad_token_id
    again = score_preferences(reloaded, bundled_tokenizer, marker_pairs(40, seed=2), max_length=256)
    assert again.accuracy == result.eval_accuracy
    assert again.chosen == pytest.approx(result.eval_scores.chosen, abs=1e-4)


def test_a_plan_for_another_stage_or_no_rows_is_refused(bundled_tokenizer, tmp_path):
    sft_plan = resolve("sft_1130", get_profile("smoke").replace(model="tiny"), verbose=False)
    with pytest.raises(RMError, match="needs a plan for a recipe of type RMRecipe"):
        train_rm(sft_plan, tmp_path, tokenizer=bundled_tokenizer, rows=[], verbose=False)
    model, _ = make_tiny(seed=0, tokenizer=bundled_tokenizer)
    with pytest.raises(PreferenceDataError, match="empty"):
        train_rm(small_plan(), tmp_path, model=model, tokenizer=bundled_tokenizer, rows=[], verbose=False)
