"""Print the README's "Memory and time per GPU" section, computed by the memory planner.

Every number comes from the memory planner, ``smoltulu_utils.memory``: the method the planner picks for each stage on each GPU, its estimated peak memory and the estimated hours. Nothing
is measured, so this runs in seconds on any machine.

    python benchmarks/memory_table.py                    # print the section (markdown)
    python benchmarks/memory_table.py --csv table.csv    # also write both tables, one row per stage x GPU
    python benchmarks/memory_table.py --check README.md  # exit 1 when the README's section is out of date
    python benchmarks/memory_table.py --update README.md # replace the README's section with this one
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smoltulu_utils.memory import (
    DATASET_ROWS,
    GENERATION_BANDWIDTH_UTILISATION,
    GPUS,
    METHODS,
    MFU,
    QLORA_MFU_FACTOR,
    RLVR_PROMPT_TOKENS,
    TOKENS_PER_ROW,
    USABLE_FRACTION,
    GPUSpec,
    MemoryDoesNotFitError,
    _stage_name,
    estimate_hours,
    plan_memory_from,
)


@dataclass(frozen=True)
class TableRow:
    """A row of the README table: its label and the recipes (or one sweep grid) it stands for."""

    label: str
    names: tuple[str, ...]
    grid: bool = False  # names[0] is a sweep grid (recipes/ablation_*.yaml): hours add up its cells


#: The rows of the README table. Where a row stands for several recipes, it shows the one that needs
#: the most memory (they share model and data; their effective batches, so per-device batches, differ).
TABLE_ROWS: tuple[TableRow, ...] = (
    TableRow("SFT-1130/1207 1.7B", ("sft_1130", "sft_1207")),
    TableRow("DPO-1130/1207 1.7B", ("dpo_1130", "dpo_1207")),
    TableRow("RM-1130/1207 1.7B", ("rm_1130", "rm_1207")),
    TableRow("RLVR PPO 1.7B", ("rlvr_ppo",)),
    TableRow("135M ablation (SFT grid)", ("ablation_135m",), grid=True),
)
METHOD_LABELS = {"full": "full", "lora": "LoRA", "qlora": "QLoRA"}


def _plans_for(row: TableRow, profile: str, hardware: Any) -> tuple[list[Any], int]:
    """The plans a row stands for on ``hardware`` (one process), and how many runs the row's hours cover."""
    from smoltulu_utils.profiles import resolve

    if not row.grid:
        return [resolve(n, profile, hardware=hardware, num_processes=1, verbose=False) for n in row.names], 1
    from smoltulu_utils.sweep import load_grid

    cells = load_grid(row.names[0], profile=profile)
    plans = {}
    for cell in cells:  # one plan per distinct per-device batch is enough: the rest are the same sizes
        plan = cell.plan(hardware=hardware, num_processes=1)
        plans.setdefault((plan.per_device_batch_size, plan.max_length), plan)
    return list(plans.values()), len(cells)


def memory_table(profile: str = "paper", gpus: tuple[GPUSpec, ...] = GPUS, reference: str = "cache"):
    """One row per stage of :data:`TABLE_ROWS` and GPU of ``gpus``: the method, peak memory and hours of
    its recipes resolved with ``profile`` on one GPU. ``method`` is ``"refused"`` when nothing fits
    (``peak_gib`` is then QLoRA's need, ``hours`` None); a grid row's hours add up all its cells."""
    import pandas as pd

    from smoltulu_utils.hardware import hardware_from_facts

    records = []
    for row in TABLE_ROWS:
        for gpu in gpus:
            hardware = hardware_from_facts(
                "cuda", 1, gpu.name, gpu.memory_gib, 1, compute_capability=gpu.compute_capability
            )
            plans, runs = _plans_for(row, profile, hardware)
            options = []
            for plan in plans:
                try:
                    memory = plan_memory_from(plan, reference=reference)
                except MemoryDoesNotFitError as exc:
                    memory = exc.plan
                options.append(((not memory.fits, METHODS.index(memory.method), memory.estimate["total"]),
                                plan, memory))  # fmt: skip
            _, plan, memory = max(options, key=lambda option: option[0])
            hours = None
            if memory.fits:
                hours = runs * estimate_hours(plan, memory.method, gpu, reference=reference)["hours"]
            records.append({
                "stage": row.label,
                "recipe": row.names[0] if row.grid else plan.recipe.name,
                "runs": runs,
                "sizes": _sizes(plan, runs),
                "gpu": gpu.name,
                "gpu_gib": gpu.memory_gib,
                "dtype": plan.dtype,
                "max_length": plan.max_length,
                "per_device_batch": plan.per_device_batch_size,
                "train_rows": plan.max_train_samples,
                "method": memory.method if memory.fits else "refused",
                "fits": memory.fits,
                "peak_gib": round(memory.estimate["total"], 1),
                "hours": hours,
            })  # fmt: skip
    return pd.DataFrame(records)


def _hours(hours: float) -> str:
    return f"{hours:.1f} h" if hours < 10 else f"{hours:,.0f} h"


def _sizes(plan: Any, runs: int) -> str:
    """A plan's sizes in a few words, for the table's row labels."""
    recipe = plan.recipe
    if _stage_name(recipe.stage) == "rlvr":
        return (
            f"{recipe.prompt_length}+{recipe.response_length} tokens, {recipe.rollout_batch_size} rollouts, "
            f"{recipe.num_episodes:,} episodes"
        )
    unit = " pairs" if recipe.stage in ("rm", "dpo") else ""
    cells = f", {runs} cells" if runs > 1 else ""
    return f"{plan.max_length} tokens x {plan.per_device_batch_size}{unit}{cells}"


