"""Verifiers of the RLVR mixture: whether a response earns the verifiable reward.

As in Tulu 3 (open-instruct's ``ground_truth_utils``), the row's ``dataset``, lower-cased, picks the
verifier::

    target = parse_target(row)                 # GroundTruthError when the ground truth cannot be read
    verdict = verify("... so the answer is 14.", target)
    verdict.verified, verdict.extracted        # True, '14'
    verifiable_reward(verdict)                 # 10.0

- **gsm8k**: the response's last number (commas between digits removed) equals the ground truth.
- **MATH**: ``math-verify`` finds the response's answer equivalent to the ground truth.
- **ifeval**: every instruction passes lm-eval's IFEval checker for it (NLTK's splitter made offline by
  :func:`smoltulu_utils.nltk_data.ensure_punkt`); an empty response follows none. Checkers are built
  under :func:`seeded_random`, so an argument lm-eval fills at random is the same in every run.

IF ground truths (open-instruct ``if_functions`` calls, IFEvalG lists, google/IFEval rows) become
lm-eval checks: "exactly N" is two ("at least N", "less than N+1"), "around N" open-instruct's tolerance
band. Written by hand because no library reads these formats or routes the subsets. An unreadable
ground truth raises :class:`GroundTruthError`; a checker failing on a response gives ``Verdict.error``.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import json
import random
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from .data_checks import IFEVAL_INSTRUCTIONS, RLVR_IF_ARGS, RLVR_IF_FUNCTIONS, RLVR_SUBSETS
from .errors import KitError

#: Tulu 3's reward for a verified answer (open-instruct ``verification_reward``).
VERIFIED_REWARD = 10.0
#: math-verify's time limit for parsing and comparing one answer (seconds; main thread only).
MATH_TIMEOUT_S = 5
#: The kit's id for open-instruct's ``validate_choice``, which lm-eval has no free-option checker for.
CHOICE_ID = "kit:choice"


class GroundTruthError(KitError, ValueError):
    """A row's ground truth (or subset) that no verifier can read; the message says what and how to fix it."""


