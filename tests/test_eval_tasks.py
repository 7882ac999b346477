"""The kit's lm-eval tasks (smoltulu_utils.eval_tasks) against the definitions of docs/evaluation.md, all offline.

Prompts are rendered by lm-eval itself (``build_all_requests`` with the HFLM chat template and
multi-turn shots) and compared with the spec's chat layout (section 2.2) written out by hand here.
Tests that read ../shared skip with a reason when it is absent (set SMOLTULU_SHARED to move it).
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import datasets
import numpy as np
import pytest

from smoltulu_utils import eval_tasks
from smoltulu_utils.data import BBH_SUBSETS, DATASETS, get_spec, mirror_path, read_jsonl, to_dataset
from smoltulu_utils.eval_tasks import (
    PAPER_METRICS,
    SUITE,
    SUITE_GROUP,
    TASK_DIR,
    TASKS,
    paper_scores,
    task_manager,
)
from smoltulu_utils.eval_tasks import utils as hooks
from smoltulu_utils.paper import BENCHMARKS
from smoltulu_utils.paths import FIXTURES_DIR, KIT_ROOT

SHARED = Path(os.environ.get("SMOLTULU_SHARED") or KIT_ROOT.parent / "shared")
BENCH = SHARED / "benchmarks"
LM_EVAL_TASKS = Path(__import__("lm_eval").__file__).parent / "tasks"
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

#: The four balanced candidates of every BBH subset (0-based rows).
APPENDIX_A = {
    "boolean_expressions": [178, 215, 196, 10], "causal_judgement": [101, 103, 9, 69],
    "date_understanding": [98, 162, 22, 86], "disambiguation_qa": [136, 167, 6, 99],
    "dyck_languages": [201, 101, 12, 43], "formal_fallacies": [182, 211, 195, 6],
    "geometric_shapes": [111, 186, 32, 100], "hyperbaton": [186, 203, 210, 9],
    "logical_deduction_five_objects": [206, 127, 249, 115],
    "logical_deduction_seven_objects": [7, 94, 214, 207],
    "logical_deduction_three_objects": [150, 164, 13, 105],
    "movie_recommendation": [176, 182, 122, 19], "multistep_arithmetic_two": [143, 46, 81, 155],
    "navigate": [168, 230, 181, 13], "object_counting": [111, 95, 146, 116],
    "penguins_in_a_table": [86, 9, 52, 96], "reasoning_about_colored_objects": [209, 201, 67, 109],
    "ruin_names": [191, 30, 58, 146], "salient_translation_error_detection": [234, 105, 127, 4],
    "snarks": [99, 105, 11, 74], "sports_understanding": [176, 214, 198, 12],
    "temporal_sequences": [185, 201, 31, 80],
    "tracking_shuffled_objects_five_objects": [136, 216, 128, 21],
    "tracking_shuffled_objects_seven_objects": [164, 17, 94, 233],
    "tracking_shuffled_objects_three_objects": [143, 156, 10, 93],
    "web_of_lies": [199, 187, 227, 101], "word_sorting": [136, 30, 213, 241],
}  # fmt: skip
#: Rows in the real files (benchmarks/*/README.md).
REAL_SIZES = {
    "smoltulu_arc_easy": 2376, "smoltulu_arc_challenge": 1172, "smoltulu_gsm8k": 1319,
    "smoltulu_hellaswag": 10, "smoltulu_ifeval": 541, "smoltulu_mmlu_pro": 12032, "smoltulu_piqa": 1838,
}  # fmt: skip


def _need_shared() -> None:
    if not BENCH.is_dir():
        pytest.skip(
            f"real benchmark rows absent: {BENCH} (set SMOLTULU_SHARED to the folder holding benchmarks/)"
        )


def spec_chat(*turns: str) -> str:
    """The SmolLM2 chat rendering of docs/evaluation.md section 1: default system turn, then user/assistant turns."""
    text = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
    for i, content in enumerate(turns):
        text += f"<|im_start|>{'user' if i % 2 == 0 else 'assistant'}\n{content}<|im_end|>\n"
    return text + "<|im_start|>assistant\n"


def _raw(name: str, split: str | None = None, config: str | None = None, root: Path = FIXTURES_DIR):
    return read_jsonl(mirror_path(name, split, config, root))


def _stock(rel: str) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(LM_EVAL_TASKS / rel, resolve_func=False)


def _render(template: str, doc: dict) -> str:
    from lm_eval.utils import apply_template

    return apply_template(template, doc)


# ---------------------------------------------------------------- shared fixtures


@pytest.fixture(scope="module")
def hflm(tiny_model):
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = tiny_model
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)


@pytest.fixture(scope="module")
def fixture_tasks():
    manager = task_manager(include_defaults=False, metadata={"data_mirror": str(FIXTURES_DIR)})
    return manager.load([SUITE_GROUP])


@pytest.fixture(scope="module")
def real_mirror(tmp_path_factory) -> Path:
    """A mirror of links to the real rows in ../shared, in the layout load_rows reads."""
    _need_shared()
    root = tmp_path_factory.mktemp("real_mirror")
    files = {
        ("arc", "ARC-Easy", "test"): "arc/ARC-Easy/test.jsonl",
        ("arc", "ARC-Challenge", "test"): "arc/ARC-Challenge/test.jsonl",
        ("gsm8k", "main", "test"): "gsm8k/test.jsonl",
        ("gsm8k", "main", "train"): "gsm8k/train_first200.jsonl",
        ("hellaswag", "default", "validation"): "hellaswag/validation_head10.jsonl",
        ("ifeval", "default", "train"): "ifeval/input_data.jsonl",
        ("mmlu_pro", "default", "test"): "mmlu_pro/test.jsonl",
        ("piqa", "default", "validation"): "piqa/validation.jsonl",
        **{("bbh", s, "test"): f"bbh/data/{s}.jsonl" for s in BBH_SUBSETS},
    }
    for (name, config, split), rel in files.items():
        source = BENCH / rel
        if not source.is_file():
            pytest.skip(f"real rows absent: {source}")
        link = mirror_path(name, split, config, root)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(source)
    return root


@pytest.fixture(scope="module")
def real_tasks(real_mirror):
    return task_manager(include_defaults=False, metadata={"data_mirror": str(real_mirror)}).load(
        [SUITE_GROUP]
    )


def _build(task, hflm=None, **kwargs):
    """Requests built by lm-eval: chat template and multi-turn shots when ``hflm`` is given."""
    task.set_fewshot_seed(1234)
    if hflm is not None:
        kwargs.update(
            apply_chat_template=True,
            fewshot_as_multiturn=True,
            chat_template=hflm.apply_chat_template,
            tokenizer_name=hflm.tokenizer_name,
        )
    task.build_all_requests(**kwargs)
    return task.instances


# ---------------------------------------------------------------- tasks, groups, revisions


def test_tasks_and_groups_are_registered(fixture_tasks):
    manager = task_manager(include_defaults=False)
    assert set(TASKS) <= set(manager.all_subtasks) and len(TASKS) == 2 + 27 + 5
    assert set(manager.all_groups) == {"smoltulu_arc", "smoltulu_bbh", SUITE_GROUP}
    assert tuple(SUITE) == BENCHMARKS == tuple(PAPER_METRICS)
    assert set(fixture_tasks["tasks"]) == set(TASKS)
    group_map = fixture_tasks["group_map"]
    assert group_map[SUITE_GROUP] == list(SUITE.values())
    assert group_map["smoltulu_arc"] == ["smoltulu_arc_easy", "smoltulu_arc_challenge"]
    assert group_map["smoltulu_bbh"] == [f"smoltulu_bbh_{s}" for s in BBH_SUBSETS]
    for group, metric in (("smoltulu_arc", "acc_norm"), ("smoltulu_bbh", "exact_match")):
        aggregate = fixture_tasks["groups"][group].aggregate_metric_list[0]
        assert (aggregate.metric, aggregate.aggregation, aggregate.weight_by_size) == (metric, "mean", False)
    assert Path(eval_tasks.TASK_DIR) == TASK_DIR and (TASK_DIR / "smoltulu_suite.yaml").is_file()


def test_every_task_records_the_registry_revision(fixture_tasks):
    for name, task in fixture_tasks["tasks"].items():
        kwargs = task.config.dataset_kwargs
        spec = get_spec(kwargs["kit_dataset"])
        assert kwargs["kit_revision"] == spec.revision, name
        assert task.config.dataset_path == spec.hub_id and kwargs["kit_config"] in spec.configs, name
        assert task.dump_config()["dataset_kwargs"]["kit_revision"] == spec.revision, name
    with pytest.raises(ValueError, match="kit registry"):
        hooks.load_kit_dataset(
            kit_dataset="arc",
            kit_config="ARC-Easy",
            kit_splits=["test"],
            kit_revision="0" * 40,
            data_mirror=str(FIXTURES_DIR),
        )


# ---------------------------------------------------------------- data source


def test_every_task_builds_requests_from_the_fixture_mirror(fixture_tasks, hflm):
    for name, task in fixture_tasks["tasks"].items():
        instances = _build(task, hflm)
        assert instances and all(i.arguments[0].startswith("<|im_start|>system\n") for i in instances), name
        if task.OUTPUT_TYPE == "multiple_choice":
            continuations = [i.arguments[1] for i in instances]
            spaced = name != "smoltulu_mmlu_pro"
            assert all(c.startswith(" ") == spaced for c in continuations), name


@pytest.mark.shared
def test_every_task_builds_requests_from_the_real_rows(real_tasks, hflm):
    for name, task in real_tasks["tasks"].items():
        subset = name.removeprefix("smoltulu_bbh_")
        expected = REAL_SIZES.get(name) or {
            "causal_judgement": 187,
            "penguins_in_a_table": 146,
            "snarks": 178,
        }.get(subset, 250)
        assert len(task.eval_docs) == expected, name
        assert _build(task, hflm, limit=3), name


def test_mirror_from_the_environment_and_the_hub_at_the_pinned_revision(monkeypatch):
    monkeypatch.setenv("SMOLTULU_DATA_MIRROR", str(FIXTURES_DIR))
    manager = task_manager(include_defaults=False)
    task = manager.load(["smoltulu_piqa"])["tasks"]["smoltulu_piqa"]
    assert len(task.eval_docs) == len(_raw("piqa", "validation"))

    monkeypatch.delenv("SMOLTULU_DATA_MIRROR")
    calls = []

    def fake_hub(path, name=None, *, split, revision, **kwargs):
        calls.append((path, name, split, revision))
        spec = get_spec(path)
        return to_dataset(spec.name, _raw(spec.name, split, name or "default"))

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    loaded = manager.load(["smoltulu_arc_easy", "smoltulu_gsm8k"])["tasks"]
    assert len(loaded["smoltulu_gsm8k"].eval_docs) == len(_raw("gsm8k", "test"))
    assert calls == [
        ("allenai/ai2_arc", "ARC-Easy", "test", DATASETS["arc"].revision),
        ("openai/gsm8k", "main", "test", DATASETS["gsm8k"].revision),
        ("openai/gsm8k", "main", "train", DATASETS["gsm8k"].revision),
    ]


def test_model_arguments_in_the_metadata_do_not_reach_the_loader():
    # lm-eval's command line puts the model arguments (e.g. the reference's revision=main) into every
    # task's metadata, which lm-eval passes to custom_dataset next to dataset_kwargs
    metadata = {"data_mirror": str(FIXTURES_DIR), "pretrained": "x", "revision": "main", "dtype": "bfloat16"}
    loaded = task_manager(include_defaults=False, metadata=metadata).load(
        ["smoltulu_gsm8k", "smoltulu_bbh_navigate"]
    )
    assert len(loaded["tasks"]["smoltulu_bbh_navigate"].eval_docs) == len(_raw("bbh", "test", "navigate"))


# ---------------------------------------------------------------- rendered prompts (spec section 2.2 / 3)


def _first_request(fixture_tasks, hflm, name):
    instances = _build(fixture_tasks["tasks"][name], hflm, limit=1)
    context = instances[0].arguments[0]
    print(f"\n----- {name} (rendered by lm-eval)\n{context}")
    return context, [i.arguments[1] for i in instances]


def test_rendered_prompts_match_the_spec(fixture_tasks, hflm):
    arc = _raw("arc", "test", "ARC-Easy")[0]
    context, continuations = _first_request(fixture_tasks, hflm, "smoltulu_arc_easy")
    assert context == spec_chat(f"Question: {arc['question']}\nAnswer:")
    assert continuations == [" " + text for text in arc["choices"]["text"]]

    row = _raw("hellaswag", "validation")[0]
    assert "[" not in row["ctx"] + "".join(row["endings"])  # an ActivityNet row: no markers to clean
    context, continuations = _first_request(fixture_tasks, hflm, "smoltulu_hellaswag")
    query = f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()} "  # trailing space kept
    assert context == spec_chat(query.replace("  ", " "))
    assert continuations == [" " + ending for ending in row["endings"]]

    piqa = _raw("piqa", "validation")[0]
    context, continuations = _first_request(fixture_tasks, hflm, "smoltulu_piqa")
    assert context == spec_chat(f"Question: {piqa['goal']}\nAnswer:")
    assert continuations == [" " + piqa["sol1"], " " + piqa["sol2"]]

    mmlu = _raw("mmlu_pro", "test")[0]
    context, continuations = _first_request(fixture_tasks, hflm, "smoltulu_mmlu_pro")
    letters = "ABCDEFGHIJ"[: len(mmlu["options"])]
    user = (
        f"The following are multiple choice questions (with answers) about {mmlu['category']}.\n\n"
        f"{mmlu['question']}\n"
        + "".join(f"{L}. {o}\n" for L, o in zip(letters, mmlu["options"], strict=True))
        + "Answer:"
    )
    assert context == spec_chat(user)
    assert continuations == list(letters)

    ifeval = _raw("ifeval", "train")[0]
    context, (gen_kwargs,) = _first_request(fixture_tasks, hflm, "smoltulu_ifeval")
    assert context == spec_chat(ifeval["prompt"])
    assert gen_kwargs == {"until": [], "do_sample": False, "temperature": 0.0, "max_gen_toks": 1280}

    rows = _raw("bbh", "test", "snarks")
    shots = [i for i in hooks.balanced_shot_indices([r["target"] for r in rows], 3) if i != 0][:3]
    context, (gen_kwargs,) = _first_request(fixture_tasks, hflm, "smoltulu_bbh_snarks")
    turns = [t for i in shots for t in (f"Question: {rows[i]['input']}\nAnswer: ", rows[i]["target"])]
    assert context == spec_chat(*turns, f"Question: {rows[0]['input']}\nAnswer: ")
    assert gen_kwargs["until"] == ["Question:", "Question"] and gen_kwargs["max_gen_toks"] == 256

    test, train = _raw("gsm8k", "test"), _raw("gsm8k", "train")
    _, draws = hooks.reference_gsm8k_draws(len(test), len(train))
    context, (gen_kwargs,) = _first_request(fixture_tasks, hflm, "smoltulu_gsm8k")
    turns = [
        t for i in draws[0] for t in (f"Question: {train[i]['question']}\nAnswer:", " " + train[i]["answer"])
    ]
    assert context == spec_chat(*turns, f"Question: {test[0]['question']}\nAnswer:")
    assert gen_kwargs["until"] == ["Question:", "Question"] and gen_kwargs["max_gen_toks"] == 256


def test_hellaswag_cleaning_keeps_the_trailing_space():
    row = {
        "ind": 1, "activity_label": "Home and Garden", "ctx_a": "[header] How to paint a fence [title] Pick a dry day.",
        "ctx_b": "", "ctx": "", "endings": ["[step] Sand  the boards first.", "x", "y", "z"], "source_id": "wikihow~1",
        "split": "val", "split_type": "indomain", "label": "0",
    }  # fmt: skip
    doc = hooks.hellaswag_process_docs(to_dataset("hellaswag", [row]))[0]
    assert doc["query"] == "Home and Garden: How to paint a fence. Pick a dry day. "
    # " " + clean(ending): the space left where "[step]" was is kept, as in the reference
    assert doc["choices"][0] == "  Sand the boards first." and doc["gold"] == 0


# ---------------------------------------------------------------- where lm-eval's stock tasks differ


def test_stock_tasks_differ_where_the_spec_says(fixture_tasks):
    from lm_eval.api.metrics import exact_match_hf_evaluate

    tasks = fixture_tasks["tasks"]
    arc = tasks["smoltulu_arc_easy"].eval_docs[0]
    stock = _stock("arc/arc_easy.yaml")
    assert _render(stock["doc_to_text"], arc) == tasks["smoltulu_arc_easy"].doc_to_text(arc)
    stock_choices = ast.literal_eval(_render(stock["doc_to_choice"], arc))
    ours = tasks["smoltulu_arc_easy"].doc_to_choice(arc)
    print(f"\nARC continuation in chat mode: stock {stock_choices[0]!r}, kit {ours[0]!r}")
    assert ours == [" " + c for c in stock_choices]  # lm-eval's chat mode drops the delimiter

    piqa = tasks["smoltulu_piqa"].eval_docs[0]
    stock_choices = ast.literal_eval(_render(_stock("piqa/piqa.yaml")["doc_to_choice"], piqa))
    assert tasks["smoltulu_piqa"].doc_to_choice(piqa) == [" " + c for c in stock_choices]

    gsm = tasks["smoltulu_gsm8k"]
    doc = gsm.eval_docs[0]
    stock = _stock("gsm8k/gsm8k.yaml")
    stock_target, ours = _render(stock["doc_to_target"], doc), gsm.doc_to_target(doc)
    print(f"GSM8K shot target: stock {stock_target[:12]!r}..., kit {ours[:12]!r}...")
    assert ours == " " + stock_target
    assert "Question" not in stock["generation_kwargs"]["until"]
    assert {"strict-match", "flexible-extract"} == {f["name"] for f in stock["filter_list"]}
    stock_em = {
        k: v
        for k, v in stock["metric_list"][0].items()
        if k not in ("metric", "aggregation", "higher_is_better")
    }
    kit_em = {
        k: v
        for k, v in gsm.config.metric_list[0].items()
        if k not in ("metric", "aggregation", "higher_is_better")
    }
    # "#### 72." extracts "72.": lm-eval's stock scoring forgives the period, the reference does not
    assert exact_match_hf_evaluate(["72."], ["Work.\n#### 72"], **stock_em)["exact_match"] == 1.0
    assert exact_match_hf_evaluate(["72."], [" Work.\n#### 72"], **kit_em)["exact_match"] == 0.0

    from lm_eval.tasks.hellaswag.utils import process_docs as stock_hellaswag

    raw = datasets.Dataset.from_list(_raw("hellaswag", "validation")[:1])
    stock_doc, ours = stock_hellaswag(raw)[0], tasks["smoltulu_hellaswag"].eval_docs[0]
    assert ours["query"] == stock_doc["query"] + " " and ours["choices"] == [
        " " + c for c in stock_doc["choices"]
    ]

    from lm_eval.tasks.leaderboard.mmlu_pro.utils import doc_to_text as stock_mmlu_text

    mmlu = tasks["smoltulu_mmlu_pro"].eval_docs[0]
    header = f"The following are multiple choice questions (with answers) about {mmlu['category']}.\n\n"
    assert tasks["smoltulu_mmlu_pro"].doc_to_text(mmlu) == header + stock_mmlu_text(mmlu)
    assert _stock("leaderboard/mmlu_pro/mmlu_pro.yaml")["num_fewshot"] == 5

    bbh = tasks["smoltulu_bbh_snarks"]
    stock = _stock("bbh/fewshot/snarks.yaml")
    doc = bbh.eval_docs[0]
    assert _render(stock["doc_to_text"], doc) == f"Q: {doc['input']}\nA:" != bbh.doc_to_text(doc)
    assert stock["description"] and not bbh.config.description
    assert stock["generation_kwargs"]["until"] == ["</s>", "Q", "\n\n"]

    stock = _stock("ifeval/ifeval.yaml")  # the one task used unchanged: same prompt, generation, metrics
    ours = tasks["smoltulu_ifeval"].config
    assert (stock["doc_to_text"], stock["test_split"], stock["generation_kwargs"]) == (
        ours.doc_to_text,
        ours.test_split,
        ours.generation_kwargs,
    )
    assert [m["metric"] for m in stock["metric_list"]] == [m["metric"] for m in ours.metric_list]


# ---------------------------------------------------------------- scoring


def test_nospace_acc_norm_on_hand_made_loglikelihoods():
    # lengths 2 and 4 once the leading space is not counted: -2/2 = -1.0 < -3.5/4 = -0.875
    assert hooks.nospace_scores([-2.0, -3.5], [" ab", " abcd"], gold=1) == {"acc": 0.0, "acc_norm": 1.0}
    # lm-eval's built-in acc_norm divides by the full length (3 and 5): -0.667 > -0.7 picks choice 0
    assert int(np.argmax(np.array([-2.0, -3.5]) / np.array([len(" ab"), len(" abcd")]))) == 0
    assert hooks.nospace_scores([-1.0, -1.0, -2.0], [" a", " b", " c"], gold=0) == {
        "acc": 1.0,
        "acc_norm": 1.0,
    }
    assert hooks.nospace_scores([-1.0, -1.0], [" a", " b"], gold=1) == {"acc": 0.0, "acc_norm": 0.0}  # tie
    assert hooks.nospace_scores([-3.0, -1.0, -2.0], ["A", "B", "C"], gold=1) == {"acc": 1.0, "acc_norm": 1.0}


def test_multiple_choice_tasks_report_nospace_acc_norm(fixture_tasks):
    arc = fixture_tasks["tasks"]["smoltulu_arc_easy"]
    doc = {"question": "q", "choices": {"text": ["ab", "abcd"], "label": ["1", "2"]}, "answerKey": "2"}
    assert arc.process_results(doc, [(-2.0, False), (-3.5, False)]) == {"acc": 0.0, "acc_norm": 1.0}
    piqa = fixture_tasks["tasks"]["smoltulu_piqa"]
    doc = {"goal": "g", "sol1": "ab", "sol2": "abcd", "label": 1}
    assert piqa.process_results(doc, [(-2.0, True), (-3.5, False)]) == {"acc": 0.0, "acc_norm": 1.0}


GSM8K_CASES = [  # (response, gold final answer, extracted, exact_match)
    ("So 1,000 + 234 = 1,234.\n#### 1,234", "1,234", "1,234", 1.0),
    ("#### 1234", "1,234", "1234", 1.0),
    ("#### $5", "5", "[invalid]", 0.0),
    ("It costs $5.\n#### 5", "5", "5", 1.0),
    ("#### -3", "-3", "-3", 1.0),
    ("#### 3", "-3", "3", 0.0),
    ("#### 10\n#### 12", "12", "10", 0.0),
    ("#### 72.", "72", "72.", 0.0),
    ("The answer is 72", "72", "[invalid]", 0.0),
    ("####72", "72", "[invalid]", 0.0),
    ("#### 72 apples", "72", "72", 1.0),
    ("#### 0.5", "0.5", "0.5", 1.0),
    ("", "5", "[invalid]", 0.0),
]


@pytest.mark.parametrize("response,gold,extracted,score", GSM8K_CASES)
def test_gsm8k_strict_extraction_and_exact_match(fixture_tasks, response, gold, extracted, score):
    from lm_eval.api.instance import Instance

    task = fixture_tasks["tasks"]["smoltulu_gsm8k"]
    doc = {**task.eval_docs[0], "answer": f"Some work <<2*3=6>>.\n#### {gold}"}
    inst = Instance("generate_until", doc, ("", {}), 0, ("smoltulu_gsm8k", 0, 1), resps=[response])
    for ensemble in task._filters:
        ensemble.apply([inst])
    assert list(inst.filtered_resps) == ["strict-match"]
    assert inst.filtered_resps["strict-match"] == extracted
    assert task.process_results(doc, [extracted]) == {"exact_match": score}


IFEVAL_FIXTURE_RESPONSES = {  # fixture key -> responses, some following, some violating
    90001: ["dear neighbour, our grey cat milo is lost. please call us if you see him.",
            "Dear Neighbour, our grey cat Milo is lost.", ""],
    90002: [" ".join(["museum"] * 125), "I saw fossils, robots and stars.", " ".join(["wow"] * 119)],
    90003: ["* Wipe the counters.\n* Wash the dishes.\n* Sweep the floor.\n* Empty the bin.",
            "* Wipe the counters.\n* Wash the dishes.\n* Sweep the floor."],
    90004: ["<<River Song>>\nThe stone hears the echo of the water.", "<<River Song>>\nThe water runs.",
            "The stone hears the echo."],
    90005: ["Dear shop, is the book in stock?\nP.P.S. Thank you.", "Dear shop, is the book in stock?"],
    90006: ["Light bends in rain.\n* * *\nColours split.\n* * *\nWe see an arc. Is there anything else I can help with?",
            "Light bends in rain. Is there anything else I can help with? Thanks."],
}  # fmt: skip
IFEVAL_SHARED_RESPONSES = {  # shared row index -> responses (sentence counts need NLTK's punkt_tab)
    51: ["<<Road Damage>>\nHeavier axles wear roads faster. Repairs cost more.",
         "Heavier axles wear roads faster. One. Two. Three. Four. Five."],
    53: ["Dear diary, today I breathed slowly. I took a walk. I felt calm.",
         "One. Two. Three. Four. Five. Six. Seven."],
    75: ["Swings for all! Slides for all! Build it now!", "La la la."],
    0: ["This is a short answer without any highlighted parts."],
}  # fmt: skip


def _ifeval_agreement(task, kit_docs, raw_rows, responses) -> list[bool]:
    for needed in ("immutabledict", "langdetect"):  # lm-eval's IFEval extra (lm-eval[ifeval])
        pytest.importorskip(needed, reason=f"lm-eval's IFEval checkers need {needed}: pip install {needed}")
    from smoltulu_utils.nltk_data import ensure_punkt

    ensure_punkt()  # before lm-eval's IFEval import, which otherwise tries to download punkt_tab
    from lm_eval.tasks.ifeval import utils as lm_eval_ifeval

    ours, theirs, prompt_level = [], [], []
    for index, answers in responses.items():
        for answer in answers:
            kit = task.process_results(kit_docs[index], [answer])
            ref = lm_eval_ifeval.process_results(raw_rows[index], [answer])
            assert kit == ref, (index, answer)
            ours.append(kit["inst_level_strict_acc"])
            theirs.append(ref["inst_level_strict_acc"])
            prompt_level.append(kit["prompt_level_strict_acc"])
    assert hooks.ifeval_agg_inst_level_acc(ours) == lm_eval_ifeval.agg_inst_level_acc(theirs)
    return prompt_level


def test_ifeval_scoring_is_lm_evals_own(fixture_tasks):
    task = fixture_tasks["tasks"]["smoltulu_ifeval"]
    raw = _raw("ifeval", "train")
    by_key = {row["key"]: i for i, row in enumerate(raw)}
    responses = {by_key[key]: answers for key, answers in IFEVAL_FIXTURE_RESPONSES.items()}
    prompt_level = _ifeval_agreement(task, list(task.eval_docs), raw, responses)
    assert True in prompt_level and False in prompt_level and len(prompt_level) >= 14


@pytest.mark.shared
def test_ifeval_scoring_on_real_prompts(real_tasks):
    task = real_tasks["tasks"]["smoltulu_ifeval"]
    raw = read_jsonl(BENCH / "ifeval" / "input_data.jsonl")  # kwargs hold only the keys in use
    prompt_level = _ifeval_agreement(task, task.eval_docs, raw, IFEVAL_SHARED_RESPONSES)
    assert True in prompt_level and False in prompt_level


#: Thirteen letters four times each, the other thirteen never: a random letter passes half the time.
HALF_THE_LETTERS = "abcdefghijklm " * 4


def _scores_under_other_random_states(doc, response, runs=20):
    """IFEval scores of one response, each run after Python's global random was seeded differently."""
    import random

    pytest.importorskip("langdetect", reason="lm-eval's IFEval checkers need langdetect")
    scores = []
    for run in range(runs):
        random.seed(1000 + run)  # another process, another state
        state = random.getstate()
        scores.append(hooks.ifeval_process_results(doc, [response]))
        assert random.getstate() == state, "the global random state is restored"
    for score in scores:  # loose is an upper bound of strict: both tests make the same draws
        pairs = zip(score["inst_level_strict_acc"], score["inst_level_loose_acc"], strict=True)
        assert all(loose or not strict for strict, loose in pairs)
    return scores


