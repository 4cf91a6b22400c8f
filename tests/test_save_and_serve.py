"""Saving, restoring, resuming and serving pure-bf16 models trained with tf_bf16.

- `.keras` files: `keras.models.load_model` needs no custom_objects (the
  optimizers are registered when tf_bf16 is imported) and restores the
  weights, the optimizer's class, rounding and seed, and every optimizer
  variable (slots, Kahan buffers, iteration count) bit for bit;
- `tf.train.Checkpoint(model=..., optimizer=...)` likewise;
- training resumed from either is bit-identical to uninterrupted training:
  the stochastic-rounding bits are keyed on (seed, iteration, variable), all
  saved, for the weights and for BatchNormalization's moving statistics;
- `model.export()` gives a SavedModel whose `serve` returns bf16 outputs equal
  bit for bit to `model.predict` and `model(x)`, loadable without tf_bf16;
- `tf_bf16.export()` gives the same outputs in float32 (exactly), and, with
  `format="litert"`, a TFLite model of a float32 copy whose outputs are within
  a bound derived from bf16's unit roundoff of the bf16 model's.
"""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_bf16
from tf_bf16 import optimizers as bf16_optimizers

from conftest import assert_bits_equal, fresh_global_state

N_EPOCHS, M_EPOCHS = 2, 2      # 4 steps per epoch


restore_global_state = fresh_global_state(99)


def data():
    rng = np.random.default_rng(0)
    return (rng.standard_normal((64, 6)).astype("float32"),
            rng.standard_normal((64, 2)).astype("float32"))


OPTIMIZERS = {
    "SGD": dict(learning_rate=0.05, momentum=0.9, nesterov=True),
    "Adam": dict(learning_rate=1e-2, amsgrad=True),
    "AdamW": dict(learning_rate=1e-2, weight_decay=0.1),
    "Lion": dict(learning_rate=1e-3),
}


def make_model(name="Adam", rounding="kahan", kind="functional", seed=7):
    """Dense -> BatchNormalization -> Dense, bf16 under the policy, fixed init."""
    keras.utils.set_random_seed(1)
    layers = [keras.layers.Dense(16, name="d1"), keras.layers.BatchNormalization(name="bn"),
              keras.layers.Dense(2, name="d2")]
    if kind == "functional":
        inputs = keras.Input((6,))
        h = inputs
        for layer in layers:
            h = layer(h)
        model = keras.Model(inputs, h, name="net")
    else:
        model = keras.Sequential([keras.Input((6,))] + layers, name="net")
    optimizer = getattr(bf16_optimizers, name)(rounding=rounding, seed=seed, **OPTIMIZERS[name])
    model.compile(optimizer=optimizer, loss="mse")
    return model


def train(model, epochs):
    x, y = data()
    model.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0)
    return model


def state(model):
    """Every model and optimizer variable, in order: (path, dtype, value). The
    optimizer's paths lose their first component, the optimizer's name, which
    Keras numbers per process ("lion", "lion_1", ...) when none is given."""
    return ([(v.path, v.dtype, np.array(v.numpy(), copy=True)) for v in model.variables]
            + [(v.path.split("/", 1)[1], v.dtype, np.array(v.numpy(), copy=True))
               for v in model.optimizer.variables])


def assert_same_state(got, want, what, compare_paths=True):
    assert len(got) == len(want), what
    for (p, d, a), (q, e, b) in zip(got, want):
        if compare_paths:
            assert p == q, what
        assert d == e, (what, p, q)
        assert_bits_equal(a, b, f"{what}: {q}")


# ---------------------------------------------------------------------------
# .keras files and tf.train.Checkpoint round trips


