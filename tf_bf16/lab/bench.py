"""Benchmark of the fused bfloat16 optimizer updates against stock Keras.

Run it as ``python -m tf_bf16 bench`` (or ``tf-bf16 bench``); ``--help`` lists
the options. Everything is measured in one process, in one run:

* Time of one optimizer update of a ``--params``-element bfloat16 variable
  (bfloat16 gradient), for stock Keras SGD-momentum (the baseline), the
  composite-op reference of stochastic rounding (``tf_bf16.reference``), the
  fused ops (``tf_bf16.ops``) with each rounding, stock Keras Adam, fused Adam,
  and a plain memory copy of as many bytes as the fused SGD-momentum update
  moves (the bandwidth reference).

  Each update is one call of a ``tf.function`` that runs the update and then
  returns a float32 scalar read from the updated variable; the clock stops
  when that scalar is back in Python (``.numpy()``), so the update has
  finished. One update per call: unrolling several updates into one graph
  would let Grappler deduplicate the stock Keras update's
  variable-independent ops (e.g. ``gradient * learning_rate``). The round
  trip of an empty call is measured too and printed; it is included in every
  row. Rows are timed interleaved (round robin, rotating the order every
  round) so that a change of machine load affects all rows alike; the
  reported time is the median over ``--repeats`` rounds, after ``--warmup``
  untimed rounds (the first one traces).

* Bytes per parameter count the reads and writes the update needs at the
  least (bfloat16 everywhere): SGD-momentum reads w, m, g and writes w, m =
  10 B; Kahan adds its compensation buffer, read and written = 14 B; Adam
  reads w, m, v, g and writes w, m, v = 14 B (Kahan: 18 B). Effective GB/s is
  those bytes over the median time (GB = 1e9 B); stock Keras moves more than
  that through its temporaries, which is the point of fusing.

* The copy is ``tf.raw_ops.DeepCopy`` of a bfloat16 variable of 5 bytes per
  parameter (so it reads 5 and writes 5 B/param, the traffic of the fused
  SGD-momentum update); it runs Eigen's multi-threaded memcpy. It is checked
  to really copy: its time is compared with that of copying twice the bytes,
  and with ``tf.Variable.assign``, which copies nothing (AssignVariableOp
  adopts the source buffer).

* Peak extra memory of one update of a ``--memory-params``-element variable,
  each case in a fresh subprocess: create the variables, run one warmup
  update (tracing), reset the peak RSS (write "5" to /proc/self/clear_refs,
  which resets VmHWM), read VmRSS, run one update, read VmHWM; extra = VmHWM -
  VmRSS before. The subprocesses run with TF_ENABLE_ONEDNN_OPTS=0: with
  oneDNN on, TensorFlow's CPU allocator is a BFC pool that keeps the warmup
  update's freed temporaries resident and reuses them, so VmHWM would not
  rise and every update would look free; without it, large temporaries are
  mmap'ed and unmapped, so the peak shows. The RSS growth of the warmup update
  is reported as well.

The verdict compares the results with the targets of the benchmark issue and
prints PASS or MISS for each one; with ``--check`` a MISS makes the exit status 1.
"""

import json
import os
import statistics
import subprocess
import sys
import time

from tf_bf16.lab import common

SUMMARY = "time fused bf16 updates against stock Keras and a memory copy; peak memory"