def test_ifeval_scores_a_random_letter_the_same_in_every_run():
    """lm-eval draws a random letter when the row's is not one; the kit seeds the draw from the row key."""
    doc = {
        "key": 90122,
        "prompt": "Write a tweet with at least 4 hashtags, starting with '#'",
        "instruction_id_list": ["keywords:letter_frequency"],
        "kwargs": [{"let_relation": "at least", "letter": "#", "let_frequency": 4}],
    }
    scores = _scores_under_other_random_states(doc, HALF_THE_LETTERS)
    assert all(score == scores[0] for score in scores)


@pytest.mark.shared
def test_ifeval_rows_1122_and_1129_score_the_same_in_every_run():
    _need_shared()
    rows = {row["key"]: row for row in read_jsonl(BENCH / "ifeval" / "input_data.jsonl")}
    assert rows[1122]["kwargs"][1]["letter"] == "#" and rows[1129]["kwargs"][0]["letter"] == "!"
    tweet = "new season, new looks: the spring shoot is live now, go and see it #spring #style #fashion #new"
    for key, response in ((1122, tweet), (1129, rows[1129]["prompt"].split("\n")[0] + " " + tweet)):
        scores = _scores_under_other_random_states(rows[key], response)
        assert all(score == scores[0] for score in scores), key


