"""Profiles: the one size dial that turns a recipe into a plan this machine can run.

A profile changes *size* (model, data, steps, sequence length, per-device batch), never the recipe's
effective batch size, so the LR/BS ratio the paper studies is kept on every machine: ``resolve`` solves
``effective batch = per-device batch x gradient accumulation x processes`` for the hardware at hand and
says what it chose and why (``resolve("dpo_1130", profile="auto")``: CPU -> smoke, one GPU ->
single_gpu, a big node -> paper). The three profiles are a handful of numbers read together with the
solver, so they live here in code; make a variant with ``get_profile("smoke").replace(max_steps=10)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import did_you_mean
from .hardware import Hardware, detect_hardware
from .paths import FIXTURES_DIR, mirror_dir
from .recipes import Recipe, RecipeError, RLVRRecipe, load_recipe

DATA_SOURCES = ("fixtures", "subset", "full")
MODEL_KEYWORDS = {
    "bundled": "SmolLM2-135M-Instruct shipped with the kit",
    "tiny": "a 2-layer SmolLM2 with the real tokenizer, for tests",
}


@dataclass(frozen=True)
class Profile:
    """How big a run is. ``None`` in a cap means "the recipe's value"."""

    name: str
    description: str
    model: str | None  # None: the recipe's model; "bundled", "tiny", or a Hub id
    data: str  # "fixtures" (data/fixtures or the mirror), "subset" or "full"
    max_train_samples: int | None
    max_steps: int | None  # optimiser steps; None: the recipe's epochs or episodes
    max_length: int | None  # cap on the recipe's max_length
    per_device_batch_cap: int  # largest batch one device holds at once
    gradient_checkpointing: bool
    peft: str  # "none": full fine-tuning; "auto": LoRA where the model does not fit in memory
    report_to: str  # "none" or "tensorboard"
    eval_limit: int | None  # items per benchmark; None: all
    eval_max_gen_toks: int | None = None  # cap on generated tokens in evaluation; None: each task's own
    max_episodes: int | None = None  # cap on an RLVR recipe's num_episodes; None: the recipe's
    eval_benchmarks: tuple[str, ...] | None = None  # what notebooks 02 and 03 score checkpoints on; None: all
    eval_stages: tuple[str, ...] | None = None  # stages whose checkpoints notebook 06 scores; None: all
    stage_max_steps: tuple[
        tuple[str, int], ...
    ] = ()  # (stage, steps) pairs in place of the profile's max_steps

    def steps_for(self, stage: str) -> int | None:
        """The optimiser steps (RLVR: iterations) a run of ``stage`` takes: its own cap, else ``max_steps``."""
        return dict(self.stage_max_steps).get(stage, self.max_steps)

    def __post_init__(self) -> None:
        if self.data not in DATA_SOURCES:
            raise ValueError(f"profile {self.name}: data must be one of {DATA_SOURCES}, got {self.data!r}")
        if self.peft not in ("none", "auto"):
            raise ValueError(f"profile {self.name}: peft must be 'none' or 'auto', got {self.peft!r}")
        if self.per_device_batch_cap < 1:
            raise ValueError(f"profile {self.name}: per_device_batch_cap must be at least 1")
        if self.max_episodes is not None and self.max_episodes < 1:
            raise ValueError(f"profile {self.name}: max_episodes must be at least 1 (None: the recipe's)")

    def replace(self, **changes: Any) -> Profile:
        """A copy with ``changes`` applied; a new ``max_steps`` holds for every stage (drops the stage caps)."""
        if "max_steps" in changes:
            changes.setdefault("stage_max_steps", ())
        return dataclasses.replace(self, **changes)


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        description="CPU check that every stage runs end to end: bundled 135M model, fixture data, 2 steps",
        model="bundled",
        data="fixtures",
        max_train_samples=64,
        max_steps=2,  # two optimiser steps of the full effective batch already take minutes on 2 cores
        max_length=256,
        per_device_batch_cap=4,
        gradient_checkpointing=False,
        peft="none",
        report_to="none",
        eval_limit=4,
        eval_max_gen_toks=96,  # IFEval allows 1,280 new tokens: minutes per item on 2 cores
        eval_benchmarks=("arc", "hellaswag", "piqa"),  # loglikelihood only: seconds per checkpoint
        eval_stages=("sft", "dpo"),  # a 1-iteration RLVR run is not worth minutes of CPU generation
        stage_max_steps=(("dpo", 1),),  # one step of DPO-1207's 32 pairs already takes a minute on 2 cores
    ),
    "single_gpu": Profile(
        name="single_gpu",
        description="one Colab or workstation GPU: the paper's model and recipe on a data subset",
        model=None,
        data="subset",
        max_train_samples=10_000,
        max_steps=None,
        max_length=2048,
        per_device_batch_cap=8,
        gradient_checkpointing=True,
        peft="auto",
        report_to="tensorboard",
        eval_limit=None,
        # kit choice: the card's 10M RLVR episodes are 312,500 PPO iterations of 32 rollouts, months on
        # one GPU; 32,000 episodes (1,000 iterations, about 3 passes over the 10,000-prompt subset) take
        # hours to a day (README "Memory and time per GPU") and are enough for the verified-reward curve
        max_episodes=32_000,
    ),
    "paper": Profile(
        name="paper",
        description="the full recipe on several GPUs (DeepSpeed ZeRO-3 or FSDP through Accelerate)",
        model=None,
        data="full",
        max_train_samples=None,
        max_steps=None,
        max_length=None,
        per_device_batch_cap=8,
        gradient_checkpointing=True,
        peft="none",
        report_to="tensorboard",
        eval_limit=None,
    ),
}


def get_profile(name: str | Profile) -> Profile:
    """The profile called ``name`` (a ``Profile`` is returned unchanged)."""
    if isinstance(name, Profile):
        return name
    if name not in PROFILES:
        raise ValueError(
            f"unknown profile {name!r}; use 'auto' or one of {', '.join(PROFILES)}"
            + did_you_mean(name, PROFILES)
        )
    return PROFILES[name]


#: ``auto`` picks ``paper`` only on a node that can hold the full 1.7B recipes without LoRA.
PAPER_MIN_GPUS = 4
PAPER_MIN_GPU_GIB = 40


def auto_profile_name(hardware: Hardware | None = None) -> str:
    """The profile ``auto`` means on ``hardware`` (default: this machine).

    ``paper`` on a node of at least 4 CUDA GPUs with 40 GiB or more each (full fine-tuning of
    SmolLM2-1.7B at the paper's lengths); ``single_gpu`` on any other CUDA machine (a Colab T4, two
    consumer GPUs: LoRA where memory needs it); ``smoke`` on a CPU or MPS (fp32 only, too slow for 1.7B).
    """
    hardware = hardware or detect_hardware()
    if hardware.device != "cuda":
        return "smoke"
    big = (hardware.memory_gib or 0) >= PAPER_MIN_GPU_GIB
    return "paper" if hardware.n_devices >= PAPER_MIN_GPUS and big else "single_gpu"


def data_mirror(profile: str | Profile) -> Path | None:
    """Where a profile reads data: ``data/fixtures`` for ``fixtures``, else ``SMOLTULU_DATA_MIRROR`` or the Hub (None)."""
    return FIXTURES_DIR if get_profile(profile).data == "fixtures" else mirror_dir()


def split_batch(effective: int, num_processes: int, cap: int, file: Any = None) -> tuple[int, int]:
    """``(per_device, accumulation)`` with per_device x accumulation x num_processes == effective.

    per_device is the largest divisor of effective / num_processes not above ``cap``.
    """
    if num_processes < 1:
        raise RecipeError(file, "effective_batch_size", f"needs at least one process, got {num_processes}.")
    if effective % num_processes:
        options = [n for n in range(1, effective + 1) if effective % n == 0]
        raise RecipeError(
            file,
            "effective_batch_size",
            f"an effective batch of {effective} cannot be split over {num_processes} processes "
            f"({effective} is not a multiple of {num_processes}).",
            f"run on a process count that divides {effective} ({', '.join(map(str, options))}), "
            "or change effective_batch_size in the recipe (this changes the LR/BS ratio).",
        )
    per_process = effective // num_processes
    per_device = max(d for d in range(1, min(cap, per_process) + 1) if per_process % d == 0)
    return per_device, per_process // per_device


@dataclass(frozen=True)
class Plan:
    """A recipe fitted to a profile and a machine: everything a stage needs to start training."""

    recipe: Recipe  # after the profile's caps (max_length, and RLVR lengths and episodes)
    profile: str
    hardware: Hardware
    num_processes: int
    per_device_batch_size: int
    gradient_accumulation_steps: int
    effective_batch_size: int  # always the recipe's
    per_device_batch_cap: int
    learning_rate: float
    lr_bs_ratio: float
    dtype: str
    max_length: int
    max_steps: int | None
    model: str  # what to load: a Hub id, or "bundled" / "tiny"
    data: str
    max_train_samples: int | None
    gradient_checkpointing: bool
    peft: str
    report_to: str
    eval_limit: int | None
    notes: tuple[str, ...] = ()  # what the profile changed, in words

    def __post_init__(self) -> None:
        formed = self.per_device_batch_size * self.gradient_accumulation_steps * self.num_processes
        if formed != self.effective_batch_size or formed != self.recipe.effective_batch_size:
            raise RecipeError(
                self.recipe.path,
                "effective_batch_size",
                f"the plan forms a batch of {formed}, not the recipe's {self.recipe.effective_batch_size}.",
            )

    def describe(self) -> str:
        """A short, human-readable account of the plan and why each number was chosen."""
        r, hw = self.recipe, self.hardware
        model = self.model + (
            f" ({MODEL_KEYWORDS[self.model]}; recipe: {r.model})" if self.model in MODEL_KEYWORDS else ""
        )
        if r.parent_recipe:
            model += f"; starts from the {r.parent_recipe} checkpoint when one is given"
        exponent = r.ratio_scale_label.replace("x1e", "1e-")
        scale = (
            f"{r.paper_table} reports it scaled {r.ratio_scale_label}"
            if r.paper_table
            else "the paper prints no ratio for this stage"
        )
        processes = "processes" if self.num_processes > 1 else "process"
        batch = (
            f"effective batch {self.effective_batch_size} = {self.per_device_batch_size} per device x "
            f"{self.gradient_accumulation_steps} accumulation x {self.num_processes} {processes} "
            f"(the largest per-device batch up to the cap of {self.per_device_batch_cap} that divides it)"
        )
        # PPO counts rollouts per process, as Tulu 3 did (rlvr.rlvr_batch_sizes)
        if isinstance(r, RLVRRecipe):
            batch = (
                f"{r.rollout_batch_size} rollouts and a minibatch of {r.minibatch_size} per process x "
                f"{self.num_processes} {processes} = {r.rollout_batch_size * self.num_processes} prompts per "
                f"iteration, {r.minibatch_size * self.num_processes} responses per optimizer step"
            )
        lines = [
            f"Plan for {r.name} ({r.stage}), profile '{self.profile}', on {hw.device} x{hw.n_devices} ({hw.device_name})",
            f"  model : {model}",
            f"  data  : {r.dataset} from {self.data}"
            + (f", at most {self.max_train_samples} samples" if self.max_train_samples else ""),
            f"  batch : {batch}",
            f"  LR/BS : {self.learning_rate:.3g} / {self.effective_batch_size} = {self.lr_bs_ratio:.3g} "
            f"({r.ratio_scaled:.4g} x {exponent}; {scale})",
            f"  length: {self.max_length} tokens; steps: {self.max_steps or 'as the recipe (epochs or episodes)'}",
            f"  dtype : {self.dtype} ({hw.dtype_reason}); peft: {self.peft}; "
            f"gradient checkpointing: {'on' if self.gradient_checkpointing else 'off'}; logs: {self.report_to}",
        ]
        return "\n".join(lines + [f"  note  : {n}" for n in self.notes])

    def to_dict(self) -> dict[str, Any]:
        """Plain values (for a manifest or a results row)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["recipe"] = self.recipe.to_dict()
        out["hardware"] = dataclasses.asdict(self.hardware)
        out["notes"] = list(self.notes)
        return out


