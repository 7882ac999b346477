"""The paper's reported numbers, loaded from the tidy CSVs in ``data/paper``.

Names are kept as the sources print them (Table 9's "Llama-3.2-1B-Instruct" is the model card's
"Llama-1B-Instruct"); :func:`canonical_benchmark` and :func:`canonical_model` map such variants, short
names and Hub ids onto the paper's labels. Values come twice: ``value`` (float) for arithmetic and
``printed`` (the CSV text, ``"51.0"``) for rendering exactly what the paper prints.
"""

from __future__ import annotations

import re
from functools import cache

import pandas as pd

from .paths import PAPER_DIR

#: The seven benchmarks of Tables 3, 6 and 9, in the paper's order (labels exactly as printed there).
BENCHMARKS = (
    "ARC (Average)",
    "BBH (3-shot)",
    "GSM8K (5-shot)",
    "HellaSwag",
    "IFEval (Average)",
    "MMLU-Pro (MCF)",
    "PIQA",
)
#: The same seven as labelled in the SmolTulu-1.7b-Instruct model card.
CARD_BENCHMARKS = tuple("IFEval (Average prompt/inst)" if b == "IFEval (Average)" else b for b in BENCHMARKS)
#: Reward-model benchmarks of Table 8 (RB = RewardBench, UFB = UltraFeedback test_prefs).
RM_BENCHMARKS = ("RB Chat", "RB Chat Hard", "RB Safety", "RB Reasoning", "RB Average", "UFB")

#: Results tables: key -> CSV file in ``data/paper``.
RESULT_FILES = {
    3: "table03_sft_results.csv",
    6: "table06_dpo_results.csv",
    8: "table08_rm_results.csv",
    9: "table09_wider_comparison.csv",
    "model_card": "modelcard_instruct_reinforced_eval.csv",
    "rm_card": "modelcard_rm_eval.csv",
}
#: Hyperparameter tables: number -> CSV file.
HYPERPARAMETER_FILES = {
    2: "table02_sft_hyperparameters.csv",
    5: "table05_dpo_hyperparameters.csv",
    7: "table07_rm_hyperparameters.csv",
}
#: Training stage -> hyperparameter table number.
STAGE_TABLES = {"SFT": 2, "DPO": 5, "RM": 7}

#: Squashed names (:func:`_squash`) -> the paper's label: the labels themselves, the card's and short names.
_SHORT_BENCHMARKS = {
    **{re.sub(r"[^a-z0-9]", "", b.lower()): b for b in (*BENCHMARKS, *RM_BENCHMARKS)},
    "ifevalaveragepromptinst": "IFEval (Average)",
    "arc": "ARC (Average)",
    "bbh": "BBH (3-shot)",
    "gsm8k": "GSM8K (5-shot)",
    "ifeval": "IFEval (Average)",
    "mmlupro": "MMLU-Pro (MCF)",
    "ultrafeedback": "UFB",
}

#: Other spellings of the paper's model names (model card labels, Hub ids) -> paper label.
MODEL_ALIASES = {
    "SmolTulu-1.7b-Instruct": "SmolTulu DPO-1130",
    "SultanR/SmolTulu-1.7b-Instruct": "SmolTulu DPO-1130",
    "SmolTulu-DPO-1130": "SmolTulu DPO-1130",
    "SmolTulu-1.7b-RM": "SmolTulu RM-1130",
    "SultanR/SmolTulu-1.7b-RM": "SmolTulu RM-1130",
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": "SmolLM2-1.7B-Instruct",
    "Llama-1B-Instruct": "Llama-3.2-1B-Instruct",
    "meta-llama/Llama-3.2-1B-Instruct": "Llama-3.2-1B-Instruct",
    "Qwen/Qwen2.5-1.5B-Instruct": "Qwen2.5-1.5B-Instruct",
}


