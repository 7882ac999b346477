"""Sharded training on a CPU: FSDP2 and DeepSpeed ZeRO-3 on two gloo processes, and DPO's reference pass.

The fast tests check the Accelerate configs (they parse, accelerate's DeepSpeed and FSDP plugins build
from them, the CPU configs shard like the GPU ones), the trainer's device settings under a sharded
launch, and the weights fingerprint of the reference cache.

The slow tests launch two processes with ``accelerate launch`` and the kit's CPU configs
(``cpu_fsdp_2proc.yaml``, ``cpu_deepspeed_zero3_2proc.yaml``) on the tiny SmolLM2 (max_length 64, 1-3
steps). A probe callback records from inside the run what Accelerate did: the distributed type and how
much of each parameter the process holds. SFT must really shard (each rank half the weights), learn
(the saved checkpoint's loss on the training rows below the starting model's) and save a full
checkpoint that ``from_pretrained`` loads. DPO's cached reference log-probs of a two-process run must
equal a single-process run's, under the same cache key; the ZeRO-3 run loads its starting model
partitioned (ZeRO-3's ``zero.Init``), so the pass must run it through DeepSpeed and hash the gathered
weights.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from smoltulu_utils.launch import ACCELERATE_CONFIGS, free_port, run_stage
from smoltulu_utils.paths import KIT_ROOT

CPU_CONFIGS = {"fsdp": "cpu_fsdp_2proc.yaml", "deepspeed": "cpu_deepspeed_zero3_2proc.yaml"}
GPU_CONFIGS = {"fsdp": "fsdp.yaml", "deepspeed": "deepspeed_zero3.yaml"}
#: Keys that decide how the model is sharded: the CPU configs must match the GPU configs on them.
SHARDING_KEYS = {
    "fsdp": (
        "fsdp_auto_wrap_policy",
        "fsdp_transformer_layer_cls_to_wrap",
        "fsdp_version",
        "fsdp_reshard_after_forward",
        "fsdp_state_dict_type",
        "fsdp_offload_params",
    ),
    "deepspeed": (
        "zero_stage",
        "zero3_init_flag",
        "zero3_save_16bit_model",
        "offload_optimizer_device",
        "offload_param_device",
    ),
}
LAUNCH_TIMEOUT = 300

# Runs under `accelerate launch`: trains one stage of the tiny model and records, from inside the run,
# the distributed type and each rank's share of the parameters (probe_rank{R}.json).
DRIVER = r"""
import json, os, sys
from pathlib import Path

from transformers import TrainerCallback

stage, out, model = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
options = json.loads(sys.argv[4])


