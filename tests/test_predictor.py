"""Predictor: parity with trainer.test, records, inputs of every kind, OOD flags, TTA, refused checkpoints."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ecg_inception.core.cpus import usable_cpus
from ecg_inception.errors import CheckpointError, UnreadableImageError
from ecg_inception.inference import Predictor
from ecg_inception.inference.inputs import PageDataset, expand_inputs
from ecg_inception.inference.tta import shift_image, tta_views


@pytest.fixture(scope="module")
def predictor(tiny_run: dict, one_thread) -> Predictor:
    return Predictor.from_checkpoint(tiny_run["ckpt"], device="cpu", batch_size=2, num_workers=0)


def _test_files(tiny_run: dict) -> list[Path]:
    dm = tiny_run["objects"]["datamodule"]
    return [dm.dataset_root() / r.path for r in dm.manifest.split_rows("test")]


def _probs(records) -> torch.Tensor:
    return torch.tensor([[r.probabilities[k] for k in r.probabilities] for r in records], dtype=torch.float32)


def test_predictor_reproduces_what_trainer_test_saw(tiny_run: dict, predictor: Predictor) -> None:
    model = tiny_run["objects"]["model"]
    logits, targets = model.last_logits["test"]
    assert len(targets) == len(_test_files(tiny_run))
    assert predictor.temperature == model.temperature != 1.0  # the fitted temperature came with the checkpoint
    seen = (logits / model.temperature).softmax(dim=1)
    records = predictor.predict(_test_files(tiny_run))
    assert all(r.ok for r in records)
    # Same batch size (2) and order as the test loader: bit for bit.
    assert torch.equal(_probs(records), seen)
    # Another batch size: within 1e-6, same argmax.
    single = Predictor.from_checkpoint(tiny_run["ckpt"], device="cpu", batch_size=1, num_workers=0)
    other = _probs(single.predict(_test_files(tiny_run)))
    assert torch.allclose(other, seen, atol=1e-6, rtol=0)
    assert torch.equal(other.argmax(dim=1), seen.argmax(dim=1))


def test_preprocess_is_the_training_datasets_input(tiny_run: dict, predictor: Predictor) -> None:
    dataset = tiny_run["objects"]["datamodule"].dataset("test")
    expected = torch.stack([dataset[i][0] for i in range(len(dataset))])
    assert torch.equal(predictor.preprocess(_test_files(tiny_run)), expected)


def test_records_fields_and_probabilities_sum_to_one(tiny_run: dict, predictor: Predictor) -> None:
    records = predictor.predict(_test_files(tiny_run)[:3])
    for r in records:
        assert list(r.probabilities) == predictor.labels == tiny_run["metrics"]["labels"]
        assert sum(r.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert r.label == max(r.probabilities, key=r.probabilities.get)
        assert r.crop_fallback is False and len(r.crop_box) == 4 and r.error is None
        assert r.low_confidence == (r.confidence < predictor.low_confidence)


def test_folders_pil_images_and_tensors_give_the_same_records(tiny_run: dict, predictor: Predictor,
                                                             tmp_path: Path) -> None:
    files = _test_files(tiny_run)[:2]
    nested = tmp_path / "in" / "deeper"
    nested.mkdir(parents=True)
    for i, f in enumerate(files):
        (nested / f"page{i}.jpg").write_bytes(f.read_bytes())
    (nested / "notes.txt").write_text("not an image")
    (tmp_path / "in" / ".hidden").mkdir()
    (tmp_path / "in" / ".hidden" / "x.jpg").write_bytes(files[0].read_bytes())
    by_path = predictor.predict(files)
    expanded = expand_inputs([tmp_path / "in"])
    assert [Path(i.name).name for i in expanded.items] == ["page0.jpg", "page1.jpg"]
    assert sorted(Path(s.rstrip("/")).name for s in expanded.skipped) == [".hidden", "notes.txt"]
    by_folder = predictor.predict(tmp_path / "in")
    images = [Image.open(f).convert("RGB") for f in files]
    by_pil = predictor.predict(images)
    by_tensor = predictor.predict([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in images])
    for records in (by_folder, by_pil, by_tensor):
        assert torch.equal(_probs(records), _probs(by_path))
        assert [r.crop_box for r in records] == [r.crop_box for r in by_path]
    assert [r.path for r in by_pil] == ["#0", "#1"]


def test_unreadable_inputs_get_error_records_and_the_rest_is_predicted(tiny_run: dict, predictor: Predictor,
                                                                      tmp_path: Path) -> None:
    good = _test_files(tiny_run)[0]
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(good.read_bytes()[:300])
    text = tmp_path / "readme.txt"
    text.write_text("hello")
    records = predictor.predict([good, corrupt, text, tmp_path / "missing.png", torch.zeros(3, 4, dtype=torch.float32)])
    assert [r.ok for r in records] == [True, False, False, False, False]
    assert "truncated" in records[1].error or "cannot decode" in records[1].error
    assert "not an image" in records[2].error and records[3].error == "no such file"
    assert "uint8" in records[4].error
    with pytest.raises(UnreadableImageError, match="corrupt.jpg"):
        predictor.preprocess([good, corrupt])


def test_blank_page_and_photo_like_image_are_flagged(predictor: Predictor) -> None:
    blank = Image.new("RGB", (1100, 780), (255, 255, 255))
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:600, 0:800]
    photo = np.stack([(xx / 800 * 200 + 30), (yy / 600 * 180 + 40), (xx + yy) / 1400 * 150 + 60], axis=-1)
    photo = np.clip(photo + rng.normal(0, 20, photo.shape), 0, 255).astype(np.uint8)
    records = predictor.predict([blank, Image.fromarray(photo)])
    assert all(r.ok and r.crop_fallback for r in records)
    strict = Predictor(predictor.forward, predictor.labels, predictor.preprocessing, batch_size=2, num_workers=0,
                       low_confidence=1.0)
    assert all(r.low_confidence for r in strict.predict([blank]))
    lax = Predictor(predictor.forward, predictor.labels, predictor.preprocessing, num_workers=0, low_confidence=0.0)
    assert not any(r.low_confidence for r in lax.predict([blank]))


def test_workers_give_the_same_records(tiny_run: dict, predictor: Predictor) -> None:
    files = _test_files(tiny_run)[:5]
    workers = Predictor.from_checkpoint(tiny_run["ckpt"], device="cpu", batch_size=2, num_workers=2)
    single = Predictor.from_checkpoint(tiny_run["ckpt"], device="cpu", batch_size=2, num_workers=0)
    assert torch.equal(_probs(workers.predict(files)), _probs(single.predict(files)))


def test_tta_never_changes_the_centre_view(tiny_run: dict, predictor: Predictor) -> None:
    files = _test_files(tiny_run)[:3]
    x = (torch.rand(2, 3, 20, 30) * 255).to(torch.uint8)
    views = tta_views(x)
    assert views.shape == (5, 2, 3, 20, 30) and torch.equal(views[0], x)
    moved = shift_image(x, 0, 2)
    assert torch.equal(moved[..., 2:], x[..., :-2]) and (moved[..., :2] == 255).all()
    tta = Predictor.from_checkpoint(tiny_run["ckpt"], device="cpu", batch_size=4, num_workers=0, tta=True)
    assert torch.equal(tta.preprocess(files), predictor.preprocess(files))
    records = tta.predict(files)
    for r in records:
        assert sum(r.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    # The average over views equals the mean of the per-view probabilities computed by hand.
    pages = _uint8_pages(tta, files)  # 3 files, batch 4: one batch
    with torch.inference_mode():
        by_hand = torch.stack([predictor.forward(predictor.normalize(v)) for v in tta_views(pages)]).mean(dim=0)
    assert torch.allclose(_probs(records), by_hand, atol=1e-6)


def _uint8_pages(predictor: Predictor, files: list[Path]) -> torch.Tensor:
    batch = next(iter(predictor.loader(expand_inputs(files))))
    return batch["images"]


def test_not_a_checkpoint_and_mismatched_labels_are_refused(tiny_run: dict, tmp_path: Path) -> None:
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.ckpt"):
        Predictor.from_checkpoint(junk, device="cpu")
    with pytest.raises(CheckpointError, match="no such file"):
        Predictor.from_checkpoint(tmp_path / "absent.ckpt", device="cpu")
    raw = torch.load(tiny_run["ckpt"], map_location="cpu", weights_only=True)
    three = dict(raw, hyper_parameters={**raw["hyper_parameters"], "labels": ["a", "b", "c"]})
    torch.save(three, tmp_path / "three_labels.ckpt")
    with pytest.raises(CheckpointError, match="three_labels.ckpt.*3 labels"):
        Predictor.from_checkpoint(tmp_path / "three_labels.ckpt", device="cpu")
    hp = {**raw["hyper_parameters"], "labels": ["a", "b", "c"], "num_classes": 3, "class_weights": None}
    torch.save(dict(raw, hyper_parameters=hp), tmp_path / "three_classes.ckpt")
    with pytest.raises(CheckpointError, match="three_classes.ckpt.*4-class"):
        Predictor.from_checkpoint(tmp_path / "three_classes.ckpt", device="cpu")


def test_unknown_preprocessing_version_and_bad_temperature_are_refused(tiny_run: dict, tmp_path: Path) -> None:
    raw = torch.load(tiny_run["ckpt"], map_location="cpu", weights_only=True)
    prep = {**raw["hyper_parameters"]["preprocessing"], "version": 99}
    torch.save(dict(raw, hyper_parameters={**raw["hyper_parameters"], "preprocessing": prep}), tmp_path / "v99.ckpt")
    with pytest.raises(CheckpointError, match="v99.ckpt.*preprocessing version 99"):
        Predictor.from_checkpoint(tmp_path / "v99.ckpt", device="cpu")
    torch.save(dict(raw, temperature=float("nan")), tmp_path / "nan.ckpt")
    with pytest.raises(CheckpointError, match="nan.ckpt.*temperature"):
        Predictor.from_checkpoint(tmp_path / "nan.ckpt", device="cpu")


def test_prep_threads_preprocess_a_batch_at_once_with_the_same_records(tiny_run: dict, predictor: Predictor,
                                                                       tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """With no worker, a batch's pages go to `prep_threads` threads; records (errors included) keep their
    order and equal the one-thread records bit for bit, and torch's thread count is restored."""
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    files = [*_test_files(tiny_run)[:2], corrupt, *_test_files(tiny_run)[2:5]]
    seen_threads: set[str] = set()
    item = PageDataset._item

    def spy(self, i):
        seen_threads.add(threading.current_thread().name)
        return item(self, i)

    monkeypatch.setattr(PageDataset, "_item", spy)
    one = Predictor(predictor.forward, predictor.labels, predictor.preprocessing, batch_size=3, num_workers=0,
                    prep_threads=1)
    expected = one.predict(files)
    assert seen_threads == {threading.main_thread().name}
    seen_threads.clear()
    threads = torch.get_num_threads()
    two = Predictor(predictor.forward, predictor.labels, predictor.preprocessing, batch_size=3, num_workers=0,
                    prep_threads=2)
    got = two.predict(files)
    assert torch.get_num_threads() == threads
    assert seen_threads and all(name.startswith("ecg-prep") for name in seen_threads)
    assert [r.path for r in got] == [r.path for r in expected] == [str(f) for f in files]
    assert [r.error for r in got] == [r.error for r in expected] and got[2].error
    ok = [i for i, r in enumerate(expected) if r.ok]
    assert torch.equal(_probs([got[i] for i in ok]), _probs([expected[i] for i in ok]))
    assert [r.crop_box for r in got] == [r.crop_box for r in expected]
    # The CPU default: no worker (they only compete with the model's threads), every CPU preprocessing.
    plain = Predictor(predictor.forward, predictor.labels, predictor.preprocessing, batch_size=1)
    assert plain.loader(expand_inputs(files)).num_workers == 0 and plain.prep_threads == usable_cpus()
    with pytest.raises(ValueError, match="prep_threads"):
        Predictor(predictor.forward, predictor.labels, predictor.preprocessing, prep_threads=0)
    with pytest.raises(ValueError, match="threads"):
        PageDataset([], predictor.preprocessing, threads=0)


def test_model_threads_apply_while_predicting_and_are_restored(tiny_run: dict) -> None:
    p = Predictor.from_checkpoint(tiny_run["ckpt"], device="cpu", batch_size=1, num_workers=1, model_threads=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seen = [torch.get_num_threads() for _ in p.iter_predict(expand_inputs(_test_files(tiny_run)[:2]))]
        assert seen == [2, 2] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="model_threads"):
        Predictor(p.forward, p.labels, p.preprocessing, model_threads=0)
