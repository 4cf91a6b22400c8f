"""``python -m tf_bf16 compare | list | results``: float32 vs bf16 roundings on real tasks.

The command line of the three commands: their options, help texts and run
functions. Training is tf_bf16/lab/runner.py, the outputs (tables, report,
plots) tf_bf16/lab/report.py, the tasks tf_bf16/lab/tasks/.

``compare --task NAME`` trains one task five ways (``runner.run_task``: the
same model, initial weights, data order and seed; see the runner's docstring)
and prints a table; ``--out`` writes results.json and results.md, then the
learning curves. ``compare --model MODULE:FUNCTION --data MODULE:FUNCTION``
does the same for the user's own model and data (through
tf_bf16/lab/own_model.py, what ``tf_bf16.compare`` runs). ``results`` runs every available task x variant x seed and
writes ``docs/results.md`` with mean +- std over seeds and the learning
curves under ``docs/results/``; ``results --from-json`` re-renders them
without training. ``list`` shows the tasks and whether they can run here.
With ``--backend jax``, ``compare`` and ``results`` hand over to
tf_bf16/lab/jax_runner.py (one process per variant, resumable pieces) and the
GPU section of the report is tf_bf16/lab/report_gpu.py.

Importing this module imports neither TensorFlow nor the lab extra's
packages (``--help`` stays fast); the run functions check the extra's packages
before anything is trained.
"""

import argparse
import json
import os
import sys
import time

from tf_bf16.lab import common
from tf_bf16.lab import report
from tf_bf16.lab import runner
from tf_bf16.lab.tasks.base import STOCK, VARIANTS

COMPARE_SUMMARY = ("train a task or your own model in float32, mixed_bfloat16 and pure bf16 "
                   "(nearest, SR, Kahan); table, curves, JSON")
LIST_SUMMARY = "list the tasks of 'compare' and whether they can run here"
RESULTS_SUMMARY = "run every task x variant x seed; write docs/results.md with mean +- std"