def memory_table_markdown(table: Any) -> str:
    """``memory_table``'s frame as a markdown table: a row per stage, a column per GPU, cells
    "method, peak GiB, hours" (or "refused, needs N GiB")."""
    gpus = list(dict.fromkeys(table["gpu"]))
    header = "| stage (sizes per GPU) | " + " | ".join(gpus) + " |"
    lines = [header, "|" + "---|" * (len(gpus) + 1)]
    for stage in dict.fromkeys(table["stage"]):
        records = table[table["stage"] == stage].to_dict("records")
        cells = [
            f"{METHOD_LABELS[r['method']]}, {r['peak_gib']:.1f} GiB, {_hours(r['hours'])}"
            if r["fits"]
            else f"refused (needs {r['peak_gib']:.1f} GiB)"
            for r in records
        ]
        lines.append(f"| {stage} ({records[-1]['sizes']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


README_HEADING = "## Memory and time per GPU"


def readme_section() -> str:
    """The README's "Memory and time per GPU" section, tables and assumptions, computed now."""
    from smoltulu_utils.profiles import PROFILES

    single = PROFILES["single_gpu"]
    sft, pref = TOKENS_PER_ROW["tulu3_sft"], TOKENS_PER_ROW["tulu3_preference"]
    rows = DATASET_ROWS
    return "\n".join([
        README_HEADING,
        "",
        "What each stage needs on one GPU, computed by the memory planner (`smoltulu_utils.memory`; printed",
        "by `python benchmarks/memory_table.py`, and `tests/test_memory.py` fails when this section and the",
        "planner disagree). Each cell: the method the planner picks (full fine-tuning if it fits, else LoRA,",
        "else QLoRA, else refused with the fixes), that method's estimated peak memory, and the estimated",
        "training time on that one GPU.",
        "",
        "The recipes as written (the `paper` profile's sizes: the full mixtures, the recipe lengths, the",
        "card's 10M RLVR episodes) on one GPU:",
        "",
        memory_table_markdown(memory_table("paper")),
        "",
        f"The `single_gpu` profile ({single.max_train_samples:,} rows, max_length {single.max_length}, "
        f"RLVR capped at {single.max_episodes:,} episodes):",
        "",
        memory_table_markdown(memory_table("single_gpu")),
        "",
        "Assumptions (all in `smoltulu_utils.memory`; estimates, not measurements):",
        "",
        f"- Memory: {USABLE_FRACTION:.0%} of the GPU usable; gradient checkpointing on; the per-device batch is the",
        "  largest divisor of the effective batch up to 8 (the rest by gradient accumulation); a row that stands",
        "  for two recipes shows the one that needs more memory; DPO reads cached reference log-probs; PPO",
        "  trains the policy and the value model, holds a frozen reference and the rollout batch's generation",
        "  cache, and loads no reward model (reward_model_multiplier 0).",
        "- Time: training FLOPs (8N per token in full, 6N with adapters, gradient checkpointing's recomputation",
        f"  included; N parameters) at {MFU:.0%} of the GPU's dense 16-bit peak (QLoRA "
        f"{MFU * QLORA_MFU_FACTOR:.0%}); PPO adds three no-grad",
        "  forwards per token (old log-probs, values, reference) and generation, bound by memory bandwidth",
        f"  ({GENERATION_BANDWIDTH_UTILISATION:.0%} of it).",
        f"- Data: {rows['tulu3_sft']:,} SFT conversations of ~{sft:,} tokens; {rows['tulu3_preference']:,} "
        f"preference pairs of ~{pref:,} tokens;",
        f"  a PPO episode is ~{RLVR_PROMPT_TOKENS:,} prompt tokens and a full-length response.",
    ])  # fmt: skip


def replace_section(text: str, section: str) -> str:
    """``text`` with its "Memory and time per GPU" section (up to the next ``## `` heading) replaced."""
    start = text.find(README_HEADING + "\n")
    if start < 0:
        raise SystemExit(f"no '{README_HEADING}' heading in the file: add one where the section belongs")
    end = text.find("\n## ", start + len(README_HEADING))
    end = len(text) if end < 0 else end + 1
    return text[:start] + section + "\n" + ("\n" if end < len(text) else "") + text[end:]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, help="write both tables (profile, stage, GPU, method, ...) here")
    parser.add_argument("--check", type=Path, help="a README whose section must equal the printed one")
    parser.add_argument("--update", type=Path, help="a README whose section to replace")
    args = parser.parse_args(argv)

    section = readme_section()
    print(section)
    if args.csv:
        import pandas as pd

        frames = [memory_table(p).assign(profile=p) for p in ("paper", "single_gpu")]
        pd.concat(frames).to_csv(args.csv, index=False)
    if args.check and section not in args.check.read_text(encoding="utf-8"):
        print(f"\n{args.check} is out of date: run with --update {args.check}", file=sys.stderr)
        raise SystemExit(1)
    if args.update:
        args.update.write_text(replace_section(args.update.read_text(encoding="utf-8"), section), "utf-8")
    return section


if __name__ == "__main__":
    main()