@dataclass(frozen=True)
class Check:
    """One IFEval instruction to check: an lm-eval instruction id (or ``kit:choice``), its arguments, and
    ``rewrite``: ``(old, new)`` text replacements applied to the response first (see ``verify_paragraph_count``)."""

    instruction_id: str
    kwargs: tuple[tuple[str, Any], ...] = ()
    rewrite: tuple[tuple[str, str], ...] = ()

    @property
    def arguments(self) -> dict[str, Any]:
        """The arguments as a dict (lists restored from the tuples that keep the check hashable)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.kwargs}

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.arguments.items())
        return f"{self.instruction_id}({args})"


@dataclass(frozen=True, eq=False)
class Target:
    """What a response is verified against: the subset (``kind``), the ground truth as given, its parsed form.

    ``value`` is a ``Decimal`` (gsm8k), math-verify's parsed gold answer (MATH), or a tuple of
    :class:`Check` (ifeval). ``constraint`` and ``constraint_type`` are the row's words for an IF row.
    """

    kind: str
    ground_truth: str
    value: Any = field(repr=False)
    constraint: str | None = None
    constraint_type: str | None = None

    def describe(self) -> str:
        """One line: the subset and what counts as correct."""
        if self.kind == "ifeval":
            return f"ifeval: {'; '.join(str(c) for c in self.value)}"
        return f"{self.kind}: {self.ground_truth}"


@dataclass(frozen=True)
class Verdict:
    """The outcome of verifying one response: ``verified`` (earns the reward), ``extracted`` (the answer
    read, or for IF rows the instructions passed, ``"2/3"``), ``detail`` (per IF instruction), ``error``."""

    verified: bool
    kind: str
    extracted: str | None = None
    detail: str = ""
    error: str | None = None


def parse_target(row: Mapping[str, Any]) -> Target:
    """The :class:`Target` of one RLVR row; GroundTruthError for an unknown subset or unreadable answer."""
    if not isinstance(row, Mapping):
        raise GroundTruthError(f"an RLVR row must be a mapping, got {type(row).__name__}")
    ground_truth = row.get("ground_truth")
    if isinstance(ground_truth, Mapping | list | tuple):  # an IF ground truth already parsed
        ground_truth = json.dumps(ground_truth, sort_keys=True)
    return parse_ground_truth(
        row.get("dataset"), ground_truth, row.get("constraint"), row.get("constraint_type")
    )


def parse_ground_truth(
    dataset: Any, ground_truth: Any, constraint: Any = None, constraint_type: Any = None
) -> Target:
    """The :class:`Target` for a subset name and a ground truth string (cached; see :func:`parse_target`)."""
    if not isinstance(dataset, str) or dataset.strip().lower() not in RLVR_SUBSETS:
        raise GroundTruthError(
            f"unknown subset dataset={dataset!r}: the RLVR verifiers are gsm8k, MATH and ifeval. "
            "Fix the row's 'dataset' field or leave the row out."
        )
    if isinstance(ground_truth, Mapping | list | tuple):
        ground_truth = json.dumps(ground_truth, sort_keys=True)
    if not isinstance(ground_truth, str) or not ground_truth.strip():
        raise GroundTruthError(
            f"{dataset} row has no ground truth ({ground_truth!r}); give the answer as a string."
        )
    text = lambda v: v if isinstance(v, str) else None  # noqa: E731
    return _parse_cached(dataset.strip().lower(), ground_truth, text(constraint), text(constraint_type))


@functools.lru_cache(maxsize=65536)
def _parse_cached(
    kind: str, ground_truth: str, constraint: str | None, constraint_type: str | None
) -> Target:
    parse = {"gsm8k": _gsm8k_number, "math": _math_gold, "ifeval": _if_checks}[kind]
    return Target(kind, ground_truth, parse(ground_truth), constraint, constraint_type)


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_DIGIT_COMMA = re.compile(r"(\d),(?=\d)")


def _to_decimal(text: str) -> Decimal:
    return Decimal(_DIGIT_COMMA.sub(r"\1", text))


def _gsm8k_number(ground_truth: str) -> Decimal:
    cleaned = _DIGIT_COMMA.sub(r"\1", ground_truth.strip())
    if not _NUMBER.fullmatch(cleaned):
        raise GroundTruthError(
            f"gsm8k ground truth {ground_truth!r} is not a number; GSM8K answers are plain numbers "
            "such as '1104' or '3,380'."
        )
    return Decimal(cleaned)


def _math_timeout() -> int | None:
    """math-verify's timeouts use SIGALRM, which only the main thread may set."""
    return MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _math_gold(ground_truth: str) -> list:
    from math_verify import parse

    text = ground_truth.strip()
    wrapped = text if text.startswith("$") or "\\boxed" in text else f"${text}$"
    try:
        gold = parse(wrapped, parsing_timeout=_math_timeout())
    except Exception as exc:  # math-verify's own failure on this answer
        raise GroundTruthError(f"MATH ground truth {ground_truth!r} cannot be parsed: {exc}") from exc
    if not any(not isinstance(g, str) for g in gold):  # only the raw string came back: nothing parsed
        raise GroundTruthError(
            f"MATH ground truth {ground_truth!r} cannot be parsed by math-verify; give the answer as "
            "LaTeX such as '\\frac{3}{4}' or 'x^2-4'."
        )
    return gold


