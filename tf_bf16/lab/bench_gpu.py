"""``python -m tf_bf16 bench-gpu --backend jax``: speed and memory of pure-bf16
training on a GPU, against Keras's ``mixed_bfloat16`` and float32, measured in
the same run.

For GPUs without TensorFlow (the H200 machine: JAX, no TensorFlow); it runs on
JAX's CPU backend too, at ``--tiny`` sizes, which is what the tests do. The
TensorFlow backend's benchmarks are ``bench`` and ``bench-fit``. Every
measurement runs in its own process (tf_bf16/lab/bench_gpu_worker.py), so a
variant's peak device memory is its own; this process never touches the
device. Three parts (``--parts``), run in the order that loses least to a short
``--max-minutes``: the update; the fit steps of mixed_bfloat16, SR and Kahan;
the capacity; the fit steps of the other variants (float32, nearest); the
probes above the largest model.

1. ``update``: the optimizer update alone on ``--update-parameters`` bf16
   parameters (2**28 = 268M): ``tf_bf16.jax_ops.apply_sgd`` (momentum 0.9) and
   ``apply_adam``, nearest / SR / Kahan, jitted with donated buffers, and a
   mixed-precision Adam step (float32 weights, moments and gradient, and the
   bf16 copy) for reference; each against a device copy of the same bytes (a
   donated XOR with a run-time zero: every byte read and written once), timed
   in the same process. Time: ``--update-calls`` chained calls, blocked at the
   end, per call; median of ``--update-repeats``. Effective bandwidth = bytes
   each tensor is read + written once / time. Targets: SR and Kahan updates at
   least 95% of the copy's bandwidth; SR at most 1.02x nearest.
2. ``fit``: ``model.fit`` on the GPT-style char model of transformer_lm at
   ~400M parameters (dim 2048, 8 blocks of 16 heads, feed-forward 8192,
   sequence 512, batch 16: 404M) with Adam, one process per variant (``--variants``:
   mixed_bfloat16 and float32 with stock Keras Adam, bf16 nearest / SR / Kahan
   with tf_bf16's Adam), on windows of the task's text (its characters repeat
   as text's do, which the Embedding gradient's cost depends on; uniform
   random ids where the corpus is missing). After a compiling round, ``--rounds`` fit calls of
   ``--steps`` + 1 batches; each round's time runs from the start of its
   second batch (after waiting for the first) to the end of the call, blocked
   on the weights, over ``--steps``: steps dispatch asynchronously, as in any
   fit. Median over rounds. Peak device memory: JAX's ``peak_bytes_in_use``
   of the process. Targets: SR and Kahan at most 0.95x mixed_bfloat16's step
   time and 0.65x its peak memory.
3. ``capacity``: the largest model that trains, by depth at a fixed width
   (``--capacity-width``, 8192: 805M parameters per block; wide and shallow
   so that the compilations stay short). One process compiles the train step
   (``jax.jit(model.train_step).lower(...).compile().memory_analysis()``, no
   step run) of every variant at two depths (``--capacity-depths``); their
   difference gives the bytes per block, and (arguments + outputs not aliased
   + temporaries) at depth d is extrapolated linearly to the deepest model
   that leaves ``--margin`` of the device's memory limit (JAX's
   ``bytes_limit``, or ``--memory-limit``) free. Then one process per variant
   trains that depth ``--confirm-steps`` steps; if it runs out of memory, one
   block less. With time left at the end, depth + 1 is tried too (expected
   not to fit). Target: SR and Kahan fit at least 1.5x the parameters of
   mixed_bfloat16.

``--max-minutes`` bounds the whole run: a process that would start too late is
skipped and its targets are SKIPPED, never PASS. ``--check`` makes a MISS fail.
"""

import json
import math
import os
import subprocess
import sys
import tempfile
import time

from tf_bf16.lab import common

SUMMARY = ("GPU benchmark on Keras's JAX backend: fit step, largest model, update alone vs "
           "copy; mixed_bfloat16 and float32 in the same run")