DESCRIPTION = """\
Benchmark of the fused bfloat16 optimizer updates (tf_bf16.ops) against stock
Keras, in one process: median time of one update of a bfloat16 variable,
ratio to stock Keras SGD-momentum (and to stock Keras Adam for Adam rows),
bytes moved per parameter, effective bandwidth and its fraction of a plain
memory copy timed in the same run; then the peak extra memory of one update,
each in a fresh subprocess; then PASS/MISS against the targets:

  - fused SR and Kahan SGD-momentum <= 1.0x stock Keras SGD-momentum, fused
    Adam (SR, Kahan) <= 1.0x stock Keras Adam (aim: 0.5x);
  - fused SR SGD-momentum >= 3x faster than the composite-op reference SR;
  - effective bandwidth of every fused update >= 50% of the copy's;
  - no parameter-sized temporary: peak extra memory of a fused update
    < 0.1x the variable's size.

Each update is one tf.function call returning a scalar read back to Python
(synchronizes); rows are interleaved, medians over --repeats rounds.
Progress goes to stderr, results to stdout; --check makes a MISS fail the
command (exit status 1). The module docstring of tf_bf16/lab/bench.py
documents the method in full. Needs the lab extra: pip install "tf_bf16[lab]".

Example:
  python -m tf_bf16 bench --json bench.json --markdown bench.md
"""

DEFAULT_PARAMS = 16 * 2**20
DEFAULT_MEMORY_PARAMS = 256 * 2**20
DEFAULT_REPEATS = 20
DEFAULT_WARMUP = 3

LEARNING_RATE = 1e-3
MOMENTUM = 0.9
SEED = 1234

# Targets (the benchmark issue).
MAX_RATIO_TO_KERAS = 1.0      # fused update time / stock Keras update time
AIM_RATIO_TO_KERAS = 0.5
MIN_SPEEDUP_VS_REFERENCE = 3.0
MIN_FRACTION_OF_COPY = 0.5    # effective bandwidth / copy bandwidth
MAX_TEMPORARY_FRACTION = 0.1  # peak extra memory / variable size

_MIB = 2.0**20
_CHILD_MARKER = "TF_BF16_BENCH_MEMORY_RESULT "


class Row:
    """One timed update."""

    def __init__(self, key, label, bytes_per_param, family, fused=False):
        self.key = key
        self.label = label
        self.bytes_per_param = bytes_per_param
        self.family = family      # "sgd", "adam" or "copy"
        self.fused = fused


ROWS = (
    Row("keras_sgd", "stock Keras SGD-momentum (BASELINE)", 10, "sgd"),
    Row("reference_sgd_sr", "composite-op reference SGD-m, SR", 10, "sgd"),
    Row("fused_sgd_nearest", "fused SGD-momentum, nearest", 10, "sgd", fused=True),
    Row("fused_sgd_sr", "fused SGD-momentum, SR", 10, "sgd", fused=True),
    Row("fused_sgd_kahan", "fused SGD-momentum, Kahan", 14, "sgd", fused=True),
    Row("keras_adam", "stock Keras Adam (no-op in bf16)", 14, "adam"),
    Row("fused_adam_sr", "fused Adam, SR", 14, "adam", fused=True),
    Row("fused_adam_kahan", "fused Adam, Kahan", 18, "adam", fused=True),
    Row("copy", "memory copy (DeepCopy), reference", 10, "copy"),
)
ROWS_BY_KEY = {row.key: row for row in ROWS}

# Peak-memory cases: (key, label).
MEMORY_CASES = (
    ("keras_sgd", "stock Keras SGD-momentum"),
    ("fused_sgd_sr", "fused SGD-momentum, SR"),
    ("fused_sgd_kahan", "fused SGD-momentum, Kahan"),
    ("keras_adam", "stock Keras Adam"),
    ("fused_adam_sr", "fused Adam, SR"),
)
_FUSED_MEMORY_CASES = ("fused_sgd_sr", "fused_sgd_kahan", "fused_adam_sr")


# ---------------------------------------------------------------------------
# Command line.

_param_count = common.int_at_least(2)


