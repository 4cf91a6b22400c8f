"""``compare`` and ``results`` on Keras's JAX backend (``--backend jax``): one
process per variant, runs split into resumable pieces.

For GPU-scale runs (the lent H200 has JAX and no TensorFlow) and any machine
with JAX; the TensorFlow backend's runner is tf_bf16/lab/runner.py, whose
policies, optimizers, failure messages and result fields this one shares.
Imports no TensorFlow, and the parent process never touches a JAX device: on
a GPU each variant's process has the device to itself, so its memory figures
are its own.

The parent (``run_task``) writes ``<work dir>/<task>_seed<seed>/run.json``
(task, seed, training configuration, command) and starts, for each variant in
turn, ``python -m tf_bf16.lab.jax_worker RUN_DIR VARIANT`` with
``KERAS_BACKEND=jax`` (tf_bf16/lab/jax_worker.py). The worker builds the
task's float32 model after
``keras.utils.set_random_seed(seed)`` (the same initial weights in every
process; each result records their SHA-256 and the parent checks that they
agree), sets the variant's policy (``runner._set_policy``), builds the
variant's model with those weights and its optimizer (``runner.make_optimizer``;
a configuration's ``warmup_fraction`` becomes a ``keras.optimizers.schedules.
CosineDecay`` with linear warmup) and trains with ``model.fit``, one call per
segment. Segments end at the learning-curve points (``curve_points_per_epoch``
per epoch, evaluated with the task's metric) and where the last 10% of the
steps begin (the snapshot that counts the weights those steps still move).
Each segment starts with ``keras.utils.set_random_seed(seed * 1000 + epoch)``
and trains the examples of ``Task.make_arrays`` in order, so what a segment
does depends only on the state at its start.

Pieces: with a deadline (``--max-minutes``) the worker stops at a segment
boundary when the next segment would not end in time, saves every model and
optimizer variable (weights, moments, Kahan buffers, the iteration count that
keys the rounding's random bits, the learning rate), the curve so far and the
snapshot into ``<run dir>/<variant>/checkpoint.npz`` and ``progress.json``, and
exits with status ``PAUSED``; the parent then stops too. Run the same command
again with the same work directory (``--resume DIR`` repeats the command's
options): finished variants are not rerun, the paused one restores its state
and continues at the step where it stopped. The step a piece restarts at, the
data it reads and the random bits it draws are those of an unsplit run, so the
result is bit-identical (tests/lab/test_jax_runner.py checks it on the CPU;
``state_sha256`` in each result hashes every variable's final bits). On a GPU
it also needs XLA's kernels to be deterministic run to run, which they are for
this model's operations unless XLA autotuning picks different algorithms in
the two processes. ``--stop-at-step N`` ends a piece at step N (tests, manual
pieces). A variant whose process fails is reported with its error and the
others go on.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time

from tf_bf16.lab import common

# Exit status of a worker, and of `compare`/`results`, that stopped early with
# its state saved: run the command again (or --resume) to continue.
PAUSED = 3
# Seconds kept free before a deadline besides the next segment's predicted time,
# and the time a variant's process is assumed to need for its first segment
# (imports, building, compiling) before one has been measured.
DEADLINE_MARGIN_S = 15.0
DEFAULT_FIRST_SEGMENT_S = 60.0
# Seconds a worker may run past the deadline before the parent stops it.
KILL_GRACE_S = 40.0
# A conservative rate of saving a checkpoint (device to host, then disk).
SAVE_BYTES_PER_S = 200e6

_TRAINING_FIELDS = ("epochs", "learning_rate", "batch_size", "optimizer", "optimizer_kwargs",
                    "curve_points_per_epoch")


# ---------------------------------------------------------------------------
# Configuration (parent).

def training_config(task, args):
    """The JAX runner's configuration: ``runner.training_config`` of the task with
    its named configuration (``args.config``) applied, the command line's
    overrides last, and what the worker needs resolved: steps per epoch, the
    model sizes, the learning-rate schedule."""
    from tf_bf16.lab import runner

    named = task.configs.get(args.config, {}) if args.config else {}
    view = dataclasses.replace(task, **{k: named[k] for k in _TRAINING_FIELDS if k in named})
    cfg = runner.training_config(view, args)
    sizes = task.config(bool(args.reduced), args.config)
    steps = cfg["steps_per_epoch"] or sizes.get("steps")
    if not steps:
        raise ValueError(f"task {task.name} has no step count; pass --steps")
    cfg.update(reduced=bool(args.reduced), config=args.config, backend="jax",
               steps_per_epoch=int(steps),
               curve_points_per_epoch=int(view.curve_points_per_epoch or 1),
               sizes={k: v for k, v in sizes.items() if k != "description"},
               description=sizes.get("description"))
    # A named configuration's warmup and cosine decay keep their shape when the
    # command line changes the steps or the (peak) learning rate.
    fraction = named.get("warmup_fraction")
    if fraction:
        total = cfg["epochs"] * cfg["steps_per_epoch"]
        warmup = max(1, round(fraction * total))
        cfg["schedule"] = {"name": "warmup_cosine", "warmup_steps": warmup,
                           "decay_steps": max(1, total - warmup)}
    return cfg


def _schedule_config(cfg):
    """The optimizer configuration the worker passes to ``runner.make_optimizer``:
    a schedule object in place of the constant learning rate."""
    if not cfg.get("schedule"):
        return cfg
    import keras

    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0, decay_steps=cfg["schedule"]["decay_steps"], alpha=0.0,
        warmup_target=cfg["learning_rate"], warmup_steps=cfg["schedule"]["warmup_steps"])
    kwargs = dict(cfg.get("optimizer_kwargs") or {}, learning_rate=schedule)
    return dict(cfg, learning_rate=None, optimizer_kwargs=kwargs)


def segments(cfg):
    """(segment end steps, curve-point steps, late start): global step numbers."""
    per_epoch, epochs = cfg["steps_per_epoch"], cfg["epochs"]
    points = cfg["curve_points_per_epoch"]
    total = per_epoch * epochs
    every = per_epoch // points if points > 1 and per_epoch >= points else None
    curve = set()
    for epoch in range(epochs):
        base = epoch * per_epoch
        if every:
            curve.update(base + k * every for k in range(1, per_epoch // every + 1)
                         if k * every < per_epoch)
        curve.add(base + per_epoch)
    from tf_bf16.lab.runner import LATE_FRACTION

    late_start = total - max(1, round(LATE_FRACTION * total))
    ends = set(curve)
    if 0 < late_start < total:
        ends.add(late_start)
    return sorted(ends), sorted(curve), late_start


# ---------------------------------------------------------------------------
# The parent: one process per variant.

def _package_root():
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def worker_env(extra=None):
    """The environment of a JAX worker: Keras's JAX backend, this tf_bf16 first
    on the path, TensorFlow's logging quiet."""
    env = dict(os.environ)
    env["KERAS_BACKEND"] = "jax"
    env["PYTHONPATH"] = os.pathsep.join(
        [_package_root()] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path, obj):
    from tf_bf16.lab import report

    tmp = path + ".tmp"
    report.write_json(tmp, obj)
    os.replace(tmp, path)


