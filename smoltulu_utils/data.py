"""Every dataset the kit reads: a pinned registry, one loader, a mixture streamer and a tour of the data.

``load_rows(name)`` (and ``stream_rows`` for the large training mixtures) read from the ``mirror``
argument, else the folder named by ``SMOLTULU_DATA_MIRROR``, else the Hub at the pinned revision. A
mirror holds JSONL files in the Hub schema at ``{mirror}/{hub_id}/{config}/{split}.jsonl``;
``data/fixtures/`` is a small one (the smoke profile's) and ``write_mirror`` writes a full one.
Loading goes through ``datasets``; the row checks and statistics are written by hand because no
library checks what a chat or preference row means.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from .atomic import atomic_open
from .data_checks import FEATURES, DataError, RowProblem, check_rows
from .errors import KitError
from .paths import FIXTURES_DIR, mirror_dir

log = logging.getLogger(__name__)

BBH_SUBSETS = (
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa",
    "dyck_languages", "formal_fallacies", "geometric_shapes", "hyperbaton",
    "logical_deduction_five_objects", "logical_deduction_seven_objects",
    "logical_deduction_three_objects", "movie_recommendation", "multistep_arithmetic_two", "navigate",
    "object_counting", "penguins_in_a_table", "reasoning_about_colored_objects", "ruin_names",
    "salient_translation_error_detection", "snarks", "sports_understanding", "temporal_sequences",
    "tracking_shuffled_objects_five_objects", "tracking_shuffled_objects_seven_objects",
    "tracking_shuffled_objects_three_objects", "web_of_lies", "word_sorting",
)  # fmt: skip


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset the kit reads: where it lives on the Hub and which schema its rows have."""

    name: str
    hub_id: str
    splits: tuple[str, ...]
    revision: str
    kind: str  # the row schema: a key of data_checks.FEATURES
    description: str
    configs: tuple[str, ...] = ("default",)

    @property
    def features(self) -> datasets.Features:
        """The Hugging Face features of a row (column order and types of the Hub)."""
        return FEATURES[self.kind]