def add_arguments(parser):
    """Adds the bench options to an argparse parser."""
    parser.add_argument(
        "--params", type=_param_count, default=DEFAULT_PARAMS, metavar="N",
        help="elements of the bfloat16 variable updated in the timing runs "
             f"(default {DEFAULT_PARAMS} = 16*2**20)")
    parser.add_argument(
        "--repeats", type=common.positive_int, default=DEFAULT_REPEATS, metavar="R",
        help=f"timed rounds; each row's time is the median (default {DEFAULT_REPEATS})")
    parser.add_argument(
        "--warmup", type=common.non_negative_int, default=DEFAULT_WARMUP, metavar="W",
        help="untimed rounds before the timed ones; the first call of each update "
             f"traces its tf.function and is never timed (default {DEFAULT_WARMUP})")
    parser.add_argument(
        "--memory-params", type=_param_count, default=DEFAULT_MEMORY_PARAMS, metavar="N",
        help="elements of the variable in the peak-memory measurements, one fresh "
             f"subprocess per case (default {DEFAULT_MEMORY_PARAMS} = 256*2**20, i.e. "
             "512 MiB per bfloat16 tensor; stock Keras Adam then needs ~3.5 GiB)")
    parser.add_argument(
        "--no-memory", action="store_true",
        help="skip the peak-memory measurements (their target is then reported as "
             "SKIPPED, not PASS)")
    parser.add_argument(
        "--json", metavar="PATH",
        help="also write all results (per-round times included) as JSON to PATH")
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
    if common.check_requirements("bench", REQUIRES):
        return 2
    started = time.perf_counter()
    env = _import_tensorflow()
    tf = env["tf"]
    results = {
        "config": {
            "params": args.params, "repeats": args.repeats, "warmup": args.warmup,
            "memory_params": None if args.no_memory else args.memory_params,
            "learning_rate": LEARNING_RATE, "momentum": MOMENTUM, "seed": SEED,
            "dtype": "bfloat16 variables, slots and gradients",
            "timing": "one update per tf.function call, synchronized by reading back a "
                      "float32 scalar of the updated variable; median over rounds; "
                      "rows interleaved",
            "copy": "tf.raw_ops.DeepCopy of a bfloat16 variable of 5 B/param "
                    "(reads 5 + writes 5 B/param)",
        },
        "machine": common.machine_info(tf, env["keras"]),
    }
    timing = _run_timing(env, args)
    results.update(timing)
    if args.no_memory:
        results["memory"] = None
    else:
        results["memory"] = _run_memory(args)
    results["targets"] = verdict(results)
    results["elapsed_s"] = time.perf_counter() - started

    common.write_results(results, args, _format_text, _format_markdown)
    return common.verdict_exit_status(results["targets"], args.check)


# ---------------------------------------------------------------------------
# Setup shared by the timing run and the memory subprocesses.

def _import_tensorflow():
    tf, keras = common.import_tensorflow_keras("The benchmark")
    from tf_bf16 import ops, reference

    common.load_op_library()
    return {"tf": tf, "keras": keras, "ops": ops, "reference": reference}


def _initial_values(tf, n, constant=False):
    """(weights, gradient): bfloat16 tensors of n elements, fixed seed.

    constant=True fills them with constants instead (for the peak-memory
    subprocesses: values do not change memory use, and 256M normal samples take
    tens of seconds on a small machine).
    """
    if constant:
        return (tf.fill([n], tf.constant(0.5, tf.bfloat16)),
                tf.fill([n], tf.constant(1e-2, tf.bfloat16)))
    w = tf.cast(tf.random.stateless_normal([n], seed=[SEED, 1]), tf.bfloat16)
    g = tf.cast(tf.random.stateless_normal([n], seed=[SEED, 2], stddev=1e-2), tf.bfloat16)
    return w, g


