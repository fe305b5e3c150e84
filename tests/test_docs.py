"""The configuration reference (docs/configuration.md) against the shipped configs, so that it cannot drift.

- every key in its key tables exists in a composed config, and its documented default is the shipped one;
- the config-group table lists exactly the options each group ships (every experiment included);
- the experiment table lists every experiment, and the `key: value` settings it gives are the composed ones;
- every page of the docs site's nav exists (mkdocs.yml), so a page added to docs/ is not forgotten in the nav.
"""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
import yaml
from omegaconf import OmegaConf

from ecg_inception.core.compose import compose_config

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"
CONF = files("ecg_inception.conf")
EXPERIMENTS = sorted(p.name[:-5] for p in CONF.joinpath("experiment").iterdir() if p.name.endswith(".yaml"))
KEY = re.compile(r"^[a-z_]+(\.[a-z_]+)*$")
CODE = re.compile(r"`([^`]+)`")
_MISSING = object()


def _compose(config_name: str = "train", overrides: list[str] | None = None) -> dict[str, Any]:
    """The composed config as plain containers, interpolations unresolved (`${...}` strings stay strings)."""
    cfg = compose_config(config_name, overrides or [], return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra")
    plain["_choices"] = choices
    return plain


def _lookup(cfg: dict[str, Any], key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _sections(text: str) -> dict[str, str]:
    """`## Heading` -> the text below it, up to the next `## `."""
    parts = re.split(r"^## +(.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _table_rows(text: str) -> list[list[str]]:
    """The body rows of every markdown table in `text`, as lists of stripped cells."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append(cells)
    return [r for r in rows if r and r[0] not in ("key", "group", "experiment", "preset", "file")]


def _codes(cell: str) -> list[str]:
    return CODE.findall(cell)


def _pure_codes(cell: str) -> list[str] | None:
    """The backticked values of a cell made of nothing but them (comma-separated), else None."""
    codes = _codes(cell)
    rest = CODE.sub("", cell).replace(",", "").strip()
    return codes if codes and not rest else None


@pytest.fixture(scope="module")
def doc() -> dict[str, str]:
    return _sections(DOC.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def default_cfg() -> dict[str, Any]:
    return _compose()


@pytest.fixture(scope="module")
def all_cfgs(default_cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Every shipped way a key can appear: the defaults, each experiment, a sweep, and eval.yaml."""
    cfgs = [default_cfg, _compose(overrides=["hparams_search=paper_grid"]), _compose("eval")]
    cfgs += [_compose(overrides=[f"experiment={e}"]) for e in EXPERIMENTS]
    return cfgs


def _key_rows(doc: dict[str, str]) -> list[tuple[list[str], str]]:
    """(keys, default cell) for every row of the key tables in "Stable keys" (both of its tables)."""
    out = []
    for cells in _table_rows(doc["Stable keys"]):
        keys = _codes(cells[0])
        assert keys and all(KEY.match(k) for k in keys), f"configuration.md: not a key row: {cells[0]!r}"
        out.append((keys, cells[1]))
    return out


def test_the_reference_documents_the_stable_keys(doc: dict[str, str]) -> None:
    documented = {k for keys, _ in _key_rows(doc) for k in keys}
    # What scripts, sweeps and the tests rely on must be documented at all.
    for key in ("seed", "data.root", "data.protocol", "data.split_manifest", "model.pretrained",
                "model.optimizer.lr", "trainer.max_epochs", "paths.output_dir", "ckpt_path", "data.ink"):  # fmt: skip
        assert key in documented, f"configuration.md does not document {key}"


def test_every_documented_key_exists(doc: dict[str, str], all_cfgs: list[dict[str, Any]]) -> None:
    missing = [
        key
        for keys, _ in _key_rows(doc)
        for key in keys
        if all(_lookup(cfg, key) is _MISSING for cfg in all_cfgs)
    ]
    assert not missing, f"configuration.md documents keys that no shipped config has: {missing}"


def test_documented_defaults_are_the_shipped_ones(doc: dict[str, str], default_cfg: dict[str, Any]) -> None:
    checked = 0
    wrong = []
    for keys, default in _key_rows(doc):
        values = _pure_codes(default)
        if values is None or len(values) != len(keys):
            continue  # a described default ("unset (sweeps: ...)", "$ECG_INCEPTION_CACHE, else ...")
        for key, text in zip(keys, values, strict=True):
            expected = text if text.startswith("${") else yaml.safe_load(text)
            actual = _lookup(default_cfg, key)
            checked += 1
            # A missing key is test_every_documented_key_exists's to report.
            if actual is not _MISSING and actual != expected:
                wrong.append(f"{key}: documented {text}, shipped {actual!r}")
    assert not wrong, "configuration.md: defaults that differ from train.yaml's:\n" + "\n".join(wrong)
    assert checked >= 20


def _group_options(group: str) -> set[str]:
    return {p.name[:-5] for p in CONF.joinpath(*group.split("/")).iterdir() if p.name.endswith(".yaml")}


def test_the_group_table_lists_every_shipped_option(doc: dict[str, str]) -> None:
    rows = _table_rows(doc["Config groups"])
    groups = {_codes(r[0])[0]: r for r in rows}
    assert "experiment" in groups and "hparams_search" in groups
    for group, cells in groups.items():
        listed = set(_codes(cells[2].split("(")[0]))
        shipped = _group_options(group)
        if f"{group}/default.yaml" in cells[2]:  # a base the options extend, not an option of its own
            shipped.discard("default")
        assert listed == shipped, (
            f"configuration.md, group {group}: lists {sorted(listed)}, ships {sorted(shipped)}"
        )


def _experiment_rows(doc: dict[str, str]) -> dict[str, list[str]]:
    text = doc["Presets"]
    table = text[text.index("**`experiment/*`**") :]
    table = table[: table.index("\n\n", table.index("|"))]
    return {_codes(cells[0])[0]: cells for cells in _table_rows(table)}


def test_every_experiment_is_listed(doc: dict[str, str]) -> None:
    assert sorted(_experiment_rows(doc)) == EXPERIMENTS


SETTING = re.compile(r"^([a-z_]+): (.+)$")
COLUMNS = {1: ("data",), 2: ("model",), 3: ("trainer", "callbacks")}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_the_experiment_table_gives_the_shipped_settings(doc: dict[str, str], experiment: str) -> None:
    cells = _experiment_rows(doc)[experiment]
    cfg = _compose(overrides=[f"experiment={experiment}"])
    wrong, checked = [], 0
    for column, sections in COLUMNS.items():
        for code in _codes(cells[column]):
            match = SETTING.match(code)
            if not match:
                continue  # a bare name such as `EmaWeights` or `squash`
            name, text = match.groups()
            expected = yaml.safe_load(text)
            checked += 1
            if f"{sections[0]}/{name}" in cfg["_choices"]:  # a config group: `unfreeze: all`
                actual = cfg["_choices"][f"{sections[0]}/{name}"]
            else:
                found = [_lookup(cfg, f"{s}.{name}") for s in sections]
                found = [v for v in found if v is not _MISSING]
                actual = found[0] if found else _MISSING
            if actual is _MISSING:
                wrong.append(f"{code}: no key {name} under {'/'.join(sections)}")
            elif actual != expected:
                wrong.append(f"{code}: shipped {actual!r}")
    assert checked >= 1, f"configuration.md: the {experiment} row gives no `key: value` settings"
    assert not wrong, f"configuration.md, experiment {experiment}:\n" + "\n".join(wrong)


def _nav_pages(nav: list[Any]) -> list[str]:
    pages = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_the_site_nav_covers_the_docs_folder() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    pages = _nav_pages(config["nav"])
    assert len(pages) == len(set(pages))
    on_disk = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert set(pages) == on_disk, f"mkdocs.yml nav vs docs/*.md: {sorted(set(pages) ^ on_disk)}"


def test_the_figure_script_redraws_the_preprocessing_pictures(tmp_path: Path) -> None:
    """examples/docs_figures.py runs on the current preprocessing code (the dev page when present)."""
    import importlib.util
    import os

    dev_root = Path(os.environ.get("ECG_DEV_DATA", ROOT.parent / "shared" / "data" / "mendeley-ecg-dev"))
    spec = importlib.util.spec_from_file_location("docs_figures", ROOT / "examples" / "docs_figures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--out", str(tmp_path)] + (["--dev", str(dev_root)] if dev_root.is_dir() else [])
    module.main(argv)
    for name in ("synthetic_vs_real.png", "preprocessing.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    with pytest.raises(FileNotFoundError, match="finished run directory"):
        module.copy_report_figures(tmp_path, tmp_path / "x")
