"""Benchmark of ``model.fit`` with tf_bf16 optimizers, and training-state bytes.

Run it as ``python -m tf_bf16 bench-fit`` (or ``tf-bf16 bench-fit``);
``--help`` lists the options. Everything is measured in one process, in one
run, for each model of ``--model`` (an MLP and a small CNN by default):

* **Step time of ``model.fit``.** Under ``tf_bf16.set_policy()`` (all
  variables bfloat16, strict) one model is built with a fixed seed and copied
  (``set_weights``) into one model per row, so every row trains the same
  weights on the same data (synthetic, fixed seed, in memory, no shuffling):

  - gradients only: an optimizer whose update only reads one element of each
    gradient (so that the whole backward pass still runs): what the step costs
    without an update;
  - stock ``keras.optimizers.SGD(momentum=0.9)`` (baseline of the SGD rows)
    and ``tf_bf16.optimizers.SGD(momentum=0.9)`` with stochastic rounding and
    with Kahan summation;
  - stock ``keras.optimizers.Adam`` (baseline of the Adam rows) and
    ``tf_bf16.optimizers.Adam`` with stochastic rounding and with Kahan
    summation. Stock Keras Adam does not train in pure bf16 (``beta_2=0.999``
    rounds to 1.0 in bf16 and the step size becomes 0): it is a timing
    baseline only. The strict policy accepts the stock optimizers, since
    their slots are bf16 too.

  Each row's first ``fit`` call traces and compiles its train function and
  is not timed (``--warmup`` untimed rounds). A timed round is one ``fit``
  call of ``--steps`` + 1 batches per row (``steps_per_epoch``), rows
  interleaved (round robin, order rotated every round) so that a change of
  machine load affects all rows alike. A callback records the time at the
  end of every batch after reading the batch's loss back to Python (which
  synchronizes); a step's time is the interval between consecutive batch
  ends, so it includes everything ``fit`` does per step (fetching the batch,
  the train function, callbacks) and excludes the start and end of each
  ``fit`` call. The reported time is the median over all timed steps of all
  rounds; the ratio is that median over the stock optimizer's median; the
  target is a ratio of at most 1.05. As a check on load that drifts during
  the run, the "paired" ratio is the median over rounds of the ratio of the
  two rows' medians in the same round.

  TensorFlow runs with ``--threads`` (default 1) intra-op and inter-op
  threads. On a small machine shared with other work, a thread per core
  makes every step wait whenever another process takes a core, and the rows'
  medians scatter by tens of percent (seen on a 2-core machine: interquartile
  ranges of 20-70%); with one thread they agree within ~2%. ``--threads 0``
  keeps TensorFlow's defaults, for a machine of one's own.

  "Update in step" is a row's median step time minus the gradients-only
  row's: what the update adds to a step. "Update alone" is the median time
  of ``optimizer.apply(gradients, model.trainable_variables)`` with fixed
  bf16 gradients, one ``tf.function`` call per update synchronized by
  reading back a scalar, interleaved the same way. The two differ: inside
  the train step TensorFlow can run a layer's update while the backward pass
  of earlier layers still runs, and the gradients may still be in cache.

* **Training-state bytes per parameter, from ``tf_bf16.audit``.** For each
  optimizer above, and for Keras's ``mixed_bfloat16`` policy (float32
  weights, bf16 compute) with stock Keras SGD-momentum and Adam, and for
  float32 SGD-momentum and Adam, a fresh model is built under that policy,
  the optimizer is built on its trainable variables, and
  ``tf_bf16.audit(model, optimizer=optimizer, trace=False)`` lists every
  variable with its role, dtype and bytes. Its ``training_state`` gives the
  figures: (bytes of the trainable weights + bytes of the per-parameter
  optimizer slots: momenta, moments, Kahan compensation buffers) / number of
  trainable parameters. Scalar bookkeeping (the iteration counter, the
  learning rate) is excluded, and so are non-trainable model variables
  (BatchNormalization's moving statistics: model state, not per-parameter
  training state); the report names both. Keras's ``mixed_bfloat16`` keeps no
  bf16 copy of its weights as a variable: it casts them in every step
  (temporaries, not state). The targets: tf_bf16 SGD-momentum 4 B
  (stochastic rounding) and 6 B (Kahan), Adam 6 B and 8 B, against 12 B for
  ``mixed_bfloat16`` Adam.

The verdict prints PASS or MISS for each target; with ``--check`` a MISS
makes the exit status 1.
"""

import math
import statistics
import time

from tf_bf16.lab import common

SUMMARY = "time model.fit steps of tf_bf16 vs stock Keras optimizers; state bytes/param"