def _apply_caps(recipe: Recipe, profile: Profile, num_processes: int = 1) -> tuple[Recipe, list[str]]:
    """The recipe with the profile's size caps applied, and a note for each change (an RLVR rollout batch
    is per process, so ``max_steps`` iterations take ``max_steps * rollout_batch_size * num_processes`` episodes)."""
    changes: dict[str, Any] = {}
    if profile.max_length and recipe.max_length > profile.max_length:
        changes["max_length"] = profile.max_length
    if isinstance(recipe, RLVRRecipe):
        if profile.max_length:  # prompt and response must fit together in the capped length
            for key in ("prompt_length", "response_length"):
                if getattr(recipe, key) > profile.max_length // 2:
                    changes[key] = profile.max_length // 2
        if profile.model and recipe.reward_model != profile.model:  # the value model starts from it
            changes["reward_model"] = profile.model
        steps = profile.steps_for(recipe.stage)
        steps = steps and steps * recipe.rollout_batch_size * num_processes
        cap = min((c for c in (profile.max_episodes, steps) if c), default=None)
        if cap and cap < recipe.num_episodes:
            changes["num_episodes"] = cap
    notes = [
        f"{key} capped from {getattr(recipe, key)} to {value} by the {profile.name} profile"
        for key, value in changes.items()
    ]
    if "num_episodes" in changes:  # how many PPO iterations the capped episodes make, against the recipe's
        rollout = recipe.rollout_batch_size * num_processes
        iterations = changes["num_episodes"] // rollout, recipe.num_episodes // rollout
        notes[-1] += f" ({iterations[0]:,} iterations of {rollout} rollouts instead of {iterations[1]:,})"
    return (recipe.replace(**changes) if changes else recipe), notes


