"""timm backbone creation with ImageNet weights from a hub tag or a local file, and head adaptation.

Weights are always loaded by this module (never by timm's non-strict loader) so that every missing or unexpected
key is checked: only the classifier heads (`fc`, `AuxLogits.fc`) may differ, and only the aux branch may be absent.
Without network the hub path fails within seconds with a message that names `model.pretrained_file`.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from ecg_inception.errors import PretrainedWeightsError

log = logging.getLogger(__name__)

#: Default tag per architecture for `pretrained=True` (else timm's default tag); tv_in1k carries aux weights.
DEFAULT_TAGS: dict[str, str] = {"inception_v3": "tv_in1k"}
#: Seconds to wait for a TCP connection to the weight host before declaring it unreachable.
PROBE_TIMEOUT_S = 2.0
AUX_PREFIX = "AuxLogits."
_HF_FILES = ("model.safetensors", "pytorch_model.bin")
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")


@dataclass
class LoadReport:
    """What loading a checkpoint file did: which heads were re-initialised and what was ignored."""

    path: str
    loaded: int = 0
    reinitialised: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    random_aux: bool = False


def _fix_hint(what: str) -> str:
    return (
        f"{what} Fix: give a local 1000-class timm/torchvision checkpoint with "
        "model.pretrained_file=/path/to/weights.pth (e.g. inception_v3_google-1a9a5a14.pth or the "
        "timm/inception_v3.tv_in1k model.safetensors), or copy a Hugging Face / torch hub cache that holds the "
        "weights to this machine, or set model.pretrained=false for a random init (then train the whole network: "
        "model/unfreeze=all)."
    )


def _is_offline_env() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set now, or when huggingface_hub was imported."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def split_name(model_name: str, pretrained: bool | str | None) -> tuple[str, str | None]:
    """(architecture, tag or None): `pretrained=True` -> the name's tag, else DEFAULT_TAGS, else timm's default."""
    arch, name_tag = timm.models.split_model_name_tag(model_name)
    if pretrained is None or pretrained is False:
        return arch, name_tag or None
    if isinstance(pretrained, str):
        if name_tag and name_tag != pretrained:
            raise ValueError(f"model_name={model_name!r} names tag {name_tag!r} but pretrained={pretrained!r}")
        return arch, pretrained
    if name_tag:
        return arch, name_tag
    if arch in DEFAULT_TAGS:
        return arch, DEFAULT_TAGS[arch]
    cfg = timm.models.get_pretrained_cfg(arch)
    return arch, (cfg.tag if cfg is not None else None)


def _pretrained_cfg(arch: str, tag: str | None):
    try:
        cfg = timm.models.get_pretrained_cfg(f"{arch}.{tag}" if tag else arch)
    except RuntimeError:  # timm: invalid tag for a known architecture
        cfg = None
    if cfg is None:
        known = timm.list_pretrained(f"{arch}.*")
        raise PretrainedWeightsError(
            _fix_hint(f"timm has no pretrained weights {arch}.{tag}; tags with weights: {known or 'none'}.")
        )
    return cfg


def cached_weights(arch: str, tag: str | None) -> Path | None:
    """A local copy of the hub weights: the Hugging Face cache first, then the torch hub cache."""
    cfg = _pretrained_cfg(arch, tag)
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo, _, revision = cfg.hf_hub_id.partition("@")
        for filename in ((cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HF_FILES):
            hit = try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(hit, str) and os.path.isfile(hit):
                return Path(hit)
    if cfg.url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        if candidate.is_file():
            return candidate
    return None


def _probe(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when a TCP connection to host:port opens within `timeout` s (DNS included), else the reason."""
    result: list[str | None] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as exc:
            result.append(f"{type(exc).__name__}: {exc}")

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    return result[0] if result else f"no answer within {timeout:.0f} s"


def _reachable(url: str) -> str | None:
    """Probe the proxy if one is configured for the scheme, else the host itself; None when reachable."""
    parsed = urlparse(url)
    proxy = os.environ.get(f"{parsed.scheme}_proxy") or os.environ.get(f"{parsed.scheme.upper()}_PROXY")
    target = urlparse(proxy if "://" in (proxy or "") else f"http://{proxy}") if proxy else parsed
    port = target.port or (443 if target.scheme == "https" else 80)
    reason = _probe(target.hostname or "", port)
    return None if reason is None else f"{target.hostname}:{port} unreachable ({reason})"


