"""Non-padding tokens per second of the kit's SFT trainer against TRL's default and TRL's best CPU setup.

Three training runs one after the other in this process, each on a freshly loaded copy of the model:

- baseline: ``trl.SFTTrainer`` with ``SFTConfig`` at TRL's defaults (padded batches, loss on every token,
  gradient checkpointing, TRL's chunked LM-head loss, TRL's tokenisation of the ``messages`` rows) except
  what a fair comparison must hold equal: per-device batch, ``max_length``, optimizer steps, and fp32
  (TRL's default is bf16 autocast);
- trl_best: TRL's fastest configuration on a CPU for the same work: ``packing=True,
  packing_strategy="bfd"`` (whole conversations laid end to end in rows of ``max_length``, padding-free),
  no gradient checkpointing, and the loss on the assistant turns only (the rows as TRL's prompt-completion
  conversations, so ``completion_only_loss`` masks the prompts; ``assistant_only_loss`` has no training
  template for SmolLM2's chat template). A per-device batch counts packed rows here: it is set so that one
  epoch takes as many optimizer steps as the other two sides (the same tokens per step on average); fp32;
- kit: ``build_trainer`` called as ``train_sft`` calls it, on ``prepare_sft_rows`` output (assistant-only
  labels), with the recipe's ``packing: true``, so batches are padding-free.

Both see the same synthetic conversations in the same order (same seed; ``same_inputs`` checks the real
tokens of every step), whose lengths have a long tail like the Tulu 3 SFT mixture: lognormal, median 40%
of ``max_length``, capped at it, cut from the fixture rows' text. Each run's first optimizer step is a
warm-up; the next ``--steps`` are timed, end of step to end of step (collation, forward, backward, update).

How to read it: ``ratio`` = kit / baseline non-padding tokens per second (every real input token goes
through the forward and backward pass on both sides; target >= 1.5); with the same inputs it is also the
plain speed-up (``time_ratio``). ``ratio_best`` = kit / trl_best non-padding tokens per second (target
>= 1.3; trl_best's steps hold other rows than the kit's, so only the rate compares).
``ratio_label_tokens`` counts only tokens with a label instead (``labels[..., 1:] != -100``): the baseline
trains the prompts too, so it counts more of them per step.
``mfu`` = 6 x trainable params x the kit's non-padding tokens/s (no attention term) over this machine's
best fp32 2048x2048 ``torch.matmul`` rate (target >= 40% on the bundled 135M); ``mfu_label_tokens`` counts
labelled tokens only. Run: ``python benchmarks/sft_throughput.py [--model tiny] [--steps N]``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from dataclasses import asdict
from itertools import pairwise
from pathlib import Path

import datasets
import torch
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from smoltulu_utils.atomic import atomic_open
from smoltulu_utils.data import load_rows
from smoltulu_utils.hardware import detect_hardware, hardware_report
from smoltulu_utils.models import load_model, load_tokenizer, tiny_model
from smoltulu_utils.paths import FIXTURES_DIR, results_dir
from smoltulu_utils.profiles import get_profile, resolve
from smoltulu_utils.recipes import load_recipe
from smoltulu_utils.sft import build_trainer, padding_free_supported, prepare_sft_rows

MEDIAN_FRACTION, SIGMA = 0.4, 0.8  # lognormal conversation lengths: median 40% of max_length, long tail
RATIO_TARGET, RATIO_BEST_TARGET, MFU_TARGET = 1.5, 1.3, 0.40


class StepTimer(TrainerCallback):
    def __init__(self):
        self.ends: list[float] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())


def synthetic_rows(tokenizer, n: int, max_length: int, seed: int) -> list[dict]:
    """``n`` single-turn conversations with lognormal token lengths, cut from the fixture rows' text."""
    texts = [m["content"] for r in load_rows("tulu3_sft", mirror=FIXTURES_DIR) for m in r["messages"]]
    pool = tokenizer(" ".join(texts))["input_ids"]
    empty = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    overhead = len(tokenizer(tokenizer.apply_chat_template(empty, tokenize=False))["input_ids"]) - 2
    rng = random.Random(seed)

    def text(k: int) -> str:
        at = rng.randrange(len(pool))
        return tokenizer.decode([pool[(at + j) % len(pool)] for j in range(k)]).strip() or "ok"

    rows = []
    for _ in range(n):
        drawn = rng.lognormvariate(math.log(MEDIAN_FRACTION * max_length), SIGMA)
        body = max(8, min(max_length, round(drawn)) - overhead)
        user = max(2, round(body * rng.uniform(0.15, 0.6)))
        rows.append({"messages": [{"role": "user", "content": text(user)},
                                  {"role": "assistant", "content": text(max(2, body - user))}]})  # fmt: skip
    return rows


