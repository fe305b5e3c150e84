"""EcgDataModule on the synthetic fixture: shapes, label order, manifests, caches, seeding."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ecg_inception.data.datamodule import EcgDataModule, EcgImageDataset
from ecg_inception.data.labels import CANONICAL_LABELS, MENDELEY_FOLDERS
from ecg_inception.data.manifest import Manifest
from ecg_inception.data.scale import CANONICAL_PX_PER_MM
from ecg_inception.data.transforms import PREPROCESS_VERSION, resolve_data_config
from ecg_inception.errors import DatasetError, ManifestError
from ecg_inception.synthetic.default_set import ensure_synthetic_dataset

SIZE = 75  # the smallest input inception_v3 accepts; keeps decoding and resizing cheap


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def fitted(synthetic_root: Path, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> EcgDataModule:
    """One audited + split datamodule; other tests reuse its manifest instead of re-auditing."""
    out = tmp_path_factory.mktemp("run") / "splits.csv"
    dm = EcgDataModule(
        root=str(synthetic_root), image_size=SIZE, batch_size=4, num_workers=0, cache_dir=str(cache_dir),
        manifest_out=str(out),
    )  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _reuse(fitted: EcgDataModule, **kw) -> EcgDataModule:
    args = dict(
        root=fitted.root, split_manifest=fitted.manifest_out, image_size=SIZE, batch_size=4, num_workers=0,
        cache_dir=str(fitted.cache_root),
    )  # fmt: skip
    args.update(kw)
    return EcgDataModule(**args)


def test_loaders_shapes_labels_and_properties(fitted: EcgDataModule) -> None:
    assert fitted.labels == list(CANONICAL_LABELS) and fitted.num_classes == 4
    x, y = next(iter(fitted.train_dataloader()))
    assert x.shape == (4, 3, SIZE, SIZE) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0  # mean = std = 0.5 for inception_v3
    for loader in (fitted.val_dataloader(), fitted.test_dataloader(), fitted.predict_dataloader()):
        xb, yb = next(iter(loader))
        assert xb.shape[1:] == (3, SIZE, SIZE) and set(yb.tolist()) <= set(range(4))
    weights = fitted.class_weights
    assert weights is not None and len(weights) == 4 and sum(weights) / 4 == pytest.approx(1.0)
    assert fitted.preprocessing == {
        "model_name": "inception_v3", "size": SIZE, "mean": [0.5] * 3, "std": [0.5] * 3,
        "interpolation": "bicubic", "resize": "squash", "crop": True, "ink": False,
        "version": PREPROCESS_VERSION, "px_per_mm": CANONICAL_PX_PER_MM,
    }  # fmt: skip
    # leakfree: copies dropped, each class in every split
    m = fitted.manifest
    assert not m.leaky and len({r.sha256 for r in m.rows}) == len(m.rows)
    assert all(n >= 1 for counts in m.counts().values() for n in counts.values())


def test_manifest_written_and_reused_without_audit(
    fitted: EcgDataModule, monkeypatch, tmp_path: Path
) -> None:
    written = Path(fitted.manifest_out)
    assert written.is_file() and Manifest.read_csv(written).rows == fitted.manifest.rows

    def no_audit(*args, **kwargs):
        raise AssertionError("the datamodule must not re-audit when a manifest is given")

    monkeypatch.setattr("ecg_inception.data.audit.audit_folder", no_audit)
    again = _reuse(
        fitted, manifest_out=str(tmp_path / "copy.csv"), seed=123
    )  # seed must not change the split
    again.setup("fit")
    assert again.manifest.rows == fitted.manifest.rows
    assert (tmp_path / "copy.csv").read_bytes() == written.read_bytes()
    assert again.class_weights == fitted.class_weights


def test_decoded_cache_hit_on_second_pass(fitted: EcgDataModule) -> None:
    dm = _reuse(fitted)
    dm.setup("validate")
    n = len(dm.dataset("val"))
    before = dm.cache_stats()
    assert before is not None and before.lookups == 0
    for _ in range(2):
        for _batch in dm.val_dataloader():
            pass
    stats = dm.cache_stats()
    assert stats.lookups == 2 * n and stats.hits >= n  # the module fixture may already have filled the disk


def test_decoded_cache_off_and_workers(fitted: EcgDataModule) -> None:
    off = _reuse(fitted, decoded_cache=False)
    off.setup()
    assert off.cache_stats() is None
    x_off, _ = next(iter(off.val_dataloader()))
    on = _reuse(fitted, num_workers=1)
    assert on.persistent_workers
    x_on, _ = next(iter(on.val_dataloader()))
    assert torch.equal(x_off, x_on)  # the cache returns exactly what decoding gives
    assert on.cache_stats().lookups == len(x_on)  # counted inside the worker, visible here


def test_shuffle_reproducible_and_eval_leaves_global_rng_alone(fitted: EcgDataModule) -> None:
    a, b = _reuse(fitted, augment=False, drop_last=True), _reuse(fitted, augment=False)
    a.setup()
    b.setup()
    threads = torch.get_num_threads()
    ya = torch.cat([y for _, y in a.train_dataloader()])
    assert torch.get_num_threads() == threads  # items load on one thread, then the setting is restored
    yb = torch.cat([y for _, y in b.train_dataloader()])
    n = len(a.dataset("train"))
    assert len(yb) == n and len(ya) == n - n % 4  # drop_last on the train loader only
    assert torch.equal(ya, yb[: len(ya)])
    assert ya.tolist() != sorted(ya.tolist()) or n < 3  # shuffled
    state = torch.get_rng_state()
    for _ in b.val_dataloader():
        pass
    assert torch.equal(state, torch.get_rng_state())


def test_paper_protocol_defaults(fitted: EcgDataModule, tmp_path: Path) -> None:
    dm = EcgDataModule(
        root=fitted.root, protocol="paper", image_size=SIZE, batch_size=4, num_workers=0,
        cache_dir=str(fitted.cache_root), manifest_out=str(tmp_path / "paper.csv"),
    )  # fmt: skip
    assert dm.crop is False and dm.augment_kind == "paper"
    dm.setup("fit")
    assert dm.manifest.leaky and dm.class_weights is None
    counts = dm.manifest.counts()
    assert len({sum(counts[split][label] for split in counts) for label in dm.labels}) == 1  # balanced
    assert dm.preprocessing["crop"] is False
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (3, SIZE, SIZE)


def test_omegaconf_values_and_bad_arguments(fitted: EcgDataModule) -> None:
    cfg = OmegaConf.create({"fractions": [0.6, 0.2, 0.2], "batch_size": 2})
    dm = _reuse(fitted, fractions=cfg.fractions, batch_size=cfg.batch_size)
    assert dm.fractions == (0.6, 0.2, 0.2)
    with pytest.raises(ValueError, match="protocol"):
        EcgDataModule(protocol="random")
    with pytest.raises(ValueError, match="resize"):
        EcgDataModule(resize="stretch")
    with pytest.raises(ValueError, match="augment_kind"):
        EcgDataModule(augment_kind="flip")


def test_crop_needs_boxes_and_content_must_match(fitted: EcgDataModule, tmp_path: Path) -> None:
    rows = fitted.manifest.split_rows("val")[:1]
    no_box = [r.__class__(r.path, r.label, r.group, r.split, r.sha256) for r in rows]
    cfg = resolve_data_config("inception_v3", SIZE)
    with pytest.raises(ManifestError, match="no crop box"):
        EcgImageDataset(fitted.root, no_box, fitted.labels, cfg, crop=True)
    assert EcgImageDataset(fitted.root, no_box, fitted.labels, cfg, crop=False)[0][0].shape == (3, SIZE, SIZE)
    copy = tmp_path / rows[0].path
    copy.parent.mkdir(parents=True)
    shutil.copyfile(Path(fitted.root) / rows[0].path, copy)
    with copy.open("ab") as fh:
        fh.write(b"changed")
    with pytest.raises(ManifestError, match="differs from the manifest"):
        EcgImageDataset(tmp_path, rows, fitted.labels, cfg)[0]


def test_manifest_from_another_folder_fails_at_setup(fitted: EcgDataModule, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(fitted.root, other)
    with (other / fitted.manifest.rows[3].path).open("ab") as fh:
        fh.write(b"changed")
    with pytest.raises(ManifestError, match="1 file"):
        _reuse(fitted, root=str(other)).setup("fit")


def test_root_none_generates_synthetic_once(tmp_path: Path, monkeypatch) -> None:
    dm = EcgDataModule(
        synthetic_per_class=2, image_size=SIZE, batch_size=2, num_workers=0, cache_dir=str(tmp_path),
        augment=False, fractions=(0.5, 0.25, 0.25), make_default_root=ensure_synthetic_dataset,
    )  # fmt: skip
    dm.prepare_data()
    root = dm.dataset_root()
    assert root.parent == tmp_path / "synthetic" and root.is_dir()
    assert sorted(p.name for p in root.iterdir()) == sorted(MENDELEY_FOLDERS.values())
    assert not [p for p in root.parent.iterdir() if p.name.endswith(".tmp")]

    def no_generation(*args, **kwargs):
        raise AssertionError("the synthetic set must be generated once and reused")

    monkeypatch.setattr("ecg_inception.synthetic.generate.generate_dataset", no_generation)
    again = EcgDataModule(synthetic_per_class=2, image_size=SIZE, num_workers=0, cache_dir=str(tmp_path),
                          make_default_root=ensure_synthetic_dataset)
    again.prepare_data()
    assert again.dataset_root() == root
    dm.setup("fit")
    assert dm.num_classes == 4 and (tmp_path / "decoded").is_dir() is False  # nothing loaded yet
    next(iter(dm.val_dataloader()))
    assert (tmp_path / "decoded").is_dir()


def test_root_none_needs_a_default_root_maker(tmp_path: Path) -> None:
    """The data room does not import synthetic: without `make_default_root` a missing root is an error."""
    with pytest.raises(DatasetError, match="make_default_root"):
        EcgDataModule(cache_dir=str(tmp_path), num_workers=0).dataset_root()


def test_shipped_config_makes_the_synthetic_default(tmp_path: Path) -> None:
    from hydra.utils import instantiate

    from ecg_inception.core.compose import compose_config

    dm = instantiate(compose_config("train", ["data.synthetic_per_class=1"]).data, cache_dir=str(tmp_path))
    assert dm.make_default_root.func is ensure_synthetic_dataset


def test_old_synthetic_names_warn_and_forward() -> None:
    import ecg_inception.data.datamodule as datamodule

    with pytest.warns(DeprecationWarning, match="synthetic.default_set"):
        assert datamodule.ensure_synthetic_dataset is ensure_synthetic_dataset


def test_non_square_image_size_reaches_batches_cache_and_preprocessing(fitted: EcgDataModule) -> None:
    dm = _reuse(fitted, image_size=OmegaConf.create([SIZE, 2 * SIZE]), ink=True)  # as Hydra passes a list
    dm.setup("fit")
    assert dm.data_config.size == (SIZE, 2 * SIZE) and dm.preprocessing["size"] == [SIZE, 2 * SIZE]
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, SIZE, 2 * SIZE)
    assert dm.dataset("val").load_uint8(0).shape == (3, SIZE, 2 * SIZE)
    assert _reuse(fitted, image_size=[SIZE, SIZE]).preprocessing["size"] == SIZE  # a square stays an int
    with pytest.raises(ValueError, match=r"image_size.*\[75\]"):
        _reuse(fitted, image_size=[SIZE])


def test_ink_option_reaches_settings_images_and_preprocessing(fitted: EcgDataModule) -> None:
    dm = _reuse(fitted, ink=True)
    dm.setup("fit")
    assert dm.preprocessing["ink"] is True
    train = dm.dataset("train")
    assert all(s.ink for s in train.settings)
    img = train.load_uint8(0)
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])  # grey: the grid colour is gone
    plain = fitted.dataset("train").load_uint8(0)
    assert not torch.equal(img, plain)  # a different cache entry, not the plain image


def test_corrupt_decoded_entries_are_counted_and_logged(fitted: EcgDataModule, tmp_path: Path, caplog) -> None:
    import logging

    dm = _reuse(fitted, cache_dir=str(tmp_path))
    dm.setup("validate")
    for _batch in dm.val_dataloader():  # fill the disk cache
        pass
    entries = sorted((tmp_path / "decoded").rglob("*.u8"))
    assert len(entries) == len(dm.dataset("val"))
    for entry in entries[:2]:
        raw = bytearray(entry.read_bytes())
        raw[-1] ^= 0xFF
        entry.write_bytes(bytes(raw))
    again = _reuse(fitted, cache_dir=str(tmp_path))  # a new job: no memory layer
    again.setup("validate")
    with caplog.at_level(logging.WARNING, logger="ecg_inception"):
        for _batch in again.val_dataloader():
            pass
        again.teardown("validate")  # the Trainer calls it at the end of every fit/validate/test
        again.teardown("test")  # nothing new since: no second line
    lines = [r.getMessage() for r in caplog.records if "corrupt" in r.getMessage()]
    assert len(lines) == 1 and "2 corrupt entries" in lines[0] and "rebuilt" in lines[0], lines
    assert again.cache_stats().corrupt == 2


def test_eval_loaders_split_the_images_between_ranks_once(fitted: EcgDataModule, monkeypatch) -> None:
    """Under DDP each rank scores its own part of val/test, and together they score every image exactly once."""
    import ecg_inception.data.datamodule as datamodule

    dm = _reuse(fitted, batch_size=1)
    dm.setup()
    n = len(dm.dataset("test"))
    monkeypatch.setattr(datamodule, "distributed_world_size", lambda: 3)  # 3 does not divide the split: no padding
    seen = []
    for rank in range(3):
        monkeypatch.setattr(datamodule, "distributed_rank", lambda rank=rank: rank)
        seen.append(list(dm.test_dataloader().sampler))
    assert sorted(i for part in seen for i in part) == list(range(n))
    assert len({len(part) for part in seen}) == 2 and n % 3  # uneven parts rather than repeated images


def test_distributed_prepare_data_fills_the_decoded_cache(fitted: EcgDataModule, tmp_path: Path, monkeypatch) -> None:
    """Lightning runs prepare_data on rank 0 while the others wait: afterwards every image is a cache hit."""
    import ecg_inception.data.datamodule as datamodule

    dm = _reuse(fitted, cache_dir=str(tmp_path))
    monkeypatch.setattr(datamodule, "distributed_world_size", lambda: 2)
    dm.prepare_data()
    reader = _reuse(fitted, cache_dir=str(tmp_path))
    reader.setup()
    for split in ("train", "val", "test"):
        images = reader.dataset(split)
        for i in range(len(images)):
            images.load_uint8(i)
    stats = reader.cache_stats()
    assert stats is not None and stats.misses == 0 and stats.hits == stats.lookups > 0


def test_page_datasets_outside_data_scope_the_thread_count_like_ecg_image_dataset(monkeypatch) -> None:
    """PageDataset (prediction) and PtbxlPageDataset (pretraining) load an item on one torch thread and restore
    the process's count afterwards, through `core.cpus.torch_threads`, as EcgImageDataset does."""
    from types import SimpleNamespace

    import numpy as np
    from PIL import Image

    import ecg_inception.inference.inputs as inputs
    import ecg_inception.synthetic.ptbxl_pages as ptbxl_pages
    from ecg_inception.core.cpus import torch_threads
    from ecg_inception.inference.inputs import InputItem, PageDataset

    seen: list[int] = []

    def record(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return torch.zeros(3, 4, 4, dtype=torch.uint8), None

    monkeypatch.setattr(inputs, "preprocess_page", record)
    monkeypatch.setattr(ptbxl_pages, "render_item", lambda *a, **k: record()[0])
    pages = PageDataset([InputItem("#0", Image.new("RGB", (8, 8)))], {})
    data = SimpleNamespace(records=[SimpleNamespace(ecg_id=7)], fs=100.0, signals=lambda i: np.zeros((12, 10)))
    ptbxl = ptbxl_pages.PtbxlPageDataset(
        data, [0], np.zeros((1, 5), dtype=np.float32), {}, resolve_data_config("inception_v3", SIZE),
        ptbxl_pages.Look(), seed=0, fixed=True,
    )  # fmt: skip
    with torch_threads(2):
        assert pages[0]["error"] is None and ptbxl.load_uint8(0).shape == (3, 4, 4)
        assert seen == [1, 1] and torch.get_num_threads() == 2  # one thread per item, then restored
    with torch_threads(2):
        with pytest.raises(RuntimeError), torch_threads(3):
            raise RuntimeError("restored on error too")
        assert torch.get_num_threads() == 2


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"protocol": "random"}, "unknown protocol 'random'; expected one of leakfree, paper"),
    ({"fractions": [0.5, 0.5]}, "fractions must be 3 numbers >= 0 summing to 1 with train > 0, got [0.5, 0.5]"),
    ({"resize": "stretch"}, "unknown resize 'stretch'; expected one of squash, letterbox"),
    ({"augment_kind": "flip"}, "unknown augment_kind 'flip'; expected one of ecg, shift, paper, none"),
    ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
    ({"image_size": 1}, "image_size must be at least 8 pixels on each side, got 1"),
    ({"image_size": [1, 2, 3]}, "image_size must be an int or [height, width] of two ints, got [1, 2, 3]"),
    ({"mean": [1, 2]}, "mean must be 3 numbers (std > 0), got [1, 2]"),
    ({"std": [1, 0, 1]}, "std must be 3 numbers (std > 0), got [1, 0, 1]"),
    ({"preprocess_version": 1}, "unknown preprocess_version 1; expected one of 2, 3"),
])  # fmt: skip
def test_bad_constructor_values_are_config_value_errors(kwargs: dict, message: str) -> None:
    """The constructor's checks raise ConfigValueError (still a ValueError), with the message they always had."""
    from ecg_inception.errors import ConfigValueError

    with pytest.raises(ConfigValueError) as info:
        EcgDataModule(**kwargs)
    assert isinstance(info.value, ValueError) and str(info.value) == message


