"""Resumed and repeated training draws the same random bits; older and stock Keras
optimizer states load with a report, never silently.

Regression tests of issue 12's findings:

- F3: with the default `seed=None`, the drawn seed lives in the optimizer's
  `rounding_seed` variable, so `tf.train.Checkpoint` and `model.load_weights`
  (what `keras.callbacks.BackupAndRestore` uses) restore it: resumed training
  equals uninterrupted training bit for bit. A `.keras` file saved before the
  seed was a variable still loads (its config carries the seed).
- F4: BatchNormalization statistics are keyed on their position in the model's
  variables, not on Keras's automatic layer names, so the same model built
  twice in one process (a notebook re-run) trains to the same bits.
- F8: under `gradient_accumulation_steps=k` the statistics are keyed on the raw
  iteration counter, which advances every micro-step (the optimizer's
  `iterations` repeats each value k times).
- Loading a state saved by a stock Keras optimizer (no Kahan buffers, no seed,
  float32 slots of a mixed-precision model) into a tf_bf16 optimizer: the
  Keras slots load, the Kahan buffers start at zero, dtype conversions are
  rounded to nearest -- and a warning says each of these; a layout that does
  not fit is refused.

The JAX backend's side of F3 (and of BackupAndRestore) is tested with real
processes in tests/test_crash_safety.py.
"""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_bf16
from tf_bf16 import optimizers as bf16_optimizers

from conftest import assert_bits_equal, fresh_global_state

restore_global_state = fresh_global_state(2024)

BATCH, BATCHES = 8, 4


def data():
    rng = np.random.default_rng(3)
    return (rng.standard_normal((BATCH * BATCHES, 6)).astype("float32"),
            rng.standard_normal((BATCH * BATCHES, 2)).astype("float32"))


def make_model(optimizer, names=True, **optimizer_kwargs):
    """Dense -> BatchNormalization -> Dense; fixed initial weights. Without `names`,
    Keras names the layers itself (numbered per process)."""
    keras.utils.set_random_seed(11)
    kw = (lambda n: {"name": n}) if names else (lambda n: {})
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, **kw("d1"))(inputs)
    h = keras.layers.BatchNormalization(momentum=0.9, **kw("bn"))(h)
    model = keras.Model(inputs, keras.layers.Dense(2, **kw("d2"))(h))
    model.compile(optimizer=getattr(bf16_optimizers, optimizer)(**optimizer_kwargs), loss="mse")
    return model


def fit(model, epochs, **kwargs):
    x, y = data()
    model.fit(x, y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0, **kwargs)
    return model


def state(model):
    """Every model and optimizer variable's bits, by position."""
    return [np.array(v.numpy(), copy=True)
            for v in list(model.variables) + list(model.optimizer.variables)]


def assert_same_state(got, want, what):
    assert len(got) == len(want), what
    for k, (a, b) in enumerate(zip(got, want)):
        assert_bits_equal(a, b, f"{what}: variable {k}")


OPTIMIZER_ARGS = {
    "SGD": dict(learning_rate=0.05, momentum=0.9, rounding="stochastic"),
    "Adam": dict(learning_rate=1e-2, rounding="kahan"),
    "Lion": dict(learning_rate=1e-3, rounding="stochastic"),
}


# ---------------------------------------------------------------------------
# F3: the default seed is restored with the checkpoint


@pytest.mark.parametrize("name", sorted(OPTIMIZER_ARGS))
def test_default_seed_resumes_through_tf_train_checkpoint(name, tmp_path):
    tf_bf16.set_policy()
    model = fit(make_model(name, seed=None, **OPTIMIZER_ARGS[name]), 2)
    path = tf.train.Checkpoint(model=model, optimizer=model.optimizer).save(
        str(tmp_path / "ckpt"))
    fresh = make_model(name, seed=None, **OPTIMIZER_ARGS[name])
    drawn = fresh.optimizer.seed
    assert drawn != model.optimizer.seed      # a new draw (1 in 2**31 to coincide)
    status = tf.train.Checkpoint(model=fresh, optimizer=fresh.optimizer).restore(path)
    fresh.optimizer.build(fresh.trainable_variables)
    status.assert_consumed()
    assert fresh.optimizer.seed == model.optimizer.seed
    assert fresh.optimizer.get_config()["seed"] == model.optimizer.seed
    fit(model, 2)
    fit(fresh, 2)
    assert_same_state(state(fresh), state(model), f"{name} resumed from tf.train.Checkpoint")