DESCRIPTION = """\
Speed and memory of pure-bf16 training with tf_bf16 on Keras's JAX backend,
against Keras's mixed_bfloat16 (stock Keras Adam) and float32 measured in the
same run, every measurement in its own process (its peak memory its own):

  update    the optimizer update alone on 268M bf16 parameters (tf_bf16.jax_ops,
            jitted, donated buffers) vs a device copy of the same bytes:
            SR and Kahan >= 95% of the copy's bandwidth, SR <= 1.02x nearest;
  fit       model.fit step of the GPT-style char model at 404M parameters
            (sequence 512, batch 16, Adam; the task's text): float32, mixed_bfloat16, bf16
            nearest / SR / Kahan; SR and Kahan <= 0.95x mixed's median step
            time and <= 0.65x its peak device memory;
  capacity  the deepest model of width 8192 that trains: compiled memory at two
            depths, extrapolated to the device's limit, then confirmed by
            training it; SR and Kahan >= 1.5x mixed's parameters.

Made for a GPU (the H200: tools/h200/bench_jax.sh runs it); runs on JAX's CPU
backend at --tiny sizes (capacity then needs --memory-limit). Progress lines
with timestamps go to stderr, the tables and the verdict to stdout. Where
TensorFlow is not installed, set KERAS_BACKEND=jax. The module docstring of
tf_bf16/lab/bench_gpu.py documents the method.

Examples:
  KERAS_BACKEND=jax python -m tf_bf16 bench-gpu --backend jax --json bench_gpu.json
  python -m tf_bf16 bench-gpu --backend jax --tiny --memory-limit 0.01
"""

FIT_VARIANTS = ("mixed_bfloat16", "stochastic", "kahan", "nearest", "float32")
CAPACITY_VARIANTS = ("mixed_bfloat16", "stochastic", "kahan")
PARTS = ("update", "fit", "capacity")
BASELINE = "mixed_bfloat16"
TARGET_VARIANTS = ("stochastic", "kahan")

FIT_SPEC = dict(seq_len=512, dim=2048, heads=16, ff_dim=8192, layers=8, batch_size=16)
CAPACITY_SPEC = dict(seq_len=512, dim=8192, heads=64, ff_dim=32768, batch_size=16)
TINY_FIT_SPEC = dict(seq_len=64, dim=64, heads=4, ff_dim=256, layers=2, batch_size=4)
TINY_CAPACITY_SPEC = dict(seq_len=64, dim=64, heads=4, ff_dim=256, batch_size=4)
UPDATE_PARAMETERS = 2**28
TINY_UPDATE_PARAMETERS = 2**20

# Targets (issue 11).
MAX_STEP_RATIO = 0.95
MAX_MEMORY_RATIO = 0.65
MIN_CAPACITY_RATIO = 1.5
MIN_FRACTION_OF_COPY = 0.95
MAX_SR_OVER_NEAREST = 1.02

# Each job's own time limit (seconds), besides --max-minutes.
JOB_LIMITS = {"update": 150, "fit": 180, "analyze": 240, "confirm": 200}
# A job is not started with less than this many seconds left.
MIN_JOB_SECONDS = 20
LABELS = {"float32": "float32 (stock Keras Adam)",
          "mixed_bfloat16": "mixed_bfloat16 (stock Keras Adam)",
          "nearest": "bf16 nearest (tf_bf16 Adam)", "stochastic": "bf16 SR (tf_bf16 Adam)",
          "kahan": "bf16 Kahan (tf_bf16 Adam)"}


# ---------------------------------------------------------------------------
# Command line.

def _list_of(allowed):
    import argparse

    def parse(text):
        names = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in names if x not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(bad) or '(none)'}; choose from {', '.join(allowed)}")
        return names
    return parse


def _depths(text):
    import argparse

    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not two integers: {text!r}")
    if len(values) != 2 or not 1 <= values[0] < values[1]:
        raise argparse.ArgumentTypeError("two depths D1,D2 with 1 <= D1 < D2")
    return values


