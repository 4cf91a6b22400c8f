"""The measurements of ``bench-gpu``, one job per process.

``python -m tf_bf16.lab.bench_gpu_worker JOB.json`` (what tf_bf16/lab/bench_gpu.py
starts, with ``KERAS_BACKEND=jax``) runs one job and prints its result as one
line ``RESULT {json}`` on stdout; progress goes to stderr with timestamps. A job
is a dict with "kind":

- "fit": one variant's ``model.fit`` step time and the process's peak device
  memory, on the GPT-style char model (``transformer_lm.build_model``);
- "analyze": for each variant, the memory XLA's compiled train step needs at
  two depths (``jax.jit(model.train_step).lower(...).compile().memory_analysis()``,
  no step is run), and the device's memory limit;
- "confirm": one variant trained a few steps at one depth: does it fit?
- "update": the optimizer update alone (``tf_bf16.jax_ops``, jitted, donated
  buffers) and device copies of the same bytes.

Not for the command line or the tables (bench_gpu.py); imports no TensorFlow.
"""

import gc
import json
import math
import statistics
import sys
import time
import traceback

from tf_bf16.lab import common

SEED = 1234
LEARNING_RATE = 3e-4
MAX_COPY_ELEMENTS = 2**30


def _log(message):
    common.log(message)


def _peak_bytes():
    import jax

    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def _bytes_limit():
    import jax

    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("bytes_limit")


def _is_out_of_memory(error):
    text = f"{type(error).__name__}: {error}"
    return any(k in text for k in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                                   "OOM", "Failed to allocate"))


def _model(variant, spec, layers=None):
    """The variant's policy set, the char model built and compiled with Adam."""
    import keras

    from tf_bf16.lab import runner
    from tf_bf16.lab.tasks import transformer_lm

    runner._set_policy(variant, SEED, {})
    keras.utils.set_random_seed(SEED)
    sizes = dict(spec, layers=spec["layers"] if layers is None else layers)
    model = transformer_lm.build_model(seed=SEED, name=f"gpt_{variant}", **sizes)
    optimizer = runner.make_optimizer(
        variant, {"optimizer": "adam", "optimizer_kwargs": {}, "learning_rate": LEARNING_RATE},
        SEED)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _data(spec, batches):
    """Windows of the transformer_lm task's corpus (Python's standard library): its
    characters repeat as text's do, which a step's cost depends on (the Embedding
    gradient sums the rows of repeated characters; with bf16 atomics on a GPU,
    frequent ones serialize). Uniform random ids where the corpus is missing."""
    import numpy as np

    from tf_bf16.lab.tasks import corpus

    rng = np.random.default_rng(SEED)
    length = spec["seq_len"] + 1
    try:
        ids = corpus.encoded_corpus(corpus.split_files()[0])
    except (OSError, RuntimeError) as e:
        print(f"bench-gpu: no text corpus ({e}); uniform random ids", flush=True)
        ids = None
    if ids is None or len(ids) <= length:
        windows = rng.integers(0, 128, size=(batches * spec["batch_size"], length),
                               dtype=np.int32)
    else:
        windows = corpus.random_windows(ids, length, batches * spec["batch_size"],
                                        rng).astype(np.int32)
    return windows[:, :-1], windows[:, 1:]


def _parameters(model):
    import numpy as np

    return int(sum(np.prod(v.shape) for v in model.trainable_variables))


def _block_on_state(model):
    """Waits for the steps dispatched so far (the JAX trainer's in-flight state)."""
    import jax

    state = getattr(model, "_jax_state", None)
    if state:
        jax.block_until_ready(state["trainable_variables"])
        return True
    return False


