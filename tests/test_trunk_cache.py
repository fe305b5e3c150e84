"""Trunk cache: keys and rebuilds, corruption, concurrent jobs, parity with the uncached path, augmented views."""

from __future__ import annotations

import copy
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader

from ecg_inception.data.cache import file_sha256
from ecg_inception.data.datamodule import EcgDataModule
from ecg_inception.data.labels import label_for_folder, order_labels
from ecg_inception.data.manifest import Manifest, ManifestRow
from ecg_inception.errors import ManifestError
from ecg_inception.features import trunk_cache
from ecg_inception.features.trunk_cache import (
    CachedFeatureDataset,
    TrunkCachedDataModule,
    maybe_use_trunk_cache,
    use_trunk_cache,
)
from ecg_inception.features.trunk_views import PredrawnViewsDataModule, mirror_loader
from ecg_inception.models.freezing import apply_unfreeze
from ecg_inception.models.module import EcgClassifier
from ecg_inception.models.trunk import HEAD, POOLED, TrunkSplit

SIZE = 75  # the smallest input inception_v3 takes with aux logits off
FP16 = dict(rtol=2e-3, atol=2e-3)


def write_manifest(root: Path, out: Path) -> Path:
    """A fixed split without auditing: per class, half the files train, a quarter val, a quarter test, filled
    group by group in file order; byte copies stay together (a manifest with copies in two splits is refused
    under leakfree)."""
    rows = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        groups: dict[str, list[Path]] = {}
        for path in files:
            groups.setdefault(file_sha256(path), []).append(path)
        room = {"train": len(files) // 2, "val": len(files) // 4, "test": len(files) - len(files) // 2 - len(files) // 4}
        for sha, members in groups.items():
            split = next((s for s in ("train", "val", "test") if room[s] >= len(members)), "test")
            room[split] -= len(members)
            for path in members:
                rel = path.relative_to(root).as_posix()
                rows.append(ManifestRow(rel, label_for_folder(folder.name), rel, split, sha))
    return Manifest(rows, order_labels({r.label for r in rows}), "leakfree", 0).write_csv(out)


def make_dm(root: Path, manifest: Path, cache: Path, **kw) -> EcgDataModule:
    args = dict(root=str(root), split_manifest=str(manifest), image_size=SIZE, batch_size=4, num_workers=0,
                cache_dir=str(cache), crop=False, augment=False)
    dm = EcgDataModule(**{**args, **kw})
    dm.prepare_data()
    dm.setup("fit")
    return dm


def calibrated(model: torch.nn.Module, size: int = SIZE) -> torch.nn.Module:
    """Random init with BatchNorm statistics measured on noise, so activations stay in fp16 range."""
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    for bn in bns:
        bn.momentum = None
        bn.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(1)))
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


# One intra-op thread for this module (fixture in conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("trunk")
    return {"root": synthetic_root, "manifest": write_manifest(synthetic_root, base / "splits.csv"),
            "cache": base / "cache"}


@pytest.fixture(scope="module")
def dm(data: dict[str, Path]) -> EcgDataModule:
    return make_dm(data["root"], data["manifest"], data["cache"])


@pytest.fixture(scope="module")
def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return calibrated(timm.create_model("inception_v3", pretrained=False, num_classes=4))


def frozen(net: torch.nn.Module, **unfreeze) -> torch.nn.Module:
    model = copy.deepcopy(net)
    apply_unfreeze(model, **unfreeze)
    return model.eval()


# ----------------------------------------------------------------------------------------- trunk_cache.py
def images_of(dm: EcgDataModule, split: str) -> torch.Tensor:
    ds = dm.dataset(split)
    return torch.stack([ds[i][0] for i in range(len(ds))])


