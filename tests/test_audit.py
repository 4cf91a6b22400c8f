"""tf_bf16.audit (variables, bytes per parameter, float32 ops of the step) and tf_bf16.losses."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_bf16
from tf_bf16.auditing import AuditReport
from tf_bf16.auditing import audit as audit_function
from tf_bf16.losses import BFloat16SoftmaxCrossEntropy
from tf_bf16.losses import bf16_loss
from tf_bf16.losses import softmax_cross_entropy_bf16

# bf16's unit roundoff: half the spacing just above 1.0.
BF16_UNIT_ROUNDOFF = 2.0**-8


@pytest.fixture(autouse=True)
def float32_policy_afterwards():
    """Every test leaves Keras in its default float32 policy, tf_bf16 policy off."""
    yield
    tf_bf16.reset_policy()
    keras.config.set_dtype_policy("float32")


def small_cnn(layer_norm=False, name="cnn"):
    """Conv -> BatchNormalization -> ReLU -> Flatten [-> LayerNormalization] -> Dense logits."""
    inputs = keras.Input((8, 8, 1))
    hidden = keras.layers.Conv2D(4, 3)(inputs)
    hidden = keras.layers.BatchNormalization()(hidden)
    hidden = keras.layers.ReLU()(hidden)
    hidden = keras.layers.Flatten()(hidden)
    if layer_norm:
        hidden = keras.layers.LayerNormalization()(hidden)
    outputs = keras.layers.Dense(10)(hidden)
    return keras.Model(inputs, outputs, name=name)


def sparse_logits_loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


# ---------------------------------------------------------------------------
# Training-state bytes per parameter


@pytest.mark.parametrize("make_optimizer, expected_bytes", [
    (lambda: tf_bf16.optimizers.SGD(0.1, momentum=0.9, rounding="stochastic"), 4.0),
    (lambda: tf_bf16.optimizers.SGD(0.1, momentum=0.9, rounding="kahan"), 6.0),
    (lambda: tf_bf16.optimizers.Adam(rounding="stochastic"), 6.0),
    (lambda: tf_bf16.optimizers.Adam(rounding="kahan"), 8.0),
], ids=["sgd-momentum-stochastic", "sgd-momentum-kahan", "adam-stochastic", "adam-kahan"])
def test_bytes_per_parameter_of_pure_bf16_training(make_optimizer, expected_bytes):
    tf_bf16.set_policy()
    model = small_cnn()
    optimizer = make_optimizer()

    report = audit_function(model, optimizer=optimizer, trace=False)

    assert report.bytes_per_parameter == expected_bytes
    trainable = report.variables_with_role("trainable weight")
    assert {row.dtype for row in trainable} == {"bfloat16"}
    assert report.training_state.trainable_parameters == model.count_params() - 8  # BN stats
    kahan = report.variables_with_role("kahan buffer")
    assert len(kahan) == (len(trainable) if optimizer.rounding == "kahan" else 0)
    # The counter, the learning rate and the rounding seed (int32) are bookkeeping, not
    # per-parameter state: listed (they are in every checkpoint), not in the B/parameter.
    bookkeeping = {row.path for row in report.variables_with_role("bookkeeping")}
    assert {optimizer.iterations.path, optimizer._learning_rate.path,
            optimizer.rounding_seed.path} <= bookkeeping


def test_mixed_bfloat16_with_keras_adam_is_12_bytes_and_float32_work():
    keras.config.set_dtype_policy("mixed_bfloat16")
    model = small_cnn()

    report = audit_function(model, optimizer=keras.optimizers.Adam(), loss=sparse_logits_loss())

    assert report.bytes_per_parameter == 12.0
    assert {row.dtype for row in report.variables_with_role("optimizer slot")} == {"float32"}
    # Keras's Adam updates the float32 master weights with float32 ops.
    update_elements = sum(row.elements for row in report.float_ops_of(kind="optimizer")
                          if not row.scalar_only)
    assert update_elements > report.training_state.trainable_parameters
    state_fix = [fix for fix in report.fixes if fix.finding.startswith("float32/float64 per")]
    assert state_fix and state_fix[0].sound == "yes" and "set_policy" in state_fix[0].how


# ---------------------------------------------------------------------------
# The traced step of a pure-bf16 model (one trace, inspected by several tests)


@pytest.fixture(scope="module")
def bf16_cnn():
    """(report, model): Conv+BN+LN+Dense under the policy, tf_bf16 Adam with Kahan."""
    tf_bf16.set_policy()
    try:
        model = small_cnn(layer_norm=True)
        model.compile(tf_bf16.optimizers.Adam(rounding="kahan", seed=1),
                      loss=sparse_logits_loss(), metrics=["accuracy"])
        report = audit_function(model)
    finally:
        tf_bf16.reset_policy()
    return report, model


def test_batch_norm_moving_statistics_are_non_trainable_statistics(bf16_cnn):
    report, _ = bf16_cnn
    statistics = report.variables_with_role("non-trainable statistic")
    assert sorted(row.path.split("/")[-1] for row in statistics) == [
        "moving_mean", "moving_variance"]
    assert {(row.owner_class, row.dtype) for row in statistics} == {
        ("BatchNormalization", "bfloat16")}
    metrics = report.variables_with_role("metric")
    assert {row.owner for row in metrics} == {"loss", "accuracy"}


def test_normalization_layers_and_loss_are_the_float32_work(bf16_cnn):
    report, _ = bf16_cnn
    upcasting_layers = {(row.group_class, row.phase) for row in report.upcasts
                        if row.kind == "layer"}
    assert {("BatchNormalization", "forward"), ("BatchNormalization", "backward"),
            ("LayerNormalization", "forward"), ("LayerNormalization", "backward")
            } <= upcasting_layers
    # The loss upcasts the bf16 logits and computes softmax cross-entropy in float32.
    loss_ops = {row.op_type for row in report.float_ops_of(kind="loss", phase="forward")}
    assert {"Cast", "SparseSoftmaxCrossEntropyWithLogits"} <= loss_ops
    # Conv2D, ReLU and Dense stay in bf16.
    assert not report.float_ops_of(layer_class="Conv2D")
    assert not report.float_ops_of(layer_class="Dense")
    responsible = " ".join(report.responsible)
    for culprit in ("BatchNormalization", "LayerNormalization",
                    "SparseCategoricalCrossentropy"):
        assert culprit in responsible
    assert 0 < report.wide_percent < 100
    assert report.wide_percent == round(
        100 * report.wide_float_elements / report.float_elements, 2)
    assert f"{report.wide_percent:.1f}%" in report.summary


def test_bookkeeping_metrics_and_fused_updates_are_labelled_apart(bf16_cnn):
    report, model = bf16_cnn
    # Adam's bias correction is scalar float32 arithmetic: listed, flagged, not blamed.
    optimizer_rows = report.float_ops_of(kind="optimizer")
    assert optimizer_rows and all(row.scalar_only for row in optimizer_rows)
    assert not any("adam" in culprit for culprit in report.responsible)
    # Metric updates are their own phase and outside the percentage.
    assert {row.phase for row in report.float_ops_of(kind="metric")} == {"metrics"}
    assert report.metric_wide_float_elements > 0
    fused = {row.op_type: row for row in report.fused_ops}
    adam = fused["TfBf16>ResourceApplyAdam"]
    assert (adam.rounding, adam.count) == ("kahan", len(model.trainable_variables))
    assert adam.elements == report.training_state.trainable_parameters
    assert "float32 registers, bf16 storage" in adam.description
    # Under the policy, fit stores BN moving statistics with stochastic rounding.
    assert fused["TfBf16>StochasticRound"].group_class == "BatchNormalization"


def test_fixes_say_which_findings_have_a_sound_fix(bf16_cnn):
    report, model = bf16_cnn
    verdict = {fix.group: fix for fix in report.fixes}
    batch_norm = next(f for f in report.fixes if f.finding.startswith("BatchNormalization"))
    layer_norm = next(f for f in report.fixes if f.finding.startswith("LayerNormalization"))
    assert batch_norm.sound == layer_norm.sound == "no"
    assert "not sound" in layer_norm.how
    loss = verdict["loss: sparse_categorical_crossentropy"]
    assert loss.sound == "yes" and "bf16_loss" in loss.how
    # The fused update (float32 registers by design), in the group of the optimizer's
    # name (Keras's automatic name: "adam", "adam_1", ...).
    assert verdict[model.optimizer.name].sound == "no"


def test_report_prints_aligned_text_markdown_and_json(bf16_cnn):
    report, _ = bf16_cnn
    text = str(report)
    for section in ("Variables (", "Training state:", "float32/float64 ops in the train step",
                    "Upcasts to float32", "Fused tf_bf16 ops", "Fixes", "Summary:"):
        assert section in text
    assert "8.00 B/parameter" in text
    # Aligned: every row of the variables table starts its dtype column at one offset.
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("path "))
    dtype_column = lines[header].index("dtype")
    for line in lines[header + 2:header + 2 + len(report.variables)]:
        # int32: the optimizer's rounding_seed variable.
        assert line[dtype_column:].split()[0] in ("bfloat16", "float32", "int32", "int64")

    markdown = report.to_markdown()
    assert "| path | owner | class | role | dtype | shape | bytes |" in markdown

    data = json.loads(json.dumps(report.to_dict()))
    assert data["training_state"]["bytes_per_parameter"] == 8.0
    assert len(data["variables"]) == len(report.variables)
    assert data["float_ops"][0].keys() >= {"group", "op_type", "count", "elements"}


# ---------------------------------------------------------------------------
# The fix: bf16 softmax cross-entropy


def test_bf16_loss_removes_the_float32_loss_and_trains():
    tf_bf16.set_policy()
    model = small_cnn()
    model.compile(tf_bf16.optimizers.Adam(rounding="stochastic", seed=3),
                  loss=bf16_loss(sparse_logits_loss()))

    report = audit_function(model)

    loss_rows = report.float_ops_of(kind="loss")
    # Left in float32: the scalar total that Keras casts to floatx, nothing else.
    assert loss_rows and all(row.scalar_only for row in loss_rows)
    assert [row.group for row in loss_rows] == ["loss: total"]
    assert not any("loss" in culprit for culprit in report.responsible)

    x = np.random.default_rng(0).normal(size=(16, 8, 8, 1)).astype("float32")
    y = np.arange(16) % 10
    losses = [float(model.train_on_batch(x, y)) for _ in range(5)]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def _float64_reference(logits, labels):
    shifted = logits - logits.max(-1, keepdims=True)
    exps = np.exp(shifted)
    total = exps.sum(-1, keepdims=True)
    rows = np.arange(len(labels))
    loss = np.log(total[:, 0]) - shifted[rows, labels]
    gradient = exps / total
    gradient[rows, labels] -= 1
    return loss, gradient, -shifted


def test_bf16_loss_gradient_keeps_relative_precision_where_plain_bf16_cancels():
    rng = np.random.default_rng(0)
    batch, classes = 256, 100
    logits = rng.normal(size=(batch, classes)) * rng.choice([1, 3, 8], size=(batch, 1))
    labels = rng.integers(0, classes, size=batch)
    confident = rng.random(batch) < 0.5
    logits[confident, labels[confident]] += rng.uniform(5, 20, size=confident.sum())
    logits_bf16 = tf.constant(logits, tf.bfloat16)
    exact_logits = tf.cast(logits_bf16, tf.float64).numpy()  # the bf16 values, exactly
    loss_ref, gradient_ref, distance = _float64_reference(exact_logits, labels)
    row_max_distance = distance.max(-1, keepdims=True)
    rows = np.arange(batch)

    with tf.GradientTape() as tape:
        tape.watch(logits_bf16)
        loss = softmax_cross_entropy_bf16(tf.constant(labels, tf.int32), logits_bf16)
    gradient = tape.gradient(loss, logits_bf16)
    assert loss.dtype == gradient.dtype == tf.bfloat16

    loss = tf.cast(loss, tf.float64).numpy()
    gradient = tf.cast(gradient, tf.float64).numpy()
    # First-order bounds from the bf16_loss docstring, elementwise.
    loss_error = np.abs(loss - loss_ref) / loss_ref
    assert np.all(loss_error <= (row_max_distance[:, 0] + 5) * BF16_UNIT_ROUNDOFF)
    gradient_error = np.abs(gradient - gradient_ref) / np.abs(gradient_ref)
    bound = (distance + row_max_distance + 6) * BF16_UNIT_ROUNDOFF
    assert np.all(gradient_error <= bound)
    assert np.all(gradient[rows, labels] < 0)  # every example still pulls its label up

    # Stock Keras in bf16: the label's gradient of confident examples is exactly 0.
    plain = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None,
                                                       dtype="bfloat16")
    with tf.GradientTape() as tape:
        tape.watch(logits_bf16)
        plain_loss = plain(tf.constant(labels), logits_bf16)
    plain_gradient = tf.cast(tape.gradient(plain_loss, logits_bf16), tf.float64).numpy()
    lost = plain_gradient[rows, labels] == 0
    assert lost.sum() > 10 and np.all(gradient_ref[rows, labels][lost] != 0)


def test_bf16_loss_agrees_with_keras_for_sparse_and_one_hot_labels():
    rng = np.random.default_rng(1)
    logits = tf.constant(rng.normal(size=(32, 7)) * 3, tf.bfloat16)
    labels = rng.integers(0, 7, size=32)
    weights = rng.uniform(0.5, 2.0, size=32).astype("float32")
    reference = float(sparse_logits_loss()(labels, tf.cast(logits, tf.float32), weights))

    sparse = bf16_loss(sparse_logits_loss())
    one_hot = bf16_loss(keras.losses.CategoricalCrossentropy(from_logits=True))
    by_name = bf16_loss("sparse_categorical_crossentropy", from_logits=True)
    assert isinstance(sparse, BFloat16SoftmaxCrossEntropy) and sparse.sparse
    assert not one_hot.sparse and by_name.sparse
    results = [sparse(labels[:, None], logits, weights),
               one_hot(np.eye(7, dtype="float32")[labels], logits, weights),
               by_name(labels.astype("float32"), logits, weights)]
    for result in results:
        assert result.dtype == tf.bfloat16
        assert float(result) == pytest.approx(reference, rel=0.02)
    # Serialisable like any Keras loss.
    restored = keras.losses.deserialize(keras.losses.serialize(one_hot))
    assert isinstance(restored, BFloat16SoftmaxCrossEntropy) and not restored.sparse


def test_bf16_loss_refuses_what_has_no_sound_bf16_form():
    with pytest.raises(ValueError, match="from_logits"):
        bf16_loss(keras.losses.SparseCategoricalCrossentropy())  # probabilities
    with pytest.raises(ValueError, match="label_smoothing"):
        bf16_loss(keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1))
    with pytest.raises(ValueError, match="from_logits"):
        bf16_loss("categorical_crossentropy")
    with pytest.raises(TypeError, match="representable"):
        bf16_loss(keras.losses.MeanSquaredError())
    # Soft targets are refused when the loss runs, not silently reinterpreted.
    one_hot = bf16_loss(keras.losses.CategoricalCrossentropy(from_logits=True))
    with pytest.raises(tf.errors.InvalidArgumentError, match="one-hot"):
        one_hot(tf.constant([[0.7, 0.3]]), tf.constant([[1.0, 2.0]], tf.bfloat16))


def test_audit_and_the_bf16_loss_are_exported():
    assert tf_bf16.audit is audit_function
    assert tf_bf16.AuditReport is AuditReport
    assert isinstance(audit_function(small_cnn(), trace=False), AuditReport)
    assert tf_bf16.losses.bf16_loss is bf16_loss


# ---------------------------------------------------------------------------
# What fit accepts; layer paths; each fix once; the summary mode


@keras.saving.register_keras_serializable(package="tf_bf16_tests")
class Block(keras.layers.Layer):
    """A GPT-2 block: every block has sublayers with the same names (ln_1, attn, ...)."""

    def __init__(self, width, heads, **kwargs):
        super().__init__(**kwargs)
        self.ln_1 = keras.layers.LayerNormalization(name="ln_1")
        self.attn = keras.layers.MultiHeadAttention(heads, width // heads, name="attn")
        self.ln_2 = keras.layers.LayerNormalization(name="ln_2")
        self.mlp_in = keras.layers.Dense(4 * width, activation="gelu", name="mlp_in")
        self.mlp_out = keras.layers.Dense(width, name="mlp_out")

    def call(self, x, mask):
        h = self.ln_1(x)
        x = x + self.attn(h, h, attention_mask=mask, use_causal_mask=True)
        return x + self.mlp_out(self.mlp_in(self.ln_2(x)))


def gpt2_like(vocabulary=64, length=16, width=32, heads=2, layers=2):
    """Dict inputs as in keras-hub ({"token_ids", "padding_mask"}), logits out."""
    token_ids = keras.Input((length,), dtype="int32", name="token_ids")
    padding_mask = keras.Input((length,), dtype="bool", name="padding_mask")
    x = keras.layers.Embedding(vocabulary, width, name="token_embedding")(token_ids)
    x = x + keras.layers.Embedding(length, width, name="position_embedding")(
        keras.ops.arange(length)[None, :])
    mask = keras.ops.logical_and(padding_mask[:, None, :], padding_mask[:, :, None])
    for index in range(layers):
        x = Block(width, heads, name=f"block_{index}")(x, mask)
    x = keras.layers.LayerNormalization(name="ln_f")(x)
    logits = keras.layers.Dense(vocabulary, name="lm_head")(x)
    return keras.Model({"token_ids": token_ids, "padding_mask": padding_mask}, logits,
                       name="gpt2_like")


def gpt2_like_data(n=8, length=16, vocabulary=64, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocabulary, (n, length + 1))
    x = {"token_ids": tokens[:, :-1].astype("int32"),
         "padding_mask": np.ones((n, length), bool)}
    return x, tokens[:, 1:], rng.uniform(0.5, 1.5, (n, length)).astype("float32")


@pytest.fixture(scope="module")
def gpt2_like_compiled():
    tf_bf16.set_policy()
    try:
        keras.utils.set_random_seed(1)
        model = gpt2_like()
        model.compile(tf_bf16.optimizers.AdamW(1e-3, seed=2), loss=sparse_logits_loss(),
                      weighted_metrics=["accuracy"])
        x, y, weights = gpt2_like_data()
        report = audit_function(model, x, y, sample_weight=weights)
    finally:
        tf_bf16.reset_policy()
    return model, report


def _rows(report):
    return [(r.group, r.phase, r.op_type, r.dtype, r.count, r.elements) for r in report.float_ops]


def test_audit_accepts_what_fit_accepts(gpt2_like_compiled):
    """Dict arrays, a tf.data dataset of (x, y, sample_weight), a generator, and a
    batch of a larger array: the same traced step, op for op."""
    model, report = gpt2_like_compiled
    x, y, weights = gpt2_like_data()
    assert "token_ids: int32 (8, 16)" in report.sample and "sample_weight" in report.sample
    dataset = tf.data.Dataset.from_tensor_slices((x, y, weights)).batch(8)

    def generator():
        while True:
            yield x, y, weights

    big_x, big_y, big_weights = gpt2_like_data(n=40)
    tf_bf16.set_policy()
    for given in (dict(x=dataset), dict(x=generator()),
                  dict(x=big_x, y=big_y, sample_weight=big_weights, batch_size=8)):
        other = audit_function(model, **given)
        assert _rows(other) == _rows(report), given.keys()
    # Without a batch: zeros in the model's input structure (a dict), batch 2.
    zeros = audit_function(model)
    assert "token_ids: int32 (2, 16)" in zeros.sample and "zeros" in zeros.sample
    assert {r.group for r in zeros.float_ops} == {r.group for r in report.float_ops}


def test_audit_accepts_tuple_inputs():
    first, second = keras.Input((3,), name="a"), keras.Input((5,), name="b")
    joined = keras.layers.Concatenate()([keras.layers.Dense(4)(first), second])
    model = keras.Model((first, second), keras.layers.Dense(1)(joined))
    model.compile(tf_bf16.optimizers.SGD(0.1, seed=1), loss="mse")
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 3)).astype("float32"),
         rng.standard_normal((6, 5)).astype("float32"))
    report = audit_function(model, x, rng.standard_normal((6, 1)).astype("float32"))
    assert "float32 (6, 3), float32 (6, 5)" in report.sample
    model.fit(x, np.zeros((6, 1), "float32"), verbose=0)   # what fit accepts


def test_groups_and_owners_are_layer_paths(gpt2_like_compiled):
    """Every block has an 'ln_1': the report tells them apart by path."""
    _, report = gpt2_like_compiled
    layer_norm_groups = {r.group for r in report.float_ops if r.group_class == "LayerNormalization"}
    assert layer_norm_groups == {"block_0/ln_1", "block_0/ln_2", "block_1/ln_1", "block_1/ln_2",
                                 "ln_f"}
    owners = {r.owner for r in report.variables if r.path.endswith("ln_1/gamma")}
    assert owners == {"block_0/ln_1", "block_1/ln_1"}
    keys = [(r.group, r.phase, r.op_type, r.dtype) for r in report.float_ops]
    assert len(keys) == len(set(keys))   # no two rows with the same name


def test_each_fix_is_said_once(gpt2_like_compiled):
    _, report = gpt2_like_compiled
    findings = [fix.finding for fix in report.fixes]
    assert len(findings) == len(set(findings))
    (layer_norm,) = [f for f in report.fixes if f.finding.startswith("LayerNormalization")]
    assert layer_norm.groups == ["block_0/ln_1", "block_0/ln_2", "block_1/ln_1",
                                 "block_1/ln_2", "ln_f"]
    assert layer_norm.group == ", ".join(layer_norm.groups)
    for text in (report.to_text(), report.to_markdown().replace("\\|", "|")):
        assert " ".join(text.split()).count(" ".join(layer_norm.how.split())) == 1
    assert "5 LayerNormalization layers" in report.summary


def test_summary_mode_fits_on_a_screen(gpt2_like_compiled):
    _, report = gpt2_like_compiled
    full, summary = report.to_text(), report.to_text(detail="summary")
    assert len(summary.splitlines()) <= 50 < len(full.splitlines())
    for section in ("Summary:", "Variables by role", "8.00 B/parameter",
                    "float32/float64 compute by class", "LayerNormalization", "Fixes"):
        assert section in summary
    assert report.summary.split(";")[0] in summary.replace("\n", " ")
    markdown = report.to_markdown(detail="summary")
    assert "| LayerNormalization | layer | 5 |" in markdown
    with pytest.raises(ValueError, match="detail"):
        report.to_text(detail="short")