_NOT_PINNED = "main"  # not pinned: no public commit id found; pin before a paper run

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "tulu3_sft", "allenai/tulu-3-sft-mixture", ("train",),
            "b14afda60f1bbebe55d5d2fa1e4df5042f97f8be",  # the kit's pin of the SFT mixture
            "sft", "Tulu 3 SFT mixture: chat conversations (id, messages, source).",
        ),
        DatasetSpec(
            "tulu3_preference", "allenai/llama-3.1-tulu-3-8b-preference-mixture", ("train",),
            _NOT_PINNED,  # not pinned: no public commit id found; pin before a paper run
            "preference", "Tulu 3 8B preference mixture for DPO (prompt, chosen, rejected).",
        ),
        DatasetSpec(
            "rlvr_mixed", "allenai/RLVR-GSM-MATH-IF-Mixed-Constraints", ("train",),
            _NOT_PINNED,  # not pinned: no public commit id found; pin before a paper run
            "rlvr", "RLVR prompts with verifiable answers: GSM8K, MATH and IFEval-style constraints.",
        ),
        DatasetSpec(
            "ultrafeedback", "allenai/ultrafeedback_binarized_cleaned", ("test_prefs",),
            _NOT_PINNED,  # not pinned: no public commit id found; pin before a paper run
            "ultrafeedback", "UltraFeedback preference pairs with scores; test_prefs scores reward models.",
        ),
        DatasetSpec(
            "rewardbench", "allenai/reward-bench", ("filtered",),
            _NOT_PINNED,  # not pinned: no public commit id found; pin before a paper run
            "rewardbench", "RewardBench prompt/chosen/rejected strings by subset; scores reward models (Table 8).",
        ),
        DatasetSpec(
            "arc", "allenai/ai2_arc", ("test",),
            "210d026faf9955653af8916fad021475a3f00453",  # docs/evaluation.md §3.1
            "arc", "ARC grade-school science questions, Easy and Challenge sets (0-shot, acc_norm).",
            configs=("ARC-Easy", "ARC-Challenge"),
        ),
        DatasetSpec(
            # The reference harness reads lighteval/big_bench_hard@80610173 (docs/evaluation.md §3.5), which
            # needs a loading script that datasets>=4 refuses; lukaemon/bbh holds the same rows as
            # script-free parquet with split "test". Pin from a public dataset menu that reads
            # lukaemon/bbh at this commit (files CONFIG/test-00000-of-00001.parquet).
            "bbh", "lukaemon/bbh", ("test",),
            "982bb89fd79532a8ac676a61fc42eb1aeec63f99",
            "bbh", "BIG-Bench Hard, 27 subsets (3-shot, exact match); script-free copy of the reference.",
            configs=BBH_SUBSETS,
        ),
        DatasetSpec(
            "gsm8k", "openai/gsm8k", ("test", "train"),
            "e53f048856ff4f594e959d75785d2c2d37b678ee",  # docs/evaluation.md §3.6
            "gsm8k", "GSM8K grade-school math word problems (5-shot from train, '#### N' answers).",
            configs=("main",),
        ),
        DatasetSpec(
            # docs/evaluation.md §3.2. This commit still carries the loading script (trust_dataset=True);
            # if datasets>=4 refuses it, mirror the repo's parquet rows and check they match.
            "hellaswag", "Rowan/hellaswag", ("validation",),
            "6002345709e0801764318f06bf06ce1e7d1a1fe3",
            "hellaswag", "HellaSwag sentence completion (0-shot, acc_norm).",
        ),
        DatasetSpec(
            # The reference pins no revision (docs/evaluation.md §3.7); this commit is pinned by public
            # evaluation code that downloads ifeval_input_data.jsonl (207,111 bytes, 541 prompts).
            "ifeval", "google/IFEval", ("train",),
            "966cd89545d6b6acfd7638bc708b98261ca58e84",
            "ifeval", "IFEval verifiable instructions (541 prompts; prompt- and instruction-level).",
        ),
        DatasetSpec(
            "mmlu_pro", "TIGER-Lab/MMLU-Pro", ("test", "validation"),
            "3373e0b32277875b8db2aa555a333b78a08477ea",  # docs/evaluation.md §3.4
            "mmlu_pro", "MMLU-Pro multiple choice with up to 10 options (0-shot, letter choices).",
        ),
        DatasetSpec(
            # The reference reads ybisk/piqa@2e8ac2dffd59bac8c3c6714948f4c551a0848bb0 (docs/evaluation.md
            # §3.3), a loading script; baber/piqa is the script-free copy lm-eval uses.
            "piqa", "baber/piqa", ("validation",),
            _NOT_PINNED,  # not pinned: no public commit id found; pin before a paper run
            "piqa", "PIQA physical commonsense, two solutions per goal (0-shot, acc_norm).",
        ),
    )
}  # fmt: skip


#: The training mixtures (Tables 1/10 SFT, 4/11 preference, 13/12 RLVR) and their full row counts (dataset
#: cards: the SFT card's text says 939,344, its dataset_info 939,343; the preference card's text
#: 272,898, its dataset_info 271,409).
FULL_ROWS = {"tulu3_sft": 939_344, "tulu3_preference": 272_898, "rlvr_mixed": 29_946}
MIXTURES = tuple(FULL_ROWS)


class DataSourceError(KitError, OSError):
    """A dataset could not be read from its mirror or from the Hub."""


class MirrorFileMissing(DataSourceError, FileNotFoundError):
    """The mirror has no file for this dataset, config and split."""


def get_spec(name: str) -> DatasetSpec:
    """The registry entry for a kit name (``"gsm8k"``) or a Hub id (``"openai/gsm8k"``)."""
    if name in DATASETS:
        return DATASETS[name]
    for spec in DATASETS.values():
        if spec.hub_id == name:
            return spec
    raise KeyError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