# ---------------------------------------------------------------- few-shot selection


@pytest.mark.shared
def test_bbh_balanced_shots_reproduce_appendix_a(real_tasks):
    for subset, expected in APPENDIX_A.items():
        targets = [row["target"] for row in read_jsonl(BENCH / "bbh" / "data" / f"{subset}.jsonl")]
        assert hooks.balanced_shot_indices(targets, 3) == expected, subset

    task = real_tasks["tasks"]["smoltulu_bbh_boolean_expressions"]
    rows = list(task.eval_docs)
    first, candidate = _build(task, samples=[0, 178])  # row 178 is the first candidate

    def shots_in(context: str) -> list[int]:
        blocks = context.split("\n\n")[:-1]  # non-chat: shots joined by blank lines, the query last
        return [
            rows.index(
                {"input": b[len("Question: ") :].split("\nAnswer: ")[0], "target": b.split("\nAnswer: ")[1]}
            )
            for b in blocks
        ]

    assert shots_in(first.arguments[0]) == [178, 215, 196]
    assert shots_in(candidate.arguments[0]) == [215, 196, 10]  # the evaluated row is dropped
    assert candidate.arguments[0].endswith(f"Question: {rows[178]['input']}\nAnswer: ")


def test_gsm8k_appendix_b_vectors():
    order, shots = hooks.reference_gsm8k_draws(1319, 7473)
    assert order[:5] == [588, 1214, 57, 906, 1252]
    assert shots[0] == [1946, 403, 6109, 3892, 2200]
    assert shots[1] == [6851, 5067, 2916, 1277, 6381]
    assert shots[2] == [4624, 5267, 5204, 5116, 2647]


