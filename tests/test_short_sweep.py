"""Short sweeps pay for what a job needs, not for what the jobs before it already did (issue 14).

- the audit of an unchanged folder is made once per process (`data.audit`: memoised by the folder's listing and
  every file's stat stamp) and made again when a file is added, removed, rewritten or touched;
- a trunk-cache entry whose fp16 build overflows is stored as float32 without computing the overflowing batch
  again, and holds exactly what a float32 build holds;
- `plots: auto` draws in a single run and not in a multirun job;
- the jobs of an in-process sweep with the trunk cache give exactly the metrics the first job gave on a fresh
  audit, and the temperature written into the best checkpoint is the fitted one.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_cfg, load_checkpoint_file, tiny_overrides
from omegaconf import open_dict
from torch import nn
from torch.utils.data import Dataset

from ecg_inception.data import audit
from ecg_inception.data.audit import audit_folder, clear_audit_memo
from ecg_inception.errors import ConfigValueError
from ecg_inception.features.trunk_cache import build_entry
from ecg_inception.models.trunk import TrunkFeatures


def _age(root: Path, seconds: float = 3600.0) -> None:
    """Set every file's mtime well into the past (older than `audit.RACY_NS`), as a dataset on disk is."""
    past = time.time() - seconds
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, (past, past))