@pytest.mark.parametrize("rounding", ["kahan", "stochastic"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_keras_file_round_trip(name, rounding, tmp_path):
    tf_bf16.set_policy()
    model = train(make_model(name, rounding, seed=123457), N_EPOCHS)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)      # no custom_objects
    optimizer = loaded.optimizer
    assert type(optimizer) is getattr(bf16_optimizers, name)
    assert optimizer.rounding == rounding and optimizer.seed == 123457
    assert optimizer.get_config() == model.optimizer.get_config()
    assert int(optimizer.iterations.numpy()) == 4 * N_EPOCHS
    want = state(model)
    assert_same_state(state(loaded), want, f"{name}/{rounding} after load_model")
    kahan = [p for p, _, _ in want if "kahan" in p]
    assert len(kahan) == (len(model.trainable_variables) if rounding == "kahan" else 0)
    assert all(d == "bfloat16" for p, d, _ in want if "kahan" in p or "/bn/" in p)


@pytest.mark.parametrize("rounding", ["kahan", "stochastic"])
@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_checkpoint_round_trip_and_resume(name, rounding, tmp_path):
    """Restore into a fresh model and optimizer (slots created after the restore
    are filled by deferred restoration), then both train on: same bits."""
    tf_bf16.set_policy()
    model = train(make_model(name, rounding), N_EPOCHS)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    path = checkpoint.save(str(tmp_path / "ckpt"))
    fresh = make_model(name, rounding)
    assert not fresh.optimizer.built
    status = tf.train.Checkpoint(model=fresh, optimizer=fresh.optimizer).restore(path)
    fresh.optimizer.build(fresh.trainable_variables)
    status.assert_consumed()
    assert_same_state(state(fresh), state(model), f"{name}/{rounding} after restore")
    train(model, M_EPOCHS)
    train(fresh, M_EPOCHS)
    assert_same_state(state(fresh), state(model), f"{name}/{rounding} resumed")


def test_drawn_seed_survives_the_keras_file(tmp_path):
    tf_bf16.set_policy()
    model = make_model("Lion", "stochastic", seed=None)
    seed = model.optimizer.seed
    assert isinstance(seed, int)
    train(model, 1).save(str(tmp_path / "m.keras"))
    assert keras.models.load_model(str(tmp_path / "m.keras")).optimizer.seed == seed


# ---------------------------------------------------------------------------
# Resumed training is bit-identical to uninterrupted training


def uninterrupted(name, rounding, kind="functional"):
    return state(train(make_model(name, rounding, kind), N_EPOCHS + M_EPOCHS))


@pytest.mark.parametrize("rounding", ["stochastic", "kahan"])
@pytest.mark.parametrize("name", ["SGD", "Adam", "Lion"])
def test_resume_from_keras_file_is_bit_identical(name, rounding, tmp_path):
    tf_bf16.set_policy()
    want = uninterrupted(name, rounding)
    path = str(tmp_path / "m.keras")
    saved = train(make_model(name, rounding), N_EPOCHS)
    saved.save(path)
    at_save = {p: v for p, _, v in state(saved)}
    keras.backend.clear_session()     # fresh Keras state: names, uids, graphs
    resumed = train(keras.models.load_model(path), M_EPOCHS)
    assert int(resumed.optimizer.iterations.numpy()) == 4 * (N_EPOCHS + M_EPOCHS)
    assert_same_state(state(resumed), want, f"{name}/{rounding} resumed")
    # The moving statistics kept moving after the save (stochastically rounded).
    bn = resumed.get_layer("bn")
    assert not np.array_equal(bn.moving_mean.numpy(), at_save[bn.moving_mean.path])


def test_resume_sequential_model_with_batch_norm_is_bit_identical(tmp_path):
    tf_bf16.set_policy()
    want = uninterrupted("Adam", "stochastic", kind="sequential")
    path = str(tmp_path / "m.keras")
    train(make_model("Adam", "stochastic", kind="sequential"), N_EPOCHS).save(path)
    resumed = train(keras.models.load_model(path), M_EPOCHS)
    # Variable paths differ (Keras), so compare by position only.
    assert_same_state(state(resumed), want, "sequential resumed", compare_paths=False)


def test_sequential_weights_and_optimizer_state_still_resume_bit_identically(tmp_path):
    """Also without BatchNormalization the
    Sequential model resumes bit for bit (optimizer streams are keyed on the
    variable's index, not its path)."""
    tf_bf16.set_policy()

    def model():
        keras.utils.set_random_seed(1)
        m = keras.Sequential([keras.Input((6,)), keras.layers.Dense(16, name="d1"),
                              keras.layers.Dense(2, name="d2")], name="net")
        m.compile(optimizer=bf16_optimizers.Adam(1e-2, rounding="stochastic", seed=3),
                  loss="mse")
        return m

    want = state(train(model(), N_EPOCHS + M_EPOCHS))
    path = str(tmp_path / "m.keras")
    train(model(), N_EPOCHS).save(path)
    resumed = train(keras.models.load_model(path), M_EPOCHS)
    assert_same_state(state(resumed), want, "sequential without BN", compare_paths=False)


RESUME_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import keras
    import tf_bf16   # registers the optimizers; nothing else is needed to load
    sys.path.insert(0, sys.argv[1])
    from test_save_and_serve import M_EPOCHS, data
    tf_bf16.set_policy()
    out = {}
    for rounding in ("stochastic", "kahan"):
        model = keras.models.load_model(sys.argv[2] + "/" + rounding + ".keras")
        x, y = data()
        model.fit(x, y, batch_size=16, epochs=M_EPOCHS, shuffle=False, verbose=0)
        for i, v in enumerate(list(model.variables) + list(model.optimizer.variables)):
            path = v.path.split("/", 1)[1] if i >= len(model.variables) else v.path
            out[f"{rounding}:{i}:{path}:{v.dtype}"] = np.atleast_1d(
                np.asarray(v.numpy())).view(np.uint8)
    np.savez(sys.argv[2] + "/resumed.npz", **out)
""")


def test_resume_in_a_fresh_process_is_bit_identical(tmp_path):
    """Train N epochs here, save; load and train M epochs in a new Python process;
    compare every variable's bits with N + M uninterrupted epochs here."""
    tf_bf16.set_policy()
    want = {}
    for rounding in ("stochastic", "kahan"):
        want[rounding] = uninterrupted("Adam", rounding)
        train(make_model("Adam", rounding), N_EPOCHS).save(str(tmp_path / f"{rounding}.keras"))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-c", RESUME_SCRIPT, os.path.dirname(__file__), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = np.load(tmp_path / "resumed.npz")
    for rounding in ("stochastic", "kahan"):
        keys = sorted((k for k in resumed.files if k.startswith(rounding + ":")),
                      key=lambda k: int(k.split(":")[1]))
        assert len(keys) == len(want[rounding])
        for key, (path, dtype, value) in zip(keys, want[rounding]):
            assert key.split(":")[2:] == [path, dtype]
            assert np.array_equal(resumed[key], np.atleast_1d(value).view(np.uint8)), (
                f"{rounding}: {path} differs")


# ---------------------------------------------------------------------------
# Serving


def conv_model():
    keras.utils.set_random_seed(5)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(4, 3, padding="same"),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Flatten(),
        keras.layers.Dense(3)])
    model.compile(optimizer=bf16_optimizers.SGD(0.05, momentum=0.9, seed=4), loss="mse")
    rng = np.random.default_rng(1)
    x = rng.random((32, 8, 8, 1)).astype("float32")
    model.fit(x, rng.standard_normal((32, 3)), batch_size=8, epochs=1, verbose=0)
    return model, rng.random((10, 8, 8, 1)).astype("float32")


