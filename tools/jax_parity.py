"""Bit-for-bit parity of tf_bf16 on Keras's JAX backend with its TensorFlow CPU kernels.

Two halves, in two processes:

    KERAS_BACKEND=tensorflow python tools/jax_parity.py reference DIR
        runs every case with the TensorFlow backend (the C++ CPU kernels) and
        writes DIR/cases.json and one DIR/<case>.npz per case: the inputs
        (initial weights, gradients, batches) and the bits of every variable
        after every step. About 3 MB: small enough to carry to another machine.

    KERAS_BACKEND=jax python tools/jax_parity.py check DIR [--json FILE]
        runs the same cases with the JAX backend (tf_bf16.jax_ops, compiled by
        XLA for the default device: CPU here, the GPU on a GPU machine) from the
        stored inputs and compares bits. One verdict line per case, a summary,
        exit status 1 if any case differs. Needs no TensorFlow.

    python tools/jax_parity.py portable DIR [--resume-from BACKEND]
        the portability half (tests/test_jax_backend.py runs it both ways):
        trains the Embedding model of "fit/embedding" one epoch on this backend,
        saves DIR/<label>.<backend>.keras, trains one more epoch and writes its
        records; with --resume-from, first resumes the other backend's files
        here for that second epoch.

tools/h200/README.md says how the check runs on a GPU machine.

The cases (`cases()`):

- "opt/...": an optimizer applied to Keras variables for 4 steps from stored
  gradients (TensorFlow: `optimizer.apply`; JAX: `jax.jit(optimizer.stateless_apply)`,
  as `fit` runs it), for every optimizer x rounding x dtype (bfloat16, float32),
  and Keras's features on bf16: learning-rate schedules, weight decay with
  exclusion, EMA, gradient accumulation, value clipping; and sparse gradients:
  an embedding table whose gradient is `tf.IndexedSlices` on TensorFlow and the
  equivalent dense array on JAX, duplicate ids included. Every weight, slot,
  Kahan buffer, EMA copy, accumulator and the iteration counter is compared.
- "fit/batchnorm": `fit` of a BatchNormalization model under
  `tf_bf16.set_policy()`, 16 steps: the moving statistics' stochastic
  rounding, keyed on the traced iteration count.
- "fit/embedding-...": `fit` of an Embedding model under the policy.
- "pow/...": Adam's bias correction `beta ** (step + 1)` for steps 0..N-1,
  computed as the optimizer computes it (a scalar inside `jit`), against the
  scalar `tf.pow` of the TensorFlow wrapper.

Inputs are chosen so that what Keras computes outside tf_bf16 is exact on
both backends (see `_exact_*`): XLA contracts Keras's own multiply-adds into
FMAs and sums in other orders, which would change the inputs of tf_bf16's
update before it runs. Schedules with transcendental functions are included:
their bits depend on each backend's math library (a mismatch there is
reported against the case, with the learning rate named).
"""

import argparse
import datetime
import json
import os
import sys
import time
import zlib

import numpy as np

POW_BETAS = (0.9, 0.95, 0.99, 0.999)
POW_STEPS = 4096
STEPS = 4


def _log(message):
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", flush=True)


# ---------------------------------------------------------------------------
# The cases


def _optimizer_case(optimizer, kwargs, rounding, dtype, label, **extra):
    name = f"opt/{label}-{rounding}-{dtype}"
    case = {"name": name, "kind": "optimizer", "optimizer": optimizer,
            "kwargs": dict(kwargs, rounding=rounding, seed=1234),
            "dtype": dtype, "variables": {"kernel": [17, 23], "bias": [23]},
            "sparse": None, "exclude": None, "steps": STEPS}
    case.update(extra)
    return case


OPTIMIZERS = {
    "SGD": ("SGD", {"learning_rate": 0.05}),
    "SGD_momentum": ("SGD", {"learning_rate": 0.05, "momentum": 0.9}),
    "SGD_nesterov": ("SGD", {"learning_rate": 0.05, "momentum": 0.9, "nesterov": True}),
    "Adam": ("Adam", {"learning_rate": 0.01}),
    "Adam_amsgrad": ("Adam", {"learning_rate": 0.01, "amsgrad": True}),
    "AdamW": ("AdamW", {"learning_rate": 0.01, "weight_decay": 0.1}),
    "Lion": ("Lion", {"learning_rate": 0.003}),
}
ROUNDINGS = ("nearest", "stochastic", "kahan")
DTYPES = ("bfloat16", "float32")


