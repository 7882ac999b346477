"""The kit's error base class: every error the kit raises on bad input is a :class:`KitError`.

Each module keeps its own specific error (``RecipeError``, ``DataError``, ...) that also subclasses
the matching built-in (``ValueError``, ``OSError``), so callers may catch either; the command line
catches ``KitError`` and prints the message, which always names the problem and the fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class KitError(Exception):
    """Bad input or a missing resource, explained in the message (what is wrong and how to fix it)."""


class FileKeyError(KitError, ValueError):
    """A bad value in a YAML file: the message names the file, the key, the problem and the fix."""

    #: Shown in place of the file name when there is none (an in-memory recipe or grid).
    unnamed = "<file>"

    def __init__(self, file: object | None, key: str | None, problem: str, fix: str = ""):
        self.file = str(file) if file else self.unnamed
        self.key = key
        where = f"{self.file}: key '{key}'" if key else self.file
        super().__init__(f"{where}: {problem}" + (f" Fix: {fix}" if fix else ""))


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def did_you_mean(word: object, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` naming the closest of ``choices`` to ``word``, or "" when none is close."""
    hint = difflib.get_close_matches(str(word), list(choices), n=1)
    return f" (did you mean {hint[0]!r}?)" if hint else ""
