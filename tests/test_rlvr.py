"""The RLVR stage: row preparation and skipped rows, the value model's checks, GRPO's reward function, the
shared log format, the saved run, and the learning tests of PPO and GRPO on the toy task."""

from __future__ import annotations

import json
import math

import pytest
import torch

from smoltulu_utils import grpo, ppo, rlvr, rlvr_data
from smoltulu_utils.data import load_rows
from smoltulu_utils.manifest import ManifestError, read_manifest, write_manifest
from smoltulu_utils.paths import FIXTURES_DIR
from smoltulu_utils.profiles import resolve
from smoltulu_utils.results import ResultsStore
from smoltulu_utils.training import WorldSizeError, check_world_size


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread when several processes share the two cores; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_tiny(bundled_tokenizer):
    from smoltulu_utils.models import tiny_model

    return tiny_model(seed=0, tokenizer=bundled_tokenizer)


BAD_ROWS = [
    {"messages": [{"role": "user", "content": "How many?"}], "ground_truth": "twelve", "dataset": "gsm8k",
     "constraint_type": None, "constraint": None},
    {"messages": [{"role": "user", "content": "Write."}], "ground_truth": '{"func_name": "nope"}',
     "dataset": "ifeval", "constraint_type": "X", "constraint": "Do it."},
    {"messages": [{"role": "assistant", "content": "Hi"}], "ground_truth": "1", "dataset": "gsm8k",
     "constraint_type": None, "constraint": None},
]  # fmt: skip


# ------------------------------------------------------------------------------------------------ rows
def test_fixture_rows_give_prompts_and_targets_for_every_subset(bundled_tokenizer):
    rows = load_rows("rlvr_mixed", mirror=FIXTURES_DIR)
    examples, report = rlvr_data.prepare_rlvr_rows(rows, bundled_tokenizer, prompt_length=1024)
    assert report.n_rows == 30 and report.n_kept == 30 and report.n_skipped == 0
    assert report.by_subset == {"gsm8k": 10, "math": 10, "ifeval": 10}
    first = examples[0]
    assert bundled_tokenizer.decode(list(first.prompt_ids)).endswith("<|im_start|>assistant\n")
    assert first.target.kind == "gsm8k" and first.target.ground_truth == "14"


def test_bad_rows_are_reported_with_index_and_reason_and_skipped(bundled_tokenizer):
    rows = rlvr_data.toy_task_rows(["7"], copies=1) + BAD_ROWS
    examples, report = rlvr_data.prepare_rlvr_rows(rows, bundled_tokenizer, prompt_length=1024)
    assert [e.index for e in examples] == [0]
    assert [(s.index, s.reason.split(":")[0]) for s in report.skipped] == [
        (1, "ground truth"),
        (2, "ground truth"),
        (3, "prompt does not end with a user turn (last role 'assistant')"),
    ]
    assert "not a number" in report.skipped[0].reason and "unknown verifier" in report.skipped[1].reason
    assert report.reasons()["ground truth"] == 2 and "row 1: ground truth" in report.describe()
    _, short = rlvr_data.prepare_rlvr_rows(rows[:1], bundled_tokenizer, prompt_length=5)
    assert short.skipped[0].reason.startswith("prompt too long")


# --------------------------------------------------------------------------------------------- GRPO reward
def test_grpo_reward_function_scores_like_ppo_and_logs_the_verified_share():
    logged = {}
    reward = grpo.grpo_reward_function(10.0, -10.0, eos_token_ids=[2], min_response_length=0)
    rewards = reward(
        prompts=["p"] * 3,
        completions=[[{"role": "assistant", "content": "It is 7"}], "It is 8", "It is 7 and"],
        completion_ids=[[1, 2], [1, 2], [1, 1]],  # the third never ends
        ground_truth=["7", "7", "7"],
        dataset=["gsm8k", "gsm8k", "gsm8k"],
        log_metric=lambda name, value: logged.setdefault(name, value),
    )
    assert rewards == [10.0, 0.0, -10.0]
    assert logged == {"verifiable_reward": 2 / 3, "verifier_errors": 0.0}


