"""Backbone creation: local checkpoint loading with head adaptation, strict key checks, offline fail-fast."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import timm
import torch

from ecg_inception.errors import PretrainedWeightsError
from ecg_inception.models import backbone
from ecg_inception.models.backbone import (
    check_pretrained_available,
    classifier_names,
    create_backbone,
    head_names,
    load_pretrained_file,
    split_name,
)
from ecg_inception.models.freezing import UNDESCRIBED_HEAD_MODULES, backbone_blocks, head_modules

TV_FILE = "inception_v3_google-1a9a5a14.pth"  # the torchvision file name timm's tv_in1k url points at


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A 1000-class inception_v3 with aux weights (random, pretrained=False), saved as a torchvision-style file."""
    torch.manual_seed(0)
    model = timm.create_model("inception_v3", pretrained=False, num_classes=1000, aux_logits=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("weights") / TV_FILE
    torch.save(state, path)
    yield path, state
    shutil.rmtree(path.parent, ignore_errors=True)


@pytest.fixture
def no_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty Hugging Face and torch hub caches, so only the network could provide weights."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


def _assert_trunk_equal(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    trunk = [k for k in own if not k.startswith(("fc.", "AuxLogits.fc."))]
    assert len(trunk) > 500
    for key in trunk:
        assert torch.equal(own[key], state[key]), key


def test_local_file_gives_identical_trunk_and_new_heads(imagenet_like) -> None:
    path, state = imagenet_like
    model = create_backbone(num_classes=4, aux_logits=True, pretrained=False, pretrained_file=str(path))
    _assert_trunk_equal(model, state)
    assert model.fc.weight.shape == (4, 2048) and model.AuxLogits.fc.weight.shape == (4, 768)
    # Re-initialised, not a slice of the 1000-class heads.
    assert not torch.equal(model.fc.weight, state["fc.weight"][:4])
    assert not torch.equal(model.AuxLogits.fc.weight, state["AuxLogits.fc.weight"][:4])
    # The 1000-class model accepts the file as it is, heads included.
    same = timm.create_model("inception_v3", num_classes=1000, aux_logits=True)
    report = load_pretrained_file(same, path)
    assert report.reinitialised == [] and torch.equal(same.fc.weight, state["fc.weight"])


def test_file_without_aux_weights_warns_and_loads_the_trunk(imagenet_like, tmp_path: Path) -> None:
    _, state = imagenet_like
    path = tmp_path / "no_aux.pth"
    torch.save({"model": {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}}, path)
    with pytest.warns(UserWarning, match="AuxLogits is randomly initialised"):
        model = create_backbone(aux_logits=True, pretrained=False, pretrained_file=str(path))
    _assert_trunk_equal(model, {**state, **{k: v for k, v in model.state_dict().items() if "AuxLogits" in k}})
    # Without aux the same file loads silently; a file with aux weights into an aux-free model is fine too.
    load_pretrained_file(timm.create_model("inception_v3", num_classes=4), imagenet_like[0])


def test_missing_trunk_keys_fail_naming_file_and_keys(imagenet_like, tmp_path: Path) -> None:
    _, state = imagenet_like
    path = tmp_path / "partial.pth"
    torch.save({"state_dict": {k: v for k, v in state.items() if not k.startswith("Mixed_7c.")}}, path)
    with pytest.raises(PretrainedWeightsError, match="partial.pth") as info:
        create_backbone(aux_logits=False, pretrained=False, pretrained_file=str(path))
    assert "Mixed_7c." in str(info.value) and "missing keys" in str(info.value)


def test_checkpoint_of_another_architecture_is_refused(imagenet_like) -> None:
    resnet = timm.create_model("resnet18", num_classes=4)
    with pytest.raises(PretrainedWeightsError, match="unexpected keys") as info:
        load_pretrained_file(resnet, imagenet_like[0])
    assert TV_FILE in str(info.value) and "layer1" in str(info.value)


def test_wrapped_and_prefixed_checkpoints_are_unwrapped(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = timm.create_model("resnet18", num_classes=1000)
    path = tmp_path / "wrapped.ckpt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    model = create_backbone("resnet18", num_classes=4, aux_logits=False, pretrained=False, pretrained_file=str(path))
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert model.fc.weight.shape == (4, 512)


def test_aux_on_a_model_without_aux_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="resnet18 has no auxiliary classifier"):
        create_backbone("resnet18", aux_logits=True, pretrained=False)


def test_random_init_runs_small_inputs_without_aux() -> None:
    model = create_backbone(num_classes=4, aux_logits=False, pretrained=False).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 75, 75)).shape == (1, 4)
    assert model.pretrained_cfg["tag"] == "tv_in1k"  # timm's default data config (mean/std) still applies