def test_gsm8k_uses_the_reference_shots_when_the_splits_are_full(tmp_path):
    from smoltulu_utils.data import write_jsonl

    def rows(prefix: str, n: int) -> list[dict]:
        return [
            {"question": f"{prefix} question {i}?", "answer": f"{prefix} work {i}.\n#### {i}"}
            for i in range(n)
        ]

    write_jsonl(rows("test", 1319), mirror_path("gsm8k", "test", root=tmp_path))
    write_jsonl(rows("train", 7473), mirror_path("gsm8k", "train", root=tmp_path))
    manager = task_manager(include_defaults=False, metadata={"data_mirror": str(tmp_path)})
    task = manager.load(["smoltulu_gsm8k"])["tasks"]["smoltulu_gsm8k"]
    assert task.eval_docs[0]["fewshot_indices"] == [1946, 403, 6109, 3892, 2200]
    (inst,) = _build(task, limit=1)
    questions = [line for line in inst.arguments[0].split("\n") if line.startswith("Question:")]
    assert questions == [f"Question: train question {i}?" for i in (1946, 403, 6109, 3892, 2200)] + [
        "Question: test question 0?"
    ]
    assert " train work 1946.\n#### 1946\n\n" in inst.arguments[0]  # the target keeps its leading space


# ---------------------------------------------------------------- NLTK punkt_tab offline


