"""Checkpoints and run folders are data: crafted files fail closed (no side effect), corrupt files fail clearly."""

from __future__ import annotations

import fractions
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import compose_cfg, tiny_overrides

from ecg_inception.errors import CheckpointError, ConfigValueError
from ecg_inception.models.checkpoint import load_checkpoint
from ecg_inception.models.module import EcgClassifier, register_optimizer
from ecg_inception.training import evaluate, train


@pytest.fixture(scope="module")
def run_dir(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory, one_thread) -> Path:
    """A genuine one-epoch run folder (config.yaml, splits.csv, checkpoints/last.ckpt) with every kind of state
    our checkpoints carry: optimizer, LR scheduler, ModelCheckpoint, EarlyStopping and weight-EMA callbacks."""
    tmp = tmp_path_factory.mktemp("ckptrun")
    extra = ["trainer.max_epochs=1", "model.scheduler={name:plateau,patience:2}",
             "+callbacks.ema={_target_:ecg_inception.callbacks.EmaWeights,decay:0.9,start_epoch:0}"]
    cfg = compose_cfg("train", tiny_overrides(synthetic_root, tmp) + extra)
    train(cfg)
    yield Path(cfg.paths.output_dir)
    shutil.rmtree(tmp, ignore_errors=True)  # checkpoints are hundreds of MiB: free the disk for the next module


def copy_run(run_dir: Path, dest: Path) -> Path:
    """A copy of the run folder (config.yaml, splits.csv, last.ckpt) the test may tamper with."""
    (dest / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "splits.csv"):
        shutil.copy(run_dir / name, dest / name)
    shutil.copy(run_dir / "checkpoints" / "last.ckpt", dest / "checkpoints" / "last.ckpt")
    return dest / "checkpoints" / "last.ckpt"


def tamper(ckpt: Path, **hparams) -> None:
    """Rewrite `ckpt` with some hyper-parameters replaced (the file still loads under weights_only=True)."""
    data = torch.load(ckpt, map_location="cpu", weights_only=True)
    data["hyper_parameters"].update(hparams)
    torch.save(data, ckpt)


def eval_cfg(ckpt: Path, tmp: Path):
    return compose_cfg(
        "eval",
        [f"ckpt_path={ckpt}", f"paths.output_dir={tmp / 'eval'}", f"paths.cache_dir={tmp / 'cache'}",
         "data.num_workers=0", "+trainer.enable_progress_bar=false", "plots=false"],
    )  # fmt: skip


# ------------------------------------------------------------------------------ crafted files (security)
def test_checkpoint_preprocessing_target_is_never_instantiated(run_dir: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    ckpt = copy_run(run_dir, tmp_path / "run")
    prep = torch.load(ckpt, weights_only=True)["hyper_parameters"]["preprocessing"]
    prep["resize"] = {"_target_": "builtins.open", "file": str(victim), "mode": "w"}
    tamper(ckpt, preprocessing=prep)
    with pytest.raises(CheckpointError, match=r"last\.ckpt.*resize"):
        evaluate(eval_cfg(ckpt, tmp_path))
    assert not victim.exists()


def test_run_config_target_is_never_instantiated(run_dir: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    ckpt = copy_run(run_dir, tmp_path / "run")
    config = tmp_path / "run" / "config.yaml"
    data = yaml.safe_load(config.read_text())
    data["data"]["balance_stage"] = {"_target_": "builtins.open", "file": str(victim), "mode": "w"}
    config.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigValueError, match=r"config\.yaml.*balance_stage"):
        evaluate(eval_cfg(ckpt, tmp_path))
    assert not victim.exists()


def test_run_config_interpolation_is_not_resolved(run_dir: Path, tmp_path: Path) -> None:
    ckpt = copy_run(run_dir, tmp_path / "run")
    config = tmp_path / "run" / "config.yaml"
    data = yaml.safe_load(config.read_text())
    data["data"]["root"] = "${oc.env:HOME}"
    config.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigValueError, match=r"config\.yaml.*root"):
        evaluate(eval_cfg(ckpt, tmp_path))


