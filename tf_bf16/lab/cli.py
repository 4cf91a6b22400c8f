"""``python -m tf_bf16 compare | list | results``: float32 vs bf16 roundings on real tasks.

The command line of the three commands: their options, help texts and run
functions. Training is tf_bf16/lab/runner.py, the outputs (tables, report,
plots) tf_bf16/lab/report.py, the tasks tf_bf16/lab/tasks/.

``compare --task NAME`` trains one task five ways (``runner.run_task``: the
same model, initial weights, data order and seed; see the runner's docstring)
and prints a table; ``--out`` writes results.json and results.md, then the
learning curves. ``results`` runs every available task x variant x seed and
writes ``docs/results.md`` with mean +- std over seeds and the learning
curves under ``docs/results/``; ``results --from-json`` re-renders them
without training. ``list`` shows the tasks and whether they can run here.

Importing this module imports neither TensorFlow nor the lab extra's
packages (``--help`` stays fast); the run functions check the extra's packages
before anything is trained.
"""

import argparse
import json
import math
import os
import sys
import time

from tf_bf16.lab import common
from tf_bf16.lab import report
from tf_bf16.lab import runner
from tf_bf16.lab.tasks.base import STOCK, VARIANTS

COMPARE_SUMMARY = ("train a task in float32, mixed_bfloat16 and pure bf16 (nearest, SR, Kahan); "
                   "table, curves, JSON")
LIST_SUMMARY = "list the tasks of 'compare' and whether they can run here"
RESULTS_SUMMARY = "run every task x variant x seed; write docs/results.md with mean +- std"

COMPARE_DESCRIPTION = """\
Trains one task five ways with the same model, initial weights, data order and
seed: float32 (Keras float32 policy, stock Keras optimizer), mixed_bfloat16
(Keras "mixed_bfloat16" policy: float32 weights and optimizer state, bf16
compute; stock Keras optimizer), nearest (Keras "bfloat16" policy, tf_bf16
optimizer with rounding="nearest", i.e. plain bf16 training), stochastic
(tf_bf16.set_policy() + stochastic rounding) and kahan (tf_bf16.set_policy() +
Kahan summation). Progress bars go to stderr; the table (final metric, gap to
float32, training-state bytes per parameter, wall time) goes to stdout; --out
DIR writes JSON and Markdown, then the learning curves (PNG).

Why "nearest" uses the tf_bf16 optimizer rather than stock Keras: stock Keras
Adam never moves a weight in pure bf16 (beta_2 = 0.999 rounds to 1.0), which
would hide the effect of rounding; --include-stock adds that sixth variant.

The Keras optimizers of float32, mixed_bfloat16 (and stock) receive sparse
gradients (IndexedSlices, from Embedding lookups) densified: on the TensorFlow
backend Keras's Adam squares them occurrence by occurrence before summing
duplicate rows, a different algorithm from its dense update, which the tf_bf16
optimizers follow. Every variant thus runs the same algorithm.

Needs the lab extra (tqdm; matplotlib for --out; a task's own packages):
pip install "tf_bf16[lab]".

Examples:
  python -m tf_bf16 list
  python -m tf_bf16 compare --task digits_cnn --out out/digits
  python -m tf_bf16 compare --task least_squares --reduced --variants float32,kahan
"""

LIST_DESCRIPTION = """\
Lists the tasks that 'compare' and 'results' can train, with their metric,
optimizer, the paper application they mirror, and whether they can run on this
machine (a package of the lab extra that is not installed, or a dataset that
must be prepared first).
"""

