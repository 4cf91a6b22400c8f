"""What the tools of tf_bf16.lab share: option parsers, the check for the lab
extra's packages, the TensorFlow/Keras import, machine facts, tables, the
results writer, verdict lines and exit status, progress bars and timing calls.

For the commands (bench, bench_fit, cli) and the tasks; not for the library.
Importing it imports neither TensorFlow nor any package of the lab extra:
every such import is inside the function that needs it.
"""

import argparse
import importlib.util
import json
import math
import os
import platform
import sys
import time

# The extra that installs the tools' own dependencies (setup.py, extras_require).
LAB_INSTALL = 'pip install "tf_bf16[lab]"'
# Module name -> the distribution that provides it.
PACKAGES = {
    "tqdm": "tqdm",
    "matplotlib": "matplotlib",
    "sklearn": "scikit-learn",
    "tensorflow_datasets": "tensorflow-datasets",
}


# ---------------------------------------------------------------------------
# Dependencies of the lab extra.

def missing_packages(modules):
    """The distributions (pip names) of those of `modules` that cannot be imported.

    Looks the modules up without importing them (``importlib.util.find_spec``).
    """
    missing = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(PACKAGES.get(module, module))
    return missing


def requirement_problem(who, modules):
    """None when every module is importable, else a message for `who` (e.g. a
    command) naming the missing packages and how to install them."""
    missing = missing_packages(modules)
    if not missing:
        return None
    verb = "is" if len(missing) == 1 else "are"
    return (f"{who} needs {', '.join(missing)}, which {verb} not installed. The tools' "
            f"dependencies come with the lab extra: {LAB_INSTALL}")


def check_requirements(who, modules):
    """Prints the requirement problem to stderr and returns 2, or returns 0."""
    problem = requirement_problem(who, modules)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    return 0


# ---------------------------------------------------------------------------
# Command-line options.

def int_at_least(minimum):
    """An argparse type: an integer (decimal or 0x...) that is >= minimum."""
    def parse(text):
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


positive_int = int_at_least(1)


def positive_float(text):
    """An argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}")
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError("must be a finite number > 0")
    return value
non_negative_int = int_at_least(0)

CHECK_HELP = ("exit with status 1 when any target is MISS, after listing the missed targets "
              "on stderr (SKIPPED targets do not count); without --check the exit status is "
              "0 whatever the verdict")


# ---------------------------------------------------------------------------
# TensorFlow, Keras and the op library.

def import_tensorflow_keras(command):
    """(tf, keras), quiet, with Keras on its TensorFlow backend, which `command` needs."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import tensorflow as tf
    import keras

    if keras.backend.backend() != "tensorflow":
        raise SystemExit(f"{command} needs the TensorFlow Keras backend; KERAS_BACKEND "
                         f"is {keras.backend.backend()!r}.")
    return tf, keras


def load_op_library():
    """Runs one op now, so that a missing or stale op library fails here, with
    tf_bf16's message, before anything is timed or trained."""
    import tensorflow as tf
    from tf_bf16 import ops

    ops.stochastic_round(tf.zeros([1]), seed=0)


# ---------------------------------------------------------------------------
# Machine description.

def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
                            if x in flags]
    except OSError:
        pass
    return []