COMPARE_DESCRIPTION = """\
Trains one task (--task) or your own model and data (--model, --data) five ways
with the same model, initial weights, data order and seed: float32 (Keras
float32 policy, stock Keras optimizer), mixed_bfloat16 (Keras "mixed_bfloat16"
policy: float32 weights and optimizer state, bf16 compute; stock Keras
optimizer), nearest (Keras "bfloat16" policy, tf_bf16 optimizer with
rounding="nearest", i.e. plain bf16 training), stochastic (tf_bf16.set_policy()
+ stochastic rounding) and kahan (tf_bf16.set_policy() + Kahan summation).
Progress bars go to stderr; the table (final metric, gap to float32,
training-state bytes per parameter, wall time) goes to stdout; --out DIR writes
JSON and Markdown, then the learning curves (PNG).

Why "nearest" uses the tf_bf16 optimizer rather than stock Keras: stock Keras
Adam never moves a weight in pure bf16 (beta_2 = 0.999 rounds to 1.0), which
would hide the effect of rounding; --include-stock adds that sixth variant.
On the JAX backend nearest also sums bf16 Embedding gradients in float32, as
the policy of stochastic and kahan does, so that it differs from them in the
weight rounding only.

The Keras optimizers of float32, mixed_bfloat16 (and stock) receive sparse
gradients (IndexedSlices, from Embedding lookups) densified: on the TensorFlow
backend Keras's Adam squares them occurrence by occurrence before summing
duplicate rows, a different algorithm from its dense update, which the tf_bf16
optimizers follow. Every variant thus runs the same algorithm.

Your own model: --model MODULE:FUNCTION names a zero-argument function that
returns a new Keras model, built under the dtype policy in force when it is
called (do not hard-code dtype="float32"), uncompiled or compiled with its loss
and metrics (and optimizer, used when --optimizer is not given); --data
MODULE:FUNCTION a zero-argument function that returns (x, y) arrays, a dict
{"train": ..., "validation": ...} of (x, y) arrays or tf.data.Datasets, or a
tf.data.Dataset of (x, y) batches. MODULE is a module on the Python path (the
current directory is searched) or a path to a .py file. They are the callables
that tf_bf16.compare(build_model, data) takes. Without validation data the last
--validation-split of the arrays is held out. The metric reported is --metric
(a key of model.evaluate's results; default: the first compiled metric, else
the loss). For example, with my_models.py:

  import keras
  from sklearn.datasets import load_digits

  def build_model():
      model = keras.Sequential([keras.Input((64,)),
                                keras.layers.Dense(128, activation="relu"),
                                keras.layers.Dense(10)])
      model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    metrics=["accuracy"])
      return model

  def data():
      x, y = load_digits(return_X_y=True)
      return (x / 16.0).astype("float32"), y

  python -m tf_bf16 compare --model my_models.py:build_model --data my_models.py:data \\
      --optimizer adamw --epochs 10 --out out/mine

Needs the lab extra (tqdm; matplotlib for --out; a task's own packages):
pip install "tf_bf16[lab]".

On Keras's JAX backend (--backend jax; GPUs without TensorFlow, such as the
H200) every variant trains in its own process, the table adds ms/step and the
peak device memory, --config gpu is transformer_lm at 101M parameters, and a
run may be split into pieces: --max-minutes pauses it with the running
variant's full state saved (exit status 3), --resume DIR continues it
bit-identically. On a GPU a rerun repeats the bits only with
XLA_FLAGS=--xla_gpu_deterministic_ops=true (XLA's default reductions are not
deterministic; the H200 float32 step then took 1.23x as long:
tools/h200/gpu_determinism.sh).

Examples:
  python -m tf_bf16 list
  python -m tf_bf16 compare --task digits_cnn --out out/digits
  python -m tf_bf16 compare --task least_squares --reduced --variants float32,kahan
  KERAS_BACKEND=jax python -m tf_bf16 compare --backend jax --task transformer_lm \
      --config gpu --out out/gpu --max-minutes 9
  KERAS_BACKEND=jax python -m tf_bf16 compare --resume out/gpu/work --out out/gpu
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

With --backend jax it trains the tasks ported to the JAX runner (one process
per variant, as 'compare --backend jax'), writes <report dir>/results/gpu/
(results.json and the curves) and the report: the CPU sections rendered from
<report dir>/results/results.json, as they are, then a GPU section.
--from-json ... --gpu-json RUN.json renders the same from the results.json of
a 'compare --backend jax' run (or of 'results --backend jax').

Example:
  python -m tf_bf16 results --seeds 3
  python -m tf_bf16 results --reduced --seeds 2 --tasks least_squares,digits_cnn \\
      --output /tmp/results.md
  python -m tf_bf16 results --from-json docs/results/results.json   # re-render only
  python -m tf_bf16 results --from-json docs/results/results.json \\
      --gpu-json out/gpu/results.json                              # + the GPU section
"""

# ---------------------------------------------------------------------------
# Command line.

def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError("must be a fraction in [0, 1)")
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
        "--learning-rate", type=common.positive_float, metavar="LR",
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