def load(name: str):
    return tiny_model(seed=0) if name == "tiny" else (load_model(name), load_tokenizer(name))


def measure(trainer) -> dict:
    """Train, timing each step and counting (step, trained, real, cells) tokens of every training batch."""
    timer, batches, inner = StepTimer(), [], trainer.compute_loss
    trainer.add_callback(timer)

    def compute_loss(model, inputs, *args, **kwargs):
        if model.training:
            labels, mask = inputs["labels"], inputs.get("attention_mask")
            real = int(mask.sum()) if mask is not None else labels.numel()  # padding-free rows: no padding
            trained = int((labels[..., 1:] != -100).sum())
            batches.append((trainer.state.global_step, trained, real, labels.numel()))
        return inner(model, inputs, *args, **kwargs)

    trainer.compute_loss = compute_loss
    trainer.train()
    timed = [b for b in batches if b[0] >= 1]  # step 0 (the first optimizer step) is the warm-up
    trained, seconds = sum(b[1] for b in timed), timer.ends[-1] - timer.ends[0]
    return {"steps": len(timer.ends) - 1, "trained_tokens": trained, "real_tokens": sum(b[2] for b in timed),
            "batch_cells": sum(b[3] for b in timed), "seconds": seconds, "tokens_per_s": trained / seconds,
            "step_seconds": [b - a for a, b in pairwise(timer.ends)],
            "real_per_step": [b[2] for b in timed]}  # fmt: skip


def run_baseline(args, rows, out_dir: str) -> dict:
    model, tokenizer = load(args.model)
    config = SFTConfig(output_dir=out_dir, per_device_train_batch_size=args.batch,
                       max_length=args.max_length, max_steps=args.steps + 1, bf16=False)  # fmt: skip
    trainer = SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tokenizer)  # fmt: skip
    return measure(trainer) | {"gradient_checkpointing": config.gradient_checkpointing, "padding_free": False}


def run_trl_best(args, rows, out_dir: str) -> dict:
    """TRL's best CPU setup: bfd packing (padding-free), no gradient checkpointing, assistant-only loss."""
    pairs = datasets.Dataset.from_list(
        [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]
    )

    def config(batch: int, **kwargs) -> SFTConfig:
        return SFTConfig(output_dir=out_dir, per_device_train_batch_size=batch, max_length=args.max_length,
                         max_steps=args.steps + 1, bf16=False, packing=True, packing_strategy="bfd",
                         gradient_checkpointing=False, **kwargs)  # fmt: skip

    model, tokenizer = load(args.model)  # a throwaway trainer packs the rows, to size the batch
    packer = SFTTrainer(model=model, args=config(args.batch), train_dataset=pairs, processing_class=tokenizer)
    packed = packer.train_dataset  # tokenized, labels of the prompts already -100, packed
    batch = max(1, round(len(packed) / (args.steps + 1)))  # packed rows per step: one epoch, same steps
    model, tokenizer = load(args.model)
    trainer = SFTTrainer(model=model, args=config(batch, dataset_kwargs={"skip_prepare_dataset": True}),
                         train_dataset=packed, processing_class=tokenizer)  # fmt: skip
    return measure(trainer) | {
        "gradient_checkpointing": trainer.args.gradient_checkpointing,
        "padding_free": bool(trainer.padding_free),
        "completion_only_loss": bool(packer.completion_only_loss),
        "packed_rows": len(packed),
        "packed_rows_per_step": batch,
    }


def run_kit(args, rows, out_dir: str) -> tuple[dict, int, list[int]]:
    model, tokenizer = load(args.model)
    recipe = load_recipe("sft_1130").replace(effective_batch_size=args.batch, packing=True)
    profile = get_profile("smoke").replace(model=args.model, per_device_batch_cap=args.batch,
                                           max_steps=args.steps + 1, max_length=args.max_length)  # fmt: skip
    plan = resolve(recipe, profile, verbose=False)
    dataset, _ = prepare_sft_rows(rows, tokenizer, plan.max_length)
    padding_free = padding_free_supported(model)[0]
    trainer = build_trainer(plan, model, tokenizer, dataset, out_dir, padding_free=padding_free,
                            loss_reduction=recipe.loss_reduction)  # fmt: skip
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = measure(trainer) | {"gradient_checkpointing": plan.gradient_checkpointing}
    return result | {"padding_free": padding_free}, n_trainable, [len(ids) for ids in dataset["input_ids"]]