def _memory_total():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _op_library_build_info():
    """What setup.py recorded when it built the op library (tf_bf16/_build_info.json)."""
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        with open(os.path.join(package_dir, "_build_info.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _host_info():
    """The host's part of a results file's machine facts: CPU, cores, memory, OS, Python."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "memory_bytes": _memory_total(),
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def machine_info(tf, keras):
    """CPU, memory, versions, thread pools and op-library flags, for a results file."""
    flags = [x for x in _op_library_build_info().get("compile_flags", [])
             if x.startswith(("-O", "-m", "-ffp", "-march"))]
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on)")
    return {
        **_host_info(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or "default",
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads() or "default",
        "tf_enable_onednn_opts": onednn,
        "op_library_flags": flags,
        "loadavg_start": list(os.getloadavg()),
    }


def jax_machine_info():
    """`machine_info` of a JAX process: the host, JAX's device, the versions.

    Call it in a process that may use the device: it initializes JAX's backend
    (on a GPU, JAX then takes its share of the device's memory)."""
    import jax
    import keras

    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    return {
        "backend": "jax",
        **_host_info(),
        "jax": jax.__version__,
        "keras": keras.__version__,
        "device": device.device_kind,
        "device_platform": device.platform,
        "device_count": jax.device_count(),
        "device_memory_bytes": stats.get("bytes_limit"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "loadavg_start": list(os.getloadavg()),
    }


def machine_line(m):
    """One line of `machine_info` (or `jax_machine_info`): CPU, cores, memory,
    flags, the JAX device, versions."""
    mem = f", {m['memory_bytes'] / 2**30:.0f} GiB RAM" if m.get("memory_bytes") else ""
    if m.get("backend") == "jax":
        device_memory = (f", {m['device_memory_bytes'] / 2**30:.1f} GiB usable by JAX"
                         if m.get("device_memory_bytes") else "")
        flags = f", XLA_FLAGS={m['xla_flags']}" if m.get("xla_flags") else ""
        return (f"{m['device_count']} x {m['device']} ({m['device_platform']}"
                f"{device_memory}) on {m['cpu']} ({m['usable_cpus']} usable of "
                f"{m['logical_cpus']} logical CPUs{mem}), JAX {m['jax']}, Keras {m['keras']} "
                f"(JAX backend{flags}), Python {m['python']}")
    return (f"{m['cpu']} ({m['usable_cpus']} usable of {m['logical_cpus']} logical CPUs"
            f"{mem}; {' '.join(m['cpu_flags'])}), TensorFlow {m['tensorflow']}, "
            f"Keras {m['keras']}, Python {m['python']}")


def stamp():
    """The time of day for progress lines: [HH:MM:SS]."""
    return time.strftime("[%H:%M:%S]")


def log(message):
    """A timestamped progress line on stderr."""
    print(f"{stamp()} {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Tables and results.

def text_table(header, body, left=(1,)):
    """A plain-text table; columns in `left` are left-aligned, the others right."""
    widths = [max(len(x) for x in col) for col in zip(header, *body)]

    def line(cells):
        out = []
        for j, (cell, width) in enumerate(zip(cells, widths)):
            out.append(cell.ljust(width) if j in left else cell.rjust(width))
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule] + [line(b) for b in body])


def markdown_table(header, body, left=(1,)):
    """A Markdown table; columns in `left` are left-aligned, the others right."""
    align = ["---" if j in left else "---:" for j in range(len(header))]
    rows = [header, align] + body
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def write_results(results, args, format_text, format_markdown):
    """Prints the text report; writes --json and --markdown when asked."""
    print(format_text(results), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
            f.write("\n")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(format_markdown(results))


# ---------------------------------------------------------------------------
# Verdict: targets are dicts with "target", "value", "threshold", "status"
# ("PASS", "MISS" or "SKIPPED") and optionally "aim".

def status(ok):
    return "PASS" if ok else "MISS"


def missed_targets(targets):
    return [t for t in targets if t["status"] == "MISS"]


def verdict_lines(results):
    """The text report's verdict: one line per target, then the count of misses."""
    lines = ["", "verdict:"]
    for t in results["targets"]:
        aim = f"; {t['aim']}" if t.get("aim") else ""
        lines.append(f"  {t['status']:<7} {t['target']}: {t['value']} "
                     f"(target {t['threshold']}{aim})")
    missed = len(missed_targets(results["targets"]))
    lines.append(f"{missed} of {len(results['targets'])} targets missed; total run time "
                 f"{results['elapsed_s']:.0f} s")
    return lines


def verdict_exit_status(targets, check):
    """The exit status of a benchmark: 0, or 1 when `check` (the --check option)
    is set and a target was missed; then the missed targets go to stderr."""
    missed = missed_targets(targets)
    if not check or not missed:
        return 0
    print(f"--check: {len(missed)} of {len(targets)} targets missed:", file=sys.stderr)
    for t in missed:
        print(f"  MISS {t['target']}: {t['value']} (target {t['threshold']})", file=sys.stderr)
    return 1


# ---------------------------------------------------------------------------
# Progress and timing.

def progress(total, desc, disable, unit="call"):
    """A tqdm progress bar on stderr (tqdm comes with the lab extra)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=disable, leave=False,
                unit=unit, dynamic_ncols=True)


def probe(tf, variable):
    """A float32 scalar read from the variable after an update.

    Cast, so that the returned tensor never aliases the variable's buffer
    (a live alias would make the next in-place update copy the variable).
    """
    flat = tf.reshape(tf.convert_to_tensor(variable), [-1])
    return tf.cast(flat[0], tf.float32)


def timed_call(step):
    """Runs `step()` and reads its scalar result back to Python (which waits for
    it); returns (wall seconds, process CPU seconds)."""
    wall0 = time.perf_counter()
    cpu0 = time.process_time()
    out = step()
    float(out.numpy())
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    del out
    return wall, cpu


def cpu_counters():
    """(wall time, busy CPU seconds of the machine, CPU seconds of this process)."""
    busy = None
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal ...
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    times = os.times()
    return time.perf_counter(), busy, times.user + times.system


def background_load(before, after):
    """Average number of cores used by other processes between two `cpu_counters()`."""
    wall = after[0] - before[0]
    if before[1] is None or after[1] is None or wall <= 0:
        return {"other_cores": None, "own_cores": None, "seconds": wall}
    machine = after[1] - before[1]
    own = after[2] - before[2]
    return {"other_cores": max(0.0, (machine - own) / wall), "own_cores": own / wall,
            "seconds": wall, "loadavg_after": list(os.getloadavg())}
