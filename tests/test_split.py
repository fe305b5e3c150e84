"""Split protocols, balancing and the manifest CSV."""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ecg_inception.data.crop import CropBox
from ecg_inception.data.labels import CANONICAL_LABELS
from ecg_inception.data.manifest import SPLITS, Manifest, excluded_path
from ecg_inception.data.scan import ImageFile, ScanResult
from ecg_inception.data.split import make_split
from ecg_inception.errors import ManifestError


@dataclass
class FakeReport:
    """The parts of an AuditReport that make_split reads, with group ids given explicitly."""

    scan: ScanResult
    exact_groups: list[list[str]]
    crops: dict[str, CropBox]
    groups: dict[str, str] = field(default_factory=dict)
    grid_hashes: dict[str, object] = field(default_factory=dict)
    pitches: dict[str, object] = field(default_factory=dict)
    near_threshold: int | None = None

    def group_ids(self) -> dict[str, str]:
        return dict(self.groups)


def fake_report(files: list[tuple[str, str, str]], near: dict[str, str] | None = None) -> FakeReport:
    """`files` holds (rel_path, label, content): equal content = exact copies; `near` merges contents."""
    near = near or {}
    images, exact = [], defaultdict(list)
    for rel, label, content in sorted(files):
        sha = hashlib.sha256(content.encode()).hexdigest()
        images.append(ImageFile(rel, label, sha, 200, 100, "RGB"))
        exact[content].append(rel)
    groups = {rel: near.get(content, f"g-{content}") for content, rels in exact.items() for rel in rels}
    labels = [lab for lab in CANONICAL_LABELS if any(im.label == lab for im in images)]
    scan = ScanResult(Path("/fake"), labels, {lab: lab for lab in labels}, images)
    crops = {im.rel_path: CropBox(1, 2, 190, 95, "(1)" in im.rel_path) for im in images}
    return FakeReport(scan, [sorted(v) for v in exact.values()], crops, groups)


def copies_report(per_class: dict[str, int], copies: int = 1, near_pairs: int = 0) -> FakeReport:
    """`per_class[label]` distinct ECGs, the first `copies` of each class duplicated once, plus near pairs."""
    files, near = [], {}
    for label, n in per_class.items():
        for k in range(n):
            files.append((f"{label}/{label}({k}).png", label, f"{label}-{k}"))
        for k in range(copies):
            files.append((f"{label}/{label}({n + k}).png", label, f"{label}-{k}"))
        for k in range(near_pairs):  # ECG k+copies and its near twin (a re-scan) form one group
            files.append((f"{label}/{label}(near{k}).png", label, f"{label}-near{k}"))
            near[f"{label}-near{k}"] = near[f"{label}-{k + copies}"] = f"n-{label}-{k}"
    return fake_report(files, near)


UNEVEN = {"myocardial_infarction": 12, "history_of_mi": 20, "abnormal_heartbeat": 9, "normal": 30}


def split_of(manifest: Manifest) -> dict[str, str]:
    return {r.path: r.split for r in manifest.rows}


def test_leakfree_keeps_groups_whole_and_drops_extra_copies() -> None:
    report = copies_report(UNEVEN, copies=3, near_pairs=2)
    for seed in range(5):
        m = make_split(report, seed=seed)
        assert not m.crossing_groups() and not m.leaky
        groups: dict[str, set[str]] = defaultdict(set)
        for r in m.rows:
            groups[r.group].add(r.split)
        assert all(len(s) == 1 for s in groups.values())
        # one file per exact group: copies excluded with their reason, near twins kept together
        assert len({r.sha256 for r in m.rows}) == len(m.rows) == sum(UNEVEN.values()) + 4 * 2
        copies = [p for p, why in m.excluded if why.startswith("exact copy of")]
        assert len(copies) == 4 * 3
        near = [r for r in m.rows if r.group.startswith("n-")]
        assert len(near) == 4 * 2 * 2 and all(Counter(r.group for r in near)[r.group] == 2 for r in near)


def test_stratified_within_one_group_per_class() -> None:
    report = copies_report(UNEVEN, copies=0)
    fractions = (0.7, 0.15, 0.15)
    for seed in range(10):
        counts = make_split(report, seed=seed, fractions=fractions).counts()
        for label, n in UNEVEN.items():
            for split, frac in zip(SPLITS, fractions, strict=True):
                assert abs(counts[split][label] - frac * n) <= 1, (seed, label, split, counts)


def test_stratified_with_near_groups_within_largest_group() -> None:
    report = copies_report(UNEVEN, copies=0, near_pairs=3)  # groups of size 2 and 1
    counts = make_split(report, seed=3, fractions=(0.6, 0.2, 0.2)).counts()
    for label, n in UNEVEN.items():
        for split, frac in zip(SPLITS, (0.6, 0.2, 0.2), strict=True):
            assert abs(counts[split][label] - frac * (n + 3)) <= 2