def fit_job(job):
    """Median ms/step of ``model.fit`` over rounds, and the peak device memory."""
    import jax
    import keras

    variant, spec = job["variant"], job["spec"]
    steps, rounds = job["steps"], job["rounds"]
    _log(f"fit {variant}: building the model")
    started = time.perf_counter()
    model = _model(variant, spec)
    params = _parameters(model)
    x, y = _data(spec, steps + 1)
    marks = {}

    class Timer(keras.callbacks.Callback):
        # Only on_train_batch_begin: a callback with on_train_batch_end makes
        # Keras convert the logs every step, which waits for each step. And
        # `self._model`: on JAX, `self.model` copies the state back first.
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 1:
                marks["synced"] = _block_on_state(self._model)
                marks["t0"] = time.perf_counter()

    def one_round(count):
        marks.clear()
        history = model.fit(x[:(count + 1) * spec["batch_size"]],
                            y[:(count + 1) * spec["batch_size"]],
                            batch_size=spec["batch_size"], epochs=1, shuffle=False, verbose=0,
                            callbacks=[Timer()])
        jax.block_until_ready([v.value for v in model.trainable_variables])
        elapsed = time.perf_counter() - marks["t0"]
        return 1e3 * elapsed / count, float(history.history["loss"][-1])

    _log(f"fit {variant}: {params:,} parameters; compiling and warming up")
    first = time.perf_counter()
    one_round(2)
    compile_s = time.perf_counter() - first
    times, losses = [], []
    for r in range(rounds):
        ms, loss = one_round(steps)
        times.append(ms)
        losses.append(loss)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    result = {"variant": variant, "parameters": params, "round_ms": times,
              "median_ms": statistics.median(times), "p25_ms": q[0], "p75_ms": q[2],
              "compile_and_warmup_s": compile_s, "loss": losses[-1],
              "finite": all(math.isfinite(v) for v in losses),
              "synced_start": bool(marks.get("synced")), "peak_bytes": _peak_bytes(),
              "bytes_limit": _bytes_limit(), "wall_s": time.perf_counter() - started}
    _log(f"fit {variant}: {result['median_ms']:.2f} ms/step (median of {rounds} rounds of "
         f"{steps} steps), peak "
         + ("n/a" if result["peak_bytes"] is None else f"{result['peak_bytes'] / 2**30:.2f} GiB"))
    return result


def _compiled_memory(model, spec):
    """Bytes XLA's compiled train step needs (arguments, outputs not aliased, temporaries)."""
    import jax

    x, y = _data(spec, 1)
    model._symbolic_build(data_batch=(x, y))
    model.make_train_function()
    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in model.optimizer.variables],
        [v.value for v in model.metrics_variables],
    )
    compiled = jax.jit(model.train_step, donate_argnums=0).lower(state, (x, y)).compile()
    m = compiled.memory_analysis()
    fields = {k: int(getattr(m, k)) for k in (
        "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
        "temp_size_in_bytes", "generated_code_size_in_bytes")}
    fields["total_bytes"] = (fields["argument_size_in_bytes"] + fields["output_size_in_bytes"]
                             - fields["alias_size_in_bytes"] + fields["temp_size_in_bytes"])
    peak = getattr(m, "peak_memory_in_bytes", None)
    fields["xla_peak_bytes"] = None if peak is None else int(peak)
    return fields


def analyze_job(job):
    """Compiled train-step memory of every variant at each depth; no step runs."""
    import keras

    spec, out = job["spec"], {}
    for variant in job["variants"]:
        out[variant] = []
        for depth in job["depths"]:
            started = time.perf_counter()
            model = _model(variant, spec, layers=depth)
            memory = _compiled_memory(model, spec)
            memory.update(depth=depth, parameters=_parameters(model),
                          seconds=time.perf_counter() - started)
            out[variant].append(memory)
            _log(f"analyze {variant}: depth {depth}, {memory['parameters']:,} parameters, "
                 f"{memory['total_bytes'] / 2**30:.3f} GiB compiled "
                 f"({memory['seconds']:.0f} s)")
            del model
            keras.backend.clear_session()
            gc.collect()
    return {"variants": out, "bytes_limit": _bytes_limit()}


