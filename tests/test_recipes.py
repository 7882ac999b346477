"""Recipes: the shipped YAML files, their sources, the paper's ratios and every way a recipe can be wrong."""

from __future__ import annotations

import csv
import dataclasses
from decimal import ROUND_HALF_UP, Decimal

import pytest
import yaml

from smoltulu_utils.paths import PAPER_DIR, RECIPES_DIR
from smoltulu_utils.recipes import (
    SOURCE_TAGS,
    DPORecipe,
    RecipeError,
    RLVRRecipe,
    RMRecipe,
    SFTRecipe,
    list_recipes,
    load_recipe,
    recipe_sources,
    source_tag,
)

SHIPPED = ["dpo_1130", "dpo_1207", "rlvr_ppo", "rm_1130", "rm_1207", "sft_1130", "sft_1207"]


def paper_rows():
    """SmolTulu rows of Tables 2, 5 and 7 as (recipe name, row)."""
    rows = []
    for table in ("table02_sft_hyperparameters", "table05_dpo_hyperparameters", "table07_rm_hyperparameters"):
        with open(PAPER_DIR / f"{table}.csv", newline="") as handle:
            for row in csv.DictReader(handle):
                if row["config"].startswith("SmolTulu "):
                    rows.append((row["config"].split()[-1].lower().replace("-", "_"), row))
    return rows


def as_printed(value: float, stated: str) -> Decimal:
    """``value`` rounded half-up to as many decimals as the paper printed in ``stated``."""
    return Decimal(f"{value:.10g}").quantize(Decimal(stated), rounding=ROUND_HALF_UP)


def test_shipped_recipes_are_listed():
    assert list_recipes() == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_loads(name):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.path == RECIPES_DIR / f"{name}.yaml"
    expected = {"sft": SFTRecipe, "dpo": DPORecipe, "rm": RMRecipe, "rlvr": RLVRRecipe}[name.split("_")[0]]
    assert type(recipe) is expected
    assert recipe.parent_recipe is None or recipe.parent_recipe in SHIPPED
    assert load_recipe(RECIPES_DIR / f"{name}.yaml") == recipe  # by path too


def test_paper_rows_cover_six_recipes():
    assert sorted(name for name, _ in paper_rows()) == [
        "dpo_1130",
        "dpo_1207",
        "rm_1130",
        "rm_1207",
        "sft_1130",
        "sft_1207",
    ]


@pytest.mark.parametrize(("name", "row"), paper_rows(), ids=[name for name, _ in paper_rows()])
def test_ratio_matches_the_paper_as_printed(name, row):
    recipe = load_recipe(name)
    assert recipe.learning_rate == float(row["learning_rate"])
    assert recipe.effective_batch_size == int(row["batch_size"])
    assert recipe.ratio_scale_label == row["ratio_scale"]
    assert row["source"].endswith(recipe.paper_table)
    assert as_printed(recipe.ratio_scaled, row["lr_bs_ratio_stated"]) == Decimal(row["lr_bs_ratio_stated"])
    assert recipe.lr_bs_ratio == pytest.approx(recipe.learning_rate / recipe.effective_batch_size)


def test_printed_rounding_is_half_up():
    assert as_printed(0.9375, "0.938") == Decimal("0.938")
    assert as_printed(0.096875, "0.097") == Decimal("0.097")
    assert as_printed(100.00000000000001, "100") == Decimal("100")


def test_rlvr_recipe_matches_the_reinforced_card():
    r = load_recipe("rlvr_ppo")
    assert (r.learning_rate, r.tulu3_learning_rate) == (3e-6, 3e-7)
    assert r.num_episodes == 10_000_000 and r.kl_beta == 0.05 and r.temperature == 1.0
    assert (r.prompt_length, r.response_length, r.rollout_batch_size, r.minibatch_size) == (
        2048,
        2048,
        32,
        32,
    )
    assert r.effective_batch_size == 32
    assert (r.non_stop_penalty, r.verifiable_reward, r.reward_model_multiplier) == (-10.0, 10.0, 0.0)
    assert r.value_model_from == "reward_model" and r.reward_recipe == "rm_1130"


def test_tulu3_defaults_where_smoltulu_is_silent():
    sft, dpo = load_recipe("sft_1130"), load_recipe("dpo_1130")
    assert (sft.num_epochs, sft.max_length, sft.warmup_ratio, sft.loss_reduction) == (2, 4096, 0.03, "sum")
    assert (dpo.beta, dpo.loss_type, dpo.num_epochs, dpo.max_length, dpo.warmup_ratio) == (
        5,
        "dpo_norm",
        1,
        2048,
        0.1,
    )
    assert dpo.parent_recipe == "sft_1130"