def test_small_classes_get_val_and_test_groups() -> None:
    report = copies_report(dict.fromkeys(CANONICAL_LABELS, 3), copies=0)
    for seed in range(5):
        counts = make_split(report, seed=seed).counts()
        for split in SPLITS:
            assert all(counts[split][lab] == 1 for lab in CANONICAL_LABELS)


def test_seed_determinism_and_difference(tmp_path: Path) -> None:
    report = copies_report(UNEVEN, copies=2, near_pairs=1)
    a, b, c = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    make_split(report, seed=7).write_csv(a)
    make_split(report, seed=7).write_csv(b)
    make_split(report, seed=8).write_csv(c)
    assert a.read_bytes() == b.read_bytes()
    assert excluded_path(a).read_bytes() == excluded_path(b).read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_manifest_round_trip_reproduces_split(tmp_path: Path) -> None:
    m = make_split(copies_report(UNEVEN, copies=2), seed=1)
    path = m.write_csv(tmp_path / "run" / "splits.csv")
    back = Manifest.read_csv(path, protocol="leakfree")
    assert back.rows == m.rows and back.labels == m.labels and back.excluded == m.excluded
    assert back.counts() == m.counts() and back.class_weights() == m.class_weights()
    assert back.rows[0].box is not None and any(r.crop_fallback for r in back.rows)
    back.write_csv(tmp_path / "again.csv")
    assert (tmp_path / "again.csv").read_bytes() == path.read_bytes()
    meta, header = path.read_text().splitlines()[:2]
    assert meta.startswith("# ecg_inception manifest {") and '"format": 2' in meta and '"protocol": "leakfree"' in meta
    assert header.startswith("path,label,group,split,")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("path,label,split\na.png,normal,train\n", 1, "missing column(s) group"),
        ("path,label,group,split\na.png,normal,g1,train\nb.png,normal,g2,holdout\n", 3, "split 'holdout'"),
        (
            "path,label,group,split\na.png,normal,g1,train\nzzz.png,normal,g2,test\n",
            3,
            "unknown file 'zzz.png'",
        ),
        ("path,label,group,split\na.png,sinus,g1,train\n", 2, "unknown label 'sinus'"),
        ("path,label,group,split\na.png,normal,g1,train\na.png,normal,g1,val\n", 3, "listed twice"),
        ("path,label,group,split,crop_left\na.png,normal,g1,train,x\n", 2, "not an integer"),
    ],
)
def test_bad_manifest_names_file_and_line(tmp_path: Path, text: str, line: int, message: str) -> None:
    (tmp_path / "a.png").write_bytes(b"x")
    path = _write(tmp_path / "bad.csv", text)
    with pytest.raises(ManifestError) as err:
        Manifest.read_csv(path, root=tmp_path, labels=CANONICAL_LABELS)
    assert f"{path}:{line}:" in str(err.value) and message in str(err.value)


def test_empty_or_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not found"):
        Manifest.read_csv(tmp_path / "nope.csv")
    with pytest.raises(ManifestError, match="lists no files"):
        Manifest.read_csv(_write(tmp_path / "empty.csv", "path,label,group,split\n"))


def test_paper_protocol_is_leaky_and_balanced() -> None:
    report = copies_report(UNEVEN, copies=5)
    m = make_split(report, protocol="paper", seed=0)
    assert m.leaky and m.balance == "undersample" and m.balance_stage == "before_split"
    smallest = min(UNEVEN.values()) + 5  # copies count as files in the paper protocol
    totals = Counter(r.label for r in m.rows)
    assert set(totals.values()) == {smallest} and len(m.rows) == 4 * smallest
    assert all(why.startswith("undersampled") for _, why in m.excluded)
    # stratified by file: each class within one file of its fractions
    for split, frac in zip(SPLITS, (0.7, 0.15, 0.15), strict=True):
        assert all(abs(m.counts()[split][lab] - frac * smallest) <= 1 for lab in UNEVEN)
    # with many copies some land in two splits across seeds: that is the leak the protocol reproduces
    assert any(make_split(report, protocol="paper", seed=s).crossing_groups() for s in range(5))


def test_paper_protocol_no_balance_keeps_every_file() -> None:
    report = copies_report(UNEVEN, copies=2)
    m = make_split(report, protocol="paper", balance="none")
    assert len(m.rows) == len(report.scan.images) and m.excluded == []


def test_balance_options_leakfree() -> None:
    report = copies_report(UNEVEN, copies=0)
    none = make_split(report, balance="none")
    weights = make_split(report, balance="class_weights")
    assert weights.rows == none.rows and weights.excluded == none.excluded == []
    train = weights.counts()["train"]
    w = weights.class_weights()
    assert sum(w) / len(w) == pytest.approx(1.0)
    for i, a in enumerate(weights.labels):  # inverse frequency: w_a * n_a is the same for every class
        for b in weights.labels[i + 1 :]:
            assert w[i] * train[a] == pytest.approx(w[weights.labels.index(b)] * train[b])

    before = make_split(report, balance="undersample", balance_stage="before_split")
    assert set(Counter(r.label for r in before.rows).values()) == {min(UNEVEN.values())}

    on_train = make_split(report, balance="undersample", balance_stage="train")
    train_counts = on_train.counts()["train"]
    assert len(set(train_counts.values())) == 1
    assert train_counts["normal"] == min(none.counts()["train"].values())
    # val and test are exactly those of the unbalanced split; train is a subset of it
    for split in ("val", "test"):
        assert on_train.split_rows(split) == none.split_rows(split)
    assert set(r.path for r in on_train.split_rows("train")) < set(r.path for r in none.split_rows("train"))
    assert all("(train)" in why for _, why in on_train.excluded)