def _resolve(spec: DatasetSpec, split: str | None, config: str | None) -> tuple[str, str]:
    split = split or spec.splits[0]
    config = config or spec.configs[0]
    if split not in spec.splits:
        raise ValueError(f"{spec.name} has no split {split!r} in the kit; splits: {', '.join(spec.splits)}")
    if config not in spec.configs:
        raise ValueError(f"{spec.name} has no config {config!r}; configs: {', '.join(spec.configs)}")
    return split, config


def _label(spec: DatasetSpec, config: str) -> str:
    return spec.hub_id if config == "default" else f"{spec.hub_id}:{config}"


def mirror_path(
    name: str, split: str | None = None, config: str | None = None, root: str | Path | None = None
) -> Path:
    """``{root}/{hub_id}/{config}/{split}.jsonl``; root defaults to ``SMOLTULU_DATA_MIRROR``, then the fixtures."""
    spec = get_spec(name)
    split, config = _resolve(spec, split, config)
    root = Path(root) if root is not None else (mirror_dir() or FIXTURES_DIR)
    return root / spec.hub_id / config / f"{split}.jsonl"


def _mirror_file(spec: DatasetSpec, split: str, config: str, mirror: str | Path | None) -> Path | None:
    """The mirror file to read (``mirror``, else ``SMOLTULU_DATA_MIRROR``), or None to read the Hub."""
    root = Path(mirror) if mirror is not None else mirror_dir()
    if root is None:
        return None
    path = mirror_path(spec.name, split, config, root)
    if not path.is_file():
        raise MirrorFileMissing(
            f"no mirror file for {spec.name} ({spec.hub_id}, config {config}, split {split}): "
            f"expected {path}.\n{_fetch_advice()}"
        )
    return path


def _fetch_advice() -> str:
    return (
        "To fetch it: on a machine with Hub access run `python -m smoltulu_utils mirror --out DIR` "
        "(writes every pinned dataset as JSONL), copy DIR here and set SMOLTULU_DATA_MIRROR=DIR "
        f"(or pass mirror=DIR). The kit's small fixtures are such a mirror: mirror={FIXTURES_DIR}."
    )


def _jsonl_rows(path: Path, problems: list, limit: int | None = None) -> Iterator[dict | None]:
    """The rows of a JSONL file one at a time (blank lines skipped); a line that is not JSON is added to
    ``problems`` and yielded as None, so that row indices stay the same."""
    with open(path, encoding="utf-8") as handle:
        index = 0
        for number, line in enumerate(handle, start=1):
            if limit is not None and index >= limit:
                return
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                problems.append(RowProblem(str(path), index, f"line {number} is not valid JSON ({exc})"))
                row = None
            yield row
            index += 1


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict]:
    """Rows of a JSONL file (blank lines skipped); raise :class:`DataError` naming every bad line."""
    problems: list[RowProblem] = []
    rows = list(_jsonl_rows(Path(path), problems, limit))
    if problems:
        raise DataError(problems)
    return rows


def write_jsonl(rows: Iterable[Mapping], path: str | Path) -> Path:
    """Write rows as UTF-8 JSONL, one row per line, atomically (a temporary file, then a rename)."""
    path = Path(path)
    with atomic_open(path) as handle:
        for row in rows:
            handle.write(json.dumps(dict(row), ensure_ascii=False) + "\n")
    return path


def to_dataset(name: str, rows: list[Mapping]) -> datasets.Dataset:
    """A ``datasets.Dataset`` of rows with the schema's features (Hub column order and types)."""
    features = get_spec(name).features
    columns = {key: [row.get(key) for row in rows] for key in features}
    return datasets.Dataset.from_dict(columns, features=features)


def validate_rows(
    name: str, rows: Iterable[Mapping], *, strict: bool = True, where: str = ""
) -> tuple[list[dict], list[RowProblem]]:
    """Check every row of a dataset; return ``(clean_rows, problems)``.

    With ``strict`` (the default) any problem raises one :class:`DataError` listing the first ten
    and the count; with ``strict=False`` bad rows are left out and returned as problems instead.
    """
    spec = get_spec(name)
    return check_rows(spec.kind, rows, label=spec.hub_id, strict=strict, where=where)


