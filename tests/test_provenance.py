"""Which code made a run: the `software` block of metrics.json (core/provenance.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import ecg_inception
from ecg_inception.core.provenance import git_commit, software, source_digest
from ecg_inception.report import write_report

PACKAGE = Path(ecg_inception.__file__).resolve().parent


def test_source_digest_changes_with_a_byte_a_name_or_a_file_and_ignores_caches(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "a.py").write_text("x = 1\n")
    (root / "sub" / "b.yaml").write_text("k: v\n")
    first = source_digest(root)
    assert source_digest(root) == first
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "a.cpython-311.py").write_text("cache")
    (root / "notes.txt").write_text("not source")
    assert source_digest(root) == first
    (root / "a.py").write_text("x = 2\n")
    changed = source_digest(root)
    assert changed != first
    (root / "a.py").rename(root / "c.py")
    assert source_digest(root) not in {first, changed}
    (root / "c.py").rename(root / "a.py")
    assert source_digest(root) == changed
    (root / "sub" / "new.py").write_text("")
    assert source_digest(root) != changed
    # A missing root adds nothing; the same files under two roots are not those files under one.
    assert source_digest(root / "sub", tmp_path / "missing") == source_digest(root / "sub")
    one, a, b = tmp_path / "one", tmp_path / "a", tmp_path / "b"
    for folder, names in ((one, ["x.py", "y.py"]), (a, ["x.py"]), (b, ["y.py"])):
        folder.mkdir()
        for name in names:
            (folder / name).write_text(name)
    assert source_digest(a, b) != source_digest(one)


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_git_commit_only_for_a_checkout_of_this_project(tmp_path: Path) -> None:
    def git(*args: str, cwd: Path) -> str:
        return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()

    repo = tmp_path / "repo"
    (repo / "ecg_inception").mkdir(parents=True)
    (repo / "ecg_inception" / "__init__.py").write_text("")
    git("init", "-q", cwd=repo)
    git("add", "-A", cwd=repo)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init", cwd=repo)
    head = git("rev-parse", "HEAD", cwd=repo)
    assert git_commit(repo / "ecg_inception") == {"commit": head, "dirty": False}
    (repo / "ecg_inception" / "__init__.py").write_text("x = 1\n")
    assert git_commit(repo / "ecg_inception") == {"commit": head, "dirty": True}
    # A package installed deeper inside some other repository (a venv in a user's project) is not that commit.
    nested = repo / "venv" / "site-packages" / "ecg_inception"
    nested.mkdir(parents=True)
    assert git_commit(nested) is None
    # Outside any repository.
    plain = tmp_path / "plain" / "ecg_inception"
    plain.mkdir(parents=True)
    assert git_commit(plain) is None


def test_metrics_json_records_the_software(tmp_path: Path) -> None:
    written = write_report(tmp_path, {"status": "ok", "labels": ["a"]}, plots=False)
    saved = json.loads(written["metrics"].read_text())
    block = saved["software"]
    assert block == software()
    assert block["ecg_inception"] == ecg_inception.__version__ and block["torch"] == torch.__version__
    assert block["source_sha256"] == source_digest(*_roots())
    # A block already there (an evaluation copying its checkpoint's) is kept.
    kept = write_report(tmp_path / "b", {"status": "ok", "software": {"ecg_inception": "x"}}, plots=False)
    assert json.loads(kept["metrics"].read_text())["software"] == {"ecg_inception": "x"}


def _roots() -> list[Path]:
    import ecg_inception.conf as conf

    conf_dir = Path(conf.__file__).resolve().parent
    return [PACKAGE] if conf_dir.is_relative_to(PACKAGE) else [PACKAGE, conf_dir]


@pytest.mark.parametrize("entry", ["train", "evaluate"])
def test_runs_record_the_code_as_they_start(entry: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The digest used to be taken when metrics.json was written, at the end: a run whose package files changed
    while it trained (an edit in a checkout) recorded the edited code. Now train() and evaluate() take it first."""
    from conftest import compose_cfg

    import ecg_inception.training as training

    class Started(Exception):
        pass

    def first(*args, **kwargs):
        raise Started

    monkeypatch.setattr(training, "software", first)
    monkeypatch.setattr(training, "check_output_dir", lambda *a, **k: (_ for _ in ()).throw(AssertionError("too late")))
    cfg = compose_cfg("train" if entry == "train" else "eval",
                      [f"paths.output_dir={tmp_path}"] + (["ckpt_path=x.ckpt"] if entry == "evaluate" else []))
    with pytest.raises(Started):
        getattr(training, entry)(cfg)