def cases():
    """Every case, in a fixed order (names are unique): the scalar bias
    correction and the `fit` cases first, so that a time-limited run on another
    machine reaches them."""
    out = [{"name": "pow/bias-correction", "kind": "pow"},
           {"name": "fit/batchnorm", "kind": "batchnorm", "steps": 16}]
    for label in ("SGD", "SGD_momentum", "Adam", "Lion"):
        optimizer, kwargs = OPTIMIZERS[label]
        for rounding in ("stochastic", "kahan"):
            out.append({"name": f"fit/embedding-{label}-{rounding}", "kind": "embedding_fit",
                        "optimizer": optimizer,
                        "kwargs": dict(kwargs, rounding=rounding, seed=77), "steps": 8})
    for label, (optimizer, kwargs) in OPTIMIZERS.items():
        for rounding in ROUNDINGS:
            for dtype in DTYPES:
                out.append(_optimizer_case(optimizer, kwargs, rounding, dtype, label))
    # Keras's features, bf16 weights.
    piecewise = {"class_name": "PiecewiseConstantDecay",
                 "config": {"boundaries": [1, 2], "values": [0.05, 0.02, 0.01]}}
    exponential = {"class_name": "ExponentialDecay",
                   "config": {"initial_learning_rate": 0.05, "decay_steps": 3,
                              "decay_rate": 0.5}}
    for label, (optimizer, kwargs) in (("SGD_momentum", OPTIMIZERS["SGD_momentum"]),
                                       ("Adam", OPTIMIZERS["Adam"]),
                                       ("Lion", OPTIMIZERS["Lion"])):
        for rounding in ("stochastic", "kahan"):
            features = {
                "piecewise_schedule": dict(kwargs, learning_rate=piecewise),
                "exponential_schedule": dict(kwargs, learning_rate=exponential),
                "weight_decay_excluding_bias": dict(kwargs, weight_decay=0.1),
                "ema": dict(kwargs, use_ema=True, ema_momentum=0.9),
                "ema_overwrite": dict(kwargs, use_ema=True, ema_momentum=0.9,
                                      ema_overwrite_frequency=2),
                "accumulation": dict(kwargs, gradient_accumulation_steps=2),
                "clipvalue": dict(kwargs, clipvalue=0.5),
            }
            for feature, feature_kwargs in features.items():
                out.append(_optimizer_case(
                    optimizer, feature_kwargs, rounding, "bfloat16", f"{label}+{feature}",
                    exclude=["bias"] if feature.startswith("weight_decay") else None,
                    steps=6 if feature in ("accumulation", "ema_overwrite") else STEPS))
    # Sparse gradients: an embedding table (IndexedSlices on TensorFlow).
    for label in ("SGD", "SGD_momentum", "Adam", "AdamW", "Lion"):
        optimizer, kwargs = OPTIMIZERS[label]
        for rounding in ROUNDINGS:
            for dtype in DTYPES:
                out.append(_optimizer_case(
                    optimizer, kwargs, rounding, dtype, f"{label}+sparse",
                    variables={"table": [13, 7], "bias": [7]}, sparse="table"))
    # A larger variable (vector loop remainders, more than one vector block).
    out.append(_optimizer_case("Adam", OPTIMIZERS["Adam"][1], "stochastic", "bfloat16",
                               "Adam+large", variables={"kernel": [129, 131], "bias": [131]}))
    return out


# ---------------------------------------------------------------------------
# Inputs (numpy, generated once on the reference side and stored)


def _bf16():
    import ml_dtypes

    return ml_dtypes.bfloat16


def _np_dtype(dtype):
    return _bf16() if dtype == "bfloat16" else np.dtype(dtype)