def _load_from_hub(
    spec: DatasetSpec, split: str, config: str, limit: int | None, *, streaming: bool = False
) -> Any:
    """The split from the Hub at the pinned revision, as a Dataset or (``streaming``) an iterable of rows;
    with ``limit``, only the first rows are streamed."""
    config_arg = None if config == "default" else config
    try:
        if limit is None and not streaming:
            return datasets.load_dataset(spec.hub_id, config_arg, split=split, revision=spec.revision)
        stream = datasets.load_dataset(
            spec.hub_id, config_arg, split=split, revision=spec.revision, streaming=True
        )
        stream = stream.take(limit) if limit is not None else stream
        return stream if streaming else datasets.Dataset.from_list(list(stream), features=spec.features)
    except Exception as exc:
        raise DataSourceError(
            f"could not load {spec.name} ({spec.hub_id}, config {config}, split {split}, revision "
            f"{spec.revision}) from the Hugging Face Hub: {type(exc).__name__}: {exc}\n{_fetch_advice()}"
        ) from exc


def load_rows(
    name: str,
    split: str | None = None,
    config: str | None = None,
    *,
    mirror: str | Path | None = None,
    limit: int | None = None,
    validate: bool = True,
) -> datasets.Dataset:
    """Rows of a registered dataset as a ``datasets.Dataset``, checked unless ``validate=False``.

    Source: ``mirror``, else ``SMOLTULU_DATA_MIRROR``, else the Hub at the pinned revision.
    ``split`` and ``config`` default to the first registered ones; ``limit`` keeps the first rows.
    """
    spec = get_spec(name)
    split, config = _resolve(spec, split, config)
    path = _mirror_file(spec, split, config, mirror)
    if path is None:
        ds = _load_from_hub(spec, split, config, limit)
        if validate:
            check_rows(spec.kind, ds, label=_label(spec, config), where=f" ({split}, from the Hub)")
        return ds
    rows = read_jsonl(path, limit=limit)
    if validate:
        check_rows(spec.kind, rows, label=_label(spec, config), where=f" ({split}, {path})")
    return to_dataset(spec.name, rows)


def stream_rows(
    name: str, *, mirror: str | Path | None = None, limit: int | None = None, problems: list | None = None
) -> Iterator[dict | None]:
    """The rows of a dataset's first split one at a time, never all in memory.

    A mirror's JSONL file is read line by line (a line that is not JSON goes to ``problems`` and is yielded
    as ``None``, so row indices stay line numbers); the Hub is streamed at the pinned revision.
    """
    spec = get_spec(name)
    path = _mirror_file(spec, spec.splits[0], spec.configs[0], mirror)
    if path is None:
        yield from _load_from_hub(spec, spec.splits[0], spec.configs[0], limit, streaming=True)
    else:
        yield from _jsonl_rows(path, problems if problems is not None else [], limit)


def mixture_spec(name: str) -> DatasetSpec:
    """The registry entry of a training mixture (one of :data:`MIXTURES`)."""
    spec = get_spec(name)
    if spec.name not in MIXTURES:
        raise ValueError(f"{name} is not a training mixture; choose from {', '.join(MIXTURES)}")
    return spec


def prompt_texts(kind: str, row: Any) -> list[str]:
    """The user turns of one training row (``kind``: ``sft``, ``rlvr`` or ``preference``).

    Raises ValueError naming the problem when the row has no usable user turn.
    """
    if not isinstance(row, Mapping):
        raise ValueError(f"row is {type(row).__name__}, expected a JSON object")
    key = "chosen" if kind == "preference" else "messages"
    messages = row.get(key)
    if not isinstance(messages, list):
        raise ValueError(f"'{key}' is {type(messages).__name__}, expected a list of messages")
    texts = [
        m["content"]
        for m in messages
        if isinstance(m, Mapping) and m.get("role") == "user" and isinstance(m.get("content"), str)
    ]
    if not texts:
        raise ValueError(f"no user turn with text in '{key}'")
    return texts