RESULTS_DESCRIPTION = """\
Runs 'compare' for every available task (or --tasks), for --seeds seeds, and
writes a Markdown report (default docs/results.md) with, per task, the mean +-
std over seeds of float32 / mixed_bfloat16 / nearest / stochastic / Kahan, the gap to float32
and whether it is within tolerance (|gap| <= 2 std, or <= 0.5 percentage
points of accuracy / 1% relative for lower-is-better metrics), the learning
curves (PNG next to the report, in <report dir>/results/), the exact command,
the machine and the time. Tasks that cannot run here are listed with the
reason. Numbers are whatever the runs give. The results.json and the report
are written before the plots. Needs the lab extra (tqdm, matplotlib; the tasks'
own packages): pip install "tf_bf16[lab]".

Example:
  python -m tf_bf16 results --seeds 3
  python -m tf_bf16 results --reduced --seeds 2 --tasks least_squares,digits_cnn \\
      --output /tmp/results.md
  python -m tf_bf16 results --from-json docs/results/results.json   # re-render only
"""

# ---------------------------------------------------------------------------
# Command line.

def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}")
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError("must be a finite number > 0")
    return value


def _variant_list(text):
    names = [x.strip() for x in text.split(",") if x.strip()]
    allowed = tuple(VARIANTS) + (STOCK,)
    bad = [x for x in names if x not in allowed]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown variant(s) {', '.join(bad) or '(none)'}; choose from {', '.join(allowed)}")
    return names


def _add_training_options(parser):
    parser.add_argument(
        "--epochs", type=common.positive_int, metavar="N",
        help="epochs (curve points) to train, overriding the task's (see 'list')")
    parser.add_argument(
        "--steps", type=common.positive_int, metavar="N",
        help="optimizer steps per epoch, overriding the task's (for array data: the first N "
             "batches of each shuffled epoch)")
    parser.add_argument(
        "--learning-rate", type=_positive_float, metavar="LR",
        help="learning rate, overriding the task's (see 'list')")
    parser.add_argument(
        "--batch-size", type=common.positive_int, metavar="B",
        help="batch size, overriding the task's (array data only)")
    parser.add_argument(
        "--reduced", action="store_true",
        help="use the task's reduced configuration (small model/data, few steps: seconds; "
             "what the tests run)")
    parser.add_argument(
        "--variants", type=_variant_list, metavar="LIST",
        help="comma-separated variants to train, from "
             f"{','.join(VARIANTS)},{STOCK} (default: {','.join(VARIANTS)}; plus {STOCK} "
             "with --include-stock)")
    parser.add_argument(
        "--include-stock", action="store_true",
        help="add the variant 'stock': Keras \"bfloat16\" policy with the stock Keras "
             "optimizer (what Keras gives today; stock Adam does not move in pure bf16)")
    parser.add_argument(
        "--no-progress", action="store_true",
        help="do not show progress bars (they go to stderr)")


def add_compare_arguments(parser):
    """Options of `compare`."""
    parser.add_argument(
        "--task", required=True, metavar="NAME",
        help="task to train ('python -m tf_bf16 list' shows them)")
    parser.add_argument(
        "--seed", type=int, default=0, metavar="S",
        help="seed of the initial weights, the data order and the stochastic rounding "
             "(default 0)")
    _add_training_options(parser)
    parser.add_argument(
        "--out", metavar="DIR",
        help="write results.json and results.md, then the learning curves (curves.png), "
             "to DIR")
    parser.add_argument(
        "--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument(
        "--markdown", metavar="PATH", help="also write the table as Markdown to PATH")


def add_list_arguments(parser):
    """Options of `list` (none)."""


def add_results_arguments(parser):
    """Options of `results`."""
    parser.add_argument(
        "--seeds", type=common.positive_int, default=3, metavar="N",
        help="seeds per task and variant: 0..N-1 (default 3); mean +- std over them")
    parser.add_argument(
        "--tasks", metavar="LIST",
        help="comma-separated tasks (default: every task; unavailable ones are listed with "
             "the reason)")
    _add_training_options(parser)
    parser.add_argument(
        "--output", default=os.path.join("docs", "results.md"), metavar="PATH",
        help="the Markdown report to write (default docs/results.md); plots and "
             "results.json go to <its directory>/results/")
    parser.add_argument(
        "--from-json", metavar="PATH",
        help="train nothing: re-render the report and plots from the results.json of an "
             "earlier run (the report keeps that run's command, machine and times)")