def _add_backend_options(parser):
    jax = parser.add_argument_group(
        "Keras's JAX backend (--backend jax: GPUs without TensorFlow, e.g. the H200)")
    jax.add_argument(
        "--backend", choices=("tensorflow", "jax"), default="tensorflow",
        help="the Keras backend that trains the variants (default tensorflow, in this "
             "process). jax: each variant in its own process with KERAS_BACKEND=jax (its "
             "memory its own; TensorFlow is not imported), for the tasks ported to it "
             "(transformer_lm); the table adds ms/step and peak device memory. Where "
             "TensorFlow is not installed set KERAS_BACKEND=jax for the command too")
    jax.add_argument(
        "--config", metavar="NAME",
        help="a named configuration of the task, with --backend jax: 'gpu' for "
             "transformer_lm (101M parameters, sequence 512, batch 16, 2,000 steps, Adam "
             "6e-4 with 5%% warmup and cosine decay to 0; 'list' shows the tasks)")
    jax.add_argument(
        "--max-minutes", type=common.positive_float, metavar="M",
        help="with --backend jax: stop before M minutes have passed, at the end of a "
             "learning-curve segment, with the running variant's state saved (exit status "
             "3); continue with --resume")
    jax.add_argument(
        "--resume", metavar="DIR",
        help="with --backend jax: continue the run whose work directory is DIR (its "
             "options are saved there; give only --max-minutes, --stop-at-step, "
             "--no-progress and the output options --out, --json, --markdown, --output, "
             "which are not saved); finished variants are kept, a paused one continues "
             "bit-identically from its saved step")
    jax.add_argument(
        "--work-dir", metavar="DIR",
        help="with --backend jax: where each variant's result, error report and saved "
             "state go (default: OUT/work for compare --out, else a new temporary "
             "directory; out/jax_results_work for results); running the same command with "
             "the same DIR resumes too")
    jax.add_argument(
        "--stop-at-step", type=common.positive_int, metavar="N",
        help="with --backend jax: pause the running variant at the first curve-segment end "
             "at or after step N (a manual piece; what the tests use)")


def add_compare_arguments(parser):
    """Options of `compare`."""
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--task", metavar="NAME",
        help="task to train ('python -m tf_bf16 list' shows them)")
    what.add_argument(
        "--model", metavar="MODULE:FUNCTION",
        help="your own model instead of a task: a zero-argument function returning a new "
             "Keras model (see above); needs --data")
    parser.add_argument(
        "--seed", type=int, default=0, metavar="S",
        help="seed of the initial weights, the data order and the stochastic rounding "
             "(default 0)")
    _add_training_options(parser)
    own = parser.add_argument_group(
        "your own model (--model; not with --task)")
    own.add_argument(
        "--data", metavar="MODULE:FUNCTION",
        help="a zero-argument function returning your data: (x, y) arrays, "
             "{'train': ..., 'validation': ...} or a tf.data.Dataset of (x, y) batches")
    own.add_argument(
        "--optimizer", choices=tuple(runner.OPTIMIZER_CLASSES), metavar="NAME",
        help="sgd, adam, adamw or lion, with Keras's defaults (default: the optimizer the "
             "model is compiled with, else adamw)")
    own.add_argument(
        "--loss", metavar="NAME",
        help="a Keras loss name, e.g. mse (default: the compiled model's loss)")
    own.add_argument(
        "--metrics", metavar="LIST",
        help="comma-separated Keras metric names to compile, e.g. accuracy "
             "(default: the compiled model's)")
    own.add_argument(
        "--metric", metavar="NAME",
        help="the metric to report: a key of model.evaluate's results, e.g. accuracy or "
             "loss (default: the first compiled metric, else the loss)")
    direction = own.add_mutually_exclusive_group()
    direction.add_argument(
        "--higher-is-better", dest="higher_is_better", action="store_const", const=True,
        help="the metric is better when higher (default: what Keras says of it)")
    direction.add_argument(
        "--lower-is-better", dest="higher_is_better", action="store_const", const=False,
        help="the metric is better when lower")
    own.add_argument(
        "--validation-split", type=_fraction, default=0.2, metavar="F",
        help="when --data returns no validation data: the fraction of the arrays, from the "
             "end, held out for the metric (default 0.2)")
    own.add_argument(
        "--keep-float32", action="append", default=[], metavar="REGEX",
        help="a layer or variable that stochastic and kahan keep in float32 "
             "(tf_bf16.set_policy(keep_float32=...)); repeatable")
    own.add_argument(
        "--name", metavar="NAME",
        help="the name in the table and plots (default: the model function's)")
    parser.add_argument(
        "--out", metavar="DIR",
        help="write results.json and results.md, then the learning curves (curves.png), "
             "to DIR")
    parser.add_argument(
        "--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument(
        "--markdown", metavar="PATH", help="also write the table as Markdown to PATH")
    _add_backend_options(parser)


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
    parser.add_argument(
        "--gpu-json", metavar="PATH",
        help="with --from-json: append the GPU section, rendered from PATH (the results.json "
             "of 'compare --backend jax --out DIR' or of 'results --backend jax'); it is "
             "copied to <report dir>/results/gpu/results.json with its curves beside. The "
             "sections rendered from --from-json stay byte for byte as without it")
    parser.add_argument(
        "--gpu-partial", action="store_true",
        help="with --gpu-json: render a paused run's finished variants and name the "
             "unfinished one (without it a paused run is refused)")
    _add_backend_options(parser)


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
    own_model = getattr(args, "model", None) is not None
    for option, value in (("--task", getattr(args, "task", None)),
                          ("--model", getattr(args, "model", None)),
                          ("--data", getattr(args, "data", None)),
                          ("--optimizer", getattr(args, "optimizer", None)),
                          ("--loss", getattr(args, "loss", None)),
                          ("--metrics", getattr(args, "metrics", None)),
                          ("--metric", getattr(args, "metric", None)),
                          ("--validation-split",
                           args.validation_split if own_model else None),
                          ("--name", getattr(args, "name", None)),
                          ("--tasks", getattr(args, "tasks", None)),
                          ("--seed", getattr(args, "seed", None)),
                          ("--seeds", getattr(args, "seeds", None)),
                          ("--epochs", args.epochs), ("--steps", args.steps),
                          ("--learning-rate", args.learning_rate),
                          ("--batch-size", args.batch_size),
                          ("--variants", ",".join(args.variants) if args.variants else None),
                          ("--out", getattr(args, "out", None)),
                          ("--output", getattr(args, "output", None)),
                          ("--backend", None if getattr(args, "backend", "tensorflow")
                           == "tensorflow" else args.backend),
                          ("--config", getattr(args, "config", None))):
        if value is not None:
            parts += [option, str(value)]
    for pattern in getattr(args, "keep_float32", None) or ():
        parts += ["--keep-float32", pattern]
    if getattr(args, "higher_is_better", None) is not None:
        parts.append("--higher-is-better" if args.higher_is_better else "--lower-is-better")
    for flag in ("reduced", "include_stock"):
        if getattr(args, flag, False):
            parts.append("--" + flag.replace("_", "-"))
    return " ".join(shlex.quote(p) for p in parts)