DESCRIPTION = """\
Benchmark of model.fit with the tf_bf16 optimizers on a pure-bfloat16 model
(tf_bf16.set_policy()): median step time of fit with tf_bf16 SGD-momentum and
Adam (stochastic rounding and Kahan) against the stock Keras optimizer on the
same model, same weights, same data, same seed (rows interleaved); a
gradients-only row shows what the update adds to a step, and the time of
optimizer.apply alone is measured as well. Then the training-state bytes per
parameter that tf_bf16.audit reports (trainable weights + per-parameter
optimizer slots incl. Kahan buffers; scalar bookkeeping excluded) for each
optimizer and for Keras mixed_bfloat16 and float32 SGD-momentum and Adam.
Then PASS/MISS against the targets:

  - step time of every tf_bf16 row <= 1.05x the stock Keras optimizer's;
  - bytes/param: SGD-momentum SR 4, Kahan 6; Adam SR 6, Kahan 8
    (Keras mixed_bfloat16 Adam: 12).

Stock Keras Adam does not train in pure bf16 (beta_2 = 0.999 rounds to 1.0):
it is a timing baseline only. TensorFlow runs single-threaded by default
(--threads 1) so that other processes on a small machine disturb the timing
little; --threads 0 keeps TensorFlow's thread pools. Progress goes to stderr,
results to stdout; --check makes a MISS fail the command (exit status 1).
The module docstring of tf_bf16/lab/bench_fit.py documents the method in full.
Needs the lab extra: pip install "tf_bf16[lab]".

Example:
  python -m tf_bf16 bench-fit --json bench_fit.json --markdown bench_fit.md
"""

MODELS = ("mlp", "cnn")
DEFAULT_WIDTH = {"mlp": 2048, "cnn": 1024}
DEFAULT_BATCH_SIZE = {"mlp": 64, "cnn": 32}
DEFAULT_STEPS = 5
DEFAULT_REPEATS = 20
DEFAULT_WARMUP = 1
DEFAULT_APPLY_CALLS = 5
DEFAULT_THREADS = 1

MLP_INPUTS = 1024
CNN_INPUT_SHAPE = (32, 32, 3)
CNN_CHANNELS = (16, 32, 64)
CLASSES = 10
DATA_BATCHES = 8  # distinct batches in the (repeated) synthetic data set

SEED = 1234
SGD_LEARNING_RATE = 0.01
ADAM_LEARNING_RATE = 1e-3
MOMENTUM = 0.9

# Targets (the benchmark issue).
MAX_RATIO_TO_KERAS = 1.05

_MIB = 2.0**20


class TimingRow:
    """One optimizer whose fit steps are timed."""

    def __init__(self, key, label, family, baseline=None, rounding=None):
        self.key = key
        self.label = label
        self.family = family      # "none", "sgd" or "adam"
        self.baseline = baseline  # key of the row this one is compared with
        self.rounding = rounding  # tf_bf16 rounding, None for Keras optimizers

    @property
    def is_target(self):
        return self.rounding is not None


TIMING_ROWS = (
    TimingRow("gradients_only", "gradients only (no update)", "none"),
    TimingRow("keras_sgd", "stock Keras SGD-momentum (BASELINE)", "sgd"),
    TimingRow("tf_bf16_sgd_sr", "tf_bf16 SGD-momentum, SR", "sgd", "keras_sgd",
              "stochastic"),
    TimingRow("tf_bf16_sgd_kahan", "tf_bf16 SGD-momentum, Kahan", "sgd", "keras_sgd", "kahan"),
    TimingRow("keras_adam", "stock Keras Adam (BASELINE; no-op in bf16)", "adam"),
    TimingRow("tf_bf16_adam_sr", "tf_bf16 Adam, SR", "adam", "keras_adam", "stochastic"),
    TimingRow("tf_bf16_adam_kahan", "tf_bf16 Adam, Kahan", "adam", "keras_adam", "kahan"),
)
TIMING_ROWS_BY_KEY = {row.key: row for row in TIMING_ROWS}


class BytesRow:
    """One (dtype policy, optimizer) whose training state is measured."""

    def __init__(self, key, label, policy, optimizer, expected, target=False):
        self.key = key
        self.label = label
        self.policy = policy        # "tf_bf16", "mixed_bfloat16" or "float32"
        self.optimizer = optimizer  # a TimingRow key
        self.expected = expected    # bytes per parameter
        self.target = target


BYTES_ROWS = (
    BytesRow("tf_bf16_sgd_sr", "tf_bf16 SGD-momentum, SR (pure bf16)", "tf_bf16",
             "tf_bf16_sgd_sr", 4, target=True),
    BytesRow("tf_bf16_sgd_kahan", "tf_bf16 SGD-momentum, Kahan (pure bf16)", "tf_bf16",
             "tf_bf16_sgd_kahan", 6, target=True),
    BytesRow("tf_bf16_adam_sr", "tf_bf16 Adam, SR (pure bf16)", "tf_bf16",
             "tf_bf16_adam_sr", 6, target=True),
    BytesRow("tf_bf16_adam_kahan", "tf_bf16 Adam, Kahan (pure bf16)", "tf_bf16",
             "tf_bf16_adam_kahan", 8, target=True),
    BytesRow("keras_sgd_bf16", "stock Keras SGD-momentum, pure bf16", "tf_bf16",
             "keras_sgd", 4),
    BytesRow("keras_adam_bf16", "stock Keras Adam, pure bf16 (does not train)", "tf_bf16",
             "keras_adam", 6),
    BytesRow("keras_sgd_mixed", "Keras mixed_bfloat16 SGD-momentum", "mixed_bfloat16",
             "keras_sgd", 8),
    BytesRow("keras_adam_mixed", "Keras mixed_bfloat16 Adam (REFERENCE)", "mixed_bfloat16",
             "keras_adam", 12),
    BytesRow("keras_sgd_float32", "Keras float32 SGD-momentum", "float32", "keras_sgd", 8),
    BytesRow("keras_adam_float32", "Keras float32 Adam", "float32", "keras_adam", 12),
)
BYTES_REFERENCE = "keras_adam_mixed"