# -- instruction following --------------------------------------------------------------------------------
def _loads(text: str) -> Any:
    """A JSON value, else a Python literal (``str(dict)`` exports), else GroundTruthError."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise GroundTruthError(
            f"ifeval ground truth {text[:80]!r} is neither JSON nor a Python literal; it should be a JSON "
            'object such as {"func_name": "validate_lowercase"}.'
        ) from None


def _if_checks(ground_truth: str) -> tuple[Check, ...]:
    value = _loads(ground_truth)
    if isinstance(value, Mapping) and "func_name" in value:
        checks = _open_instruct_checks(value)
    elif isinstance(value, Mapping) and ("instruction_id" in value or "instruction_id_list" in value):
        checks = _lm_eval_checks([value])
    elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        if all("func_name" in v for v in value):
            checks = [c for v in value for c in _open_instruct_checks(v)]
        else:
            checks = _lm_eval_checks(value)
    else:
        raise GroundTruthError(
            f"ifeval ground truth {ground_truth[:80]!r} is not a verifier spec: expected an object with "
            "'func_name' (Tulu 3 RLVR) or 'instruction_id' and 'kwargs' (IFEvalG)."
        )
    for check in checks:  # fail now, on the row, rather than on every response later
        if check.instruction_id != CHOICE_ID:
            _checker(check)
    return tuple(checks)


def _check(instruction_id: str, rewrite: tuple[tuple[str, str], ...] = (), **kwargs: Any) -> Check:
    frozen = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items())  # hashable
    return Check(instruction_id, frozen, rewrite)


#: The RLVR rows ask for paragraphs separated by ``* * *`` (open-instruct's checker splits on it); lm-eval's
#: IFEval checker splits on ``***``, the divider of the IFEval paper. The first is rewritten into the second.
SPACED_DIVIDER = (("* * *", "***"),)


def _int(args: Mapping, key: str, func: str) -> int:
    value = args.get(key)
    try:
        number = int(value)
        if number != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise GroundTruthError(f"ifeval {func}: argument {key}={value!r} is not a whole number") from None
    return number


def _strings(value: Any, key: str, func: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not value or not all(isinstance(v, str) for v in value):
        raise GroundTruthError(f"ifeval {func}: argument {key}={value!r} should be a list of words")
    return list(value)


def _counted(instruction_id: str, number: str, relation: str, n: int, quantifier: str, func: str, *,
             tolerance: int = 0) -> list[Check]:  # fmt: skip
    """Checks for ``quantifier`` (at least / at most / around / exactly) ``n``, with lm-eval's two relations."""
    at_least = lambda k: _check(instruction_id, **{number: k, relation: "at least"})  # noqa: E731
    less_than = lambda k: _check(instruction_id, **{number: k, relation: "less than"})  # noqa: E731
    if quantifier == "at least":
        return [at_least(n)]
    if quantifier == "at most":
        return [less_than(n + 1)]
    if quantifier == "around":
        return [at_least(max(0, n - tolerance)), less_than(n + tolerance + 1)]
    if quantifier == "exactly":
        return [at_least(n), less_than(n + 1)]
    raise GroundTruthError(
        f"ifeval {func}: quantifier {quantifier!r} is not one of 'at least', 'at most', 'around'"
    )


def _options(value: Any, func: str) -> list[str]:
    if isinstance(value, str):
        try:
            parsed = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            parsed = value
        value = parsed if isinstance(parsed, list | tuple) else [value]
    if not isinstance(value, list | tuple) or not value:
        raise GroundTruthError(f"ifeval {func}: options={value!r} should be a list of answers")
    return [str(v) for v in value]