def add_arguments(parser):
    """Adds the bench-gpu options to an argparse parser."""
    parser.add_argument(
        "--backend", choices=("jax",), required=True,
        help="the Keras backend: jax (the only one: it is what GPUs without TensorFlow, "
             "such as the H200, run; on TensorFlow use bench and bench-fit)")
    parser.add_argument(
        "--parts", type=_list_of(PARTS), default=list(PARTS), metavar="LIST",
        help=f"what to measure, in this order: {','.join(PARTS)} (default all)")
    parser.add_argument(
        "--tiny", action="store_true",
        help="seconds-sized models and arrays (what the tests run on JAX's CPU backend): fit "
             "and capacity dim 64, 4 heads, feed-forward 256, sequence 64, batch 4 (fit: 2 "
             f"blocks); update {TINY_UPDATE_PARAMETERS:,} parameters")
    parser.add_argument(
        "--variants", type=_list_of(FIT_VARIANTS), default=list(FIT_VARIANTS), metavar="LIST",
        help=f"fit: the variants, in the order run (default {','.join(FIT_VARIANTS)}); "
             "mixed_bfloat16 is the baseline of the targets")
    parser.add_argument(
        "--fit-width", type=common.positive_int, metavar="W",
        help=f"fit: the model's dim (default {FIT_SPEC['dim']}; heads dim/128, feed-forward "
             "4 x dim)")
    parser.add_argument(
        "--fit-layers", type=common.positive_int, metavar="L",
        help=f"fit: the number of blocks (default {FIT_SPEC['layers']})")
    parser.add_argument(
        "--steps", type=common.positive_int, default=10, metavar="N",
        help="fit: timed steps per round (default 10)")
    parser.add_argument(
        "--rounds", type=common.positive_int, default=5, metavar="R",
        help="fit: timed rounds after the compiling one; the step time is the median "
             "over rounds (default 5)")
    parser.add_argument(
        "--capacity-variants", type=_list_of(FIT_VARIANTS), default=list(CAPACITY_VARIANTS),
        metavar="LIST", help=f"capacity: the variants (default {','.join(CAPACITY_VARIANTS)})")
    parser.add_argument(
        "--capacity-width", type=common.positive_int, metavar="W",
        help=f"capacity: the fixed width (default {CAPACITY_SPEC['dim']}; heads dim/128, "
             "feed-forward 4 x dim)")
    parser.add_argument(
        "--capacity-depths", type=_depths, default=[1, 2], metavar="D1,D2",
        help="capacity: the two depths whose compiled memory is extrapolated (default 1,2)")
    parser.add_argument(
        "--memory-limit", type=common.positive_float, metavar="GIB",
        help="capacity: the memory to fill, in GiB, instead of the device's limit (JAX's "
             "bytes_limit; needed on a CPU, which has none)")
    parser.add_argument(
        "--margin", type=float, default=0.05, metavar="F",
        help="capacity: the share of the memory limit left free by the prediction "
             "(default 0.05)")
    parser.add_argument(
        "--confirm-steps", type=common.positive_int, default=3, metavar="N",
        help="capacity: steps trained at the predicted depth (default 3)")
    parser.add_argument(
        "--update-parameters", type=common.positive_int, metavar="N",
        help=f"update: parameters (default {UPDATE_PARAMETERS:,} = 2**28)")
    parser.add_argument(
        "--update-calls", type=common.positive_int, default=10, metavar="K",
        help="update: chained calls per timing (default 10)")
    parser.add_argument(
        "--update-repeats", type=common.positive_int, default=10, metavar="R",
        help="update: timings per row; the median is reported (default 10)")
    parser.add_argument(
        "--memory-fraction", type=float, default=0.95, metavar="F",
        help="XLA_PYTHON_CLIENT_MEM_FRACTION of the measuring processes: the share of the "
             "GPU's memory JAX may use (default 0.95; JAX's own default is 0.75); an "
             "XLA_PYTHON_CLIENT_MEM_FRACTION already set wins")
    parser.add_argument(
        "--max-minutes", type=common.positive_float, metavar="M",
        help="stop starting measurements after M minutes (and stop a running one at M); "
             "what is not measured is SKIPPED")
    parser.add_argument(
        "--json", metavar="PATH", help="also write all results as JSON to PATH")
    parser.add_argument(
        "--markdown", metavar="PATH",
        help="also write the tables as Markdown (for docs/bench_gpu.md) to PATH")
    parser.add_argument("--check", action="store_true", help=common.CHECK_HELP)


# ---------------------------------------------------------------------------
# Jobs (one process each).

class _Clock:
    def __init__(self, max_minutes):
        self.deadline = None if not max_minutes else time.time() + 60.0 * max_minutes

    def left(self):
        return math.inf if self.deadline is None else self.deadline - time.time()