# ---------------------------------------------------------------------------
# Command line.

def add_arguments(parser):
    """Adds the bench-fit options to an argparse parser."""
    parser.add_argument(
        "--model", choices=MODELS + ("all",), default="all",
        help="the bf16 model(s) to benchmark: 'mlp' (Dense 1024 -> W -> W -> 10, ReLU; "
             f"6.3M parameters at the default W={DEFAULT_WIDTH['mlp']}), 'cnn' (32x32x3 input, "
             f"three 3x3 Conv2D of {'/'.join(map(str, CNN_CHANNELS))} channels with "
             "BatchNormalization and ReLU, two 2x2 max-pools, Dense W -> 10; 4.3M parameters "
             f"at the default W={DEFAULT_WIDTH['cnn']}) or 'all' (both, one after the "
             "other; default)")
    parser.add_argument(
        "--width", type=common.positive_int, default=None, metavar="W",
        help="hidden units of the MLP's two hidden layers and of the CNN's Dense layer "
             f"(default {DEFAULT_WIDTH['mlp']} for the MLP, {DEFAULT_WIDTH['cnn']} for the "
             "CNN); the parameter count grows with it")
    parser.add_argument(
        "--batch-size", type=common.positive_int, default=None, metavar="B",
        help=f"batch size of fit (default {DEFAULT_BATCH_SIZE['mlp']} for the MLP, "
             f"{DEFAULT_BATCH_SIZE['cnn']} for the CNN: small enough that the optimizer "
             "update is a visible part of the step)")
    parser.add_argument(
        "--steps", type=common.positive_int, default=DEFAULT_STEPS, metavar="N",
        help="timed steps per row and round: each round runs one fit call of N + 1 "
             "batches per row and times the N intervals between batch ends "
             f"(default {DEFAULT_STEPS})")
    parser.add_argument(
        "--repeats", type=common.positive_int, default=DEFAULT_REPEATS, metavar="R",
        help="timed rounds (rows interleaved, order rotated every round); a row's time is "
             f"the median over its R x N timed steps (default {DEFAULT_REPEATS})")
    parser.add_argument(
        "--warmup", type=common.non_negative_int, default=DEFAULT_WARMUP, metavar="W",
        help="untimed rounds before the timed ones; each row's first fit call traces its "
             f"train function and is never timed, even with 0 (default {DEFAULT_WARMUP})")
    parser.add_argument(
        "--apply-calls", type=common.non_negative_int, default=DEFAULT_APPLY_CALLS, metavar="K",
        help="calls per row and round when timing optimizer.apply alone with fixed "
             f"gradients; 0 skips that measurement (default {DEFAULT_APPLY_CALLS})")
    parser.add_argument(
        "--threads", type=common.non_negative_int, default=DEFAULT_THREADS, metavar="T",
        help="TensorFlow intra-op and inter-op thread pools of T threads each; 0 keeps "
             "TensorFlow's defaults (one intra-op thread per usable core). The default, "
             f"{DEFAULT_THREADS}, makes the step times reproducible on a small machine shared "
             "with other work: with a thread per core, a step slows down whenever another "
             "process takes one core, and the rows' times scatter by tens of percent. Set "
             "before TensorFlow starts: in a process that has already run TensorFlow ops "
             "(e.g. under pytest) only 0 or the current setting works")
    parser.add_argument(
        "--no-bytes", action="store_true",
        help="skip the bytes-per-parameter measurement (its targets are then reported "
             "as SKIPPED, not PASS)")
    parser.add_argument(
        "--json", metavar="PATH",
        help="also write all results (per-step times included) as JSON to PATH")
    parser.add_argument(
        "--markdown", metavar="PATH",
        help="also write the results as Markdown tables (for the README) to PATH")
    parser.add_argument(
        "--no-progress", action="store_true",
        help="do not show progress bars (they go to stderr)")
    parser.add_argument("--check", action="store_true", help=common.CHECK_HELP)


# What the command needs beyond the library (the lab extra).
REQUIRES = ("tqdm",)


