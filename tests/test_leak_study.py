"""examples/leak_study.py: its scores, bootstrap and byte-copy helpers on hand-made inputs, and a tiny study end to
end (both protocols, 2 seeds, 1 epoch) with the resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_example

stats = load_example("leak_stats")
study = load_example("leak_study")


def onehot(pred: list[int], n: int = 3) -> np.ndarray:
    return np.eye(n)[pred] * 0.8 + 0.2 / n


def test_scores_on_hand_made_predictions() -> None:
    targets = np.array([0, 0, 1, 1, 2, 2])
    s = stats.score(onehot([0, 1, 1, 1, 2, 0]), targets)
    assert s["accuracy"] == pytest.approx(4 / 6)
    # per class F1 = 2TP / (2TP + FP + FN): class 0 2/(2+1+1), class 1 4/(4+1+0), class 2 2/(2+0+1)
    assert s["f1_macro"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.3, 0.7]])
    # class 0 positives (target 0) = rows 0, 1 (0.9, 0.4) vs negatives rows 2, 3 (0.3, 0.3): AUROC 1
    # class 1 positives = rows 2, 3 (0.7, 0.7) vs rows 0, 1 (0.1, 0.6): AUROC 1
    assert stats.macro_auroc(probs, np.array([0, 0, 1, 1])) == pytest.approx(1.0)
    ties = np.array([[0.5, 0.5]] * 4)  # every score tied: one half
    assert stats.macro_auroc(ties, np.array([0, 0, 1, 1])) == pytest.approx(0.5)
    assert stats.macro_auroc(ties, np.array([1, 1, 1, 1])) is None  # no class with positives and negatives
    assert stats.score(np.zeros((0, 3)), np.zeros(0, int)) == dict.fromkeys(stats.METRICS)


def test_scores_match_the_librarys_report() -> None:
    from ecg_inception.models.metrics import report_from_predictions

    rng = np.random.default_rng(3)
    labels = ["a", "b", "c", "d"]
    for trial in range(20):
        n = int(rng.integers(5, 40))
        targets = rng.integers(0, 3 if trial % 2 else 4, n)  # odd trials: class d absent
        probs = rng.dirichlet(np.ones(4), n).round(1 if trial % 3 == 0 else 6)  # rounding makes ties
        ours = stats.score(probs, targets)
        ref = report_from_predictions(torch.tensor(probs), torch.tensor(targets), labels)
        for key in stats.METRICS:
            assert ours[key] == pytest.approx(ref[key], abs=1e-6), (trial, key)


def test_bootstrap_is_deterministic_and_brackets_the_pooled_score() -> None:
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 4, 120)
    probs = rng.dirichlet(np.ones(4), 120)
    probs[np.arange(90), targets[:90]] += 1.0  # 90 of 120 made right (ties broken towards the target)
    probs /= probs.sum(1, keepdims=True)
    first = stats.bootstrap_ci(probs, targets, n_boot=500, seed=7)
    assert first == stats.bootstrap_ci(probs, targets, n_boot=500, seed=7)
    assert first != stats.bootstrap_ci(probs, targets, n_boot=500, seed=8)
    acc = first["accuracy"]
    assert acc["point"] == pytest.approx(stats.accuracy(probs, targets)) and acc["undefined"] == 0
    assert acc["low"] < acc["point"] < acc["high"]
    # binomial: sd = sqrt(p(1 - p)/n) = 0.040 at p ~ 0.77, n = 120, so the 95 % interval is about +-0.08
    assert 0.12 < acc["high"] - acc["low"] < 0.20
    for m in stats.METRICS:
        assert first[m]["low"] <= first[m]["point"] <= first[m]["high"]


def test_bootstrap_of_perfect_and_of_empty_predictions() -> None:
    targets = np.array([0, 1, 2, 0, 1, 2])
    perfect = stats.bootstrap_ci(onehot(targets.tolist()), targets, n_boot=200, seed=0)
    for m in ("accuracy", "f1_macro"):
        assert (perfect[m]["point"], perfect[m]["low"], perfect[m]["high"]) == (1.0, 1.0, 1.0)
    assert perfect["auroc_macro"]["low"] == 1.0
    empty = stats.bootstrap_ci(np.zeros((0, 3)), np.zeros(0, int), n_boot=10)
    assert empty["accuracy"] == {"point": None, "low": None, "high": None, "undefined": 10}


def test_copy_flags_and_mean_sd_on_hand_made_manifests() -> None:
    rows = [
        {"path": "a/1.png", "split": "train", "sha256": "h1"},
        {"path": "a/2.png", "split": "test", "sha256": "h1"},  # copy of a train file
        {"path": "a/3.png", "split": "test", "sha256": "h3"},
        {"path": "a/4.png", "split": "val", "sha256": "h3"},  # a copy in val does not count
        {"path": "b/5.png", "split": "test", "sha256": "h5"},
        {"path": "b/6.png", "split": "train", "sha256": "h5"},
        {"path": "b/7.png", "split": "val", "sha256": "h1"},
    ]
    assert stats.train_copy_flags(rows) == {"a/2.png": True, "a/3.png": False, "b/5.png": True}
    assert stats.train_copy_flags(rows, "val") == {"a/4.png": False, "b/7.png": True}
    with pytest.raises(ValueError, match="sha256"):
        stats.train_copy_flags([*rows, {"path": "c.png", "split": "test", "sha256": ""}])
    assert stats.mean_sd([1.0, None, 3.0]) == {"mean": 2.0, "sd": pytest.approx(2**0.5), "n": 2}
    assert stats.mean_sd([0.5]) == {"mean": 0.5, "sd": None, "n": 1}


def test_the_study_refuses_overrides_of_what_it_controls() -> None:
    with pytest.raises(SystemExit):
        study.parse_args(["root", "--out", "x", "data.protocol=paper"])
    args = study.parse_args(["root", "experiment=scratch_cpu", "--out", "x", "trainer.max_epochs=1"])
    assert args.overrides == ["experiment=scratch_cpu", "trainer.max_epochs=1"]
    overrides = study.run_overrides(args, "paper", 3, Path("/r"))
    assert overrides.index("experiment=scratch_cpu") < overrides.index("data.balance=undersample")
    assert overrides[-4:-2] == ["data.balance_stage=before_split", "seed=3"]


TINY = ["data.image_size=75", "data.batch_size=4", "data.num_workers=0", "model.pretrained=false",
        "model.aux_logits=false", "model/unfreeze=all", "trainer.max_epochs=1", "callbacks.rich_progress_bar=null",
        "+trainer.enable_model_summary=false", "+trainer.enable_progress_bar=false", "plots=false"]


@pytest.mark.slow
def test_tiny_study_end_to_end_with_resume(synthetic_root: Path, tmp_path: Path, one_thread, capsys) -> None:
    from ecg_inception.data.whole_folder import training_copies

    out = tmp_path / "study"
    argv = [str(synthetic_root), "--out", str(out), "--seeds", "0", "1", "--bootstrap", "300",
            f"paths.cache_dir={tmp_path / 'cache'}", *TINY]  # fmt: skip
    first = study.main(argv)
    assert capsys.readouterr().out.count("trained in") == 4
    runs = sorted(p.name for p in (out / "runs").iterdir() if p.is_dir())
    assert runs == ["leakfree-seed0", "leakfree-seed1", "paper-seed0", "paper-seed1"]
    assert first["missing_runs"] == []
    for name in runs:
        run = study.load_run(out / "runs" / name)
        test = run["metrics"]["test"]
        assert stats.score(run["probs"], run["targets"])["accuracy"] == pytest.approx(test["accuracy"])
        assert stats.score(run["probs"], run["targets"])["f1_macro"] == pytest.approx(test["f1_macro"])
        records = stats.read_manifest_records(out / "runs" / name / "splits.csv")
        test_sha = [r["sha256"] for r in records if r["split"] == "test"]
        assert int(run["copy"].sum()) == training_copies(test_sha, out / "runs" / name / "splits.csv")["in_train"]
    paper, leakfree = first["protocols"]["paper"], first["protocols"]["leakfree"]
    assert leakfree["copies"]["total"]["with_copy_in_train"] == 0  # one file per byte-identical group
    assert paper["copies"]["total"]["with_copy_in_train"] > 0  # 2 planted copies per class, split by file
    for entry in (paper, leakfree):
        pooled = entry["subsets"]["all"]["pooled"]
        assert pooled["test_images"] == entry["copies"]["total"]["test_images"]
        for m in stats.METRICS:
            if pooled[m]["point"] is not None and pooled[m]["low"] is not None:
                assert pooled[m]["low"] <= pooled[m]["point"] <= pooled[m]["high"]
    no_copy = paper["subsets"]["no_copy"]["pooled"]["test_images"]
    assert no_copy == paper["copies"]["total"]["test_images"] - paper["copies"]["total"]["with_copy_in_train"]
    assert (out / "leak_study.png").stat().st_size > 10_000
    assert "paper (LEAKY), own test" in (out / "leak_study.md").read_text()

    # Resume: finished runs are skipped; a run that did not finish (status failed) is trained again.
    metrics = out / "runs" / "paper-seed1" / "metrics.json"
    stamps = {n: (out / "runs" / n / "metrics.json").stat().st_mtime_ns for n in runs if n != "paper-seed1"}
    metrics.write_text(json.dumps({**json.loads(metrics.read_text()), "status": "failed"}))
    second = study.main(argv)
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, skipped") == 3 and printed.count("trained in") == 1
    assert "paper seed 1: trained in" in printed
    assert stamps == {n: (out / "runs" / n / "metrics.json").stat().st_mtime_ns for n in stamps}
    assert second["protocols"]["leakfree"] == first["protocols"]["leakfree"]  # same runs, same bootstrap seed
    # A different recipe into the same study folder is refused instead of mixed in.
    with pytest.raises(SystemExit, match="other overrides"):
        study.main([*argv, "model.drop_rate=0.1"])


def _finished_run(run_dir: Path, seed: int) -> None:
    """A run folder as a finished run leaves it: metrics.json (status ok) and the study's test predictions."""
    labels = ["a", "b"]
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps({"status": "ok", "labels": labels}))
    rows = ["path,sha256,label,target,copy_in_train,prob_a,prob_b"]
    rows += [f"p{i}.jpg,{i:064x},{labels[i % 2]},{i % 2},{int(i < seed)},{0.9 - 0.8 * (i % 2)},{0.1 + 0.8 * (i % 2)}"
             for i in range(4)]
    (run_dir / study.PREDICTIONS).write_text("\n".join(rows) + "\n")


