"""Split a timm classifier into a frozen prefix (image -> cacheable tensors) and a trainable tail.

When the first stages of the backbone are frozen and in inference mode, their output is a pure function of the
image: it can be computed once (see `features.trunk_cache`) and training then only runs the tail. `TrunkSplit`
does both halves so that `tail(prefix(x))` equals `model(x)` in eval mode, aux logits included.

Stages are the backbone's top-level feature modules in forward order, parameter-free pools included (timm's
InceptionV3 `layer_names`; for other models the top-level children in call order, each plain `nn.Sequential`
opened one level, checked numerically against the full forward). Heads and `AuxLogits` are never stages.
`plan_trunk_cache` decides, from the freezing, the augmentation and `model.trunk_cache`, where (and whether)
to cut; `features.trunk_cache` stores the prefix outputs and serves them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ecg_inception.models.freezing import call_order, head_modules, tracing

#: Boundary name for "everything up to the head is frozen": the cached tensor is the (pooled) final feature map.
HEAD = "head"
#: `TrunkFeatures.start` of globally pooled features: the tail is the head's dropout and classifier only.
POOLED = "pooled"
#: Top-level module whose output feeds timm InceptionV3's aux head (`AuxLogits(forward_preaux(x))`).
INCEPTION_AUX_TAP = "Mixed_6e"
_STOCHASTIC = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


@dataclass
class TrunkFeatures:
    """A batch of cached prefix outputs: what the tail needs instead of images.

    `start` names the first tail stage (or `HEAD`), so that features cut elsewhere are refused, not misused.
    Lightning moves dataclasses of tensors to the device field by field.
    """

    features: torch.Tensor
    aux_input: torch.Tensor | None = None
    start: str = ""

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def pin_memory(self) -> TrunkFeatures:
        """Page-locked copies (DataLoader `pin_memory=True`)."""
        aux = None if self.aux_input is None else self.aux_input.pin_memory()
        return TrunkFeatures(self.features.pin_memory(), aux, self.start)


def _is_inception(model: nn.Module) -> bool:
    return hasattr(model, "layer_names") and hasattr(model, "forward_preaux") and hasattr(model, "AuxLogits")


def trunk_stages(model: nn.Module) -> list[str]:
    """The backbone's top-level stage names in forward order, pools included, heads and aux excluded."""
    if _is_inception(model):
        return list(model.layer_names)
    skip = set(head_modules(model))
    order = [n for n in call_order(model) if "." not in n and n not in skip]
    stages: list[str] = []
    for name in order:
        child = model.get_submodule(name)
        if type(child) is nn.Sequential and len(child):
            stages += [f"{name}.{sub}" for sub, _ in child.named_children()]
        else:
            stages.append(name)
    return stages


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def frozen_boundary(model: nn.Module, stages: list[str] | None = None) -> str | None:
    """The last stage before the first stage with a trainable parameter (`HEAD` when none trains).

    None when the very first stage trains: then there is no frozen prefix to cache.
    """
    stages = stages if stages is not None else trunk_stages(model)
    for i, name in enumerate(stages):
        if _trainable(model.get_submodule(name)):
            return stages[i - 1] if i else None
    return HEAD


def _poolable(model: nn.Module) -> bool:
    """True when the head is `global_pool -> head_drop -> classifier` with a parameter-free pool."""
    pool = getattr(model, "global_pool", None)
    if pool is None or not hasattr(model, "head_drop") or not hasattr(model, "get_classifier"):
        return False
    if next(iter(pool.parameters()), None) is not None or getattr(pool, "is_identity", lambda: False)():
        return False
    extra = set(head_modules(model)) - {"global_pool", "head_drop", "fc", "head", "classifier", "AuxLogits"}
    return not extra


