"""Sharded training (FSDP, DeepSpeed ZeRO-3) from an Accelerate config, on GPUs and on a CPU.

``accelerate launch`` with an FSDP or DeepSpeed config (``recipes/accelerate/``) tells each process so
through ``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED``; on GPUs the Trainer needs nothing more.
Without a GPU, Accelerate 1.15 joins the processes as ``MULTI_CPU`` and silently drops both plugins
(``AcceleratorState.__init__``), so the run would be plain data parallel: :func:`device_settings`
gives the Trainer's device keywords that keep the sharding (DeepSpeed on its CPU accelerator over
gloo; FSDP2 over gloo from a state marked multi-device).
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


def device_settings() -> dict[str, Any]:
    """The ``TrainingArguments`` device keywords for this process: ``use_cpu`` (True without CUDA), and
    under an FSDP or DeepSpeed launch of several CPU processes those that keep the sharding."""
    if torch.cuda.is_available():
        return {"use_cpu": False}
    kind = sharding()
    if kind is None or int(os.environ.get("WORLD_SIZE", "1") or 1) < 2 or _flag("ACCELERATE_USE_CPU"):
        return {"use_cpu": True}
    if kind == "deepspeed":
        return {"use_cpu": False, "ddp_backend": "gloo"}
    _cpu_fsdp_state()
    return {"use_cpu": True, "accelerator_config": {"use_configured_state": True}}


def _cpu_fsdp_state() -> None:
    """Join this process to the others over gloo, then mark the state ``MULTI_GPU``: Accelerate enables
    FSDP only for multi-device states, and the Trainer's ``Accelerator`` turns it into ``FSDP`` on the CPU."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = PartialState(cpu=True)
    if state.distributed_type == DistributedType.MULTI_CPU:
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU
