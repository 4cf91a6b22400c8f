"""The training process of tests/test_crash_safety.py (run as a script, not a test).

    python tests/crash_child.py BACKUP_DIR OUT_DIR train STOP_EPOCH STOP_BATCH
    python tests/crash_child.py BACKUP_DIR OUT_DIR finish

`train`: trains with `keras.callbacks.BackupAndRestore(BACKUP_DIR)` (resuming from
it if a backup exists) and the default `seed=None`; after batch STOP_BATCH of epoch
STOP_EPOCH (0-based) it writes OUT_DIR/ready and waits to be killed (SIGKILL).
It writes OUT_DIR/seed.<pid> at the start of training (the seed in use, after any
restore).

`finish`: resumes from the backup and trains to the end, then trains the same
model uninterrupted, in this process, with the seed the interrupted run used;
writes both final states (every model and optimizer variable's bits: weights,
Adam's slots, Kahan buffers, BatchNormalization statistics, iteration count,
seed) to OUT_DIR/resumed.npz and OUT_DIR/uninterrupted.npz.

The backend is KERAS_BACKEND's (TensorFlow or JAX).
"""

import os
import sys
import time

import keras
import numpy as np

import tf_bf16
from tf_bf16 import optimizers

EPOCHS, BATCHES, BATCH = 4, 4, 8


def data():
    rng = np.random.default_rng(17)
    return (rng.standard_normal((BATCHES * BATCH, 6)).astype("float32"),
            rng.standard_normal((BATCHES * BATCH, 2)).astype("float32"))


def make_model(seed):
    keras.utils.set_random_seed(3)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(16)(inputs)
    h = keras.layers.BatchNormalization(momentum=0.9)(h)
    h = keras.layers.Dense(2)(keras.layers.ReLU()(h))
    model = keras.Model(inputs, h)
    model.compile(optimizer=optimizers.AdamW(learning_rate=3e-3, weight_decay=0.01,
                                             rounding="kahan", seed=seed), loss="mse")
    return model


class StopAndWait(keras.callbacks.Callback):
    """After the chosen batch: says so, then waits to be killed."""

    def __init__(self, out_dir, epoch, batch):
        super().__init__()
        self.out_dir, self.stop, self.epoch = out_dir, (epoch, batch), None

    def on_train_begin(self, logs=None):
        # BackupAndRestore (earlier in the callback list) has restored the seed.
        with open(os.path.join(self.out_dir, f"seed.{os.getpid()}"), "w") as f:
            f.write(str(self.model.optimizer.seed))

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.stop:
            with open(os.path.join(self.out_dir, "ready"), "w") as f:
                f.write(f"{self.epoch} {batch}")
            time.sleep(600)


ROLES = ("kahan_compensation", "moving_mean", "moving_variance", "gamma", "beta", "momentum",
         "velocity", "iteration", "learning_rate", "rounding_seed", "kernel", "bias")


def state(model):
    """{"index:role:dtype": bits}. Roles, not paths: the reference model built in the
    same process has other automatic layer names."""
    variables = list(model.variables) + list(model.optimizer.variables)
    return {f"{i:03d}:{next(r for r in ROLES if r in v.path)}:{v.dtype}":
            np.atleast_1d(np.asarray(v.numpy())).view(np.uint8)
            for i, v in enumerate(variables)}


def main(backup_dir, out_dir, mode, *stop):
    tf_bf16.set_policy()
    x, y = data()
    model = make_model(seed=None)
    model(x[:1])    # BackupAndRestore needs a built model
    callbacks = [keras.callbacks.BackupAndRestore(backup_dir, save_freq="epoch",
                                                  double_checkpoint=True)]
    if mode == "train":
        callbacks.append(StopAndWait(out_dir, int(stop[0]), int(stop[1])))
    model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0,
              callbacks=callbacks)
    if mode != "finish":
        raise SystemExit("the stop point was never reached")
    np.savez(os.path.join(out_dir, "resumed.npz"), **state(model))
    reference = make_model(seed=model.optimizer.seed)
    reference.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    np.savez(os.path.join(out_dir, "uninterrupted.npz"), **state(reference))


if __name__ == "__main__":
    main(*sys.argv[1:])
