"""Time per PPO iteration of the kit's RLVR trainer, split by phase, with generation speed and peak memory.

One PPO run (``train_rlvr`` with ``method="ppo"``, as the RLVR stage runs it) on the RLVR mixture's
fixture prompts (GSM8K, MATH and IF rows, 2-shot prompts of 100 to 300 tokens). Each iteration samples
``--batch`` responses of up to ``--response-length`` tokens at temperature 1, verifies them, runs the
no-grad forward passes and the PPO epochs; the trainer times each phase itself:

- ``generation_s``: sampling the responses (transformers' ``generate``; vLLM only with ``generator="vllm"``);
- ``scoring_s``: decoding and verifying (GSM8K last number, math-verify, lm-eval's IFEval checkers);
- ``forward_s``: old log-probs, reference log-probs and values (three no-grad forward passes), and GAE;
- ``optimisation_s``: the PPO epochs (policy and value forward and backward, AdamW steps).

The first ``--warmup`` iterations are left out of the means. ``tokens_per_s`` is generated tokens (up to
and including end-of-sequence) per second of generation. Peak memory: the process's peak resident set
(``resource``; model loading included) and, on a GPU, ``torch.cuda.max_memory_allocated``; with
``--tracemalloc`` also the peak of Python-level allocations during the timed iterations (``tracemalloc``
does not see tensors, and slows Python code, so the phase times of such a run read high). A random tiny model never ends its responses, so all its responses are
full length. Run: ``python benchmarks/rlvr_iteration.py [--model tiny] [--iterations N]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import tracemalloc
from dataclasses import asdict
from pathlib import Path

import torch

from smoltulu_utils.atomic import atomic_open
from smoltulu_utils.data import load_rows
from smoltulu_utils.hardware import detect_hardware, hardware_report
from smoltulu_utils.paths import FIXTURES_DIR, results_dir
from smoltulu_utils.profiles import get_profile, resolve
from smoltulu_utils.recipes import load_recipe
from smoltulu_utils.rlvr import train_rlvr

PHASES = ("generation_s", "scoring_s", "forward_s", "optimisation_s")


def _rss_mib() -> float:
    """Peak resident set size of this process, MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled", help='"bundled" (default), "tiny", or a folder')
    parser.add_argument("--batch", type=int, default=8, help="prompts (episodes) per iteration")
    parser.add_argument("--response-length", type=int, default=64, help="largest response, tokens")
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="iterations left out of the means")
    parser.add_argument(
        "--micro-batch", type=int, default=4, help="per-device micro-batch (the profile's cap)"
    )
    parser.add_argument("--tracemalloc", action="store_true", help="trace Python allocations (slower)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output")
    args = parser.parse_args(argv)
    out = args.out or results_dir() / "benchmarks" / "rlvr_iteration.json"

    total = args.warmup + args.iterations
    recipe = load_recipe("rlvr_ppo").replace(
        rollout_batch_size=args.batch,
        minibatch_size=args.batch,
        effective_batch_size=args.batch,
        response_length=args.response_length,
        num_episodes=args.batch * total,
    )
    profile = get_profile("smoke").replace(
        model=args.model, max_steps=None, max_length=4096, per_device_batch_cap=args.micro_batch
    )
    plan = resolve(recipe, profile, verbose=False)
    rows = load_rows("rlvr_mixed", mirror=FIXTURES_DIR)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def trace_after_warmup(entry: dict) -> None:
        if args.tracemalloc and entry["iteration"] == args.warmup:
            tracemalloc.start()

    start = time.perf_counter()
    result = train_rlvr(plan, method="ppo", rows=rows, verbose=False, callback=trace_after_warmup)
    wall = time.perf_counter() - start
    python_peak = tracemalloc.get_traced_memory()[1] if tracemalloc.is_tracing() else None
    tracemalloc.stop()

    timed = result.logs[args.warmup :] or result.logs
    means = {phase: _mean([e[phase] for e in timed]) for phase in PHASES}
    iteration_s = _mean([e["iteration_s"] for e in timed])
    tokens = sum(e["tokens_generated"] for e in timed)
    report = {
        "benchmark": "rlvr_iteration",
        **{k: v for k, v in vars(args).items() if k != "out"},
        "prompt_rows": result.data_report.n_kept,
        "iterations_timed": len(timed),
        "iteration_s": iteration_s,
        "phases_s": means,
        "phase_shares": {phase: means[phase] / iteration_s for phase in PHASES},
        "tokens_generated": tokens,
        "tokens_per_s": tokens / sum(e["generation_s"] for e in timed),
        "episodes_per_s": args.batch / iteration_s,
        "mean_response_length": _mean([e["response_length"] for e in timed]),
        "peak_memory_mib": {
            "rss": _rss_mib(),
            "python_tracemalloc": python_peak / 2**20 if python_peak is not None else None,
            "cuda_allocated": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        },
        "per_iteration": [
            {k: e[k] for k in (*PHASES, "iteration_s", "tokens_generated")} for e in result.logs
        ],
        "wall_seconds": wall,
        "torch_threads": torch.get_num_threads(),
        "machine": asdict(detect_hardware()),
    }
    with atomic_open(out) as fh:
        fh.write(json.dumps(report, indent=2) + "\n")

    print(hardware_report(detect_hardware()))
    print(f"model {args.model}, {args.batch} prompts x up to {args.response_length} tokens, "
          f"{len(timed)} timed iterations after {args.warmup} warm-up")  # fmt: skip
    print(f"{'phase':<16}{'seconds':>10}{'share':>8}")
    for phase in PHASES:
        print(f"{phase:<16}{means[phase]:>10.3f}{report['phase_shares'][phase]:>8.1%}")
    print(f"{'iteration':<16}{iteration_s:>10.3f}")
    peak = report["peak_memory_mib"]
    print(f"generated {report['tokens_per_s']:.1f} tokens/s, {report['episodes_per_s']:.2f} episodes/s; peak RSS "
          f"{peak['rss']:.0f} MiB" + (f", CUDA {peak['cuda_allocated']:.0f} MiB" if cuda else ""))  # fmt: skip
    print(f"written to {out}")
    return report


if __name__ == "__main__":
    main()
