"""model.fit with the usual callbacks, in pure bfloat16, and resuming from a checkpoint.

Scikit-learn's bundled 8x8 digits (no download), a small Conv-BatchNorm CNN,
tf_bf16's SGD with momentum, and:

- `ModelCheckpoint` to `.keras` files: the best model (by validation loss) and
  the latest one (every epoch; includes the optimizer state: momentum, Kahan
  buffers, iteration count and the current learning rate);
- `EarlyStopping` on the validation loss;
- `ReduceLROnPlateau` (a `LearningRateScheduler` works the same way);
- then a "restart": `keras.models.load_model` of the latest checkpoint and
  `fit(..., initial_epoch=...)` continue where training stopped.

    python examples/fit_with_callbacks.py [--epochs 15] [--dir /tmp/tf_bf16_callbacks]
"""

import argparse
import os
import tempfile

import keras
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import tf_bf16  # also registers the tf_bf16 optimizers for keras.models.load_model


def build_model():
    return keras.Sequential([
        keras.Input(shape=(8, 8, 1)),
        keras.layers.Conv2D(16, 3, padding="same", use_bias=False),
        keras.layers.BatchNormalization(momentum=0.9),  # few steps per epoch
        keras.layers.ReLU(),
        keras.layers.Conv2D(32, 3, padding="same", use_bias=False),
        keras.layers.BatchNormalization(momentum=0.9),  # few steps per epoch
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ])


def make_callbacks(best_path, last_path):
    # ReduceLROnPlateau comes before the checkpoints, so that a checkpoint holds
    # the learning rate the next epoch will use.
    return [
        keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2, verbose=1),
        keras.callbacks.EarlyStopping(monitor="val_loss", patience=4, restore_best_weights=True),
        keras.callbacks.ModelCheckpoint(best_path, monitor="val_loss", save_best_only=True),
        keras.callbacks.ModelCheckpoint(last_path),  # every epoch, with the optimizer state
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15, help="epochs of the first run")
    parser.add_argument("--more-epochs", type=int, default=5, help="epochs after resuming")
    parser.add_argument("--dir", default=None, help="checkpoint directory (default: a temp dir)")
    args = parser.parse_args()
    directory = args.dir or tempfile.mkdtemp(prefix="tf_bf16_callbacks_")
    os.makedirs(directory, exist_ok=True)
    best_path = os.path.join(directory, "best.keras")
    last_path = os.path.join(directory, "last.keras")

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)

    tf_bf16.set_policy()
    keras.utils.set_random_seed(0)
    model = build_model()
    model.compile(optimizer=tf_bf16.optimizers.SGD(0.05, momentum=0.9, seed=0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    history = model.fit(x_train, y_train, validation_split=0.2, batch_size=32,
                        epochs=args.epochs, callbacks=make_callbacks(best_path, last_path),
                        verbose=2)
    epochs_done = len(history.history["loss"])
    print(f"first run: {epochs_done} epochs, test accuracy "
          f"{model.evaluate(x_test, y_test, verbose=0)[1]:.4f}")

    # --- A new process would start here: resume from the latest checkpoint. ---
    resumed = keras.models.load_model(last_path)
    print(f"resumed {type(resumed.optimizer).__name__} at iteration "
          f"{int(resumed.optimizer.iterations)}, learning rate "
          f"{float(resumed.optimizer.learning_rate):.4g}")
    resumed.fit(x_train, y_train, validation_split=0.2, batch_size=32,
                initial_epoch=epochs_done, epochs=epochs_done + args.more_epochs,
                callbacks=make_callbacks(best_path, last_path), verbose=2)
    print(f"after resuming: test accuracy {resumed.evaluate(x_test, y_test, verbose=0)[1]:.4f}")

    best = keras.models.load_model(best_path)
    print(f"best checkpoint: test accuracy {best.evaluate(x_test, y_test, verbose=0)[1]:.4f}")
    dtypes = {v.dtype for v in resumed.variables + resumed.optimizer.variables
              if len(v.shape) > 0}
    assert dtypes == {"bfloat16"}, dtypes
    print(f"checkpoints in {directory}")


if __name__ == "__main__":
    main()
