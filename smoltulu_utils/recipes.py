"""Recipes: one YAML file per stage and run, loaded into a frozen, validated dataclass.

A recipe holds the numbers of one training run as the paper (or Tulu 3, or the kit) states them::

    recipe = load_recipe("sft_1130")
    recipe.learning_rate, recipe.effective_batch_size   # 9e-05, 8
    recipe.ratio_scaled, recipe.ratio_scale_label       # 11.25, 'x1e6'  (as Table 2 prints it)
    faster = recipe.replace(learning_rate=1e-4)         # a new, validated recipe (for sweeps)

The YAML's ``stage:`` key picks the class (``SFTRecipe``, ``DPORecipe``, ``RMRecipe``, ``RLVRRecipe``).
Every value line ends with a comment naming its source (``# Table 2``, ``# Tulu 3: ...``,
``# kit choice: why``); ``recipe_sources`` reads them back. Mistakes raise ``RecipeError`` with the
file, the key and the fix. The recipe says *what* to train; how it fits the machine at hand
(per-device batch, accumulation, caps) is decided by ``profiles.resolve``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, get_type_hints

import yaml

from .errors import FileKeyError
from .paths import RECIPES_DIR

DATASETS = ("tulu3_sft", "tulu3_preference", "rlvr_mixed")
LR_SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
LOSS_REDUCTIONS = ("sum", "mean")
DPO_LOSS_TYPES = ("dpo", "dpo_norm")
#: Every value line of a shipped recipe must start its comment with one of these.
SOURCE_TAGS = ("Table 2", "Table 5", "Table 7", "Tulu 3", "model card", "kit choice")


class RecipeError(FileKeyError):
    """A recipe that cannot be used; the message names the file, the key and the fix."""

    unnamed = "<recipe>"


def _closest(word: str, choices) -> str:
    match = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """Fields every stage shares. Build one with ``load_recipe``; do not subclass per run."""

    stage_name: ClassVar[str] = ""
    ratio_scale: ClassVar[float] = 1e7  # the factor the paper multiplies LR/BS by before printing it
    paper_table: ClassVar[str | None] = None

    name: str
    stage: str
    model: str  # Hub id of the weights the stage starts from when no parent checkpoint is given
    dataset: str  # a kit dataset name, see DATASETS
    learning_rate: float
    effective_batch_size: int  # per-device batch x gradient accumulation x processes
    num_epochs: float
    max_length: int
    lr_scheduler: str
    warmup_ratio: float
    weight_decay: float
    seed: int
    model_revision: str | None = None  # None: the loader's pinned revision
    parent_recipe: str | None = None  # the recipe whose output checkpoint this stage starts from
    path: Path | None = field(default=None, repr=False, compare=False)  # the YAML it came from

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for key in self.keys():
            object.__setattr__(self, key, self._coerce(key, getattr(self, key), hints[key]))
        self._validate()

    # -- derived numbers -------------------------------------------------------------------------
    @property
    def lr_bs_ratio(self) -> float:
        """Learning rate divided by the effective batch size (the paper's LR/BS)."""
        return self.learning_rate / self.effective_batch_size

    @property
    def ratio_scaled(self) -> float:
        """LR/BS as the paper prints it: multiplied by ``ratio_scale`` (1e6 for SFT, 1e7 for DPO/RM)."""
        return self.lr_bs_ratio * self.ratio_scale

    @property
    def ratio_scale_label(self) -> str:
        """The paper's column label for the scale, e.g. ``'x1e6'``."""
        return f"x1e{round(math.log10(self.ratio_scale))}"

    # -- copies and export -----------------------------------------------------------------------
    def replace(self, **changes: Any) -> Recipe:
        """A new recipe with ``changes`` applied and validated again (the source file is kept)."""
        known = self.keys()
        for key in changes:
            if key not in known:
                raise RecipeError(self.path or self.name, key, "is not a recipe key." + _closest(key, known))
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The recipe's keys and values, as they would be written to YAML or a manifest."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "path"}

    @classmethod
    def keys(cls) -> list[str]:
        """The YAML keys this recipe class accepts."""
        return [f.name for f in dataclasses.fields(cls) if f.name != "path"]

    @classmethod
    def required_keys(cls) -> list[str]:
        """The YAML keys that have no default."""
        return [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]

    # -- checks ----------------------------------------------------------------------------------
    def _fail(self, key: str, problem: str, fix: str = "") -> None:
        raise RecipeError(self.path or getattr(self, "name", None), key, problem, fix)

    def _coerce(self, key: str, value: Any, kind: Any) -> Any:
        """Return ``value`` as the field's type ``kind``, or fail naming the key."""
        if value is None:
            if type(None) in getattr(kind, "__args__", ()):
                return None
            self._fail(key, "is empty (null).", "give it a value.")
        kind = next((k for k in getattr(kind, "__args__", (kind,)) if k is not type(None)), kind)
        if kind is float and not isinstance(value, bool):
            try:  # PyYAML reads 9e-5 (no dot) as a string; accept it as the number it means
                number = float(value)
                if math.isfinite(number):
                    return number
            except (TypeError, ValueError):
                pass
        elif kind is int and not isinstance(value, bool):
            if isinstance(value, int):
                return value
            try:  # "1e7" or 10000000.0
                number = float(value)
                if number.is_integer():
                    return int(number)
            except (TypeError, ValueError):
                pass
        elif kind is bool and isinstance(value, bool):
            return value
        elif kind is str and isinstance(value, str):
            return value
        self._fail(
            key,
            f"should be {kind.__name__}, got {value!r} ({type(value).__name__}).",
            f"write it as a plain {kind.__name__}, e.g. {_EXAMPLES[kind]}.",
        )

    def _validate(self) -> None:
        if self.stage != self.stage_name:
            self._fail(
                "stage",
                f"is '{self.stage}' but this is a {type(self).__name__}.",
                "load the file with load_recipe(), which picks the class from 'stage'.",
            )
        if self.dataset not in DATASETS:
            self._fail(
                "dataset",
                f"unknown dataset '{self.dataset}'." + _closest(self.dataset, DATASETS),
                f"use one of {', '.join(DATASETS)}.",
            )
        for key in ("learning_rate", "effective_batch_size", "num_epochs", "max_length"):
            if getattr(self, key) <= 0:
                self._fail(key, f"must be positive, got {getattr(self, key)}.", "give a value above 0.")
        if not 0 <= self.warmup_ratio < 1:
            self._fail(
                "warmup_ratio",
                f"must be in [0, 1), got {self.warmup_ratio}.",
                "give the fraction of steps spent warming up, e.g. 0.03.",
            )
        if self.weight_decay < 0:
            self._fail("weight_decay", f"must be >= 0, got {self.weight_decay}.", "use 0.0 for none.")
        clip = getattr(self, "max_grad_norm", None)  # the stages trained by a Trainer: SFT, DPO, RM
        if clip is not None and clip < 0:
            self._fail(
                "max_grad_norm",
                f"must be >= 0, got {clip}.",
                "give the gradient norm to clip to (Tulu 3: 1.0), or 0.0 for no clipping.",
            )
        if self.lr_scheduler not in LR_SCHEDULERS:
            self._fail(
                "lr_scheduler",
                f"unknown scheduler '{self.lr_scheduler}'." + _closest(self.lr_scheduler, LR_SCHEDULERS),
                f"use one of {', '.join(LR_SCHEDULERS)}.",
            )


_EXAMPLES = {float: "9.0e-5", int: "8", bool: "true", str: "a word in quotes"}


@dataclass(frozen=True, kw_only=True)
class SFTRecipe(Recipe):
    """Supervised fine-tuning (paper Table 2); LR/BS printed x1e6."""

    stage_name: ClassVar[str] = "sft"
    ratio_scale: ClassVar[float] = 1e6
    paper_table: ClassVar[str | None] = "Table 2"

    loss_reduction: str  # "sum": summed over tokens (Tulu 3), "mean": averaged
    packing: bool
    max_grad_norm: float  # clip each step's gradient to this norm (Tulu 3: 1.0); 0: no clipping

    def _validate(self) -> None:
        super()._validate()
        if self.loss_reduction not in LOSS_REDUCTIONS:
            self._fail(
                "loss_reduction",
                f"unknown reduction '{self.loss_reduction}'.",
                "use 'sum' (Tulu 3: summed over tokens) or 'mean'.",
            )


@dataclass(frozen=True, kw_only=True)
class DPORecipe(Recipe):
    """Direct preference optimisation (paper Table 5); LR/BS printed x1e7."""

    stage_name: ClassVar[str] = "dpo"
    paper_table: ClassVar[str | None] = "Table 5"

    beta: float
    loss_type: str  # "dpo" or "dpo_norm" (length-normalised, Tulu 3)
    max_grad_norm: float  # clip each step's gradient to this norm (Tulu 3: 1.0); 0: no clipping

    def _validate(self) -> None:
        super()._validate()
        if self.beta <= 0:
            self._fail("beta", f"must be positive, got {self.beta}.", "Tulu 3 uses 5 with dpo_norm.")
        if self.loss_type not in DPO_LOSS_TYPES:
            self._fail(
                "loss_type",
                f"unknown loss type '{self.loss_type}'." + _closest(self.loss_type, DPO_LOSS_TYPES),
                f"use one of {', '.join(DPO_LOSS_TYPES)}.",
            )


@dataclass(frozen=True, kw_only=True)
class RMRecipe(Recipe):
    """Reward model, a Bradley-Terry classifier on preference pairs (paper Table 7); LR/BS printed x1e7."""

    stage_name: ClassVar[str] = "rm"
    paper_table: ClassVar[str | None] = "Table 7"

    max_grad_norm: float  # clip each step's gradient to this norm (1.0, as Tulu 3); 0: no clipping


@dataclass(frozen=True, kw_only=True)
class RLVRRecipe(Recipe):
    """PPO with verifiable rewards (Reinforced model card). The paper prints no RLVR ratio; the kit uses x1e7."""

    stage_name: ClassVar[str] = "rlvr"

    tulu3_learning_rate: float  # Tulu 3's RLVR learning rate, for comparison with the card's
    kl_beta: float
    num_episodes: int
    prompt_length: int
    response_length: int
    temperature: float
    rollout_batch_size: int
    minibatch_size: int
    non_stop_penalty: float  # reward for a response that never emits end-of-sequence
    verifiable_reward: float  # reward for a verified correct answer
    reward_model_multiplier: float  # weight of the reward model's score (0: verifiable reward only)
    value_model_from: str  # "reward_model" or "policy"
    reward_model: str  # Hub id of the reward model
    reward_recipe: str | None = None  # the recipe whose checkpoint replaces reward_model in a chained run

    def _validate(self) -> None:
        super()._validate()
        for key in (
            "num_episodes",
            "prompt_length",
            "response_length",
            "temperature",
            "rollout_batch_size",
            "minibatch_size",
            "tulu3_learning_rate",
        ):
            if getattr(self, key) <= 0:
                self._fail(key, f"must be positive, got {getattr(self, key)}.", "give a value above 0.")
        if self.kl_beta < 0:
            self._fail("kl_beta", f"must be >= 0, got {self.kl_beta}.", "the card uses 0.05.")
        if self.rollout_batch_size % self.minibatch_size:
            self._fail(
                "minibatch_size",
                f"{self.minibatch_size} does not divide rollout_batch_size {self.rollout_batch_size}.",
                "pick a divisor of rollout_batch_size.",
            )
        if self.value_model_from not in ("reward_model", "policy"):
            self._fail(
                "value_model_from",
                f"unknown value '{self.value_model_from}'.",
                "use 'reward_model' (the card) or 'policy'.",
            )


STAGES: dict[str, type[Recipe]] = {c.stage_name: c for c in (SFTRecipe, DPORecipe, RMRecipe, RLVRRecipe)}


def recipe_from_dict(data: dict[str, Any], path: str | Path | None = None) -> Recipe:
    """Build the recipe class named by ``data['stage']``, checking for unknown and missing keys."""
    if not isinstance(data, dict):
        raise RecipeError(
            path,
            None,
            f"should be a mapping of keys to values, got {type(data).__name__}.",
            "write one 'key: value  # source' per line.",
        )
    stage = data.get("stage")
    if stage not in STAGES:
        problem = "is missing." if stage is None else f"unknown stage '{stage}'." + _closest(stage, STAGES)
        raise RecipeError(path, "stage", problem, f"use one of {', '.join(STAGES)}.")
    cls = STAGES[stage]
    known = cls.keys()
    for key in data:
        if key not in known:
            raise RecipeError(
                path, key, f"is not a key of a {stage} recipe." + _closest(key, known), "rename or delete it."
            )
    for key in cls.required_keys():
        if key not in data:
            raise RecipeError(
                path,
                key,
                f"is missing; a {stage} recipe needs it.",
                f"add a line '{key}: <value>  # <source>'.",
            )
    return cls(**data, path=Path(path) if path else None)


#: The first key of a sweep grid file (``recipes/ablation_135m.yaml``): not a training recipe.
SWEEP_MARKER = "kind: lr_bs_sweep"


def list_recipes() -> list[str]:
    """Names of the training recipes shipped in ``recipes/`` (use them with ``load_recipe``).

    Sweep grids beside them (files holding ``kind: lr_bs_sweep``) are read by ``sweep.load_grid``.
    """
    return sorted(
        p.stem
        for p in RECIPES_DIR.glob("*.yaml")
        if not any(line.startswith(SWEEP_MARKER) for line in p.read_text(encoding="utf-8").splitlines())
    )


def recipe_path(name_or_path: str | Path) -> Path:
    """The YAML file for a recipe name (``'sft_1130'``) or a path."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith((".yaml", ".yml")) or "/" in text or "\\" in text:
        path = Path(name_or_path).expanduser()
    else:
        path = RECIPES_DIR / f"{text}.yaml"
    if not path.is_file():
        raise RecipeError(
            path,
            None,
            "no such recipe file." + _closest(path.stem, list_recipes()),
            f"use one of {', '.join(list_recipes())} or a path to a YAML file.",
        )
    return path


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Load and validate a recipe by name (resolved in ``recipes/``) or by path."""
    path = recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(path, None, f"is not valid YAML ({err}).", "check indentation and colons.") from err
    return recipe_from_dict(data, path)


_VALUE_LINE = re.compile(r"^(?P<key>[A-Za-z_]\w*)\s*:\s*(?P<value>[^#]*?)\s*(?:#\s*(?P<source>.*?))?\s*$")


def recipe_sources(name_or_path: str | Path) -> dict[str, str | None]:
    """The trailing ``# source`` comment of every top-level value line (None where it has none)."""
    sources: dict[str, str | None] = {}
    for line in recipe_path(name_or_path).read_text().splitlines():
        match = _VALUE_LINE.match(line)
        if match:
            sources[match["key"]] = match["source"] or None
    return sources


def source_tag(source: str | None) -> str | None:
    """The tag a source comment starts with (one of ``SOURCE_TAGS``), or None."""
    return next((tag for tag in SOURCE_TAGS if source and source.startswith(tag)), None)
