"""Command line of the kit: ``python -m smoltulu_utils <command>`` (also installed as ``smoltulu``).

Commands: ``reproduce``, ``plan``, ``hardware``, ``doctor``, ``mirror``, one training command per entry
of :data:`smoltulu_utils.stages.STAGES` and ``eval``. Bad input prints the kit's message and exits with
status 2. ``--processes N`` or ``--accelerate-config`` makes a training command start itself under
``accelerate launch``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import launch
from .atomic import atomic_open
from .errors import KitError
from .manifest import MANIFEST_NAME
from .paths import results_dir, runs_dir
from .serialize import jsonable
from .stages import OPTIONS, STAGES, check_parent_stage, get_stage, jsonable_result, parent_hint

#: What ``eval`` writes in its output folder: the rows, the scores and the settings, as JSON.
EVAL_RESULT_FILE = "eval_result.json"
PROFILES = "auto | smoke | single_gpu | paper"


def _reproduce(args: argparse.Namespace) -> int:
    from .notebooks import reproduce

    reproduce(profile=args.profile, only=args.only or None)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from .profiles import plan_table, resolve
    from .recipes import load_recipe

    if not args.recipe:
        print(plan_table(profile=args.profile, num_processes=args.processes).to_string(index=False))
        return 0
    for name in args.recipe:
        resolve(load_recipe(name), args.profile, num_processes=args.processes, verbose=True)
        print()
    return 0


def _hardware(args: argparse.Namespace) -> int:
    from .hardware import detect_hardware, hardware_report

    print(hardware_report(detect_hardware()))
    return 0


def _mirror(args: argparse.Namespace) -> int:
    from .data import write_mirror
    from .nltk_data import mirror_punkt

    paths = write_mirror(args.out, args.datasets or None, limit=args.limit)
    punkt = mirror_punkt(args.out)  # IFEval's sentence splitter, for air-gapped machines
    print(f"wrote {len(paths)} dataset files and {punkt} under {args.out}")
    print(f"use it with SMOLTULU_DATA_MIRROR={args.out}")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from .chat_template import doctor
    from .models import load_tokenizer

    report = doctor(load_tokenizer(args.model))
    print(report)
    return 0 if report.ok else 1


def _world_size() -> int | None:
    """The process count of the launcher that started this process (``WORLD_SIZE``), or None."""
    value = os.environ.get("WORLD_SIZE")
    return int(value) if value else None


def _profile(args: argparse.Namespace, caps: tuple[str, ...]):
    """The command's profile (``auto``: this machine's); KitError for an unknown one or a cap below 1."""
    from .profiles import auto_profile_name, get_profile

    try:
        profile = get_profile(auto_profile_name() if args.profile == "auto" else args.profile)
    except ValueError as exc:
        raise KitError(str(exc)) from exc
    for key in caps:
        value = getattr(args, key)
        if value is not None and value < 1:
            raise KitError(f"--{key.replace('_', '-')} must be at least 1, got {value}")
    return profile


def stage_plan(stage: str, args: argparse.Namespace, num_processes: int, verbose: bool):
    """The plan of a training command: the recipe and profile with the command line's changes.

    Options left out (None) keep the recipe's or the profile's value; the effective batch is split over
    ``num_processes``. A recipe of another stage, an unknown profile or a cap below 1 raise KitError.
    """
    from .profiles import resolve
    from .recipes import load_recipe

    spec = get_stage(stage)
    recipe = load_recipe(args.recipe)
    if recipe.stage != spec.name:
        raise KitError(
            f"recipe {recipe.name} is for the {recipe.stage} stage; give {spec.label} recipe "
            f"(e.g. {spec.default_recipe})"
        )
    if args.learning_rate is not None:
        recipe = recipe.replace(learning_rate=args.learning_rate)
    profile = _profile(args, ("max_steps", "max_length", "max_samples"))
    changes = {
        "model": args.model,
        "max_steps": args.max_steps,
        "max_length": args.max_length,
        "max_train_samples": args.max_samples,
    }
    profile = profile.replace(**{k: v for k, v in changes.items() if v is not None})
    return resolve(recipe, profile, num_processes=num_processes, verbose=verbose)


def _processes(args: argparse.Namespace) -> tuple[int | None, object]:
    """``(processes to launch, Accelerate config)``; None to launch when already under a launcher or on one
    process without a config. Checks ``--processes`` against the launcher's count."""
    if args.processes is not None and args.processes < 1:
        raise KitError(f"--processes must be at least 1, got {args.processes}")
    config = launch.accelerate_config(args.accelerate_config) if args.accelerate_config else None
    world = _world_size()
    if not launch.under_launcher():
        wanted = args.processes or (launch.config_processes(config) if config is not None else 1)
        if wanted > 1 or config is not None:
            return wanted, config
        return None, config
    if world is not None and args.processes is not None and args.processes != world:
        raise KitError(
            f"--processes {args.processes} but the launcher started {world} processes; "
            "give the same number to both (or leave --processes out)"
        )
    return None, config


