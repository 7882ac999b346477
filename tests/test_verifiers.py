"""The RLVR verifiers: GSM8K's last number, MATH through math-verify, IF constraints through lm-eval's IFEval
checkers, every ground-truth format of the RLVR mixture, and the rows no verifier can read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from smoltulu_utils import verifiers as V
from smoltulu_utils.data import load_rows, read_jsonl
from smoltulu_utils.paths import FIXTURES_DIR, KIT_ROOT

SHARED = Path(os.environ.get("SMOLTULU_SHARED") or KIT_ROOT.parent / "shared")
REAL = SHARED / "training_samples" / "RLVR-GSM-MATH-IF-Mixed-Constraints"


@pytest.fixture(scope="module")
def fixture_rows():
    return [dict(r) for r in load_rows("rlvr_mixed", mirror=FIXTURES_DIR)]


def _real(name: str) -> Path:
    path = REAL / name
    if not path.is_file():
        pytest.skip(f"real rows absent: {path} (set SMOLTULU_SHARED to the folder holding them)")
    return path


# ---------------------------------------------------------------------------------------------- GSM8K
@pytest.mark.parametrize(
    "response, expected",
    [
        ("4 x 3 = 12, plus 2 is 14. So the answer is 14.", True),
        ("So the answer is 1,4.", True),  # commas between digits go, as in open-instruct
        ("The total is 14.00", True),  # compared as numbers
        ("14 items, then 2 more: 16", False),  # the last number counts
        ("no number at all", False),
        ("The answer is -14.", False),
    ],
)
def test_gsm8k_takes_the_last_number(response, expected):
    assert V.verify_gsm8k(response, "14") is expected


def test_gsm8k_ground_truth_with_thousands_comma_and_negative_answers():
    assert V.verify_gsm8k("so it costs 3380 dollars", "3,380")
    assert V.verify_gsm8k("the change is -5", "-5")
    assert V.last_number("from 1,104 down to 7.5") == "7.5"
    assert V.last_number("none") is None


def test_every_fixture_gsm8k_row_verifies_its_answer_and_refuses_another(fixture_rows):
    rows = [r for r in fixture_rows if r["dataset"] == "gsm8k"]
    assert len(rows) == 10
    for row in rows:
        answer = row["ground_truth"]
        assert V.verify(f"Let me compute. So the answer is {answer}.", row).verified
        assert not V.verify(f"So the answer is {int(answer) + 1}.", row).verified


# ----------------------------------------------------------------------------------------------- MATH
@pytest.mark.parametrize(
    "ground_truth, response",
    [
        ("\\frac{3}{4}", "so $\\boxed{\\frac{6}{8}}$"),
        ("\\frac{3}{4}", "The answer is $\\boxed{0.75}$."),
        ("x^2-4", "Expanding gives $\\boxed{(x-2)(x+2)}$."),
        ("100^\\circ", "The angle is $\\boxed{100}$ degrees."),
        ("\\text{(C)}", "The answer is \\boxed{\\text{(C)}}"),
    ],
)
def test_math_equivalence_through_math_verify(ground_truth, response):
    assert V.verify_math(response, ground_truth)


def test_math_refuses_a_wrong_or_missing_answer():
    assert not V.verify_math("so $\\boxed{\\frac{2}{3}}$", "\\frac{3}{4}")
    verdict = V.verify("I cannot tell.", V.parse_ground_truth("MATH", "12"))
    assert not verdict.verified and verdict.kind == "math"


def test_every_fixture_math_row_verifies_its_boxed_answer(fixture_rows):
    rows = [r for r in fixture_rows if r["dataset"] == "MATH"]
    assert len(rows) == 10
    for row in rows:
        assert V.verify(f"Therefore the answer is $\\boxed{{{row['ground_truth']}}}$.", row).verified, row
        assert not V.verify("Therefore the answer is $\\boxed{987654}$.", row).verified


@pytest.mark.shared
def test_every_real_row_parses_and_verifies_its_own_answer():
    rows = read_jsonl(_real("train_sample100_gsm8k_math.jsonl"))
    assert len(rows) == 100
    kinds = {"gsm8k": 0, "math": 0}
    for row in rows:
        target = V.parse_target(row)
        kinds[target.kind] += 1
        truth = row["ground_truth"]
        right = (
            f"So the answer is {truth}." if target.kind == "gsm8k" else f"The answer is $\\boxed{{{truth}}}$."
        )
        assert V.verify(right, target).verified, row["ground_truth"]
        assert not V.verify("So the answer is $\\boxed{987654}$ = 987654.", target).verified
    assert kinds == {"gsm8k": 48, "math": 52}


# ------------------------------------------------------------------------------------------ IFEval rows
# One (follows, breaks) pair of responses per IF row of the fixtures, in file order.
IF_RESPONSES = [
    ("hello neighbour, could you water my plants while i am away?", "Hello Neighbour, could you water them?"),
    ("Please water the plants twice a week and thank you", "Please water the plants, twice a week."),
    ("* one point\n* two point\n* three point", "* one point\n* two point"),
    ("<<A Note>>\nPlease water my plants.", "A Note\nPlease water my plants."),
    (
        "Thanks for the help.\nP.S. The key is under the mat.",
        "Thanks for the help. The key is under the mat.",
    ),
    (" ".join(["word"] * 55), " ".join(["word"] * 20)),
    (
        "Here is the plan. Is there anything else I can help with?",
        "Is there anything else I can help with? Bye.",
    ),
    ("The park was quiet and calm today.", "The park was noisy and crowded today."),
    ("This bag is durable and lightweight.", "This bag is durable."),
    ("First paragraph here.\n* * *\nSecond paragraph here.", "Only one paragraph here."),
]


def test_every_fixture_if_row_maps_to_lm_eval_checkers_and_judges_responses(fixture_rows):
    rows = [r for r in fixture_rows if r["dataset"] == "ifeval"]
    assert len(rows) == len(IF_RESPONSES) == 10
    for row, (follows, breaks) in zip(rows, IF_RESPONSES, strict=True):
        target = V.parse_target(row)
        assert target.constraint == row["constraint"] and target.constraint_type == row["constraint_type"]
        assert all(isinstance(c, V.Check) for c in target.value)
        good, bad = V.verify(follows, target), V.verify(breaks, target)
        assert good.verified and good.error is None, (target.describe(), good)
        assert not bad.verified and bad.error is None, (target.describe(), bad)


def test_an_empty_response_follows_no_instruction():
    assert not V.verify_ifeval("   ", {"func_name": "validate_no_commas"})


def test_null_arguments_present_or_left_out_give_the_same_checks():
    full = {k: None for k in ("N", "quantifier", "end_phrase", "keyword_list", "word", "letter", "i")}
    with_nulls = json.dumps({"func_name": "verify_bullet_points", **full, "N": 2})
    without = json.dumps({"func_name": "verify_bullet_points", "N": 2})
    assert V.parse_ground_truth("ifeval", with_nulls).value == V.parse_ground_truth("ifeval", without).value


def test_every_ground_truth_format_of_the_if_rows_is_read():
    expected = (V.Check("keywords:existence", (("keywords", ("durable",)),)),)
    forms = [
        json.dumps({"func_name": "verify_keywords", "keyword_list": ["durable"]}),  # Tulu 3 RLVR
        {"func_name": "verify_keywords", "keyword_list": ["durable"]},  # already parsed
        str({"func_name": "verify_keywords", "keyword_list": ["durable"]}),  # a Python literal export
        json.dumps(
            [{"instruction_id": ["keywords:existence"], "kwargs": [{"keywords": ["durable"]}]}]
        ),  # IFEvalG
        {
            "instruction_id_list": ["keywords:existence"],
            "kwargs": [{"keywords": ["durable"]}],
        },  # google/IFEval
    ]
    for form in forms:
        assert V.parse_target({"dataset": "ifeval", "ground_truth": form}).value == expected, form


def test_a_letter_lm_eval_would_draw_at_random_is_the_same_in_every_run():
    """google/IFEval key 1122 asks for the "letter" '#': lm-eval draws a random one, the kit a seeded one."""
    import random

    spec = {
        "instruction_id_list": ["keywords:letter_frequency"],
        "kwargs": [{"let_relation": "at least", "letter": "#", "let_frequency": 4}],
    }
    target = V.parse_target({"dataset": "ifeval", "ground_truth": spec})
    response = "abcdefghijklm " * 4  # half the letters four times: a random letter passes half the time
    verdicts = []
    for run in range(20):
        V._checker.cache_clear()  # a fresh process builds its checkers again
        random.seed(1000 + run)
        state = random.getstate()
        verdicts.append(V.verify(response, target).verified)
        assert random.getstate() == state, "the global random state is restored"
    assert len(set(verdicts)) == 1, verdicts


def test_exactly_and_around_become_two_lm_eval_relations():
    frequency = {"func_name": "verify_keyword_frequency", "word": "plant", "N": 2}
    assert V.verify_ifeval("plant and plant", frequency)
    assert not V.verify_ifeval("plant only", frequency)
    assert not V.verify_ifeval("plant plant plant", frequency)
    around = {"func_name": "validate_word_constraint", "N": 20, "quantifier": "around"}  # tolerance 2
    assert V.verify_ifeval(" ".join(["w"] * 22), around)
    assert not V.verify_ifeval(" ".join(["w"] * 23), around)
    at_most = {"func_name": "validate_word_constraint", "N": 5, "quantifier": "at most"}
    assert V.verify_ifeval("one two three four five", at_most)
    assert not V.verify_ifeval("one two three four five six", at_most)


def test_validate_choice_reads_its_options_from_a_tuple_string():
    spec = {"func_name": "validate_choice", "options": "('My answer is yes.', 'My answer is no.')"}
    assert V.verify_ifeval("Well... My answer is no.", spec)
    assert not V.verify_ifeval("Maybe.", spec)


@pytest.mark.shared
def test_the_constructed_if_example_of_the_shared_samples_is_read():
    row = json.loads(_real("CONSTRUCTED_if_row_example.json").read_text())
    target = V.parse_target(row)
    assert [c.instruction_id for c in target.value] == ["change_case:english_lowercase"]
    assert V.verify("dear neighbour, please water my plants while i am away. thank you!", target).verified


# ------------------------------------------------------------------------------------------- bad rows
@pytest.mark.parametrize(
    "row, words",
    [
        ({"dataset": "gsm8k", "ground_truth": "about twelve"}, "not a number"),
        ({"dataset": "MATH", "ground_truth": "???"}, "cannot be parsed"),
        ({"dataset": "MATH", "ground_truth": ""}, "no ground truth"),
        ({"dataset": "gsm8k", "ground_truth": None}, "no ground truth"),
        ({"dataset": "ifeval", "ground_truth": "{not json"}, "neither JSON"),
        ({"dataset": "ifeval", "ground_truth": '{"func_name": "verify_magic"}'}, "unknown verifier"),
        ({"dataset": "ifeval", "ground_truth": '{"func_name": "verify_bullet_points"}'}, "missing argument"),
        (
            {"dataset": "ifeval", "ground_truth": '{"func_name": "verify_bullet_points", "N": "x"}'},
            "whole number",
        ),
        (
            {"dataset": "ifeval", "ground_truth": '[{"instruction_id": ["no:such"], "kwargs": [{}]}]'},
            "no checker",
        ),
        ({"dataset": "code", "ground_truth": "1"}, "unknown subset"),
    ],
)
def test_unreadable_ground_truths_raise_a_kit_error_naming_the_problem(row, words):
    with pytest.raises(V.GroundTruthError, match=words) as info:
        V.parse_target(row)
    assert isinstance(info.value, V.KitError)


def test_a_checker_that_fails_on_a_response_gives_an_error_verdict(monkeypatch):
    target = V.parse_ground_truth("ifeval", json.dumps({"func_name": "validate_title"}))
    checker = V._checker(target.value[0])

    def broken(value):
        raise RuntimeError("checker broke")

    monkeypatch.setattr(checker, "check_following", broken)
    verdict = V.verify("<<Title>> text", target)
    assert not verdict.verified and "checker broke" in verdict.error


def test_verifiable_reward_is_ten_for_a_verified_answer():
    assert V.verifiable_reward(V.verify("so 14", V.parse_ground_truth("gsm8k", "14"))) == 10.0
    assert V.verifiable_reward(False) == 0.0