def scan_prompts(
    rows: Iterable[Any],
    kind: str,
    tally: Any,
    *,
    stride: int = 1,
    desc: str = "",
    progress: bool = False,
    total: int | None = None,
) -> Iterator[tuple[int, Any, list[str]]]:
    """``(index, row, user turns)`` of every ``stride``-th row with a usable user turn, for a mixture scan.

    ``tally`` (a scan's result: ``mixture``, ``n_rows``, ``n_skipped``, ``problems``) counts every row
    read; ``None`` rows (lines that were not JSON) and rows without a user turn are skipped and counted,
    the latter recorded in ``tally.problems``. ``progress`` shows a tqdm bar labelled ``desc``.
    """
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows, total=total, desc=desc, unit="row", mininterval=1.0)
    for index, row in enumerate(rows):
        tally.n_rows += 1
        if index % stride:
            continue
        if row is None:  # a line that was not JSON, already recorded by stream_rows
            tally.n_skipped += 1
            continue
        try:
            texts = prompt_texts(kind, row)
        except ValueError as exc:
            tally.n_skipped += 1
            tally.problems.append(RowProblem(tally.mixture, index, str(exc)))
            continue
        yield index, row, texts


def write_mirror(
    out: str | Path, names: Iterable[str] | None = None, *, limit: int | None = None
) -> list[Path]:
    """Write every pinned dataset (or ``names``) from the Hub as a JSONL mirror under ``out``.

    Needs Hub access. Rows are copied as they are; bad rows are counted in the log, not dropped.
    """
    paths = []
    for name in names or DATASETS:
        spec = get_spec(name)
        for config in spec.configs:
            for split in spec.splits:
                ds = _load_from_hub(spec, split, config, limit)
                _, problems = check_rows(spec.kind, ds, label=_label(spec, config), strict=False)
                if problems:
                    where = f"{name} {config}/{split}"
                    log.warning("%s: %d row problem(s), e.g. %s", where, len(problems), problems[0])
                paths.append(write_jsonl(ds, mirror_path(name, split, config, out)))
    return paths


# ---------------------------------------------------------------- a tour of the data


