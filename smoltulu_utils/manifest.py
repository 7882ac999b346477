"""``manifest.json`` beside every checkpoint, and the check a stage runs on its parent.

A manifest records what made a checkpoint: kit version, stage, recipe, data, tokenizer and template
hashes, library versions, seed and parent. :func:`check_parent` refuses a parent trained with another
tokenizer or template, which would silently train other token ids or turns.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib.metadata
import json
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .atomic import atomic_open
from .chat_template import template_fingerprint
from .errors import KitError
from .serialize import jsonable

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
LIBRARIES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate")
DATA_KEYS = ("id", "revision", "split", "n_rows")
_REQUIRED = ("manifest_version", "stage", "tokenizer", "created_at")


class ManifestError(KitError, ValueError):
    """A missing, unreadable or mismatching manifest; the message names the path and the fix."""


def _recipe_dict(recipe: Any) -> dict[str, Any] | None:
    if recipe is None:
        return None
    if hasattr(recipe, "to_dict"):
        out = dict(recipe.to_dict())
    elif dataclasses.is_dataclass(recipe) and not isinstance(recipe, type):
        out = dataclasses.asdict(recipe)
    elif isinstance(recipe, Mapping):
        out = dict(recipe)
    else:
        raise ManifestError(f"recipe must be a dataclass or a mapping, not {type(recipe).__name__}")
    source = getattr(recipe, "path", None)
    if source is not None and "path" not in out:
        out["recipe_file"] = os.fspath(source)
    return jsonable(out)


def _data_rows(data: Any) -> list[dict[str, Any]]:
    if data is None:
        return []
    items = [data] if isinstance(data, Mapping) else list(data)
    rows = []
    for item in items:
        row = jsonable(item)
        if not isinstance(row, dict) or "id" not in row:
            raise ManifestError(
                f"each data entry needs at least an 'id' (and revision, split, n_rows): {item!r}"
            )
        rows.append(
            {**{k: row.get(k) for k in DATA_KEYS}, **{k: v for k, v in row.items() if k not in DATA_KEYS}}
        )
    return rows


def library_versions() -> dict[str, str | None]:
    """Versions of python and the training stack (None for a library that is not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _fingerprint(tokenizer: Any) -> dict[str, Any]:
    if isinstance(tokenizer, Mapping):
        if "tokenizer_hash" not in tokenizer or "chat_template_hash" not in tokenizer:
            raise ManifestError("a fingerprint mapping needs 'tokenizer_hash' and 'chat_template_hash'")
        return dict(tokenizer)
    return template_fingerprint(tokenizer)


def _parent_entry(parent: str | os.PathLike) -> dict[str, Any]:
    folder = Path(parent).expanduser()
    if folder.is_dir():
        manifest = read_manifest(folder)
        return {
            "path": str(folder.resolve()),
            "stage": manifest.get("stage"),
            "tokenizer_hash": manifest["tokenizer"].get("tokenizer_hash"),
            "chat_template_hash": manifest["tokenizer"].get("chat_template_hash"),
            "created_at": manifest.get("created_at"),
        }
    # A Hub id or 'bundled'/'tiny': a starting model from outside the kit, with no manifest to compare.
    return {"path": str(parent), "stage": None, "tokenizer_hash": None, "chat_template_hash": None}


def write_manifest(
    checkpoint_dir: str | os.PathLike,
    *,
    stage: str,
    recipe: Any,
    data: Any,
    tokenizer: Any,
    seed: int,
    parent: str | os.PathLike | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``checkpoint_dir/manifest.json`` (atomically) and return what was written.

    ``recipe``: a dataclass or a mapping. ``data``: dicts with ``id``, ``revision``, ``split``, ``n_rows``.
    ``tokenizer``: the stage's tokenizer or its fingerprint. ``parent``: the checkpoint folder the stage
    started from (its hashes are copied), or a Hub id / ``"bundled"`` / ``"tiny"``. ``extra``: metrics.
    """
    from . import __version__

    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "kit_version": __version__,
        "stage": stage,
        "recipe": _recipe_dict(recipe),
        "data": _data_rows(data),
        "tokenizer": jsonable(_fingerprint(tokenizer)),
        "libraries": library_versions(),
        "seed": seed if seed is None else int(seed),
        "parent": _parent_entry(parent) if parent is not None else None,
        "extra": jsonable(dict(extra)) if extra else {},
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_open(Path(checkpoint_dir) / MANIFEST_NAME) as fh:
        json.dump(manifest, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
    return manifest


def read_manifest(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a checkpoint folder (or of a manifest.json path); ManifestError naming the path
    when it is missing, not JSON, or lacks required keys."""
    path = Path(checkpoint_dir).expanduser()
    if path.is_dir() or path.name != MANIFEST_NAME:
        path = path / MANIFEST_NAME
    made_by = (
        "Every kit stage writes one beside its checkpoint (smoltulu_utils.manifest.write_manifest); "
        "a folder without it was not produced by the kit, or its run did not finish."
    )
    if not path.is_file():
        raise ManifestError(f"No manifest at {path}. {made_by}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(
            f"The manifest {path} cannot be read ({exc}). {made_by} Re-run the stage."
        ) from exc
    missing = [k for k in _REQUIRED if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise ManifestError(f"The manifest {path} lacks {missing}. {made_by} Re-run the stage.")
    return manifest


def check_parent(parent_dir: str | os.PathLike, tokenizer: Any) -> dict[str, Any]:
    """The parent checkpoint's manifest if it was trained with this tokenizer and chat template, else
    :class:`ManifestError` naming both hashes and the fix."""
    manifest = read_manifest(parent_dir)
    ours = _fingerprint(tokenizer)
    theirs = manifest.get("tokenizer") or {}
    different = [
        f"{key}: parent {theirs.get(key)} vs given {ours.get(key)}"
        for key in ("tokenizer_hash", "chat_template_hash")
        if theirs.get(key) != ours.get(key)
    ]
    if different:
        raise ManifestError(
            f"The parent checkpoint {parent_dir} (stage {manifest.get('stage')!r}) was trained with another "
            "tokenizer or chat template than the one given:\n  "
            + "\n  ".join(different)
            + f"\nFix: load the tokenizer from the parent (load_tokenizer({str(parent_dir)!r})) so this stage "
            "keeps its vocabulary and template, or start from a parent trained with this tokenizer."
        )
    return manifest