def run(args):
    """Runs the benchmark; prints the results; returns the exit status
    (see ``common.verdict_exit_status``)."""
    if common.check_requirements("bench-fit", REQUIRES):
        return 2
    started = time.perf_counter()
    env = _import_tensorflow(args.threads)
    tf, keras = env["tf"], env["keras"]
    from tf_bf16 import policy

    models = list(MODELS) if args.model == "all" else [args.model]
    saved_state = policy.policy_state()
    saved_keras_policy = keras.config.dtype_policy()
    results = {
        "config": {
            "models": models, "steps": args.steps, "repeats": args.repeats,
            "warmup": args.warmup, "apply_calls": args.apply_calls, "seed": SEED,
            "threads": args.threads or "TensorFlow default",
            "sgd": f"learning rate {SGD_LEARNING_RATE}, momentum {MOMENTUM}",
            "adam": f"learning rate {ADAM_LEARNING_RATE}, Keras defaults otherwise",
            "target_ratio": MAX_RATIO_TO_KERAS,
            "timing": "median over all timed steps of the interval between consecutive "
                      "batch ends in model.fit (loss read back each batch); rows "
                      "interleaved, order rotated every round",
            "jit_compile": "Keras default ('auto': False on CPU)",
        },
        "machine": common.machine_info(tf, keras),
        "models": [],
    }
    try:
        for kind in models:
            spec = _model_spec(kind, args)
            entry = {"spec": spec}
            entry.update(_run_timing(env, spec, args))
            entry["bytes"] = None if args.no_bytes else _run_bytes(env, spec)
            results["models"].append(entry)
    finally:
        _restore_policy(keras, policy, saved_state, saved_keras_policy)
    results["targets"] = verdict(results)
    results["elapsed_s"] = time.perf_counter() - started

    common.write_results(results, args, _format_text, _format_markdown)
    return common.verdict_exit_status(results["targets"], args.check)


def _restore_policy(keras, policy, state, keras_policy):
    """Puts the global dtype policy and tf_bf16's policy state back as they were."""
    policy.reset_policy()
    if state.active:
        policy.set_policy(strict=state.strict,
                          keep_float32=[p.pattern for p in state.float32_patterns],
                          moving_statistics=state.moving_statistics, seed=state.seed)
    else:
        keras.config.set_dtype_policy(keras_policy)


def _import_tensorflow(threads=0):
    tf, keras = common.import_tensorflow_keras("The benchmark")
    if threads:
        threading = tf.config.threading
        current = (threading.get_intra_op_parallelism_threads(),
                   threading.get_inter_op_parallelism_threads())
        if current != (threads, threads):
            try:
                threading.set_intra_op_parallelism_threads(threads)
                threading.set_inter_op_parallelism_threads(threads)
            except RuntimeError as e:
                raise SystemExit(
                    f"--threads {threads}: TensorFlow has already started in this process "
                    f"({e}); run the benchmark in a fresh process, or pass --threads 0.")
    import tf_bf16

    common.load_op_library()
    return {"tf": tf, "keras": keras, "tf_bf16": tf_bf16}


# ---------------------------------------------------------------------------
# Models, data, optimizers.

def _model_spec(kind, args):
    width = args.width or DEFAULT_WIDTH[kind]
    batch = args.batch_size or DEFAULT_BATCH_SIZE[kind]
    input_shape = (MLP_INPUTS,) if kind == "mlp" else CNN_INPUT_SHAPE
    return {"model": kind, "width": width, "batch_size": batch,
            "input_shape": list(input_shape)}


def _describe_model(spec):
    w = spec["width"]
    if spec["model"] == "mlp":
        return f"MLP Dense {MLP_INPUTS} -> {w} -> {w} -> {CLASSES} (ReLU)"
    channels = "/".join(map(str, CNN_CHANNELS))
    return (f"CNN 32x32x3 -> Conv3x3 {channels} (+BatchNorm, ReLU; 2 max-pools) -> "
            f"Dense {w} -> {CLASSES}")


def _build_model(keras, spec, name):
    """The benchmark model, built under the current global dtype policy."""
    layers = keras.layers
    width = spec["width"]
    inputs = keras.Input(tuple(spec["input_shape"]))
    if spec["model"] == "mlp":
        x = layers.Dense(width, activation="relu")(inputs)
        x = layers.Dense(width, activation="relu")(x)
    else:
        x = inputs
        for i, channels in enumerate(CNN_CHANNELS):
            x = layers.Conv2D(channels, 3, padding="same", use_bias=False)(x)
            x = layers.BatchNormalization()(x)
            x = layers.ReLU()(x)
            if i > 0:
                x = layers.MaxPooling2D(2)(x)
        x = layers.Flatten()(x)
        x = layers.Dense(width, activation="relu")(x)
    outputs = layers.Dense(CLASSES)(x)
    return keras.Model(inputs, outputs, name=name)


def _dataset(tf, spec):
    """Synthetic inputs and labels (fixed seed), repeated forever, not shuffled."""
    import numpy as np

    rng = np.random.RandomState(SEED)
    n = spec["batch_size"] * DATA_BATCHES
    x = rng.standard_normal((n,) + tuple(spec["input_shape"])).astype("float32")
    y = rng.randint(0, CLASSES, size=n).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, y)).repeat().batch(spec["batch_size"]), x, y