def test_ensure_punkt_writes_punkt_tab_once(tmp_path, monkeypatch):
    import nltk
    from nltk.tokenize.punkt import load_punkt_params
    from punkt.data import english

    from smoltulu_utils.nltk_data import PUNKT_RESOURCE, ensure_punkt

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nothing_here")])
    root = tmp_path / "nltk_data"
    found = ensure_punkt(root)
    assert found == root / "tokenizers" / "punkt_tab" / "english" and str(root) in nltk.data.path
    stamps = {p.name: p.stat().st_mtime_ns for p in found.iterdir()}
    assert ensure_punkt(root) == found and {p.name: p.stat().st_mtime_ns for p in found.iterdir()} == stamps
    assert nltk.data.path.count(str(root)) == 1
    params = load_punkt_params(nltk.data.find(PUNKT_RESOURCE))
    assert params.abbrev_types == set(english.ABBREV_TYPES)
    assert params.sent_starters == set(english.SENT_STARTERS)
    assert params.collocations == set(english.COLLOCATIONS)
    assert dict(params.ortho_context) == dict(english.ORTHO_CONTEXT)
    assert nltk.sent_tokenize("Hello there. How are you?") == ["Hello there.", "How are you?"]


# ---------------------------------------------------------------- end to end and paper numbers


