"""Hooks of the kit's lm-eval tasks (``!function`` targets of the YAML files beside this module).

lm-eval does prompting, requests, chat rendering, generation, filters, exact match and group means.
Written here, only because lm-eval 0.4.13 has no setting for them (docs/evaluation.md):

- the data source: ``custom_dataset`` loaders that read rows through the kit's ``data.load_rows``
  (a local mirror or the Hub at the pinned revision) and refuse a task whose pinned revision differs
  from the kit registry's;
- the prompts of SmolLM2's lighteval tasks: leading-space choices, HellaSwag's cleaning with its
  trailing space, the MMLU-Pro header inside the user turn;
- lighteval's ``loglikelihood_acc_norm_nospace`` (length minus one for a leading space), which lm-eval's
  built-in ``acc_norm`` does not compute;
- the reference harness's few-shot choices: BBH's "balanced" selection (a ``ContextSampler`` subclass
  that drops the evaluated row, Appendix A) and GSM8K's per-item draws from ``random.Random(42)``
  (Appendix B);
- IFEval: lm-eval's own scoring functions, called after :func:`smoltulu_utils.nltk_data.ensure_punkt`,
  each under a ``random`` seeded from the row's key: lm-eval replaces an argument it cannot use (the
  letter ``#`` of google/IFEval key 1122, ``!`` of key 1129) with a random draw, which would make two
  runs of the same responses score differently.
"""

from __future__ import annotations

import logging
import random
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from itertools import cycle
from typing import Any

import datasets
import numpy as np
from lm_eval.api.samplers import ContextSampler

from ..data import get_spec, load_rows

log = logging.getLogger(__name__)

#: Sizes of the full GSM8K splits; with both, the shots are exactly the reference's (Appendix B).
GSM8K_TEST_SIZE = 1319
GSM8K_TRAIN_SIZE = 7473
#: ``random.Random`` seeds of the reference harness: eval-doc shuffle + GSM8K draws, BBH "balanced".
GSM8K_SHOT_SEED = 42
BBH_SHOT_SEED = 0
MMLU_PRO_HEADER = "The following are multiple choice questions (with answers) about {topic}.\n\n"


# ================================================================================ data source
def load_kit_dataset(
    *,
    kit_dataset: str,
    kit_config: str,
    kit_splits: Sequence[str],
    kit_revision: str,
    data_mirror: str | None = None,
    **_metadata: Any,
) -> datasets.DatasetDict:
    """``custom_dataset`` of every task: the splits of one kit dataset, read with ``data.load_rows``.

    lm-eval calls it with the task's ``dataset_kwargs`` (``kit_dataset``, ``kit_config``,
    ``kit_splits``, ``kit_revision``: prefixed so that they never collide with model arguments such as
    ``revision``, which lm-eval's command line also passes in) and the task's ``metadata``. The source
    is ``data_mirror`` (set with ``task_manager(metadata={"data_mirror": DIR})`` or lm-eval's
    ``--metadata``), else the folder named by ``SMOLTULU_DATA_MIRROR``, else the Hub at the registry's
    pinned revision. Other metadata keys (``version``, model arguments, ...) are ignored.
    """
    spec = get_spec(kit_dataset)
    if kit_revision != spec.revision:
        raise ValueError(
            f"the task pins {spec.hub_id} at revision {kit_revision!r} but the kit registry "
            f"(smoltulu_utils.data.DATASETS[{spec.name!r}]) pins {spec.revision!r}; make them agree"
        )
    source = data_mirror or "SMOLTULU_DATA_MIRROR, else the Hub"
    log.info("loading %s (%s, %s) from %s", spec.hub_id, kit_config, ", ".join(kit_splits), source)
    return datasets.DatasetDict(
        {split: load_rows(spec.name, split, kit_config, mirror=data_mirror) for split in kit_splits}
    )


# ================================================================================ multiple choice
def _choice_length(choice: str) -> int:
    """Characters counted by lighteval's nospace normalization: a leading space is not counted."""
    length = len(choice) - 1 if choice.startswith(" ") else len(choice)
    return max(length, 1)  # lighteval would divide by zero for a choice of one space; never seen