# ---------------------------------------------------------------------------
# Setup.

def _variants(args):
    variants = list(args.variants) if args.variants else list(VARIANTS)
    if args.include_stock and STOCK not in variants:
        variants.append(STOCK)
    return variants


def _task_config(task, args):
    cfg = runner.training_config(task, args)
    cfg["reduced"] = bool(args.reduced)
    return cfg


def _command_line(args, command):
    """The command that reproduces this run, rebuilt from the parsed options."""
    import shlex

    parts = ["python", "-m", "tf_bf16", command]
    for option, value in (("--task", getattr(args, "task", None)),
                          ("--tasks", getattr(args, "tasks", None)),
                          ("--seed", getattr(args, "seed", None)),
                          ("--seeds", getattr(args, "seeds", None)),
                          ("--epochs", args.epochs), ("--steps", args.steps),
                          ("--learning-rate", args.learning_rate),
                          ("--batch-size", args.batch_size),
                          ("--variants", ",".join(args.variants) if args.variants else None),
                          ("--out", getattr(args, "out", None)),
                          ("--output", getattr(args, "output", None))):
        if value is not None:
            parts += [option, str(value)]
    for flag in ("reduced", "include_stock"):
        if getattr(args, flag, False):
            parts.append("--" + flag.replace("_", "-"))
    return " ".join(shlex.quote(p) for p in parts)


# ---------------------------------------------------------------------------
# compare

def run_compare(args):
    """`compare`: trains the task's variants, prints the table, writes outputs."""
    from tf_bf16.lab import tasks as tasks_module

    needs = ("tqdm",) + (("matplotlib",) if args.out else ())
    if common.check_requirements("compare" + (" --out" if args.out else ""), needs):
        return 2
    try:
        task = tasks_module.get_task(args.task)
    except KeyError as e:
        print(e.args[0], file=sys.stderr)
        return 2
    message = task.available()
    if message:
        print(f"task {task.name} cannot run here: {message}", file=sys.stderr)
        return 2
    runner.import_keras()
    cfg = _task_config(task, args)
    summary = runner.compare_summary(task, args.seed, _variants(args), cfg,
                                     _command_line(args, "compare"),
                                     progress=not args.no_progress)
    print(report.compare_text(task, summary), flush=True)
    files = report.write_compare(task, summary, out=args.out, json_path=args.json,
                                 markdown_path=args.markdown)
    if files:
        print("wrote " + ", ".join(files))
    return 0


# ---------------------------------------------------------------------------
# list

def run_list(args):
    """`list`: one line per task; a task that cannot run here says why."""
    from tf_bf16.lab import tasks as tasks_module

    header = ["task", "metric", "optimizer", "lr", "epochs", "batch", "paper application",
              "runs here", "summary"]
    body, missing = [], []
    for name, task in tasks_module.all_tasks().items():
        message = task.available()
        if message:
            missing.append((name, message))
        body.append([name, f"{task.metric} ({'higher' if task.higher_is_better else 'lower'} "
                     "is better)", task.optimizer, f"{task.learning_rate:g}", str(task.epochs),
                     str(task.batch_size), task.paper_application or "-",
                     "no (see below)" if message else "yes", task.summary])
    print(common.text_table(header, body, left=(0, 1, 2, 6, 7, 8)))
    for name, message in missing:
        print(f"\n{name} cannot run here:\n  " + message.strip().replace("\n", "\n  "))
    return 0


# ---------------------------------------------------------------------------
# results