def test_a_run_another_invocation_finishes_later_is_in_the_report(tmp_path: Path, monkeypatch, capsys) -> None:
    # Two invocations share the runs. This one passes paper-seed0 while the other trains it ("running
    # elsewhere"); the other finishes it while this one trains leakfree-seed0. The report, written after the
    # loop, must hold both runs: it listed paper-seed0 as "not finished" when its state was read on passing it.
    out = tmp_path / "study"

    def fake_train_one(args, protocol: str, seed: int, run_dir: Path) -> str:
        if protocol == "paper":
            return "running elsewhere"
        _finished_run(run_dir.with_name(f"paper-seed{seed}"), seed)  # the other invocation's run, done meanwhile
        _finished_run(run_dir, seed)
        return "trained in 1 s"

    monkeypatch.setattr(study, "train_one", fake_train_one)
    result = study.main(["root", "--out", str(out), "--seeds", "1", "--bootstrap", "50"])
    assert result["missing_runs"] == []
    assert sorted(result["protocols"]) == ["leakfree", "paper"]
    assert result["protocols"]["paper"]["copies"]["total"] == {"test_images": 4, "with_copy_in_train": 1}
    assert "Not finished yet" not in (out / "leak_study.md").read_text()
    assert "paper seed 1: running elsewhere" in capsys.readouterr().out