def _hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def resolve_weights(model_name: str, pretrained: bool | str | None, pretrained_file: str | None = None) -> str | None:
    """Where the weights will come from ('file:...', 'cache:...', 'hf-hub:...', 'url:...'), None for random init.

    Raises PretrainedWeightsError, within a few seconds, when they cannot be had (missing file, no network).
    """
    if pretrained_file:
        path = Path(pretrained_file).expanduser()
        if not path.is_file():
            raise PretrainedWeightsError(_fix_hint(f"model.pretrained_file={pretrained_file}: no such file."))
        return f"file:{path}"
    if pretrained is None or pretrained is False:
        return None
    arch, tag = split_name(model_name, pretrained)
    cfg = _pretrained_cfg(arch, tag)
    hit = cached_weights(arch, tag)
    if hit is not None:
        return f"cache:{hit}"
    reasons: list[str] = []
    if _is_offline_env():
        reasons.append("HF_HUB_OFFLINE is set and the weights are not in the local caches")
    else:
        if cfg.hf_hub_id:
            why = _reachable(_hf_endpoint())
            if why is None:
                return f"hf-hub:{cfg.hf_hub_id}"
            reasons.append(why)
        if cfg.url:
            why = _reachable(cfg.url)
            if why is None:
                return f"url:{cfg.url}"
            reasons.append(why)
    from huggingface_hub import constants

    looked = f"{constants.HF_HUB_CACHE} and {Path(torch.hub.get_dir()) / 'checkpoints'}"
    raise PretrainedWeightsError(_fix_hint(
        f"Cannot obtain ImageNet weights {arch}.{tag}: {'; '.join(reasons) or 'no source'}; no cached copy in {looked}."
    ))


def check_pretrained_available(
    model_name: str, pretrained: bool | str | None, pretrained_file: str | None = None
) -> str | None:
    """Fail fast (before any data work) when the requested weights cannot be had; see `resolve_weights`."""
    source = resolve_weights(model_name, pretrained, pretrained_file)
    log.info("Backbone weights for %s: %s", model_name, source or "random init")
    return source


def _download(source: str, arch: str, tag: str | None) -> Path:
    """Download hub weights into the usual caches (Hugging Face or torch hub) and return the local file."""
    kind, _, where = source.partition(":")
    try:
        if kind == "hf-hub":
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError

            cfg = _pretrained_cfg(arch, tag)
            repo, _, revision = where.partition("@")
            names = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HF_FILES
            for i, filename in enumerate(names):
                try:
                    return Path(hf_hub_download(repo, filename, revision=revision or None))
                except EntryNotFoundError:
                    if i == len(names) - 1:
                        raise
        target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(where).path)
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(where, str(target), progress=True)
        return target
    except Exception as exc:  # any transport error becomes one actionable message
        raise PretrainedWeightsError(_fix_hint(f"Downloading {arch}.{tag} from {where} failed: {exc}.")) from exc


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A flat tensor dict from a .safetensors or torch file, unwrapping {'state_dict': ...}/{'model': ...}."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: object = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PretrainedWeightsError(f"{path}: cannot read a state dict ({exc})") from exc
    for _ in range(3):
        if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise PretrainedWeightsError(f"{path}: not a state dict (got {type(obj).__name__})")
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _strip_prefixes(sd: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Drop a common leading 'module.'/'model.'/'backbone.' component when that makes keys match the model."""
    for _ in range(2):
        heads = {k.split(".", 1)[0] for k in sd}
        if len(heads) != 1 or len(sd.keys() & model_keys) or not all("." in k for k in sd):
            break
        sd = {k.split(".", 1)[1]: v for k, v in sd.items()}
    return sd


def classifier_names(model: nn.Module) -> list[str]:
    """Names of the modules timm's `model.get_classifier()` returns, found by identity (`[]` without the method).

    A distilled model returns a tuple of classifiers (`["head", "head_dist"]`); a module registered twice keeps its
    first name (`named_modules` order).
    """
    get_classifier = getattr(model, "get_classifier", None)
    if not callable(get_classifier):
        return []
    found = get_classifier()
    found = tuple(found) if isinstance(found, tuple | list) else (found,)
    names = {id(m): n for n, m in model.named_modules() if n}
    return [names[id(m)] for m in found if isinstance(m, nn.Module) and id(m) in names]


def head_names(model: nn.Module) -> list[str]:
    """Classifier module names whose weights depend on the class count, from timm's metadata.

    `pretrained_cfg['classifier']` (the names timm's weight loading adapts to another class count; it names the
    final linear even where `get_classifier()` returns a larger block, e.g. MetaFormer's `head.fc.fc2` inside the
    MLP head `head.fc`), else, for a model without that entry, the modules `get_classifier()` returns; plus the
    aux head's `AuxLogits.fc` when the model has one (timm's InceptionV3 names it nowhere else).
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or ()
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        names = classifier_names(model)
    if getattr(model, "AuxLogits", None) is not None:
        names.append(AUX_PREFIX + "fc")
    return names