def _open_instruct_checks(spec: Mapping[str, Any]) -> list[Check]:
    """lm-eval checks equivalent to one open-instruct ``if_functions`` verifier call (see the module docstring)."""
    func = spec.get("func_name")
    if func not in RLVR_IF_FUNCTIONS:
        raise GroundTruthError(
            f"ifeval ground truth names an unknown verifier func_name={func!r}; the Tulu 3 RLVR mixture uses "
            f"one of {', '.join(sorted(RLVR_IF_FUNCTIONS))}."
        )
    args = {k: v for k, v in spec.items() if k != "func_name" and v is not None}
    unknown = sorted(set(args) - set(RLVR_IF_ARGS))
    if unknown:
        raise GroundTruthError(f"ifeval {func}: unknown argument(s) {unknown}")
    missing = [k for k in RLVR_IF_FUNCTIONS[func] if k not in args]
    if missing:
        raise GroundTruthError(f"ifeval {func}: missing argument(s) {missing}; the row cannot be verified")
    N = lambda: _int(args, "N", func)  # noqa: E731
    q = str(args.get("quantifier", "")).strip().lower()
    if func == "verify_keywords":
        return [_check("keywords:existence", keywords=_strings(args["keyword_list"], "keyword_list", func))]
    if func == "verify_keyword_frequency":
        word = _strings(args["word"], "word", func)[0]
        return [
            _check("keywords:frequency", keyword=word, frequency=N(), relation="at least"),
            _check("keywords:frequency", keyword=word, frequency=N() + 1, relation="less than"),
        ]
    if func == "validate_forbidden_words":
        words = _strings(args["forbidden_words"], "forbidden_words", func)
        return [_check("keywords:forbidden_words", forbidden_words=words)]
    if func == "verify_letter_frequency":
        letter = str(args["letter"]).strip()
        if len(letter) != 1 or not ("a" <= letter.lower() <= "z"):
            raise GroundTruthError(f"ifeval {func}: letter={args['letter']!r} is not one ASCII letter")
        return [
            _check("keywords:letter_frequency", letter=letter, let_frequency=N(), let_relation="at least"),
            _check(
                "keywords:letter_frequency", letter=letter, let_frequency=N() + 1, let_relation="less than"
            ),
        ]
    if func == "validate_word_constraint":
        n = N()
        return _counted("length_constraints:number_words", "num_words", "relation", n, q, func,
                        tolerance=max(round(n * 0.1), 1))  # fmt: skip
    if func == "verify_sentence_constraint":
        return _counted("length_constraints:number_sentences", "num_sentences", "relation", N(), q, func,
                        tolerance=1)  # fmt: skip
    if func == "validate_paragraphs":
        first = _strings(args["first_word"], "first_word", func)[0]
        return [
            _check(
                "length_constraints:nth_paragraph_first_word",
                num_paragraphs=N(),
                nth_paragraph=_int(args, "i", func),
                first_word=first,
            )  # fmt: skip
        ]
    if func == "validate_choice":
        return [_check(CHOICE_ID, options=_options(args["options"], func))]
    if func == "validate_frequency_capital_words":
        n = N()
        return _counted("change_case:capital_word_frequency", "capital_frequency", "capital_relation", n, q,
                        func, tolerance=max(round(n * 0.1), 1))  # fmt: skip
    instruction, names = ONE_CHECK[func]
    kwargs = {key: N() if name == "N" else str(args[name]) for key, name in names.items()}
    return [_check(instruction, SPACED_DIVIDER if func == "verify_paragraph_count" else (), **kwargs)]


#: open-instruct verifiers that are one lm-eval check: the instruction and each of its arguments with the
#: open-instruct argument that gives it ("N" as a whole number, the others as text).
ONE_CHECK: dict[str, tuple[str, dict[str, str]]] = {
    "validate_response_language": ("language:response_language", {"language": "language"}),
    "verify_paragraph_count": ("length_constraints:number_paragraphs", {"num_paragraphs": "N"}),
    "verify_postscript": ("detectable_content:postscript", {"postscript_marker": "postscript_marker"}),
    "validate_placeholders": ("detectable_content:number_placeholders", {"num_placeholders": "N"}),
    "verify_bullet_points": ("detectable_format:number_bullet_lists", {"num_bullets": "N"}),
    "validate_highlighted_sections": (
        "detectable_format:number_highlighted_sections",
        {"num_highlights": "N"},
    ),
    "validate_sections": (
        "detectable_format:multiple_sections",
        {"section_spliter": "section_splitter", "num_sections": "N"},
    ),
    "validate_repeat_prompt": ("combination:repeat_prompt", {"prompt_to_repeat": "original_prompt"}),
    "validate_end": ("startend:end_checker", {"end_phrase": "end_phrase"}),
    "validate_title": ("detectable_format:title", {}),
    "validate_json_format": ("detectable_format:json_format", {}),
    "validate_two_responses": ("combination:two_responses", {}),
    "validate_uppercase": ("change_case:english_capital", {}),
    "validate_lowercase": ("change_case:english_lowercase", {}),
    "validate_quotation": ("startend:quotation", {}),
    "validate_no_commas": ("punctuation:no_comma", {}),
}


