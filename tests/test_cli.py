"""The command line: ``python -m smoltulu_utils`` plan, hardware, doctor and reproduce."""

from __future__ import annotations

import subprocess
import sys

import pytest

from smoltulu_utils import cli, notebooks
from smoltulu_utils.paths import RECIPES_DIR


def test_plan_prints_the_batch_split_for_a_recipe(capsys):
    assert cli.main(["plan", "dpo_1130", "--profile", "smoke"]) == 0
    out = capsys.readouterr().out
    assert "effective batch 12 = 4 per device x 3 accumulation x 1 process" in out


def test_bad_input_prints_the_message_not_a_traceback(capsys, tmp_path):
    assert cli.main(["plan", "no_such_recipe", "--profile", "smoke"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("smoltulu plan: ") and "Traceback" not in err and "sft_1130" in err
    typo = tmp_path / "typo.yaml"
    typo.write_text((RECIPES_DIR / "sft_1130.yaml").read_text().replace("learning_rate:", "learnin_rate:"))
    assert cli.main(["plan", str(typo), "--profile", "smoke"]) == 2
    assert "did you mean 'learning_rate'" in capsys.readouterr().err.lower()
    assert cli.main(["reproduce", "--profile", "smok"]) == 2
    assert "unknown profile 'smok'" in capsys.readouterr().err


def test_plan_without_recipes_prints_a_table_with_problems(capsys):
    assert cli.main(["plan", "--profile", "paper", "--processes", "8"]) == 0
    out = capsys.readouterr().out
    assert "sft_1130" in out and "cannot" in out  # dpo_1130's batch of 12 cannot be split over 8


def test_mirror_without_the_hub_names_the_dataset(capsys, tmp_path, monkeypatch):
    import datasets

    def no_hub(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    assert cli.main(["mirror", "--out", str(tmp_path), "--datasets", "gsm8k"]) == 2
    assert "openai/gsm8k" in capsys.readouterr().err


def test_hardware_and_doctor(capsys):
    assert cli.main(["hardware"]) == 0
    assert "dtype" in capsys.readouterr().out
    assert cli.main(["doctor", "--model", "bundled"]) == 0
    out = capsys.readouterr().out
    assert "[PASS] pad_keeps_eos" in out and "[The capital of France is Paris.<|im_end|>]" in out


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "smoltulu_utils", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "reproduce" in done.stdout
    assert "{reproduce,plan,mirror,hardware,doctor,sft,dpo,rm,rlvr,eval}" in done.stdout.replace("\n", "")


def test_every_training_command_has_the_shared_options_and_its_own_inputs():
    parser = cli.build_parser()
    shared = ["--profile", "smoke", "--parent", "p", "--accelerate-config", "fsdp", "--processes", "2"]
    for stage in ("sft", "dpo", "rm", "rlvr"):
        args = parser.parse_args([stage, *shared])
        assert (
            args.recipe
            and args.output is None
            and args.accelerate_config == "fsdp"
            and args.func is cli._train
        )
    assert parser.parse_args(["dpo", "--reference-cache", "none"]).reference_cache == "none"
    rlvr = parser.parse_args(["rlvr", "--reward-model", "runs/rm/rm_1130", "--method", "grpo"])
    assert (rlvr.recipe, rlvr.reward_model, rlvr.method) == ("rlvr_ppo", "runs/rm/rm_1130", "grpo")
    assert parser.parse_args(["sft", "--record-batches"]).record_batches
    with pytest.raises(SystemExit):
        parser.parse_args(["rm", "--reward-model", "x"])  # only rlvr takes a reward model


def test_reproduce_with_no_matching_notebook_says_so():
    with pytest.raises(notebooks.NotebookError, match="no notebooks matched"):
        notebooks.reproduce(profile="smoke", only=["99"])


def test_mirror_writes_datasets_and_the_ifeval_sentence_splitter(capsys, tmp_path, monkeypatch):
    import datasets
    import nltk

    from smoltulu_utils.data import get_spec, load_rows
    from smoltulu_utils.paths import FIXTURES_DIR

    def fixture_hub(hub_id, config=None, *, split, revision, streaming=False):
        return load_rows(get_spec(hub_id).name, split, config, mirror=FIXTURES_DIR)

    def no_network(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(datasets, "load_dataset", fixture_hub)
    monkeypatch.setattr(nltk, "download", no_network)
    assert cli.main(["mirror", "--out", str(tmp_path), "--datasets", "gsm8k", "ifeval"]) == 0
    assert "SMOLTULU_DATA_MIRROR=" in capsys.readouterr().out
    assert (
        load_rows("gsm8k", "train", mirror=tmp_path).to_list()
        == load_rows("gsm8k", "train", mirror=FIXTURES_DIR).to_list()
    )
    punkt = tmp_path / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
    assert sorted(p.name for p in punkt.iterdir()) == [
        "abbrev_types.txt",
        "collocations.tab",
        "ortho_context.tab",
        "sent_starters.txt",
    ]