@pytest.mark.parametrize("name", sorted(OPTIMIZER_ARGS))
def test_default_seed_resumes_through_load_weights(name, tmp_path):
    """`model.load_weights` of a `.weights.h5` file: what BackupAndRestore restores."""
    tf_bf16.set_policy()
    model = fit(make_model(name, seed=None, **OPTIMIZER_ARGS[name]), 2)
    model.save_weights(str(tmp_path / "latest.weights.h5"))
    fresh = make_model(name, seed=None, **OPTIMIZER_ARGS[name])
    fresh.optimizer.build(fresh.trainable_variables)
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # nothing to report: the same layout
        fresh.load_weights(str(tmp_path / "latest.weights.h5"))
    assert fresh.optimizer.seed == model.optimizer.seed
    fit(model, 2)
    fit(fresh, 2)
    assert_same_state(state(fresh), state(model), f"{name} resumed from load_weights")


class StopAfter(keras.callbacks.Callback):
    """Interrupts training after `batches` batches (as a crash would, mid-epoch)."""

    def __init__(self, batches):
        super().__init__()
        self.batches, self.seen = batches, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.batches:
            raise RuntimeError("interrupted")


def test_default_seed_resumes_through_backup_and_restore(tmp_path):
    """In one process (tests/test_crash_safety.py kills real ones): interrupted in
    epoch 3, a new model and optimizer (another drawn seed) resume from the
    backup of epoch 2 and end with the bits of an uninterrupted run."""
    tf_bf16.set_policy()
    backup = str(tmp_path / "backup")
    first = make_model("Adam", seed=None, **OPTIMIZER_ARGS["Adam"])
    seed = first.optimizer.seed
    with pytest.raises(RuntimeError, match="interrupted"):
        fit(first, 4, callbacks=[keras.callbacks.BackupAndRestore(backup),
                                 StopAfter(2 * BATCHES + 2)])
    resumed = make_model("Adam", seed=None, **OPTIMIZER_ARGS["Adam"])
    assert resumed.optimizer.seed != seed
    fit(resumed, 4, callbacks=[keras.callbacks.BackupAndRestore(backup)])
    assert resumed.optimizer.seed == seed
    want = fit(make_model("Adam", seed=seed, **OPTIMIZER_ARGS["Adam"]), 4)
    assert int(resumed.optimizer.iterations.numpy()) == 4 * BATCHES
    assert_same_state(state(resumed), state(want), "resumed by BackupAndRestore")


def test_keras_file_saved_without_the_seed_variable_still_resumes(tmp_path):
    """A .keras file from before the seed became a variable: its optimizer state
    lacks `rounding_seed`; the config's seed is used and the rest loads."""
    tf_bf16.set_policy()
    model = fit(make_model("Lion", seed=None, **OPTIMIZER_ARGS["Lion"]), 2)
    optimizer = model.optimizer
    seed = optimizer.seed
    # Save the old layout: the optimizer's variables without the seed.
    optimizer._variables.remove(optimizer.rounding_seed)
    model.save(str(tmp_path / "old.keras"))
    optimizer._variables.insert(2, optimizer.rounding_seed)
    with pytest.warns(UserWarning, match="rounding seed was not saved"):
        loaded = keras.models.load_model(str(tmp_path / "old.keras"))
    assert loaded.optimizer.seed == seed
    fit(loaded, 2)
    fit(model, 2)
    assert_same_state(state(loaded), state(model), "old .keras file resumed")


# ---------------------------------------------------------------------------
# F4: the same model built twice in one process


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_same_model_built_twice_trains_to_the_same_bits(name):
    tf_bf16.set_policy()
    first = make_model(name, names=False, seed=5, **OPTIMIZER_ARGS[name])
    second = make_model(name, names=False, seed=5, **OPTIMIZER_ARGS[name])
    bn_names = [layer.name for m in (first, second) for layer in m.layers
                if isinstance(layer, keras.layers.BatchNormalization)]
    assert bn_names[0] != bn_names[1]          # Keras numbered the second one
    fit(first, 2)
    fit(second, 2)
    assert_same_state(state(second), state(first), "the same model built again")


# ---------------------------------------------------------------------------
# F8: gradient accumulation