@pytest.mark.parametrize("name", SHIPPED)
def test_every_value_cites_a_source(name):
    sources = recipe_sources(name)
    assert set(sources) == set(load_recipe(name).keys()), "every key is written out in the file"
    for key, source in sources.items():
        tag = source_tag(source)
        assert tag in SOURCE_TAGS, f"{name}.{key} has no source tag: {source!r}"
        if tag == "kit choice":
            assert len(source) > len("kit choice: ") + 5, f"{name}.{key}: say why the kit chose it"


def test_recipe_sources_reports_a_missing_comment(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("# header\nname: x  # kit choice: a test\nstage: sft\n")
    assert recipe_sources(path) == {"name": "kit choice: a test", "stage": None}


GOOD_SFT = (RECIPES_DIR / "sft_1130.yaml").read_text()


def write(tmp_path, text, name="bad.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def edit(key, new_line):
    """GOOD_SFT with the line of ``key`` replaced by ``new_line`` (or removed when it is empty)."""
    lines = [line for line in GOOD_SFT.splitlines() if not line.startswith(f"{key}:")]
    assert len(lines) == len(GOOD_SFT.splitlines()) - 1, key
    return "\n".join(lines + ([new_line] if new_line else [])) + "\n"


BAD = {
    "unknown key": (edit("learning_rate", "learning_rat: 9.0e-5"), "learning_rat", "learning_rate"),
    "missing key": (edit("seed", ""), "seed", "missing"),
    "string learning rate": (edit("learning_rate", "learning_rate: fast"), "learning_rate", "float"),
    "infinite learning rate": (edit("learning_rate", "learning_rate: .inf"), "learning_rate", "float"),
    "bool batch": (edit("effective_batch_size", "effective_batch_size: true"), "effective_batch_size", "int"),
    "fractional batch": (
        edit("effective_batch_size", "effective_batch_size: 8.5"),
        "effective_batch_size",
        "int",
    ),
    "zero learning rate": (edit("learning_rate", "learning_rate: 0.0"), "learning_rate", "positive"),
    "negative learning rate": (edit("learning_rate", "learning_rate: -1.0e-5"), "learning_rate", "positive"),
    "zero batch": (
        edit("effective_batch_size", "effective_batch_size: 0"),
        "effective_batch_size",
        "positive",
    ),
    "warmup of one": (edit("warmup_ratio", "warmup_ratio: 1.0"), "warmup_ratio", "[0, 1)"),
    "negative warmup": (edit("warmup_ratio", "warmup_ratio: -0.1"), "warmup_ratio", "[0, 1)"),
    "unknown reduction": (edit("loss_reduction", "loss_reduction: avg"), "loss_reduction", "'sum'"),
    "unknown stage": (edit("stage", "stage: ppo"), "stage", "sft, dpo, rm, rlvr"),
    "missing stage": (edit("stage", ""), "stage", "missing"),
    "unknown dataset": (edit("dataset", "dataset: tulu3_sfft"), "dataset", "tulu3_sft"),
    "unknown scheduler": (edit("lr_scheduler", "lr_scheduler: cosin"), "lr_scheduler", "cosine"),
    "null value": (edit("max_length", "max_length: null"), "max_length", "null"),
    "dpo key in sft": (GOOD_SFT + "beta: 5.0\n", "beta", "not a key"),
    "negative clip": (edit("max_grad_norm", "max_grad_norm: -1"), "max_grad_norm", ">= 0"),
    "string clip": (edit("max_grad_norm", "max_grad_norm: x"), "max_grad_norm", "float"),
    "missing clip": (edit("max_grad_norm", ""), "max_grad_norm", "missing"),
}


@pytest.mark.parametrize(("text", "key", "words"), BAD.values(), ids=BAD.keys())
def test_bad_recipe_raises_naming_file_and_key(tmp_path, text, key, words):
    path = write(tmp_path, text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert str(path) in message and f"'{key}'" in message and words in message
    assert "Fix:" in message
    assert info.value.key == key and isinstance(info.value, ValueError)


def test_not_a_mapping_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, "name: [unclosed\n"))


def test_unknown_recipe_name_suggests_the_closest():
    with pytest.raises(RecipeError, match="sft_1130"):
        load_recipe("sft_1131")


def test_numeric_strings_are_read_as_numbers(tmp_path):
    # PyYAML follows YAML 1.1: a float needs a dot, so 9e-5 arrives as the string "9e-5".
    assert yaml.safe_load("x: 9e-5")["x"] == "9e-5"
    assert yaml.safe_load("x: 9.0e-5")["x"] == 9.0e-5
    text = edit("learning_rate", "learning_rate: 9e-5").replace(
        "effective_batch_size: 8 ", "effective_batch_size: 8.0 "
    )
    recipe = load_recipe(write(tmp_path, text))
    assert recipe.learning_rate == 9e-5 and isinstance(recipe.learning_rate, float)
    assert recipe.effective_batch_size == 8 and isinstance(recipe.effective_batch_size, int)
    assert recipe.num_epochs == 2.0 and isinstance(recipe.num_epochs, float)


def test_replace_returns_a_new_validated_recipe():
    recipe = load_recipe("sft_1130")
    swept = recipe.replace(learning_rate="1e-4", effective_batch_size=16)
    assert swept.learning_rate == 1e-4 and swept.effective_batch_size == 16
    assert swept.lr_bs_ratio == pytest.approx(6.25e-6) and swept.ratio_scaled == pytest.approx(6.25)
    assert recipe.learning_rate == 9e-5, "the original is untouched"
    assert swept.path == recipe.path
    with pytest.raises(RecipeError, match="learning_rate.*positive"):
        recipe.replace(learning_rate=0)
    with pytest.raises(RecipeError, match="Did you mean 'warmup_ratio'"):
        recipe.replace(warmup_rato=0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.learning_rate = 1.0


def test_to_dict_round_trips():
    for name in SHIPPED:
        recipe = load_recipe(name)
        data = recipe.to_dict()
        assert "path" not in data
        assert type(recipe)(**data) == recipe


def test_rlvr_minibatch_must_divide_rollout():
    with pytest.raises(RecipeError, match="minibatch_size"):
        load_recipe("rlvr_ppo").replace(minibatch_size=5)


def test_accelerate_configs_are_valid():
    config_args = pytest.importorskip("accelerate.commands.config.config_args")
    configs = {
        p.stem: config_args.load_config_from_file(str(p)) for p in (RECIPES_DIR / "accelerate").glob("*.yaml")
    }
    assert set(configs) == {
        "single_gpu",
        "multi_gpu_ddp",
        "deepspeed_zero3",
        "fsdp",
        "cpu_2proc",
        "cpu_fsdp_2proc",
        "cpu_deepspeed_zero3_2proc",
    }
    assert configs["cpu_2proc"].num_processes == 2 and configs["cpu_2proc"].use_cpu
    assert configs["deepspeed_zero3"].deepspeed_config["zero_stage"] == 3
    assert configs["single_gpu"].num_processes == 1


def test_sweep_grids_beside_the_recipes_are_not_listed_as_recipes():
    from smoltulu_utils.recipes import list_recipes

    names = list_recipes()
    assert "ablation_135m" not in names
    assert {"sft_1130", "sft_1207", "dpo_1130", "dpo_1207", "rm_1130", "rm_1207", "rlvr_ppo"} <= set(names)


# ------------------------------------------------------------------------------------ gradient clipping
TRAINER_RECIPES = [n for n in SHIPPED if not n.startswith("rlvr")]


@pytest.mark.parametrize("name", TRAINER_RECIPES)
def test_trainer_recipes_clip_at_tulu3s_norm(name):
    """Tulu 3 clips at 1.0: DeepSpeed's gradient_clipping "auto", which Accelerate fills with 1.0."""
    recipe = load_recipe(name)
    assert recipe.max_grad_norm == 1.0 and isinstance(recipe.max_grad_norm, float)
    assert recipe_sources(name)["max_grad_norm"].startswith("Tulu 3: DeepSpeed gradient_clipping")
    assert recipe.replace(max_grad_norm=0).max_grad_norm == 0.0  # 0 turns clipping off
    with pytest.raises(RecipeError, match="max_grad_norm.*>= 0") as info:
        recipe.replace(max_grad_norm=-1)
    assert "Fix:" in str(info.value)
    with pytest.raises(RecipeError, match="max_grad_norm.*should be float"):
        recipe.replace(max_grad_norm="x")


@pytest.mark.parametrize("grid", ["ablation_135m", "ablation_dpo_135m", "ablation_rm_135m"])
def test_sweep_cells_clip_like_the_recipes(grid):
    from smoltulu_utils.sweep import load_grid

    assert load_grid(grid, profile="smoke")[0].recipe().max_grad_norm == 1.0


def test_a_plans_trainer_config_takes_the_recipes_clip(tmp_path):
    from smoltulu_utils.dpo import dpo_config
    from smoltulu_utils.profiles import resolve
    from smoltulu_utils.reward_model import rm_config
    from smoltulu_utils.sft import sft_config

    for name, make in (("sft_1130", sft_config), ("dpo_1130", dpo_config), ("rm_1130", rm_config)):
        plan = resolve(name, profile="smoke", verbose=False)
        assert make(plan, tmp_path).max_grad_norm == 1.0, name
        assert make(plan, tmp_path, max_grad_norm=0.5).max_grad_norm == 0.5, "an explicit number wins"
        unclipped = resolve(plan.recipe.replace(max_grad_norm=0.0), profile="smoke", verbose=False)
        assert make(unclipped, tmp_path).max_grad_norm == 0.0