# ---------------------------------------------------------------------------
# compare

def run_compare(args):
    """`compare`: trains the task's (or the model's) variants, prints the table,
    writes the outputs."""
    from tf_bf16.lab import tasks as tasks_module

    problem = _backend_problem(args)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if args.model is not None:
        return _run_compare_own_model(args)
    misplaced = [option for option, given in (
        ("--data", args.data is not None), ("--optimizer", args.optimizer is not None),
        ("--loss", args.loss is not None), ("--metrics", args.metrics is not None),
        ("--metric", args.metric is not None),
        ("--higher-is-better/--lower-is-better", args.higher_is_better is not None),
        ("--validation-split", args.validation_split != 0.2),
        ("--keep-float32", bool(args.keep_float32)), ("--name", args.name is not None))
        if given]
    if misplaced:
        print(f"{', '.join(misplaced)}: for your own model (--model), not with --task",
              file=sys.stderr)
        return 2
    if args.backend == "jax":
        from tf_bf16.lab import jax_runner

        if common.check_requirements("compare --out", ("matplotlib",) if args.out else ()):
            return 2
        return jax_runner.compare_command(args, _variants(args), _command_line(args, "compare"))
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


def _run_compare_own_model(args):
    """`compare --model --data`: tf_bf16.compare's implementation, from the command line.

    Exit status 2 for a bad input (before training), 1 when a variant fails."""
    from tf_bf16.lab import own_model

    if args.data is None:
        print("--model needs --data MODULE:FUNCTION (a function returning your data)",
              file=sys.stderr)
        return 2
    if args.reduced:
        print("--reduced applies to the built-in tasks (--task), not to --model",
              file=sys.stderr)
        return 2
    try:
        own_model.check_lab_packages("compare --model" + (" --out" if args.out else ""),
                                     args.out)
        build_model = own_model.load_callable(args.model, "--model")
        data_function = own_model.load_callable(args.data, "--data")
    except (ImportError, ValueError) as e:
        print(e, file=sys.stderr)
        return 2
    try:
        data = data_function()
    except Exception as e:
        print(f"--data {args.data}: calling it raised {type(e).__name__}: {e}",
              file=sys.stderr)
        return 2
    name = args.name or args.model.rpartition(":")[2]
    metrics = ([m.strip() for m in args.metrics.split(",") if m.strip()]
               if args.metrics else None)
    try:
        prepared = own_model.prepare(
            build_model, data, optimizer=args.optimizer, learning_rate=args.learning_rate,
            loss=args.loss, metrics=metrics, metric=args.metric,
            higher_is_better=args.higher_is_better, epochs=args.epochs or 1,
            batch_size=args.batch_size or 32, steps_per_epoch=args.steps,
            validation_split=args.validation_split, seed=args.seed,
            variants=_variants(args), keep_float32=tuple(args.keep_float32), out=args.out,
            name=name, source=f"--model {args.model}",
            command=_command_line(args, "compare"), json_path=args.json,
            markdown_path=args.markdown)
    except (ImportError, TypeError, ValueError) as e:
        print(f"compare --model {args.model} --data {args.data}: {e}", file=sys.stderr)
        return 2
    except runner.VariantError as e:
        print(str(e), file=sys.stderr)
        return 1
    try:
        own_model.run(prepared, progress=not args.no_progress)
    except runner.VariantError as e:
        print(str(e), file=sys.stderr)
        return 1
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

    problem = _backend_problem(args)
    if problem or (args.gpu_json and not args.from_json):
        print(problem or "--gpu-json goes with --from-json (results --backend jax writes the "
              "GPU section itself)", file=sys.stderr)
        return 2
    jax = args.backend == "jax"
    needs = ("matplotlib",) if (args.from_json or jax) else ("tqdm", "matplotlib")
    if common.check_requirements("results", needs):
        return 2
    all_tasks = tasks_module.all_tasks()
    if args.from_json:
        return _render_results(args.from_json, args.output, all_tasks, args.gpu_json,
                               gpu_partial=args.gpu_partial)
    if jax:
        from tf_bf16.lab import jax_runner

        return jax_runner.results_command(args, _variants(args), _command_line(args, "results"),
                                          all_tasks)
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