def test_conflicting_group_excluded_with_reason() -> None:
    files = [(f"normal/n{k}.png", "normal", f"n{k}") for k in range(6)]
    files += [(f"history_of_mi/p{k}.png", "history_of_mi", f"p{k}") for k in range(6)]
    files += [("history_of_mi/same.png", "history_of_mi", "n0")]  # byte copy of a normal file, other label
    m = make_split(fake_report(files))
    reasons = dict(m.excluded)
    assert (
        "label conflict" in reasons["normal/n0.png"] and "label conflict" in reasons["history_of_mi/same.png"]
    )
    assert len(m.rows) == 11


def test_bad_arguments() -> None:
    report = copies_report(UNEVEN)
    with pytest.raises(ValueError, match="protocol"):
        make_split(report, protocol="random")
    with pytest.raises(ValueError, match="fractions"):
        make_split(report, fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="balance"):
        make_split(report, balance="oversample")


def test_cli_writes_manifest_and_warns_on_paper(tmp_path: Path, monkeypatch, capsys) -> None:
    from ecg_inception.cli.split import main

    report = copies_report(UNEVEN, copies=5)
    monkeypatch.setattr("ecg_inception.data.audit.audit_folder", lambda root, near_duplicates=True: report)
    assert main(["/fake", "--out", str(tmp_path / "s.csv"), "--seed", "1"]) == 0
    out, err = capsys.readouterr()
    assert "WARNING" not in out + err and "class weights" in out
    assert Manifest.read_csv(tmp_path / "s.csv").rows == make_split(report, seed=1).rows
    leaky = next(s for s in range(5) if make_split(report, protocol="paper", seed=s).crossing_groups())
    assert main(["/fake", "--protocol", "paper", "--seed", str(leaky), "--out", str(tmp_path / "p.csv")]) == 0
    out, err = capsys.readouterr()
    crossing = len(make_split(report, protocol="paper", seed=leaky).crossing_groups())
    assert f"more than one split ({crossing} duplicate groups cross splits)" in err
    assert main(["/fake", "--fractions", "0.5", "0.5", "0.5"]) == 2
    assert "fractions" in capsys.readouterr().err


def test_planted_duplicates_never_cross_splits(synthetic_root: Path) -> None:
    from ecg_inception.data.audit import audit_folder

    report = audit_folder(synthetic_root)
    copies = [g for g in report.exact_groups if len(g) > 1]
    assert len(copies) >= 4
    for seed in range(3):
        m = make_split(report, seed=seed)
        where = split_of(m)
        assert not m.crossing_groups()
        for group in copies:  # exactly one copy kept, the first by path
            assert [p for p in group if p in where] == [min(group)]
        paper = make_split(report, protocol="paper", seed=seed, balance="none")
        assert all(p in split_of(paper) for g in copies for p in g)


@pytest.fixture(scope="module")
def dev_report(dev_root: Path):
    from ecg_inception.data.audit import audit_folder

    return audit_folder(dev_root)


@pytest.mark.devset
def test_dev_set_protocols(dev_report, tmp_path: Path) -> None:
    leakfree = make_split(dev_report)
    assert len(leakfree.rows) == 290 and not leakfree.crossing_groups() and not leakfree.leaky
    paper = make_split(dev_report, protocol="paper")
    assert len(paper.rows) == 4 * 98 and paper.leaky
    assert set(Counter(r.label for r in paper.rows).values()) == {98}
    assert paper.crossing_groups()
    path = leakfree.write_csv(tmp_path / "splits.csv")
    assert Manifest.read_csv(path, root=dev_report.scan.root).rows == leakfree.rows


def test_moved_names_stay_importable_from_split() -> None:
    """The manifest (data.manifest) and the protocol vocabulary (data.protocols) moved; data.split still has them."""
    from ecg_inception.data import manifest, protocols, split

    moved = {
        manifest: ("SPLITS", "REQUIRED_COLUMNS", "COLUMNS", "MANIFEST_FORMAT", "META_PREFIX", "ManifestRow",
                   "Manifest", "excluded_path"),
        protocols: ("PROTOCOLS", "BALANCES", "BALANCE_STAGES", "ProtocolDefaults", "PROTOCOL_DEFAULTS",
                    "protocol_defaults", "resolve_balance"),
    }  # fmt: skip
    for home, names in moved.items():
        for name in names:
            assert getattr(split, name) is getattr(home, name), name
            assert name in split.__all__, name
    assert all(hasattr(split, name) for name in split.__all__)