def test_tag_resolution() -> None:
    assert split_name("inception_v3", True) == ("inception_v3", "tv_in1k")
    assert split_name("inception_v3", "gluon_in1k") == ("inception_v3", "gluon_in1k")
    assert split_name("inception_v3.tf_in1k", True) == ("inception_v3", "tf_in1k")
    assert split_name("resnet18", True) == ("resnet18", timm.models.get_pretrained_cfg("resnet18").tag)
    assert split_name("inception_v3", False) == ("inception_v3", None)
    with pytest.raises(ValueError, match="names tag"):
        split_name("inception_v3.tf_in1k", "tv_in1k")
    with pytest.raises(PretrainedWeightsError, match="tv_in1k"):
        check_pretrained_available("inception_v3", "no_such_tag")
    with pytest.raises(PretrainedWeightsError, match="model.pretrained_file"):
        check_pretrained_available("inception_v3", False, "/nonexistent/weights.pth")
    assert check_pretrained_available("inception_v3", False) is None


@pytest.mark.parametrize("offline", [None, "1"])
def test_offline_pretrained_fails_fast_with_the_fix(no_caches: Path, monkeypatch: pytest.MonkeyPatch,
                                                    offline: str | None) -> None:
    if backbone._reachable("https://huggingface.co") is None:
        pytest.skip("huggingface.co is reachable: the offline path cannot be exercised here")
    if offline is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    started = time.perf_counter()
    with pytest.raises(PretrainedWeightsError, match="model.pretrained_file") as info:
        create_backbone(pretrained=True)
    assert time.perf_counter() - started < 5
    assert "inception_v3.tv_in1k" in str(info.value)


def test_cached_hub_weights_load_without_network(imagenet_like, no_caches: Path, monkeypatch) -> None:
    path, state = imagenet_like
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = no_caches / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / TV_FILE).symlink_to(path)
    assert check_pretrained_available("inception_v3", True) == f"cache:{hub / TV_FILE}"
    _assert_trunk_equal(create_backbone(pretrained=True, aux_logits=True), state)
    # The Hugging Face cache layout is found first.
    snapshot = no_caches / "hf" / "models--timm--inception_v3.tv_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "pytorch_model.bin").symlink_to(path)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    assert check_pretrained_available("inception_v3", "tv_in1k") == f"cache:{snapshot / 'pytorch_model.bin'}"