def _run_job(job, clock, env):
    """(result, None) or (None, why not): the job in its own process."""
    from tf_bf16.lab import jax_runner

    left = clock.left()
    if left < MIN_JOB_SECONDS:
        return None, f"not run: {max(0, left):.0f} s left of --max-minutes"
    timeout = min(JOB_LIMITS[job["kind"]], left)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
        path = f.name
    try:
        proc = subprocess.run([sys.executable, "-m", "tf_bf16.lab.bench_gpu_worker", path],
                              env=jax_runner.worker_env(env), stdout=subprocess.PIPE,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"stopped after {timeout:.0f} s (its time limit)"
    finally:
        os.remove(path)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if not lines:
        return None, f"its process exited with status {proc.returncode} and no result"
    result = json.loads(lines[-1][len("RESULT "):])
    if "error" in result:
        return None, result["error"]
    return result, None


def _spec(args, base, width_option):
    spec = dict(base)
    if width_option:
        spec.update(dim=width_option, heads=max(1, width_option // 128),
                    ff_dim=4 * width_option)
    return spec


def _fit_part(args, clock, env, results, variants):
    spec = _spec(args, TINY_FIT_SPEC if args.tiny else FIT_SPEC, args.fit_width)
    if args.fit_layers:
        spec["layers"] = args.fit_layers
    part = results.setdefault("fit", {"spec": spec, "steps": args.steps, "rounds": args.rounds,
                                      "rows": {}, "skipped": {}})
    for variant in variants:
        common.log(f"fit: {variant}")
        result, why = _run_job({"kind": "fit", "variant": variant, "spec": spec,
                                "steps": args.steps, "rounds": args.rounds}, clock, env)
        if result is None:
            part["skipped"][variant] = why
            common.log(f"fit: {variant}: {why}")
            continue
        results.setdefault("machine", result.pop("machine"))
        result.pop("machine", None)
        part["rows"][variant] = result
    base = part["rows"].get(BASELINE)
    for variant, row in part["rows"].items():
        row["step_ratio"] = None if base is None else row["median_ms"] / base["median_ms"]
        row["memory_ratio"] = (None if base is None or not row["peak_bytes"]
                               or not base["peak_bytes"]
                               else row["peak_bytes"] / base["peak_bytes"])


def predict_depth(memory, limit, margin):
    """(depth, bytes per block, bytes at depth 0) from two compiled depths: the
    deepest model whose extrapolated bytes leave `margin` of `limit` free."""
    (a, b) = memory[0], memory[1]
    per_block = (b["total_bytes"] - a["total_bytes"]) / (b["depth"] - a["depth"])
    base = a["total_bytes"] - a["depth"] * per_block
    usable = limit * (1.0 - margin)
    if per_block <= 0:
        return None, per_block, base
    return int(math.floor((usable - base) / per_block)), per_block, base


def _capacity_part(args, clock, env, results):
    from tf_bf16.lab.tasks import transformer_lm

    spec = _spec(args, TINY_CAPACITY_SPEC if args.tiny else CAPACITY_SPEC, args.capacity_width)
    part = {"spec": spec, "depths": args.capacity_depths, "margin": args.margin,
            "rows": {}, "skipped": {}}
    results["capacity"] = part
    common.log(f"capacity: compiling {', '.join(args.capacity_variants)} at depths "
               f"{args.capacity_depths}")
    analysis, why = _run_job({"kind": "analyze", "variants": args.capacity_variants,
                              "spec": spec, "depths": args.capacity_depths}, clock, env)
    if analysis is None:
        part["skipped"] = {v: f"compiled-memory analysis {why}" for v in args.capacity_variants}
        common.log(f"capacity: analysis {why}")
        return
    results.setdefault("machine", analysis.pop("machine"))
    limit = (args.memory_limit * 2**30 if args.memory_limit else analysis["bytes_limit"])
    part["limit_bytes"] = limit
    part["limit_source"] = "--memory-limit" if args.memory_limit else "JAX bytes_limit"
    if not limit:
        part["skipped"] = {v: "no device memory limit (a CPU): pass --memory-limit"
                           for v in args.capacity_variants}
        return
    for variant in args.capacity_variants:
        memory = analysis["variants"][variant]
        depth, per_block, base = predict_depth(memory, limit, args.margin)
        row = {"compiled": memory, "bytes_per_block": per_block, "base_bytes": base,
               "predicted_depth": depth}
        part["rows"][variant] = row
        if depth is None or depth < 1:
            row["confirmed_depth"] = None
            row["note"] = "not even one block fits"
            continue
        row["predicted_bytes"] = base + depth * per_block
        row["predicted_parameters"] = transformer_lm.parameter_count(**dict(spec, layers=depth))
    for variant, row in part["rows"].items():
        depth = row["predicted_depth"]
        if not depth or depth < 1:
            continue
        row["runs"] = []
        for attempt in (depth, depth - 1):
            if attempt < 1:
                break
            common.log(f"capacity: {variant} at depth {attempt}")
            result, why = _run_job({"kind": "confirm", "variant": variant, "spec": spec,
                                    "depth": attempt, "steps": args.confirm_steps}, clock, env)
            if result is None:
                part["skipped"][variant] = f"depth {attempt}: {why}"
                break
            result.pop("machine", None)
            row["runs"].append(result)
            if result["fits"]:
                row["confirmed_depth"] = attempt
                row["confirmed_parameters"] = result["parameters"]
                row["peak_bytes"] = result["peak_bytes"]
                break
    base = part["rows"].get(BASELINE, {}).get("confirmed_parameters")
    for row in part["rows"].values():
        params = row.get("confirmed_parameters")
        row["ratio"] = None if not base or not params else params / base


def _probe_above(args, clock, env, results):
    """With time left: depth + 1 of each confirmed variant (expected not to fit)."""
    part = results.get("capacity") or {}
    for variant, row in part.get("rows", {}).items():
        depth = row.get("confirmed_depth")
        if not depth:
            continue
        needed = max(r["wall_s"] for r in row["runs"]) * 1.3 + MIN_JOB_SECONDS
        if clock.left() < needed:
            row["above"] = {"skipped": f"not run: {clock.left():.0f} s left, ~{needed:.0f} "
                                       "needed"}
            continue
        common.log(f"capacity: {variant} at depth {depth + 1} (expected not to fit)")
        result, why = _run_job({"kind": "confirm", "variant": variant,
                                "spec": part["spec"], "depth": depth + 1,
                                "steps": args.confirm_steps}, clock, env)
        if result is not None:
            result.pop("machine", None)
        row["above"] = result if result is not None else {"skipped": why}


def _update_part(args, clock, env, results):
    n = args.update_parameters or (TINY_UPDATE_PARAMETERS if args.tiny else UPDATE_PARAMETERS)
    common.log(f"update: {n:,} parameters")
    result, why = _run_job({"kind": "update", "parameters": n, "calls": args.update_calls,
                            "repeats": args.update_repeats}, clock, env)
    if result is None:
        results["update"] = {"parameters": n, "skipped": why, "rows": []}
        common.log(f"update: {why}")
        return
    results.setdefault("machine", result.pop("machine"))
    by_key = {r["key"]: r for r in result["rows"]}
    for r in result["rows"]:
        nearest = by_key.get(f"{r['optimizer']}_nearest")
        r["vs_nearest"] = (None if nearest is None or r["rounding"] in (None, "nearest")
                           else r["median_ms"] / nearest["median_ms"])
    results["update"] = result


# ---------------------------------------------------------------------------
# Run.

def run(args):
    """Runs the benchmark; prints the results; returns the exit status."""
    started = time.perf_counter()
    clock = _Clock(args.max_minutes)
    env = {}
    if "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ:
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = str(args.memory_fraction)
    results = {"config": {"parts": args.parts, "tiny": bool(args.tiny),
                          "max_minutes": args.max_minutes,
                          "update_calls": args.update_calls,
                          "update_repeats": args.update_repeats,
                          "memory_fraction": env.get(
                              "XLA_PYTHON_CLIENT_MEM_FRACTION",
                              os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")),
                          "xla_flags": os.environ.get("XLA_FLAGS", ""),
                          "command": "python -m tf_bf16 bench-gpu " + " ".join(
                              getattr(args, "argv", [])[1:])}}
    # What the targets need first, then the context (float32, nearest), then the
    # probes above the largest model, so that a short --max-minutes loses the least.
    first = [v for v in args.variants if v in (BASELINE,) + TARGET_VARIANTS]
    if "update" in args.parts:
        _update_part(args, clock, env, results)
    if "fit" in args.parts:
        _fit_part(args, clock, env, results, first)
    if "capacity" in args.parts:
        _capacity_part(args, clock, env, results)
    if "fit" in args.parts:
        _fit_part(args, clock, env, results, [v for v in args.variants if v not in first])
    if "capacity" in args.parts:
        _probe_above(args, clock, env, results)
    from tf_bf16.lab import bench_gpu_report

    results["targets"] = verdict(results)
    results["elapsed_s"] = time.perf_counter() - started
    common.write_results(results, args, bench_gpu_report.format_text,
                         bench_gpu_report.format_markdown)
    return common.verdict_exit_status(results["targets"], args.check)


# ---------------------------------------------------------------------------
# Verdict.

def _count(n):
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n:,}"


def _target(name, value, threshold, ok, skipped=None):
    if skipped is not None:
        return {"target": name, "value": skipped, "threshold": threshold,
                "status": "SKIPPED"}
    return {"target": name, "value": value, "threshold": threshold, "status": common.status(ok)}


def verdict(results):
    targets = []
    update = results.get("update")
    if update is not None:
        by_key = {r["key"]: r for r in update["rows"]}
        for optimizer, name in (("sgd", "SGD-momentum"), ("adam", "Adam")):
            for rounding, label in (("stochastic", "SR"), ("kahan", "Kahan")):
                r = by_key.get(f"{optimizer}_{rounding}")
                targets.append(_target(
                    f"update alone: {name} {label} >= {MIN_FRACTION_OF_COPY:.0%} of a copy's "
                    "bandwidth",
                    r and f"{r['fraction_of_copy']:.1%} ({r['effective_gb_s']:.0f} vs "
                          f"{r['copy_gb_s']:.0f} GB/s)",
                    f">= {MIN_FRACTION_OF_COPY:.0%}",
                    r is not None and r["fraction_of_copy"] >= MIN_FRACTION_OF_COPY,
                    None if r is not None else update.get("skipped", "not measured")))
            r = by_key.get(f"{optimizer}_stochastic")
            ok = r is not None and r["vs_nearest"] is not None
            targets.append(_target(
                f"update alone: {name} SR <= {MAX_SR_OVER_NEAREST:.2f}x nearest",
                ok and f"{r['vs_nearest']:.3f}x ({r['median_ms']:.3f} ms)",
                f"<= {MAX_SR_OVER_NEAREST:.2f}x (1.00x: as fast)",
                ok and r["vs_nearest"] <= MAX_SR_OVER_NEAREST,
                None if ok else update.get("skipped", "not measured")))
    fit = results.get("fit")
    if fit is not None:
        base = fit["rows"].get(BASELINE)
        for variant in ("stochastic", "kahan"):
            r = fit["rows"].get(variant)
            missing = (fit["skipped"].get(variant) if r is None else
                       f"no {BASELINE} baseline" if base is None else None)
            if r is None and missing is None:
                missing = "not in --variants"
            targets.append(_target(
                f"fit step: {LABELS[variant]} <= {MAX_STEP_RATIO:.2f}x mixed_bfloat16",
                missing is None and f"{r['step_ratio']:.3f}x ({r['median_ms']:.2f} vs "
                                    f"{base['median_ms']:.2f} ms)",
                f"<= {MAX_STEP_RATIO:.2f}x", missing is None and r["step_ratio"] <= MAX_STEP_RATIO,
                missing))
            no_memory = missing or (None if r["memory_ratio"] is not None else
                                    "no device memory statistics (a CPU)")
            targets.append(_target(
                f"fit peak memory: {LABELS[variant]} <= {MAX_MEMORY_RATIO:.2f}x mixed_bfloat16",
                no_memory is None and f"{r['memory_ratio']:.3f}x ({r['peak_bytes'] / 2**30:.2f} "
                                      f"vs {base['peak_bytes'] / 2**30:.2f} GiB)",
                f"<= {MAX_MEMORY_RATIO:.2f}x",
                no_memory is None and r["memory_ratio"] <= MAX_MEMORY_RATIO, no_memory))
    capacity = results.get("capacity")
    if capacity is not None:
        base = capacity["rows"].get(BASELINE, {})
        for variant in ("stochastic", "kahan"):
            row = capacity["rows"].get(variant)
            why = None
            if row is None:
                why = capacity["skipped"].get(variant) or "not in --capacity-variants"
            elif not base.get("confirmed_parameters"):
                why = ("mixed_bfloat16's largest model was not confirmed: "
                       + str(capacity["skipped"].get(BASELINE, "see the table")))
            elif not row.get("confirmed_parameters"):
                why = None  # measured, not confirmed: a MISS
            targets.append(_target(
                f"capacity: {LABELS[variant]} trains >= {MIN_CAPACITY_RATIO:.1f}x the "
                "parameters of mixed_bfloat16",
                why is None and (f"{row['ratio']:.2f}x ({_count(row['confirmed_parameters'])} "
                                 f"vs {_count(base['confirmed_parameters'])} parameters)"
                                 if row.get("ratio") else "not confirmed"),
                f">= {MIN_CAPACITY_RATIO:.1f}x",
                why is None and bool(row.get("ratio")) and row["ratio"] >= MIN_CAPACITY_RATIO,
                why))
    return targets