def _rng(case):
    return np.random.default_rng(zlib.crc32(case["name"].encode()))


def _exact_sparse_gradient(rng, rows, row_size, dtype):
    """(values, indices, dense): ids with duplicates, values j/8 (|j| <= 8), so that
    every duplicate sum is exact in bf16 and the dense gradient is one array on
    both backends (JAX's autodiff sums duplicates in bf16, TensorFlow in float32)."""
    indices = rng.choice(rows, size=9, replace=True)
    indices[:3] = indices[0]                               # at least one id three times
    values = rng.integers(-8, 9, size=(len(indices), row_size)).astype(np.float32) / 8
    dense = np.zeros((rows, row_size), np.float32)
    np.add.at(dense, indices, values)
    assert np.array_equal(dense.astype(_np_dtype(dtype)).astype(np.float32), dense)
    return (values.astype(_np_dtype(dtype)), indices.astype(np.int32),
            dense.astype(_np_dtype(dtype)))


def make_inputs(case):
    rng = _rng(case)
    inputs = {}
    if case["kind"] == "optimizer":
        dtype = _np_dtype(case["dtype"])
        for name, shape in case["variables"].items():
            inputs[f"in/{name}"] = rng.standard_normal(shape).astype(dtype)
            for t in range(case["steps"]):
                if name == case["sparse"]:
                    values, indices, dense = _exact_sparse_gradient(rng, shape[0], shape[1],
                                                                    case["dtype"])
                    inputs[f"in/grad{t}/{name}/values"] = values
                    inputs[f"in/grad{t}/{name}/indices"] = indices
                    inputs[f"in/grad{t}/{name}/dense"] = dense
                else:
                    scale = 10.0 ** rng.uniform(-3, 0)
                    inputs[f"in/grad{t}/{name}"] = (rng.standard_normal(shape) * scale).astype(
                        dtype)
    elif case["kind"] == "batchnorm":
        # Exact batch statistics: x = k/64 with |k| <= 32 (8-bit values), batches of 8:
        # sums, means (k/512) and variances are exact in float32 in any order, and
        # the momentum 0.5 makes Keras's update exact whether or not it is an FMA.
        # The update still has bits below bf16's precision, so the rounding decides.
        inputs["in/x"] = (rng.integers(-32, 33, size=(64, 4)) / 64).astype(np.float32)
        inputs["in/y"] = rng.standard_normal((64, 1)).astype(np.float32)
        inputs["in/kernel"] = rng.standard_normal((4, 1)).astype(_bf16())
    elif case["kind"] == "embedding_fit":
        # The loss mean(y_pred * y_true) has the gradient y_true / 256: exact in bf16,
        # as are its duplicate sums (|y_true| <= 1/2 in steps of 1/4).
        inputs["in/ids"] = rng.integers(0, 11, size=(32, 4)).astype(np.int32)
        inputs["in/y"] = (rng.integers(-2, 3, size=(32, 4, 8)) / 4).astype(np.float32)
        inputs["in/table"] = rng.standard_normal((11, 8)).astype(_bf16())
    elif case["kind"] == "pow":
        pass
    return inputs


# ---------------------------------------------------------------------------
# Running a case (either backend)


def _backend():
    import keras

    return keras.backend.backend()


def _make_optimizer(case):
    import keras

    import tf_bf16

    kwargs = dict(case["kwargs"])
    if isinstance(kwargs.get("learning_rate"), dict):
        kwargs["learning_rate"] = keras.optimizers.schedules.deserialize(
            kwargs["learning_rate"])
    return getattr(tf_bf16.optimizers, case["optimizer"])(**kwargs)


def _record(records, prefix, variables, optimizer_values, optimizer):
    for variable, value in variables:
        records[f"{prefix}/var/{variable.name}"] = np.asarray(value)
    for index, (variable, value) in enumerate(zip(optimizer.variables, optimizer_values)):
        records[f"{prefix}/opt/{index}:{variable.name}"] = np.asarray(value)


