"""Compare float32, mixed_bfloat16 and pure bf16 on your own Keras model.

A model and data defined here, outside tf_bf16 -- a small MLP on scikit-learn's
bundled 8x8 handwritten digits (no download) -- handed to `tf_bf16.compare`,
which trains it from the same initial weights and in the same data order in
float32, Keras's mixed_bfloat16, and pure bf16 rounded to nearest, with
stochastic rounding and with Kahan summation, then prints the table (accuracy,
gap to float32, training-state bytes per parameter, time) and writes the
learning curves:

    python examples/compare_own_model.py [--epochs 20] [--out out/compare_own_model]

The same two functions work from the command line:

    python -m tf_bf16 compare --model examples/compare_own_model.py:build_model \\
        --data examples/compare_own_model.py:load_data --epochs 20 --out out/mine
"""

import argparse

import keras
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import tf_bf16


def build_model():
    """A new model each call, built under whatever dtype policy is in force."""
    model = keras.Sequential([
        keras.Input(shape=(64,)),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10),
    ])
    model.compile(optimizer=keras.optimizers.AdamW(learning_rate=1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def load_data():
    """Training and validation arrays (a fixed 75/25 split)."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
    return {"train": (x_train, y_train), "validation": (x_test, y_test)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per epoch (default: the whole training set)")
    parser.add_argument("--out", default="out/compare_own_model",
                        help="where to write results.json, results.md and curves.png")
    args = parser.parse_args()

    result = tf_bf16.compare(build_model, load_data(), epochs=args.epochs,
                             steps_per_epoch=args.steps, out=args.out)

    # The optimizer comes from build_model's compile: Keras AdamW for float32
    # and mixed_bfloat16, tf_bf16's AdamW for the bf16 variants.
    for variant in ("stochastic", "kahan"):
        print(f"{variant}: {100 * result.gaps[variant]:+.2f} percentage points vs float32")
    state = {v: r["bytes_per_parameter"] for v, r in result.variants.items()}
    print(f"training-state bytes per parameter: {state}")
    assert list(result.variants) == ["float32", "mixed_bfloat16", "nearest", "stochastic",
                                     "kahan"]
    assert state == {"float32": 12, "mixed_bfloat16": 12, "nearest": 6, "stochastic": 6,
                     "kahan": 8}, state


if __name__ == "__main__":
    main()