def _build_update(env, key, w_init, grad):
    """Returns (step, state_bytes): a zero-argument tf.function doing one update."""
    tf, keras, ops, reference = env["tf"], env["keras"], env["ops"], env["reference"]
    n = int(w_init.shape[0])

    def zeros():
        return tf.Variable(tf.zeros([n], tf.bfloat16), trainable=False)

    if key in ("keras_sgd", "keras_adam"):
        w = keras.Variable(w_init, dtype="bfloat16", name="w")
        if key == "keras_sgd":
            optimizer = keras.optimizers.SGD(learning_rate=LEARNING_RATE, momentum=MOMENTUM)
        else:
            optimizer = keras.optimizers.Adam(learning_rate=LEARNING_RATE)
        optimizer.build([w])

        @tf.function
        def step():
            optimizer.apply([grad], [w])
            return common.probe(tf, w)

        step.state = (w, optimizer)
        return step

    if key == "copy":
        # 5 B/param: the copy reads 5 and writes 5, the fused SGD-momentum traffic.
        size = _copy_elements(n)
        src = tf.Variable(tf.cast(tf.random.stateless_uniform(
            [size], seed=[SEED, 3], minval=-1.0, maxval=1.0), tf.bfloat16), trainable=False)

        @tf.function
        def step():
            copied = tf.raw_ops.DeepCopy(x=src.read_value())
            return tf.cast(copied[-1], tf.float32)

        step.state = (src,)
        return step

    w = tf.Variable(w_init, trainable=False)
    iteration = tf.Variable(0, dtype=tf.int64, trainable=False)
    if key in ("reference_sgd_sr", "fused_sgd_nearest", "fused_sgd_sr", "fused_sgd_kahan"):
        accum = zeros()
        rounding = {"reference_sgd_sr": "stochastic", "fused_sgd_nearest": "nearest",
                    "fused_sgd_sr": "stochastic", "fused_sgd_kahan": "kahan"}[key]
        compensation = zeros() if rounding == "kahan" else None
        apply_sgd = reference.apply_sgd if key.startswith("reference") else ops.apply_sgd

        @tf.function
        def step():
            apply_sgd(w, grad, LEARNING_RATE, momentum=MOMENTUM, accumulator=accum,
                      rounding=rounding, compensation=compensation, seed=SEED,
                      step=iteration, var_id=0)
            iteration.assign_add(1)
            return common.probe(tf, w)

        step.state = (w, accum, compensation, iteration)
        return step

    if key in ("fused_adam_sr", "fused_adam_kahan"):
        m, v = zeros(), zeros()
        rounding = "stochastic" if key == "fused_adam_sr" else "kahan"
        compensation = zeros() if rounding == "kahan" else None

        @tf.function
        def step():
            ops.apply_adam(w, grad, m, v, LEARNING_RATE, step=iteration, rounding=rounding,
                           compensation=compensation, seed=SEED, var_id=0)
            iteration.assign_add(1)
            return common.probe(tf, w)

        step.state = (w, m, v, compensation, iteration)
        return step

    raise ValueError(f"unknown update {key!r}")


def _copy_elements(n):
    return (5 * n + 1) // 2


# ---------------------------------------------------------------------------
# Timing.