def nospace_scores(loglikelihoods: Sequence[float], choices: Sequence[str], gold: int) -> dict[str, float]:
    """``acc`` (argmax of the summed log-probs) and lighteval's nospace ``acc_norm`` for one item.

    ``acc_norm`` takes the argmax of log-prob / characters, where a choice starting with a space is
    counted with length minus one. Ties go to the first choice (``np.argmax``), as in both harnesses.
    """
    lls = np.asarray(loglikelihoods, dtype=float)
    if len(lls) != len(choices):
        raise ValueError(f"{len(lls)} log-likelihoods for {len(choices)} choices")
    lengths = np.array([_choice_length(c) for c in choices], dtype=float)
    return {
        "acc": float(int(np.argmax(lls)) == gold),
        "acc_norm": float(int(np.argmax(lls / lengths)) == gold),
    }


def _loglikelihoods(results: Sequence) -> list[float]:
    return [float(r[0]) for r in results]  # each result is (loglikelihood, is_greedy)


def arc_choices(doc: Mapping) -> list[str]:
    """ARC continuations: each choice text with one leading space, in dataset order."""
    return [" " + text for text in doc["choices"]["text"]]


def arc_gold(doc: Mapping) -> int:
    return list(doc["choices"]["label"]).index(doc["answerKey"])


def arc_process_results(doc: Mapping, results: Sequence) -> dict[str, float]:
    return nospace_scores(_loglikelihoods(results), arc_choices(doc), arc_gold(doc))