CHECK_NO_IMPORT = """
import sys
from ecg_inception.errors import CheckpointError
from ecg_inception.models.module import EcgClassifier
try:
    EcgClassifier.{call}(sys.argv[1])
except CheckpointError as err:
    print("refused:", err)
print("imported:", "this" in sys.modules)
"""


@pytest.mark.parametrize("call", ["from_checkpoint", "load_from_checkpoint"])
@pytest.mark.parametrize("what", ["optimizer", "scheduler"])
def test_dotted_name_in_checkpoint_is_never_imported(run_dir: Path, tmp_path: Path, call: str, what: str) -> None:
    ckpt = copy_run(run_dir, tmp_path / "run")
    tamper(ckpt, **{what: {"name": "this.s"}})
    # A fresh interpreter: `import this` prints the Zen of Python once per process.
    out = subprocess.run([sys.executable, "-c", CHECK_NO_IMPORT.format(call=call), str(ckpt)],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "refused:" in out and f"{what} 'this.s'" in out, out
    assert "imported: False" in out and "Zen of Python" not in out, out


def test_optimizer_names_resolve_through_the_allow_list_only() -> None:
    kw = dict(pretrained=False, aux_logits=False, num_classes=2)
    for name in ("adam", "torch.optim.SGD", "torch.optim.adamw.AdamW"):
        EcgClassifier(optimizer={"name": name, "lr": 0.1}, **kw)
    EcgClassifier(scheduler={"name": "torch.optim.lr_scheduler.StepLR", "step_size": 1}, **kw)
    for name in ("os.system", "builtins.open", "torch.load"):
        with pytest.raises(ConfigValueError, match="never imported"):
            EcgClassifier(optimizer={"name": name}, **kw)


def test_registered_optimizer_is_the_explicit_opt_in() -> None:
    class MySGD(torch.optim.SGD):
        pass

    kw = dict(pretrained=False, aux_logits=False, num_classes=2)
    name = f"{MySGD.__module__}.{MySGD.__qualname__}"
    with pytest.raises(ConfigValueError, match="register_optimizer"):
        EcgClassifier(optimizer={"name": name, "lr": 0.1}, **kw)
    register_optimizer(MySGD)
    model = EcgClassifier(optimizer={"name": name, "lr": 0.1}, **kw)
    assert isinstance(model.configure_optimizers(), MySGD)


def test_unsafe_compile_options_in_checkpoint_are_refused(run_dir: Path, tmp_path: Path) -> None:
    ckpt = copy_run(run_dir, tmp_path / "run")
    tamper(ckpt, compile={"options": {"cpp.cxx": ["/bin/sh"]}})
    with pytest.raises(CheckpointError, match="compile"):
        EcgClassifier.from_checkpoint(ckpt)


def test_genuine_checkpoint_loads_and_predicts_like_training(run_dir: Path) -> None:
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    # Only tensors, storages and OrderedDicts: loads with weights_only=True on the torch floor (>= 2.6).
    assert torch.serialization.get_unsafe_globals_in_checkpoint(ckpt) == []
    data = load_checkpoint(ckpt)
    assert data["lr_schedulers"] and any("EmaWeights" in k for k in data["callbacks"]), list(data["callbacks"])
    assert data["hyper_parameters"]["preprocessing"]["size"] == 75
    model = EcgClassifier.from_checkpoint(ckpt)
    raw = torch.load(ckpt, weights_only=True)["state_dict"]
    assert all(torch.equal(v, raw[k]) for k, v in model.state_dict().items())
    again = EcgClassifier.load_from_checkpoint(ckpt)
    assert again.hparams.preprocessing == model.hparams.preprocessing


# ------------------------------------------------------------------------------------- corrupt files
def _write_corrupt(kind: str, path: Path) -> None:
    if kind == "random":
        path.write_bytes(os.urandom(4096))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("hello world\n")
    elif kind == "other_zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("hello.txt", "hi")
    elif kind == "plain_pickle":
        path.write_bytes(pickle.dumps({"x": fractions.Fraction(1, 3)}))
    elif kind == "unsafe_torch":
        torch.save({"x": fractions.Fraction(1, 3)}, path)
    elif kind == "other_torch":
        torch.save({"a": 1}, path)
    elif kind == "bare_state_dict":
        torch.save(torch.nn.Linear(2, 2).state_dict(), path)


CORRUPT = ["random", "empty", "text", "other_zip", "plain_pickle", "unsafe_torch", "other_torch", "bare_state_dict"]


@pytest.mark.parametrize("kind", CORRUPT)
def test_corrupt_checkpoint_gives_one_clear_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"{kind}.ckpt"
    _write_corrupt(kind, path)
    for load in (load_checkpoint, EcgClassifier.from_checkpoint, EcgClassifier.load_from_checkpoint):
        with pytest.raises(CheckpointError) as info:
            load(path)
        message = str(info.value)
        assert message.startswith(f"{path}: not a valid ecg_inception checkpoint ("), message
        assert "weights_only" not in message and "arbitrary code" not in message, message


def test_corrupt_checkpoint_in_eval_and_resume(run_dir: Path, synthetic_root: Path, tmp_path: Path) -> None:
    ckpt = copy_run(run_dir, tmp_path / "run")
    torch.save({**torch.load(ckpt, weights_only=True), "x": fractions.Fraction(1, 3)}, ckpt)
    with pytest.raises(CheckpointError, match="fractions.Fraction"):
        evaluate(eval_cfg(ckpt, tmp_path))
    overrides = tiny_overrides(synthetic_root, tmp_path, out="resumed") + [f"ckpt_path={ckpt}"]
    with pytest.raises(CheckpointError, match="fractions.Fraction"):
        train(compose_cfg("train", overrides))


def test_missing_checkpoint_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "nope.ckpt")