def _gradients(case, inputs, t, names, backend):
    grads = []
    for name in names:
        if name == case["sparse"]:
            if backend == "tensorflow":
                import tensorflow as tf

                grads.append(tf.IndexedSlices(
                    tf.constant(inputs[f"in/grad{t}/{name}/values"]),
                    tf.constant(inputs[f"in/grad{t}/{name}/indices"]),
                    tf.constant(case["variables"][name], tf.int64)))
            else:
                grads.append(inputs[f"in/grad{t}/{name}/dense"])
        else:
            grads.append(inputs[f"in/grad{t}/{name}"])
    return grads


def run_optimizer_case(case, inputs):
    import keras

    backend = _backend()
    names = list(case["variables"])
    variables = [keras.Variable(inputs[f"in/{n}"], dtype=case["dtype"], name=n) for n in names]
    optimizer = _make_optimizer(case)
    if case["exclude"]:
        optimizer.exclude_from_weight_decay(var_names=case["exclude"])
    optimizer.build(variables)
    records = {}
    _record(records, "step0", [(v, v.value) for v in variables],
            [v.value for v in optimizer.variables], optimizer)
    if backend == "jax":
        import jax

        apply = jax.jit(optimizer.stateless_apply)
        values = [v.value for v in variables]
        optimizer_values = [v.value for v in optimizer.variables]
        for t in range(case["steps"]):
            grads = [np.asarray(g) for g in _gradients(case, inputs, t, names, backend)]
            values, optimizer_values = apply(optimizer_values, grads, values)
            _record(records, f"step{t + 1}", list(zip(variables, values)), optimizer_values,
                    optimizer)
    else:
        for t in range(case["steps"]):
            optimizer.apply(_gradients(case, inputs, t, names, backend), variables)
            _record(records, f"step{t + 1}", [(v, v.value) for v in variables],
                    [v.value for v in optimizer.variables], optimizer)
    return records


def _fit_records(model, optimizer):
    # Keyed by position: a reloaded Sequential model's variables have other paths.
    records = {}
    for index, variable in enumerate(model.variables):
        records[f"final/var/{index}"] = np.asarray(variable.value)
    for index, variable in enumerate(optimizer.variables):
        records[f"final/opt/{index}"] = np.asarray(variable.value)
    return records


def run_batchnorm_case(case, inputs):
    import keras

    import tf_bf16

    tf_bf16.set_policy()
    try:
        model = keras.Sequential([
            keras.Input((4,)),
            keras.layers.BatchNormalization(momentum=0.5, name="bn"),
            keras.layers.Dense(1, use_bias=False, name="head"),
        ])
        model.get_layer("head").kernel.assign(inputs["in/kernel"])
        optimizer = tf_bf16.optimizers.SGD(learning_rate=0.01, rounding="stochastic", seed=5)
        model.compile(optimizer, loss="mse")
        epochs = case["steps"] // 8
        model.fit(inputs["in/x"], inputs["in/y"], batch_size=8, epochs=epochs, shuffle=False,
                  verbose=0)
        bn = model.get_layer("bn")
        records = {"final/bn/moving_mean": np.asarray(bn.moving_mean.value),
                   "final/bn/moving_variance": np.asarray(bn.moving_variance.value),
                   "final/iterations": np.asarray(optimizer.iterations.value)}
    finally:
        tf_bf16.reset_policy()
    return records


def _embedding_loss(y_true, y_pred):
    import keras

    return keras.ops.mean(y_pred * y_true, axis=-1)


def embedding_model(case, inputs):
    """The Embedding model of the "fit/embedding" cases and of the portability tests."""
    import keras

    model = keras.Sequential([keras.Input((4,), dtype="int32"),
                              keras.layers.Embedding(11, 8, name="embedding")])
    model.get_layer("embedding").embeddings.assign(inputs["in/table"])
    model.compile(_make_optimizer(case), loss=_embedding_loss)
    return model


def fit_embedding(model, inputs, epochs):
    model.fit(inputs["in/ids"], inputs["in/y"], batch_size=8, epochs=epochs, shuffle=False,
              verbose=0)


