"""The table of training stages: what the command line, the sweep runner and the notebooks share.

One :class:`Stage` per stage of the SmolTulu chain (SFT -> DPO -> reward model -> RLVR)::

    from smoltulu_utils.stages import STAGES, get_stage

    stage = get_stage("dpo")
    stage.recipe_class            # DPORecipe (from recipes.STAGES, keyed by the YAML's ``stage:``)
    stage.train_function()        # smoltulu_utils.dpo.train_dpo, imported on use
    stage.result_file             # "dpo_result.json": what ``python -m smoltulu_utils dpo`` writes
    stage.parents                 # ("sft", "dpo"): the checkpoints it may start from
    stage.inputs                  # keyword inputs of train_dpo beyond plan, output_dir and parent

``python -m smoltulu_utils <stage>`` (:mod:`smoltulu_utils.cli`) builds its options, its plan and its
summary from this table; :func:`smoltulu_utils.sweep.train_and_evaluate` picks a cell's trainer here.
Notebooks may call ``train_sft`` / ``train_dpo`` / ``train_rm`` / ``train_rlvr`` directly: every
function named in the table takes ``(plan, output_dir, *, parent=..., verbose=...)``.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import KitError
from .recipes import STAGES as RECIPE_CLASSES
from .recipes import Recipe


class StageError(KitError, ValueError):
    """An unknown stage, or a parent checkpoint a stage cannot start from; the message says the fix."""


def _loss(result: Any) -> tuple[float, float]:
    history = getattr(result, "train_loss", None) or []
    first = history[0][1] if history else float("nan")
    final = getattr(result, "final_train_loss", None)
    return first, final if final is not None else float("nan")


def _sft_summary(result: Any) -> str:
    first, final = _loss(result)
    return (
        f"{result.steps} steps, loss per token {first:.4f} -> {final:.4f}, "
        f"{result.trained_tokens} tokens trained"
    )


def _dpo_summary(result: Any) -> str:
    first, final = _loss(result)
    reference = result.reference or {}
    return (
        f"{result.steps} steps, DPO loss {first:.4f} -> {final:.4f}, {result.tokens_seen} tokens seen, "
        f"reference log-probs: {reference.get('found', 'computed')} "
        f"({reference.get('forward_passes', 0)} forward passes on the main process)"
    )


def _rm_summary(result: Any) -> str:
    first, final = _loss(result)
    return (
        f"{result.steps} steps, Bradley-Terry loss {first:.4f} -> {final:.4f}, "
        f"{result.trained_tokens} tokens seen"
    )


def _rlvr_summary(result: Any) -> str:
    logs = result.logs or [{}]
    first, last = logs[0].get("verifiable_reward"), logs[-1].get("verifiable_reward")
    reward = f"{first:.2f} -> {last:.2f}" if first is not None and last is not None else "n/a"
    return (
        f"{result.iterations} {result.method.upper()} iterations, {logs[-1].get('episodes', 0)} episodes, "
        f"verifiable reward {reward}"
    )


@dataclass(frozen=True)
class Stage:
    """One training stage: its recipe class, train function, result file, parents and extra inputs.

    ``train`` is ``"module:function"`` inside the package, imported by :meth:`train_function` only when
    called (so the table loads without torch or TRL, and a test may replace the module). ``parents``:
    the manifest stages of the checkpoints ``--parent`` may name. ``inputs``: the train function's
    keyword inputs the command line passes besides ``plan``, ``output_dir`` and ``parent``.
    ``sweepable``: a learning-rate x batch-size grid may train it (:mod:`smoltulu_utils.sweep`).
    """

    name: str
    train: str
    label: str  # the stage's name in a sentence: "an SFT", "a DPO"
    default_recipe: str
    parents: tuple[str, ...]
    inputs: tuple[str, ...] = ()
    sweepable: bool = False
    summary: Callable[[Any], str] | None = None
    description: str = ""

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
        return self.summary(result) if self.summary is not None else f"{getattr(result, 'steps', '?')} steps"


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
            sweepable=True,
            summary=_sft_summary,
            description="supervised fine-tuning (Table 2)",
        ),
        Stage(
            "dpo",
            "dpo:train_dpo",
            label="a DPO",
            default_recipe="dpo_1130",
            parents=("sft", "dpo"),
            inputs=("reference_cache",),
            sweepable=True,
            summary=_dpo_summary,
            description="direct preference optimisation (Table 5)",
        ),
        Stage(
            "rm",
            "reward_model:train_rm",
            label="a reward-model",
            default_recipe="rm_1130",
            parents=("sft", "dpo", "rm"),
            sweepable=True,
            summary=_rm_summary,
            description="the Bradley-Terry reward model (Table 7)",
        ),
        Stage(
            "rlvr",
            "rlvr:train_rlvr",
            label="an RLVR",
            default_recipe="rlvr_ppo",
            parents=("sft", "dpo", "rlvr"),
            inputs=("reward_model", "method"),
            summary=_rlvr_summary,
            description="RL with verifiable rewards: the kit's PPO (as SmolTulu) or TRL's GRPO",
        ),
    )
}


def get_stage(name: str) -> Stage:
    """The table's entry for ``name``; an unknown name raises :class:`StageError` naming the stages."""
    if name not in STAGES:
        hint = difflib.get_close_matches(str(name), list(STAGES), n=1)
        raise StageError(
            f"unknown stage {name!r}; use one of {', '.join(STAGES)}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
        )
    return STAGES[name]


def sweep_stages() -> dict[str, type[Recipe]]:
    """``{stage: recipe class}`` of the stages a learning-rate x batch-size sweep can train."""
    return {name: stage.recipe_class for name, stage in STAGES.items() if stage.sweepable}


def check_parent_stage(stage: str | Stage, parent: str | Path | None) -> str | None:
    """The manifest stage of a ``parent`` checkpoint folder, checked against what ``stage`` accepts.

    Hub ids, kit keywords (``bundled``, ``tiny``) and None pass unchecked (None is returned); a folder
    without a manifest, or of a stage ``stage`` cannot start from, raises :class:`StageError` (the
    train functions check tokenizers and templates themselves).
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


__all__ = [
    "STAGES",
    "Stage",
    "StageError",
    "check_parent_stage",
    "get_stage",
    "jsonable_result",
    "parent_hint",
    "sweep_stages",
]
