"""Start a stage of the kit as a subprocess, on one process or several under ``accelerate launch``.

``run_stage(["sft", "--recipe", "sft_1130", "--output", "runs/sft_1130"], num_processes=2)`` runs
``python -m smoltulu_utils <args>``, under ``accelerate launch`` with more than one process or a
``config`` (default: ``recipes/accelerate/cpu_2proc.yaml`` without a GPU, ``multi_gpu_ddp.yaml`` on
CUDA), streams its output and raises :class:`LaunchError` with the last lines when it fails.
:func:`batch_recorder`, behind ``sft --record-batches``, writes the examples of each micro-batch every
process trained on, to show how the data was split between the processes.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import KitError
from .paths import KIT_ROOT, RECIPES_DIR

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase, TrainerCallback

ACCELERATE_CONFIGS = RECIPES_DIR / "accelerate"
#: The Accelerate config :func:`launch_command` uses when none is given: by whether CUDA is available.
DEFAULT_CONFIGS = {"cpu": "cpu_2proc.yaml", "cuda": "multi_gpu_ddp.yaml"}
#: Lines of output a :class:`LaunchError` quotes.
TAIL_LINES = 40
#: The file name each process of a ``--record-batches`` run writes, in the output folder.
BATCHES_FILE = "batches_rank{rank}.json"
#: Set in the environment of the processes :func:`run_stage` starts under ``accelerate launch``, so a
#: command that starts itself under the launcher never starts itself again (a one-process config, run
#: by Accelerate's simple launcher, sets no ``WORLD_SIZE``).
LAUNCHED_ENV = "SMOLTULU_LAUNCHED"


class LaunchError(KitError, RuntimeError):
    """A stage run as a subprocess that could not start or did not finish; the message quotes its output."""


def accelerate_config(config: str | os.PathLike | None = None) -> Path:
    """The Accelerate config file to launch with.

    ``config`` is a path, or a file name in ``recipes/accelerate/`` (with or without ``.yaml``). Without
    one: ``multi_gpu_ddp.yaml`` when CUDA is available, else ``cpu_2proc.yaml``.
    """
    if config is None:
        import torch

        config = DEFAULT_CONFIGS["cuda" if torch.cuda.is_available() else "cpu"]
    given = Path(config).expanduser()
    candidates = [given, ACCELERATE_CONFIGS / given.name, ACCELERATE_CONFIGS / f"{given.name}.yaml"]
    for path in candidates if given.suffix in ("", ".yaml", ".yml") else candidates[:1]:
        if path.is_file():
            return path.resolve()
    shipped = ", ".join(sorted(p.stem for p in ACCELERATE_CONFIGS.glob("*.yaml")))
    raise LaunchError(
        f"no Accelerate config {str(config)!r}: give a path to a config file or one of the kit's ({shipped})"
    )


def config_processes(config: str | os.PathLike) -> int:
    """The ``num_processes`` an Accelerate config file asks for (1 when it says nothing)."""
    import yaml

    path = accelerate_config(config)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        value = int(data.get("num_processes") or 1) if isinstance(data, Mapping) else 1
    except (yaml.YAMLError, TypeError, ValueError) as exc:
        raise LaunchError(f"{path}: cannot read num_processes ({exc}); fix the Accelerate config") from exc
    return max(value, 1)


def under_launcher() -> bool:
    """True in a process started by a launcher (``WORLD_SIZE`` set) or by :func:`run_stage` under Accelerate."""
    return bool(os.environ.get("WORLD_SIZE") or os.environ.get(LAUNCHED_ENV))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now, for the rendezvous of one multi-process run."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def launch_command(
    args: Sequence[str],
    num_processes: int,
    config: str | os.PathLike | None = None,
    *,
    port: int | None = None,
) -> list[str]:
    """The ``accelerate launch`` command that runs ``python -m smoltulu_utils <args>`` on ``num_processes``.

    ``config`` as in :func:`accelerate_config` (default: ``cpu_2proc.yaml`` on a CPU, ``multi_gpu_ddp.yaml``
    on CUDA); its process count is replaced by ``num_processes`` and its port by ``port`` (default: a
    free one, so two runs on one machine do not meet at the same rendezvous).
    """
    if int(num_processes) < 1:
        raise LaunchError(f"num_processes must be at least 1, got {num_processes}")
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(accelerate_config(config)),
        "--num_processes",
        str(int(num_processes)),
        "--main_process_port",
        str(port if port is not None else free_port()),
        "-m",
        "smoltulu_utils",
        *map(str, args),
    ]


def _child_env(env: Mapping[str, str] | None) -> dict[str, str]:
    """This process's environment, ``env`` on top, unbuffered output, and this kit first on the path."""
    child = {**os.environ, **(env or {})}
    child["PYTHONUNBUFFERED"] = "1"
    path = child.get("PYTHONPATH", "")
    child["PYTHONPATH"] = os.pathsep.join(p for p in (str(KIT_ROOT), path) if p)
    return child