def _run_timing(env, args):
    tf = env["tf"]
    n = args.params
    w_init, grad = _initial_values(tf, n)
    steps = {row.key: _build_update(env, row.key, w_init, grad) for row in ROWS}
    del w_init

    overhead_var = tf.Variable(tf.zeros([4], tf.bfloat16), trainable=False)
    empty = tf.function(lambda: common.probe(tf, overhead_var))

    keys = [row.key for row in ROWS]
    wall = {k: [] for k in keys}
    cpu = {k: [] for k in keys}
    # The first call of each function traces it: never timed, even with --warmup 0.
    warmup = max(1, args.warmup)
    with common.progress((warmup + args.repeats) * len(keys), "bench: timing",
                   args.no_progress) as bar:
        for _ in range(warmup):
            for k in keys:
                common.timed_call(steps[k])
                bar.update(1)
        load_before = common.cpu_counters()
        for r in range(args.repeats):
            shift = r % len(keys)
            for k in keys[shift:] + keys[:shift]:
                t, c = common.timed_call(steps[k])
                wall[k].append(t)
                cpu[k].append(c)
                bar.update(1)
        load_after = common.cpu_counters()

    for _ in range(3):
        common.timed_call(empty)
    overhead = [common.timed_call(empty)[0] for _ in range(max(20, args.repeats))]

    rows = []
    for row in ROWS:
        rows.append(_row_stats(row, wall[row.key], cpu[row.key], n))
    by_key = {r["key"]: r for r in rows}
    copy_gbps = by_key["copy"]["gbps"]
    sgd_ms = by_key["keras_sgd"]["median_ms"]
    adam_ms = by_key["keras_adam"]["median_ms"]
    for r in rows:
        r["ratio_keras_sgd"] = r["median_ms"] / sgd_ms
        r["ratio_keras_adam"] = (r["median_ms"] / adam_ms
                                 if ROWS_BY_KEY[r["key"]].family == "adam" else None)
        r["fraction_of_copy"] = r["gbps"] / copy_gbps

    copy_check = _check_copy(env, steps["copy"], n, max(5, args.repeats // 2), copy_gbps)
    return {
        "rows": rows,
        "call_overhead_ms": statistics.median(overhead) * 1e3,
        "background": common.background_load(load_before, load_after),
        "copy_check": copy_check,
    }


def _row_stats(row, wall, cpu, n):
    median = statistics.median(wall)
    q = statistics.quantiles(wall, n=4) if len(wall) >= 2 else [median, median, median]
    cores = [c / t for c, t in zip(cpu, wall) if t > 0]
    return {
        "key": row.key,
        "label": row.label,
        "fused": row.fused,
        "family": row.family,
        "median_ms": median * 1e3,
        "min_ms": min(wall) * 1e3,
        "p25_ms": q[0] * 1e3,
        "p75_ms": q[2] * 1e3,
        "spread": (q[2] - q[0]) / median if median > 0 else 0.0,
        "times_ms": [t * 1e3 for t in wall],
        "bytes_per_param": row.bytes_per_param,
        "bytes": row.bytes_per_param * n,
        "gbps": row.bytes_per_param * n / median / 1e9,
        "cpu_cores": statistics.median(cores) if cores else 0.0,
    }


def _check_copy(env, step, n, calls, copy_gbps):
    """Evidence that the copy row really copies its bytes, with several threads."""
    tf = env["tf"]
    size = _copy_elements(n)
    src = step.state[0]
    # Twice the bytes: a real copy takes about twice the time (both are far
    # beyond the caches at the default size). Timed interleaved with the copy.
    double = tf.Variable(tf.concat([src, src], 0), trainable=False)

    @tf.function
    def copy_double():
        return tf.cast(tf.raw_ops.DeepCopy(x=double.read_value())[-1], tf.float32)

    @tf.function
    def copy_full_values():
        return tf.raw_ops.DeepCopy(x=src.read_value())

    # tf.Variable.assign for comparison: AssignVariableOp adopts the source buffer.
    dst = tf.Variable(tf.zeros([size], tf.bfloat16), trainable=False)

    @tf.function
    def assign():
        dst.assign(src)
        return tf.cast(dst[-1], tf.float32)

    for fn in (copy_double, assign):
        common.timed_call(fn)
    full, doubles, assigns = [], [], []
    for _ in range(calls):
        full.append(common.timed_call(step))
        doubles.append(common.timed_call(copy_double)[0])
        assigns.append(common.timed_call(assign)[0])
    values_equal = bool(tf.reduce_all(tf.equal(
        tf.bitcast(copy_full_values(), tf.uint16), tf.bitcast(src.read_value(), tf.uint16))))
    full_ms = statistics.median(t for t, _ in full) * 1e3
    double_ms = statistics.median(doubles) * 1e3
    assign_ms = statistics.median(assigns) * 1e3
    cores = statistics.median(c / t for t, c in full if t > 0)
    ratio = double_ms / full_ms if full_ms > 0 else float("nan")
    return {
        "op": "tf.raw_ops.DeepCopy",
        "bytes_copied": 2 * size,
        "full_ms": full_ms,
        "double_ms": double_ms,
        "double_over_full": ratio,
        "scales_with_size": bool(1.6 <= ratio <= 2.5),
        "values_equal": values_equal,
        "cpu_cores": cores,
        "assign_ms": assign_ms,
        "copy_gbps": copy_gbps,
    }


# ---------------------------------------------------------------------------
# Peak memory, one fresh subprocess per case.

def _run_memory(args):
    env = dict(os.environ)
    env["TF_ENABLE_ONEDNN_OPTS"] = "0"  # see the module docstring
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("KERAS_BACKEND", "tensorflow")
    code = ("import sys; from tf_bf16.lab.bench import memory_child; "
            "memory_child(sys.argv[1], int(sys.argv[2]))")
    cases = []
    bar = common.progress(len(MEMORY_CASES), "bench: peak memory (subprocesses)",
                          args.no_progress, unit="case")
    for key, label in MEMORY_CASES:
        proc = subprocess.run([sys.executable, "-c", code, key, str(args.memory_params)],
                              env=env, capture_output=True, text=True)
        result = None
        for line in proc.stdout.splitlines():
            if line.startswith(_CHILD_MARKER):
                result = json.loads(line[len(_CHILD_MARKER):])
        if proc.returncode != 0 or result is None:
            raise RuntimeError(
                f"peak-memory subprocess for {key!r} failed (exit {proc.returncode}):\n"
                + proc.stderr[-3000:])
        result["key"] = key
        result["label"] = label
        cases.append(result)
        bar.update(1)
    bar.close()
    return {"params": args.memory_params, "allocator": "TF_ENABLE_ONEDNN_OPTS=0",
            "cases": cases}


def _proc_status():
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0]) * 1024  # kB
    return values