class TrunkSplit:
    """A timm model cut after stage `boundary`: `prefix(images) -> TrunkFeatures`, `tail(features) -> output`.

    `boundary`: the name of the last prefix stage (its output is what gets cached) or `HEAD` for everything up
    to the head. With `HEAD`, `pooled=True` (the default where the head is pool -> dropout -> fc) caches the
    globally pooled vector, so the tail is dropout + fc (+ the aux head). When the aux head's input (InceptionV3:
    the output of Mixed_6e) lies inside the prefix, it is cached too; the aux head itself always runs in the tail.
    `tail` returns what `model(x)` returns: `(logits, aux_logits)` when the model has aux logits on, else logits.
    """

    def __init__(self, model: nn.Module, boundary: str, pooled: bool | None = None, verify: bool | None = None):
        self.model = model
        self.stages = trunk_stages(model)
        if boundary != HEAD and boundary not in self.stages:
            raise ValueError(f"boundary {boundary!r} is not a stage of {type(model).__name__}: {self.stages}")
        self.boundary = boundary
        self.cut = len(self.stages) if boundary == HEAD else self.stages.index(boundary) + 1
        poolable = boundary == HEAD and _poolable(model)
        if pooled and not poolable:
            raise ValueError(f"pooled features need boundary={HEAD!r} and a pool -> dropout -> fc head")
        self.pooled = poolable if pooled is None else bool(pooled)
        if boundary == HEAD and not self.pooled:  # the unpooled final feature map: a cut after the last stage
            self.boundary = self.stages[-1]
        self.aux_tap = INCEPTION_AUX_TAP if _is_inception(model) else None
        tap = self.stages.index(self.aux_tap) if self.aux_tap in self.stages else None
        self._tap = tap
        #: The aux head's input is cached as its own tensor (it lies strictly inside the prefix).
        self.caches_aux = self.aux_on and tap is not None and tap < self.cut - 1
        self._state_memo: tuple[tuple[tuple[int, int], ...], str] | None = None
        if verify if verify is not None else not _is_inception(model):
            self.verify()

    # ------------------------------------------------------------------------------------------ description
    @property
    def aux_on(self) -> bool:
        """Whether the model returns aux logits (timm InceptionV3 with `aux_logits=True`)."""
        return bool(getattr(self.model, "aux_logits", False)) and getattr(self.model, "AuxLogits", None) is not None

    @property
    def start(self) -> str:
        """The first tail stage; `HEAD` for the final feature map, `POOLED` for the pooled vector."""
        if self.cut < len(self.stages):
            return self.stages[self.cut]
        return POOLED if self.pooled else HEAD

    def prefix_names(self) -> list[str]:
        """Modules whose output the cache replaces, in forward order (`global_pool` last when pooled)."""
        return self.stages[: self.cut] + (["global_pool"] if self.pooled else [])

    def describe(self) -> dict[str, object]:
        """A plain description of the cut, part of the cache key."""
        arch = (getattr(self.model, "pretrained_cfg", None) or {}).get("architecture") or type(self.model).__name__
        return {"arch": arch, "prefix": self.prefix_names(), "start": self.start, "pooled": self.pooled,
                "aux_input": self.aux_tap if self.caches_aux else None}

    def nondeterminism(self) -> list[str]:
        """Why the prefix is not a pure function of its input during training (empty when it is)."""
        reasons = []
        for stage in self.prefix_names():
            for name, module in self.model.get_submodule(stage).named_modules():
                where = f"{stage}.{name}".rstrip(".")
                own = list(module.parameters(recurse=False))
                if any(p.requires_grad for p in own):
                    reasons.append(f"{where} has trainable parameters")
                elif isinstance(module, _BatchNorm) and (not own or not module.track_running_stats):
                    reasons.append(f"{where} is a BatchNorm without parameters or running statistics (it would "
                                   "normalise with batch statistics)")
                elif isinstance(module, _STOCHASTIC) and module.p > 0:
                    reasons.append(f"{where} is a dropout layer (p={module.p})")
                elif float(getattr(module, "drop_prob", 0.0) or 0.0) > 0:
                    reasons.append(f"{where} drops paths (drop_prob={module.drop_prob})")
        return reasons

    def prefix_state_hash(self) -> str:
        """SHA-256 of the prefix's parameters and buffers (names, dtypes, shapes, bytes), memoised by version."""
        tensors = [(f"{stage}.{k}", v) for stage in self.prefix_names()
                   for k, v in self.model.get_submodule(stage).state_dict(keep_vars=True).items()]
        stamp = tuple((id(v), v._version) for _, v in tensors)
        if self._state_memo is not None and self._state_memo[0] == stamp:
            return self._state_memo[1]
        digest = hashlib.sha256()
        for name, value in tensors:
            data = value.detach().cpu().contiguous()
            digest.update(f"{name}|{data.dtype}|{tuple(data.shape)}\n".encode())
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
        self._state_memo = (stamp, digest.hexdigest())
        return self._state_memo[1]

    # ---------------------------------------------------------------------------------------------- compute
    def prefix(self, x: torch.Tensor) -> TrunkFeatures:
        """Run the prefix on images (the caller picks eval mode and no_grad)."""
        aux_input = None
        for i, name in enumerate(self.stages[: self.cut]):
            x = self.model.get_submodule(name)(x)
            if self.caches_aux and i == self._tap:
                aux_input = x
        if self.pooled:
            x = self.model.global_pool(x)
        return TrunkFeatures(x, aux_input, self.start)

    def tail(self, feats: TrunkFeatures) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Run the tail on cached prefix outputs; the same output structure as `model(images)`."""
        if feats.start and feats.start != self.start:
            raise ValueError(f"features cut before {feats.start!r} fed to a tail that starts at {self.start!r}")
        dtype = next(self.model.parameters()).dtype
        x = feats.features.to(dtype)
        aux_input = feats.aux_input.to(dtype) if feats.aux_input is not None else None
        if self.aux_on and self._tap is not None and self._tap == self.cut - 1:
            aux_input = x
        for i in range(self.cut, len(self.stages)):
            x = self.model.get_submodule(self.stages[i])(x)
            if i == self._tap:
                aux_input = x
        if self.pooled:
            x = self.model.get_classifier()(self.model.head_drop(x))
        else:
            x = self.model.forward_head(x)
        if not self.aux_on:
            return x
        if aux_input is None:
            raise ValueError("the model has aux logits on but these cached features carry no aux-head input")
        return x, self.model.AuxLogits(aux_input)

    def verify(self, size: int | None = None, atol: float = 1e-4) -> None:
        """Check tail(prefix(x)) == model(x) in eval mode on a dummy input; ValueError when it is not."""
        with tracing(self.model) as dummy:
            if size is not None:
                dummy = dummy.new_zeros(1, dummy.shape[1], size, size)
            dummy = dummy.normal_(generator=torch.Generator(dummy.device).manual_seed(0))
            full = self.model(dummy)
            ours = self.tail(self.prefix(dummy))
        full_t = full if isinstance(full, (tuple, list)) else (full,)
        ours_t = ours if isinstance(ours, (tuple, list)) else (ours,)
        pairs = zip(full_t, ours_t, strict=False)
        if len(full_t) != len(ours_t) or any(
            a.shape != b.shape or not torch.allclose(a, b, atol=atol, rtol=1e-4) for a, b in pairs
        ):
            raise ValueError(f"{type(self.model).__name__} is not a sequential composition of its top-level stages "
                             f"{self.stages}: prefix + tail does not reproduce its forward; no trunk cache for it")


# ------------------------------------------------------------------------------------------------ planning
CACHE_MODES = ("auto", "on", "off")
#: Pre-drawn augmented views per training image when `trunk_cache: on` meets augmentation without a view count.
DEFAULT_VIEWS = 4
_WORDS = {"on": "on", "true": "on", "yes": "on", "1": "on", "off": "off", "false": "off", "no": "off", "0": "off",
          "auto": "auto", "": "auto", "none": "auto", "null": "auto"}


def parse_trunk_cache(value: bool | str | None) -> str:
    """`model.trunk_cache` -> "auto" | "on" | "off"; YAML booleans and the strings on/off/auto (any case)."""
    if value is None or isinstance(value, bool):
        return "auto" if value is None else ("on" if value else "off")
    mode = _WORDS.get(str(value).strip().lower()) if isinstance(value, str) else None
    if mode is None:
        raise ValueError(f"model.trunk_cache must be auto, on or off (or true/false), got {value!r}")
    return mode


TRUNK_CACHE_VERIFY = ("stat", "full")


def parse_verify(value: str | None) -> str:
    """`model.trunk_cache_verify` -> "stat" (null too) | "full"; see `trunk_cache.TrunkCacheStore`."""
    if value is None:
        return "stat"
    mode = value.strip().lower() if isinstance(value, str) else None
    if mode not in TRUNK_CACHE_VERIFY:
        raise ValueError(f"model.trunk_cache_verify must be stat or full, got {value!r}")
    return mode


def parse_views(value: int | str | None) -> int | None:
    """`model.trunk_cache_views` -> None (not set) or an integer >= 1."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null")):
        return None
    if isinstance(value, bool) or not str(value).strip().isdigit() or int(value) < 1:
        raise ValueError(f"model.trunk_cache_views must be an integer >= 1 or null, got {value!r}")
    return int(value)


