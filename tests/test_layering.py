"""The house rule, checked: data flows one way and nothing lower imports anything higher (docs/design.md).

Every `import` / `from ... import` of the package (inside functions and `TYPE_CHECKING` blocks too) is read
with `ast`; a module may import its own floor or a lower one, never a higher one.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ecg_inception"

#: Floors, lowest first (the issue 11 clarifications): the neutral floor, data, synthetic (may import data),
#: models (may import data), the trunk-feature cache (may import models and data), inference, the training
#: layer (training, its run set-up, reports, callbacks, distributed and sweep helpers), the console scripts.
FLOORS: dict[str, float] = {
    "core": 0, "errors": 0,
    "data": 1,
    "synthetic": 1.5,
    "models": 2,
    "features": 2.5,
    "inference": 3,
    "training": 4, "run_setup": 4, "report": 4, "callbacks": 4, "distributed": 4, "sweep_summary": 4, "resume": 4,
    "cli": 5,
}  # fmt: skip
#: Modules exempt as importers: the package's lazy public API (`ecg_inception.EcgDataModule`, ...).
TOP = {"ecg_inception"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def floor(module: str) -> float | None:
    """The floor of a module of ours, None for the package itself (`from ecg_inception import __version__`)."""
    parts = module.split(".")
    if parts[0] != "ecg_inception" or len(parts) == 1:
        return None
    if parts[1] not in FLOORS:
        raise AssertionError(f"{module}: no floor in FLOORS; give the new room one (and a line in docs/design.md)")
    return FLOORS[parts[1]]


def imported(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `tree`, relative imports resolved."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((node.lineno, name))
    return sorted((line, name) for line, name in out if name == "ecg_inception" or name.startswith("ecg_inception."))


def upward_imports() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        if module in TOP:
            continue
        mine = floor(module)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, name in imported(tree, module, path.name == "__init__.py"):
            theirs = floor(name)
            if theirs is not None and theirs > mine:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({module}, floor {mine:g}) imports "
                             f"{name} (floor {theirs:g})")
    return found


def test_no_module_imports_a_higher_floor() -> None:
    assert upward_imports() == []


def test_every_room_has_a_floor() -> None:
    rooms = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").is_file())}
    assert rooms - set(FLOORS) == set()


def test_the_check_sees_an_upward_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The test can fail: a data module importing models (also inside a function, also relatively) is found."""
    package = tmp_path / "ecg_inception"
    (package / "data").mkdir(parents=True)
    (package / "models").mkdir()
    for init in (package, package / "data", package / "models"):
        (init / "__init__.py").write_text("")
    (package / "data" / "bad.py").write_text(
        "def f():\n    from ecg_inception.models.module import EcgClassifier\n"
        "from ..models import backbone\nimport ecg_inception.core.plain\n"
    )
    (package / "models" / "fine.py").write_text("from ecg_inception.data import labels\nfrom . import backbone\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    found = upward_imports()
    assert len(found) == 2 and all(f.startswith("ecg_inception/data/bad.py:") for f in found), found
    assert "imports ecg_inception.models.module" in found[0] and "imports ecg_inception.models" in found[1]