def resolve(
    recipe: Recipe | str,
    profile: str | Profile = "auto",
    hardware: Hardware | None = None,
    num_processes: int | None = None,
    verbose: bool = True,
) -> Plan:
    """Fit ``recipe`` (a Recipe or a recipe name) to a profile and this machine, keeping its effective batch.

    ``num_processes`` defaults to the number of CUDA GPUs, else 1. Raises ``RecipeError`` when the
    effective batch cannot be split over the processes.
    """
    recipe = load_recipe(recipe) if isinstance(recipe, str) else recipe
    hardware = hardware or detect_hardware()
    prof = get_profile(auto_profile_name(hardware) if profile == "auto" else profile)
    if num_processes is None:
        num_processes = hardware.n_devices if hardware.device == "cuda" else 1
    per_device, accumulation = split_batch(
        recipe.effective_batch_size, num_processes, prof.per_device_batch_cap, recipe.path or recipe.name
    )
    capped, notes = _apply_caps(recipe, prof, num_processes)
    plan = Plan(
        recipe=capped,
        profile=prof.name,
        hardware=hardware,
        num_processes=num_processes,
        per_device_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        effective_batch_size=recipe.effective_batch_size,
        per_device_batch_cap=prof.per_device_batch_cap,
        learning_rate=recipe.learning_rate,
        lr_bs_ratio=recipe.lr_bs_ratio,
        dtype=hardware.dtype,
        max_length=capped.max_length,
        max_steps=prof.steps_for(recipe.stage),
        model=prof.model or recipe.model,
        data=prof.data,
        max_train_samples=prof.max_train_samples,
        gradient_checkpointing=prof.gradient_checkpointing,
        peft=prof.peft,
        report_to=prof.report_to,
        eval_limit=prof.eval_limit,
        notes=tuple(notes),
    )
    if verbose:
        print(plan.describe())
    return plan


