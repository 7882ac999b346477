"""Recipes: one YAML file per stage and run, loaded into a frozen, validated dataclass.

``load_recipe("sft_1130")`` builds the class named by the YAML's ``stage:`` (``SFTRecipe``, ``DPORecipe``,
``RMRecipe``, ``RLVRRecipe``); ``recipe.replace(learning_rate=1e-4)`` gives a new, validated one. Every
value line ends with a comment naming its source (``# Table 2``, ``# Tulu 3: ...``, ``# kit choice: why``),
read back by ``recipe_sources``. :class:`Checker` holds the checks of a YAML file's values, shared with
the sweep grids; a mistake raises ``RecipeError`` naming the file, the key and the fix. How a recipe fits
the machine at hand (per-device batch, accumulation, caps) is decided by ``profiles.resolve``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NoReturn, get_type_hints

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


_EXAMPLES = {float: "9.0e-5", int: "8", bool: "true", str: "a word in quotes"}


@dataclass(frozen=True)
class Checker:
    """The checks of the values of one YAML file (a recipe, a sweep grid); each failure raises ``error``."""

    file: Any
    error: type[FileKeyError] = RecipeError

    def fail(self, key: str | None, problem: str, fix: str = "") -> NoReturn:
        raise self.error(self.file, key, problem, fix)

    def typed(self, key: str, value: Any, kind: type) -> Any:
        """``value`` as ``kind`` (float, int, bool or str), or fail naming the key."""
        if kind is float and not isinstance(value, bool):
            with contextlib.suppress(TypeError, ValueError):  # PyYAML reads 9e-5 (no dot) as a string
                number = float(value)
                if math.isfinite(number):
                    return number
        elif kind is int and not isinstance(value, bool):
            if isinstance(value, int):
                return value
            with contextlib.suppress(TypeError, ValueError):  # "1e7" or 10000000.0
                number = float(value)
                if number.is_integer():
                    return int(number)
        elif kind in (bool, str) and isinstance(value, kind):
            return value
        self.fail(
            key,
            f"should be {kind.__name__}, got {value!r} ({type(value).__name__}).",
            f"write it as a plain {kind.__name__}, e.g. {_EXAMPLES[kind]}.",
        )

    def positive(self, key: str, value: Any, fix: str = "give a value above 0.") -> Any:
        if value <= 0:
            self.fail(key, f"must be positive, got {value}.", fix)
        return value

    def non_negative(self, key: str, value: Any, fix: str = "give 0 or more.") -> Any:
        if value < 0:
            self.fail(key, f"must be >= 0, got {value}.", fix)
        return value

    def choice(self, key: str | None, value: Any, choices, what: str, fix: str = "") -> None:
        if value not in choices:
            self.fail(
                key,
                f"unknown {what} '{value}'." + _closest(value, choices),
                fix or f"use one of {', '.join(choices)}.",
            )

    def mapping(self, key: str | None, value: Any) -> None:
        if not isinstance(value, dict):
            self.fail(
                key,
                f"should be a mapping of keys to values, got {type(value).__name__}.",
                "write one 'key: value  # source' per line.",
            )

    def keys(self, data: dict, known, required, what: str, prefix: str = "") -> None:
        """Fail on a key of ``data`` not in ``known`` (naming the closest) or a ``required`` one missing."""
        for key in data:
            if key not in known:
                self.fail(
                    f"{prefix}{key}",
                    f"is not a key of {what}." + _closest(key, known),
                    "rename or delete it.",
                )
        for key in required:
            if key not in data:
                self.fail(
                    f"{prefix}{key}",
                    f"is missing; {what} needs it.",
                    f"add a line '{key}: <value>  # <source>'.",
                )


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

    @property
    def _check(self) -> Checker:
        return Checker(self.path or self.name)

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
                self._check.fail(key, "is not a recipe key." + _closest(key, known))
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
    def _coerce(self, key: str, value: Any, kind: Any) -> Any:
        """Return ``value`` as the field's type ``kind`` (None where the field allows it)."""
        options = getattr(kind, "__args__", (kind,))
        if value is None:
            if type(None) in options:
                return None
            self._check.fail(key, "is empty (null).", "give it a value.")
        return self._check.typed(key, value, next(k for k in options if k is not type(None)))

    def _validate(self) -> None:
        check = self._check
        if self.stage != self.stage_name:
            check.fail(
                "stage",
                f"is '{self.stage}' but this is a {type(self).__name__}.",
                "load the file with load_recipe(), which picks the class from 'stage'.",
            )
        check.choice("dataset", self.dataset, DATASETS, "dataset")
        for key in ("learning_rate", "effective_batch_size", "num_epochs", "max_length"):
            check.positive(key, getattr(self, key))
        if not 0 <= self.warmup_ratio < 1:
            check.fail(
                "warmup_ratio",
                f"must be in [0, 1), got {self.warmup_ratio}.",
                "give the fraction of steps spent warming up, e.g. 0.03.",
            )
        check.non_negative("weight_decay", self.weight_decay, "use 0.0 for none.")
        clip = getattr(self, "max_grad_norm", None)  # the stages trained by a Trainer: SFT, DPO, RM
        if clip is not None:
            check.non_negative(
                "max_grad_norm",
                clip,
                "give the gradient norm to clip to (Tulu 3: 1.0), or 0.0 for no clipping.",
            )
        check.choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS, "scheduler")


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
        fix = "use 'sum' (Tulu 3: summed over tokens) or 'mean'."
        self._check.choice("loss_reduction", self.loss_reduction, LOSS_REDUCTIONS, "reduction", fix)


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
        self._check.positive("beta", self.beta, "Tulu 3 uses 5 with dpo_norm.")
        self._check.choice("loss_type", self.loss_type, DPO_LOSS_TYPES, "loss type")


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
    # PPO's constants (ppo.PPOSettings) and GRPO's (grpo.GRPOSettings)
    gamma: float  # discount factor
    lam: float  # GAE lambda
    cliprange: float  # policy ratio clip (GRPO's epsilon)
    cliprange_value: float  # value clip
    vf_coef: float  # weight of the value loss
    whiten_advantages: bool  # advantages whitened over the batch
    max_grad_norm: float  # clip each step's gradient to this norm; 0: no clipping
    adam_eps: float  # AdamW epsilon
    min_response_length: int  # a response shorter than this (before its EOS) counts as non-stop
    penalize_non_stop: bool  # apply non_stop_penalty to responses that never end
    non_stop_replaces_score: bool  # the penalty replaces the score (false: it is added)
    grpo_num_generations: int  # GRPO: responses per prompt
    grpo_loss_type: str  # GRPO: TRL's loss_type
    grpo_scale_rewards: str  # GRPO: TRL's scale_rewards

    def _validate(self) -> None:
        super()._validate()
        check = self._check
        for key in ("num_episodes", "prompt_length", "response_length", "temperature"):
            check.positive(key, getattr(self, key))
        for key in ("cliprange", "cliprange_value", "vf_coef", "adam_eps", "grpo_num_generations"):
            check.positive(key, getattr(self, key))
        for key in ("gamma", "lam"):
            if not 0 <= getattr(self, key) <= 1:
                check.fail(
                    key, f"must be in [0, 1], got {getattr(self, key)}.", "Tulu 3 uses gamma 1, lam 0.95."
                )
        check.non_negative("min_response_length", self.min_response_length)
        for key in ("rollout_batch_size", "minibatch_size", "tulu3_learning_rate"):
            check.positive(key, getattr(self, key))
        check.non_negative("kl_beta", self.kl_beta, "the card uses 0.05.")
        if self.rollout_batch_size % self.minibatch_size:
            check.fail(
                "minibatch_size",
                f"{self.minibatch_size} does not divide rollout_batch_size {self.rollout_batch_size}.",
                "pick a divisor of rollout_batch_size.",
            )
        fix = "use 'reward_model' (the card) or 'policy'."
        check.choice("value_model_from", self.value_model_from, ("reward_model", "policy"), "value", fix)