class Probe(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from accelerate.state import AcceleratorState
        from torch.distributed.tensor import DTensor

        params = list(model.parameters())
        local = [p.to_local().numel() if isinstance(p, DTensor)
                 else p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params]
        self.record = {
            "world_size": int(args.world_size),
            "distributed_type": str(AcceleratorState().distributed_type).split(".")[-1],
            "dtensor_params": sum(isinstance(p, DTensor) for p in params),
            "zero3_params": sum(hasattr(p, "ds_tensor") for p in params),
            "local_numel": sum(local),
            "full_numel": sum(getattr(p, "ds_numel", p.numel()) for p in params),
        }

    def on_train_end(self, args, state, control, **kwargs):
        (out / f"probe_rank{args.process_index}.json").write_text(json.dumps(self.record))


from smoltulu_utils.profiles import get_profile, resolve
from smoltulu_utils.recipes import load_recipe

recipe = load_recipe(options["recipe"])
if "learning_rate" in options:
    recipe = recipe.replace(learning_rate=options["learning_rate"])
profile = get_profile("smoke").replace(model=model, max_steps=options["steps"], max_length=64)
plan = resolve(recipe, profile, num_processes=int(os.environ["WORLD_SIZE"]), verbose=False)
if stage == "sft":
    from smoltulu_utils.sft import train_sft

    train_sft(plan, out, callbacks=[Probe()], verbose=False)
else:
    from smoltulu_utils.dpo import dpo_config, train_dpo

    # A DPO config made first turns DeepSpeed's ZeRO-3 on for what loads next: the starting model
    # loads partitioned (zero.Init), as any model loaded after a DeepSpeed TrainingArguments does.
    config = dpo_config(plan, out)
    train_dpo(plan, out, callbacks=[Probe()], reference_cache=options["cache"], verbose=False)
"""


def _config(name: str) -> dict:
    return yaml.safe_load((ACCELERATE_CONFIGS / name).read_text())


# ======================================================================================================
# Configs, settings, fingerprints (fast)
# ======================================================================================================
def test_deepspeed_is_pinned_and_imports_on_cpu():
    pins = dict(
        line.strip().split("==")
        for line in (KIT_ROOT / "requirements.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    import deepspeed

    assert pins["deepspeed"] == deepspeed.__version__
    from deepspeed.accelerator import get_accelerator

    if not torch.cuda.is_available():
        assert get_accelerator().device_name() == "cpu"
        assert get_accelerator().communication_backend_name() in ("gloo", "ccl")


@pytest.mark.parametrize("name", sorted(p.name for p in ACCELERATE_CONFIGS.glob("*.yaml")))
def test_every_accelerate_config_loads_in_accelerate(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ACCELERATE_CONFIGS / name))
    assert config.num_processes >= 1
    assert config.mixed_precision in ("no", "bf16", "fp16")


@pytest.mark.parametrize("kind", ["fsdp", "deepspeed"])
def test_cpu_configs_shard_like_the_gpu_configs(kind):
    cpu, gpu = _config(CPU_CONFIGS[kind]), _config(GPU_CONFIGS[kind])
    section = "fsdp_config" if kind == "fsdp" else "deepspeed_config"
    assert cpu["distributed_type"] == gpu["distributed_type"] == kind.upper()
    for key in SHARDING_KEYS[kind]:
        assert cpu[section][key] == gpu[section][key], key
    # use_cpu false keeps accelerate launch on its FSDP/DeepSpeed path; float32 on a CPU; two processes
    assert cpu["use_cpu"] is False and cpu["mixed_precision"] == "no" and cpu["num_processes"] == 2


def test_accelerate_plugins_build_from_the_shipped_configs():
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    ds = _config("deepspeed_zero3.yaml")["deepspeed_config"]
    plugin = DeepSpeedPlugin(
        zero_stage=ds["zero_stage"],
        zero3_init_flag=ds["zero3_init_flag"],
        zero3_save_16bit_model=ds["zero3_save_16bit_model"],
        offload_optimizer_device=ds["offload_optimizer_device"],
        offload_param_device=ds["offload_param_device"],
    )
    zero = plugin.deepspeed_config["zero_optimization"]
    assert zero["stage"] == 3 and plugin.zero3_init_flag
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True  # full weights on save
    assert zero["offload_param"]["device"] == zero["offload_optimizer"]["device"] == "none"

    fs = _config("fsdp.yaml")["fsdp_config"]
    fsdp = FullyShardedDataParallelPlugin(
        fsdp_version=fs["fsdp_version"],
        auto_wrap_policy=fs["fsdp_auto_wrap_policy"].lower(),
        transformer_cls_names_to_wrap=[fs["fsdp_transformer_layer_cls_to_wrap"]],
        state_dict_type=fs["fsdp_state_dict_type"],
        reshard_after_forward=fs["fsdp_reshard_after_forward"],
    )
    assert fsdp.fsdp_version == 2 and fsdp.reshard_after_forward is True
    assert fsdp.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    assert str(fsdp.state_dict_type).endswith("FULL_STATE_DICT")


@pytest.fixture
def cpu_launch(monkeypatch):
    """A CPU machine, and a clean launcher environment for the test to set."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_CPU", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_trainer_settings_keep_a_sharded_cpu_launch_sharded(cpu_launch, tmp_path):
    """On a CPU, use_cpu=True makes Accelerate drop its FSDP and DeepSpeed plugins (plain DDP)."""
    from smoltulu_utils import scale_out
    from smoltulu_utils.profiles import resolve
    from smoltulu_utils.training import trainer_settings

    plan = resolve("sft_1130", "smoke", verbose=False)
    assert trainer_settings(plan, tmp_path)["use_cpu"] is True  # a DDP or one-process run
    cpu_launch.setenv("WORLD_SIZE", "2")
    cpu_launch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    settings = trainer_settings(plan, tmp_path)
    assert settings["use_cpu"] is False and settings["ddp_backend"] == "gloo"

    joined = []
    cpu_launch.setattr(scale_out, "_cpu_fsdp_state", lambda: joined.append(True))
    cpu_launch.delenv("ACCELERATE_USE_DEEPSPEED")
    cpu_launch.setenv("ACCELERATE_USE_FSDP", "true")
    settings = trainer_settings(plan, tmp_path)
    assert joined and settings["accelerator_config"] == {"use_configured_state": True}
    cpu_launch.setenv("ACCELERATE_USE_CPU", "True")  # a config that asked for the CPU path itself
    assert trainer_settings(plan, tmp_path)["use_cpu"] is True and "accelerator_config" not in (
        trainer_settings(plan, tmp_path)
    )


@pytest.mark.slow
def test_module_fingerprint_is_trls_hash_and_follows_the_weights():
    from trl.trainer.utils import hash_module

    from smoltulu_utils.models import load_model
    from smoltulu_utils.reference_cache import is_zero3_partitioned, module_fingerprint

    model = load_model("tiny")
    assert not is_zero3_partitioned(model)
    before = module_fingerprint(model)
    assert before == hash_module(model)
    with torch.no_grad():
        model.model.norm.weight[0] += 1e-3
    assert module_fingerprint(model) != before


# ======================================================================================================
# Two processes (slow)
# ======================================================================================================
def _launch(config: str, stage: str, out: Path, model: str, **options) -> subprocess.CompletedProcess:
    """Run the driver on two processes under ``accelerate launch --config_file <config>``."""
    script = out.parent / "scale_out_driver.py"
    script.write_text(DRIVER)
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ACCELERATE_CONFIGS / config),
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        str(script),
        stage,
        str(out),
        model,
        json.dumps(options),
    ]
    env = {**os.environ, "PYTHONPATH": str(KIT_ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=LAUNCH_TIMEOUT, cwd=KIT_ROOT
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done


def _probes(out: Path) -> list[dict]:
    return [json.loads((out / f"probe_rank{r}.json").read_text()) for r in range(2)]


def _sft_loss(model, rows: list[dict], tokenizer) -> float:
    """Mean loss per completion token of ``model`` on ``rows`` (the kit's SFT tokenization)."""
    from smoltulu_utils.sft import prepare_sft_rows

    dataset, _ = prepare_sft_rows(rows, tokenizer, 64)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for example in dataset:
            ids = torch.tensor([example["input_ids"]])
            labels = ids.clone()
            mask = example.get("completion_mask") or example.get("assistant_masks")
            if mask is not None:
                labels[0, torch.tensor(mask) == 0] = -100
            n = int((labels[0, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * n
            count += n
    return total / count


@pytest.fixture(scope="module")
def sft_rows():
    from smoltulu_utils.data import load_rows
    from smoltulu_utils.profiles import data_mirror
    from smoltulu_utils.recipes import load_recipe

    return load_rows(load_recipe("sft_1130").dataset, mirror=data_mirror("smoke"), limit=64, validate=False)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fsdp", "deepspeed"])
def test_two_cpu_processes_shard_train_and_save_a_full_checkpoint(kind, tmp_path, sft_rows):
    """FSDP2 / ZeRO-3 SFT on two gloo processes: each rank holds half the weights, the loss falls."""
    from transformers import AutoModelForCausalLM

    from smoltulu_utils.models import load_model, load_tokenizer

    out = tmp_path / "run"
    _launch(CPU_CONFIGS[kind], "sft", out, "tiny", recipe="sft_1130", steps=3, learning_rate=1e-3)
    for probe in _probes(out):
        assert probe["world_size"] == 2
        assert probe["distributed_type"] == ("FSDP" if kind == "fsdp" else "DEEPSPEED"), probe
        sharded = probe["dtensor_params"] if kind == "fsdp" else probe["zero3_params"]
        assert sharded > 0, probe  # DTensor (FSDP2) or partitioned (ZeRO-3) parameters
        assert probe["local_numel"] <= 0.55 * probe["full_numel"], probe  # half the weights per rank

    tokenizer = load_tokenizer("tiny")
    trained, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # a full checkpoint, not a shard
    start = load_model("tiny")
    assert sum(p.numel() for p in trained.parameters()) == sum(p.numel() for p in start.parameters())
    before, after = _sft_loss(start, sft_rows, tokenizer), _sft_loss(trained, sft_rows, tokenizer)
    assert after < before - 0.05, (before, after)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The tiny model and its tokenizer saved as a checkpoint folder (DPO's starting model)."""
    from smoltulu_utils.models import load_model, load_tokenizer

    folder = tmp_path_factory.mktemp("tiny_checkpoint")
    load_model("tiny").save_pretrained(folder)
    load_tokenizer("tiny").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def single_process_reference(tiny_folder, tmp_path_factory):
    """The reference log-probs of a one-process DPO run from ``tiny_folder``: ``(key, chosen, rejected)``."""
    from smoltulu_utils.dpo import train_dpo
    from smoltulu_utils.profiles import get_profile, resolve
    from smoltulu_utils.reference_cache import ReferenceCache

    cache = ReferenceCache(tmp_path_factory.mktemp("reference_single"))
    profile = get_profile("smoke").replace(model=str(tiny_folder), max_steps=1, max_length=64)
    plan = resolve("dpo_1130", profile, num_processes=1, verbose=False)
    result = train_dpo(plan, tmp_path_factory.mktemp("dpo_single"), reference_cache=cache, verbose=False)
    key = result.reference["key"]
    found = cache.load(key, cache.entries()[0]["n_rows"])
    assert found.hit
    return key, found.chosen, found.rejected


def _only_cache_file(folder: Path):
    from smoltulu_utils.reference_cache import ReferenceCache

    cache = ReferenceCache(folder)
    [entry] = cache.entries()
    key = Path(entry["path"]).stem
    found = cache.load(key, entry["n_rows"])
    assert found.hit, found.reason
    return key, found.chosen, found.rejected


@pytest.mark.slow
def test_fsdp_dpo_reference_logps_equal_the_single_process_ones(
    tiny_folder, single_process_reference, tmp_path
):
    """Under FSDP the reference pass runs TRL's FSDP-wrapped copy of the starting model (not a Hub reload)."""
    cache, out = tmp_path / "reference", tmp_path / "run"
    args = ["dpo", "--recipe", "dpo_1130", "--profile", "smoke", "--model", str(tiny_folder)]
    args += ["--max-steps", "1", "--max-length", "64", "--reference-cache", str(cache), "--output", str(out)]
    args += ["--accelerate-config", "cpu_fsdp_2proc"]  # the command starts itself on its 2 processes
    done = run_stage(args, echo=False, timeout=LAUNCH_TIMEOUT)
    assert "2 processes" in done.stdout
    key, chosen, rejected = _only_cache_file(cache)
    single_key, single_chosen, single_rejected = single_process_reference
    assert key == single_key  # same weights, data, tokenizer and length: the same cache entry
    torch.testing.assert_close(chosen, single_chosen, rtol=0, atol=1e-4)
    torch.testing.assert_close(rejected, single_rejected, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_zero3_dpo_reference_logps_equal_the_single_process_ones(
    tiny_folder, single_process_reference, tmp_path
):
    """A ZeRO-3-partitioned starting model: the pass runs it in DeepSpeed, the key hashes gathered weights."""
    cache, out = tmp_path / "reference", tmp_path / "run"
    _launch(
        CPU_CONFIGS["deepspeed"], "dpo", out, str(tiny_folder), recipe="dpo_1130", steps=1, cache=str(cache)
    )
    assert all(p["distributed_type"] == "DEEPSPEED" and p["zero3_params"] for p in _probes(out))
    key, chosen, rejected = _only_cache_file(cache)
    single_key, single_chosen, single_rejected = single_process_reference
    assert key == single_key
    torch.testing.assert_close(chosen, single_chosen, rtol=0, atol=1e-4)
    torch.testing.assert_close(rejected, single_rejected, rtol=0, atol=1e-4)