def run_results(args):
    """`results`: every task x variant x seed, docs/results.md."""
    from tf_bf16.lab import tasks as tasks_module

    needs = ("matplotlib",) if args.from_json else ("tqdm", "matplotlib")
    if common.check_requirements("results", needs):
        return 2
    all_tasks = tasks_module.all_tasks()
    if args.from_json:
        return _render_results(args.from_json, args.output, all_tasks)
    keras, tf, _ = runner.import_keras()
    started_at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    started = time.perf_counter()
    if args.tasks:
        names = [x.strip() for x in args.tasks.split(",") if x.strip()]
        unknown = [n for n in names if n not in all_tasks]
        if unknown:
            print(f"unknown task(s): {', '.join(unknown)}; known: {', '.join(all_tasks)}",
                  file=sys.stderr)
            return 2
    else:
        names = list(all_tasks)
    variants = _variants(args)
    out_dir = os.path.join(os.path.dirname(os.path.abspath(args.output)), "results")
    os.makedirs(out_dir, exist_ok=True)
    suite = {"tasks": {}, "unavailable": {}, "variants": variants, "seeds": args.seeds,
             "reduced": bool(args.reduced), "machine": common.machine_info(tf, keras),
             "command": _command_line(args, "results"),
             "started": started_at}
    for name in names:
        task = all_tasks[name]
        message = task.available()
        if message:
            suite["unavailable"][name] = message
            print(f"skipping {name}: {message}", file=sys.stderr)
            continue
        cfg = _task_config(task, args)
        per_seed = []
        task_started = time.perf_counter()
        for seed in range(args.seeds):
            per_seed.append(runner.run_task(task, seed, variants, cfg,
                                            progress=not args.no_progress))
        stats = report.summarize(task, per_seed, variants)
        suite["tasks"][name] = {
            "summary": task.summary, "metric": task.metric,
            "higher_is_better": task.higher_is_better,
            "paper_application": task.paper_application, "config": cfg,
            "stats": stats, "runs": per_seed, "plot": report.plot_path(out_dir, name),
            "elapsed_s": time.perf_counter() - task_started,
        }
        print(f"{name}: " + ", ".join(
            f"{report.LABELS[v]} {report.format_metric(task, s['mean'])} +- "
            f"{report.format_metric(task, s['std'])}"
            for v, s in stats.items()), flush=True)
    suite["elapsed_s"] = time.perf_counter() - started
    # Results first: a failure while plotting must not lose the runs.
    report.write_json(os.path.join(out_dir, "results.json"), suite)
    with open(args.output, "w") as f:
        f.write(report.results_markdown(suite, all_tasks, args.output))
    _plot_results(suite, all_tasks, out_dir)
    print(f"wrote {args.output} and {out_dir}/")
    return 0


def _plot_results(suite, all_tasks, out_dir):
    for name, entry in suite["tasks"].items():
        report.plot_task(out_dir, name, all_tasks[name], entry["runs"], suite["variants"])


def _render_results(json_path, output, all_tasks):
    """`results --from-json`: the report and plots of an earlier run, no training."""
    try:
        with open(json_path) as f:
            suite = json.load(f)
    except (OSError, ValueError) as e:
        print(f"cannot read {json_path}: {e}", file=sys.stderr)
        return 2
    unknown = [name for name in suite.get("tasks", {}) if name not in all_tasks]
    if unknown:
        print(f"{json_path} has tasks this version does not know: {', '.join(unknown)}",
              file=sys.stderr)
        return 2
    out_dir = os.path.join(os.path.dirname(os.path.abspath(output)), "results")
    os.makedirs(out_dir, exist_ok=True)
    variants = suite["variants"]
    for name, entry in suite["tasks"].items():
        entry["stats"] = report.summarize(all_tasks[name], entry["runs"], variants)
        entry["plot"] = report.plot_path(out_dir, name)
    new_json = os.path.join(out_dir, "results.json")
    if os.path.abspath(new_json) != os.path.abspath(json_path):
        report.write_json(new_json, suite)
    with open(output, "w") as f:
        f.write(report.results_markdown(suite, all_tasks, output))
    _plot_results(suite, all_tasks, out_dir)
    print(f"wrote {output} and {out_dir}/ from {json_path}")
    return 0
