"""Sharded training (FSDP, DeepSpeed ZeRO-3) from an Accelerate config, on GPUs and on a CPU.

``accelerate launch`` with an FSDP or DeepSpeed config (``recipes/accelerate/fsdp.yaml``,
``deepspeed_zero3.yaml``, and their two-process CPU versions ``cpu_fsdp_2proc.yaml``,
``cpu_deepspeed_zero3_2proc.yaml``) tells each process so through ``ACCELERATE_USE_FSDP`` /
``ACCELERATE_USE_DEEPSPEED``. On a GPU machine the Trainer needs nothing more. Without a GPU the
Trainer's ``use_cpu=True`` makes Accelerate join the processes as ``MULTI_CPU`` (gloo), and Accelerate
1.15 then drops the FSDP and DeepSpeed plugins without a word (``AcceleratorState.__init__`` takes
DeepSpeed only ``and not cpu``, and FSDP only for GPU-like distributed types): the run would be plain
data parallel. :func:`device_settings` gives the Trainer's device keywords that keep the sharding:

- DeepSpeed: ``use_cpu=False`` and the gloo backend; DeepSpeed runs on its CPU accelerator.
- FSDP: the processes are joined over gloo first, and their shared state is marked as a multi-device
  run, so that Accelerate builds its FSDP plugin; torch's FSDP2 then shards over gloo on the CPU.
  The Trainer is told to use that state (``accelerator_config={"use_configured_state": True}``).

:func:`sharding` says which of the two a process was launched with.
"""

from __future__ import annotations

import os
from typing import Any

import torch

#: The environment variables ``accelerate launch`` sets for each sharded distributed type.
LAUNCH_FLAGS = {"deepspeed": "ACCELERATE_USE_DEEPSPEED", "fsdp": "ACCELERATE_USE_FSDP"}


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes", "on")


def sharding() -> str | None:
    """``"deepspeed"`` or ``"fsdp"`` when ``accelerate launch`` started this process with such a config."""
    for name, variable in LAUNCH_FLAGS.items():
        if _flag(variable):
            return name
    return None


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def device_settings() -> dict[str, Any]:
    """The ``TrainingArguments`` device keywords for this process: ``use_cpu`` and, when sharded on a CPU, more.

    With CUDA: ``{"use_cpu": False}``. Without CUDA: ``{"use_cpu": True}`` (a DDP launch joins over
    gloo), except under an FSDP or DeepSpeed launch of several processes, where the keywords keep the
    sharding (see the module docstring) instead of silently running data parallel.
    """
    if torch.cuda.is_available():
        return {"use_cpu": False}
    kind = sharding()
    if kind is None or _world_size() < 2 or _flag("ACCELERATE_USE_CPU"):
        return {"use_cpu": True}
    if kind == "deepspeed":
        return {"use_cpu": False, "ddp_backend": "gloo"}
    _cpu_fsdp_state()
    return {"use_cpu": True, "accelerator_config": {"use_configured_state": True}}


def _cpu_fsdp_state() -> None:
    """Join this process to the others over gloo and let Accelerate build its FSDP plugin on the CPU.

    Accelerate enables FSDP in ``AcceleratorState`` only when the joined state is a multi-device type
    (``MULTI_GPU`` and the like); a CPU state is ``MULTI_CPU``. The state is joined as ``MULTI_CPU`` and
    then marked ``MULTI_GPU``, which Accelerate turns into ``FSDP`` when the Trainer creates its
    ``Accelerator``; the device stays the CPU and the backend gloo.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = PartialState(cpu=True)
    if state.distributed_type == DistributedType.MULTI_CPU:
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