def confirm_job(job):
    """Trains `steps` steps at `depth`; fits = no allocation failed and the loss is finite."""
    import jax

    variant, spec, depth = job["variant"], job["spec"], job["depth"]
    started = time.perf_counter()
    result = {"variant": variant, "depth": depth}
    try:
        _log(f"confirm {variant}: building depth {depth}")
        model = _model(variant, spec, layers=depth)
        result["parameters"] = _parameters(model)
        x, y = _data(spec, job["steps"])
        _log(f"confirm {variant}: {result['parameters']:,} parameters; training "
             f"{job['steps']} steps")
        fit_started = time.perf_counter()
        history = model.fit(x, y, batch_size=spec["batch_size"], epochs=1, shuffle=False,
                            verbose=0)
        jax.block_until_ready([v.value for v in model.trainable_variables])
        losses = history.history["loss"]
        result.update(fits=all(math.isfinite(v) for v in losses), loss=float(losses[-1]),
                      fit_s=time.perf_counter() - fit_started)
        if not result["fits"]:
            result["reason"] = "the loss is not finite"
    except Exception as e:  # an allocation failure is a result, not a crash
        if not _is_out_of_memory(e):
            raise
        result.update(fits=False, reason=f"{type(e).__name__}: {str(e)[:300]}")
    result.update(peak_bytes=_peak_bytes(), bytes_limit=_bytes_limit(),
                  wall_s=time.perf_counter() - started)
    _log(f"confirm {variant}: depth {depth} " + ("trains" if result["fits"] else
                                                 f"does not fit ({result.get('reason')})"))
    return result


# ---------------------------------------------------------------------------
# The update alone.

# (key, label, optimizer, rounding, bytes read + written per parameter)
UPDATE_ROWS = (
    ("sgd_nearest", "tf_bf16 SGD-momentum, nearest", "sgd", "nearest", 10),
    ("sgd_stochastic", "tf_bf16 SGD-momentum, SR", "sgd", "stochastic", 10),
    ("sgd_kahan", "tf_bf16 SGD-momentum, Kahan", "sgd", "kahan", 14),
    ("adam_nearest", "tf_bf16 Adam, nearest", "adam", "nearest", 14),
    ("adam_stochastic", "tf_bf16 Adam, SR", "adam", "stochastic", 14),
    ("adam_kahan", "tf_bf16 Adam, Kahan", "adam", "kahan", 18),
    ("adam_mixed", "mixed-precision Adam (float32 weights, moments and gradient; bf16 copy)",
     "mixed", None, 30),
)


def _timed(call, state, calls, repeats):
    """Median seconds per call over `repeats` runs of `calls` chained calls."""
    import jax

    state = call(state)            # compiles
    state = call(state)
    jax.block_until_ready(state)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            state = call(state)
        jax.block_until_ready(state)
        times.append((time.perf_counter() - started) / calls)
    return statistics.median(times), times, state


def _copy_seconds(elements, calls, repeats, dtype="uint16"):
    """A device copy: every element of an unsigned-integer array (uint16 unless
    `dtype` says otherwise) read and written (XOR with a run-time zero)."""
    import functools

    import jax
    import jax.numpy as jnp

    array = jax.random.bits(jax.random.key(SEED), (elements,), jnp.dtype(dtype))
    zero = jnp.zeros((), jnp.dtype(dtype))

    @functools.partial(jax.jit, donate_argnums=0)
    def copy(x, z):
        return x ^ z

    median, times, array = _timed(lambda a: copy(a, zero), array, calls, repeats)
    del array
    return median, times