def test_constructor_steps_set_the_documented_attributes() -> None:
    """The constructor is a sequence of named steps; together they set what the one long body did."""
    dm = EcgDataModule(protocol="paper", seed="3", fractions=OmegaConf.create([0.6, 0.2, 0.2]), batch_size=7.0,
                       num_workers=2, image_size=OmegaConf.create([64, 128]), mean=[0.1, 0.2, 0.3], cache_dir="~/c",
                       interpolation="bilinear")  # fmt: skip
    assert (dm.protocol, dm.seed, dm.fractions, dm.crop, dm.augment_kind) == ("paper", 3, (0.6, 0.2, 0.2), False, "paper")
    assert (dm.batch_size, dm.num_workers, dm.persistent_workers, dm.drop_last) == (7, 2, True, False)
    assert dm.image_size == [64, 128] and dm.normalisation == {"mean": [0.1, 0.2, 0.3], "interpolation": "bilinear"}
    assert dm.cache_root == Path("~/c").expanduser() and dm.decoded_cache and dm.make_default_root is None
    assert dm._manifest is None and dm._datasets == {} and dm._train_generator is None  # nothing read or built
    assert EcgDataModule(crop=True, protocol="paper").crop is True and EcgDataModule().crop is True


def test_cli_prints_a_bad_data_value_alone_and_exits_2(synthetic_root: Path, tmp_path: Path) -> None:
    """`ecg-inception-train data.batch_size=0`: the datamodule's ConfigValueError is the last stderr line, no traceback."""
    import os
    import subprocess
    import sys

    from conftest import tiny_overrides

    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    args = [*tiny_overrides(synthetic_root, tmp_path), "data.batch_size=0"]
    proc = subprocess.run([sys.executable, "-m", "ecg_inception.cli.train", *args], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "ecg-inception-train: error: batch_size must be >= 1, got 0"
    assert "Traceback" not in proc.stderr
