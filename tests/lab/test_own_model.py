"""`tf_bf16.compare(build_model, data, ...)` and `compare --model --data`: a model
defined here, outside the package, on generated data, at small sizes."""

import contextlib
import io
import json
import textwrap

import keras
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

import tf_bf16
from conftest import fresh_global_state
from tf_bf16 import __main__ as cli
from tf_bf16 import policy
from tf_bf16.lab import runner
from tf_bf16.lab.tasks import STOCK, VARIANTS

pytestmark = pytest.mark.lab

restore_global_state = fresh_global_state(7)

FEATURES, CLASSES = 6, 3


def make_data(n=160, seed=0):
    """Three classes from the signs of two features: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, FEATURES)).astype("float32")
    y = ((x[:, 0] > 0).astype("int32") + (x[:, 1] > 0).astype("int32"))
    return x, y


def build_model():
    """A small MLP with BatchNormalization, compiled with its loss and metric."""
    model = keras.Sequential([
        keras.Input((FEATURES,)),
        keras.layers.Dense(16, name="hidden"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.ReLU(),
        keras.layers.Dense(CLASSES, name="logits"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def build_uncompiled():
    return keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(CLASSES)])


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class _FitRecorder:
    """Wraps keras.Model.fit: per model, the weights at its first fit call and
    the x of every call (one call per epoch for array data)."""

    def __init__(self, monkeypatch):
        self.first_weights = {}
        self.xs = {}
        self.policies = {}
        original = keras.Model.fit
        recorder = self

        def fit(model, x=None, *args, **kwargs):
            key = id(model)
            if key not in recorder.first_weights:
                recorder.first_weights[key] = [np.asarray(w) for w in model.get_weights()]
                recorder.policies[key] = model.dtype_policy.name
            recorder.xs.setdefault(key, []).append(None if x is None else np.array(x))
            return original(model, x, *args, **kwargs)

        monkeypatch.setattr(keras.Model, "fit", fit)

    def in_order(self):
        return [(self.policies[k], self.first_weights[k], self.xs[k]) for k in self.xs]


def _bf16(array):
    return np.asarray(array, dtype=np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def test_every_variant_same_weights_and_order_and_outputs(tmp_path, monkeypatch, capsys):
    recorder = _FitRecorder(monkeypatch)
    x, y = make_data()
    result = tf_bf16.compare(build_model, (x, y), epochs=2, steps_per_epoch=3, batch_size=16,
                             seed=5, include_stock=True, out=str(tmp_path / "out"),
                             progress=False)
    printed = capsys.readouterr().out
    variants = list(VARIANTS) + [STOCK]
    assert list(result.variants) == variants
    assert keras.config.dtype_policy().name == "float32" and not policy.policy_state().active

    # The shared initial weights: float32's, built here independently after
    # set_random_seed(seed); each variant starts from them in its own dtype.
    keras.utils.set_random_seed(5)
    want = build_model().get_weights()
    runs = recorder.in_order()
    assert [p for p, _, _ in runs] == ["float32", "mixed_bfloat16", "bfloat16", "bfloat16",
                                       "bfloat16", "bfloat16"]
    for variant, (_, weights, _) in zip(variants, runs):
        assert len(weights) == len(want)
        for got, w in zip(weights, want):
            expected = w if variant in ("float32", "mixed_bfloat16") else _bf16(w)
            np.testing.assert_array_equal(np.asarray(got, np.float32), expected,
                                          err_msg=variant)
    # The same data order for every variant: the same arrays, epoch by epoch;
    # reshuffled between epochs.
    first_xs = runs[0][2]
    assert len(first_xs) == 2 and first_xs[0].shape == (3 * 16, FEATURES)
    assert not np.array_equal(first_xs[0], first_xs[1])
    for variant, (_, _, xs) in zip(variants, runs):
        for a, b in zip(xs, first_xs):
            np.testing.assert_array_equal(a, b, err_msg=variant)

    # Results: trained, finite, training-state bytes from the audit (Adam).
    expected_bytes = {"float32": 12, "mixed_bfloat16": 12, "nearest": 6, "stochastic": 6,
                      "kahan": 8, STOCK: 6}
    for variant, r in result.variants.items():
        assert r["finite"] and r["steps"] == 6, variant
        assert len(r["curve"]) == 2 and r["curve_steps"] == [3, 6], variant
        assert r["bytes_per_parameter"] == expected_bytes[variant], variant
        if variant == STOCK:
            # Stock Keras Adam in pure bf16: beta_2 = 0.999 rounds to 1.0, every step is 0.
            assert r["weights_changed_fraction"] == 0.0
        else:
            assert r["weights_changed_fraction"] > 0.5, variant
    assert result.variants["float32"]["optimizer"] == "keras.Adam"
    assert result.variants["kahan"]["optimizer"] == "tf_bf16.Adam(rounding='kahan')"
    assert result.gaps["float32"] == 0.0
    assert result.metrics["kahan"] == result.variants["kahan"]["metric"]
    assert result.metric == "validation accuracy" and result.higher_is_better

    # What is printed, returned and written is the CLI's table and files.
    for label in ("float32", "mixed_bfloat16", "bf16 nearest", "bf16 SR", "bf16 Kahan",
                  "bf16 stock Keras", "validation accuracy", "B/param"):
        assert label in printed and label in result.text, label
    assert result.text in printed and str(result) == result.text
    out = tmp_path / "out"
    assert result.files == [str(out / "results.json"), str(out / "results.md"),
                            str(out / "curves.png")]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert "| mixed_bfloat16 |" in md and "| bf16 Kahan |" in md and "curves.png" in md
    assert result.markdown in md
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["variants"]) == variants
    assert saved["metric"] == "validation accuracy" and saved["higher_is_better"] is True
    assert saved["command"].startswith("tf_bf16.compare(") and "seed=5" in saved["command"]
    assert saved["variants"]["float32"]["task_info"] == {
        "validation_split": 0.2, "train": 128, "validation": 32}


def test_dataset_with_validation_dict_and_optimizer_template():
    """A tf.data.Dataset for training, arrays for validation, an optimizer given
    as a Keras instance with a schedule, the loss as its reported metric."""
    x, y = make_data()
    train = tf.data.Dataset.from_tensor_slices((x[:128], y[:128])).batch(32)
    schedule = keras.optimizers.schedules.CosineDecay(0.05, decay_steps=8)
    result = tf_bf16.compare(
        build_uncompiled, {"train": train, "validation": (x[128:], y[128:])},
        optimizer=keras.optimizers.SGD(schedule, momentum=0.9), loss=LOSS, epochs=2,
        variants=["float32", "kahan"], progress=False, verbose=False)
    assert list(result.variants) == ["float32", "kahan"]
    assert result.metric == "validation loss" and not result.higher_is_better
    assert result.variants["kahan"]["optimizer"] == "tf_bf16.SGD(rounding='kahan')"
    assert result.variants["float32"]["steps"] == 8
    config = result.summary["config"]
    assert config["optimizer"] == "sgd" and config["optimizer_kwargs"]["momentum"] == 0.9
    assert config["optimizer_kwargs"]["learning_rate"]["class_name"] == "CosineDecay"
    # A loss that went down, in float32 and in pure bf16.
    for r in result.variants.values():
        assert r["curve"][-1] < 1.0 < np.log(CLASSES) + 0.5


def test_compiled_optimizer_is_the_template_and_evaluate_callable():
    x, y = make_data()

    def build_with_lion():
        model = build_uncompiled()
        model.compile(optimizer=keras.optimizers.Lion(1e-3), loss=LOSS)
        return model

    calls = []

    def agreement(model):
        calls.append(model.dtype_policy.name)
        predicted = np.argmax(np.asarray(model.predict(x, verbose=0), np.float32), -1)
        return float(np.mean(predicted == y))

    result = tf_bf16.compare(build_with_lion, (x, y), evaluate=agreement,
                             higher_is_better=True, variants="float32,stochastic",
                             steps_per_epoch=2, progress=False, verbose=False)
    assert result.summary["config"]["optimizer"] == "lion"
    assert result.variants["stochastic"]["optimizer"] == "tf_bf16.Lion(rounding='stochastic')"
    assert result.variants["float32"]["optimizer"] == "keras.Lion"
    assert result.metric == "agreement"
    # Checked once before training, then once per variant after its epoch.
    assert calls == ["float32", "float32", "bfloat16"]
    assert result.variants["float32"]["task_info"]["validation"] == "evaluate=agreement"


class AddsFloat32Constant(keras.layers.Layer):
    """Breaks under any bf16 policy: adds a float32 constant to bf16 inputs."""

    def call(self, inputs):
        return inputs + tf.constant(1.0, tf.float32)


def build_breaks_in_bf16():
    return keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(CLASSES),
                             AddsFloat32Constant()])


def build_with_float32_head():
    return keras.Sequential([keras.Input((FEATURES,)), keras.layers.Dense(8, name="body"),
                             keras.layers.Dense(CLASSES, dtype="float32", name="head")])


def test_model_failing_under_bf16_names_the_variant_before_training(monkeypatch):
    fits = []
    original = keras.Model.fit
    monkeypatch.setattr(keras.Model, "fit",
                        lambda self, *a, **k: fits.append(1) or original(self, *a, **k))
    x, y = make_data()
    with pytest.raises(RuntimeError) as raised:
        tf_bf16.compare(build_breaks_in_bf16, (x, y), loss=LOSS, progress=False)
    error = raised.value
    assert isinstance(error, runner.VariantError)
    assert error.variant == "mixed_bfloat16" and "building the model" in error.stage
    message = str(error)
    assert "variant 'mixed_bfloat16'" in message and "mixed_bfloat16\" policy" in message
    assert "cast them to the layer's compute dtype" in message and "--variants" in message
    assert isinstance(error.__cause__, TypeError)
    assert not fits  # nothing trained
    assert keras.config.dtype_policy().name == "float32"


def test_strict_policy_failure_says_keep_float32_and_keep_float32_works():
    x, y = make_data()
    with pytest.raises(runner.VariantError) as raised:
        tf_bf16.compare(build_with_float32_head, (x, y), loss=LOSS,
                        variants=["float32", "stochastic"], progress=False)
    assert raised.value.variant == "stochastic"
    assert isinstance(raised.value.__cause__, tf_bf16.StrictPolicyError)
    assert "keep_float32=[regex]" in str(raised.value)
    result = tf_bf16.compare(build_with_float32_head, (x, y), loss=LOSS,
                             variants=["float32", "stochastic"], keep_float32=["^head"],
                             steps_per_epoch=2, progress=False, verbose=False)
    assert result.variants["stochastic"]["state_dtypes"] == ["bfloat16", "float32"]


def _raises(exception, match, build=build_model, data=None, **kwargs):
    with pytest.raises(exception, match=match):
        tf_bf16.compare(build, make_data() if data is None else data, progress=False,
                        verbose=False, **kwargs)


def test_bad_inputs_name_the_argument():
    x, y = make_data()
    _raises(TypeError, "build_model must be a zero-argument callable", build=build_model())
    _raises(TypeError, r"must return a keras.Model .* it returned int 3", build=lambda: 3)
    _raises(TypeError, "data must be an \\(x, y\\) tuple", data=x)
    _raises(ValueError, r"same number of examples; got \[160\] for x, \[159\] for y",
            data=(x, y[:-1]))
    _raises(ValueError, "needs the key 'train'", data={"training": (x, y)})
    _raises(ValueError, "without validation data",
            data=tf.data.Dataset.from_tensor_slices((x, y)).batch(8))
    _raises(ValueError, "not batched", data={"train": tf.data.Dataset.from_tensor_slices(
        (x, y)), "validation": (x, y)})
    _raises(ValueError, "repeats forever; pass steps_per_epoch", data={
        "train": tf.data.Dataset.from_tensor_slices((x, y)).batch(8).repeat(),
        "validation": (x, y)})
    _raises(ValueError, "different first batch each time", data={
        "train": tf.data.Dataset.from_tensor_slices((x, y)).shuffle(160).batch(8),
        "validation": (x, y)})
    _raises(ValueError, "no validation data", validation_split=0)
    _raises(ValueError, "variants: unknown 'fp8'", variants=["float32", "fp8"])
    _raises(ValueError, "epochs must be a positive integer", epochs=0)
    _raises(ValueError, "learning_rate must be a finite number", learning_rate=float("nan"))
    _raises(ValueError, "no loss", build=build_uncompiled)
    _raises(ValueError, "metric='auc' is not one of model.evaluate's results: accuracy, loss",
            metric="auc")
    _raises(ValueError, "optimizer='rmsprop': expected one of sgd, adam, adamw, lion",
            optimizer="rmsprop")
    _raises(ValueError, "RMSprop, which tf_bf16 has no bfloat16 version of",
            optimizer=keras.optimizers.RMSprop())
    _raises(ValueError, "compiles the model with RMSprop \\(compile's default",
            build=lambda: _compiled(build_uncompiled(), loss=LOSS))
    _raises(ValueError, "with evaluate=..., pass higher_is_better",
            evaluate=lambda model: 0.0)
    _raises(TypeError, r"evaluate\(model\) must return a number",
            evaluate=lambda model: "good", higher_is_better=True)
    _raises(ValueError, "Keras does not say whether a higher or a lower '_mean_of_pred'",
            metrics=[_mean_of_pred])
    assert keras.config.dtype_policy().name == "float32"


def _mean_of_pred(y_true, y_pred):
    return keras.ops.mean(y_pred)


def _compiled(model, **kwargs):
    model.compile(**kwargs)
    return model


# ---------------------------------------------------------------------------
# The command line: compare --model MODULE:FUNCTION --data MODULE:FUNCTION

MODULE = textwrap.dedent("""\
    import keras
    import numpy as np

    def build_model():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                                  keras.layers.Dense(2)])
        model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        return model

    def data():
        rng = np.random.default_rng(1)
        x = rng.standard_normal((96, 4)).astype("float32")
        return {"train": (x[:64], (x[:64, 0] > 0).astype("int32")),
                "validation": (x[64:], (x[64:, 0] > 0).astype("int32"))}

    def returns_a_number():
        return 3

    NOT_A_FUNCTION = 4
    """)


def _main(argv):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = cli.main(argv)
    return status, stdout.getvalue(), stderr.getvalue()


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    path = tmp_path / "my_user_models.py"
    path.write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return path


def test_cli_model_and_data_from_a_file_and_a_module(user_module, tmp_path):
    out = tmp_path / "out"
    status, text, _ = _main(["compare", "--model", f"{user_module}:build_model",
                             "--data", "my_user_models:data", "--optimizer", "adamw",
                             "--learning-rate", "0.01", "--steps", "2", "--epochs", "2",
                             "--variants", "float32,mixed_bfloat16,kahan", "--no-progress",
                             "--out", str(out)])
    assert status == 0, text
    assert "validation accuracy" in text and "mixed_bfloat16" in text
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["variants"]) == ["float32", "mixed_bfloat16", "kahan"]
    assert saved["task"] == "build_model"
    assert saved["variants"]["kahan"]["optimizer"] == "tf_bf16.AdamW(rounding='kahan')"
    assert saved["config"]["learning_rate"] == 0.01
    assert saved["variants"]["mixed_bfloat16"]["bytes_per_parameter"] == 12
    assert saved["command"] == (
        f"python -m tf_bf16 compare --model {user_module}:build_model "
        "--data my_user_models:data --optimizer adamw --validation-split 0.2 --seed 0 "
        "--epochs 2 --steps 2 --learning-rate 0.01 --variants float32,mixed_bfloat16,kahan "
        f"--out {out}")
    assert (out / "curves.png").stat().st_size > 1000
    assert keras.config.dtype_policy().name == "float32"


@pytest.mark.parametrize("argv, message", [
    (["--model", "my_user_models", "--data", "my_user_models:data"],
     "--model takes MODULE:FUNCTION"),
    (["--model", "no_such_module_here:build", "--data", "my_user_models:data"],
     "cannot import 'no_such_module_here'"),
    (["--model", "my_user_models:build", "--data", "my_user_models:data"],
     "has no 'build' \\(its functions: build_model, data, returns_a_number\\)"),
    (["--model", "my_user_models:NOT_A_FUNCTION", "--data", "my_user_models:data"],
     "'NOT_A_FUNCTION' is not a function \\(it is int 4\\)"),
    (["--model", "missing/file.py:build_model", "--data", "my_user_models:data"],
     "no such file 'missing/file.py'"),
    (["--model", "my_user_models:returns_a_number", "--data", "my_user_models:data",
      "--optimizer", "sgd"],
     "--model my_user_models:returns_a_number must return a keras.Model"),
    (["--model", "my_user_models:build_model", "--data", "my_user_models:returns_a_number",
      "--optimizer", "sgd"],
     "data must be an \\(x, y\\) tuple"),
    (["--model", "my_user_models:build_model", "--data", "my_user_models:data"],
     "compiles the model with RMSprop"),
    (["--model", "my_user_models:build_model"], "--model needs --data"),
    (["--model", "my_user_models:build_model", "--data", "my_user_models:data",
      "--reduced"], "--reduced applies to the built-in tasks"),
    (["--task", "least_squares", "--optimizer", "sgd", "--metric", "loss"],
     "--optimizer, --metric: for your own model"),
])
def test_cli_bad_model_or_data(user_module, argv, message):
    status, _, err = _main(["compare", "--no-progress", *argv])
    assert status == 2
    assert __import__("re").search(message, err), err


def test_cli_model_failing_under_bf16(tmp_path):
    path = tmp_path / "breaks.py"
    path.write_text(textwrap.dedent("""\
        import keras
        import tensorflow as tf

        class AddsFloat32Constant(keras.layers.Layer):
            def call(self, inputs):
                return inputs + tf.constant(1.0, tf.float32)

        def build_model():
            return keras.Sequential([keras.Input((4,)), keras.layers.Dense(2),
                                     AddsFloat32Constant()])
        """))
    data = tmp_path / "arrays.py"
    data.write_text("import numpy as np\n\ndef data():\n"
                    "    return np.ones((20, 4), 'float32'), np.ones((20, 2), 'float32')\n")
    status, _, err = _main(["compare", "--model", f"{path}:build_model", "--data",
                            f"{data}:data", "--loss", "mse", "--variants",
                            "float32,nearest", "--no-progress"])
    assert status == 1
    assert "variant 'nearest'" in err and "failed while building the model" in err
    assert "--variants" in err
