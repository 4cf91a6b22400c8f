"""A small Conv-BatchNorm CNN on scikit-learn's bundled digits (8x8 images; no download).

1797 images, a fixed stratified 80/20 train/test split (the same for every
seed); the seed changes the initial weights and the data order. SGD with
momentum 0.9, learning rate 0.01, batch 32, 30 epochs. Metric: test accuracy
(360 test images: one image is 0.28 percentage points).

Model: two Conv2D(3x3, no bias) - BatchNormalization - ReLU - MaxPool blocks
(32 and 64 filters), Flatten, Dense(10). In plain bf16 the small weight
updates and the BatchNormalization moving statistics are rounded to nearest.
The project's NOTES.md reports a collapse of stock Keras bf16 SGD to 53.6% on
a small Conv-BatchNorm CNN of this kind; this task does not reproduce it:
stock Keras bf16 SGD (`compare --include-stock`) reaches 98.33% for seed 0,
the same as bf16 nearest, against 99.17% in float32.
"""

import dataclasses

import numpy as np

from tf_bf16.lab.tasks.base import Task, TaskData


def load_digits_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    y = y.astype(np.int32)
    return train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)


@dataclasses.dataclass
class DigitsCNN(Task):

    def make_data(self, seed, reduced=False):
        x_train, x_test, y_train, y_test = load_digits_split()
        return TaskData(train=(x_train, y_train), eval=(x_test, y_test),
                        info={"train": len(x_train), "test": len(x_test)})

    def make_model(self, seed, reduced=False):
        import keras

        width = 8 if reduced else 32
        layers = keras.layers
        inputs = keras.Input(shape=(8, 8, 1))
        x = inputs
        for i, filters in enumerate((width, 2 * width)):
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
            x = layers.BatchNormalization(name=f"bn{i}")(x)
            x = layers.ReLU()(x)
            x = layers.MaxPooling2D(2)(x)
        x = layers.Flatten()(x)
        x = layers.Dense(10, name="logits")(x)
        return keras.Model(inputs, x, name="digits_cnn")

    def loss(self):
        import keras

        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def evaluate(self, model, data):
        x, y = data.eval
        logits = model(x, training=False)
        predicted = np.argmax(np.asarray(logits, dtype=np.float32), axis=-1)
        return float(np.mean(predicted == y))


TASK = DigitsCNN(
    name="digits_cnn",
    summary="Conv-BatchNorm CNN on sklearn's 8x8 digits, SGD momentum.",
    paper_application="image classification (CNN with BatchNorm)",
    metric="test accuracy",
    higher_is_better=True,
    optimizer="sgd",
    learning_rate=0.01,
    epochs=30,
    batch_size=32,
    reduced={"epochs": 2, "steps_per_epoch": 8},
    requires=("sklearn",),
)