def test_grpo_log_entries_use_the_kit_keys():
    trl_logs = {"reward": 2.5, "verifiable_reward": 0.25, "kl": 0.5, "completions/mean_length": 4.0,
                "completions/clipped_ratio": 0.5, "clip_ratio/region_mean": 0.1, "loss": 0.3}  # fmt: skip
    entry = grpo.grpo_entry(trl_logs, step=3, episodes=48, seconds=1.0)
    assert set(rlvr.LOG_KEYS) <= set(entry)
    assert entry["kl"] == 2.0  # TRL's per-token mean times the mean length: per response, as PPO logs it
    assert entry["value_loss"] is None and entry["non_stop_rate"] == 0.5 and entry["clip_fraction"] == 0.1


# --------------------------------------------------------------------------------------------- value model
def test_value_model_needs_a_reward_model_checkpoint_with_the_policy_tokenizer(
    tmp_path, bundled_tokenizer, fresh_tiny
):
    model, _ = fresh_tiny
    plain = tmp_path / "no_manifest"
    plain.mkdir()
    with pytest.raises(ManifestError):
        rlvr.load_value_model(plain, bundled_tokenizer, model)
    sft = tmp_path / "sft"
    sft.mkdir()
    write_manifest(sft, stage="sft", recipe={"name": "x"}, data=[], tokenizer=bundled_tokenizer, seed=0)
    with pytest.raises(rlvr_data.RLVRError, match="reward model"):
        rlvr.load_value_model(sft, bundled_tokenizer, model)
    value_model, info = rlvr.load_value_model("tiny", bundled_tokenizer, model)
    assert value_model.config.num_labels == 1 and info["source"] == "tiny"


def test_train_rlvr_refuses_a_plan_for_another_stage():
    with pytest.raises(rlvr_data.RLVRError, match="train_rlvr needs a plan for a recipe of type RLVRRecipe"):
        rlvr.train_rlvr(resolve("sft_1130", "smoke", verbose=False), method="ppo")


# ------------------------------------------------------------------------------------------------ a run
def test_a_short_ppo_run_counts_bad_rows_saves_and_records(
    tmp_path, bundled_tokenizer, fresh_tiny, one_thread
):
    model, tokenizer = fresh_tiny
    store = ResultsStore(tmp_path / "results.jsonl")
    result = rlvr.train_rlvr(
        rlvr_data.toy_plan(iterations=2, batch=4),
        tmp_path / "run",
        model=model,
        tokenizer=tokenizer,
        rows=rlvr_data.toy_task_rows(["7"], copies=2) + BAD_ROWS,
        restrict_to=rlvr_data.toy_vocabulary(tokenizer),
        store=store,
        verbose=False,
    )
    assert result.iterations == 2 and result.data_report.n_skipped == 3
    for entry in result.logs:
        assert set(rlvr.LOG_KEYS) | {"iteration", "episodes", "skipped_rows"} <= set(entry)
        assert entry["skipped_rows"] == 3
        for key in ("generation_s", "scoring_s", "forward_s", "optimisation_s"):
            assert entry[key] >= 0
    assert result.samples and {"response", "verified", "ground_truth"} <= set(result.samples[0])
    manifest = read_manifest(tmp_path / "run")
    assert manifest["stage"] == "rlvr" and manifest["extra"]["method"] == "ppo"
    assert manifest["data"][0]["rows_skipped"] == 3
    assert model.get_output_embeddings().bias is None  # the toy restriction is lifted before saving
    logged = [json.loads(line) for line in (tmp_path / "run" / "rlvr_log.jsonl").read_text().splitlines()]
    assert len(logged) == 2
    rows = store.rows()
    assert {r["metric"] for r in rows} >= {"initial_verifiable_reward", "final_verifiable_reward", "final_kl"}
    assert all(r["stage"] == "rlvr" for r in rows)