def load_pretrained_file(model: nn.Module, path: str | Path) -> LoadReport:
    """Load a local checkpoint into `model`, re-initialising heads of another shape; anything else must match."""
    path = Path(path).expanduser()
    target = model.state_dict()
    model_keys = set(target)
    sd = _strip_prefixes(_read_state_dict(path), model_keys)
    report = LoadReport(str(path))
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None and not model_keys & sd.keys():
        try:  # an original-format checkpoint (e.g. a ViT .npz port) that timm knows how to remap
            sd = dict(filter_fn(sd, model))
        except Exception as exc:  # the key check below reports the mismatch
            log.info("checkpoint_filter_fn of %s failed on %s: %s", type(model).__name__, path, exc)
    heads = tuple(f"{h}." for h in head_names(model))
    for key in [k for k in sd if k.startswith(heads)]:
        if key not in target or sd[key].shape != target[key].shape:
            sd.pop(key)
            (report.reinitialised if key in target else report.ignored).append(key)
    bad_shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(target[k].shape)}"
                  for k, v in sd.items() if k in target and v.shape != target[k].shape]
    missing = sorted(k for k in model_keys - sd.keys() if not k.endswith("num_batches_tracked"))
    unexpected = sorted(sd.keys() - model_keys)
    has_aux = getattr(model, "AuxLogits", None) is not None
    if not has_aux:  # aux weights in the file are simply not needed
        report.ignored += [k for k in unexpected if k.startswith(AUX_PREFIX)]
        unexpected = [k for k in unexpected if not k.startswith(AUX_PREFIX)]
    fatal_missing = [k for k in missing if not k.startswith(heads) and not (has_aux and k.startswith(AUX_PREFIX))]
    if fatal_missing or unexpected or bad_shapes:
        def show(keys: list[str]) -> str:
            return f"{len(keys)}: {keys[:8]}{' ...' if len(keys) > 8 else ''}"

        raise PretrainedWeightsError(
            f"{path} does not fit {type(model).__name__} ({getattr(model, 'pretrained_cfg', {}).get('architecture')}):"
            f" missing keys {show(fatal_missing)}; unexpected keys {show(unexpected)}; shape mismatches "
            f"{show(bad_shapes)}. Only the classifier heads {list(head_names(model))} may differ; is it a "
            "checkpoint of another architecture?"
        )
    aux_missing = [k for k in missing if k.startswith(AUX_PREFIX) and not k.startswith(heads)]
    if aux_missing:
        report.random_aux = True
        message = (f"{path} has no aux-classifier weights: AuxLogits is randomly initialised (its loss term only "
                   "shapes the trunk it can reach; use aux_logits=false or a tv_in1k checkpoint to avoid this)")
        warnings.warn(message, stacklevel=3)
        log.warning(message)
    model.load_state_dict(sd, strict=False)
    report.loaded = len(sd)
    if report.reinitialised:
        log.info("%s: re-initialised heads of another shape: %s", path, report.reinitialised)
    return report


def create_backbone(
    model_name: str = "inception_v3",
    num_classes: int = 4,
    aux_logits: bool = True,
    drop_rate: float = 0.5,
    pretrained: bool | str | None = "tv_in1k",
    pretrained_file: str | None = None,
) -> nn.Module:
    """A timm classifier for `num_classes`, with ImageNet weights from a tag (hub or cache) or a local file.

    `pretrained`: True -> the default tag (tv_in1k for inception_v3), a str -> that timm tag, False/None -> random
    init. `pretrained_file` wins over the hub (no network); the tag still selects timm's data config (mean/std).
    """
    source = resolve_weights(model_name, pretrained, pretrained_file)
    arch, tag = split_name(model_name, pretrained)
    kwargs: dict[str, object] = {"num_classes": num_classes, "drop_rate": drop_rate}
    if aux_logits:
        kwargs["aux_logits"] = True
    try:
        model = timm.create_model(f"{arch}.{tag}" if tag else arch, pretrained=False, **kwargs)
    except TypeError as exc:
        if aux_logits and "aux_logits" in str(exc):
            raise ValueError(f"{arch} has no auxiliary classifier: set aux_logits=false ({exc})") from exc
        raise
    if source is None:
        return model
    kind, _, where = source.partition(":")
    local = Path(where) if kind in ("file", "cache") else _download(source, arch, tag)
    load_pretrained_file(model, local)
    log.info("Loaded %s weights for %s from %s", tag or "file", arch, local)
    return model
