"""Export a pure-bfloat16 Keras model to a SavedModel and serve it.

Trains a small model on scikit-learn's bundled digits under
`tf_bf16.set_policy()`, exports it with `model.export(path)` (a TensorFlow
SavedModel with a `serve` endpoint), loads it back with
`tf.saved_model.load(path)` as a serving process would, and checks that
`serve(x)` returns the same bfloat16 outputs as `model.predict(x)`. Serving
needs only TensorFlow: the tf_bf16 op library is used by training, not by the
exported graph.

    python examples/export_and_serve.py [--epochs 10] [--dir /tmp/tf_bf16_served]
"""

import argparse
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import tf_bf16


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--dir", default=None, help="export directory (default: a temp dir)")
    args = parser.parse_args()
    path = os.path.join(args.dir or tempfile.mkdtemp(prefix="tf_bf16_export_"), "digits")

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)

    tf_bf16.set_policy()
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input(shape=(64,)),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10),
    ])
    model.compile(optimizer=tf_bf16.optimizers.Adam(1e-3, seed=0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, batch_size=32, epochs=args.epochs, verbose=0)

    model.export(path, verbose=False)  # SavedModel; `serve` takes float32 [batch, 64]

    served = tf.saved_model.load(path)  # what a serving process does
    served_logits = served.serve(tf.constant(x_test)).numpy()
    predicted_logits = model.predict(x_test, verbose=0)
    print(f"exported to {path}")
    print(f"serve() output dtype {served_logits.dtype}, predict() output dtype "
          f"{predicted_logits.dtype}")
    equal = np.array_equal(served_logits.view(np.uint16), predicted_logits.view(np.uint16))
    print(f"serve() equals predict() bit for bit: {equal}")
    accuracy = np.mean(np.argmax(served_logits.astype(np.float32), axis=1) == y_test)
    print(f"served test accuracy {accuracy:.4f}")
    assert str(served_logits.dtype) == "bfloat16" and equal


if __name__ == "__main__":
    main()
