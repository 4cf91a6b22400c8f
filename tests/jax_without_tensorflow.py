"""tf_bf16 on Keras's JAX backend where TensorFlow cannot be imported.

Run by tests/test_jax_backend.py in a subprocess (KERAS_BACKEND=jax); also by
hand: ``KERAS_BACKEND=jax python tests/jax_without_tensorflow.py``. A
`sys.meta_path` finder makes every ``import tensorflow`` fail, as on a machine
without it, then: `import tf_bf16`; a short `fit` with each optimizer and
rounding (Dense, BatchNormalization, Embedding) under `set_policy()`; the
strict policy refusing a float32 layer before any weight changes (in `fit`
and in a custom loop) and accepting it with `keep_float32`; the audit's
variable report; a custom jitted loop whose BatchNormalization statistics,
keyed with `tf_bf16.moving_statistics_step`, are `fit`'s to the bit. Prints "OK" and exits 0, or raises.
"""

import importlib.abc
import os
import sys


class NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ImportError(f"TensorFlow is blocked in this process ({name})")
        return None


sys.meta_path.insert(0, NoTensorFlow())
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_bf16  # noqa: E402

assert keras.backend.backend() == "jax", keras.backend.backend()


def values(model):
    return [np.asarray(v.value).copy() for v in model.variables]


def model_with_everything(float32_head=False):
    ids = keras.Input((6,), dtype="int32")
    x = keras.layers.Embedding(20, 8, name="embedding")(ids)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(16, name="dense")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Activation("relu")(x)
    head = keras.layers.Dense(1, name="head", dtype="float32" if float32_head else None)
    return keras.Model(ids, head(x))


rng = np.random.default_rng(0)
x = rng.integers(0, 20, size=(64, 6)).astype("int32")
y = rng.standard_normal((64, 1)).astype("float32")

tf_bf16.set_policy()
for name in ("SGD", "Adam", "AdamW", "Lion"):
    for rounding in tf_bf16.ROUNDINGS:
        keras.utils.set_random_seed(1)
        model = model_with_everything()
        kwargs = {"momentum": 0.9} if name == "SGD" else {}
        optimizer = getattr(tf_bf16.optimizers, name)(learning_rate=0.01, rounding=rounding,
                                                      seed=3, **kwargs)
        model.compile(optimizer, loss="mse")
        before = values(model)
        history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
        assert all(np.isfinite(history.history["loss"])), (name, rounding, history.history)
        assert all(keras.backend.standardize_dtype(v.dtype) in ("bfloat16", "int32", "int64")
                   for v in model.variables + optimizer.variables
                   if len(v.shape) > 0), [(v.path, v.dtype) for v in optimizer.variables]
        changed = [not np.array_equal(a, np.asarray(v.value))
                   for a, v in zip(before, model.variables)]
        assert all(changed), [(v.path, c) for v, c in zip(model.variables, changed)]
        assert int(optimizer.iterations.value) == 8
        kahan = [v for v in optimizer.variables if v.name.endswith("kahan_compensation")]
        assert len(kahan) == (len(model.trainable_variables) if rounding == "kahan" else 0)
        print(f"fit {name} rounding={rounding}: loss {history.history['loss']}")

# Strict policy: a float32 layer is refused before any weight changes.
for start in ("fit", "train_on_batch"):
    keras.utils.set_random_seed(2)
    model = model_with_everything(float32_head=True)
    model.compile(tf_bf16.optimizers.Adam(seed=1), loss="mse")
    before = values(model)
    try:
        model.fit(x, y, epochs=1, verbose=0) if start == "fit" else model.train_on_batch(
            x[:8], y[:8])
    except tf_bf16.StrictPolicyError as e:
        assert "head/kernel" in str(e) and "no weight was changed" in str(e), str(e)
    else:
        raise AssertionError(f"{start}: a float32 layer was not refused")
    assert all(np.array_equal(a, np.asarray(v.value))
               for a, v in zip(before, model.variables)), f"{start}: weights changed"