def _backend_problem(args):
    """Why the backend options do not go together, or None."""
    if args.backend == "jax":
        if getattr(args, "model", None) is not None:
            return "--backend jax trains the built-in tasks (--task), not --model"
        if args.include_stock:
            return "--include-stock: the stock variant is not run on the JAX backend"
        return None
    given = [option for option, value in (
        ("--config", args.config), ("--max-minutes", args.max_minutes),
        ("--resume", args.resume), ("--work-dir", args.work_dir),
        ("--stop-at-step", args.stop_at_step)) if value is not None]
    if given:
        return f"{', '.join(given)}: with --backend jax only"
    return None


def _render_results(json_path, output, all_tasks, gpu_json=None, gpu_partial=False):
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
    gpu_suite = None
    if gpu_json:
        from tf_bf16.lab import report_gpu

        try:
            gpu_suite = report_gpu.load(gpu_json, partial=gpu_partial)
        except (OSError, ValueError) as e:
            print(f"--gpu-json {gpu_json}: {e}", file=sys.stderr)
            return 2
    text = report.results_markdown(suite, all_tasks, output)
    if gpu_suite is None:
        with open(output, "w") as f:
            f.write(text)
    _plot_results(suite, all_tasks, out_dir)
    print(f"wrote {output} and {out_dir}/ from {json_path}")
    if gpu_suite is not None:
        try:
            return report_gpu.write_report(gpu_suite, all_tasks, output, cpu_text=text,
                                           source=gpu_json)
        except ValueError as e:
            print(f"--gpu-json {gpu_json}: {e}", file=sys.stderr)
            return 2
    return 0