STAGES: dict[str, type[Recipe]] = {c.stage_name: c for c in (SFTRecipe, DPORecipe, RMRecipe, RLVRRecipe)}


def recipe_from_dict(data: dict[str, Any], path: str | Path | None = None) -> Recipe:
    """Build the recipe class named by ``data['stage']``, checking for unknown and missing keys."""
    check = Checker(path)
    check.mapping(None, data)
    stage = data.get("stage")
    if stage is None:
        check.fail("stage", "is missing.", f"use one of {', '.join(STAGES)}.")
    check.choice("stage", stage, STAGES, "stage")
    cls = STAGES[stage]
    check.keys(data, cls.keys(), cls.required_keys(), f"a {stage} recipe")
    return cls(**data, path=Path(path) if path else None)


#: The value of ``kind:`` that marks a YAML file in ``recipes/`` as a sweep grid, not a training recipe.
GRID_KIND = "lr_bs_sweep"


def list_recipes(grids: bool = False) -> list[str]:
    """Names of the training recipes in ``recipes/`` (``grids=True``: of the sweep grids beside them)."""
    return sorted(
        path.stem
        for path in RECIPES_DIR.glob("*.yaml")
        if grids
        == any(
            line.startswith(f"kind: {GRID_KIND}") for line in path.read_text(encoding="utf-8").splitlines()
        )
    )


def recipe_path(name_or_path: str | Path, error: type[FileKeyError] = RecipeError) -> Path:
    """The YAML file of a name in ``recipes/`` (``'sft_1130'``, ``'ablation_135m'``) or a path."""
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or text.endswith((".yaml", ".yml")) or "/" in text or "\\" in text:
        path = Path(name_or_path).expanduser()
    else:
        path = RECIPES_DIR / f"{text}.yaml"
    if not path.is_file():
        what = error.unnamed.strip("<>")  # "recipe" or "grid"
        names = list_recipes(grids=what == "grid")
        Checker(path, error).fail(
            None,
            f"no such {what} file." + _closest(path.stem, names),
            f"use one of {', '.join(names)} or a path to a YAML file.",
        )
    return path


def read_yaml(name_or_path: str | Path, error: type[FileKeyError] = RecipeError) -> tuple[Path, Any]:
    """The path and the parsed content of a YAML file named as for :func:`recipe_path`."""
    path = recipe_path(name_or_path, error)
    try:
        return path, yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise error(path, None, f"is not valid YAML ({err}).", "check indentation and colons.") from err


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Load and validate a recipe by name (resolved in ``recipes/``) or by path."""
    path, data = read_yaml(name_or_path)
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