@pytest.fixture
def folder(synthetic_root: Path, tmp_path: Path) -> Path:
    """Two pages per class of the session's synthetic set, copied and aged."""
    out = tmp_path / "pages"
    for cls in sorted(p for p in synthetic_root.iterdir() if p.is_dir()):
        (out / cls.name).mkdir(parents=True)
        for page in sorted(cls.glob("*.jpg"))[:2]:
            shutil.copy(page, out / cls.name / page.name)
    _age(out)
    return out


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths the audit decodes (in this process: the tests audit with workers=1), on an empty memo."""
    calls: list[str] = []
    real = audit.inspect_image

    def counting(path: str, with_hash: bool = True):
        calls.append(path)
        return real(path, with_hash)

    monkeypatch.setattr(audit, "inspect_image", counting)
    clear_audit_memo()
    yield calls
    clear_audit_memo()


# ------------------------------------------------------------------------------------------------- audit
def test_an_unchanged_folder_is_audited_once_and_handed_out_as_copies(folder: Path, decodes: list[str]) -> None:
    first = audit_folder(folder, workers=1)
    assert len(decodes) == 8
    second = audit_folder(folder, workers=1)
    assert len(decodes) == 8  # nothing decoded again
    assert second is not first and second.to_json() == first.to_json()
    second.crops.clear()  # a caller's change stays its own
    assert audit_folder(folder, workers=1).to_json() == first.to_json()
    assert len(decodes) == 8


def _rewrite(folder: Path) -> None:
    a, b = sorted(folder.rglob("*.jpg"))[:2]
    a.write_bytes(b.read_bytes() + b"\0")  # other content (and size)


def _add(folder: Path) -> None:
    page = sorted(folder.rglob("*.jpg"))[0]
    shutil.copy(page, page.with_name("added.jpg"))


def _remove(folder: Path) -> None:
    sorted(folder.rglob("*.jpg"))[0].unlink()


def _touch(folder: Path) -> None:
    page = sorted(folder.rglob("*.jpg"))[0]
    past = time.time() - 600
    os.utime(page, (past, past))  # same bytes, another stamp: audited again (a stamp cannot tell)


@pytest.mark.parametrize("change", [_rewrite, _add, _remove, _touch], ids=["rewrite", "add", "remove", "touch"])
def test_a_changed_folder_is_audited_again(folder: Path, decodes: list[str], change) -> None:
    audit_folder(folder, workers=1)
    before = len(decodes)
    change(folder)
    again = audit_folder(folder, workers=1)
    assert len(decodes) > before
    assert again.to_json() == audit_folder(folder, workers=1, reuse=False).to_json()
    assert sorted(again.crops) == sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))


def test_files_written_just_now_are_not_kept_and_reuse_false_audits(folder: Path, decodes: list[str]) -> None:
    fresh = folder.parent / "fresh"
    shutil.copytree(folder, fresh, copy_function=shutil.copyfile)  # mtimes: now (racy)
    audit_folder(fresh, workers=1)
    audit_folder(fresh, workers=1)
    assert len(decodes) == 16
    audit_folder(folder, workers=1)
    audit_folder(folder, workers=1, reuse=False)
    assert len(decodes) == 32


# ---------------------------------------------------------------------------------------- trunk-cache build
class _Items(Dataset):
    """What build_entry reads (a ViewDataset's shape): 10 one-view items; items in `big` exceed fp16."""

    def __init__(self, big: set[int]) -> None:
        self.n, self.views, self.big = 10, 1, big
        self.targets = [i % 4 for i in range(self.n)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = torch.linspace(0.1, 1.3, 6) * (i + 1) / 3
        return (x * 1e6 if i in self.big else x), self.targets[i]


class _Split:
    """A TrunkSplit stand-in whose prefix is a fixed function of the batch; counts the batches it runs."""

    def __init__(self) -> None:
        self.model = nn.Linear(6, 6)
        self.batches = 0

    def prefix(self, x: torch.Tensor) -> TrunkFeatures:
        self.batches += 1
        return TrunkFeatures(torch.sin(x) * x, x[:, :2] * 3, "pooled")


def _arrays(out: Path) -> dict[str, np.ndarray]:
    return {name: np.load(out / f"{name}.npy") for name in ("features", "aux_input", "labels")}


@pytest.mark.parametrize("big", [{0}, {9}, {5, 9}], ids=["first-batch", "last-batch", "middle"])
def test_an_fp16_overflow_is_stored_as_float32_without_redoing_the_batch(tmp_path: Path, big: set[int]) -> None:
    split, reference = _Split(), _Split()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert build_entry(tmp_path / "a", split, _Items(big), "float16", batch_size=4) == "float32"
    assert build_entry(tmp_path / "b", reference, _Items(big), "float32", batch_size=4) == "float32"
    ours, theirs = _arrays(tmp_path / "a"), _arrays(tmp_path / "b")
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype and np.array_equal(ours[name], theirs[name]), name
    first = min(big) // 4  # batches of 4: only the batches before the overflowing one run twice
    assert split.batches == 3 + first and reference.batches == 3
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["aux_input.npy", "features.npy", "labels.npy"]


def test_an_entry_within_fp16_stays_fp16_and_float32_overflow_raises(tmp_path: Path) -> None:
    split = _Split()
    assert build_entry(tmp_path, split, _Items(set()), "float16", batch_size=4) == "float16"
    assert split.batches == 3 and _arrays(tmp_path)["features"].dtype == np.float16

    class Infinite(_Split):
        def prefix(self, x: torch.Tensor) -> TrunkFeatures:
            return TrunkFeatures(x * float("inf"), None, "pooled")

    (tmp_path / "inf").mkdir()
    with pytest.raises(OverflowError, match="float32"):
        build_entry(tmp_path / "inf", Infinite(), _Items(set()), "float16", batch_size=4)


# ------------------------------------------------------------------------------------------------- plots
def test_plots_auto_draws_in_a_single_run_only(monkeypatch: pytest.MonkeyPatch, cfg_train) -> None:
    from ecg_inception import training

    assert compose_cfg("train", []).plots == "auto"
    with open_dict(cfg_train):
        cfg_train.plots = "auto"
    assert training.plots_enabled(cfg_train) is True  # the compose API: a single run
    monkeypatch.setattr(training, "in_multirun", lambda: True)
    assert training.plots_enabled(cfg_train) is False
    cfg_train.plots = True
    assert training.plots_enabled(cfg_train) is True
    cfg_train.plots = "sometimes"
    with pytest.raises(ConfigValueError, match="plots"):
        training.plots_enabled(cfg_train)


# ------------------------------------------------------------------------------------- an in-process sweep
def _job(root: Path, tmp: Path, out: str):
    overrides = [
        *tiny_overrides(root, tmp, out=out),
        "model/unfreeze=head",
        "model.trunk_cache=on",
        "data.augment=false",
        "data.protocol=paper",
        "trainer.max_epochs=2",
        "plots=false",
    ]
    return compose_cfg("train", overrides)


def test_cached_jobs_of_a_sweep_share_the_audit_and_give_the_first_jobs_metrics(
    synthetic_root: Path, tmp_path: Path, decodes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from ecg_inception.training import train

    root = tmp_path / "data"
    shutil.copytree(synthetic_root, root)
    _age(root)
    monkeypatch.setattr(audit, "default_workers", lambda n: 1)  # decode in this process: `decodes` sees it
    first, _ = train(_job(root, tmp_path, "job0"))
    audited = len(decodes)
    assert audited > 0 and all(first["trunk_cache"]["built"].values())
    second, objects = train(_job(root, tmp_path, "job1"))
    assert len(decodes) == audited  # the second job reused the audit
    assert not any(second["trunk_cache"]["built"].values())
    for split in ("val", "test"):
        assert second[split] == first[split], split
    assert second["logged"] == first["logged"]
    assert (tmp_path / "job1" / "splits.csv").read_text() == (tmp_path / "job0" / "splits.csv").read_text()
    # The fitted temperature is the one written into the best checkpoint (read memory-mapped, rewritten).
    best = load_checkpoint_file(Path(second["best_checkpoint"]))
    assert best["temperature"] == objects["model"].temperature != 1.0
    clear_audit_memo()
    third, _ = train(_job(root, tmp_path, "job2"))  # a fresh audit: the same split and metrics
    assert len(decodes) == 2 * audited
    assert third["test"] == first["test"] and third["logged"] == first["logged"]