SERVE_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import keras
    import tensorflow as tf
    x = tf.constant(np.load(sys.argv[3]))
    loaded = tf.saved_model.load(sys.argv[1])     # keep: it owns the variables
    served = loaded.serve(x)
    model = keras.models.load_model(sys.argv[2], compile=False)
    predicted = model.predict(x, verbose=0)
    called = model(x, training=False)
    assert "tf_bf16" not in sys.modules
    as_bits = lambda t: tf.bitcast(tf.convert_to_tensor(t), tf.uint16).numpy()
    assert served.dtype == tf.bfloat16 and called.dtype == "bfloat16"
    assert np.array_equal(as_bits(served), as_bits(predicted)), "serve != predict"
    assert np.array_equal(as_bits(served), as_bits(called)), "serve != model(x)"
    print("ok")
""")


def test_export_serves_the_same_bf16_outputs(tmp_path):
    """serve == predict == model(x) in graph mode, bit for bit. Eager model(x)
    is compared in a process with TF_ENABLE_ONEDNN_OPTS=0: with oneDNN's graph
    rewrites on (TensorFlow's default on this CPU), graph mode fuses the bias
    add into the bf16 matmul/convolution (one rounding) while eager execution
    rounds the product to bf16 first, so eager and graph outputs of the same
    Keras model differ (stock Keras too; unrelated to tf_bf16). That process
    also never imports tf_bf16: serving needs none of its ops."""
    tf_bf16.set_policy()
    model, x = conv_model()
    path = str(tmp_path / "exported")
    model.export(path, verbose=False)
    loaded = tf.saved_model.load(path)     # keep a reference: it owns the variables
    served = loaded.serve(tf.constant(x))
    assert served.dtype == tf.bfloat16
    predicted = model.predict(x, verbose=0)
    assert predicted.dtype == "bfloat16"
    graph_call = tf.function(lambda t: model(t, training=False))(tf.constant(x))
    assert_bits_equal(served, predicted, "serve vs predict")
    assert_bits_equal(served, graph_call, "serve vs model(x) in a tf.function")
    model.save(str(tmp_path / "m.keras"))
    np.save(tmp_path / "x.npy", x)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_ENABLE_ONEDNN_OPTS="0")
    result = subprocess.run(
        [sys.executable, "-c", SERVE_SCRIPT, path, str(tmp_path / "m.keras"),
         str(tmp_path / "x.npy")], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "ok"


# ---------------------------------------------------------------------------
# tf_bf16.export: float32 outputs, and the route to TFLite


def test_tf_bf16_export_serves_float32_outputs(tmp_path):
    """The SavedModel runs the bf16 model and casts its outputs to float32: the
    cast is exact, so the float32 outputs are the bf16 outputs, bit for bit."""
    tf_bf16.set_policy()
    model, x = conv_model()
    predicted = model.predict(x, verbose=0)
    loaded = {}
    for outputs in ("float32", "bfloat16"):
        path = tf_bf16.export(model, str(tmp_path / outputs), outputs=outputs, verbose=False)
        loaded[outputs] = tf.saved_model.load(path)
        served = loaded[outputs].serve(tf.constant(x))
        assert served.dtype == tf.as_dtype(outputs)
        assert_bits_equal(served, tf.cast(predicted, outputs), f"serve ({outputs}) vs predict")
    with pytest.raises(ValueError, match="outputs"):
        tf_bf16.export(model, str(tmp_path / "x"), outputs="float16")


def test_tf_bf16_export_of_a_dict_input_model(tmp_path):
    tf_bf16.set_policy()
    keras.utils.set_random_seed(3)
    inputs = {"a": keras.Input((3,), name="a"), "b": keras.Input((2,), name="b")}
    joined = keras.layers.Concatenate()([inputs["a"], inputs["b"]])
    model = keras.Model(inputs, {"y": keras.layers.Dense(2, name="y")(joined),
                                 "z": keras.layers.Dense(1, name="z")(joined)})
    rng = np.random.default_rng(2)
    x = {"a": rng.standard_normal((5, 3)).astype("float32"),
         "b": rng.standard_normal((5, 2)).astype("float32")}
    predicted = model.predict(x, verbose=0)
    loaded = tf.saved_model.load(tf_bf16.export(model, str(tmp_path / "m"), verbose=False))
    served = loaded.serve({k: tf.constant(v) for k, v in x.items()})
    for key in ("y", "z"):
        assert served[key].dtype == tf.float32
        assert_bits_equal(served[key], tf.cast(predicted[key], tf.float32), key)


def mlp_trained_in_bf16():
    keras.utils.set_random_seed(6)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.Dense(3)])
    model.compile(optimizer=bf16_optimizers.Adam(1e-2, seed=5), loss="mse")
    rng = np.random.default_rng(7)
    x = rng.standard_normal((256, 4)).astype("float32")
    model.fit(x, np.tanh(x[:, :3] * 2), batch_size=32, epochs=3, verbose=0)
    return model, rng.standard_normal((64, 4)).astype("float32")


def run_tflite(path, x):
    interpreter = tf.lite.Interpreter(model_path=path)
    (inputs,), (outputs,) = interpreter.get_input_details(), interpreter.get_output_details()
    interpreter.resize_tensor_input(inputs["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(inputs["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(outputs["index"])


def bf16_rounding_bound(model, x):
    """Elementwise bound on |bf16 model(x) - exact float32 model(x)| for
    Dense(relu) -> Dense with bf16 weights (exact in both), from bf16's unit
    roundoff u = 2^-8 (Higham's gamma_n = n u / (1 - n u) for a length-n dot
    product plus bias, whatever the summation order or accumulator, as long as
    each operation is rounded to at least bf16 precision):

        E1 = gamma(n0 + 1) (|W1|^T |x16| + |b1|) + |W1|^T |x16 - x|   (x16: x in bf16)
        E2 = gamma(n1 + 1) (|W2|^T (|h| + E1) + |b2|) + |W2|^T E1       (relu: 1-Lipschitz)

    plus the float32 copy's own rounding, gamma_n with u = 2^-24 on the same
    magnitudes."""
    (w1, b1), (w2, b2) = [[np.asarray(tf.cast(w, tf.float64)) for w in layer.weights]
                          for layer in model.layers]
    x64 = x.astype(np.float64)
    x16 = np.asarray(tf.cast(tf.cast(x, tf.bfloat16), tf.float64))

    def gamma(n, u):
        return n * u / (1 - n * u)

    u16, u32 = 2.0**-8, 2.0**-24
    h = np.maximum(x16 @ w1 + b1, 0)
    e1 = gamma(w1.shape[0] + 1, u16) * (np.abs(x16) @ np.abs(w1) + np.abs(b1)) \
        + np.abs(x16 - x64) @ np.abs(w1)
    e2 = gamma(w2.shape[0] + 1, u16) * ((np.abs(h) + e1) @ np.abs(w2) + np.abs(b2)) \
        + e1 @ np.abs(w2)
    magnitude = (np.abs(x64) @ np.abs(w1) + np.abs(b1)) @ np.abs(w2) + np.abs(b2)
    return e2 + gamma(w1.shape[0] + w2.shape[0] + 2, u32) * magnitude


def test_tflite_route_is_a_float32_copy_within_the_bf16_rounding_bound(tmp_path):
    tf_bf16.set_policy()
    model, x = mlp_trained_in_bf16()
    predicted = np.asarray(tf.cast(model.predict(x, verbose=0), tf.float64))

    # The premise: the bf16 model itself converts only with Flex ops, which the
    # TFLite interpreter refuses.
    direct = str(tmp_path / "bf16.tflite")
    model.export(direct, format="litert", verbose=False)
    with pytest.raises(RuntimeError, match="Flex|Select TensorFlow op"):
        run_tflite(direct, x)

    # The float32 copy: the same weights exactly, the model unchanged.
    copy = tf_bf16.float32_copy(model)
    assert {str(w.dtype) for w in copy.weights} == {"float32"}
    for a, b in zip(copy.weights, model.weights):
        assert_bits_equal(a.numpy(), tf.cast(b.value, tf.float32), a.path)
    assert {str(w.dtype) for w in model.weights} == {"bfloat16"}

    path = tf_bf16.export(model, str(tmp_path / "model.tflite"), format="litert",
                          verbose=False)
    served = run_tflite(path, x)
    assert served.dtype == np.float32
    difference = np.abs(served.astype(np.float64) - predicted)
    bound = bf16_rounding_bound(model, x)
    assert np.all(difference <= bound), np.max(difference / bound)
    assert difference.max() > 0     # the copy computes in float32, not in bf16
    # The figures README ("Serving") quotes (pytest -s prints them).
    print(f"\nTFLite float32 copy vs bf16 model, {x.shape[0]} rows: max |difference| "
          f"{difference.max():.3g} (outputs up to {np.abs(predicted).max():.3g}), median "
          f"{np.median(difference):.3g}, at most {np.max(difference / bound):.1%} of the bound")
    with pytest.raises(ValueError, match="float32"):
        tf_bf16.export(model, str(tmp_path / "m.tflite"), format="litert", outputs="bfloat16")