def memory_child(key, n):
    """Subprocess body: peak extra memory of one update; prints one JSON line."""
    import gc

    env = _import_tensorflow()
    tf = env["tf"]
    w_init, grad = _initial_values(tf, n, constant=True)
    step = _build_update(env, key, w_init, grad)
    del w_init
    gc.collect()
    rss_created = _proc_status()["VmRSS"]
    common.timed_call(step)  # warmup: traces, and un-aliases the variables from their initial values
    gc.collect()
    rss_warm = _proc_status()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    status = _proc_status()
    rss_before = status["VmRSS"]
    hwm_after_reset = status["VmHWM"]
    common.timed_call(step)
    hwm = _proc_status()["VmHWM"]
    variable_bytes = 2 * n
    extra = hwm - rss_before
    print(_CHILD_MARKER + json.dumps({
        "params": n,
        "variable_bytes": variable_bytes,
        "rss_before_bytes": rss_before,
        "hwm_bytes": hwm,
        "extra_bytes": extra,
        "extra_mib": extra / _MIB,
        "extra_fraction": extra / variable_bytes,
        "warmup_growth_mib": (rss_warm - rss_created) / _MIB,
        "hwm_reset_ok": hwm_after_reset <= rss_before + 4 * _MIB,
    }), flush=True)


# ---------------------------------------------------------------------------
# Verdict.

