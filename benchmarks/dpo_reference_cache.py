"""DPO step time and peak memory with the kit's cached reference log-probs against TRL's live reference model.

Three training runs on the same preference pairs, each in its own child process (so each has its own
peak memory), one after the other:

- baseline: ``trl.DPOTrainer`` as TRL runs it by default: a second, frozen copy of the model as the
  live reference, run on every batch; same loss (``sigmoid_norm``, the recipe's ``dpo_norm``), beta,
  per-device batch, ``max_length``, steps and fp32 as the kit;
- kit, first run: ``build_dpo_trainer`` with an empty cache folder: one reference pass before training,
  saved to disk, no reference model during training;
- kit, second run: the same key, so the log-probs are read from the file: no reference forward pass at
  all (``reference_forward_passes`` counts the batches the reference ran; it must be 0).

Each run's first optimizer step is a warm-up; the next ``--steps`` are timed (end of step to end of
step). Peak memory is the child's peak resident set (``ru_maxrss``) on a CPU, or
``torch.cuda.max_memory_allocated`` on a GPU. Ratios: ``step_time_ratio`` = baseline / kit seconds per
step (> 1: the kit is faster); ``peak_memory_ratio`` = kit / baseline peak (< 1: the kit needs less).
Run: ``python benchmarks/dpo_reference_cache.py [--model tiny] [--steps N]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from itertools import pairwise
from pathlib import Path

import torch
from transformers import TrainerCallback

from smoltulu_utils.atomic import atomic_open
from smoltulu_utils.data import load_rows
from smoltulu_utils.hardware import detect_hardware, hardware_report
from smoltulu_utils.models import load_model, load_tokenizer, tiny_model
from smoltulu_utils.paths import FIXTURES_DIR, results_dir

SIDES = ("baseline", "kit_first", "kit_cached")


class StepTimer(TrainerCallback):
    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def load(name: str, tokenizer=None):
    if name == "tiny":
        return tiny_model(seed=0, tokenizer=tokenizer)
    return load_model(name), load_tokenizer(name)


def run_side(args) -> dict:
    """One run in this process; returns its timings, reference passes and peak memory."""
    from trl import DPOConfig, DPOTrainer

    from smoltulu_utils.dpo import build_dpo_trainer
    from smoltulu_utils.preferences import prepare_preference_rows
    from smoltulu_utils.profiles import get_profile, resolve
    from smoltulu_utils.recipes import load_recipe

    tokenizer = load_tokenizer("bundled")
    model, tokenizer = load(args.model, tokenizer)
    rows = [dict(r) for r in load_rows("tulu3_preference", mirror=FIXTURES_DIR)]
    dataset, _ = prepare_preference_rows(rows, tokenizer, args.max_length, drop_too_long=False)
    n_rows = min(len(dataset), (args.steps + 1) * args.batch)
    dataset = dataset.select(range(n_rows))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    setup_start = time.perf_counter()
    if args.side == "baseline":
        reference, _ = load(args.model, tokenizer)
        config = DPOConfig(output_dir=args.tmp, per_device_train_batch_size=args.batch, max_length=args.max_length,
                           max_steps=args.steps + 1, beta=5.0, loss_type=["sigmoid_norm"], bf16=False,
                           use_cpu=not torch.cuda.is_available(), report_to="none", save_strategy="no",
                           disable_tqdm=True)  # fmt: skip
        trainer = DPOTrainer(model=model, ref_model=reference, args=config, train_dataset=dataset,
                             processing_class=tokenizer)  # fmt: skip
        counted = [0]
        inner = reference.forward

        def counting_forward(*a, **k):
            counted[0] += 1
            return inner(*a, **k)

        reference.forward = counting_forward
    else:
        recipe = load_recipe("dpo_1130").replace(effective_batch_size=args.batch, warmup_ratio=0.0)
        profile = get_profile("smoke").replace(model=args.model, per_device_batch_cap=args.batch,
                                               max_steps=args.steps + 1, max_length=args.max_length)  # fmt: skip
        plan = resolve(recipe, profile, verbose=False)
        trainer = build_dpo_trainer(plan, model, tokenizer, dataset, args.tmp, reference_cache=args.cache,
                                    disable_tqdm=True)  # fmt: skip
    setup = time.perf_counter() - setup_start
    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    steps = [b - a for a, b in pairwise(timer.ends)]
    if args.side == "baseline":
        passes, found = counted[0], "live reference model"
    else:
        passes, found = trainer.reference_forward_passes, trainer.reference_lookups["train"]["found"]
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**20
        peak_kind = "cuda max_memory_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        peak_kind = "peak resident set (ru_maxrss)"
    return {"side": args.side, "pairs": n_rows, "setup_seconds": setup, "steps": len(steps),
            "step_seconds": steps, "seconds_per_step": sum(steps) / max(len(steps), 1),
            "reference_forward_passes": passes, "reference": found, "peak_mib": peak,
            "peak_kind": peak_kind}  # fmt: skip


def child(side: str, args, tmp: Path, cache: Path) -> dict:
    out = tmp / f"{side}.json"
    argv = [sys.executable, __file__, "--side", side, "--model", args.model, "--steps", str(args.steps),
            "--batch", str(args.batch), "--max-length", str(args.max_length), "--cache", str(cache),
            "--tmp", str(tmp / side), "--out", str(out)]  # fmt: skip
    subprocess.run(argv, check=True)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled", help='"bundled" (default), "tiny", or a folder')
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4, help="per-device batch (pairs), every run")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps (after one warm-up step)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)  # a child process's run
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        report = run_side(args)
        with atomic_open(args.out) as fh:
            fh.write(json.dumps(report) + "\n")
        return report

    out = args.out or results_dir() / "benchmarks" / "dpo_reference_cache.json"
    hw = detect_hardware()
    with tempfile.TemporaryDirectory() as tmp:
        tmp, runs = Path(tmp), {}
        for side in SIDES:
            runs[side] = child(side, args, tmp, tmp / "cache")
    base, first, cached = runs["baseline"], runs["kit_first"], runs["kit_cached"]
    report = {"benchmark": "dpo_reference_cache", "model": args.model, "max_length": args.max_length,
              "batch": args.batch, "steps": args.steps, **runs,
              "step_time_ratio": base["seconds_per_step"] / cached["seconds_per_step"],
              "step_time_ratio_first_run": base["seconds_per_step"] / first["seconds_per_step"],
              "peak_memory_ratio": cached["peak_mib"] / base["peak_mib"],
              "second_run_reference_passes": cached["reference_forward_passes"],
              "machine": asdict(hw)}  # fmt: skip
    with atomic_open(out) as fh:
        fh.write(json.dumps(report, indent=2) + "\n")

    print(hardware_report(hw))
    print(f"model {args.model}, {base['pairs']} pairs, batch {args.batch}, max_length {args.max_length}, "
          f"{args.steps} timed steps")  # fmt: skip
    print(f"{'run':<12}{'setup s':>9}{'s/step':>9}{'peak MiB':>10}{'ref passes':>12}  reference")
    for side in SIDES:
        r = runs[side]
        print(f"{side:<12}{r['setup_seconds']:>9.1f}{r['seconds_per_step']:>9.2f}{r['peak_mib']:>10.0f}"
              f"{r['reference_forward_passes']:>12}  {r['reference']}")  # fmt: skip
    print(f"step time baseline/kit: {report['step_time_ratio']:.2f}x (first kit run "
          f"{report['step_time_ratio_first_run']:.2f}x); peak memory kit/baseline "
          f"{report['peak_memory_ratio']:.2f}x; second run reference forward passes: "
          f"{report['second_run_reference_passes']}")  # fmt: skip
    print(f"written to {out}")
    return report


if __name__ == "__main__":
    main()
