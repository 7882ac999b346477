"""Command line of the kit: ``python -m smoltulu_utils <command>`` (also installed as ``smoltulu``).

Commands: ``reproduce`` (run the notebooks in order), ``plan`` (resolve recipes for this machine),
``hardware`` (what this machine offers), ``doctor`` (check a tokenizer's chat template), ``mirror``
(write every pinned dataset as local JSONL for air-gapped machines), one training command per entry
of the stage table (:mod:`smoltulu_utils.stages`: ``sft``, ``dpo``, ``rm``, ``rlvr``, each on one
process or several) and ``eval`` (the paper's benchmarks on a checkpoint). Bad input prints the kit's
message (the problem and its fix) and exits with status 2, without a traceback.
Training commands also run under ``accelerate launch``: ``--processes N`` or ``--accelerate-config``
makes a command start itself under the launcher, and a notebook can start a multi-process run as a
subprocess (:func:`smoltulu_utils.launch.run_stage`)."""

from __future__ import annotations

import argparse
import os
import sys

#: What ``sft`` writes beside the checkpoint: the run's SFTResult and its plan, as JSON (every training
#: command writes ``<stage>_result.json``: :attr:`smoltulu_utils.stages.Stage.result_file`).
SFT_RESULT_FILE = "sft_result.json"


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


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def stage_plan(stage: str, args: argparse.Namespace, num_processes: int, verbose: bool):
    """The plan of a training command: the recipe and profile with the command line's changes.

    ``args`` holds ``recipe``, ``profile``, ``learning_rate``, ``model``, ``max_steps``, ``max_length``
    and ``max_samples`` (None keeps the recipe's or the profile's value); the effective batch is split
    over ``num_processes``. A recipe of another stage, an unknown profile or a cap below 1 raise
    :class:`~smoltulu_utils.errors.KitError`.
    """
    from .errors import KitError
    from .profiles import auto_profile_name, get_profile, resolve
    from .recipes import load_recipe
    from .stages import get_stage

    spec = get_stage(stage)
    recipe = load_recipe(args.recipe)
    if recipe.stage != spec.name:
        raise KitError(
            f"recipe {recipe.name} is for the {recipe.stage} stage; give {spec.label} recipe "
            f"(e.g. {spec.default_recipe})"
        )
    if args.learning_rate is not None:
        recipe = recipe.replace(learning_rate=args.learning_rate)
    try:
        profile = get_profile(auto_profile_name() if args.profile == "auto" else args.profile)
    except ValueError as exc:
        raise KitError(str(exc)) from exc
    for key in ("max_steps", "max_length", "max_samples"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise KitError(f"--{key.replace('_', '-')} must be at least 1, got {value}")
    changes = {
        "model": args.model,
        "max_steps": args.max_steps,
        "max_length": args.max_length,
        "max_train_samples": args.max_samples,
    }
    profile = profile.replace(**{k: v for k, v in changes.items() if v is not None})
    return resolve(recipe, profile, num_processes=num_processes, verbose=verbose)


def _processes(args: argparse.Namespace) -> tuple[int | None, object]:
    """``(processes to launch, Accelerate config)`` when this command must start itself under
    ``accelerate launch``, else ``(None, config)``; checks ``--processes`` against the launcher's count."""
    from .errors import KitError
    from .launch import accelerate_config, config_processes, under_launcher

    if args.processes is not None and args.processes < 1:
        raise KitError(f"--processes must be at least 1, got {args.processes}")
    config = accelerate_config(args.accelerate_config) if args.accelerate_config else None
    world = _world_size()
    if not under_launcher():
        wanted = args.processes or (config_processes(config) if config is not None else 1)
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
    from .paths import runs_dir
    from .stages import parent_hint

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
        value = getattr(args, name, None)
        if name == "reference_cache" and value is not None:
            value = None if value.lower() == "none" else value
        elif value is None:
            continue
        kwargs[name] = value
    value_from_rm = getattr(args, "method", None) == "ppo" and plan.recipe.value_model_from != "policy"
    if "reward_model" in stage.inputs and args.reward_model is None and value_from_rm:
        notes.append(
            f"no --reward-model: the value model started from {plan.recipe.reward_model} "
            f"(give an RM checkpoint, e.g. runs/rm/{plan.recipe.reward_recipe or 'rm_1130'})"
        )
    if getattr(args, "record_batches", False):
        from .data import load_rows
        from .launch import batch_recorder, example_index
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
        kwargs["callbacks"] = [batch_recorder(output, example_index(rows, tokenizer, plan.max_length))]
    return kwargs, notes


def _train(args: argparse.Namespace) -> int:
    """A training command (``sft``, ``dpo``, ``rm``, ``rlvr``): train, write ``<stage>_result.json``, summarise.

    Under a launcher (``WORLD_SIZE`` set, e.g. ``accelerate launch``) the plan splits the effective batch
    over the launched processes; ``--processes N`` (N > 1) or ``--accelerate-config`` without a launcher
    starts this same command under ``accelerate launch``. The result file and the summary come from the
    main process only. ``sft --record-batches`` adds :func:`smoltulu_utils.launch.batch_recorder`: each
    process writes ``batches_rank{R}.json`` with the rows of every micro-batch it trained on.
    """
    import json
    from pathlib import Path

    from .stages import check_parent_stage, get_stage

    stage = get_stage(args.command)
    launch, config = _processes(args)
    if launch is not None:  # not launched yet: check the plan and the parent, start the processes
        from . import launch as launcher

        stage_plan(stage.name, args, launch, verbose=False)
        check_parent_stage(stage, args.parent)
        options = {"config": config} if config is not None else {}
        launcher.run_stage(args.argv, num_processes=launch, **options)
        return 0
    num_processes = _world_size() or 1
    is_main = _is_main_process()
    plan = stage_plan(stage.name, args, num_processes, verbose=is_main)
    check_parent_stage(stage, args.parent)

    from .atomic import atomic_open
    from .launch import BATCHES_FILE
    from .manifest import MANIFEST_NAME
    from .paths import runs_dir
    from .stages import jsonable_result

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
        lines.append(f"  batches   : {output / BATCHES_FILE.format(rank='*')}")
    lines += [f"  note      : {note}" for note in notes]
    print("\n".join(lines))
    return 0


#: What ``eval`` writes in its output folder: the rows, the scores and the settings, as JSON.
EVAL_RESULT_FILE = "eval_result.json"


def _eval(args: argparse.Namespace) -> int:
    """``eval``: the paper's benchmarks on a checkpoint folder, Hub id or kit keyword; rows to ``eval_result.json``.

    ``--limit`` and ``--max-gen-toks`` default to the profile's (smoke: 4 items, 96 new tokens); the
    data come from the profile's source (fixtures in smoke). The output folder defaults to the
    checkpoint folder itself, else ``results/eval/<name>``. lm-eval scores a model in memory on one
    process, so ``eval`` runs on one (vLLM, when installed with a GPU, uses every GPU itself).
    """
    import json
    from pathlib import Path

    from .atomic import atomic_open
    from .errors import KitError
    from .evaluation import evaluate, paper_model_for
    from .paths import results_dir
    from .profiles import auto_profile_name, data_mirror, get_profile
    from .serialize import jsonable

    if (args.processes or 1) > 1 or (_world_size() or 1) > 1:
        raise KitError(
            "eval runs on one process (lm-eval scores a model in memory on one device); "
            "drop --processes, or run one eval per checkpoint"
        )
    for key in ("limit", "max_gen_toks"):
        value = getattr(args, key)
        if value is not None and value < 1:
            raise KitError(f"--{key.replace('_', '-')} must be at least 1, got {value}")
    try:
        profile = get_profile(auto_profile_name() if args.profile == "auto" else args.profile)
    except ValueError as exc:
        raise KitError(str(exc)) from exc
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
    p.add_argument("--profile", default="auto", help="auto | smoke | single_gpu | paper")
    p.add_argument(
        "--output",
        default=None,
        help=f"folder for the checkpoint and the run's records (default: runs/{stage.name}/<recipe>)",
    )
    p.add_argument(
        "--model", default=None, help="tiny | bundled | a Hub id | a folder (default: the profile's)"
    )
    p.add_argument(
        "--parent",
        default=None,
        help=f"the checkpoint to start from: a {' or '.join(stage.parents)} run's folder, or a Hub id "
        "(default: --model, else the profile's model)",
    )
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: the profile's)")
    p.add_argument("--max-length", type=int, default=None, help="cap on the tokens of one example")
    p.add_argument("--max-samples", type=int, default=None, help="at most this many training rows")
    p.add_argument(
        "--learning-rate", type=float, default=None, help="instead of the recipe's (changes LR/BS)"
    )
    p.add_argument(
        "--processes",
        type=int,
        default=None,
        help="processes to train on; above 1 the command starts itself under accelerate launch "
        "(default: 1, or what the launcher started, or the --accelerate-config's)",
    )
    p.add_argument(
        "--accelerate-config",
        default=None,
        help="an Accelerate config: a name in recipes/accelerate (cpu_2proc, multi_gpu_ddp, "
        "deepspeed_zero3, fsdp, ...) or a path; the command starts itself under accelerate launch with it",
    )
    if stage.name == "sft":
        p.add_argument(
            "--record-batches",
            action="store_true",
            help="every process writes the examples of each micro-batch it trained on to batches_rank{R}.json",
        )
    if "reference_cache" in stage.inputs:
        p.add_argument(
            "--reference-cache",
            default=None,
            help="folder of cached reference log-probs (default: ~/.cache/smoltulu/reference_logps); "
            "'none': TRL's own precompute, no disk cache",
        )
    if "reward_model" in stage.inputs:
        p.add_argument(
            "--reward-model",
            default=None,
            help="the reward model the value model starts from: an RM run's folder or a Hub id "
            "(default: the recipe's, or the profile's model)",
        )
    if "method" in stage.inputs:
        p.add_argument(
            "--method", default="ppo", choices=("ppo", "grpo"), help="ppo (SmolTulu's) or grpo (TRL's)"
        )
    p.set_defaults(func=_train)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per kit command."""
    parser = argparse.ArgumentParser(prog="smoltulu", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("reproduce", help="run every notebook in order with papermill")
    p.add_argument("--profile", default="auto", help="auto | smoke | single_gpu | paper")
    p.add_argument("--only", nargs="*", help="notebook name prefixes to run, e.g. 00 07")
    p.set_defaults(func=_reproduce)

    p = sub.add_parser("plan", help="print the resolved plan of recipes on this machine")
    p.add_argument("recipe", nargs="*", help="recipe names or paths (default: a table of all)")
    p.add_argument("--profile", default="auto")
    p.add_argument("--processes", type=int, default=None, help="number of processes (default: GPUs, else 1)")
    p.set_defaults(func=_plan)

    p = sub.add_parser("mirror", help="write every pinned dataset as local JSONL (needs the Hub)")
    p.add_argument("--out", required=True, help="the mirror folder to write")
    p.add_argument("--datasets", nargs="*", help="kit dataset names (default: all)")
    p.add_argument("--limit", type=int, default=None, help="rows per split (default: all)")
    p.set_defaults(func=_mirror)

    p = sub.add_parser("hardware", help="print what this machine offers and the dtype the kit picks")
    p.set_defaults(func=_hardware)

    p = sub.add_parser("doctor", help="check a tokenizer's chat template for training")
    p.add_argument("--model", default="bundled", help="bundled | tiny | a Hub id | a local folder")
    p.set_defaults(func=_doctor)

    from .stages import STAGES

    for stage in STAGES.values():
        _add_training_command(sub, stage)

    p = sub.add_parser(
        "eval",
        help="run the paper's benchmarks on a checkpoint folder or Hub id",
        description="Run the paper's seven benchmarks (lm-eval, the kit's tasks) on a model and write its "
        f"rows to {EVAL_RESULT_FILE}.",
    )
    p.add_argument("--model", required=True, help="a checkpoint folder, a Hub id, bundled or tiny")
    p.add_argument("--profile", default="auto", help="auto | smoke | single_gpu | paper")
    p.add_argument(
        "--tasks", nargs="*", default=None, help="benchmarks, e.g. gsm8k ifeval arc (default: all seven)"
    )
    p.add_argument("--limit", type=int, default=None, help="items per task (default: the profile's)")
    p.add_argument(
        "--max-gen-toks", type=int, default=None, help="cap on generated tokens (default: the profile's)"
    )
    p.add_argument("--batch-size", default="auto", help="lm-eval batch size (default: auto)")
    p.add_argument(
        "--output",
        default=None,
        help=f"folder for {EVAL_RESULT_FILE} (default: the checkpoint folder, else results/eval/<model>)",
    )
    p.add_argument("--store", action="store_true", help="also append the rows to the results store")
    p.add_argument("--processes", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m smoltulu_utils``: 0 on success, 2 on bad input (message on stderr)."""
    from .errors import KitError

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
