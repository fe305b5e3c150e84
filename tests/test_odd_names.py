"""File names that are not UTF-8: reported by name, never a UnicodeEncodeError, never a partial JSON file."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import compose_cfg, tiny_overrides

from ecg_inception.cli import audit as audit_cli
from ecg_inception.cli import split as split_cli
from ecg_inception.data.audit import write_json_atomic
from ecg_inception.data.manifest import excluded_path
from ecg_inception.data.scan import scan_folder
from ecg_inception.errors import DatasetError
from ecg_inception.training import train

SHOWN = "caf\\xe9.jpg"  # how the undecodable name b"caf\xe9.jpg" is reported


@pytest.fixture()
def odd_root(synthetic_root: Path, tmp_path: Path) -> Path:
    """The synthetic set with one image renamed to the Latin-1 bytes b"caf\\xe9.jpg" (not UTF-8)."""
    root = tmp_path / "odd"
    shutil.copytree(synthetic_root, root)
    folder = sorted(p for p in root.iterdir() if p.is_dir())[0]
    first = sorted(folder.iterdir())[0]
    os.rename(os.fsencode(first), os.fsencode(folder) + b"/caf\xe9.jpg")
    return root


def test_scan_reports_an_undecodable_name_as_unreadable(odd_root: Path) -> None:
    scan = scan_folder(odd_root)
    bad = [p for p in scan.unreadable if p.endswith(SHOWN)]
    assert len(bad) == 1 and "not valid UTF-8" in scan.unreadable[bad[0]]
    for name in [*scan.unreadable, *(im.rel_path for im in scan.images), *scan.ignored]:
        name.encode("utf-8")  # every name the scan hands on can be written as UTF-8


def test_an_undecodable_class_folder_is_named(synthetic_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "odd"
    shutil.copytree(synthetic_root, root)
    os.rename(os.fsencode(sorted(root.iterdir())[0]), os.fsencode(root) + b"/caf\xe9")
    with pytest.raises(DatasetError, match=r"caf\\xe9.*not valid UTF-8"):
        scan_folder(root)


def test_audit_cli_writes_json_naming_the_file(odd_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "audit.json"
    assert audit_cli.main([str(odd_root), "--json", str(out), "--workers", "1"]) == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    assert any(p.endswith(SHOWN) for p in data["unreadable"])
    assert SHOWN in capsys.readouterr().out


def test_json_is_written_atomically_and_losslessly(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    out.write_text('{"old": true}\n')
    with pytest.raises(TypeError):
        write_json_atomic(out, {"bad": object()})
    assert json.loads(out.read_text()) == {"old": True}  # the old file is untouched, no 0-byte file
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # and no temp file is left behind
    surrogate = os.fsdecode(b"caf\xe9.jpg")  # a name as os.listdir returns it
    write_json_atomic(out, {"path": surrogate})
    assert json.loads(out.read_text(encoding="utf-8")) == {"path": surrogate}


def test_split_cli_names_the_file_it_left_out(odd_root: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "splits.csv"
    assert split_cli.main([str(odd_root), "--out", str(out)]) == 0
    sidecar = excluded_path(out).read_text(encoding="utf-8")
    assert SHOWN in sidecar and "not valid UTF-8" in sidecar
    assert SHOWN not in out.read_text(encoding="utf-8")
    assert f"{SHOWN}: unreadable: file name is not valid UTF-8" in capsys.readouterr().out


def test_train_runs_on_a_folder_with_an_undecodable_name(odd_root: Path, tmp_path: Path, one_thread) -> None:
    cfg = compose_cfg("train", tiny_overrides(odd_root, tmp_path, debug="default"))  # one epoch, no callbacks
    metrics, _ = train(cfg)
    sidecar = excluded_path(Path(cfg.paths.output_dir) / "splits.csv").read_text(encoding="utf-8")
    assert SHOWN in sidecar
    assert metrics["test"] is not None