def _gradients_only_class(keras, tf):
    class GradientsOnly(keras.optimizers.Optimizer):
        """Applies no update; reads one element of every gradient so that the
        whole backward pass runs (unused gradients would be pruned)."""

        def __init__(self, name="gradients_only"):
            super().__init__(learning_rate=0.0, name=name)

        def build(self, variables):
            if self.built:
                return
            super().build(variables)
            self._sink = self.add_variable(shape=(), initializer="zeros", dtype="float32",
                                           name="sink")

        def update_step(self, gradient, variable, learning_rate):
            first = tf.reshape(tf.convert_to_tensor(gradient), [-1])[:1]
            self._sink.assign_add(tf.reduce_sum(tf.cast(first, tf.float32)) * 0.0)

    return GradientsOnly


def _make_optimizer(env, key):
    keras, tf_bf16 = env["keras"], env["tf_bf16"]
    if key == "gradients_only":
        return _gradients_only_class(keras, env["tf"])()
    if key == "keras_sgd":
        return keras.optimizers.SGD(learning_rate=SGD_LEARNING_RATE, momentum=MOMENTUM)
    if key == "keras_adam":
        return keras.optimizers.Adam(learning_rate=ADAM_LEARNING_RATE)
    rounding = TIMING_ROWS_BY_KEY[key].rounding
    if key.startswith("tf_bf16_sgd"):
        return tf_bf16.optimizers.SGD(learning_rate=SGD_LEARNING_RATE, momentum=MOMENTUM,
                                      rounding=rounding, seed=SEED)
    if key.startswith("tf_bf16_adam"):
        return tf_bf16.optimizers.Adam(learning_rate=ADAM_LEARNING_RATE, rounding=rounding,
                                       seed=SEED)
    raise ValueError(f"unknown optimizer {key!r}")


def _loss(keras):
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


# ---------------------------------------------------------------------------
# Timing.

def _step_timer_class(keras):
    class StepTimer(keras.callbacks.Callback):
        """Times every batch of a fit call; the loss read-back synchronizes."""

        def __init__(self):
            super().__init__()
            self.begins, self.ends = [], []

        def on_train_batch_begin(self, batch, logs=None):
            self.begins.append(time.perf_counter())

        def on_train_batch_end(self, batch, logs=None):
            loss = (logs or {}).get("loss")
            if loss is not None:
                float(loss)
            self.ends.append(time.perf_counter())

    return StepTimer


def _fit_round(model, dataset, steps, timer_class):
    """One fit call of steps + 1 batches: (step intervals, train-fn times, cores)."""
    timer = timer_class()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    model.fit(dataset, epochs=1, steps_per_epoch=steps + 1, verbose=0, shuffle=False,
              callbacks=[timer])
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    intervals = [b - a for a, b in zip(timer.ends, timer.ends[1:])]
    functions = [e - b for b, e in zip(timer.begins[1:], timer.ends[1:])]
    return intervals, functions, (cpu / wall if wall > 0 else 0.0)


def _run_timing(env, spec, args):
    tf, keras, tf_bf16 = env["tf"], env["keras"], env["tf_bf16"]

    tf_bf16.set_policy(seed=SEED)
    keras.utils.set_random_seed(SEED)
    base = _build_model(keras, spec, f"{spec['model']}_base")
    weights = base.get_weights()
    params = int(sum(math.prod(v.shape) for v in base.trainable_variables))
    dataset, x, y = _dataset(tf, spec)
    timer_class = _step_timer_class(keras)

    models = {}
    for row in TIMING_ROWS:
        model = _build_model(keras, spec, f"{spec['model']}_{row.key}")
        model.set_weights(weights)
        model.compile(optimizer=_make_optimizer(env, row.key), loss=_loss(keras))
        models[row.key] = model

    keys = [row.key for row in TIMING_ROWS]
    intervals = {k: [] for k in keys}
    functions = {k: [] for k in keys}
    cores = {k: [] for k in keys}
    warmup = max(1, args.warmup)
    with common.progress((warmup + args.repeats) * len(keys), f"bench-fit {spec['model']}: fit",
                         args.no_progress, unit="round") as bar:
        for _ in range(warmup):
            for k in keys:
                _fit_round(models[k], dataset, min(args.steps, 3), timer_class)
                bar.update(1)
        load_before = common.cpu_counters()
        for r in range(args.repeats):
            shift = r % len(keys)
            for k in keys[shift:] + keys[:shift]:
                steps, fns, used = _fit_round(models[k], dataset, args.steps, timer_class)
                intervals[k].extend(steps)
                functions[k].extend(fns)
                cores[k].append(used)
                bar.update(1)
        load_after = common.cpu_counters()

    apply_times = _time_apply(env, spec, base, models, x, y, args) if args.apply_calls else None

    rows = []
    for row in TIMING_ROWS:
        times = intervals[row.key]
        median = statistics.median(times)
        q = statistics.quantiles(times, n=4) if len(times) >= 2 else [median] * 3
        rows.append({
            "key": row.key, "label": row.label, "family": row.family,
            "baseline": row.baseline, "rounding": row.rounding,
            "median_ms": median * 1e3, "p25_ms": q[0] * 1e3, "p75_ms": q[2] * 1e3,
            "spread": (q[2] - q[0]) / median if median > 0 else 0.0,
            "train_function_median_ms": statistics.median(functions[row.key]) * 1e3,
            "cpu_cores": statistics.median(cores[row.key]),
            "round_medians_ms": [statistics.median(times[i:i + args.steps]) * 1e3
                                 for i in range(0, len(times), args.steps)],
            "times_ms": [t * 1e3 for t in times],
            "apply_alone_ms": None if apply_times is None else apply_times[row.key],
        })
    by_key = {r["key"]: r for r in rows}
    grads_ms = by_key["gradients_only"]["median_ms"]
    for r in rows:
        r["update_in_step_ms"] = (r["median_ms"] - grads_ms
                                  if r["key"] != "gradients_only" else None)
        baseline = r["baseline"]
        r["ratio"] = r["median_ms"] / by_key[baseline]["median_ms"] if baseline else None
        r["ratio_round_medians"] = (
            [a / b for a, b in zip(r["round_medians_ms"], by_key[baseline]["round_medians_ms"])]
            if baseline else None)
        r["paired_ratio"] = (statistics.median(r["ratio_round_medians"])
                             if baseline else None)

    return {
        "parameters": params,
        "description": _describe_model(spec),
        "timing": rows,
        "background": common.background_load(load_before, load_after),
    }