def test_hit_miss_and_every_key_part_rebuilds(
    dm: EcgDataModule, data: dict[str, Path], net: torch.nn.Module, tmp_path: Path
) -> None:
    root = tmp_path / "trunk"
    model = frozen(net, blocks=1)
    split = TrunkSplit(model, "Mixed_7b")

    def build(datamodule: EcgDataModule, s: TrunkSplit = split) -> tuple[bool, np.ndarray]:
        wrapper = TrunkCachedDataModule(datamodule, s, root=root)  # a fresh store: no in-process memo
        arrays = wrapper.entry("train")
        return wrapper.built["train"], np.array(arrays.features[0])

    built, first = build(dm)
    assert built and first.dtype == np.float16 and first.shape == (16, 2048, 1, 1)
    with torch.no_grad():
        expected = split.prefix(images_of(dm, "train")).features
    torch.testing.assert_close(torch.from_numpy(first).float(), expected, **FP16)
    built, again = build(dm)
    assert not built and np.array_equal(again, first)
    # file content (a re-split manifest with the new sha256), and a stale manifest is refused as uncached is
    copy_root = tmp_path / "data"
    shutil.copytree(data["root"], copy_root)
    stale_dm = make_dm(copy_root, write_manifest(copy_root, tmp_path / "old.csv"), data["cache"])
    assert build(stale_dm)[0] is False  # same content, same key
    victim = copy_root / dm.dataset("train").rows[0].path
    with Image.open(victim) as img:
        img.convert("RGB").rotate(1, fillcolor="white").save(victim)
    new_dm = make_dm(copy_root, write_manifest(copy_root, tmp_path / "new.csv"), data["cache"])
    built, features = build(new_dm)
    assert built and not np.array_equal(features[0], first[0]) and np.array_equal(features[1:], first[1:])
    with pytest.raises(ManifestError, match="differs from the manifest"):  # changed after its setup()
        build(stale_dm)
    # preprocessing
    assert build(make_dm(data["root"], data["manifest"], data["cache"], resize="letterbox"))[0]
    # boundary
    assert build(dm, TrunkSplit(model, "Mixed_6e"))[0]
    # weights of the prefix; the tail's weights are not part of the key
    with torch.no_grad():
        model.fc.weight.add_(1.0)
        assert build(dm) == (False, pytest.approx(first))
        model.Conv2d_1a_3x3.conv.weight.mul_(1.01)
    built, changed = build(dm)
    assert built and not np.array_equal(changed, first)


def test_fp16_overflow_is_stored_as_float32(dm: EcgDataModule, tmp_path: Path) -> None:
    torch.manual_seed(0)
    wild = timm.create_model("inception_v3", pretrained=False, num_classes=4).eval()  # no BN statistics: huge
    apply_unfreeze(wild, blocks=0)
    split = TrunkSplit(wild, HEAD)
    wrapper = TrunkCachedDataModule(dm, split, root=tmp_path)
    arrays = wrapper.entry("test")
    with torch.no_grad():
        expected = split.prefix(images_of(dm, "test")).features
    assert expected.abs().max() > 65504 and arrays.features.dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(np.array(arrays.features[0])), expected)
    assert wrapper.summary()["stored"] == {"test": "float32"}


