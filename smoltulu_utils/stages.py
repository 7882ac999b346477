"""The table of training stages that the command line, the sweep runner and the notebooks share.

One :class:`Stage` per stage of the SmolTulu chain (SFT -> DPO -> reward model -> RLVR): its recipe
class, train function (imported on use), result file, parent stages, command-line inputs and summary
line. Every train function takes ``(plan, output_dir, *, parent=..., verbose=...)``.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import KitError, did_you_mean
from .recipes import STAGES as RECIPE_CLASSES
from .recipes import Recipe


class StageError(KitError, ValueError):
    """An unknown stage, or a parent checkpoint a stage cannot start from; the message says the fix."""


#: The command-line option of each stage input or flag (``argparse`` keywords), by name.
OPTIONS: dict[str, dict[str, Any]] = {
    "record_batches": {
        "action": "store_true",
        "help": "every process writes the examples of each micro-batch it trained on to batches_rank{R}.json",
    },
    "reference_cache": {
        "help": "folder of cached reference log-probs (default: ~/.cache/smoltulu/reference_logps); "
        "'none': TRL's own precompute, no disk cache",
    },
    "reward_model": {
        "help": "the reward model the value model starts from: an RM run's folder or a Hub id "
        "(default: the recipe's, or the profile's model)",
    },
    "method": {"default": "ppo", "choices": ("ppo", "grpo"), "help": "ppo (SmolTulu's) or grpo (TRL's)"},
}


@dataclass(frozen=True)
class Stage:
    """One training stage. ``train``: ``"module:function"``, imported on use (the table loads without torch).

    ``parents``: the manifest stages ``--parent`` may name. ``inputs``: the train function's keywords the
    command passes besides ``plan``, ``output_dir``, ``parent``; ``flags``: its other options (both in
    :data:`OPTIONS`). ``summary``: a format string over the result ``r`` and :meth:`describe`'s values.
    """

    name: str
    train: str
    label: str  # the stage's name in a sentence: "an SFT", "a DPO"
    default_recipe: str
    parents: tuple[str, ...]
    summary: str
    description: str
    inputs: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    sweepable: bool = False  # a learning-rate x batch-size grid may train it

    @property
    def recipe_class(self) -> type[Recipe]:
        """The recipe class of the stage (the one ``load_recipe`` builds for ``stage: <name>``)."""
        return RECIPE_CLASSES[self.name]

    @property
    def result_file(self) -> str:
        """The file the command writes beside the checkpoint: ``<stage>_result.json``."""
        return f"{self.name}_result.json"

    def train_function(self) -> Callable[..., Any]:
        """The stage's ``train_<stage>`` function, imported now."""
        module, _, function = self.train.partition(":")
        return getattr(importlib.import_module(f"{__package__}.{module}"), function)

    def describe(self, result: Any) -> str:
        """One line of numbers about a finished run of this stage."""
        history = getattr(result, "train_loss", None) or []
        final = getattr(result, "final_train_loss", None)
        reference = getattr(result, "reference", None) or {}
        logs = getattr(result, "logs", None) or [{}]
        rewards = [logs[0].get("verifiable_reward"), logs[-1].get("verifiable_reward")]
        return self.summary.format(
            r=result,
            first=history[0][1] if history else math.nan,
            final=math.nan if final is None else final,
            found=reference.get("found", "computed"),
            passes=reference.get("forward_passes", 0),
            method=str(getattr(result, "method", "")).upper(),
            episodes=logs[-1].get("episodes", 0),
            reward="n/a" if None in rewards else f"{rewards[0]:.2f} -> {rewards[1]:.2f}",
        )