def _time_apply(env, spec, base, models, x, y, args):
    """Median time of one optimizer.apply with fixed bf16 gradients, per row."""
    tf, keras = env["tf"], env["keras"]

    xb = tf.constant(x[:spec["batch_size"]])
    yb = tf.constant(y[:spec["batch_size"]])
    loss_fn = _loss(keras)
    with tf.GradientTape() as tape:
        loss = loss_fn(yb, base(xb, training=True))
    gradients = [tf.identity(g) for g in tape.gradient(loss, base.trainable_variables)]

    def make(model):
        optimizer, variables = model.optimizer, model.trainable_variables

        @tf.function
        def apply():
            optimizer.apply(gradients, variables)
            return common.probe(tf, variables[0])

        return apply

    functions = {k: make(m) for k, m in models.items()}
    keys = list(functions)
    times = {k: [] for k in keys}
    logger = tf.get_logger()
    level = logger.level
    with common.progress((1 + args.repeats) * len(keys),
                         f"bench-fit {spec['model']}: apply alone", args.no_progress,
                         unit="round") as bar:
        # Tracing seven different functions in a row trips TF's retracing warning.
        logger.setLevel("ERROR")
        try:
            for k in keys:
                common.timed_call(functions[k])  # traces
                bar.update(1)
        finally:
            logger.setLevel(level)
        for r in range(args.repeats):
            shift = r % len(keys)
            for k in keys[shift:] + keys[:shift]:
                for _ in range(args.apply_calls):
                    times[k].append(common.timed_call(functions[k])[0])
                bar.update(1)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


# ---------------------------------------------------------------------------
# Training-state bytes per parameter, from tf_bf16.audit.

def _set_dtype_policy(env, name):
    keras, tf_bf16 = env["keras"], env["tf_bf16"]
    if name == "tf_bf16":
        tf_bf16.set_policy(seed=SEED)
    else:
        tf_bf16.reset_policy()
        keras.config.set_dtype_policy(name)


# Roles of the rows of an audit report (``AuditReport.variables``).
ROLE_TRAINABLE = "trainable weight"
ROLE_SLOT = "optimizer slot"
ROLE_KAHAN = "kahan buffer"
ROLE_BOOKKEEPING = "bookkeeping"


def state_bytes(tf_bf16, model, optimizer):
    """Training-state bytes of a model and its built optimizer, as
    ``tf_bf16.audit(model, optimizer=optimizer, trace=False)`` reports them.

    Returns a dict: the report's ``training_state`` (trainable parameters,
    bytes of the trainable weights, of the per-parameter optimizer slots and
    of the Kahan buffers, bytes_per_parameter = their sum / trainable
    parameters), the dtypes of the weights and of the slots (Kahan buffers
    included), and what was excluded (the optimizer's scalar bookkeeping,
    the model's non-trainable variables), from the report's variable rows.
    """
    report = tf_bf16.audit(model, optimizer=optimizer, trace=False)
    state = report.training_state

    def of_optimizer(row):
        return row.owner == optimizer.name and row.owner_class == type(optimizer).__name__

    def dtypes(*roles):
        return sorted({row.dtype for role in roles for row in report.variables_with_role(role)})

    scalars = [row for row in report.variables_with_role(ROLE_BOOKKEEPING) if of_optimizer(row)]
    non_trainable = [row for row in report.variables
                     if not of_optimizer(row) and row.role != ROLE_TRAINABLE]
    return {
        "trainable_parameters": state.trainable_parameters,
        "weight_bytes": state.weight_bytes,
        "slot_bytes": state.slot_bytes,
        "kahan_bytes": state.kahan_bytes,
        "total_bytes": state.total_bytes,
        "bytes_per_parameter": float(state.bytes_per_parameter),
        "weight_dtypes": dtypes(ROLE_TRAINABLE),
        "slot_dtypes": dtypes(ROLE_SLOT, ROLE_KAHAN),
        "excluded_optimizer_scalars": [row.path.rsplit("/", 1)[-1] for row in scalars],
        "excluded_optimizer_scalar_bytes": sum(row.bytes for row in scalars),
        "excluded_non_trainable_variables": len(non_trainable),
        "excluded_non_trainable_bytes": sum(row.bytes for row in non_trainable),
    }


