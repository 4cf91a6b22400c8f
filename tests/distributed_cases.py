"""What the distributed tests share: models, data, optimizers, records and their checks.

Imported by the training scripts that run in subprocesses
(tests/tf_distributed.py on TensorFlow, tests/jax_distributed.py on JAX) and
by the tests that compare their records (tests/test_distributed.py,
tests/test_distributed_jax.py). Imports neither TensorFlow nor JAX (Keras
only where a model is built), so either backend can use it.

The models:

- ``exact``: Dense and Embedding (duplicate ids) weights whose gradients are
  exact in any order of evaluation (small integer features, a loss linear in
  the outputs, powers of two for every mean): one replica and any number of
  replicas, sharded or not, sum the same gradients to the same bits, so the
  optimizer update is the only arithmetic left that could tell them apart.
- ``real``: a ReLU network with softmax cross-entropy and an Embedding, whose
  gradients depend on the reduction order (per-replica partial sums).

A record (one ``.npz``) maps ``"<path>@<replica>"`` to each replica's own copy
of every model and optimizer variable (optimizer variables as
``"optimizer/<name>"``), ``"initial/<path>"`` to the trainable weights before
training, and ``seed`` / ``drawn_seed`` to the optimizer's seed after and
before training. bf16 arrays are stored as their uint16 bits.
"""

import numpy as np

REPLICAS = 2
GLOBAL_BATCH = 16
STEPS = 6
VOCAB, SEQ, FEATURES = 12, 4, 8

# name: (optimizer class, keyword arguments): every tf_bf16 optimizer; plain SGD
# updates an Embedding's rows sparsely on TensorFlow (deduplicated IndexedSlices).
OPTIMIZERS = {
    "sgd_plain": ("SGD", dict(learning_rate=0.05)),
    "sgd_nesterov": ("SGD", dict(learning_rate=0.05, momentum=0.9, nesterov=True)),
    "adam": ("Adam", dict(learning_rate=0.01)),
    "adamw_amsgrad": ("AdamW", dict(learning_rate=0.01, weight_decay=0.1, amsgrad=True)),
    "lion": ("Lion", dict(learning_rate=0.003, weight_decay=0.5)),
}
ROUNDINGS = ("nearest", "stochastic", "kahan")


def exact_data():
    rng = np.random.default_rng(7)
    n = GLOBAL_BATCH * STEPS
    features = rng.integers(-2, 3, (n, FEATURES))
    ids = rng.integers(0, VOCAB, (n, SEQ))
    ids[:, 0] = ids[:, 1]   # duplicate ids within an example
    return np.concatenate([features, ids], 1).astype(np.float32), np.zeros((n, 1), np.float32)


def real_data():
    rng = np.random.default_rng(3)
    n = GLOBAL_BATCH * STEPS
    features = rng.standard_normal((n, FEATURES))
    ids = rng.integers(0, VOCAB, (n, SEQ))
    teacher = rng.standard_normal((FEATURES, 3))
    y = np.argmax(features @ teacher + 0.3 * rng.standard_normal((n, 3)), axis=1)
    return np.concatenate([features, ids], 1).astype(np.float32), y.astype(np.int32)


def build_model(kind):
    """One float32 input: FEATURES features, then SEQ token ids (exact small
    integers). Keras 3.15's `fit` under MultiWorkerMirroredStrategy cannot take
    a dict of inputs (its symbolic build calls `strategy.reduce` on the dict)."""
    import keras

    inputs = keras.Input((FEATURES + SEQ,), name="inputs")
    features = inputs[:, :FEATURES]
    ids = keras.ops.cast(inputs[:, FEATURES:], "int32")
    embedded = keras.layers.GlobalAveragePooling1D()(
        keras.layers.Embedding(VOCAB, 4, name="embedding")(ids))
    if kind == "exact":
        dense = keras.layers.Dense(4, name="dense")(features)
        return keras.Model(inputs, keras.layers.Add()([dense, embedded]))
    hidden = keras.layers.Dense(16, activation="relu", name="hidden")(features)
    hidden = keras.layers.Concatenate()([hidden, embedded])
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(hidden))


def linear_loss(y_true, y_pred):
    import keras

    return keras.ops.mean(keras.ops.cast(y_pred, "float32"), axis=-1)


def save(path, arrays):
    # bf16 arrays are stored as their uint16 bits (npz has no bf16).
    stored = {}
    for key, array in arrays.items():
        array = np.asarray(array)
        if array.dtype.name == "bfloat16":
            key, array = key + ":bf16", array.view(np.uint16)
        stored[key] = array
    np.savez(path, **stored)


def load(path):
    import ml_dtypes

    with np.load(path) as data:
        return {(k[:-5] if k.endswith(":bf16") else k):
                (data[k].view(ml_dtypes.bfloat16) if k.endswith(":bf16") else data[k])
                for k in data.files}


def bits(x):
    """Raw bit pattern of an array as an unsigned integer array."""
    x = np.asarray(x)
    return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize])


