"""A TensorFlow Datasets input pipeline feeding pure-bfloat16 training.

Loads MNIST with `tfds.load` (from $TFDS_DATA_DIR or ~/tensorflow_datasets;
nothing is downloaded unless you pass --download), builds the usual pipeline
(normalize -> cache -> seeded shuffle -> batch -> prefetch) and trains a small
CNN under `tf_bf16.set_policy()`.

If MNIST is not prepared on this machine (and --download is not given), the
script says so and runs the same pipeline on `tfds.testing.mock_data`: random
images with the real dataset's shapes and dtypes. That shows the pipeline works,
but the accuracy on random data means nothing (~10%). To get the real data, run
once on a machine with internet:

    python -c "import tensorflow_datasets as tfds; tfds.load('mnist')"

    python examples/tfds_pipeline.py [--epochs 2] [--download]
"""

import argparse
import contextlib
import os

import keras
import tensorflow as tf
import tensorflow_datasets as tfds

import tf_bf16


def pipeline(split_ds, batch_size, seed=None, shuffle=False):
    def normalize(image, label):
        return tf.cast(image, tf.float32) / 255.0, label

    ds = split_ds.map(normalize, num_parallel_calls=tf.data.AUTOTUNE).cache()
    if shuffle:
        ds = ds.shuffle(10_000, seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--download", action="store_true",
                        help="download and prepare MNIST if it is missing (needs internet)")
    parser.add_argument("--mock-examples", type=int, default=512,
                        help="examples per split when running on mock data")
    args = parser.parse_args()

    data_dir = os.environ.get("TFDS_DATA_DIR") or None
    prepared = tfds.builder("mnist", data_dir=data_dir).is_prepared()
    if prepared or args.download:
        data = contextlib.nullcontext()
        print("Using the real MNIST data.")
    else:
        data = tfds.testing.mock_data(num_examples=args.mock_examples)
        print("MNIST is not prepared here: running on tfds.testing.mock_data (random images;\n"
              "the accuracy below is meaningless). Get the data with\n"
              "    python -c \"import tensorflow_datasets as tfds; tfds.load('mnist')\"")

    with data:
        train, test = tfds.load("mnist", split=["train", "test"], as_supervised=True,
                                data_dir=data_dir, download=args.download)
        train = pipeline(train, batch_size=128, seed=0, shuffle=True)
        test = pipeline(test, batch_size=512)

        tf_bf16.set_policy()
        keras.utils.set_random_seed(0)
        model = keras.Sequential([
            keras.Input(shape=(28, 28, 1)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10),
        ])
        model.compile(optimizer=tf_bf16.optimizers.SGD(0.05, momentum=0.9, seed=0),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        model.fit(train, epochs=args.epochs, verbose=2)
        loss, accuracy = model.evaluate(test, verbose=0)
    print(f"test loss {loss:.4f}, test accuracy {accuracy:.4f}"
          + ("" if prepared or args.download else " (mock data)"))


if __name__ == "__main__":
    main()