def verdict(results):
    """The targets (see ``common.verdict_lines``) met or missed by `results`."""
    by_key = {r["key"]: r for r in results["rows"]}
    targets = []

    def add(name, value, threshold, ok, aim=None):
        entry = {"target": name, "value": value, "threshold": threshold,
                 "status": ok if isinstance(ok, str) else common.status(ok)}
        if aim is not None:
            entry["aim"] = aim
        targets.append(entry)

    for key, baseline in (("fused_sgd_sr", "keras_sgd"), ("fused_sgd_kahan", "keras_sgd"),
                          ("fused_adam_sr", "keras_adam"), ("fused_adam_kahan", "keras_adam")):
        ratio = by_key[key]["median_ms"] / by_key[baseline]["median_ms"]
        add(f"{by_key[key]['label']} time <= {MAX_RATIO_TO_KERAS:.1f}x "
            f"{ROWS_BY_KEY[baseline].label.replace(' (BASELINE)', '')}",
            f"{ratio:.2f}x", f"<= {MAX_RATIO_TO_KERAS:.1f}x", ratio <= MAX_RATIO_TO_KERAS,
            aim=f"aim {AIM_RATIO_TO_KERAS:.1f}x: "
                + ("met" if ratio <= AIM_RATIO_TO_KERAS else "not met"))
    speedup = by_key["reference_sgd_sr"]["median_ms"] / by_key["fused_sgd_sr"]["median_ms"]
    add("fused SR SGD-momentum >= 3x faster than the composite-op reference SR",
        f"{speedup:.1f}x faster", f">= {MIN_SPEEDUP_VS_REFERENCE:.0f}x",
        speedup >= MIN_SPEEDUP_VS_REFERENCE)
    for r in results["rows"]:
        if r["fused"]:
            add(f"{r['label']} effective bandwidth >= 50% of the copy",
                f"{100 * r['fraction_of_copy']:.0f}%", f">= {100 * MIN_FRACTION_OF_COPY:.0f}%",
                r["fraction_of_copy"] >= MIN_FRACTION_OF_COPY)
    memory = results.get("memory")
    for key in _FUSED_MEMORY_CASES:
        label = dict(MEMORY_CASES)[key]
        name = f"{label}: no parameter-sized temporary (extra < 0.1x variable)"
        if memory is None:
            add(name, "not measured (--no-memory)", f"< {MAX_TEMPORARY_FRACTION}x", "SKIPPED")
            continue
        case = next(c for c in memory["cases"] if c["key"] == key)
        add(name, f"{case['extra_fraction']:.3f}x ({case['extra_mib']:.1f} MiB)",
            f"< {MAX_TEMPORARY_FRACTION}x", case["extra_fraction"] < MAX_TEMPORARY_FRACTION)
    return targets


# ---------------------------------------------------------------------------
# Output.

def _mib(nbytes):
    """Mebibytes, with more digits for small sizes."""
    value = nbytes / _MIB
    return f"{value:.0f}" if value >= 10 else f"{value:.3g}"


def _fmt_ratio(value):
    return "-" if value is None else f"{value:.2f}x"


def _timing_table(results):
    """(header, rows) of the timing table, as strings."""
    header = ["#", "update (bf16, 1 step)", "median ms", "IQR", "vs Keras SGD",
              "vs Keras Adam", "B/param", "eff. GB/s", "% of copy", "cores"]
    body = []
    for i, r in enumerate(results["rows"], 1):
        body.append([str(i), r["label"], f"{r['median_ms']:.2f}", f"{100 * r['spread']:.0f}%",
                     _fmt_ratio(r["ratio_keras_sgd"]), _fmt_ratio(r["ratio_keras_adam"]),
                     str(r["bytes_per_param"]), f"{r['gbps']:.1f}",
                     f"{100 * r['fraction_of_copy']:.0f}%", f"{r['cpu_cores']:.2f}"])
    return header, body


def _memory_table(results):
    memory = results["memory"]
    header = ["update", "extra MiB", "x variable", "RSS growth in warmup, MiB"]
    body = []
    for c in memory["cases"]:
        body.append([c["label"], f"{c['extra_mib']:.1f}", f"{c['extra_fraction']:.3f}x",
                     f"{c['warmup_growth_mib']:.1f}"])
    return header, body