def test_untouched_entries_skip_the_crc_changed_ones_do_not(
    dm: EcgDataModule, net: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    split = TrunkSplit(frozen(net, blocks=0), HEAD)
    path = TrunkCachedDataModule(dm, split, root=tmp_path).entry("val").path
    key = json.loads((path / "meta.json").read_text())["key"]
    read: list[str] = []
    real = trunk_cache._crc32
    monkeypatch.setattr(trunk_cache, "_crc32", lambda file: read.append(file.name) or real(file))
    assert trunk_cache.TrunkCacheStore(tmp_path).load(path, key) is not None and read == []  # a new job: stats only
    assert trunk_cache.TrunkCacheStore(tmp_path, full_check=True).load(path, key) is not None
    assert sorted(read) == ["features.npy", "labels.npy"]
    read.clear()
    os.utime(path / "features.npy", ns=(1, 1))  # rewritten, copied or touched: its CRC32 is checked again
    assert trunk_cache.TrunkCacheStore(tmp_path).load(path, key) is not None and read == ["features.npy"]


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "no_meta"])
def test_corrupt_entries_are_rebuilt_never_read(
    dm: EcgDataModule, net: torch.nn.Module, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    split = TrunkSplit(frozen(net, blocks=0), HEAD)
    wrapper = TrunkCachedDataModule(dm, split, root=tmp_path)
    good = np.array(wrapper.entry("val").features)
    entry = next(tmp_path.glob("val-*"))
    target = entry / "features.npy"
    if damage == "truncate":
        with open(target, "r+b") as fh:
            fh.truncate(target.stat().st_size - 10)
    elif damage == "bitflip":
        raw = bytearray(target.read_bytes())
        raw[len(raw) - 1000] ^= 0x10
        target.write_bytes(bytes(raw))
    else:
        (entry / "meta.json").unlink()
    with caplog.at_level(logging.WARNING):
        again = TrunkCachedDataModule(dm, split, root=tmp_path)
        rebuilt = np.array(again.entry("val").features)
    assert again.built["val"] and "rebuilding" in caplog.text
    assert np.array_equal(rebuilt, good) and len(list(tmp_path.glob("val-*"))) == 1
    assert not list(tmp_path.glob(".*tmp")) and not list(tmp_path.glob(".*stale"))


JOB = textwrap.dedent("""
    import json, sys, time, timm, torch
    from pathlib import Path
    from ecg_inception.data.datamodule import EcgDataModule
    from ecg_inception.features import trunk_cache
    from ecg_inception.models.freezing import apply_unfreeze
    from ecg_inception.models.trunk import HEAD, TrunkSplit
    root, manifest, cache, store, barrier = sys.argv[1:6]
    dm = EcgDataModule(root=root, split_manifest=manifest, image_size=75, batch_size=4, num_workers=0,
                       cache_dir=cache, crop=False, augment=False)
    dm.setup("fit")
    torch.manual_seed(0)
    model = timm.create_model("inception_v3", pretrained=False, num_classes=4).eval()
    apply_unfreeze(model, blocks=0)
    build = trunk_cache.build_entry
    def slow_build(*args, **kwargs):  # hold the lock long enough for the other job to queue on it
        time.sleep(1.0)
        return build(*args, **kwargs)
    trunk_cache.build_entry = slow_build
    Path(barrier, str(time.monotonic_ns())).touch()
    while len(list(Path(barrier).iterdir())) < 2:
        time.sleep(0.01)
    wrapper = trunk_cache.TrunkCachedDataModule(dm, TrunkSplit(model, HEAD), root=store)
    arrays = wrapper.entry("test")
    print(json.dumps({"built": wrapper.built["test"], "path": str(arrays.path),
                      "sum": float(arrays.features.astype("float64").sum())}))
""")


def test_two_concurrent_jobs_build_once_and_share(dm: EcgDataModule, data: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "barrier").mkdir()
    args = [sys.executable, "-c", JOB, str(data["root"]), str(data["manifest"]), str(data["cache"]),
            str(tmp_path / "store"), str(tmp_path / "barrier")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    jobs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]
    outs = []
    for job in jobs:
        out, err = job.communicate(timeout=240)
        assert job.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(o["built"] for o in outs) == [False, True]
    assert outs[0]["path"] == outs[1]["path"] and outs[0]["sum"] == outs[1]["sum"]
    assert len(list((tmp_path / "store").glob("test-*"))) == 1


# ------------------------------------------------------------------------------------ training parity
def fit_and_test(
    state: dict, loaders, cfg: dict | None, tmp_path: Path, dtype: str = "float16", round_fp16_at: str | None = None
) -> tuple[dict, EcgClassifier, object]:
    """Fit 2 epochs and test; `state` is the backbone's (same weights, same seed for every call).

    `round_fp16_at`: a stage whose output is rounded to float16 and back, as an fp16 trunk cache stores it.
    """
    pl.seed_everything(7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = EcgClassifier(pretrained=False, aux_logits=False, unfreeze={"blocks": 1}, drop_rate=0.5,
                              labels=loaders.labels, optimizer={"name": "sgd", "lr": 1e-3})
        model.backbone.load_state_dict(state)
        if round_fp16_at:
            getattr(model.backbone, round_fp16_at).register_forward_hook(lambda m, i, out: out.half().float())
        data = use_trunk_cache(model, loaders, **cfg, cache_dir=tmp_path / "trunk", dtype=dtype) if cfg else loaders
        trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu",
                             default_root_dir=tmp_path)
        trainer.fit(model, datamodule=data)
        trainer.test(model, datamodule=data, verbose=False)
        probs = torch.cat(trainer.predict(model, datamodule=data))
    return {**model.last_reports["test"], "probs": probs}, model, data


def test_cached_training_matches_uncached(dm: EcgDataModule, net: torch.nn.Module, tmp_path: Path) -> None:
    state = dict(net.state_dict())
    state["fc.weight"] = state["fc.weight"] * 0.05  # a calmer random head: a loss of a few nats, not hundreds
    # The reference for an fp16 cache is the uncached run with the same rounding at the cut: compared with plain
    # fp32, two epochs of training amplify the fp16 rounding of the features (0.5% of the final loss here).
    plain = {"float32": fit_and_test(state, dm, None, tmp_path)[0],
             "float16": fit_and_test(state, dm, None, tmp_path, round_fp16_at="Mixed_7b")[0]}
    # conv rounding differs with batch size; float32: 1.6e-4 of the loss measured on the leak-free fixed split
    for dtype, tol in (("float32", 3e-4), ("float16", 1e-3)):
        reference = plain[dtype]
        cached, model, data = fit_and_test(state, dm, {"mode": "auto"}, tmp_path, dtype)
        assert isinstance(data, TrunkCachedDataModule) and model.trunk_split.boundary == "Mixed_7b"
        summary = data.summary()
        assert summary["built"] == {"train": True, "val": True, "test": True} and summary["stored"]["train"] == dtype
        assert summary["dtype"] == dtype and summary["tail_starts_at"] == "Mixed_7c"
        assert cached["loss"] == pytest.approx(reference["loss"], rel=tol, abs=tol), dtype
        assert cached["confusion_matrix"] == reference["confusion_matrix"]
        assert cached["accuracy"] == reference["accuracy"]
        torch.testing.assert_close(cached["probs"], reference["probs"], rtol=tol, atol=tol)  # predict reuses it too


def test_views_with_augmentation_and_rng_untouched(
    data: dict[str, Path], net: torch.nn.Module, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    aug = make_dm(data["root"], data["manifest"], data["cache"], augment=True)
    ds = aug.dataset("train")
    before = torch.get_rng_state()
    ds.augment(ds.load_uint8(0))
    assert not torch.equal(before, torch.get_rng_state())  # augmentation draws from the global RNG...
    model = EcgClassifier(pretrained=False, aux_logits=False, unfreeze={"blocks": 0})
    model.backbone.load_state_dict(net.state_dict())
    model.eval()
    with caplog.at_level(logging.INFO):
        assert use_trunk_cache(model, aug, "auto") is aug
    assert "trunk_cache_views is not set" in caplog.text
    with caplog.at_level(logging.WARNING):
        wrapper = use_trunk_cache(model, aug, "on", views=2, cache_dir=tmp_path)
    assert "2 PRE-DRAWN AUGMENTED VIEWS" in caplog.text
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    cached = wrapper.train_dataloader()  # builds 16 images x 2 views
    after = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    assert torch.equal(states[0], after[0]) and np.array_equal(states[1], after[1]) and states[2] == after[2]
    assert wrapper.built["train"] and wrapper.entry("train").features.shape[:2] == (2, 16)
    uncached = PredrawnViewsDataModule(aug, views=2).train_dataloader()
    plain = aug.train_dataloader()
    arrays = wrapper.entry("train")
    in_order = mirror_loader(DataLoader(ds, batch_size=4), CachedFeatureDataset(arrays, POOLED), 2, num_workers=0)
    for epoch in range(3):  # epoch e: view e % 2, in the wrapped loader's shuffle order
        for loader in (cached, uncached, in_order):
            loader.sampler.set_epoch(epoch)
        assert np.array_equal(next(iter(in_order))[0].features.numpy(), arrays.features[epoch % 2, :4])
        _, y_p = next(iter(plain))  # fresh augmentation: draws from the global RNG (num_workers=0)
        states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
        (feats, y_c), (imgs, y_u) = next(iter(cached)), next(iter(uncached))  # pre-drawn views do not
        after = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
        assert torch.equal(states[0], after[0]) and np.array_equal(states[1], after[1]) and states[2] == after[2]
        assert torch.equal(y_c, y_u) and torch.equal(y_c, y_p)
        with torch.no_grad():
            expected = model.trunk_split.prefix(imgs).features
        torch.testing.assert_close(feats.features.float(), expected, **FP16)
        views = wrapper.entry("train").features
        assert not np.array_equal(np.array(views[0]), np.array(views[1]))
    assert len(cached) == len(plain) and cached.drop_last == plain.drop_last


def _corrupt_keeping_stamp(file: Path) -> None:
    """Flip one byte in place (same inode and size) and restore the mtime: a `stat` check cannot see it."""
    st = file.stat()
    with open(file, "r+b") as fh:
        fh.seek(st.st_size - 1000)
        byte = fh.read(1)
        fh.seek(st.st_size - 1000)
        fh.write(bytes([byte[0] ^ 0x10]))
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file.stat().st_mtime_ns == st.st_mtime_ns and file.stat().st_ino == st.st_ino


LOAD_JOB = textwrap.dedent("""
    import sys
    from pathlib import Path
    from ecg_inception.features.trunk_cache import TrunkCacheStore
    store, entry, key = sys.argv[1:4]
    print("hit" if TrunkCacheStore(store).load(Path(entry), key) is not None else "miss")
""")


def test_stamp_restored_corruption_is_caught_by_a_new_process_and_by_full(
    dm: EcgDataModule, net: torch.nn.Module, tmp_path: Path
) -> None:
    split = TrunkSplit(frozen(net, blocks=0), HEAD)
    path = TrunkCachedDataModule(dm, split, root=tmp_path).entry("val").path
    key = json.loads((path / "meta.json").read_text())["key"]
    _corrupt_keeping_stamp(path / "features.npy")
    # Another job (a new process) verifies every entry fully once: the restored stamp does not fool it.
    out = subprocess.run([sys.executable, "-c", LOAD_JOB, str(tmp_path), str(path), key],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "miss", out.stdout + out.stderr
    # verify=full checks the CRC32 on every load, also in the process that verified the entry before.
    assert trunk_cache.TrunkCacheStore(tmp_path, verify="full").load(path, key) is None
    assert trunk_cache.TrunkCacheStore(tmp_path, verify="stat").load(path, key) is not None  # documented limit
    with pytest.raises(ValueError, match="trunk_cache_verify"):
        trunk_cache.TrunkCacheStore(tmp_path, verify="sometimes")


def test_trunk_cache_verify_reaches_the_store(dm: EcgDataModule) -> None:
    model = EcgClassifier(pretrained=False, aux_logits=False, unfreeze={"blocks": 0}, trunk_cache="on",
                          trunk_cache_verify="full")  # fmt: skip
    assert model.hparams.trunk_cache_verify == "full"
    wrapped = use_trunk_cache(model, dm, "on", verify="full")
    assert isinstance(wrapped, TrunkCachedDataModule) and wrapped.store.verify == "full"
    # Without a value the model's hyper-parameter decides (e.g. a checkpoint's); the default is stat.
    assert use_trunk_cache(model, dm, "on").store.verify == "full"
    default = EcgClassifier(pretrained=False, aux_logits=False, unfreeze={"blocks": 0}, trunk_cache="on")
    assert use_trunk_cache(default, dm, "on").store.verify == "stat"
    # The deprecated config-reading form still works, and warns.
    with pytest.warns(DeprecationWarning, match="use_trunk_cache"):
        assert maybe_use_trunk_cache({"model": {"trunk_cache": "on", "trunk_cache_verify": "full"}}, default,
                                     dm).store.verify == "full"
    with pytest.raises(ValueError, match="trunk_cache_verify"):
        EcgClassifier(pretrained=False, aux_logits=False, trunk_cache_verify="never")


@pytest.mark.parametrize("old", ["trunk_cache", "trunk_views"])
def test_old_import_paths_warn_and_forward(old: str) -> None:
    import importlib

    shim, new = importlib.import_module(f"ecg_inception.models.{old}"), importlib.import_module(f"ecg_inception.features.{old}")
    name = "TrunkCachedDataModule" if old == "trunk_cache" else "DelegatingDataModule"
    with pytest.warns(DeprecationWarning, match=f"ecg_inception.features.{old}"):
        assert getattr(shim, name) is getattr(new, name)


@pytest.mark.parametrize(("unfreeze", "used"), [("head", True), ("all", False)])
def test_train_records_and_logs_the_trunk_cache_decision(
    synthetic_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, unfreeze: str, used: bool
) -> None:
    """`train()` logs why it did (head-only freeze, no augmentation) or did not (everything trains) serve the tail
    from the trunk cache, and metrics.json's `trunk_cache` key holds the cache's summary, or null."""
    from conftest import compose_cfg, tiny_overrides

    from ecg_inception.training import train

    # debug=default: one epoch without callbacks (no checkpoint, no early stopping).
    overrides = [*tiny_overrides(synthetic_root, tmp_path, debug="default"), f"model/unfreeze={unfreeze}",
                 "model.trunk_cache=auto", "data.augment=false", "model.calibrate=false", "plots=false"]  # fmt: skip
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="ecg_inception"):
        warnings.simplefilter("ignore")  # a frozen random trunk warns: intended here, as in the tests above
        metrics, _ = train(compose_cfg("train", overrides))
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "trunk_cache" in written and written["trunk_cache"] == metrics["trunk_cache"]
    decisions = [r.getMessage() for r in caplog.records if r.name == "ecg_inception.features.trunk_cache"]
    if used:
        summary = written["trunk_cache"]
        assert summary["boundary"] == HEAD and summary["views"] == 1 and summary["dtype"] == "float16"
        assert set(summary["stored"]) >= {"train", "val"} and all(summary["built"].values())
        assert any(m.startswith("trunk cache on: tail starts at") for m in decisions), decisions
    else:
        assert written["trunk_cache"] is None
        assert any(m.startswith("trunk cache off: the first stage") for m in decisions), decisions