def test_simple_evaluate_end_to_end_on_the_fixtures(hflm):
    import lm_eval

    manager = task_manager(include_defaults=False, metadata={"data_mirror": str(FIXTURES_DIR)})
    out = lm_eval.simple_evaluate(
        model=hflm,
        tasks=["smoltulu_arc_easy", "smoltulu_gsm8k"],
        task_manager=manager,
        limit=2,
        apply_chat_template=True,
        fewshot_as_multiturn=True,
        gen_kwargs={"max_gen_toks": 16},  # the tiny random model never stops by itself
        bootstrap_iters=0,
    )
    results = out["results"]
    assert {"acc,none", "acc_norm,none"} <= set(results["smoltulu_arc_easy"])
    assert "exact_match,strict-match" in results["smoltulu_gsm8k"]
    assert out["configs"]["smoltulu_gsm8k"]["dataset_kwargs"]["kit_revision"] == DATASETS["gsm8k"].revision
    json.dumps(out, default=str)
    scores = paper_scores(out)
    assert "GSM8K (5-shot)" in scores and all(0.0 <= v <= 100.0 for v in scores.values())


def test_paper_scores_from_lm_eval_results():
    results = {
        "smoltulu_arc": {"acc_norm,none": 0.5, "acc,none": 0.1},
        "smoltulu_bbh": {"exact_match,none": 0.3},
        "smoltulu_gsm8k": {"exact_match,strict-match": 0.25},
        "smoltulu_hellaswag": {"acc_norm,none": 0.6, "acc,none": 0.5},
        "smoltulu_ifeval": {"prompt_level_strict_acc,none": 0.4, "inst_level_strict_acc,none": 0.5,
                            "prompt_level_loose_acc,none": 0.9, "inst_level_loose_acc,none": 0.9},
        "smoltulu_mmlu_pro": {"acc,none": 0.2, "acc_norm,none": 0.2},
        "smoltulu_piqa": {"acc_norm,none": 0.75},
    }  # fmt: skip
    scores = paper_scores({"results": results})
    assert scores == pytest.approx(
        {"ARC (Average)": 50.0, "BBH (3-shot)": 30.0, "GSM8K (5-shot)": 25.0, "HellaSwag": 60.0,
         "IFEval (Average)": 45.0, "MMLU-Pro (MCF)": 20.0, "PIQA": 75.0}
    )  # fmt: skip
    # tasks run one by one: the groups' macro means come from their members
    members = {"smoltulu_arc_easy": {"acc_norm,none": 0.8}, "smoltulu_arc_challenge": {"acc_norm,none": 0.4}}
    assert paper_scores(members) == pytest.approx({"ARC (Average)": 60.0})
    assert paper_scores({"smoltulu_arc_easy": {"acc_norm,none": 0.8}}) == {}