# ------------------------------------------------------------------------------------------- learning
def _learns(method: str, plan, model, tokenizer) -> None:
    rows = rlvr_data.toy_task_rows(["7"])
    examples, _ = rlvr_data.prepare_rlvr_rows(rows, tokenizer, prompt_length=64)
    vocabulary = rlvr_data.toy_vocabulary(tokenizer)
    handle = model.get_output_embeddings()
    restriction = ppo.restrict_vocabulary(model, vocabulary)
    before = rlvr_data.verified_rate(model, tokenizer, examples, response_length=1, samples=64)
    restriction.remove()
    result = rlvr.train_rlvr(plan, method=method, model=model, tokenizer=tokenizer, rows=rows,
                             restrict_to=vocabulary, verbose=False)  # fmt: skip
    restriction = ppo.restrict_vocabulary(model, vocabulary)
    after = rlvr_data.verified_rate(model, tokenizer, examples, response_length=1, samples=64)
    restriction.remove()
    assert handle.bias is None
    assert before < 0.2, f"{method}: the toy task should start hard (measured {before:.2f})"
    assert after > 0.6, (
        f"{method}: verified share {before:.2f} -> {after:.2f}; logs {result.curve('verifiable_reward')}"
    )
    assert result.final("verifiable_reward", last=3) > 0.6
    kls = [v for _, v in result.curve("kl")]
    assert kls and all(math.isfinite(v) for v in kls)


@pytest.mark.slow
def test_ppo_raises_the_verifiable_reward_on_the_toy_task(fresh_tiny, one_thread):
    model, tokenizer = fresh_tiny
    _learns("ppo", rlvr_data.toy_plan(iterations=20, batch=16), model, tokenizer)


@pytest.mark.slow
def test_grpo_raises_the_verifiable_reward_on_the_toy_task(fresh_tiny, one_thread):
    model, tokenizer = fresh_tiny
    plan = rlvr_data.toy_plan(iterations=25, batch=8, num_epochs=1)
    _learns("grpo", plan, model, tokenizer)


# ------------------------------------------------------------------------------ Tulu 3's PPO settings
def _recipe_plan(num_processes: int = 1, **changes):
    """The shipped rlvr_ppo recipe (its num_epochs untouched) made small for the tiny model."""
    from smoltulu_utils.profiles import get_profile
    from smoltulu_utils.recipes import load_recipe

    sizes = {"rollout_batch_size": 4, "minibatch_size": 2, "response_length": 1, "num_episodes": 400}
    recipe = load_recipe("rlvr_ppo").replace(**{**sizes, **changes})
    profile = get_profile("smoke").replace(model="tiny", max_steps=None, per_device_batch_cap=2)
    return resolve(recipe, profile, num_processes=num_processes, verbose=False)


def test_ppo_and_grpo_settings_are_the_recipes_values_with_their_sources():
    from smoltulu_utils.recipes import RecipeError, load_recipe, recipe_sources

    recipe, sources = load_recipe("rlvr_ppo"), recipe_sources("rlvr_ppo")
    ppo_settings = ppo.PPOSettings.from_recipe(recipe)
    assert (ppo_settings.gamma, ppo_settings.lam, ppo_settings.cliprange, ppo_settings.vf_coef) == (
        1.0,
        0.95,
        0.2,
        0.1,
    )
    assert ppo_settings.num_epochs == 4 and ppo_settings.kl_beta == recipe.kl_beta
    grpo_settings = grpo.GRPOSettings.from_recipe(recipe, num_generations=4)
    assert (grpo_settings.num_generations, grpo_settings.num_iterations, grpo_settings.loss_type) == (
        4,
        4,
        "dapo",
    )
    for key in ("gamma", "lam", "cliprange", "cliprange_value", "vf_coef", "max_grad_norm", "adam_eps"):
        assert sources[key].startswith("Tulu 3"), key
    assert all(sources[k].startswith("kit choice") for k in ("grpo_num_generations", "grpo_loss_type"))
    with pytest.raises(RecipeError, match="lam"):
        recipe.replace(lam=1.5)