def hellaswag_clean(text: str) -> str:
    """The reference's cleaning: ``" [title]"`` -> ``". "``, drop ``[...]`` spans, one pass of ``"  "`` -> ``" "``.

    Nothing is stripped (the reference comments its strip out).
    """
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_process_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """Add ``query`` (cleaned, trailing space kept), ``choices`` (``" " + clean(ending)``) and ``gold``."""

    def _doc(doc: Mapping) -> dict:
        ctx = doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize() + " "
        return {
            "query": hellaswag_clean(ctx),
            "choices": [" " + hellaswag_clean(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(_doc)


def hellaswag_process_results(doc: Mapping, results: Sequence) -> dict[str, float]:
    return nospace_scores(_loglikelihoods(results), doc["choices"], int(doc["gold"]))


def piqa_choices(doc: Mapping) -> list[str]:
    return [" " + doc["sol1"], " " + doc["sol2"]]


def piqa_process_results(doc: Mapping, results: Sequence) -> dict[str, float]:
    return nospace_scores(_loglikelihoods(results), piqa_choices(doc), int(doc["label"]))


def mmlu_pro_letters(doc: Mapping) -> list[str]:
    """Bare letters A, B, ... (no leading space), one per option."""
    return [chr(ord("A") + i) for i in range(len(doc["options"]))]


def mmlu_pro_text(doc: Mapping) -> str:
    """The header sentence, the question, one ``L. option`` line per option, then ``Answer:``."""
    header = MMLU_PRO_HEADER.format(topic=doc["category"].replace("_", " "))
    options = "".join(
        f"{letter}. {option}\n" for letter, option in zip(mmlu_pro_letters(doc), doc["options"], strict=True)
    )
    return header + doc["question"] + "\n" + options + "Answer:"


def mmlu_pro_process_results(doc: Mapping, results: Sequence) -> dict[str, float]:
    return nospace_scores(_loglikelihoods(results), mmlu_pro_letters(doc), int(doc["answer_index"]))


# ================================================================================ BBH shots
def balanced_shot_indices(targets: Sequence[str], num_fewshot: int, seed: int = BBH_SHOT_SEED) -> list[int]:
    """Row indices of the reference's "balanced" few-shot candidates (``num_fewshot + 1`` of them).

    Rows are grouped by target; labels are ordered by group size (largest first), labels of equal size
    sorted and then shuffled; the labels are cycled and each turn pops a random row of that label, until
    ``num_fewshot + 1`` rows are picked. Every random call comes from ``random.Random(seed)``, which draws
    the same numbers as the reference's ``random.seed(0)`` on the global generator.
    """
    rnd = random.Random(seed)
    groups: dict[str, list[int]] = defaultdict(list)
    for index, target in enumerate(targets):
        groups[target].append(index)
    labels_by_size: dict[int, list[str]] = defaultdict(list)
    for label in sorted(groups):
        labels_by_size[len(groups[label])].append(label)
    order: list[str] = []
    for size in sorted(labels_by_size, reverse=True):
        labels = labels_by_size[size]
        rnd.shuffle(labels)
        order.extend(labels)
    picked: list[int] = []
    wanted = min(len(targets), num_fewshot + 1)
    for label in cycle(order):
        if len(picked) >= wanted:
            break
        members = groups[label]
        if members:
            picked.append(members.pop(rnd.randrange(len(members))))
    return picked


class BBHBalancedSampler(ContextSampler):
    """The reference BBH shots: ``n + 1`` balanced candidates from the eval split, minus the evaluated row.

    Needs ``fewshot_split`` equal to ``test_split`` (lm-eval then passes the evaluated doc as
    ``eval_doc``). The candidates are fixed for the task; the shots are the first ``n`` of them that are
    not equal to ``eval_doc``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._candidates: dict[int, list[dict]] = {}

    def candidates(self, n: int) -> list[dict]:
        if n not in self._candidates:
            docs = self.fewshot_docs()
            indices = balanced_shot_indices([doc["target"] for doc in docs], n)
            log.info("BBH balanced few-shot candidates (row indices): %s", indices)
            self._candidates[n] = [docs[i] for i in indices]
        return self._candidates[n]

    def replace_df(self, df):
        self._candidates = {}
        return super().replace_df(df)

    def sample(self, n: int, eval_doc: Mapping | None = None, df=None, **kwargs: Any) -> list[dict]:
        if n <= 0:
            return []
        if df:
            self.replace_df(df)
        shots = [doc for doc in self.candidates(n) if doc != eval_doc][:n]
        if len(shots) < n:
            log.warning("only %d BBH few-shot rows available, %d asked for", len(shots), n)
        return shots


# ================================================================================ GSM8K shots
def reference_gsm8k_draws(
    n_test: int, n_train: int, num_fewshot: int = 5, seed: int = GSM8K_SHOT_SEED
) -> tuple[list[int], list[list[int]]]:
    """The reference's GSM8K shot draws: ``(eval order, shots)`` with ``shots[i]`` the train rows of test item i.

    ``r = random.Random(seed)`` shuffles the test indices; walking them in that order, each item gets
    ``r.sample(range(n_train), num_fewshot)`` (in prompt order). Exactly the reference's shots when
    ``n_test == 1319`` and ``n_train == 7473``.
    """
    if n_train < num_fewshot:
        raise ValueError(f"the GSM8K few-shot pool has {n_train} rows, fewer than {num_fewshot} shots")
    rnd = random.Random(seed)
    order = list(range(n_test))
    rnd.shuffle(order)
    shots: list[list[int]] = [[] for _ in range(n_test)]
    for index in order:
        shots[index] = rnd.sample(range(n_train), num_fewshot)
    return order, shots


def load_gsm8k(
    *, kit_num_fewshot: int = 5, kit_shot_seed: int = GSM8K_SHOT_SEED, **kwargs: Any
) -> datasets.DatasetDict:
    """``custom_dataset`` of GSM8K: test and train, with each test row's shots attached.

    Each test row gets ``fewshot_indices`` (its train rows, Appendix B) and ``fewshot_rows`` (those
    rows' question and answer), which :class:`GSM8KReferenceSampler` returns. With the full splits the
    shots are the reference's; with a smaller test or train split (a fixture mirror, a train prefix) the
    same procedure runs on the rows at hand: deterministic, but not the reference's shots.
    """
    dataset = load_kit_dataset(**kwargs)
    test, train = dataset["test"], dataset["train"]
    if (len(test), len(train)) != (GSM8K_TEST_SIZE, GSM8K_TRAIN_SIZE):
        log.warning(
            "GSM8K: %d test and %d train rows (full splits: %d and %d); the 5-shot draws follow the "
            "reference procedure on these rows and differ from the reference's shots",
            len(test),
            len(train),
            GSM8K_TEST_SIZE,
            GSM8K_TRAIN_SIZE,
        )
    _, shots = reference_gsm8k_draws(len(test), len(train), kit_num_fewshot, kit_shot_seed)
    questions, answers = train["question"], train["answer"]
    rows = [[{"question": questions[i], "answer": answers[i]} for i in row_shots] for row_shots in shots]
    test = test.add_column("fewshot_indices", shots).add_column("fewshot_rows", rows)
    return datasets.DatasetDict({"test": test, "train": train})


class GSM8KReferenceSampler(ContextSampler):
    """Returns the shots attached to the evaluated doc by :func:`load_gsm8k` (needs fewshot_split == test_split)."""

    def sample(self, n: int, eval_doc: Mapping | None = None, df=None, **kwargs: Any) -> list[dict]:
        if n <= 0:
            return []
        if eval_doc is None or "fewshot_rows" not in eval_doc:
            raise ValueError(
                "GSM8KReferenceSampler needs the evaluated doc with its 'fewshot_rows' "
                "(custom_dataset load_gsm8k, and fewshot_split equal to test_split)"
            )
        rows = [dict(row) for row in eval_doc["fewshot_rows"]]
        if n != len(rows):
            raise ValueError(
                f"GSM8K shots are drawn {len(rows)} per item (the reference procedure); {n} asked for. "
                "Set kit_num_fewshot in dataset_kwargs as well as num_fewshot on the task to change it."
            )
        return rows


# ================================================================================ IFEval
_PUNKT_READY = False


def _ifeval_module():
    """lm-eval's IFEval scoring module, imported once NLTK's punkt_tab is available."""
    global _PUNKT_READY
    if not _PUNKT_READY:
        from ..nltk_data import ensure_punkt

        ensure_punkt()
        _PUNKT_READY = True
    try:
        from lm_eval.tasks.ifeval import utils as ifeval_utils
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"lm-eval's IFEval scoring needs {exc.name!r}: pip install 'lm-eval[ifeval]' "
            "(immutabledict, langdetect, nltk)"
        ) from exc
    return ifeval_utils


def ifeval_process_results(doc: Mapping, results: Sequence[str]) -> dict:
    """lm-eval's ``ifeval`` ``process_results`` (strict and loose, prompt and instruction level), seeded.

    The same calls as lm-eval's, with the strict and the loose test each run under Python's global
    ``random`` seeded from the row's ``key`` (its state restored after): an instruction lm-eval builds
    with a random argument draws the same one in both tests and in every run.
    """
    from ..verifiers import seeded_random

    module = _ifeval_module()
    inp = module.InputExample(
        key=doc["key"],
        instruction_id_list=doc["instruction_id_list"],
        prompt=doc["prompt"],
        kwargs=doc["kwargs"],
    )
    seed = f"ifeval:{doc['key']}"
    with seeded_random(seed):
        strict = module.test_instruction_following_strict(inp, results[0])
    with seeded_random(seed):
        loose = module.test_instruction_following_loose(inp, results[0])
    return {
        "prompt_level_strict_acc": strict.follow_all_instructions,
        "inst_level_strict_acc": strict.follow_instruction_list,
        "prompt_level_loose_acc": loose.follow_all_instructions,
        "inst_level_loose_acc": loose.follow_instruction_list,
    }


def ifeval_agg_inst_level_acc(items: Sequence[Sequence[bool]]) -> float:
    """lm-eval's instruction-level aggregation: the mean over all instructions of all prompts."""
    return _ifeval_module().agg_inst_level_acc(items)