def _squash(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def canonical_benchmark(name: str) -> str:
    """The paper's label for a benchmark name (``"gsm8k"`` -> ``"GSM8K (5-shot)"``); unknown names unchanged."""
    return _SHORT_BENCHMARKS.get(_squash(name), name)


def canonical_model(name: str) -> str:
    """The paper's label for a model name or Hub id; unknown names unchanged."""
    return MODEL_ALIASES.get(name, name)


@cache
def _read_csv(filename: str) -> pd.DataFrame:
    return pd.read_csv(PAPER_DIR / filename, dtype=str, keep_default_na=False)


def read_paper_csv(filename: str) -> pd.DataFrame:
    """One CSV of ``data/paper`` with every cell as the text it holds (no float conversion)."""
    return _read_csv(filename).copy()


def _table_key(table: int | str) -> int | str:
    if isinstance(table, int):
        return table
    text = str(table).strip().lower().replace("-", "_").replace(" ", "_")
    if text in ("model_card", "modelcard", "card", "instruct_card"):
        return "model_card"
    if text in ("rm_card", "rm_model_card", "reward_model_card"):
        return "rm_card"
    digits = re.sub(r"^(table_?)", "", text)
    if digits.isdigit():
        return int(digits)
    stage = text.upper()
    if stage in STAGE_TABLES:
        return STAGE_TABLES[stage]
    raise KeyError(f"unknown paper table {table!r}")


def _decimals(printed: str) -> int:
    return len(printed.split(".", 1)[1]) if "." in printed else 0


def paper_results(table: int | str) -> pd.DataFrame:
    """A results table of the paper as tidy rows, in the CSV's order.

    ``table``: 3, 6, 8, 9 (also ``"table09"``), ``"model_card"`` (SmolTulu-1.7b-Instruct and
    -Reinforced card) or ``"rm_card"``. Columns: model, benchmark, value (float), printed (text as
    printed), decimals, table (caption), source, status.
    """
    key = _table_key(table)
    if key not in RESULT_FILES:
        raise KeyError(f"no results table {table!r}; choose from {sorted(map(str, RESULT_FILES))}")
    raw = read_paper_csv(RESULT_FILES[key])
    out = pd.DataFrame(
        {
            "model": raw["model"],
            "benchmark": raw["benchmark"],
            "value": raw["value"].astype(float),
            "printed": raw["value"],
            "decimals": raw["value"].map(_decimals).astype(int),
            "table": raw["table"],
            "source": raw["source"],
            "status": raw["status"],
        }
    )
    out.attrs["table"] = key
    return out


def paper_rm_results(card: bool = False) -> pd.DataFrame:
    """Table 8 (reward models on RewardBench and UltraFeedback) as tidy rows; ``card=True``: the RM model card."""
    return paper_results("rm_card" if card else 8)


def paper_models(table: int | str) -> tuple[str, ...]:
    """The models of a results table in the paper's column order."""
    return tuple(dict.fromkeys(paper_results(table)["model"]))


def paper_benchmarks(table: int | str) -> tuple[str, ...]:
    """The benchmarks of a results table in the paper's row order."""
    return tuple(dict.fromkeys(paper_results(table)["benchmark"]))


def family(name: str) -> str:
    """The model family of a recipe or model label: SmolTulu, Tulu 3, SmolLM2, SmolLM1, Llama, Qwen or Other."""
    low = name.lower()
    needles = {"smoltulu": "SmolTulu", "tulu 3": "Tulu 3", "tulu3": "Tulu 3", "tulu-3": "Tulu 3"}
    needles.update(smollm2="SmolLM2", smollm1="SmolLM1", llama="Llama", qwen="Qwen")
    return next((label for needle, label in needles.items() if needle in low), "Other")


def paper_hyperparameters(stage: int | str | None = None) -> pd.DataFrame:
    """Tables 2 (SFT), 5 (DPO) and 7 (RM): learning rate, effective batch size and LR/BS ratio per recipe.

    ``stage``: ``"SFT"``/``"DPO"``/``"RM"``, a table number (2, 5, 7), or None for all three.
    Columns: table, stage, config (as in the CSV), label (as printed in the table), note, family,
    model, model_size, learning_rate (float), learning_rate_printed, batch_size (int), lr_bs_ratio
    (= LR/BS, unscaled), lr_bs_ratio_printed (scaled, as printed), ratio_scale (``"x1e6"``),
    scale (1e6), lr_bs_ratio_recomputed (scaled), source, status.
    """
    numbers = list(HYPERPARAMETER_FILES) if stage is None else [_table_key(stage)]
    frames = []
    for number in numbers:
        if number not in HYPERPARAMETER_FILES:
            raise KeyError(f"no hyperparameter table {stage!r}; choose SFT, DPO, RM or 2, 5, 7")
        raw = read_paper_csv(HYPERPARAMETER_FILES[number])
        split = raw["config"].str.extract(r"^(?P<label>.*?)\s*(?:\((?P<note>[^()]*)\))?$")
        lr = raw["learning_rate"].astype(float)
        bs = raw["batch_size"].astype(int)
        frames.append(
            pd.DataFrame(
                {
                    "table": number,
                    "stage": raw["stage"],
                    "config": raw["config"],
                    "label": split["label"],
                    "note": split["note"].fillna(""),
                    "family": split["label"].map(family),
                    "model": raw["model"],
                    "model_size": raw["model_size"],
                    "learning_rate": lr,
                    "learning_rate_printed": raw["learning_rate"],
                    "batch_size": bs,
                    "lr_bs_ratio": lr / bs,
                    "lr_bs_ratio_printed": raw["lr_bs_ratio_stated"],
                    "ratio_scale": raw["ratio_scale"],
                    "scale": raw["ratio_scale"].str.replace("x", "", regex=False).astype(float),
                    "lr_bs_ratio_recomputed": raw["lr_bs_ratio_recomputed"].astype(float),
                    "source": raw["source"],
                    "status": raw["status"],
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def table_caption(table: int | str) -> str:
    """The caption of a paper table as recorded in ``data/paper`` (results tables), or a short title."""
    key = _table_key(table)
    if key in RESULT_FILES:
        return str(read_paper_csv(RESULT_FILES[key])["table"].iloc[0])
    titles = {
        2: "Table 2: SFT hyperparameters",
        5: "Table 5: DPO hyperparameters",
        7: "Table 7: Reward model hyperparameters",
    }
    if key in titles:
        return titles[key]
    raise KeyError(f"unknown paper table {table!r}")


def format_lr(value: float) -> str:
    """A learning rate (or ratio) as the paper prints it: one decimal in the mantissa, ``9e-05`` -> ``"9.0e-5"``."""
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


# --- the data tables: contamination (Tables 1, 4, 13) and languages (Tables 10, 11, 12) ---------

#: Contamination tables (percent of benchmark items found in a training mixture) and language tables.
CONTAMINATION_FILE = "tables01_04_13_contamination.csv"
LANGUAGE_FILE = "tables10_11_12_language_distribution.csv"
#: Paper table -> the kit dataset (``smoltulu_utils.data.DATASETS``) whose rows it describes.
DATA_TABLE_MIXTURES = {
    1: "tulu3_sft",
    4: "tulu3_preference",
    13: "rlvr_mixed",
    10: "tulu3_sft",
    11: "tulu3_preference",
    12: "rlvr_mixed",
}
CONTAMINATION_TABLES = (1, 4, 13)
LANGUAGE_TABLES = (10, 11, 12)


def _table_number(text: str) -> int:
    return int(re.sub(r"\D", "", text))


def _data_rows(
    raw: pd.DataFrame, table: int | None, allowed: tuple[int, ...], dataset: str, labels: dict, value: str
) -> pd.DataFrame:
    """Tidy rows of a data-table CSV: table, mixture, dataset, the ``labels`` columns, value, printed..."""
    numbers = raw["table"].map(_table_number)
    frame = pd.DataFrame(
        {
            "table": numbers,
            "mixture": numbers.map(DATA_TABLE_MIXTURES),
            "dataset": raw[dataset],
            **labels,
            "value": raw[value].astype(float),
            "printed": raw[value],
            "source": raw["source"],
            "status": raw["status"],
        }
    )
    if table is None:
        return frame
    if table not in allowed:
        raise KeyError(f"no table {table!r} in this file; choose from {list(allowed)}")
    return frame[frame["table"] == table].reset_index(drop=True)


def paper_contamination(table: int | None = None) -> pd.DataFrame:
    """Tables 1 (SFT), 4 (preference) and 13 (RLVR): percent of each benchmark's items found in the mixture.

    Tidy rows in the paper's order. Columns: table (1, 4 or 13), mixture (kit dataset name), dataset
    (as printed, e.g. ``"allenai/tulu-3-sft-mixture (SFT)"``), benchmark (Hub id as printed),
    value (float, percent), printed (text), source, status.
    """
    raw = read_paper_csv(CONTAMINATION_FILE)
    labels = {"benchmark": raw["benchmark"]}
    return _data_rows(raw, table, CONTAMINATION_TABLES, "dataset_checked", labels, "contamination_percent")


def paper_languages(table: int | None = None) -> pd.DataFrame:
    """Tables 10 (SFT), 11 (DPO / RM) and 12 (RLVR): the share of each language in the mixture, in percent.

    Tidy rows in the order printed (the paper's rank; Table 10 prints French after Japanese although
    its share is larger). Columns: table, mixture (kit dataset name), dataset (as printed), rank,
    language, value (float, percent), printed (text), source, status.
    """
    raw = read_paper_csv(LANGUAGE_FILE)
    labels = {"rank": raw["rank_as_printed"].astype(int), "language": raw["language"]}
    return _data_rows(raw, table, LANGUAGE_TABLES, "dataset_stage", labels, "presence_percent")