def test_load_checkpoint_checks_the_top_level_temperature(tmp_path: Path) -> None:
    """Before the fix only `hyper_parameters` were checked: a NaN or non-numeric temperature beside them loaded."""
    module = EcgClassifier(pretrained=False, aux_logits=False, unfreeze={"blocks": "all"})
    base = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    path = tmp_path / "t.ckpt"
    torch.save({**base, "temperature": 2.0}, path)
    assert load_checkpoint(path)["temperature"] == 2.0
    torch.save(base, path)
    assert "temperature" not in load_checkpoint(path)  # older checkpoints: none stored (1.0 when loaded)
    for bad in (float("nan"), float("inf"), -0.5, "1.5", None, [1.0]):
        torch.save({**base, "temperature": bad}, path)
        with pytest.raises(CheckpointError, match=r"t\.ckpt: not a valid ecg_inception checkpoint .*temperature"):
            load_checkpoint(path)

# ------------------------------------------------------------------------------------ weights_only everywhere
def _unsafe_loads(path: Path) -> list[str]:
    """Calls in `path` that read a checkpoint without weights_only=True: torch.load, load_from_checkpoint and
    Trainer.fit/validate/test/predict with a ckpt_path."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        name, kw = node.func.attr, {k.arg: k.value for k in node.keywords}
        loads = (name == "load" and ast.unparse(node.func.value) == "torch") or name == "load_from_checkpoint"
        loads |= name in ("fit", "validate", "test", "predict") and "ckpt_path" in kw
        safe = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
        if loads and not safe:
            found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)[:80]}")
    return found


def test_every_checkpoint_read_in_the_code_passes_weights_only() -> None:
    repo = Path(__file__).resolve().parents[1]
    files = [p for d in ("ecg_inception", "examples", "benchmarks") for p in sorted((repo / d).rglob("*.py"))]
    assert len(files) > 20
    offenders = [hit for p in files for hit in _unsafe_loads(p)]
    assert offenders == [], offenders