def test_reachable_hub_downloads_through_huggingface_hub(imagenet_like, no_caches: Path, monkeypatch) -> None:
    """The real download path, with the transport replaced: safetensors first, then pytorch_model.bin."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    path, state = imagenet_like
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(backbone, "_reachable", lambda url: None)
    asked: list[tuple[str, str]] = []

    def fake_download(repo_id: str, filename: str, revision: str | None = None) -> str:
        asked.append((repo_id, filename))
        if filename.endswith(".safetensors"):
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert check_pretrained_available("inception_v3", True) == "hf-hub:timm/inception_v3.tv_in1k"
    model = create_backbone(pretrained=True, aux_logits=True)
    assert asked == [("timm/inception_v3.tv_in1k", "model.safetensors"),
                     ("timm/inception_v3.tv_in1k", "pytorch_model.bin")]
    _assert_trunk_equal(model, state)


#: (model, create_model kwargs, head_modules in registration order, head_names): what the hard-coded head table
#: found before heads came from timm's metadata; the discovery must keep finding exactly this.
HEADS = [
    ("inception_v3", {"aux_logits": True}, ["AuxLogits", "global_pool", "head_drop", "fc"], ["fc", "AuxLogits.fc"]),
    ("inception_v3", {}, ["global_pool", "head_drop", "fc"], ["fc"]),
    ("resnet18", {}, ["global_pool", "fc"], ["fc"]),
    ("vit_tiny_patch16_224", {}, ["fc_norm", "head_drop", "head"], ["head"]),
    ("vit_tiny_patch16_224", {"global_pool": "avg"}, ["fc_norm", "head_drop", "head"], ["head"]),
    ("convnext_atto", {}, ["head"], ["head.fc"]),
    ("test_convnext", {}, ["head"], ["head.fc"]),
    ("efficientnet_b0", {}, ["global_pool", "classifier"], ["classifier"]),
    ("deit_tiny_distilled_patch16_224", {}, ["fc_norm", "head_drop", "head", "head_dist"], ["head", "head_dist"]),
]


def _meta_model(name: str, **kwargs) -> torch.nn.Module:
    """A timm model with pretrained=False on the meta device: names and identities only, no memory, no init."""
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, num_classes=4, **kwargs)


@pytest.mark.parametrize(("name", "kwargs", "modules", "names"), HEADS, ids=lambda v: str(v) if v else "")
def test_heads_come_from_timms_metadata(name: str, kwargs: dict, modules: list[str], names: list[str]) -> None:
    model = _meta_model(name, **kwargs)
    assert head_modules(model) == modules and head_names(model) == names
    classifiers = model.get_classifier()
    classifiers = classifiers if isinstance(classifiers, tuple) else (classifiers,)
    assert [model.get_submodule(n) for n in classifier_names(model)] == list(classifiers)  # found by identity
    # the class-count heads (aux aside) hold exactly the parameters get_classifier() returns, and they train
    heads = [p for n in names if not n.startswith("AuxLogits.") for p in model.get_submodule(n).parameters()]
    expected = [p for c in classifiers for p in c.parameters()]
    assert [id(p) for p in heads] == [id(p) for p in expected] and heads
    head_params = {id(p) for n in modules for p in model.get_submodule(n).parameters()}
    assert {id(p) for p in expected} <= head_params
    # only the table's modules are named without timm's metadata, and the trunk blocks never overlap the heads
    described = {n.split(".", 1)[0] for n in [*head_names(model), *classifier_names(model)]}
    assert set(modules) - described <= set(UNDESCRIBED_HEAD_MODULES)
    assert not {b.split(".", 1)[0] for b, _ in backbone_blocks(model)} & set(modules)  # heads are never blocks


def test_head_names_fall_back_to_get_classifier_without_a_pretrained_cfg_entry() -> None:
    model = _meta_model("resnet18")
    model.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k != "classifier"}
    assert head_names(model) == ["fc"] and head_modules(model) == ["global_pool", "fc"]
    assert classifier_names(torch.nn.Linear(2, 2)) == []  # not a timm model: no metadata, no heads


def test_a_trunk_stage_named_head_is_not_a_head() -> None:
    """The one family where the name table and timm's metadata disagree: SelecSLS calls its last conv stage
    `head` (its classifier is `fc`); it is part of the trunk, so freezing counts it as a block."""
    model = _meta_model("selecsls42")
    assert head_modules(model) == ["global_pool", "head_drop", "fc"] and classifier_names(model) == ["fc"]
    assert [b for b, _ in backbone_blocks(model)][-4:] == ["head.0", "head.1", "head.2", "head.3"]