def plan_table(
    recipes: list[str] | None = None,
    profile: str | Profile = "auto",
    hardware: Hardware | None = None,
    num_processes: int | None = None,
):
    """One row per recipe: how its effective batch is formed here, or in ``problem`` why it cannot be
    (the error message, which says which process counts would work)."""
    import pandas as pd

    from .recipes import list_recipes

    hardware = hardware or detect_hardware()
    rows = []
    for name in recipes or list_recipes():
        recipe = load_recipe(name)
        row: dict[str, Any] = {
            "recipe": name,
            "stage": recipe.stage,
            "learning_rate": recipe.learning_rate,
            "effective_batch": recipe.effective_batch_size,
            "lr_bs_ratio": recipe.lr_bs_ratio,
        }
        try:
            plan = resolve(recipe, profile, hardware=hardware, num_processes=num_processes, verbose=False)
        except RecipeError as exc:
            row["problem"] = str(exc)
        else:
            row.update(
                model=plan.model,
                per_device=plan.per_device_batch_size,
                accumulation=plan.gradient_accumulation_steps,
                processes=plan.num_processes,
                max_length=plan.max_length,
                max_steps=plan.max_steps,
                dtype=plan.dtype,
                problem="",
            )
        rows.append(row)
    return pd.DataFrame(rows)