def test_the_recipe_runs_tulu3_four_ppo_epochs_per_rollout_batch(fresh_tiny, one_thread):
    from smoltulu_utils.recipes import recipe_sources

    assert resolve("rlvr_ppo", "smoke", verbose=False).recipe.num_epochs == 4
    assert recipe_sources("rlvr_ppo")["num_epochs"].startswith("Tulu 3")
    model, tokenizer = fresh_tiny
    plan = _recipe_plan()
    examples, _ = rlvr_data.prepare_rlvr_rows(
        rlvr_data.toy_task_rows(["7"], copies=4), tokenizer, prompt_length=64
    )
    settings = ppo.PPOSettings.from_recipe(plan.recipe, penalize_non_stop=False)
    trainer, _ = rlvr._ppo_trainer(
        plan, model, tokenizer, examples, 2, settings, None, None, "transformers", []
    )
    assert trainer.settings.num_epochs == 4 and trainer.engine is None
    calls = [0]
    step = trainer.optimizer.step

    def counted(*args, **kwargs):
        calls[0] += 1
        return step(*args, **kwargs)

    trainer.optimizer.step = counted
    trainer.step()
    assert calls[0] == 4 * 2  # 4 epochs x (rollout 4 / minibatch 2) optimizer steps in one iteration


def test_rollout_and_minibatch_sizes_are_per_process_as_tulu3_counts_them(monkeypatch):
    plan = _recipe_plan(num_processes=2, rollout_batch_size=32, minibatch_size=16)
    sizes = rlvr.rlvr_batch_sizes(plan)
    assert (sizes.local_rollout, sizes.local_minibatch, sizes.micro) == (32, 16, 2)
    assert (sizes.rollout, sizes.minibatch, sizes.accumulation, sizes.minibatches) == (64, 32, 8, 2)
    assert rlvr._iterations(plan, None) == 400 // 64  # episodes over the global rollout batch
    arguments = grpo.grpo_batch_arguments(
        sizes, grpo.GRPOSettings.from_recipe(plan.recipe, num_generations=8)
    )
    # TRL's generation batch = per device x steps_per_generation x processes = the global rollout batch
    assert arguments["per_device_train_batch_size"] * arguments["steps_per_generation"] * 2 == 64
    assert arguments["per_device_train_batch_size"] * arguments["gradient_accumulation_steps"] * 2 == 32
    assert arguments["num_iterations"] == 4  # GRPO's epochs: the recipe's num_epochs
    one = rlvr.rlvr_batch_sizes(_recipe_plan(num_processes=1, rollout_batch_size=32, minibatch_size=16))
    assert (one.rollout, one.minibatch) == (32, 16)
    toy = rlvr_data.toy_plan(iterations=3, batch=4, num_processes=2)  # 4 prompts per process, 3 iterations
    assert rlvr.rlvr_batch_sizes(toy).rollout == 8 and rlvr._iterations(toy, None) == 3
    # a plan for 2 processes run by 1 would change the global batch: refused, with the fix
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(WorldSizeError, match=r"num_processes=1"):
        check_world_size(plan)
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_world_size(plan)


@pytest.mark.parametrize("method", ["ppo", "grpo"])
def test_vllm_generator_without_vllm_is_a_clear_error(method, monkeypatch, fresh_tiny):
    import importlib.util

    from smoltulu_utils.errors import KitError

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "vllm" else find_spec(name, *a, **k))  # fmt: skip
    model, tokenizer = fresh_tiny
    with pytest.raises(KitError, match="pip install vllm"):
        rlvr.train_rlvr(_recipe_plan(), method=method, model=model, tokenizer=tokenizer,
                        rows=rlvr_data.toy_task_rows(["7"]), generator="vllm", verbose=False)  # fmt: skip


@pytest.mark.slow
def test_grpo_runs_num_iterations_passes_per_rollout_and_logs_each_rollout_once(fresh_tiny, one_thread):
    model, tokenizer = fresh_tiny
    steps = []
    result = rlvr.train_rlvr(
        rlvr_data.toy_plan(iterations=2, batch=8, num_epochs=2),
        method="grpo",
        model=model,
        tokenizer=tokenizer,
        rows=rlvr_data.toy_task_rows(["7"]),
        restrict_to=rlvr_data.toy_vocabulary(tokenizer),
        callback=lambda entry: steps.append(entry["iteration"]),
        verbose=False,
    )
    assert result.iterations == 2 and steps == [1, 2]  # one entry per rollout batch, as PPO logs
    assert [e["episodes"] for e in result.logs] == [8, 16]
    assert all(e["verifiable_reward"] is not None and e["clip_fraction"] is not None for e in result.logs)
