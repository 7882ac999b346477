"""The package's layers: no module imports one above its own layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "smoltulu_utils"

#: Each module's layer; a module may import its own layer and those below.
LAYERS = {
    0: "errors atomic paths serialize hardware scale_out packed_attention",
    1: "data_checks chat_template recipes results paper nltk_data models manifest data",
    2: "profiles lm_head verifiers preferences reference_cache memory training",
    3: "sft dpo reward_model rm_evaluation ppo rlvr rlvr_data grpo evaluation eval_tasks contamination languages",
    4: "stages sweep tables plotting notebooks launch cli __main__ __init__",
}
LAYER = {name: level for level, names in LAYERS.items() for name in names.split()}
#: Pairs kept apart within a layer: the figures do not run the sweep.
FORBIDDEN = {("plotting", "sweep")}


def package_imports(path: Path) -> set[str]:
    """The package modules ``path`` imports (relative imports, at any depth of the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return found


def modules() -> list[Path]:
    return sorted(PACKAGE.glob("*.py"))


def test_every_module_has_a_layer():
    missing = [p.stem for p in modules() if p.stem not in LAYER]
    assert not missing, f"place these modules in LAYERS: {missing}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: p.stem)
def test_no_module_imports_one_above_its_layer(path):
    upward = sorted(
        name
        for name in package_imports(path)
        if LAYER.get(name, -1) > LAYER[path.stem] or (path.stem, name) in FORBIDDEN
    )
    assert not upward, f"{path.stem} (layer {LAYER[path.stem]}) imports {upward}"


def test_the_check_sees_an_upward_import(tmp_path):
    fake = tmp_path / "results.py"
    fake.write_text("def f():\n    from .sweep import run_sweep\n")
    assert "sweep" in package_imports(fake) and LAYER["sweep"] > LAYER["results"]
