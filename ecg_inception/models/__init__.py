"""Models: timm backbone, freezing, EcgClassifier, metrics."""
