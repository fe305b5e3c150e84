"""Which code made a run: versions, the package's source digest and, in a git checkout, its commit.

Every `metrics.json` carries this block (`report.write_report`), so two runs' figures can be told apart by the
code that produced them: a source digest that differs means different code, whatever the version string says
(an editable install, a `git archive` copy or a patched site-packages all keep `__version__`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import platform
import subprocess
from pathlib import Path
from typing import Any

#: Files of the package and of its shipped configs that make up the source digest.
SOURCE_SUFFIXES = (".py", ".yaml", ".yml", ".json", ".csv")


def source_digest(*roots: str | Path) -> str:
    """SHA-256 over the relative path and bytes of every source file under `roots` (sorted; caches skipped).

    Args:
        roots: Folders to hash (a missing one counts as empty).

    Returns:
        The hex digest.
    """
    digest = hashlib.sha256()
    for index, root in enumerate(Path(r) for r in roots):
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES
                       and "__pycache__" not in p.parts) if root.is_dir() else []  # fmt: skip
        for path in files:
            digest.update(f"{index}:{path.relative_to(root).as_posix()}\0".encode())
            digest.update(path.read_bytes())
            digest.update(b"\0")
    return digest.hexdigest()


def git_commit(package_dir: str | Path) -> dict[str, Any] | None:
    """`{"commit", "dirty"}` of the git checkout whose top level holds `package_dir`, else None.

    Only a checkout of this project counts: the package folder must sit directly under the work tree's top
    level, so a virtual environment inside some other repository does not report that repository's commit.
    `dirty` is true when tracked files differ from the commit. None also when git is missing or fails.

    Args:
        package_dir: The installed package's folder (`ecg_inception/`).
    """
    package_dir = Path(package_dir).resolve()

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(package_dir), *args], capture_output=True, text=True, timeout=10,
                              check=True)  # fmt: skip
        return done.stdout.strip()

    try:
        top = Path(git("rev-parse", "--show-toplevel")).resolve()
        if package_dir.parent != top:
            return None
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


@functools.lru_cache(maxsize=1)
def software() -> dict[str, Any]:
    """Versions of Python and the main libraries, the package's source digest and git commit (once per process).

    Returns:
        A JSON-ready dict: `ecg_inception`, `source_sha256`, `git` (or None), `python`, `torch`, `timm`,
        `lightning`, `torchmetrics`, `hydra`.
    """
    import hydra
    import lightning
    import timm
    import torch
    import torchmetrics

    from ecg_inception import __version__

    package_dir = Path(__file__).resolve().parents[1]
    conf = importlib.util.find_spec("ecg_inception.conf")
    conf_dir = Path(conf.origin).parent if conf is not None and conf.origin else None
    roots = [package_dir] if conf_dir is None or conf_dir.is_relative_to(package_dir) else [package_dir, conf_dir]
    return {
        "ecg_inception": __version__,
        "source_sha256": source_digest(*roots),
        "git": git_commit(package_dir),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "lightning": lightning.__version__,
        "torchmetrics": torchmetrics.__version__,
        "hydra": hydra.__version__,
    }