print("strict policy refuses float32 state in fit and train_on_batch, nothing changed")

# A custom loop: the optimizer's build refuses float32 trainable variables.
model = model_with_everything(float32_head=True)
try:
    tf_bf16.optimizers.SGD(seed=1).build(model.trainable_variables)
except tf_bf16.StrictPolicyError as e:
    assert "head/kernel" in str(e), str(e)
else:
    raise AssertionError("custom loop: float32 variables were not refused")

# keep_float32 lets the layer train in float32.
tf_bf16.set_policy(keep_float32=["^head$"])
model = model_with_everything(float32_head=True)
model.compile(tf_bf16.optimizers.SGD(seed=1, rounding="kahan"), loss="mse")
model.fit(x, y, epochs=1, verbose=0)
assert model.get_layer("head").kernel.dtype == "float32"
print("keep_float32 trains the float32 head")

# The audit: variables and bytes, no trace.
report = tf_bf16.audit(model, x[:2], y[:2])
assert report.variables and report.training_state.trainable_parameters > 0
assert report.traced.startswith("no (Keras jax backend)"), report.traced
assert any("Not traced" in note for note in report.notes), report.notes
assert str(report)
print(report.summary)

# A custom jitted loop keys BatchNormalization statistics on the traced step when
# wrapped in moving_statistics_step: the same bits as fit. (Inputs k/64 and momentum
# 0.5 make Keras's statistics exact, so only the rounding can differ.)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

x_bn = (rng.integers(-32, 33, size=(64, 4)) / 64).astype("float32")
y_bn = rng.standard_normal((64, 1)).astype("float32")


def bn_model():
    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((4,)),
                              keras.layers.BatchNormalization(momentum=0.5, name="bn"),
                              keras.layers.Dense(1, name="head")])
    model.compile(tf_bf16.optimizers.SGD(0.01, rounding="stochastic", seed=5), loss="mse")
    return model


def statistics(model):
    bn = model.get_layer("bn")
    return [np.asarray(bn.moving_mean.value), np.asarray(bn.moving_variance.value)]


tf_bf16.set_policy()
fitted = bn_model()
fitted.fit(x_bn, y_bn, batch_size=8, epochs=1, shuffle=False, verbose=0)

model = bn_model()
optimizer = model.optimizer
tf_bf16.prepare_model(model)        # what fit does when training starts
optimizer.build(model.trainable_variables)


def loss_fn(trainable, non_trainable, optimizer_variables, x, y):
    with tf_bf16.moving_statistics_step(optimizer, optimizer_variables):
        y_pred, non_trainable = model.stateless_call(trainable, non_trainable, x,
                                                     training=True)
    return jnp.mean((y_pred.astype("float32") - y) ** 2), non_trainable


@jax.jit
def train_step(trainable, non_trainable, optimizer_variables, x, y):
    (_, non_trainable), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        trainable, non_trainable, optimizer_variables, x, y)
    trainable, optimizer_variables = optimizer.stateless_apply(optimizer_variables, grads,
                                                               trainable)
    return trainable, non_trainable, optimizer_variables


state = ([v.value for v in model.trainable_variables],
         [v.value for v in model.non_trainable_variables],
         [v.value for v in optimizer.variables])
for start in range(0, 64, 8):
    state = train_step(*state, x_bn[start:start + 8], y_bn[start:start + 8])
for variable, value in zip(model.non_trainable_variables, state[1]):
    variable.assign(value)
for got, want in zip(statistics(model), statistics(fitted)):
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16)), (got, want)
print("custom loop with moving_statistics_step: the statistics of fit, bit for bit")

# The TensorFlow-only modules say what to use instead.
try:
    tf_bf16.ops
except AttributeError as e:
    assert "tf_bf16.jax_ops" in str(e), str(e)
else:
    raise AssertionError("tf_bf16.ops is available without TensorFlow")

assert not any(m == "tensorflow" or m.startswith("tensorflow.") for m in sys.modules), \
    sorted(m for m in sys.modules if m.startswith("tensorflow"))
print("OK")