def assert_bits_equal(a, b, what=""):
    a_bits, b_bits = bits(a), bits(b)
    assert a_bits.shape == b_bits.shape, f"{what}: shapes {a_bits.shape} != {b_bits.shape}"
    mismatch = np.flatnonzero(a_bits.reshape(-1) != b_bits.reshape(-1))
    assert mismatch.size == 0, (
        f"{what}: {mismatch.size} of {a_bits.size} elements differ; first at flat index "
        f"{mismatch[0]}: {a_bits.reshape(-1)[mismatch[0]]:#x} != "
        f"{b_bits.reshape(-1)[mismatch[0]]:#x}")


def paths(record):
    return sorted({key.rsplit("@", 1)[0] for key in record if "@" in key})


def assert_replicas_identical(record, replicas, what):
    keys = paths(record)
    for path in keys:
        copies = [record[f"{path}@{r}"] for r in range(replicas) if f"{path}@{r}" in record]
        assert len(copies) == replicas, (what, path, len(copies))
        for r, copy in enumerate(copies[1:], 1):
            assert_bits_equal(copy, copies[0], f"{what}: {path}, replica {r} vs 0")


def assert_same_bits(a, b, what, every_weight_moves=True):
    """Replica 0 of `a` against replica 0 of `b`, every variable; and training
    moved the weights, so that the comparison is not one of initial values
    (every trainable weight, unless rounding to nearest may stall some)."""
    assert paths(a) == paths(b), what
    for path in paths(a):
        assert_bits_equal(a[f"{path}@0"], b[f"{path}@0"], f"{what}: {path}")
    initial = [key for key in b if key.startswith("initial/")]
    assert initial, what
    moved = [np.any(bits(b[key]) != bits(b[key[len("initial/"):] + "@0"])) for key in initial]
    assert all(moved) if every_weight_moves else any(moved), (
        what, [k for k, m in zip(initial, moved) if not m])


def sr_spacing(values):
    """The gap between the two bf16 neighbours SR chooses from at |values|
    (2**(exponent - 7) for normal numbers; 2**-133 below)."""
    magnitude = np.abs(np.asarray(values, np.float64))
    exponent = np.floor(np.log2(np.maximum(magnitude, 2.0**-126)))
    return np.where(magnitude > 0, np.exp2(exponent - 7), 0.0)


def assert_within_sr_noise(replicated, single, other_seed, steps, what):
    """RMS over every trainable weight of (replicated - single) against the
    derived bound sqrt(steps / 2) * RMS(spacing) and the measured seed-to-seed
    RMS (see the module docstring). Also: the two runs did differ somewhere or
    agreed exactly; both are reported."""
    weights = [p for p in paths(single) if not p.startswith("optimizer/")]
    a = np.concatenate([np.asarray(replicated[f"{p}@0"], np.float64).ravel() for p in weights])
    b = np.concatenate([np.asarray(single[f"{p}@0"], np.float64).ravel() for p in weights])
    c = np.concatenate([np.asarray(other_seed[f"{p}@0"], np.float64).ravel() for p in weights])
    spacing = sr_spacing(np.maximum(np.abs(a), np.abs(b)))
    replica_rms = np.sqrt(np.mean((a - b) ** 2))
    derived = np.sqrt(steps / 2) * np.sqrt(np.mean(spacing ** 2))
    seed_rms = np.sqrt(np.mean((b - c) ** 2))
    report = (f"{what}: {np.sum(a != b)} of {a.size} weights differ from one replica's; RMS "
              f"{replica_rms:.3g}, derived SR bound {derived:.3g}, seed-to-seed RMS {seed_rms:.3g}")
    assert replica_rms <= derived, report
    assert replica_rms <= seed_rms, report
    assert seed_rms > 0, report   # the noise scale is not vacuous


def assert_shards_consistent(record, what):
    """For every sharded variable of a record: the shards that hold the same
    part of the array (replicas along an unsharded mesh axis) have the same
    bits, and together they are the array gathered to the host ("@0")."""
    sharded = sorted({key.split("#")[0] for key in record if "#" in key})
    for path in sharded:
        whole = np.asarray(record[f"{path}@0"])
        assembled = np.zeros(whole.shape, whole.dtype)
        covered = np.zeros(whole.shape, bool)
        by_index = {}
        for key in record:
            if key.startswith(f"{path}#") and not key.endswith(":index"):
                index = record[f"{key}:index"]
                place = tuple(slice(int(a), int(b)) for a, b in index)
                by_index.setdefault(tuple(map(tuple, index)), []).append(record[key])
                assembled[place] = record[key]
                covered[place] = True
        assert covered.all(), f"{what}: the shards of {path} do not cover it"
        assert_bits_equal(assembled, whole, f"{what}: {path} assembled from its shards")
        for index, copies in by_index.items():
            for copy in copies[1:]:
                assert_bits_equal(copy, copies[0], f"{what}: {path}, replicas of shard {index}")
    return sharded
