"""Seed ensembles (`inference.ensemble`): the mean of the members' calibrated probabilities, and what is refused."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import DEV_ROOT, compose_cfg, run_benchmark

from ecg_inception.cli.predict import main
from ecg_inception.errors import EnsembleError
from ecg_inception.inference import Predictor


def _files(tiny_run: dict) -> list[Path]:
    dm = tiny_run["objects"]["datamodule"]
    return [dm.dataset_root() / r.path for r in dm.manifest.split_rows("test")][:4]


def _probs(records) -> torch.Tensor:
    return torch.tensor([[r.probabilities[k] for k in r.probabilities] for r in records], dtype=torch.float64)


def _variant(tiny_run: dict, path: Path, seed: int = 0, temperature: float | None = None, **hparams) -> Path:
    """A copy of the tiny checkpoint with another classifier head (and, if given, temperature or hparams)."""
    raw = torch.load(tiny_run["ckpt"], map_location="cpu", weights_only=True)
    state = dict(raw["state_dict"])
    gen = torch.Generator().manual_seed(seed)
    for key in ("backbone.fc.weight", "backbone.fc.bias"):
        state[key] = state[key] + torch.randn(state[key].shape, generator=gen) * state[key].std()
    out = dict(raw, state_dict=state, hyper_parameters={**raw["hyper_parameters"], **hparams})
    if temperature is not None:
        out["temperature"] = temperature
    torch.save(out, path)
    return path


@pytest.fixture(scope="module")
def second_member(tiny_run: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _variant(tiny_run, tmp_path_factory.mktemp("ensemble") / "member_b.ckpt", seed=1, temperature=2.5)


def test_ensemble_is_the_mean_of_its_members(tiny_run: dict, second_member: Path, one_thread) -> None:
    files = _files(tiny_run)
    kwargs = dict(device="cpu", batch_size=2, num_workers=0)
    a = _probs(Predictor.from_checkpoint(tiny_run["ckpt"], **kwargs).predict(files))
    b = _probs(Predictor.from_checkpoint(second_member, **kwargs).predict(files))
    assert not torch.allclose(a, b, atol=1e-3)  # two different models, each with its own temperature
    both = Predictor.from_checkpoints([tiny_run["ckpt"], second_member], **kwargs)
    records = both.predict(files)
    torch.testing.assert_close(_probs(records), (a + b) / 2, atol=1e-6, rtol=0)
    assert [r.label for r in records] == [both.labels[i] for i in ((a + b) / 2).argmax(1).tolist()]
    assert both.ensemble.temperatures == [pytest.approx(tiny_run["objects"]["model"].temperature), 2.5]
    assert both.model is None and str(second_member) in both.source
    one = Predictor.from_checkpoints([tiny_run["ckpt"]], **kwargs)
    torch.testing.assert_close(_probs(one.predict(files)), a, atol=1e-7, rtol=0)
    assert one.temperature == pytest.approx(tiny_run["objects"]["model"].temperature)
    with pytest.raises(ValueError, match="not an ensemble of 2"):
        both.explain(files[:1])


def test_members_that_cannot_be_averaged_are_refused(tiny_run: dict, tmp_path: Path) -> None:
    labels = list(tiny_run["metrics"]["labels"])
    renamed = _variant(tiny_run, tmp_path / "renamed.ckpt", labels=labels[::-1])
    with pytest.raises(EnsembleError, match="renamed.ckpt: labels .* share their labels in order"):
        Predictor.from_checkpoints([tiny_run["ckpt"], renamed], device="cpu")
    raw = torch.load(tiny_run["ckpt"], map_location="cpu", weights_only=True)
    prep = {**raw["hyper_parameters"]["preprocessing"], "interpolation": "bilinear"}
    other_prep = _variant(tiny_run, tmp_path / "bilinear.ckpt", preprocessing=prep)
    with pytest.raises(EnsembleError, match="bilinear.ckpt: preprocessing interpolation='bilinear' differs"):
        Predictor.from_checkpoints([tiny_run["ckpt"], other_prep], device="cpu")
    with pytest.raises(EnsembleError, match="given twice"):
        Predictor.from_checkpoints([tiny_run["ckpt"], Path(tiny_run["ckpt"]).parent / ".." / "checkpoints"
                                    / Path(tiny_run["ckpt"]).name], device="cpu")  # fmt: skip
    with pytest.raises(EnsembleError, match="at least one"):
        Predictor.from_checkpoints([], device="cpu")


def test_cli_member_flag(tiny_run: dict, second_member: Path, tmp_path: Path, capsys, one_thread) -> None:
    files = [str(f) for f in _files(tiny_run)]
    out = tmp_path / "preds.csv"
    args = ["--batch-size", "2", "--num-workers", "0", "--device", "cpu"]
    assert main([str(tiny_run["ckpt"]), *files, "--member", str(second_member), "--out", str(out), *args]) == 0
    labels = tiny_run["metrics"]["labels"]
    got = torch.tensor([[float(r[f"prob_{k}"]) for k in labels] for r in csv.DictReader(out.open())],
                       dtype=torch.float64)  # fmt: skip
    expected = _probs(Predictor.from_checkpoints([tiny_run["ckpt"], second_member], device="cpu", batch_size=2,
                                                 num_workers=0).predict(files))  # fmt: skip
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    capsys.readouterr()
    assert main([str(tiny_run["ckpt"]), *files, "--member", str(second_member), "--cam", str(tmp_path / "cam"),
                 *args]) == 2  # fmt: skip
    assert "not an ensemble of 2: drop --member" in capsys.readouterr().err
    assert main([str(tiny_run["ckpt"]), *files, "--member", str(tmp_path / "model.onnx"), *args]) == 2
    assert "model.onnx is an exported model" in capsys.readouterr().err


def test_bench_ensemble_puts_members_and_ensemble_side_by_side(tiny_run: dict, second_member: Path,
                                                               tmp_path: Path, one_thread) -> None:
    """`bench_ensemble.py`: one row per member and one for the ensemble, each the Predictor's own figure."""
    from ecg_inception.models.metrics import report_from_predictions

    dm = tiny_run["objects"]["datamodule"]
    out = tmp_path / "ensemble.json"
    proc = run_benchmark("bench_ensemble", "--ckpt", str(tiny_run["ckpt"]), str(second_member), "--root",
                         str(dm.dataset_root()), "--manifest", str(tiny_run["run"] / "splits.csv"), "--splits",
                         "test", "--limit", "2", "--json", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())["figures"]
    assert figures["models"] == ["member 1", "member 2", "ensemble"]
    rows = dm.manifest.split_rows("test")
    labels = list(tiny_run["metrics"]["labels"])
    target = torch.tensor([labels.index(r.label) for r in rows])
    for i, members in enumerate(([tiny_run["ckpt"]], [second_member], [tiny_run["ckpt"], second_member])):
        predictor = Predictor.from_checkpoints(members, device="cpu", num_workers=0)
        probs = _probs(predictor.predict([dm.dataset_root() / r.path for r in rows]))
        expected = report_from_predictions(probs, target, labels)
        assert figures["test"][i]["f1_macro"] == pytest.approx(expected["f1_macro"], abs=1e-6)
        assert figures["test"][i]["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-6)
        nll = float(-probs[torch.arange(len(target)), target].clamp_min(1e-12).log().mean())
        assert figures["test"][i]["loss"] == pytest.approx(nll, abs=1e-4)
    if "pairs" in figures:  # the dev set is present
        assert figures["pairs"]["n"] == 2 and len(figures["pairs"]["agreement"]) == 3
        assert all(0 <= a <= 2 for a in figures["pairs"]["agreement"])
        fullres = DEV_ROOT.parent / "mendeley-ecg-fullres-sample"
        originals = sorted(p for p in fullres.rglob("*.jpg") if (DEV_ROOT / p.relative_to(fullres)).is_file())[:2]
        twins = [DEV_ROOT / p.relative_to(fullres) for p in originals]
        for i, members in enumerate(([tiny_run["ckpt"]], [second_member], [tiny_run["ckpt"], second_member])):
            predictor = Predictor.from_checkpoints(members, device="cpu", num_workers=0)
            shift = (_probs(predictor.predict(originals)) - _probs(predictor.predict(twins))).abs().amax(dim=-1)
            assert figures["pairs"]["shift_mean"][i] == pytest.approx(float(shift.mean()), abs=1e-5)
            assert figures["pairs"]["shift_max"][i] == pytest.approx(float(shift.max()), abs=1e-5)


def _eval_cfg(ckpt: Path, out: Path, *extra: str):
    return compose_cfg("eval", [f"ckpt_path={ckpt}", f"paths.output_dir={out}", f"paths.cache_dir={out.parent / 'cache'}",
                                "data.num_workers=0", "plots=false", "+trainer.enable_progress_bar=false", *extra])


def test_eval_scores_an_ensemble_on_the_runs_split(tiny_run: dict, second_member: Path, tmp_path: Path,
                                                   one_thread) -> None:
    """`ecg-inception-eval members=[...]`: the run's val and test split scored by the ensemble, each figure the
    Predictor ensemble's own; without members the report is the single model's, as before."""
    from ecg_inception.models.metrics import report_from_predictions
    from ecg_inception.training import evaluate

    dm = tiny_run["objects"]["datamodule"]
    labels = list(tiny_run["metrics"]["labels"])
    result, objects = evaluate(_eval_cfg(tiny_run["ckpt"], tmp_path / "ens", f"members=[{second_member}]"))
    assert result["ensemble"]["members"] == [str(tiny_run["ckpt"]), str(second_member)]
    assert result["ensemble"]["temperatures"][1] == 2.5
    saved = json.loads((tmp_path / "ens" / "metrics.json").read_text())
    assert saved["ensemble"] == result["ensemble"] and saved["test"]["f1_macro"] == result["test"]["f1_macro"]
    predictor = Predictor.from_checkpoints([tiny_run["ckpt"], second_member], device="cpu", num_workers=0)
    for split in ("val", "test"):
        rows = dm.manifest.split_rows(split)
        target = torch.tensor([labels.index(r.label) for r in rows])
        probs = _probs(predictor.predict([dm.dataset_root() / r.path for r in rows]))
        expected = report_from_predictions(probs, target, labels)
        assert result[split]["confusion_matrix"] == expected["confusion_matrix"], split
        assert result[split]["f1_macro"] == pytest.approx(expected["f1_macro"], abs=1e-6)
        nll = float(-probs[torch.arange(len(target)), target].clamp_min(1e-12).log().mean())
        assert result[split]["loss"] == pytest.approx(nll, abs=1e-4)
        calibration = result[split]["calibration"]
        assert calibration["temperature"] == 1.0 and calibration["nll_before"] == pytest.approx(nll, abs=1e-4)
    single, _ = evaluate(_eval_cfg(tiny_run["ckpt"], tmp_path / "one"))
    assert "ensemble" not in single
    # the same scalars under the same names as a single model's (less the best-so-far a fit tracks)
    assert set(result["logged"]) == set(single["logged"]) - {"val/acc_best"}
    assert single["test"]["confusion_matrix"] == tiny_run["metrics"]["test"]["confusion_matrix"]
    assert single["test"]["loss"] == pytest.approx(tiny_run["metrics"]["test"]["loss"], rel=1e-4)
    assert single["test"]["loss"] != pytest.approx(result["test"]["loss"], abs=1e-4)


def test_eval_refuses_members_it_cannot_average(tiny_run: dict, tmp_path: Path) -> None:
    from ecg_inception.errors import ConfigValueError
    from ecg_inception.training import evaluate

    labels = list(tiny_run["metrics"]["labels"])
    renamed = _variant(tiny_run, tmp_path / "renamed.ckpt", labels=labels[::-1])
    with pytest.raises(EnsembleError, match="renamed.ckpt: labels"):
        evaluate(_eval_cfg(tiny_run["ckpt"], tmp_path / "a", f"members=[{renamed}]"))
    with pytest.raises(EnsembleError, match="given twice"):
        evaluate(_eval_cfg(tiny_run["ckpt"], tmp_path / "b", f"members=[{tiny_run['ckpt']}]"))
    with pytest.raises(ConfigValueError, match="members=.*give a list"):
        evaluate(_eval_cfg(tiny_run["ckpt"], tmp_path / "c", f"members={renamed}"))
    assert not (tmp_path / "a" / "metrics.json").exists()


def _member_in_run(tiny_run: dict, run: Path, swap: tuple[str, str] | None = None) -> Path:
    """A copy of the second-member variant inside `run/checkpoints/`, beside a copy of the tiny run's splits.csv
    (with the rows of split `swap[0]` moved to `swap[1]`)."""
    (run / "checkpoints").mkdir(parents=True)
    lines = (tiny_run["run"] / "splits.csv").read_text().splitlines(keepends=True)
    head = [line for line in lines if line.startswith("#")]
    rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    for row in rows:
        if swap and row["split"] == swap[0]:
            row["split"] = swap[1]
    with (run / "splits.csv").open("w", newline="") as fh:
        fh.writelines(head)
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return _variant(tiny_run, run / "checkpoints" / "best.ckpt", seed=3)


def test_eval_refuses_a_member_that_trained_on_the_scored_pages(tiny_run: dict, tmp_path: Path, one_thread) -> None:
    """A member from another split has trained on pages the checkpoint's split tests: scoring that ensemble on
    this split would leak, so it is refused; a member of the same split is checked and counted 0."""
    from ecg_inception.training import evaluate

    same = _member_in_run(tiny_run, tmp_path / "same_split")
    result, _ = evaluate(_eval_cfg(tiny_run["ckpt"], tmp_path / "ok", f"members=[{same}]", "splits=[test]"))
    assert result["ensemble"]["members_trained_on"] == {str(same): 0}
    other = _member_in_run(tiny_run, tmp_path / "other_split", swap=("test", "train"))
    n_test = len(tiny_run["objects"]["datamodule"].manifest.split_rows("test"))
    with pytest.raises(EnsembleError, match=rf"other_split/checkpoints/best.ckpt: its run trained on {n_test} of "
                                            rf"the {n_test} pages scored here"):  # fmt: skip
        evaluate(_eval_cfg(tiny_run["ckpt"], tmp_path / "leak", f"members=[{other}]", "splits=[test]"))
    assert not (tmp_path / "leak" / "metrics.json").exists()


def test_trained_on_counts_duplicate_groups_not_only_byte_copies(tmp_path: Path) -> None:
    from ecg_inception.data.manifest import ManifestRow
    from ecg_inception.data.whole_folder import trained_on

    run = tmp_path / "splits.csv"
    run.write_text("path,label,group,split,sha256\n"
                   "a.jpg,normal,g1,train,aaa\nb.jpg,normal,g2,test,bbb\n")  # fmt: skip
    rows = [ManifestRow("x.jpg", "normal", "g1", "test", "xxx"),  # a near-duplicate of a.jpg (same group)
            ManifestRow("y.jpg", "normal", "g9", "test", "aaa"),  # a byte copy of a.jpg under another group
            ManifestRow("z.jpg", "normal", "g2", "test", "bbb")]  # fmt: skip
    assert trained_on(rows, run) == ["x.jpg", "y.jpg"]
    assert trained_on(rows, tmp_path / "absent.csv") is None
