"""The trunk-feature room: a data source that serves the frozen trunk's outputs, which the model's tail consumes.

- `trunk_cache`: the on-disk fp16 cache of frozen-prefix activations and `TrunkCachedDataModule`, which trains
  the tail on them; `use_trunk_cache` decides (from plain values) whether a fit uses it;
- `trunk_views`: pre-drawn augmented views, the epoch-aware sampler and `DelegatingDataModule`.

It sits above `models/` (it cuts the model with `models.trunk`) and below `inference/` and `training.py`.
"""
