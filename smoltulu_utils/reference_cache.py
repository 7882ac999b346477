"""Reference log-probabilities on disk, computed once per (reference, data, tokenizer, length) key.

DPO's reference log-probs never change within a run, nor between the runs of a sweep that start from
the same checkpoint on the same data, so the kit computes them once and later runs read them. Written by
hand because TRL's ``precompute_ref_log_probs`` caches under a ``datasets`` fingerprint that an in-memory
dataset does not keep between processes, and trusts whatever file it finds. The key is a SHA-256 over
the reference weights (TRL's ``hash_module``), the tokenized pairs, the tokenizer and chat template, and
the length settings, dtype and ``ld_alpha``. A file (``<key>.safetensors``) keeps the key's parts, the row
count and a checksum in its metadata; one that does not open or match, or holds a non-finite value, is
reported, removed and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_open

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def data_fingerprint(rows: Iterable[Mapping[str, Any]], columns: Iterable[str] = ID_COLUMNS) -> str:
    """SHA-256 over the token ids of every row, in order (the lengths are hashed too, so no two differ)."""
    columns = tuple(columns)
    digest = hashlib.sha256()
    n = 0
    for row in rows:
        for column in columns:
            ids = row[column]
            digest.update(f"{column}:{len(ids)}:".encode())
            digest.update(torch.as_tensor(ids, dtype=torch.int64).numpy().tobytes())
        n += 1
    digest.update(f"rows:{n}".encode())
    return digest.hexdigest()


def is_zero3_partitioned(module: torch.nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 has partitioned ``module``'s parameters (each rank holds a shard)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def module_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of a module's weights: TRL's ``hash_module``, with ZeRO-3 shards gathered first.

    Each tensor of the state dict, in name order, contributes its dtype and bytes (bf16 and fp8 as
    float32), as ``trl.trainer.utils.hash_module`` does, so a model hashes the same whether it is whole
    or partitioned by ZeRO-3 (whose local parameters are empty placeholders); one parameter is gathered
    at a time, on every rank together.
    """
    if not is_zero3_partitioned(module):
        from trl.trainer.utils import hash_module

        return hash_module(module)
    import deepspeed

    digest = hashlib.sha256()
    for _, tensor in sorted(module.state_dict(keep_vars=True).items()):
        if hasattr(tensor, "ds_id"):
            with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
                tensor = tensor.detach().cpu().clone()
        else:
            tensor = tensor.detach().cpu()
        digest.update(str(tensor.dtype).encode())
        if tensor.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
            tensor = tensor.to(torch.float32)
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def cache_key(parts: Mapping[str, Any]) -> str:
    """The cache key of some key parts (any JSON-able mapping): a SHA-256 of their canonical JSON."""
    text = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _tensor_digest(chosen: torch.Tensor, rejected: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for tensor in (chosen, rejected):
        digest.update(tensor.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Lookup:
    """What a cache lookup found: the values (None on a miss) and why it missed."""

    chosen: torch.Tensor | None
    rejected: torch.Tensor | None
    path: Path
    reason: str  # "hit", "missing", or what was wrong with the file

    @property
    def hit(self) -> bool:
        return self.chosen is not None


class ReferenceCache:
    """A folder of reference log-prob files, one per key (default: ``<cache_dir>/reference_logps``)."""

    def __init__(self, directory: str | os.PathLike | None = None):
        if directory is None:
            from .paths import cache_dir

            directory = cache_dir() / "reference_logps"
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        """Where the file of ``key`` lives."""
        return self.directory / f"{key}.safetensors"

    def load(self, key: str, n_rows: int) -> Lookup:
        """The cached values of ``key``, checked; a bad file is removed and reported as a miss."""
        from safetensors import safe_open

        path = self.path(key)
        if not path.is_file():
            return Lookup(None, None, path, "missing")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                chosen, rejected = fh.get_tensor("chosen"), fh.get_tensor("rejected")
            problem = None
            if meta.get("key") != key:
                problem = "it was written for another key"
            elif (
                int(meta.get("n_rows", -1)) != n_rows
                or chosen.shape != (n_rows,)
                or rejected.shape != (n_rows,)
            ):
                problem = f"it holds {chosen.shape[0]} rows, the data has {n_rows}"
            elif meta.get("sha256") != _tensor_digest(chosen, rejected):
                problem = "its checksum does not match its contents"
            elif not (torch.isfinite(chosen).all() and torch.isfinite(rejected).all()):
                problem = "it holds a non-finite log-probability"
        except Exception as exc:  # a truncated or overwritten file: safetensors cannot parse it
            problem = (
                f"it cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
            )
        if problem is not None:
            log.warning("reference log-prob cache %s is corrupt: %s; recomputing it", path, problem)
            path.unlink(missing_ok=True)
            return Lookup(None, None, path, f"corrupt: {problem}")
        return Lookup(chosen, rejected, path, "hit")

    def save(self, key: str, chosen: torch.Tensor, rejected: torch.Tensor, parts: Mapping[str, Any]) -> Path:
        """Write the values of ``key`` atomically, with the key parts and a checksum in the metadata."""
        from safetensors.torch import save

        chosen = chosen.detach().to(torch.float32).contiguous().cpu()
        rejected = rejected.detach().to(torch.float32).contiguous().cpu()
        meta = {
            "key": key,
            "n_rows": str(int(chosen.shape[0])),
            "sha256": _tensor_digest(chosen, rejected),
            "parts": json.dumps(dict(parts), sort_keys=True, default=str),
        }
        path = self.path(key)
        with atomic_open(path, "wb") as fh:
            fh.write(save({"chosen": chosen, "rejected": rejected}, metadata=meta))
        return path

    def entries(self) -> list[dict[str, Any]]:
        """Every file in the cache with its key parts and row count (unreadable files are skipped)."""
        from safetensors import safe_open

        out = []
        for path in sorted(self.directory.glob("*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as fh:
                    meta = fh.metadata() or {}
                parts = json.loads(meta.get("parts", "{}"))
                out.append({"path": path, "n_rows": int(meta.get("n_rows", 0)), **parts})
            except Exception:  # noqa: BLE001 - listed files only
                continue
        return out