def _stage_inputs(stage, args: argparse.Namespace, plan, output, is_main: bool) -> tuple[dict, list[str]]:
    """The keyword inputs of the stage's train function from the command line, and notes for the summary."""
    kwargs: dict = {"parent": args.parent, "verbose": is_main}
    notes = []
    if args.parent is None and plan.recipe.parent_recipe:
        hint = parent_hint(stage, plan.recipe, runs_dir())
        origin = "--model" if args.model else "the profile's model"
        notes.append(
            f"no --parent: started from {plan.model} ({origin}); the recipe's chain starts from the "
            f"{plan.recipe.parent_recipe} checkpoint (--parent {hint})"
        )
    for name in stage.inputs:
        value = getattr(args, name)
        if value is not None:
            kwargs[name] = None if name == "reference_cache" and value.lower() == "none" else value
    value_from_rm = getattr(args, "method", None) == "ppo" and plan.recipe.value_model_from != "policy"
    if value_from_rm and args.reward_model is None:
        notes.append(
            f"no --reward-model: the value model started from {plan.recipe.reward_model} "
            f"(give an RM checkpoint, e.g. runs/rm/{plan.recipe.reward_recipe or 'rm_1130'})"
        )
    if getattr(args, "record_batches", False):
        from .data import load_rows
        from .models import load_tokenizer
        from .profiles import data_mirror

        # The rows train_sft reads for this plan, tokenized once more to name each recorded example.
        tokenizer = load_tokenizer(args.parent or plan.model)
        rows = load_rows(
            plan.recipe.dataset,
            mirror=data_mirror(plan.profile),
            limit=plan.max_train_samples,
            validate=False,
        )
        kwargs["tokenizer"] = tokenizer
        index = launch.example_index(rows, tokenizer, plan.max_length)
        kwargs["callbacks"] = [launch.batch_recorder(output, index)]
    return kwargs, notes


def _train(args: argparse.Namespace) -> int:
    """A training command: train, write ``<stage>_result.json`` and print the summary (main process only).

    Under a launcher the plan splits the effective batch over its processes; without one, ``--processes N``
    (N > 1) or ``--accelerate-config`` starts this same command under ``accelerate launch``.
    """
    stage = get_stage(args.command)
    count, config = _processes(args)
    if count is not None:  # not launched yet: check the plan and the parent, start the processes
        stage_plan(stage.name, args, count, verbose=False)
        check_parent_stage(stage, args.parent)
        options = {"config": config} if config is not None else {}
        launch.run_stage(args.argv, num_processes=count, **options)
        return 0
    num_processes = _world_size() or 1
    is_main = os.environ.get("RANK", "0") == "0"
    plan = stage_plan(stage.name, args, num_processes, verbose=is_main)
    check_parent_stage(stage, args.parent)
    output = Path(args.output) if args.output else runs_dir() / stage.name / plan.recipe.name
    kwargs, notes = _stage_inputs(stage, args, plan, output, is_main)
    result = stage.train_function()(plan, output, **kwargs)
    if not is_main:
        return 0
    extra = {"stage": stage.name, "parent": args.parent, "command_notes": notes}
    with atomic_open(output / stage.result_file) as handle:
        json.dump(jsonable_result(result, plan, extra), handle, indent=2)
    lines = [
        f"{stage.name} {plan.recipe.name} ({plan.profile}, {num_processes} "
        f"process{'es' if num_processes > 1 else ''}): {stage.describe(result)}",
        f"  checkpoint: {output}",
        f"  manifest  : {output / MANIFEST_NAME}",
        f"  result    : {output / stage.result_file}",
    ]
    if getattr(args, "record_batches", False):
        lines.append(f"  batches   : {output / launch.BATCHES_FILE.format(rank='*')}")
    lines += [f"  note      : {note}" for note in notes]
    print("\n".join(lines))
    return 0


