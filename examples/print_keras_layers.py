"""Print the tail of Keras' InceptionV3 `base.layers`, the record behind tests/fixtures/keras_inception_v3_last10.json.

The seed froze `keras.applications.InceptionV3(include_top=False)` with
`for layer in base.layers[:-10]: layer.trainable = False`. This script builds that base in a fresh session (so the
layers get the auto-names the fixture and `KERAS_MIXED10` use: conv2d_85 ... mixed10) and prints, as JSON,
`base.layers[-10:]` with each layer's class and weights (name, shape, trainable), the six layers before them for
context, and the last ten layers of the seed's whole model (base + GlobalAveragePooling2D, Dropout, Dense(4)) for
the reading in which the freeze loop also counted the head (docs/freezing.md).

Keras is not a dependency of this package. Install it outside the project environment and point Python at it; it
runs on the environment's torch (no TensorFlow needed), about 30 s on 2 CPU cores, no network (`weights=None`):

    pip install --target /tmp/kerasdir keras
    PYTHONPATH=/tmp/kerasdir KERAS_BACKEND=torch python examples/print_keras_layers.py

The tests never import this script; they read the fixture it produced.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any


def describe(layer: Any, position: int) -> dict[str, Any]:
    """One layer: position in the list, name, class, weights (all, trainable ones, shapes; BN channels)."""
    entry: dict[str, Any] = {
        "position": position,
        "name": layer.name,
        "class": type(layer).__name__,
        "weights": [w.name for w in layer.weights],
    }
    if layer.weights:
        entry["trainable_weights"] = [w.name for w in layer.weights if w.trainable]
        entry["shapes"] = {w.name: list(w.shape) for w in layer.weights}
    if type(layer).__name__ == "BatchNormalization":
        entry["channels"] = int(layer.weights[0].shape[-1])
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--last", type=int, default=10, help="how many trailing layers to record (default 10)")
    parser.add_argument("--context", type=int, default=6, help="layers before those to list for context")
    args = parser.parse_args(argv)
    try:
        import keras
    except ImportError:
        print("Keras is not importable: pip install --target /tmp/kerasdir keras, then "
              "PYTHONPATH=/tmp/kerasdir KERAS_BACKEND=torch python examples/print_keras_layers.py", file=sys.stderr)
        return 2

    base = keras.applications.InceptionV3(include_top=False, weights=None, input_shape=(299, 299, 3))
    n = len(base.layers)
    x = keras.layers.GlobalAveragePooling2D()(base.output)
    x = keras.layers.Dropout(0.5)(x)
    model = keras.Model(base.input, keras.layers.Dense(4, activation="softmax")(x))
    first = n - args.last
    record = {
        "what": f"base.layers[-{args.last}:] of keras.applications.InceptionV3(include_top=False, weights=None, "
                "input_shape=(299, 299, 3)) in a fresh session (auto-names), with the weights each layer owns",
        "keras_version": keras.__version__,
        "backend": keras.backend.backend(),
        "date": datetime.date.today().isoformat(),
        "base_layer_count": n,
        "preceding": [describe(layer, i - n) for i, layer in enumerate(base.layers[first - args.context:first],
                                                                      start=first - args.context)],
        "layers": [describe(layer, i - n) for i, layer in enumerate(base.layers[first:], start=first)],
        "with_head": {
            "what": f"model.layers[-{args.last}:] of base + GlobalAveragePooling2D, Dropout, Dense(4)",
            "layers": [f"{layer.name} ({type(layer).__name__})" for layer in model.layers[-args.last:]],
        },
    }
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