def test_statistics_draw_new_bits_every_micro_step(monkeypatch):
    """The step keying BatchNormalization's rounding advances every batch under
    gradient accumulation (BatchNormalization moves every batch)."""
    tf_bf16.set_policy()
    from tf_bf16 import backend
    steps = []
    original = backend.ops.stochastic_round

    def recording(x, seed, step=0, var_id=0, name=None):
        steps.append((int(np.asarray(step)), int(var_id)))
        return original(x, seed, step, var_id, name=name)

    monkeypatch.setattr(backend.ops, "stochastic_round", recording)
    model = make_model("SGD", seed=1, gradient_accumulation_steps=3,
                       **OPTIMIZER_ARGS["SGD"])
    model.compile(optimizer=model.optimizer, loss="mse", run_eagerly=True)
    x, y = data()
    model.fit(x, y, batch_size=BATCH // 2, epochs=1, shuffle=False, verbose=0)
    by_stream = {}
    for step, var_id in steps:
        by_stream.setdefault(var_id, []).append(step)
    assert len(by_stream) == 2                  # moving_mean, moving_variance
    for stream_steps in by_stream.values():
        assert stream_steps == list(range(2 * BATCHES)), stream_steps
    assert int(model.optimizer.iterations.numpy()) == (2 * BATCHES) // 3


# ---------------------------------------------------------------------------
# States saved by stock Keras optimizers


def _stock_and_bf16(tmp_path, stock_optimizer, stock_policy, name="Adam", **bf16_kwargs):
    """Trains a model with a stock Keras optimizer under `stock_policy`, saves its
    weights; builds the same model under tf_bf16's policy with a tf_bf16 optimizer."""
    keras.config.set_dtype_policy(stock_policy)
    stock = make_model("Adam")      # replaced below
    stock.compile(optimizer=stock_optimizer, loss="mse")
    fit(stock, 1)
    path = str(tmp_path / "stock.weights.h5")
    stock.save_weights(path)
    tf_bf16.set_policy()
    model = make_model(name, seed=9, **bf16_kwargs)
    model.optimizer.build(model.trainable_variables)
    return stock, model, path


def test_stock_keras_adam_state_loads_with_kahan_buffers_zeroed_and_says_so(tmp_path):
    stock, model, path = _stock_and_bf16(tmp_path, keras.optimizers.Adam(1e-2), "bfloat16",
                                         rounding="kahan", learning_rate=1e-2)
    # Give the Kahan buffers content: they must be reset, not kept from another run.
    for c in model.optimizer._compensations:
        c.assign(keras.ops.ones(c.shape, c.dtype) * 1e-3)
    with pytest.warns(UserWarning) as record:
        model.load_weights(path)
    message = " ".join(str(w.message) for w in record)
    assert "Kahan compensation buffer(s) were not saved and start at zero" in message
    assert "rounding seed was not saved" in message and "9" in message
    stock_vars = {v.path.split("/", 1)[1]: v for v in stock.optimizer.variables}
    for v in model.optimizer.variables:
        key = v.path.split("/", 1)[1]
        if "kahan" in key:
            assert not np.any(np.asarray(v.numpy(), np.float32)), key
        elif key in stock_vars:
            assert_bits_equal(v.numpy(), stock_vars[key].numpy(), key)
    assert model.optimizer.seed == 9
    fit(model, 1)        # and it trains on from there


def test_mixed_precision_adam_state_loads_rounded_to_bf16_and_says_so(tmp_path):
    stock, model, path = _stock_and_bf16(tmp_path, keras.optimizers.Adam(1e-2),
                                         "mixed_bfloat16", rounding="stochastic",
                                         learning_rate=1e-2)
    with pytest.warns(UserWarning) as record:
        model.load_weights(path)
    message = " ".join(str(w.message) for w in record)
    assert "saved in another dtype and rounded to nearest" in message
    assert "(float32 -> bfloat16)" in message
    stock_vars = {v.path.split("/", 1)[1]: v for v in stock.optimizer.variables}
    for v in model.optimizer.variables:
        key = v.path.split("/", 1)[1]
        if key in stock_vars and stock_vars[key].dtype == "float32" and len(v.shape):
            rounded = tf.cast(tf.constant(stock_vars[key].numpy()), tf.bfloat16)
            assert_bits_equal(v.numpy(), rounded.numpy(), key)
    fit(model, 1)


def test_a_state_that_does_not_fit_is_refused(tmp_path):
    """A stock SGD-momentum state (one slot per weight) for tf_bf16's Adam (two, and
    Kahan buffers): Keras would skip it with a warning and train on zeroed slots."""
    stock, model, path = _stock_and_bf16(tmp_path, keras.optimizers.SGD(0.1, momentum=0.9),
                                         "bfloat16", rounding="kahan", learning_rate=1e-2)
    before = [np.array(v.numpy(), copy=True) for v in model.optimizer.variables]
    with pytest.raises(ValueError, match="Nothing was loaded"):
        model.load_weights(path)
    for v, b in zip(model.optimizer.variables, before):
        assert_bits_equal(v.numpy(), b, v.path)