def run_embedding_case(case, inputs):
    import tf_bf16

    tf_bf16.set_policy()
    try:
        model = embedding_model(case, inputs)
        fit_embedding(model, inputs, case["steps"] // 4)
        return _fit_records(model, model.optimizer)
    finally:
        tf_bf16.reset_policy()


# ---------------------------------------------------------------------------
# Portable state: a .keras file saved on one backend resumes on the other.

PORTABLE = {
    "SGD_momentum-kahan": ("SGD", {"learning_rate": 0.05, "momentum": 0.9,
                                   "rounding": "kahan", "seed": 77}),
    "Adam-kahan-drawn_seed": ("Adam", {"learning_rate": 0.01, "rounding": "kahan",
                                       "seed": None}),
    "AdamW-stochastic-ema": ("AdamW", {"learning_rate": 0.01, "weight_decay": 0.1,
                                       "rounding": "stochastic", "use_ema": True,
                                       "seed": 5}),
    "Lion-kahan": ("Lion", {"learning_rate": 0.003, "rounding": "kahan", "seed": 9}),
}


def portable_case(label):
    optimizer, kwargs = PORTABLE[label]
    return {"name": f"portable/{label}", "kind": "embedding_fit", "optimizer": optimizer,
            "kwargs": kwargs}


def train_and_save(label, directory):
    """One epoch (4 steps) of the Embedding model, saved to <label>.<backend>.keras,
    then one more epoch; returns the records of the end."""
    import tf_bf16

    case = portable_case(label)
    inputs = make_inputs(case)
    tf_bf16.set_policy()
    try:
        model = embedding_model(case, inputs)
        fit_embedding(model, inputs, 1)
        model.save(os.path.join(directory, f"{label}.{_backend()}.keras"))
        fit_embedding(model, inputs, 1)
        return _fit_records(model, model.optimizer)
    finally:
        tf_bf16.reset_policy()


def load_and_continue(label, directory, saved_by):
    """Loads <label>.<saved_by>.keras on this backend and trains the second epoch."""
    import keras

    import tf_bf16

    case = portable_case(label)
    inputs = make_inputs(case)
    tf_bf16.set_policy()
    try:
        model = keras.saving.load_model(
            os.path.join(directory, f"{label}.{saved_by}.keras"),
            custom_objects={"_embedding_loss": _embedding_loss})
        if _backend() == "tensorflow" and model.jit_compile:
            # A model compiled on JAX is saved with jit_compile=True, and the
            # TensorFlow ops have no XLA lowering yet (README, "JAX backend").
            model.jit_compile = False
        fit_embedding(model, inputs, 1)
        return _fit_records(model, model.optimizer)
    finally:
        tf_bf16.reset_policy()


def portable(directory, resume_from=None):
    """This backend's half of the portability check, records written as npz:
    <label>.<backend>.npz (trained here, saved after one epoch) and, with
    `resume_from`, <label>.<resume_from>-on-<backend>.npz (resumed here)."""
    backend = _backend()
    for label in PORTABLE:
        if resume_from:
            records = load_and_continue(label, directory, resume_from)
            np.savez(os.path.join(directory, f"{label}.{resume_from}-on-{backend}.npz"),
                     **_encode(records))
        records = train_and_save(label, directory)
        np.savez(os.path.join(directory, f"{label}.{backend}.npz"), **_encode(records))


def load_records(path):
    with np.load(path) as stored:
        return _decode(dict(stored))


def run_pow_case(case, inputs):
    backend = _backend()
    steps = np.arange(POW_STEPS, dtype=np.int32)
    records = {}
    for beta in POW_BETAS:
        if backend == "tensorflow":
            from tf_bf16 import _args

            values = np.array([_args.bias_correction_powers(beta, beta, int(s))[0].numpy()
                               for s in steps], np.float32)
        else:
            import jax

            from tf_bf16 import jax_ops

            # As in apply_adam: a scalar of a traced step, inside jit (a scan of scalars).
            values = np.asarray(jax.jit(lambda s, beta=beta: jax.lax.map(
                lambda t: jax_ops.bias_correction_powers(beta, beta, t)[0], s))(steps))
        records[f"beta={beta}"] = values
    return records


RUNNERS = {"optimizer": run_optimizer_case, "batchnorm": run_batchnorm_case,
           "embedding_fit": run_embedding_case, "pow": run_pow_case}


def run_case(case, inputs):
    return RUNNERS[case["kind"]](case, inputs)


# ---------------------------------------------------------------------------
# Reference (TensorFlow) and check (JAX)


def _file(case):
    return case["name"].replace("/", "__").replace("+", "_") + ".npz"


_BF16_SUFFIX = "@bfloat16"   # npz has no bfloat16: such arrays are stored as their uint16 bits


def _encode(arrays):
    out = {}
    for key, value in arrays.items():
        value = np.asarray(value)
        if value.dtype == _bf16():
            out[key + _BF16_SUFFIX] = value.view(np.uint16)
        else:
            out[key] = value
    return out


def _decode(arrays):
    return {(k[:-len(_BF16_SUFFIX)] if k.endswith(_BF16_SUFFIX) else k):
            (v.view(_bf16()) if k.endswith(_BF16_SUFFIX) else v) for k, v in arrays.items()}


def write_reference(directory, selected=None):
    """Runs the cases on TensorFlow; writes cases.json and one .npz per case."""
    os.makedirs(directory, exist_ok=True)
    chosen = [c for c in cases() if selected is None or c["name"] in selected]
    for case in chosen:
        inputs = make_inputs(case)
        records = run_case(case, inputs)
        np.savez_compressed(os.path.join(directory, _file(case)), **_encode(inputs),
                            **_encode({f"out/{k}": v for k, v in records.items()}))
    manifest = {"cases": chosen, "written_by": _environment()}
    with open(os.path.join(directory, "cases.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return chosen


def _bits(array):
    array = np.asarray(array)
    if array.dtype.kind in "iu":
        return array.astype(np.int64)        # iterations: int64 on TF, int32 on JAX
    return array.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[array.dtype.itemsize])


def compare(expected, got):
    """A list of differences (empty: bit-identical)."""
    problems = []
    for key in sorted(set(expected) | set(got)):
        if key not in got:
            problems.append(f"{key}: missing on this side")
            continue
        if key not in expected:
            problems.append(f"{key}: not in the reference")
            continue
        a, b = np.asarray(expected[key]), np.asarray(got[key])
        if a.dtype.kind == "f" or b.dtype.kind == "f" or a.dtype != b.dtype:
            if a.dtype != b.dtype and not (a.dtype.kind in "iu" and b.dtype.kind in "iu"):
                problems.append(f"{key}: dtype {b.dtype}, reference {a.dtype}")
                continue
        if a.shape != b.shape:
            problems.append(f"{key}: shape {b.shape}, reference {a.shape}")
            continue
        differ = np.flatnonzero(_bits(a).reshape(-1) != _bits(b).reshape(-1))
        if differ.size:
            i = differ[0]
            problems.append(
                f"{key}: {differ.size} of {a.size} elements differ; first at {i}: "
                f"{a.reshape(-1)[i]!r} (bits {_bits(a).reshape(-1)[i]:#x}) expected, "
                f"{b.reshape(-1)[i]!r} (bits {_bits(b).reshape(-1)[i]:#x}) got")
    return problems


def check(directory, json_path=None, selected=None):
    """Runs the stored cases on this backend and compares; returns the result list."""
    with open(os.path.join(directory, "cases.json")) as f:
        manifest = json.load(f)
    environment = _environment()
    _log(f"checking {len(manifest['cases'])} cases from {directory} on {environment}")
    results = []
    for case in manifest["cases"]:
        if selected is not None and case["name"] not in selected:
            continue
        start = time.perf_counter()
        try:
            with np.load(os.path.join(directory, _file(case))) as stored:
                stored = _decode(dict(stored))
            inputs = {k: v for k, v in stored.items() if k.startswith("in/")}
            expected = {k[len("out/"):]: v for k, v in stored.items() if k.startswith("out/")}
            problems = compare(expected, run_case(case, inputs))
            verdict = "PASS" if not problems else "FAIL"
        except Exception as e:  # keep going: one verdict per case
            problems, verdict = [f"{type(e).__name__}: {e}"], "ERROR"
        seconds = time.perf_counter() - start
        results.append({"name": case["name"], "verdict": verdict, "problems": problems,
                        "seconds": round(seconds, 2)})
        detail = "" if not problems else f" -- {problems[0]}" + (
            f" (+{len(problems) - 1} more)" if len(problems) > 1 else "")
        _log(f"{verdict} {case['name']} ({seconds:.1f} s){detail}")
    counts = {v: sum(r["verdict"] == v for r in results) for v in ("PASS", "FAIL", "ERROR")}
    _log(f"SUMMARY {counts['PASS']} passed, {counts['FAIL']} differ, {counts['ERROR']} errors, "
         f"of {len(results)} cases; {environment}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"environment": environment, "results": results}, f, indent=1)
    return results


def fusion_report(shape=(1024, 1024)):
    """How many kernels XLA makes of one update on this device (a diagnostic for the
    benchmark to come, not a check): fusions and custom calls in the optimized HLO."""
    import functools

    import jax
    import jax.numpy as jnp

    from tf_bf16 import jax_ops

    w = jnp.zeros(shape, jnp.bfloat16)
    lr, step = jnp.float32(1e-3), jnp.int32(0)
    for rounding in ROUNDINGS:
        comp = w if rounding == "kahan" else None
        updates = {
            "sgd_momentum": functools.partial(jax_ops.apply_sgd, momentum=0.9),
            "adam": jax_ops.apply_adam,
            "lion": jax_ops.apply_lion,
        }
        for name, update in updates.items():
            if name == "sgd_momentum":
                def fn(w, g, s, c, update=update):
                    return update(w, g, lr, accumulator=s, rounding=rounding, compensation=c,
                                  seed=1, step=step)
            elif name == "adam":
                def fn(w, g, s, c, update=update):
                    return update(w, g, s, s, lr, step=step, rounding=rounding,
                                  compensation=c, seed=1)
            else:
                def fn(w, g, s, c, update=update):
                    return update(w, g, s, lr, rounding=rounding, compensation=c, seed=1,
                                  step=step)
            hlo = jax.jit(fn).lower(w, w, w, comp).compile().as_text()
            entry = hlo[hlo.index("ENTRY"):]
            _log(f"kernels {name}-{rounding} {shape}: {entry.count(' fusion(')} fusions, "
                 f"{entry.count('custom-call(')} custom calls")


def _environment():
    import keras

    parts = [f"keras {keras.__version__} ({keras.backend.backend()})"]
    if keras.backend.backend() == "jax":
        import jax

        parts.append(f"jax {jax.__version__} on {jax.devices()[0].platform} "
                     f"({jax.devices()[0].device_kind})")
        parts.append(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    else:
        import tensorflow as tf

        parts.append(f"tensorflow {tf.__version__} (CPU kernels)")
    return ", ".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ref = sub.add_parser("reference", help="TensorFlow backend: write the reference folder")
    ref.add_argument("directory")
    chk = sub.add_parser("check", help="JAX backend: run the cases and compare bits")
    chk.add_argument("directory")
    chk.add_argument("--json", help="also write the results here")
    for p in (ref, chk):
        p.add_argument("--case", action="append", help="only this case (repeatable)")
    sub.add_parser("fusions", help="print how many kernels XLA makes of each update")
    port = sub.add_parser("portable", help="train, save a .keras file, resume another "
                          "backend's file; records as npz")
    port.add_argument("directory")
    port.add_argument("--resume-from", help="the backend whose .keras files to resume")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if args.command == "fusions":
        fusion_report()
        return 0
    if args.command == "portable":
        portable(args.directory, args.resume_from)
        return 0
    if args.command == "reference":
        chosen = write_reference(args.directory, args.case)
        size = sum(os.path.getsize(os.path.join(args.directory, f))
                   for f in os.listdir(args.directory))
        _log(f"wrote {len(chosen)} cases to {args.directory} ({size / 1e6:.1f} MB)")
        return 0
    results = check(args.directory, args.json, args.case)
    return 0 if results and all(r["verdict"] == "PASS" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
