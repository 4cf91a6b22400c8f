"""Quickstart: train a Keras model in pure bfloat16 with tf_bf16.

The three-line recipe on an ordinary Keras model, with scikit-learn's bundled
8x8 handwritten digits (no download):

    tf_bf16.set_policy()                                   # every variable bf16
    model.compile(optimizer=tf_bf16.optimizers.AdamW(...)) # SR/Kahan fused updates
    model.fit(...); model.evaluate(...)                    # as usual

    python examples/quickstart.py [--epochs 20]
"""

import argparse

import keras
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import tf_bf16


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)

    tf_bf16.set_policy()  # 1. all-bfloat16 weights, optimizer state and compute
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input(shape=(64,)),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10),
    ])
    model.compile(  # 2. a tf_bf16 optimizer (Kahan-compensated updates by default)
        optimizer=tf_bf16.optimizers.AdamW(learning_rate=1e-3, seed=0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=32, epochs=args.epochs, verbose=0)  # 3. train
    loss, accuracy = model.evaluate(x_test, y_test, verbose=0)

    dtypes = sorted({v.dtype for v in model.variables + model.optimizer.variables
                     if len(v.shape) > 0})
    print(f"weight and optimizer-state dtypes: {dtypes}")
    print(f"test loss {loss:.4f}, test accuracy {accuracy:.4f}")
    assert dtypes == ["bfloat16"], dtypes


if __name__ == "__main__":
    main()