def run_dir(work_dir, task_name, seed):
    return os.path.join(work_dir, f"{task_name}_seed{seed}")


def run_task(task, seed, variants, cfg, command, work_dir, deadline=None, stop_at_step=None):
    """Every variant of one task and seed, each in its own process.

    Returns ``(results, failed, paused)``: {variant: result} of the finished
    variants (earlier pieces' included), {variant: error message}, and the
    variant that stopped early (None when all ran)."""
    directory = run_dir(work_dir, task.name, seed)
    os.makedirs(directory, exist_ok=True)
    spec = {"task": task.name, "seed": seed, "cfg": cfg}
    existing = _read_json(os.path.join(directory, "run.json"))
    if existing is not None and {k: existing.get(k) for k in spec} != json.loads(
            json.dumps(spec)):
        raise ValueError(f"{directory} holds a run with another configuration; use another "
                         "work directory (or delete it) to start afresh")
    _write_json(os.path.join(directory, "run.json"), dict(spec, command=command))
    results, failed = {}, {}
    for variant in variants:
        variant_dir = os.path.join(directory, variant)
        done = _read_json(os.path.join(variant_dir, "result.json"))
        if done is not None:
            common.log(f"{task.name} seed {seed} {variant}: done in an earlier piece")
            results[variant] = done
            continue
        reserve = max([DEFAULT_FIRST_SEGMENT_S] + [
            r.get("first_segment_s", 0) for r in results.values()])
        if deadline is not None and time.time() + reserve > deadline:
            common.log(f"{task.name} seed {seed} {variant}: not started, less than "
                       f"{reserve:.0f} s left before the deadline")
            return results, failed, variant
        argv = [sys.executable, "-m", "tf_bf16.lab.jax_worker", directory, variant]
        if deadline is not None:
            argv += ["--deadline", f"{deadline:.3f}"]
        if stop_at_step is not None:
            argv += ["--stop-at-step", str(stop_at_step)]
        common.log(f"{task.name} seed {seed} {variant}: starting its process")
        started = time.perf_counter()
        timeout = None if deadline is None else max(1.0, deadline - time.time() + KILL_GRACE_S)
        try:
            code = subprocess.run(argv, env=worker_env(), stdout=sys.stderr,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            common.log(f"{task.name} seed {seed} {variant}: stopped at the deadline "
                       f"(+{KILL_GRACE_S:.0f} s) without saving; it restarts from its last "
                       "saved state")
            return results, failed, variant
        elapsed = time.perf_counter() - started
        if code == 0:
            results[variant] = _read_json(os.path.join(variant_dir, "result.json"))
            common.log(f"{task.name} seed {seed} {variant}: finished ({elapsed:.0f} s)")
        elif code == PAUSED:
            common.log(f"{task.name} seed {seed} {variant}: paused with its state saved "
                       f"({elapsed:.0f} s)")
            return results, failed, variant
        else:
            try:
                with open(os.path.join(variant_dir, "error.txt")) as f:
                    message = f.read().strip()
            except OSError:
                message = (f"its process exited with status {code} without an error report "
                           "(killed? out of memory?); its output is above")
            failed[variant] = message
            common.log(f"{task.name} seed {seed} {variant}: FAILED ({elapsed:.0f} s); "
                       "continuing with the other variants")
    return results, failed, None


def summary_of(task, seed, cfg, command, results, failed, elapsed_s):
    """The `compare` summary (as runner.compare_summary's) of a JAX run."""
    if "float32" in results:
        ref = results["float32"]["metric"]
        for r in results.values():
            r["gap_to_float32"] = r["metric"] - ref
    hashes = {r["initial_weights_sha256"] for r in results.values()}
    machine = next((r["machine"] for r in results.values()), None)
    return {
        "task": task.name, "summary": task.summary, "metric": task.metric,
        "higher_is_better": task.higher_is_better, "seed": seed, "config": cfg,
        "variants": results, "failed": failed, "elapsed_s": elapsed_s,
        "machine": machine or _host_info(), "command": command, "backend": "jax",
        "started": min((r["started"] for r in results.values() if r.get("started")),
                       default="-"),
        "same_initial_weights": len(hashes) <= 1,
    }


def _host_info():
    """Machine facts without JAX's device (when no variant finished)."""
    import importlib.metadata
    import platform

    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    return {"backend": "jax", "cpu": common._cpu_model(), "cpu_flags": common._cpu_flags(),
            "logical_cpus": os.cpu_count(), "usable_cpus": os.cpu_count(),
            "memory_bytes": common._memory_total(), "os": platform.platform(),
            "python": platform.python_version(), "jax": version("jax"),
            "keras": version("keras"), "device": "(no variant finished)",
            "device_platform": "?", "device_count": 0, "device_memory_bytes": None,
            "xla_flags": os.environ.get("XLA_FLAGS", "")}


# ---------------------------------------------------------------------------
# The commands: compare --backend jax, results --backend jax, --resume.

# Options of one piece, not part of the command that --resume repeats: its time
# limit, where it writes its outputs (another call may have another folder).
_PIECE_OPTIONS = {"--max-minutes": 1, "--stop-at-step": 1, "--resume": 1, "--work-dir": 1,
                  "--no-progress": 0, "--out": 1, "--json": 1, "--markdown": 1,
                  "--output": 1}
COMMAND_FILE = "command.json"


def _split_piece_options(argv):
    """(argv without the piece options, the piece options)."""
    kept, piece = [], []
    i = 0
    while i < len(argv):
        name = argv[i].split("=", 1)[0]
        if name in _PIECE_OPTIONS:
            takes = _PIECE_OPTIONS[name] if "=" not in argv[i] else 0
            piece += argv[i:i + 1 + takes]
            i += 1 + takes
        else:
            kept.append(argv[i])
            i += 1
    return kept, piece


def expand_resume(argv):
    """``compare|results --resume DIR [piece options]``: the command saved in
    DIR, with DIR as its work directory and this call's piece options."""
    if not argv or argv[0] not in ("compare", "results"):
        return argv
    kept, piece = _split_piece_options(argv[1:])
    directory = None
    rest = []
    i = 0
    while i < len(piece):
        if piece[i] == "--resume":
            directory = piece[i + 1] if i + 1 < len(piece) else None
            i += 2
            continue
        if piece[i].startswith("--resume="):
            directory = piece[i].split("=", 1)[1]
        elif piece[i] in ("--work-dir",) or piece[i].startswith("--work-dir="):
            i += 1 if "=" in piece[i] else 2
            continue
        else:
            rest.append(piece[i])
        i += 1
    if directory is None:
        return argv
    saved = _read_json(os.path.join(directory, COMMAND_FILE))
    if saved is None:
        raise SystemExit(f"--resume {directory}: no {COMMAND_FILE} there (the work directory "
                         f"of a '{argv[0]} --backend jax' run holds one)")
    if kept and kept != saved["argv"][1:]:
        raise SystemExit(f"--resume {directory} repeats the options saved there; give only "
                         "--max-minutes, --stop-at-step, --no-progress and the output options "
                         "(--out, --json, --markdown, --output) with it")
    return list(saved["argv"]) + rest + ["--work-dir", directory]


def _save_command(work_dir, argv):
    os.makedirs(work_dir, exist_ok=True)
    kept, _ = _split_piece_options(list(argv[1:]))
    _write_json(os.path.join(work_dir, COMMAND_FILE), {"argv": [argv[0]] + kept})


def _deadline(args):
    return None if not args.max_minutes else time.time() + 60.0 * args.max_minutes


def _check_task(task):
    """None if the JAX runner can train `task` here, else why not."""
    if "jax" not in task.backends:
        return (f"task {task.name} has not been ported to the JAX runner (it runs on Keras's "
                "TensorFlow backend: leave out --backend jax)")
    return task.available()


def _resume_hint(command_name, work_dir):
    return (f"paused: continue with  python -m tf_bf16 {command_name} --resume {work_dir} "
            "[--max-minutes M]")


def compare_command(args, variants, command):
    """`compare --backend jax`: returns the exit status (PAUSED when stopped early)."""
    import tempfile

    from tf_bf16.lab import report
    from tf_bf16.lab.tasks import get_task

    try:
        task = get_task(args.task)
    except KeyError as e:
        print(e.args[0], file=sys.stderr)
        return 2
    message = _check_task(task)
    if message:
        print(f"task {task.name} cannot run here: {message}", file=sys.stderr)
        return 2
    try:
        cfg = training_config(task, args)
    except (KeyError, ValueError) as e:
        print(e.args[0], file=sys.stderr)
        return 2
    work_dir = args.work_dir or (os.path.join(args.out, "work") if args.out
                                 else tempfile.mkdtemp(prefix="tf_bf16_jax_"))
    _save_command(work_dir, args.argv)
    common.log(f"compare --backend jax: {task.name}, {', '.join(variants)}; work directory "
               f"{work_dir}")
    try:
        results, failed, paused = run_task(task, args.seed, variants, cfg, command, work_dir,
                                           _deadline(args), args.stop_at_step)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    elapsed = sum(r["wall_s"] for r in results.values())
    summary = summary_of(task, args.seed, cfg, command, results, failed, elapsed)
    if paused is not None:
        summary["paused"] = paused
    if results:
        print(report.compare_text(task, summary), flush=True)
        files = report.write_compare(task, summary, out=args.out, json_path=args.json,
                                     markdown_path=args.markdown)
        if files:
            print("wrote " + ", ".join(files))
    if not summary["same_initial_weights"]:
        print("WARNING: the variants' processes built different initial weights "
              "(initial_weights_sha256 differs)", file=sys.stderr)
    for variant, text in failed.items():
        print(f"\nvariant {variant} failed:\n{text}", file=sys.stderr)
    if paused is not None:
        print(_resume_hint("compare", work_dir), file=sys.stderr)
        return PAUSED
    return 1 if failed else 0


def results_command(args, variants, command, all_tasks):
    """`results --backend jax`: every JAX task x seed; the GPU section of the report."""
    from tf_bf16.lab import report
    from tf_bf16.lab import report_gpu

    names = ([x.strip() for x in args.tasks.split(",") if x.strip()] if args.tasks
             else list(all_tasks))
    unknown = [n for n in names if n not in all_tasks]
    if unknown:
        print(f"unknown task(s): {', '.join(unknown)}; known: {', '.join(all_tasks)}",
              file=sys.stderr)
        return 2
    # Not under the report's folder: the saved states are no documentation.
    work_dir = args.work_dir or os.path.join("out", "jax_results_work")
    _save_command(work_dir, args.argv)
    deadline = _deadline(args)
    suite = {"backend": "jax", "tasks": {}, "unavailable": {}, "failed": {},
             "variants": variants, "seeds": args.seeds, "reduced": bool(args.reduced),
             "config": args.config, "command": command,
             "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    paused = None
    for name in names:
        task = all_tasks[name]
        message = _check_task(task)
        if message:
            suite["unavailable"][name] = message
            common.log(f"skipping {name}: {message}")
            continue
        try:
            cfg = training_config(task, args)
        except (KeyError, ValueError) as e:
            suite["unavailable"][name] = e.args[0]
            continue
        per_seed = []
        for seed in range(args.seeds):
            results, failed, paused = run_task(task, seed, variants, cfg, command, work_dir,
                                               deadline, args.stop_at_step)
            if failed:
                suite["failed"].setdefault(name, {}).update(
                    {f"{v} (seed {seed})": m for v, m in failed.items()})
            if paused is not None:
                break
            per_seed.append(summary_of(task, seed, cfg, command, results, failed, 0.0))
        if paused is not None:
            break
        trained = [v for v in variants if all(v in s["variants"] for s in per_seed)]
        if not trained:
            continue
        runs = [{v: s["variants"][v] for v in trained} for s in per_seed]
        suite["tasks"][name] = {
            "summary": task.summary, "metric": task.metric,
            "higher_is_better": task.higher_is_better,
            "paper_application": task.paper_application, "config": cfg,
            "variants": trained, "stats": report.summarize(task, runs, trained), "runs": runs,
            "elapsed_s": sum(r["wall_s"] for run in runs for r in run.values()),
        }
    if paused is not None:
        print(_resume_hint("results", work_dir), file=sys.stderr)
        return PAUSED
    machines = [r["machine"] for e in suite["tasks"].values() for run in e["runs"]
                for r in run.values()]
    suite["machine"] = machines[0] if machines else _host_info()
    suite["elapsed_s"] = sum(e["elapsed_s"] for e in suite["tasks"].values())
    status = report_gpu.write_report(suite, all_tasks, args.output)
    for name, failures in suite["failed"].items():
        for variant, text in failures.items():
            print(f"\n{name}: variant {variant} failed:\n{text}", file=sys.stderr)
    return status or (1 if suite["failed"] else 0)
