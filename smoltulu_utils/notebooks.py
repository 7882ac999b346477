"""Run the kit's notebooks in order with papermill, and check how they are stored.

``make reproduce`` and the notebook tests both go through :func:`run_notebook`, so a notebook
that passes its test is the notebook a reader runs. Notebooks live stripped in ``notebooks/``;
executed copies are build artefacts under ``build/notebooks/``.
"""

from __future__ import annotations

import ast
import json
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import KitError
from .paths import KIT_ROOT, NOTEBOOKS_DIR

#: Where executed notebooks go (git-ignored).
BUILD_DIR = KIT_ROOT / "build" / "notebooks"

#: The parameters a smoke run overrides; every notebook's ``parameters`` cell must define them.
SMOKE_OVERRIDES: Mapping[str, object] = {"PROFILE": "smoke"}


class NotebookError(KitError, RuntimeError):
    """A notebook is stored wrongly or failed to run."""


@dataclass(frozen=True)
class NotebookRun:
    """One executed notebook: where it came from, where the executed copy is, and how long it took."""

    source: Path
    output: Path
    seconds: float


#: A stage notebook's name: two digits, an optional letter (``00b`` runs after ``00``), ``_``, a name.
_STAGE_NAME = re.compile(r"^\d\d[a-z]?_.*\.ipynb$")


def ordered_notebooks(directory: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The stage notebooks (``NN_name.ipynb`` or ``NNx_name.ipynb``) in the order they are meant to run.

    Names sort as text, so ``00_setup`` < ``00b_data`` < ``01_...`` (``_`` sorts before letters).
    """
    found = Path(directory).glob("[0-9][0-9]*_*.ipynb")
    return sorted(p for p in found if _STAGE_NAME.match(p.name))


def _load(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def parameters_of(path: Path) -> dict[str, object]:
    """The names and literal values assigned in the notebook's single ``parameters`` cell."""
    cells = [c for c in _load(path)["cells"] if c["cell_type"] == "code"]
    cells = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise NotebookError(f"{path} has {len(cells)} cells tagged 'parameters'; it needs exactly one.")
    source = "".join(cells[0]["source"])
    values: dict[str, object] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError as exc:
                raise NotebookError(
                    f"{path}: parameter {node.targets[0].id} must be a literal (papermill overrides it)"
                ) from exc
    return values


def check_stored(path: Path, overrides: Iterable[str] = SMOKE_OVERRIDES) -> None:
    """Raise :class:`NotebookError` unless the notebook is stripped and its parameters cell is complete."""
    n = sum(len(c.get("outputs", [])) for c in _load(path)["cells"] if c["cell_type"] == "code")
    if n:
        raise NotebookError(f"{path} holds {n} outputs; store notebooks stripped (outputs cleared).")
    params = parameters_of(path)
    missing = [name for name in overrides if name not in params]
    if missing:
        raise NotebookError(f"{path}: the parameters cell lacks {missing}, which runs override.")


def run_notebook(
    path: Path,
    parameters: Mapping[str, object] | None = None,
    output_dir: Path = BUILD_DIR,
    progress_bar: bool = True,
) -> NotebookRun:
    """Execute one notebook with papermill into ``output_dir`` and return where it went."""
    import papermill

    path = Path(path)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    output = output_dir / path.name
    start = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(path),
            str(output),
            parameters=dict(parameters or {}),
            cwd=str(path.parent),
            progress_bar=progress_bar,
            kernel_name="python3",
        )
    except papermill.PapermillExecutionError as exc:
        raise NotebookError(
            f"{path.name} failed in cell {exc.exec_count}: {exc.ename}: {exc.evalue}\n"
            f"The executed copy with the traceback is {output}."
        ) from exc
    return NotebookRun(path, output, time.perf_counter() - start)


def reproduce(
    profile: str = "auto",
    only: Iterable[str] | None = None,
    output_dir: Path = BUILD_DIR,
) -> list[NotebookRun]:
    """Run every stage notebook in order in one profile; ``only`` keeps notebooks whose name starts so."""
    from .profiles import auto_profile_name, get_profile

    name = auto_profile_name() if profile == "auto" else profile
    try:
        get_profile(name)
    except ValueError as exc:
        raise NotebookError(str(exc)) from exc
    notebooks = ordered_notebooks()
    if only:
        prefixes = tuple(only)
        notebooks = [p for p in notebooks if p.name.startswith(prefixes)]
    if not notebooks:
        raise NotebookError("no notebooks matched; see notebooks/ for their names")
    print(f"Running {len(notebooks)} notebooks in profile '{name}' -> {output_dir}")
    runs = []
    for nb in notebooks:
        print(f"== {nb.name}")
        run = run_notebook(nb, {"PROFILE": name}, output_dir)
        print(f"   done in {run.seconds:.0f} s")
        runs.append(run)
    total = sum(r.seconds for r in runs)
    print(f"All {len(runs)} notebooks ran in {total:.0f} s. Executed copies: {output_dir}")
    return runs