def _stop(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop ``process`` and everything it started (its own session): SIGTERM, then SIGKILL."""
    if process.poll() is not None:
        return
    killpg = getattr(os, "killpg", None)
    for sig in (signal.SIGTERM, getattr(signal, "SIGKILL", signal.SIGTERM)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if killpg is not None:
                killpg(process.pid, sig)
            else:  # pragma: no cover - no process groups (Windows)
                process.send_signal(sig)
        try:
            process.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def output_tail(text: str, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` non-empty lines of ``text`` (progress bars' carriage returns end lines too)."""
    kept = [line for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


def run_stage(
    args: Sequence[str],
    num_processes: int = 1,
    *,
    config: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    echo: bool = True,
    timeout: float | None = None,
    tail_lines: int = TAIL_LINES,
) -> subprocess.CompletedProcess:
    """Run ``python -m smoltulu_utils <args>`` as a subprocess, under ``accelerate launch`` when ``num_processes > 1``
    or with a ``config`` (a DeepSpeed or FSDP file, which Accelerate must set up even for one process).

    The merged stdout and stderr stream to ``sys.stdout`` as they arrive (``echo=False``: only kept).
    ``env`` adds environment variables; ``timeout`` (seconds) stops the run and everything it started,
    as does an interrupt (a notebook's stop button). Returns the ``CompletedProcess`` (``stdout``: the
    whole output) of a run that exited with 0; otherwise raises :class:`LaunchError` quoting the last
    ``tail_lines`` lines of the output.
    """
    args = [str(a) for a in args]
    launched = int(num_processes) != 1 or config is not None
    command = [sys.executable, "-m", "smoltulu_utils", *args]
    if launched:
        command = launch_command(args, num_processes, config)
        env = {**(env or {}), LAUNCHED_ENV: "1"}
    started = time.monotonic()
    try:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=_child_env(env),
            cwd=cwd,
            start_new_session=True,  # its own process group: stopping it stops accelerate's workers too
        )
    except OSError as exc:
        raise LaunchError(f"could not start `{shlex.join(command)}`: {exc}") from exc

    timed_out = threading.Event()

    def on_timeout() -> None:
        timed_out.set()
        _stop(process)

    timer = threading.Timer(timeout, on_timeout) if timeout else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    chunks: list[str] = []
    assert process.stdout is not None
    try:
        while True:
            data = process.stdout.read1(65536)
            text = decoder.decode(data, final=not data)
            if text:
                chunks.append(text)
                if echo:
                    sys.stdout.write(text)
                    sys.stdout.flush()
            if not data:
                break
        returncode = process.wait()
    except BaseException:  # KeyboardInterrupt included: never leave the workers running
        _stop(process)
        raise
    finally:
        if timer is not None:
            timer.cancel()
        process.stdout.close()
    output = "".join(chunks)
    if timed_out.is_set() or returncode != 0:
        why = f"failed with exit status {returncode} after {time.monotonic() - started:.0f} s"
        if timed_out.is_set():
            why = f"was stopped after {timeout:g} s"
        raise LaunchError(
            f"`{shlex.join(command)}` {why}; the last lines of its output:\n"
            + output_tail(output, tail_lines)
        )
    return subprocess.CompletedProcess(command, returncode, stdout=output)


def example_hash(token_ids: Iterable[int]) -> str:
    """A short fingerprint of one example's token ids (the same ids give the same hash everywhere)."""
    return hashlib.sha1(array("q", [int(t) for t in token_ids]).tobytes()).hexdigest()[:16]


def example_index(
    rows: Iterable[Mapping], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> dict[str, list[dict[str, Any]]]:
    """``{example_hash: [{"row": index, "id": row id}, ...]}`` for the rows an SFT run would train on,
    tokenized as :func:`smoltulu_utils.sft.prepare_sft_rows` does, so a recorded batch can name its rows."""
    from .sft import prepare_sft_rows

    rows = list(rows)
    dataset, report = prepare_sft_rows(rows, tokenizer, max_length)
    skipped = {s.index for s in report.skipped}
    kept = [i for i in range(len(rows)) if i not in skipped]
    index: dict[str, list[dict[str, Any]]] = {}
    for position, ids in zip(kept, dataset["input_ids"], strict=True):
        row = rows[position]
        row_id = row.get("id") if isinstance(row, Mapping) else None
        index.setdefault(example_hash(ids), []).append({"row": position, "id": row_id})
    return index


def _examples(kwargs: Mapping[str, Any]) -> list[list[int]]:
    """The token ids of each example in a model call's inputs, without padding: the tokens under the
    attention mask, or in a padding-free row the pieces where ``position_ids`` restart at 0."""
    input_ids = kwargs.get("input_ids")
    if input_ids is None:
        return []
    mask = kwargs.get("attention_mask")
    positions = kwargs.get("position_ids")
    if mask is None and positions is not None and input_ids.shape[0] == 1:
        ids, pos = input_ids[0].tolist(), positions[0].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0] or [0]
        return [ids[a:b] for a, b in zip(starts, starts[1:] + [len(ids)], strict=True)]
    if mask is None:
        return [row.tolist() for row in input_ids]
    return [row[m.bool()].tolist() for row, m in zip(input_ids, mask, strict=True)]


def batch_recorder(
    folder: str | os.PathLike, index: Mapping[str, list[dict]] | None = None
) -> TrainerCallback:
    """A ``TrainerCallback`` that records the examples of every training micro-batch of this process.

    It hooks the model's forward pass (training only), and at the end of training writes
    ``folder/batches_rank{R}.json``: rank, world size, batch sizes, steps, and ``batches``, each with its
    optimizer ``step`` (from 1), its ``micro_batch`` in the accumulation and its ``examples`` (hash,
    tokens, and with ``index`` (:func:`example_index`) the row number and id).
    """
    from transformers import TrainerCallback

    class BatchRecorder(TrainerCallback):
        def __init__(self) -> None:
            self.batches: list[dict[str, Any]] = []
            self._handle = None
            self._state = None

        def _record(self, module, args, kwargs) -> None:
            if not module.training or self._state is None:
                return
            step = int(self._state.global_step) + 1
            last = self.batches[-1] if self.batches else None
            micro = last["micro_batch"] + 1 if last is not None and last["step"] == step else 0
            examples = []
            for ids in _examples(kwargs):
                digest = example_hash(ids)
                found = (index or {}).get(digest, [{}])[0]
                examples.append({"hash": digest, "tokens": len(ids), **found})
            self.batches.append({"step": step, "micro_batch": micro, "examples": examples})

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self._state = state
            if model is not None and self._handle is None:
                self._handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

        def on_train_end(self, args, state, control, **kwargs):
            from .atomic import atomic_open

            if self._handle is not None:
                self._handle.remove()
                self._handle = None
            record = {
                "rank": int(args.process_index),
                "world_size": int(args.world_size),
                "per_device_batch_size": int(args.per_device_train_batch_size),
                "gradient_accumulation_steps": int(args.gradient_accumulation_steps),
                "steps": int(state.global_step),
                "batches": self.batches,
            }
            path = Path(folder) / BATCHES_FILE.format(rank=record["rank"])
            with atomic_open(path) as handle:
                json.dump(record, handle, indent=1)

    return BatchRecorder()


def read_batches(folder: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """``{rank: record}`` from the ``batches_rank{R}.json`` files a ``--record-batches`` run wrote."""
    records = {}
    for path in sorted(Path(folder).glob(BATCHES_FILE.format(rank="*"))):
        record = json.loads(path.read_text(encoding="utf-8"))
        records[int(record["rank"])] = record
    return records