def _format_text(results):
    m, cfg = results["machine"], results["config"]
    lines = ["tf_bf16 benchmark: one optimizer update of a bfloat16 variable",
             f"machine: {common.machine_line(m)}",
             f"         {m['os']}; TF intra-op threads {m['intra_op_threads']}, inter-op "
             f"{m['inter_op_threads']}; oneDNN {m['tf_enable_onednn_opts']}; op library "
             f"built with {' '.join(m['op_library_flags']) or '?'}",
             f"params: {cfg['params']:,} ({_mib(cfg['params'] * 2)} MiB per bf16 tensor); "
             f"median of {cfg['repeats']} interleaved rounds after {cfg['warmup']} warmup; "
             f"lr {LEARNING_RATE}, momentum {MOMENTUM}",
             f"timing: {cfg['timing']}; empty-call round trip "
             f"{results['call_overhead_ms']:.3f} ms (included in every row)"]
    bg = results["background"]
    if bg.get("other_cores") is not None:
        note = (f"other processes used {bg['other_cores']:.2f} of "
                f"{m['usable_cpus']} cores on average while rows were timed")
        if bg["other_cores"] > 0.25:
            note += " -- WARNING: the machine was busy; times are inflated and noisy"
        lines.append("load: " + note)
    lines.append("")
    header, body = _timing_table(results)
    lines.append(common.text_table(header, body))
    lines.append("B/param: bytes the update must read + write per parameter; eff. GB/s = "
                 "B/param x params / median time; cores = process CPU time / wall time.")
    cc = results["copy_check"]
    lines.append(
        f"copy check: {cc['op']} of {_mib(cc['bytes_copied'])} MiB: {cc['full_ms']:.2f} ms, of "
        f"twice the bytes {cc['double_ms']:.2f} ms (x{cc['double_over_full']:.2f}: "
        + ("time scales with bytes" if cc["scales_with_size"] else
           "WARNING: time does not scale with bytes")
        + f"), copy equals source: {'yes' if cc['values_equal'] else 'NO'}, "
        f"{cc['cpu_cores']:.2f} cores busy; tf.Variable.assign of the same buffer takes "
        f"{cc['assign_ms']:.3f} ms (adopts the buffer: no copy, not used)")
    if results.get("memory") is not None:
        mem = results["memory"]
        lines += ["",
                  f"peak extra memory of one update, {mem['params']:,} params "
                  f"({_mib(mem['params'] * 2)} MiB per bf16 variable), fresh subprocess "
                  f"each ({mem['allocator']}): extra = VmHWM - VmRSS before the update",
                  common.text_table(*_memory_table(results), left=(0,))]
        if not all(c["hwm_reset_ok"] for c in mem["cases"]):
            lines.append("WARNING: resetting VmHWM via /proc/self/clear_refs did not work; "
                         "the extra memory is overestimated.")
    lines += common.verdict_lines(results)
    return "\n".join(lines)


def _format_markdown(results):
    m, cfg = results["machine"], results["config"]
    out = ["### Update time: one step of a bfloat16 variable", "",
           f"{cfg['params']:,} parameters, bfloat16 weights, slots and gradient; median of "
           f"{cfg['repeats']} interleaved rounds, one update per `tf.function` call "
           f"(synchronized by reading back a scalar). Machine: {common.machine_line(m)}.", ""]
    header, body = _timing_table(results)
    out.append(common.markdown_table(header, body))
    out += ["", "B/param: bytes the update must read + write per parameter. Effective GB/s = "
                "B/param x params / median time. Copy: `tf.raw_ops.DeepCopy` of 5 B/param "
                "(reads 5 + writes 5). Cores: process CPU time / wall time."]
    bg = results["background"]
    if bg.get("other_cores") is not None:
        out.append(f"Other processes used {bg['other_cores']:.2f} of {m['usable_cpus']} cores "
                   "on average while the rows were timed.")
    out.append("")
    if results.get("memory") is not None:
        mem = results["memory"]
        out += [f"### Peak extra memory of one update ({mem['params']:,} parameters, "
                f"{_mib(mem['params'] * 2)} MiB per variable)", "",
                common.markdown_table(*_memory_table(results), left=(0,)), "",
                "Fresh subprocess per case (`TF_ENABLE_ONEDNN_OPTS=0`, so that freed "
                "temporaries go back to the OS instead of oneDNN's BFC pool); extra = VmHWM - "
                "VmRSS before the update, after one warmup update and a VmHWM reset.", ""]
    out += ["### Targets", ""]
    for t in results["targets"]:
        aim = f"; {t['aim']}" if t.get("aim") else ""
        out.append(f"- **{t['status']}** {t['target']}: {t['value']} "
                   f"(target {t['threshold']}{aim})")
    out.append("")
    return "\n".join(out)