#: The stages in the order of the chain; the command line has one command per entry.
STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            "sft",
            "sft:train_sft",
            label="an SFT",
            default_recipe="sft_1130",
            parents=("sft",),
            summary="{r.steps} steps, loss per token {first:.4f} -> {final:.4f}, "
            "{r.trained_tokens} tokens trained",
            description="supervised fine-tuning (Table 2)",
            flags=("record_batches",),
            sweepable=True,
        ),
        Stage(
            "dpo",
            "dpo:train_dpo",
            label="a DPO",
            default_recipe="dpo_1130",
            parents=("sft", "dpo"),
            summary="{r.steps} steps, DPO loss {first:.4f} -> {final:.4f}, {r.tokens_seen} tokens seen, "
            "reference log-probs: {found} ({passes} forward passes on the main process)",
            description="direct preference optimisation (Table 5)",
            inputs=("reference_cache",),
            sweepable=True,
        ),
        Stage(
            "rm",
            "reward_model:train_rm",
            label="a reward-model",
            default_recipe="rm_1130",
            parents=("sft", "dpo", "rm"),
            summary="{r.steps} steps, Bradley-Terry loss {first:.4f} -> {final:.4f}, "
            "{r.trained_tokens} tokens seen",
            description="the Bradley-Terry reward model (Table 7)",
            sweepable=True,
        ),
        Stage(
            "rlvr",
            "rlvr:train_rlvr",
            label="an RLVR",
            default_recipe="rlvr_ppo",
            parents=("sft", "dpo", "rlvr"),
            summary="{r.iterations} {method} iterations, {episodes} episodes, verifiable reward {reward}",
            description="RL with verifiable rewards: the kit's PPO (as SmolTulu) or TRL's GRPO",
            inputs=("reward_model", "method"),
        ),
    )
}


def get_stage(name: str) -> Stage:
    """The table's entry for ``name``; an unknown name raises :class:`StageError` naming the stages."""
    if name not in STAGES:
        raise StageError(
            f"unknown stage {name!r}; use one of {', '.join(STAGES)}" + did_you_mean(name, STAGES)
        )
    return STAGES[name]


def sweep_stages() -> dict[str, type[Recipe]]:
    """``{stage: recipe class}`` of the stages a learning-rate x batch-size sweep can train."""
    return {name: stage.recipe_class for name, stage in STAGES.items() if stage.sweepable}


def check_parent_stage(stage: str | Stage, parent: str | Path | None) -> str | None:
    """The manifest stage of a ``parent`` checkpoint folder, checked against what ``stage`` accepts.

    Hub ids, ``bundled``, ``tiny`` and None give None; a folder without a manifest, or of a stage that
    ``stage`` cannot start from, raises :class:`StageError`.
    """
    from .manifest import MANIFEST_NAME, read_manifest

    spec = get_stage(stage) if isinstance(stage, str) else stage
    if parent is None:
        return None
    folder = Path(parent).expanduser()
    if not folder.is_dir():
        if str(parent).startswith((".", "/", "~")) or str(parent).count("/") > 1:  # a path, not a Hub id
            raise StageError(f"parent {parent} is not a folder; give a checkpoint folder or a Hub id")
        return None  # a Hub id or a kit keyword
    if not (folder / MANIFEST_NAME).is_file():
        raise StageError(
            f"parent {folder} has no {MANIFEST_NAME}: it was not written by a kit stage. Give the folder a "
            f"{' or '.join(spec.parents)} run saved (e.g. runs/{spec.parents[0]}/...), or a Hub id."
        )
    found = read_manifest(folder).get("stage")
    if found not in spec.parents:
        raise StageError(
            f"parent {folder} is a {found!r} checkpoint; the {spec.name} stage starts from a "
            f"{' or '.join(spec.parents)} checkpoint. Give such a folder, or leave --parent out."
        )
    return found


def parent_hint(stage: str | Stage, recipe: Recipe, runs: Path) -> str | None:
    """Where the checkpoint of the recipe's ``parent_recipe`` would be under ``runs`` (None: the recipe has none)."""
    spec = get_stage(stage) if isinstance(stage, str) else stage
    if not recipe.parent_recipe:
        return None
    parent_stage = next((s for s in spec.parents if recipe.parent_recipe.startswith(s)), spec.parents[0])
    return str(runs / parent_stage / recipe.parent_recipe)


def jsonable_result(result: Any, plan: Any, extra: Mapping[str, Any] | None = None) -> Any:
    """The content of ``<stage>_result.json``: the result's fields, the plan and ``extra``, as plain JSON."""
    from .serialize import jsonable

    return jsonable({**result.to_dict(), "plan": plan.to_dict(), **dict(extra or {})})
