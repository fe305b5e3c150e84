"""Data layer: scan, audit, duplicates, crop, split, transforms, caches, datamodule."""