def _lm_eval_checks(specs: Sequence[Mapping[str, Any]]) -> list[Check]:
    """Checks from IFEvalG / google-IFEval style specs: instruction ids with one kwargs dict each."""
    checks = []
    for spec in specs:
        ids = spec.get("instruction_id", spec.get("instruction_id_list"))
        kwargs = spec.get("kwargs")
        ids = [ids] if isinstance(ids, str) else ids
        kwargs = [kwargs] if isinstance(kwargs, Mapping) or kwargs is None else kwargs
        if not isinstance(ids, list) or not isinstance(kwargs, list) or len(kwargs) not in (len(ids), 0):
            raise GroundTruthError(
                f"ifeval ground truth has {ids!r} instruction ids but kwargs {kwargs!r}: give one kwargs "
                "object per instruction id."
            )
        for i, instruction_id in enumerate(ids):
            if instruction_id not in IFEVAL_INSTRUCTIONS:
                raise GroundTruthError(
                    f"ifeval instruction {instruction_id!r} has no checker in lm-eval's IFEval; the row "
                    "cannot be verified."
                )
            given = kwargs[i] if kwargs else {}
            args = {k: v for k, v in (given or {}).items() if v is not None}
            missing = [k for k in IFEVAL_INSTRUCTIONS[instruction_id] if k not in args]
            if missing:  # lm-eval would fill them at random
                raise GroundTruthError(f"ifeval {instruction_id}: missing argument(s) {missing}")
            checks.append(_check(instruction_id, **args))
    return checks


@functools.lru_cache(maxsize=1)
def _ifeval_registry() -> dict[str, type]:
    """lm-eval's IFEval instruction classes, imported once NLTK's punkt_tab is available offline."""
    from .nltk_data import ensure_punkt

    ensure_punkt()
    try:
        from lm_eval.tasks.ifeval import instructions_registry
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"lm-eval's IFEval checkers need {exc.name!r}: pip install 'lm-eval[ifeval]' "
            "(immutabledict, langdetect, nltk)"
        ) from exc
    return instructions_registry.INSTRUCTION_DICT


_RANDOM_LOCK = threading.RLock()


@contextlib.contextmanager
def seeded_random(seed: int | str) -> Iterator[None]:
    """Python's global ``random`` seeded with ``seed`` inside the block, and its state restored after.

    lm-eval's IFEval instructions replace an argument they cannot use (the letter ``#`` of google/IFEval
    key 1122) with a global ``random`` draw; built in this block they draw the same in every run.
    """
    with _RANDOM_LOCK:
        state = random.getstate()
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


@functools.lru_cache(maxsize=65536)
def _checker(check: Check) -> Any:
    """An lm-eval instruction object with the check's arguments (GroundTruthError when it refuses them)."""
    registry = _ifeval_registry()
    if check.instruction_id not in registry:
        raise GroundTruthError(f"ifeval instruction {check.instruction_id!r} is not in lm-eval's IFEval")
    checker = registry[check.instruction_id](check.instruction_id)
    try:
        with seeded_random(str(check)):
            checker.build_description(**check.arguments)
    except (TypeError, ValueError) as exc:
        raise GroundTruthError(f"ifeval {check}: lm-eval refuses the arguments ({exc})") from exc
    return checker