def update_job(job):
    import functools

    import jax
    import jax.numpy as jnp

    from tf_bf16 import jax_ops

    n, calls, repeats = job["parameters"], job["calls"], job["repeats"]
    key = jax.random.key(SEED)
    keys = jax.random.split(key, 5)
    lr = jnp.asarray(1e-3, jnp.float32)
    step = jnp.asarray(1000, jnp.int32)
    rows = []
    copies = {}
    for row_key, label, optimizer, rounding, per_param in UPDATE_ROWS:
        if job.get("rows") and row_key not in job["rows"]:
            continue
        dtype = jnp.float32 if optimizer == "mixed" else jnp.bfloat16
        weights = jax.random.normal(keys[0], (n,), jnp.float32).astype(dtype)
        gradient = (1e-3 * jax.random.normal(keys[1], (n,), jnp.float32)).astype(dtype)
        m = (1e-3 * jax.random.normal(keys[2], (n,), jnp.float32)).astype(dtype)
        v = (1e-6 * jnp.abs(jax.random.normal(keys[3], (n,), jnp.float32))).astype(dtype)
        if optimizer == "sgd":
            update = jax.jit(functools.partial(jax_ops.apply_sgd, momentum=0.9, rounding=rounding,
                                               seed=SEED),
                             donate_argnames=("variable", "accumulator", "compensation"))
            state = {"variable": weights, "accumulator": m}
            if rounding == "kahan":
                state["compensation"] = jnp.zeros_like(weights)

            def call(s, update=update, gradient=gradient):
                new = update(gradient=gradient, learning_rate=lr, step=step, **s)
                return {k: new[k] for k in s}
        elif optimizer == "adam":
            update = jax.jit(functools.partial(jax_ops.apply_adam, rounding=rounding, seed=SEED),
                             donate_argnames=("variable", "m", "v", "compensation"))
            state = {"variable": weights, "m": m, "v": v}
            if rounding == "kahan":
                state["compensation"] = jnp.zeros_like(weights)

            def call(s, update=update, gradient=gradient):
                new = update(gradient=gradient, learning_rate=lr, step=step, **s)
                return {k: new[k] for k in s}
        else:
            @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
            def mixed_adam(w, m, v, g, lr, t):
                one = jnp.float32(1)
                m = m + (g - m) * (one - 0.9)
                v = v + (g * g - v) * (one - 0.999)
                t = (t + 1).astype(jnp.float32)
                alpha = lr * jnp.sqrt(one - 0.999 ** t) / (one - 0.9 ** t)
                w = w - alpha * m / (jnp.sqrt(v) + 1e-7)
                return w, m, v, w.astype(jnp.bfloat16)

            state = (weights, m, v, None)

            def call(s, gradient=gradient):
                return mixed_adam(s[0], s[1], s[2], gradient, lr, step)
        del weights, m, v
        _log(f"update: {label}")
        median, times, state = _timed(call, state, calls, repeats)
        del state, gradient, call
        gc.collect()
        # A copy of the same bytes: per_param bytes of traffic = per_param / 4 uint16
        # elements read and written; above MAX_COPY_ELEMENTS (2 GiB read, where XLA's
        # 32-bit indexing ends), the copy of that many, its time scaled to the bytes.
        elements = n * per_param // 4
        copied = min(elements, MAX_COPY_ELEMENTS)
        if copied not in copies:
            copies[copied] = _copy_seconds(copied, calls, repeats)
        copy_s = copies[copied][0] * elements / copied
        rows.append({"key": row_key, "label": label, "optimizer": optimizer,
                     "rounding": rounding, "bytes_per_parameter": per_param,
                     "median_ms": 1e3 * median, "times_ms": [1e3 * t for t in times],
                     "copy_ms": 1e3 * copy_s, "copy_scaled_from_elements":
                         copied if copied != elements else None,
                     "effective_gb_s": n * per_param / median / 1e9,
                     "copy_gb_s": n * per_param / copy_s / 1e9,
                     "fraction_of_copy": copy_s / median})
        _log(f"update: {label}: {1e3 * median:.3f} ms, {rows[-1]['effective_gb_s']:.0f} GB/s, "
             f"{100 * rows[-1]['fraction_of_copy']:.0f}% of a copy of the same bytes")
    return {"parameters": n, "rows": rows, "peak_bytes": _peak_bytes()}


JOBS = {"fit": fit_job, "analyze": analyze_job, "confirm": confirm_job, "update": update_job}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        job = json.load(f)
    try:
        result = JOBS[job["kind"]](job)
        result["machine"] = common.jax_machine_info()
    except Exception as e:
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"[:2000]}
    print("RESULT " + json.dumps(result), flush=True)
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