def _eval(args: argparse.Namespace) -> int:
    """``eval``: the paper's benchmarks on a checkpoint folder, Hub id or kit keyword; rows to ``eval_result.json``.

    Limits and data follow the profile; the output folder defaults to the checkpoint folder, else
    ``results/eval/<name>``. lm-eval scores a model in memory, so ``eval`` runs on one process.
    """
    from .evaluation import evaluate, paper_model_for
    from .profiles import data_mirror

    if (args.processes or 1) > 1 or (_world_size() or 1) > 1:
        raise KitError(
            "eval runs on one process (lm-eval scores a model in memory on one device); "
            "drop --processes, or run one eval per checkpoint"
        )
    profile = _profile(args, ("limit", "max_gen_toks"))
    folder = Path(args.model).expanduser()
    if args.output:
        output = Path(args.output)
    elif folder.is_dir():
        output = folder
    else:
        output = results_dir() / "eval" / str(args.model).replace("/", "__")
    limit = args.limit or profile.eval_limit
    max_gen_toks = args.max_gen_toks or profile.eval_max_gen_toks
    evaluation = evaluate(
        str(args.model),
        benchmarks=args.tasks or None,
        limit=limit,
        batch_size=int(args.batch_size) if str(args.batch_size).isdigit() else args.batch_size,
        mirror=data_mirror(profile),
        max_gen_toks=max_gen_toks,
        paper_model=paper_model_for(args.model),
        settings={"profile": profile.name},
    )
    record = {
        "model": str(args.model),
        "profile": profile.name,
        "limit": limit,
        "max_gen_toks": max_gen_toks,
        "seconds": evaluation.seconds,
        "scores": evaluation.scores,
        "rows": evaluation.rows,
    }
    with atomic_open(output / EVAL_RESULT_FILE) as handle:
        json.dump(jsonable(record), handle, indent=2)
    if args.store:
        from .results import ResultsStore

        store = ResultsStore()
        store.append(evaluation.rows)
    lines = [
        f"eval {args.model} ({profile.name}, {limit or 'all'} items per task): {evaluation.seconds:.0f} s"
    ]
    lines += [f"  {label:<24}: {value:.1f}" for label, value in evaluation.scores.items()]
    lines.append(f"  result    : {output / EVAL_RESULT_FILE}")
    if args.store:
        lines.append(f"  store     : {store.path}")
    print("\n".join(lines))
    return 0