def matmul_flops(n: int = 2048, repeats: int = 10) -> float:
    """Best fp32 ``torch.matmul`` rate of this machine, FLOP/s (2 n^3 per product)."""
    a, b, times = torch.randn(n, n), torch.randn(n, n), []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times[1:])  # the first product is a warm-up


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled", help='"bundled" (default), "tiny", or a folder')
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="per-device batch of the baseline and the kit")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps (after one warm-up step)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic lengths and text")
    parser.add_argument("--out", type=Path, default=None, help="JSON output")
    args = parser.parse_args(argv)
    out = args.out or results_dir() / "benchmarks" / "sft_throughput.json"

    hw = detect_hardware()
    n_rows = (args.steps + 1) * args.batch  # one batch per step, warm-up included: one epoch
    rows = synthetic_rows(load_tokenizer(args.model), n_rows, args.max_length, args.seed)
    peak_before = matmul_flops()
    with tempfile.TemporaryDirectory() as tmp:
        base = run_baseline(args, rows, str(Path(tmp) / "baseline"))
        best = run_trl_best(args, rows, str(Path(tmp) / "trl_best"))
        kit, n_trainable, lengths = run_kit(args, rows, str(Path(tmp) / "kit"))
    # the machine's rate, measured before and after the runs: the higher one (a lower share) counts
    peak, lengths = max(peak_before, matmul_flops()), sorted(lengths)
    for side in (base, best, kit):
        side["real_tokens_per_s"] = side["real_tokens"] / side["seconds"]
    flops = 6 * n_trainable * kit["real_tokens_per_s"]
    ratio, mfu = kit["real_tokens_per_s"] / base["real_tokens_per_s"], flops / peak
    ratio_best = kit["real_tokens_per_s"] / best["real_tokens_per_s"]
    best.pop("real_per_step")
    report = {"benchmark": "sft_throughput", **{k: v for k, v in vars(args).items() if k != "out"},
              "same_inputs": base.pop("real_per_step") == kit.pop("real_per_step"),
              "lengths": {"median": lengths[len(lengths) // 2], "max": lengths[-1],
                          "at_max_length": sum(n >= args.max_length for n in lengths), "n": len(lengths)},
              "baseline": base, "trl_best": best, "kit": kit,
              "ratio": ratio, "ratio_met": ratio >= RATIO_TARGET, "ratio_best": ratio_best,
              "ratio_best_met": ratio_best >= RATIO_BEST_TARGET, "ratio_best_target": RATIO_BEST_TARGET,
              "time_ratio": base["seconds"] / kit["seconds"], "trainable_params": n_trainable,
              "model_flops_per_s": flops, "matmul_flops_per_s": peak, "mfu": mfu,
              "mfu_met": mfu >= MFU_TARGET, "ratio_target": RATIO_TARGET, "mfu_target": MFU_TARGET,
              "ratio_label_tokens": kit["tokens_per_s"] / base["tokens_per_s"],
              "ratio_best_label_tokens": kit["tokens_per_s"] / best["tokens_per_s"],
              "mfu_label_tokens": 6 * n_trainable * kit["tokens_per_s"] / peak,
              "torch_threads": torch.get_num_threads(), "machine": asdict(hw)}  # fmt: skip
    with atomic_open(out) as fh:
        fh.write(json.dumps(report, indent=2) + "\n")

    met = {True: "met", False: "NOT met"}
    print(hardware_report(hw))
    print(f"model {args.model}, max_length {args.max_length}, batch {args.batch}, {args.steps} timed steps; "
          f"lengths {report['lengths']}; same inputs baseline and kit: {report['same_inputs']}")  # fmt: skip
    print(f"{'side':<10}{'steps':>6}{'real tokens':>13}{'labelled':>10}{'seconds':>10}{'real tokens/s':>15}")
    for name, r in (("baseline", base), ("trl_best", best), ("kit", kit)):
        print(f"{name:<10}{r['steps']:>6}{r['real_tokens']:>13}{r['trained_tokens']:>10}"
              f"{r['seconds']:>10.2f}{r['real_tokens_per_s']:>15.1f}")  # fmt: skip
    print(f"ratio kit/baseline (non-padding tokens/s): {ratio:.2f}x, target >= {RATIO_TARGET}x "
          f"{met[ratio >= RATIO_TARGET]}; labelled tokens/s {report['ratio_label_tokens']:.2f}x")  # fmt: skip
    print(f"ratio kit/trl_best (non-padding tokens/s): {ratio_best:.2f}x, target >= {RATIO_BEST_TARGET}x "
          f"{met[ratio_best >= RATIO_BEST_TARGET]}; labelled tokens/s "
          f"{report['ratio_best_label_tokens']:.2f}x")  # fmt: skip
    print(f"kit: 6 x {n_trainable / 1e6:.1f}M params x non-padding tokens/s = {flops / 1e9:.1f} GFLOP/s over "
          f"fp32 matmul {peak / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads) = {mfu:.1%}, target "
          f">= {MFU_TARGET:.0%} {met[mfu >= MFU_TARGET]}; labelled tokens only "
          f"{report['mfu_label_tokens']:.1%}")  # fmt: skip
    print(f"written to {out}")
    return report


if __name__ == "__main__":
    main()