def _parts(kind: str, row: Mapping) -> dict[str, str]:
    """The texts of one example, by part (roles for chats; prompt and responses for preferences)."""
    if kind in ("sft", "rlvr"):
        parts: dict[str, str] = {}
        for msg in row["messages"]:
            parts[msg["role"]] = parts.get(msg["role"], "") + msg["content"]
        return parts
    if kind == "rewardbench":
        return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
    if kind in ("preference", "ultrafeedback"):
        chosen, rejected = row["chosen"], row["rejected"]
        prompt = "".join(m["content"] for m in chosen[:-1])
        return {"prompt": prompt, "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]}
    return {key: _text_of(value) for key, value in row.items() if _text_of(value)}


def _text_of(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(_text_of(v) for v in value)
    if isinstance(value, dict):
        return "".join(_text_of(v) for v in value.values())
    return ""


def _conversation(row: Mapping) -> list | None:
    """The conversation of one example (the chosen one for preferences), or None for benchmarks."""
    for field in ("messages", "chosen"):
        if isinstance(row.get(field), list):
            return row[field]
    return None


def _row_text(row: Mapping) -> str:
    """The text of one example: its turns one per line, else all its strings (a character count)."""
    conversation = _conversation(row)
    if conversation is not None:
        return "\n".join(m.get("content") or "" for m in conversation)
    return _text_of(dict(row))


def _token_counts(tokenizer: Any, texts: list[str]) -> list[int]:
    if not texts:
        return []
    if callable(tokenizer):
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return [len(tokenizer.encode(text)) for text in texts]


def _summary(values: list[int]) -> dict[str, float]:
    if not values:
        return {"min": 0, "median": 0, "mean": 0.0, "max": 0}
    mean = round(statistics.fmean(values), 1)
    return {"min": min(values), "median": statistics.median(values), "mean": mean, "max": max(values)}


def example_lengths(rows: Iterable[Mapping], tokenizer: Any = None) -> list[int]:
    """Length of each example in characters, or in tokens with a tokenizer.

    With a chat template, a conversation is counted as training sees it (rendered, special tokens included);
    other rows, or a tokenizer without a template, count the tokens of all their text.
    """
    rows = list(rows)
    if tokenizer is None:
        return [len(_row_text(row)) for row in rows]
    if getattr(tokenizer, "chat_template", None):
        lengths = []
        for row in rows:
            conversation = _conversation(row)
            if conversation is None:
                lengths.extend(_token_counts(tokenizer, [_row_text(row)]))
            else:
                lengths.append(len(_chat_ids(tokenizer, conversation)))
        return lengths
    return _token_counts(tokenizer, [_row_text(row) for row in rows])


def _chat_ids(tokenizer: Any, conversation: list) -> list[int]:
    ids = tokenizer.apply_chat_template(list(conversation), tokenize=True)
    if isinstance(ids, Mapping) or hasattr(ids, "keys"):  # a BatchEncoding in recent transformers
        ids = ids["input_ids"]
    return list(ids)


def describe_rows(name: str, rows: Iterable[Mapping], tokenizer: Any = None) -> dict:
    """Summary statistics of rows: count, turns per conversation, and characters (and tokens) by part.

    Parts are roles for SFT and RLVR chats, prompt/chosen/rejected for preferences, and text fields
    for benchmarks; each is summarised per example as min, median, mean and max.
    """
    spec = get_spec(name)
    rows = list(rows)
    parts = [_parts(spec.kind, row) for row in rows]
    names = list(dict.fromkeys(key for p in parts for key in p))
    out: dict[str, Any] = {"dataset": spec.name, "hub_id": spec.hub_id, "rows": len(rows)}
    conversation = next(
        (f for f in ("messages", "chosen") if isinstance(spec.features.get(f), list | datasets.List)), None
    )  # RewardBench's chosen is a plain string, not a conversation
    if conversation:
        out["turns"] = _summary([len(row[conversation]) for row in rows])
        out["roles"] = dict(Counter(m["role"] for row in rows for m in row[conversation]))
    if spec.kind == "rlvr":
        out["subsets"] = dict(Counter(row["dataset"] for row in rows))
    out["chars"] = {part: _summary([len(p.get(part, "")) for p in parts]) for part in names}
    out["chars"]["example"] = _summary(example_lengths(rows))
    if tokenizer is not None:
        out["tokens"] = {
            part: _summary(_token_counts(tokenizer, [p.get(part, "") for p in parts])) for part in names
        }
        out["tokens"]["example"] = _summary(example_lengths(rows, tokenizer))
    return out


def _describe(values: list) -> str:
    """One type description for values found at the same place in many rows (``int | null``)."""
    names: set[str] = set()
    dicts = [v for v in values if isinstance(v, dict)]
    lists = [v for v in values if isinstance(v, list)]
    for v in values:
        if not isinstance(v, dict | list):
            names.add("null" if v is None else type(v).__name__)
    if dicts:
        keys = list(dict.fromkeys(k for d in dicts for k in d))
        names.add("{" + ", ".join(f"{k}: {_describe([d[k] for d in dicts if k in d])}" for k in keys) + "}")
    if lists:
        items = [item for v in lists for item in v]
        names.add(f"list[{_describe(items)}]" if items else "list")
    return " | ".join(sorted(names))


def schema_of(rows: Iterable[Mapping]) -> dict[str, str]:
    """Field -> type over all rows (``str | null`` where rows differ), in first-seen field order."""
    rows = list(rows)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return {k: _describe([row[k] for row in rows if k in row]) for k in keys}