@dataclass
class TrunkCachePlan:
    """What the trunk cache will do for one fit: a split (None = off), the view count, and why."""

    mode: str
    split: TrunkSplit | None
    views: int = 1
    augmented: bool = False
    reason: str = ""


def _later_trainable(model: nn.Module, schedule: dict | None) -> list[str] | None:
    """Block names a gradual-unfreezing schedule will train at some epoch; None when it trains everything."""
    from ecg_inception.models.freezing import backbone_blocks

    targets = list((schedule or {}).get("schedule", {}).values())
    if any(str(t).strip().lower() == "all" for t in targets):
        return None
    blocks = [n for n, _ in backbone_blocks(model)]
    most = max((int(t) for t in targets), default=0)
    return blocks[len(blocks) - min(most, len(blocks)):] if most else []


def plan_trunk_cache(
    model: nn.Module, mode: bool | str | None, views: int | str | None = None, augment: bool = False,
    gradual_unfreeze: dict | None = None, page_augment: bool = False,
) -> TrunkCachePlan:
    """Decide whether (and where) to cache the frozen trunk; `on` raises where the cache cannot be valid.

    The cut lies before the first stage that trains now or under the gradual-unfreezing schedule. With
    train-time augmentation the cache holds `views` pre-drawn views (epoch e trains on view e % views); `auto`
    without a view count stays off rather than silently train on unaugmented images. Page-level augmentation
    (`page_augment`, drawn on the decoded page before preprocessing) has no pre-drawn views: no cache.
    """
    mode, views = parse_trunk_cache(mode), parse_views(views)
    if mode == "off":
        return TrunkCachePlan(mode, None, reason="trunk cache off (model.trunk_cache=off)")
    stages = trunk_stages(model)
    later = _later_trainable(model, gradual_unfreeze)
    cut = len(stages)
    for i, name in enumerate(stages):
        soon = later is None or any(b == name or b.startswith(f"{name}.") or name.startswith(f"{b}.") for b in later)
        if soon or _trainable(model.get_submodule(name)):
            cut = i
            break
    why = ""
    if cut == 0:
        why = f"the first stage {stages[0]!r} trains (now or under gradual_unfreeze): no frozen trunk to cache"
    else:
        split = TrunkSplit(model, stages[cut - 1] if cut < len(stages) else HEAD)
        if problems := split.nondeterminism():
            why = "the frozen prefix is not deterministic: " + "; ".join(problems[:3])
    if not why and page_augment:
        why = "data.page_augment redraws every training page before preprocessing: no features to cache"
    if why:
        if mode == "on":
            raise ValueError(f"model.trunk_cache=on but {why}")
        return TrunkCachePlan(mode, None, reason=f"trunk cache off: {why}")
    if not augment:
        note = f" (trunk_cache_views={views} ignored: augmentation is off)" if views and views > 1 else ""
        return TrunkCachePlan(mode, split, 1, False, f"trunk cache on: tail starts at {split.start!r}{note}")
    if views is None and mode == "auto":
        return TrunkCachePlan(mode, None, reason="trunk cache off: train-time augmentation is on and "
                              "model.trunk_cache_views is not set (set it, e.g. 4, to train on pre-drawn views)")
    views = views or DEFAULT_VIEWS
    return TrunkCachePlan(mode, split, views, True, (
        f"trunk cache on: tail starts at {split.start!r}; TRAINING ON {views} PRE-DRAWN AUGMENTED VIEWS per image "
        f"(epoch e uses view e % {views} for every image), not on fresh augmentation each epoch"))