def last_number(text: str) -> str | None:
    """The last number in ``text`` after removing commas between digits (``"1,104"`` -> ``"1104"``), or None."""
    numbers = _NUMBER.findall(_DIGIT_COMMA.sub(r"\1", text))
    return numbers[-1] if numbers else None


def _verify_gsm8k(response: str, target: Target) -> Verdict:
    found = last_number(response)
    try:
        verified = found is not None and _to_decimal(found) == target.value
    except InvalidOperation:  # pragma: no cover - the pattern only matches numbers
        verified = False
    return Verdict(verified, "gsm8k", found)


def _verify_math(response: str, target: Target) -> Verdict:
    from math_verify import parse
    from math_verify import verify as math_equal

    timeout = _math_timeout()
    answer = parse(response, parsing_timeout=timeout)
    if not answer:
        return Verdict(False, "math", None, "no answer found in the response")
    extracted = str(answer[-1]) if isinstance(answer[-1], str) else str(answer[0])
    verified = bool(math_equal(target.value, answer, timeout_seconds=timeout))
    return Verdict(verified, "math", extracted)


def _verify_ifeval(response: str, target: Target) -> Verdict:
    results = []
    for check in target.value:
        if not response.strip():  # lm-eval's strict rule: an empty response follows no instruction
            results.append(False)
        elif check.instruction_id == CHOICE_ID:
            results.append(any(option in response for option in check.arguments["options"]))
        else:
            text = response
            for old, new in check.rewrite:
                text = text.replace(old, new)
            results.append(bool(_checker(check).check_following(text)))
    detail = "; ".join(
        f"{c.instruction_id}: {'ok' if r else 'no'}" for c, r in zip(target.value, results, strict=True)
    )
    return Verdict(all(results), "ifeval", f"{sum(results)}/{len(results)}", detail)


_VERIFIERS = {"gsm8k": _verify_gsm8k, "math": _verify_math, "ifeval": _verify_ifeval}


def verify(response: str, target: Target | Mapping[str, Any]) -> Verdict:
    """Verify ``response`` against a :class:`Target` or an RLVR row (parsed with :func:`parse_target`).

    A checker that fails on this response gives an unverified Verdict with the failure in ``error``.
    """
    if not isinstance(target, Target):
        target = parse_target(target)
    if not isinstance(response, str):
        return Verdict(False, target.kind, error=f"response is {type(response).__name__}, not text")
    try:
        return _VERIFIERS[target.kind](response, target)
    except Exception as exc:  # a checker's own failure on one response: counted by the caller, not fatal
        return Verdict(False, target.kind, error=f"{type(exc).__name__}: {exc}")


def verify_gsm8k(response: str, ground_truth: str) -> bool:
    """True when the last number of ``response`` equals ``ground_truth`` (GSM8K's verifier)."""
    return verify(response, parse_ground_truth("gsm8k", ground_truth)).verified


def verify_math(response: str, ground_truth: str) -> bool:
    """True when math-verify finds the answer of ``response`` equivalent to ``ground_truth`` (MATH's verifier)."""
    return verify(response, parse_ground_truth("math", ground_truth)).verified


def verify_ifeval(response: str, ground_truth: str | Mapping | list) -> bool:
    """True when ``response`` follows every instruction of an IF ground truth (lm-eval's IFEval checkers)."""
    return verify(response, parse_ground_truth("ifeval", ground_truth)).verified


def verifiable_reward(verdict: Verdict | bool, reward: float = VERIFIED_REWARD) -> float:
    """Tulu 3's verifiable reward: ``reward`` (10) for a verified response, else 0."""
    verified = verdict.verified if isinstance(verdict, Verdict) else bool(verdict)
    return float(reward) if verified else 0.0