def _run_bytes(env, spec):
    keras = env["keras"]
    rows = []
    for row in BYTES_ROWS:
        _set_dtype_policy(env, row.policy)
        keras.utils.set_random_seed(SEED)
        model = _build_model(keras, spec, f"{spec['model']}_bytes_{row.key}")
        optimizer = _make_optimizer(env, row.optimizer)
        optimizer.build(model.trainable_variables)
        measured = state_bytes(env["tf_bf16"], model, optimizer)
        measured.update({
            "key": row.key, "label": row.label, "policy": row.policy,
            "expected": row.expected, "target": row.target,
            "matches_expected": measured["bytes_per_parameter"] == row.expected,
        })
        rows.append(measured)
        del model, optimizer
    reference = next(r for r in rows if r["key"] == BYTES_REFERENCE)["bytes_per_parameter"]
    for r in rows:
        r["ratio_to_reference"] = r["bytes_per_parameter"] / reference
    return {"rows": rows}


# ---------------------------------------------------------------------------
# Verdict.

def verdict(results):
    """The targets (see ``common.verdict_lines``) met or missed by `results`."""
    targets = []
    for entry in results["models"]:
        kind = entry["spec"]["model"]
        by_key = {r["key"]: r for r in entry["timing"]}
        for r in entry["timing"]:
            if not TIMING_ROWS_BY_KEY[r["key"]].is_target:
                continue
            baseline = TIMING_ROWS_BY_KEY[r["baseline"]].label.split(" (")[0]
            targets.append({
                "model": kind,
                "target": f"{kind}: {r['label']} fit step time <= {MAX_RATIO_TO_KERAS:.2f}x "
                          f"{baseline}",
                "value": f"{r['ratio']:.3f}x ({r['median_ms']:.1f} vs "
                         f"{by_key[r['baseline']]['median_ms']:.1f} ms)",
                "threshold": f"<= {MAX_RATIO_TO_KERAS:.2f}x",
                "status": "PASS" if r["ratio"] <= MAX_RATIO_TO_KERAS else "MISS",
            })
        for row in BYTES_ROWS:
            if not row.target:
                continue
            name = f"{kind}: {row.label.split(' (')[0]} training state = {row.expected} B/param"
            if entry["bytes"] is None:
                targets.append({"model": kind, "target": name, "value": "not measured "
                                "(--no-bytes)", "threshold": f"= {row.expected}",
                                "status": "SKIPPED"})
                continue
            measured = next(b for b in entry["bytes"]["rows"] if b["key"] == row.key)
            targets.append({
                "model": kind, "target": name,
                "value": f"{measured['bytes_per_parameter']:.2f} B/param",
                "threshold": f"= {row.expected}",
                "status": "PASS" if measured["matches_expected"] else "MISS",
            })
    return targets


# ---------------------------------------------------------------------------
# Output.

def _fmt_ms(value):
    return "-" if value is None else f"{value:.1f}"


def _timing_table(entry):
    header = ["#", "optimizer (pure bf16 model)", "step ms", "IQR", "vs stock", "target",
              "paired", "update in step ms", "update alone ms", "cores"]
    body = []
    for i, r in enumerate(entry["timing"], 1):
        status = "-"
        if r["rounding"] is not None:
            status = "PASS" if r["ratio"] <= MAX_RATIO_TO_KERAS else "MISS"
        body.append([str(i), r["label"], f"{r['median_ms']:.1f}", f"{100 * r['spread']:.0f}%",
                     "-" if r["ratio"] is None else f"{r['ratio']:.3f}x", status,
                     "-" if r["paired_ratio"] is None else f"{r['paired_ratio']:.3f}x",
                     _fmt_ms(r["update_in_step_ms"]), _fmt_ms(r["apply_alone_ms"]),
                     f"{r['cpu_cores']:.2f}"])
    return header, body


def _bytes_table(entry):
    header = ["optimizer / dtype policy", "weights", "slots", "Kahan", "B/param", "expected",
              "vs mixed Adam", "status"]
    body = []
    params = None
    for r in entry["bytes"]["rows"]:
        params = r["trainable_parameters"]
        if r["target"]:
            status = "PASS" if r["matches_expected"] else "MISS"
        else:
            status = "(as expected)" if r["matches_expected"] else "(DIFFERS)"
        body.append([r["label"],
                     f"{r['weight_bytes'] / params:.2f} {'/'.join(r['weight_dtypes'])}",
                     f"{r['slot_bytes'] / params:.2f} {'/'.join(r['slot_dtypes'])}".strip(),
                     f"{r['kahan_bytes'] / params:.2f}",
                     f"{r['bytes_per_parameter']:.2f}", str(r["expected"]),
                     f"{r['ratio_to_reference']:.2f}x", status])
    return header, body