def _add_training_command(sub, stage) -> None:
    """One sub-command per entry of the stage table, with the options its train function takes."""
    p = sub.add_parser(
        stage.name,
        help=f"run the {stage.name.upper()} stage of a recipe: {stage.description} "
        "(several processes: --processes, or under accelerate launch)",
        description=f"Run the {stage.name.upper()} stage ({stage.description}) and write the checkpoint, "
        f"manifest.json and {stage.result_file} to --output. Under accelerate launch the plan splits "
        "the effective batch over the launched processes.",
    )
    p.add_argument(
        "--recipe",
        default=stage.default_recipe,
        help=f"{stage.label} recipe name or path (default: {stage.default_recipe})",
    )
    p.add_argument("--profile", default="auto", help=PROFILES)
    p.add_argument(
        "--output",
        help=f"folder for the checkpoint and the run's records (default: runs/{stage.name}/<recipe>)",
    )
    p.add_argument("--model", help="tiny | bundled | a Hub id | a folder (default: the profile's)")
    p.add_argument(
        "--parent",
        help=f"the checkpoint to start from: a {' or '.join(stage.parents)} run's folder, or a Hub id "
        "(default: --model, else the profile's model)",
    )
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: the profile's)")
    p.add_argument("--max-length", type=int, help="cap on the tokens of one example")
    p.add_argument("--max-samples", type=int, help="at most this many training rows")
    p.add_argument("--learning-rate", type=float, help="instead of the recipe's (changes LR/BS)")
    p.add_argument(
        "--processes",
        type=int,
        help="processes to train on; above 1 the command starts itself under accelerate launch "
        "(default: 1, or what the launcher started, or the --accelerate-config's)",
    )
    p.add_argument(
        "--accelerate-config",
        help="an Accelerate config: a name in recipes/accelerate (cpu_2proc, multi_gpu_ddp, "
        "deepspeed_zero3, fsdp, ...) or a path; the command starts itself under accelerate launch with it",
    )
    for name in (*stage.inputs, *stage.flags):
        p.add_argument(f"--{name.replace('_', '-')}", **OPTIONS[name])
    p.set_defaults(func=_train)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per kit command."""
    parser = argparse.ArgumentParser(prog="smoltulu", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("reproduce", help="run every notebook in order with papermill")
    p.add_argument("--profile", default="auto", help=PROFILES)
    p.add_argument("--only", nargs="*", help="notebook name prefixes to run, e.g. 00 07")
    p.set_defaults(func=_reproduce)

    p = sub.add_parser("plan", help="print the resolved plan of recipes on this machine")
    p.add_argument("recipe", nargs="*", help="recipe names or paths (default: a table of all)")
    p.add_argument("--profile", default="auto")
    p.add_argument("--processes", type=int, help="number of processes (default: GPUs, else 1)")
    p.set_defaults(func=_plan)

    p = sub.add_parser("mirror", help="write every pinned dataset as local JSONL (needs the Hub)")
    p.add_argument("--out", required=True, help="the mirror folder to write")
    p.add_argument("--datasets", nargs="*", help="kit dataset names (default: all)")
    p.add_argument("--limit", type=int, help="rows per split (default: all)")
    p.set_defaults(func=_mirror)

    p = sub.add_parser("hardware", help="print what this machine offers and the dtype the kit picks")
    p.set_defaults(func=_hardware)

    p = sub.add_parser("doctor", help="check a tokenizer's chat template for training")
    p.add_argument("--model", default="bundled", help="bundled | tiny | a Hub id | a local folder")
    p.set_defaults(func=_doctor)

    for stage in STAGES.values():
        _add_training_command(sub, stage)

    p = sub.add_parser(
        "eval",
        help="run the paper's benchmarks on a checkpoint folder or Hub id",
        description="Run the paper's seven benchmarks (lm-eval, the kit's tasks) on a model and write its "
        f"rows to {EVAL_RESULT_FILE}.",
    )
    p.add_argument("--model", required=True, help="a checkpoint folder, a Hub id, bundled or tiny")
    p.add_argument("--profile", default="auto", help=PROFILES)
    p.add_argument("--tasks", nargs="*", help="benchmarks, e.g. gsm8k ifeval arc (default: all seven)")
    p.add_argument("--limit", type=int, help="items per task (default: the profile's)")
    p.add_argument("--max-gen-toks", type=int, help="cap on generated tokens (default: the profile's)")
    p.add_argument("--batch-size", default="auto", help="lm-eval batch size (default: auto)")
    p.add_argument(
        "--output",
        help=f"folder for {EVAL_RESULT_FILE} (default: the checkpoint folder, else results/eval/<model>)",
    )
    p.add_argument("--store", action="store_true", help="also append the rows to the results store")
    p.add_argument("--processes", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m smoltulu_utils``: 0 on success, 2 on bad input (message on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # a command that starts itself under a launcher passes the same arguments on
    try:
        return args.func(args)
    except KitError as exc:
        print(f"smoltulu {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