def _bytes_notes(entry):
    rows = entry["bytes"]["rows"]
    first = rows[0]
    notes = [f"B/param = (trainable weights + per-parameter optimizer slots + Kahan buffers) "
             f"/ {first['trainable_parameters']:,} trainable parameters, from "
             "tf_bf16.audit(model, optimizer=optimizer, trace=False).training_state "
             "(weights/slots/Kahan columns: B/param and dtype). "
             "Excluded: scalar optimizer bookkeeping ("
             f"{', '.join(first['excluded_optimizer_scalars']) or 'none'}; a few bytes in all)"]
    if first["excluded_non_trainable_variables"]:
        notes[-1] += (f" and {first['excluded_non_trainable_variables']} non-trainable model "
                      f"variables ({first['excluded_non_trainable_bytes']:,} B in pure bf16: "
                      "BatchNormalization moving statistics, model state)")
    notes[-1] += (". Keras mixed_bfloat16 keeps no bf16 weight copy as a variable (it casts "
                  "each step: temporaries).")
    return notes


def _timing_notes(entry, results):
    m = results["machine"]
    notes = ["step ms: median interval between consecutive batch ends in model.fit; IQR: "
             "(p75 - p25) / median; vs stock: / the stock Keras optimizer's median (target "
             f"<= {MAX_RATIO_TO_KERAS:.2f}x); paired: median over rounds of the ratio of the "
             "two rows' medians in the same round (a check on drifting load); update in step: "
             "step ms - gradients-only step ms; update alone: one optimizer.apply with fixed "
             "gradients in a tf.function; cores: process CPU time / wall time during the fit "
             "calls.",
             "Stock Keras Adam moves no weight in pure bf16 (beta_2 = 0.999 rounds to 1.0): "
             "a timing baseline only."]
    bg = entry["background"]
    if bg.get("other_cores") is not None:
        note = (f"load: other processes used {bg['other_cores']:.2f} of "
                f"{m['usable_cpus']} cores on average while rows were timed "
                f"(loadavg after: {' '.join(f'{x:.2f}' for x in bg.get('loadavg_after', []))})")
        if bg["other_cores"] > 0.25:
            note += " -- WARNING: the machine was busy; times are inflated and noisy"
        notes.append(note)
    return notes


def _entry_heading(entry, results):
    spec, cfg = entry["spec"], results["config"]
    return (f"{entry['description']}: {entry['parameters']:,} parameters, batch "
            f"{spec['batch_size']}; {cfg['repeats']} interleaved rounds x {cfg['steps']} timed "
            f"fit steps per row after {max(1, cfg['warmup'])} warmup round(s)")


def _format_text(results):
    m, cfg = results["machine"], results["config"]
    lines = ["tf_bf16 fit benchmark: model.fit step time and training-state bytes per parameter",
             f"machine: {common.machine_line(m)}",
             f"         {m['os']}; TF intra-op threads {m['intra_op_threads']}, inter-op "
             f"{m['inter_op_threads']} (--threads); oneDNN {m['tf_enable_onednn_opts']}; "
             f"jit_compile {cfg['jit_compile']}; op library built with "
             f"{' '.join(m['op_library_flags']) or '?'}; loadavg at start "
             f"{' '.join(f'{x:.2f}' for x in m['loadavg_start'])}",
             f"SGD: {cfg['sgd']}; Adam: {cfg['adam']}; seed {cfg['seed']}; same weights and "
             "data for every row; policy tf_bf16.set_policy() (all variables bf16, strict)"]
    for entry in results["models"]:
        lines += ["", "== " + _entry_heading(entry, results)]
        lines.append(common.text_table(*_timing_table(entry)))
        lines += _timing_notes(entry, results)
        if entry["bytes"] is not None:
            lines += ["", f"training-state bytes per parameter ({entry['spec']['model']}):",
                      common.text_table(*_bytes_table(entry), left=(0, 1, 2, 7))]
            lines += _bytes_notes(entry)
    lines += common.verdict_lines(results)
    return "\n".join(lines)


def _format_markdown(results):
    m = results["machine"]
    out = ["### model.fit step time and training-state bytes per parameter", "",
           f"Machine: {common.machine_line(m)}; TensorFlow intra-op threads "
           f"{m['intra_op_threads']}, inter-op {m['inter_op_threads']}; oneDNN "
           f"{m['tf_enable_onednn_opts']}; op library built with "
           f"{' '.join(m['op_library_flags']) or '?'}. "
           f"All models under `tf_bf16.set_policy()` (every variable bf16); same weights, "
           "data and seed for every row; rows interleaved.", ""]
    for entry in results["models"]:
        out += [f"#### {_entry_heading(entry, results)}", "",
                common.markdown_table(*_timing_table(entry)), ""]
        out += [" ".join(_timing_notes(entry, results)), ""]
        if entry["bytes"] is not None:
            out += [f"Training-state bytes per parameter ({entry['spec']['model']}):", "",
                    common.markdown_table(*_bytes_table(entry), left=(0, 1, 2, 7)), "",
                    " ".join(_bytes_notes(entry)), ""]
    out += ["#### Targets", ""]
    for t in results["targets"]:
        out.append(f"- **{t['status']}** {t['target']}: {t['value']} (target {t['threshold']})")
    out.append("")
    return "\n".join(out)
