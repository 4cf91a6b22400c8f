"""``python -m tf_bf16 compare | list | results``: float32 vs bf16 roundings on real tasks.

``compare --task NAME`` trains the same model, with the same initial weights,
data order and seed, four ways (``tf_bf16.tasks.VARIANTS``):

- ``float32``: Keras's default float32 policy and the stock Keras optimizer
  (``keras.optimizers.SGD(momentum=0.9)``, ``Adam`` or ``AdamW``, per task),
  given densified sparse gradients (see ``_with_dense_gradients``);
- ``nearest``: Keras's ``"bfloat16"`` policy and the tf_bf16 optimizer with
  ``rounding="nearest"``: what plain bf16 training gives, minus Keras's bf16
  Adam bug (stock Keras Adam never moves a weight in pure bf16 because
  ``beta_2 = 0.999`` rounds to 1.0; ``--include-stock`` adds that column,
  ``stock``: the ``"bfloat16"`` policy with the stock Keras optimizer);
- ``stochastic`` / ``kahan``: ``tf_bf16.set_policy()`` (strict; BatchNorm
  moving statistics stored with stochastic rounding) and the tf_bf16 optimizer
  with that rounding.

Same initial weights: the model is built once under the float32 policy after
``keras.utils.set_random_seed(seed)``; every variant builds its own model under
its policy and receives those weights (``set_weights``: rounded to nearest
bf16 for the bf16 variants). Same data order: ``Task.make_data(seed)`` is
called once per seed and shared; for array data the runner shuffles every
epoch with ``numpy.random.RandomState(seed * 1000 + epoch)``, the same for all
variants. Keras's global dtype policy is restored (``tf_bf16.reset_policy()``)
after each run.

Training-state bytes per parameter come from ``tf_bf16.audit(model,
optimizer=..., trace=False)`` (trainable weights + per-parameter optimizer
slots + Kahan buffers, over trainable parameters).

``results`` runs every available task x variant x seed and writes
``docs/results.md`` with mean +- std over seeds and the learning curves
under ``docs/results/``.

TaskData.train may be a tuple ``(x, y)`` of arrays (batched and shuffled by the
runner, see above) or a ``tf.data.Dataset`` of ``(x, y)`` batches in a fixed
order (then ``steps_per_epoch`` says how many batches make an epoch; it is
required for an infinite dataset).
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

from tf_bf16 import bench

SUMMARY = "train a task in float32 and in bf16 (nearest, SR, Kahan); table, curves, JSON"
LIST_SUMMARY = "list the tasks of 'compare' and whether they can run here"
RESULTS_SUMMARY = "run every task x variant x seed; write docs/results.md with mean +- std"

DESCRIPTION = """\
Trains one task four ways with the same model, initial weights, data order and
seed: float32 (Keras float32 policy, stock Keras optimizer), nearest (Keras
"bfloat16" policy, tf_bf16 optimizer with rounding="nearest", i.e. plain bf16
training), stochastic (tf_bf16.set_policy() + stochastic rounding) and kahan
(tf_bf16.set_policy() + Kahan summation). Progress bars go to stderr; the table
(final metric, gap to float32, training-state bytes per parameter, wall time)
goes to stdout; --out DIR writes learning curves (PNG), JSON and Markdown.

Why "nearest" uses the tf_bf16 optimizer rather than stock Keras: stock Keras
Adam never moves a weight in pure bf16 (beta_2 = 0.999 rounds to 1.0), which
would hide the effect of rounding; --include-stock adds that fifth variant.

The Keras optimizers of float32 (and stock) receive sparse gradients
(IndexedSlices, from Embedding lookups) densified: on the TensorFlow backend
Keras's Adam squares them occurrence by occurrence before summing duplicate
rows, a different algorithm from its dense update, which the tf_bf16
optimizers follow. Every variant thus runs the same algorithm.

Examples:
  python -m tf_bf16 list
  python -m tf_bf16 compare --task digits_cnn --out out/digits
  python -m tf_bf16 compare --task least_squares --reduced --variants float32,kahan
"""

LIST_DESCRIPTION = """\
Lists the tasks that 'compare' and 'results' can train, with their metric,
optimizer, the paper application they mirror, and whether they can run on this
machine (e.g. a dataset that must be prepared first).
"""

RESULTS_DESCRIPTION = """\
Runs 'compare' for every available task (or --tasks), for --seeds seeds, and
writes a Markdown report (default docs/results.md) with, per task, the mean +-
std over seeds of float32 / nearest / stochastic / Kahan, the gap to float32
and whether it is within tolerance (|gap| <= 2 std, or <= 0.5 percentage
points of accuracy / 1% relative for lower-is-better metrics), the learning
curves (PNG next to the report, in <report dir>/results/), the exact command,
the machine and the time. Tasks that cannot run here are listed with the
reason. Numbers are whatever the runs give.

Example:
  python -m tf_bf16 results --seeds 3
  python -m tf_bf16 results --reduced --seeds 2 --tasks least_squares,digits_cnn \\
      --output /tmp/results.md
  python -m tf_bf16 results --from-json docs/results/results.json   # re-render only
"""

STOCK = "stock"
# A hand-written discussion next to the generated report; linked when present.
DISCUSSION = "results_discussion.md"
LATE_FRACTION = 0.1
LABELS = {
    "float32": "float32",
    "nearest": "bf16 nearest",
    "stochastic": "bf16 SR",
    "kahan": "bf16 Kahan",
    STOCK: "bf16 stock Keras",
}
COLORS = {"float32": "black", "nearest": "tab:red", "stochastic": "tab:blue",
          "kahan": "tab:green", STOCK: "tab:gray"}

NEAREST_FOOTNOTE = (
    "nearest = Keras's \"bfloat16\" policy with the tf_bf16 optimizer and rounding=\"nearest\" "
    "(plain round-to-nearest bf16 training). It is not stock Keras because stock Keras Adam "
    "never moves a weight in pure bf16 (beta_2 = 0.999 rounds to 1.0 in bf16, so every step "
    "is 0) and stock SGD's momentum 0.9 becomes 0.898; `--include-stock` adds the stock "
    "Keras column.")


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
    from tf_bf16.tasks.base import VARIANTS

    names = [x.strip() for x in text.split(",") if x.strip()]
    allowed = tuple(VARIANTS) + (STOCK,)
    bad = [x for x in names if x not in allowed]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown variant(s) {', '.join(bad) or '(none)'}; choose from {', '.join(allowed)}")
    return names


def _add_training_options(parser):
    parser.add_argument(
        "--epochs", type=bench._positive_int, metavar="N",
        help="epochs (curve points) to train, overriding the task's (see 'list')")
    parser.add_argument(
        "--steps", type=bench._positive_int, metavar="N",
        help="optimizer steps per epoch, overriding the task's (for array data: the first N "
             "batches of each shuffled epoch)")
    parser.add_argument(
        "--learning-rate", type=_positive_float, metavar="LR",
        help="learning rate, overriding the task's (see 'list')")
    parser.add_argument(
        "--batch-size", type=bench._positive_int, metavar="B",
        help="batch size, overriding the task's (array data only)")
    parser.add_argument(
        "--reduced", action="store_true",
        help="use the task's reduced configuration (small model/data, few steps: seconds; "
             "what the tests run)")
    parser.add_argument(
        "--variants", type=_variant_list, metavar="LIST",
        help="comma-separated variants to train, from float32,nearest,stochastic,kahan,stock "
             "(default: float32,nearest,stochastic,kahan; plus stock with --include-stock)")
    parser.add_argument(
        "--include-stock", action="store_true",
        help="add the variant 'stock': Keras \"bfloat16\" policy with the stock Keras "
             "optimizer (what Keras gives today; stock Adam does not move in pure bf16)")
    parser.add_argument(
        "--no-progress", action="store_true",
        help="do not show progress bars (they go to stderr)")


def add_arguments(parser):
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
        help="write the learning curves (curves.png), results.json and results.md to DIR")
    parser.add_argument(
        "--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument(
        "--markdown", metavar="PATH", help="also write the table as Markdown to PATH")


def add_list_arguments(parser):
    """Options of `list` (none)."""


def add_results_arguments(parser):
    """Options of `results`."""
    parser.add_argument(
        "--seeds", type=bench._positive_int, default=3, metavar="N",
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

def _import_keras():
    tf, keras = bench.import_tensorflow_keras("compare")
    import tf_bf16

    return keras, tf, tf_bf16


def _variants(args):
    from tf_bf16.tasks.base import VARIANTS

    variants = list(args.variants) if args.variants else list(VARIANTS)
    if args.include_stock and STOCK not in variants:
        variants.append(STOCK)
    return variants


def _config(task, args):
    """Effective training settings: the task's, its reduced overrides, then the CLI's."""
    cfg = {"epochs": task.epochs, "learning_rate": task.learning_rate,
           "batch_size": task.batch_size, "steps_per_epoch": None,
           "optimizer": task.optimizer,
           "optimizer_kwargs": dict(getattr(task, "optimizer_kwargs", None) or {})}
    if args.reduced:
        for key, value in (task.reduced or {}).items():
            if key in cfg:
                cfg[key] = value
    if args.epochs is not None:
        cfg["epochs"] = args.epochs
    if args.steps is not None:
        cfg["steps_per_epoch"] = args.steps
    if args.learning_rate is not None:
        cfg["learning_rate"] = args.learning_rate
    if args.batch_size is not None:
        cfg["batch_size"] = args.batch_size
    return cfg


def _set_policy(variant, seed):
    keras, _, tf_bf16 = _import_keras()
    tf_bf16.reset_policy()
    if variant in ("nearest", STOCK):
        keras.config.set_dtype_policy("bfloat16")
    elif variant in ("stochastic", "kahan"):
        tf_bf16.set_policy(seed=seed)


def _make_optimizer(variant, cfg, seed):
    keras, _, tf_bf16 = _import_keras()
    name = cfg["optimizer"].lower()
    kwargs = dict(cfg["optimizer_kwargs"])
    kwargs["learning_rate"] = cfg["learning_rate"]
    if name == "sgd":
        kwargs.setdefault("momentum", 0.9)
    classes = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "lion": "Lion"}
    if name not in classes:
        raise ValueError(f"unknown task optimizer {cfg['optimizer']!r}; "
                         f"expected one of {', '.join(classes)}")
    if variant in ("float32", STOCK):
        return _with_dense_gradients(getattr(keras.optimizers, classes[name]))(**kwargs)
    return getattr(tf_bf16.optimizers, classes[name])(rounding=variant, seed=seed, **kwargs)


_DENSE_GRADIENT_CLASSES = {}


def _with_dense_gradients(optimizer_class):
    """The Keras optimizer class, applied to densified IndexedSlices gradients.

    Why: on the TensorFlow backend, Keras's Adam/AdamW square an IndexedSlices
    gradient (an Embedding's) occurrence by occurrence before summing duplicate
    rows, so ``v`` gets sum(g_k^2) instead of (sum g_k)^2 -- a different
    algorithm from its own dense update (and from Keras on JAX or PyTorch,
    whose gradients are dense). tf_bf16's optimizers follow the dense update.
    Without this, float32 and the bf16 variants would not run the same
    algorithm: on transformer_lm it alone moved float32's held-out bits/char by
    0.05. For SGD and Lion, whose updates are linear in the gradient, densifying
    changes nothing but the summation order of duplicate rows.
    """
    if optimizer_class not in _DENSE_GRADIENT_CLASSES:
        import tensorflow as tf

        def apply(self, grads, trainable_variables=None):
            grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
                     for g in grads]
            return optimizer_class.apply(self, grads, trainable_variables)

        _DENSE_GRADIENT_CLASSES[optimizer_class] = type(
            optimizer_class.__name__, (optimizer_class,),
            {"apply": apply, "__module__": optimizer_class.__module__,
             "__doc__": _with_dense_gradients.__doc__})
    return _DENSE_GRADIENT_CLASSES[optimizer_class]


def _first_batch_x(data, cfg):
    train = data.train
    if isinstance(train, (tuple, list)):
        return train[0][: cfg["batch_size"]]
    for x, _ in train.take(1):
        return x
    raise ValueError("the task's training dataset is empty")


def _ensure_built(model, data, cfg):
    if not model.built or not model.weights:
        model(_first_batch_x(data, cfg))


def _array_epoch(data, cfg, seed, epoch):
    import numpy as np

    x, y = data.train[0], data.train[1]
    n = len(x)
    order = np.random.RandomState(seed * 1000 + epoch).permutation(n)
    batch = cfg["batch_size"]
    steps = math.ceil(n / batch)
    if cfg["steps_per_epoch"] is not None:
        steps = min(steps, cfg["steps_per_epoch"])
        order = order[: steps * batch]
    return x[order], y[order], steps


def _steps_per_epoch(data, cfg):
    """Steps per epoch; None for a finite dataset of unknown length (one pass)."""
    if isinstance(data.train, (tuple, list)):
        n = len(data.train[0])
        steps = math.ceil(n / cfg["batch_size"])
        if cfg["steps_per_epoch"] is not None:
            steps = min(steps, cfg["steps_per_epoch"])
        return steps
    steps = data.steps_per_epoch
    cardinality = int(data.train.cardinality())
    if steps is None and cardinality >= 0:
        steps = cardinality
    if cfg["steps_per_epoch"] is not None:
        steps = cfg["steps_per_epoch"]
        if cardinality >= 0:
            steps = min(steps, cardinality)
    return steps


def _state_dtypes(keras, model, optimizer):
    """Dtypes of every model variable and every per-parameter optimizer variable."""
    names = set()
    for v in model.variables:
        names.add(keras.backend.standardize_dtype(v.dtype))
    for v in optimizer.variables:
        if len(v.shape) > 0:
            names.add(keras.backend.standardize_dtype(v.dtype))
    return sorted(names)


def _changed_fraction(model, initial):
    import numpy as np

    changed = total = 0
    for w0, v in zip(initial, model.trainable_variables):
        now = np.asarray(v.numpy(), dtype=np.float32)
        start = np.asarray(w0, dtype=np.float32)
        changed += int(np.sum(now != start))
        total += now.size
    return changed / total if total else 0.0


def _fmt_metric(task, value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    if "accuracy" in task.metric.lower():
        return f"{100 * value:.2f}%"
    return f"{value:.4g}"


def _fmt_gap(task, gap):
    if gap is None or math.isnan(gap):
        return "nan"
    if "accuracy" in task.metric.lower():
        return f"{100 * gap:+.2f} pp"
    return f"{gap:+.3g}"


# ---------------------------------------------------------------------------
# Training one variant.

class _Progress:
    """A keras Callback driving a tqdm bar over all steps of one variant."""

    def __new__(cls, keras, total, desc, disable, snapshot_at=None, evaluate_every=None,
                evaluate=None, steps_per_epoch=None, format_metric=str):
        from tqdm import tqdm

        class Callback(keras.callbacks.Callback):
            """Also copies the trainable weights before global step ``snapshot_at``
            (``self.snapshot``), to measure how many weights the last steps moved,
            and records ``evaluate()`` every ``evaluate_every`` steps inside an
            epoch (``self.points``: (global step, value); epoch ends excluded)."""

            def __init__(self):
                super().__init__()
                self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False,
                                disable=disable, dynamic_ncols=True)
                self.metric = None
                self.steps_done = 0
                self.snapshot = None
                self.points = []

            def on_train_batch_begin(self, batch, logs=None):
                if self.steps_done == snapshot_at:
                    import numpy as np
                    self.snapshot = [np.array(v.numpy(), dtype=np.float32)
                                     for v in self.model.trainable_variables]

            def on_train_batch_end(self, batch, logs=None):
                self.steps_done += 1
                self.bar.update(1)
                if (evaluate_every and (batch + 1) % evaluate_every == 0
                        and (steps_per_epoch is None or batch + 1 < steps_per_epoch)):
                    value = float(evaluate())
                    self.points.append((self.steps_done, value))
                    self.metric = format_metric(value)
                if logs and "loss" in logs and batch % 10 == 0:
                    post = {"loss": f"{float(logs['loss']):.4g}"}
                    if self.metric is not None:
                        post["metric"] = self.metric
                    self.bar.set_postfix(post, refresh=False)

            def close(self):
                self.bar.close()

        return Callback()


def train_variant(task, variant, seed, data, initial_weights, cfg, progress=True):
    """Trains one variant; returns a dict of results. Restores the float32 policy."""
    import numpy as np

    keras, tf, tf_bf16 = _import_keras()
    started = time.perf_counter()
    try:
        _set_policy(variant, seed)
        keras.utils.set_random_seed(seed)
        model = task.make_model(seed, reduced=cfg["reduced"])
        _ensure_built(model, data, cfg)
        model.set_weights(initial_weights)
        start_weights = [np.asarray(v.numpy(), dtype=np.float32)
                         for v in model.trainable_variables]
        optimizer = _make_optimizer(variant, cfg, seed)
        model.compile(optimizer=optimizer, loss=task.loss())
        steps = _steps_per_epoch(data, cfg)
        epochs = cfg["epochs"]
        total = None if steps is None else epochs * steps
        # The last LATE_FRACTION of the steps: where the paper locates the lost
        # updates (small steps late in training).
        late_start = None if total is None else total - max(1, round(LATE_FRACTION * total))
        curve_fn = task.curve if task.curve is not None else task.evaluate
        points = int(getattr(task, "curve_points_per_epoch", 1) or 1)
        evaluate_every = (steps // points if steps is not None and points > 1
                          and steps >= points else None)
        bar = _Progress(keras, total, f"{task.name} seed {seed} {LABELS[variant]:>16}",
                        not progress, snapshot_at=late_start, evaluate_every=evaluate_every,
                        evaluate=lambda: curve_fn(model, data), steps_per_epoch=steps,
                        format_metric=lambda value: _fmt_metric(task, value))
        curve, curve_steps, losses = [], [], []
        try:
            for epoch in range(epochs):
                keras.utils.set_random_seed(seed * 1000 + epoch)
                if isinstance(data.train, (tuple, list)):
                    x, y, _ = _array_epoch(data, cfg, seed, epoch)
                    history = model.fit(x, y, batch_size=cfg["batch_size"], epochs=1,
                                        shuffle=False, verbose=0, callbacks=[bar])
                else:
                    history = model.fit(data.train, epochs=1, steps_per_epoch=steps, shuffle=False,
                                        verbose=0, callbacks=[bar])
                losses.append(float(history.history["loss"][-1]))
                for step, value in bar.points:
                    curve.append(value)
                    curve_steps.append(step)
                bar.points.clear()
                value = float(curve_fn(model, data))
                curve.append(value)
                curve_steps.append(bar.steps_done)
                bar.metric = _fmt_metric(task, value)
        finally:
            bar.close()
        final = float(task.evaluate(model, data)) if task.curve is not None else curve[-1]
        report = tf_bf16.audit(model, optimizer=optimizer, trace=False)
        state = report.training_state
        result = {
            "variant": variant,
            "label": LABELS[variant],
            "seed": seed,
            "metric": final,
            "curve": curve,
            "curve_steps": curve_steps,  # optimizer steps done at each curve point
            "train_loss": losses,
            "steps": int(optimizer.iterations.numpy()),
            "steps_per_epoch": steps,
            "epochs": epochs,
            "optimizer": type(optimizer).__module__.split(".")[0] + "."
                         + type(optimizer).__name__
                         + (f"(rounding={optimizer.rounding!r})"
                            if getattr(optimizer, "rounding", None) else ""),
            "dtype_policy": keras.config.dtype_policy().name,
            "bytes_per_parameter": float(state.bytes_per_parameter),
            "trainable_parameters": int(state.trainable_parameters),
            "state_dtypes": _state_dtypes(keras, model, optimizer),
            "weights_changed_fraction": _changed_fraction(model, start_weights),
            # Share of trainable weights the last LATE_FRACTION of the steps changed
            # (None when the step count is unknown).
            "late_weights_changed_fraction": (
                None if bar.snapshot is None else _changed_fraction(model, bar.snapshot)),
            "finite": bool(math.isfinite(final) and all(math.isfinite(x) for x in losses)),
        }
    finally:
        tf_bf16.reset_policy()
    result["wall_s"] = time.perf_counter() - started
    return result


def initial_weights(task, seed, data, cfg):
    """The float32 model's initial weights for `seed` (shared by every variant)."""
    keras, _, tf_bf16 = _import_keras()
    tf_bf16.reset_policy()
    keras.utils.set_random_seed(seed)
    model = task.make_model(seed, reduced=cfg["reduced"])
    _ensure_built(model, data, cfg)
    return model.get_weights()


def run_task(task, seed, variants, cfg, progress=True):
    """All variants of one task and seed: {"variants": {name: result}, ...}."""
    _import_keras()
    data = task.make_data(seed, reduced=cfg["reduced"])
    weights = initial_weights(task, seed, data, cfg)
    out = {}
    for variant in variants:
        out[variant] = train_variant(task, variant, seed, data, weights, cfg, progress)
        # Facts about the data a reader needs to judge the metric (e.g. DLRM's
        # ground-truth log-loss floor); the same for every variant of a seed.
        out[variant]["task_info"] = dict(data.info)
    if "float32" in out:
        ref = out["float32"]["metric"]
        for r in out.values():
            r["gap_to_float32"] = r["metric"] - ref
    return out


# ---------------------------------------------------------------------------
# Machine and tables.

def _compare_table(task, results):
    header = ["variant", "optimizer", task.metric or "metric", "gap to float32",
              "B/param", "state dtypes", "weights moved", "last 10%", "wall s"]
    body = []
    for r in results.values():
        gap = r.get("gap_to_float32")
        body.append([r["label"], r["optimizer"], _fmt_metric(task, r["metric"]),
                     "-" if gap is None or r["variant"] == "float32" else _fmt_gap(task, gap),
                     f"{r['bytes_per_parameter']:.2f}", "/".join(r["state_dtypes"]),
                     f"{100 * r['weights_changed_fraction']:.1f}%",
                     "-" if r.get("late_weights_changed_fraction") is None
                     else f"{100 * r['late_weights_changed_fraction']:.1f}%",
                     f"{r['wall_s']:.1f}"])
    return header, body


def _heading(task, cfg, seed):
    better = "higher" if task.higher_is_better else "lower"
    return (f"{task.name}: {_sentence(task.summary)} Metric: {task.metric} ({better} is better). "
            f"{cfg['optimizer']} lr {cfg['learning_rate']}, {_epochs(cfg['epochs'])}, "
            f"batch {cfg['batch_size']}, seed {seed}"
            + (", reduced configuration" if cfg["reduced"] else ""))


def _plot_curves(path, task, curves_by_variant, title, steps_per_epoch=None, curve_steps=None):
    """curves_by_variant: variant -> list of curves (one per seed); mean +- std band.
    curve_steps: the optimizer step of each point (x axis); else epochs 1, 2, ...

    With a float32 variant, a second panel shows each variant minus float32
    (paired by seed): the differences that matter are often far smaller than
    the metric's range over training and invisible in the first panel.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    arrays = {v: np.array(c, dtype=np.float64) for v, c in curves_by_variant.items()}
    length = {a.shape[1] for a in arrays.values()}
    show_gap = "float32" in arrays and len(arrays) > 1 and len(length) == 1
    if curve_steps and len(length) == 1 and len(curve_steps) == length.pop():
        x = np.asarray(curve_steps)
        xlabel = "optimizer step" + (f" ({steps_per_epoch} per epoch)" if steps_per_epoch else "")
    else:
        x = None
        xlabel = "epoch" + (f" ({steps_per_epoch} steps each)" if steps_per_epoch else "")
    fig, axes = plt.subplots(1, 2 if show_gap else 1, figsize=(12 if show_gap else 7, 4.5),
                             squeeze=False)
    ax = axes[0][0]
    values = np.concatenate([a.ravel() for a in arrays.values()])
    log_scale = (not task.higher_is_better and np.all(np.isfinite(values))
                 and np.all(values > 0))

    def band(axis, variant, arr, min_max=False):
        xs = x if x is not None else np.arange(1, arr.shape[1] + 1)
        mean = arr.mean(0)
        axis.plot(xs, mean, label=LABELS[variant], color=COLORS.get(variant), marker=".")
        if arr.shape[0] > 1:
            if min_max:
                low, high = arr.min(0), arr.max(0)
            else:
                std = arr.std(0, ddof=1)
                low, high = mean - std, mean + std
            axis.fill_between(xs, low, high, alpha=0.2, color=COLORS.get(variant))

    # On a log axis a mean - std band can reach zero or below: show min..max.
    for variant, arr in arrays.items():
        band(ax, variant, arr, min_max=log_scale)
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(task.metric)
    several = any(a.shape[0] > 1 for a in arrays.values())
    ax.set_title(title + ("" if not several else
                          " (band: min..max)" if log_scale else " (band: +- std)"),
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if show_gap:
        gap_ax = axes[0][1]
        scale = 100.0 if "accuracy" in task.metric.lower() else 1.0
        # Stock Keras's gap (it may not train at all) would flatten the others.
        for variant, arr in arrays.items():
            if variant not in ("float32", STOCK):
                band(gap_ax, variant, scale * (arr - arrays["float32"]))
        gap_ax.axhline(0.0, color=COLORS["float32"], linewidth=1)
        gap_ax.set_xlabel(xlabel)
        gap_ax.set_ylabel(f"gap ({'pp' if scale == 100 else task.metric}; "
                          + ("higher" if task.higher_is_better else "lower") + " is better)")
        gap_ax.set_title("variant - float32, paired by seed" + (" (mean +- std)" if several else "")
                         + (" (stock Keras: left only)" if STOCK in arrays else ""),
                         fontsize=10)
        gap_ax.grid(True, alpha=0.3)
        gap_ax.legend()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _write_json(path, obj):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_jsonable(obj), f, indent=1)
        f.write("\n")


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

def run(args):
    """`compare`: trains the task's variants, prints the table, writes outputs."""
    from tf_bf16 import tasks as tasks_module

    try:
        task = tasks_module.get_task(args.task)
    except KeyError as e:
        print(e.args[0], file=sys.stderr)
        return 2
    message = task.available()
    if message:
        print(f"task {task.name} cannot run here: {message}", file=sys.stderr)
        return 2
    keras, tf, _ = _import_keras()
    cfg = _config(task, args)
    cfg["reduced"] = bool(args.reduced)
    variants = _variants(args)
    started = time.perf_counter()
    results = run_task(task, args.seed, variants, cfg, progress=not args.no_progress)
    elapsed = time.perf_counter() - started
    summary = {
        "task": task.name, "summary": task.summary, "metric": task.metric,
        "higher_is_better": task.higher_is_better, "seed": args.seed,
        "config": cfg, "variants": results, "elapsed_s": elapsed,
        "machine": bench._machine_info(tf, keras), "command": _command_line(args, "compare"),
    }
    header, body = _compare_table(task, results)
    lines = [_heading(task, cfg, args.seed),
             f"machine: {bench._machine_line(summary['machine'])}", "",
             bench._text_table(header, body, left=(0, 1, 5)), "",
             "gap: variant - float32; B/param: training-state bytes per parameter (trainable "
             "weights + optimizer slots + Kahan buffers, from the variables); weights moved: "
             "share of trainable weights that differ from their initial value; last 10%: "
             "share that the last 10% of the steps changed (round-to-nearest leaves a weight "
             "untouched when every update was below half an ulp of it).",
             NEAREST_FOOTNOTE]
    info = next(iter(results.values()))["task_info"]
    if info:
        lines.append(f"data: {_info_text(info)}")
    lines.append(f"total {elapsed:.1f} s")
    text = "\n".join(lines)
    print(text, flush=True)
    md = _compare_markdown(task, cfg, args.seed, summary, header, body)
    out_files = []
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        png = os.path.join(args.out, "curves.png")
        first = next(iter(results.values()))
        _plot_curves(png, task, {v: [r["curve"]] for v, r in results.items()},
                     f"{task.name}, seed {args.seed}", first["steps_per_epoch"],
                     first.get("curve_steps"))
        _write_json(os.path.join(args.out, "results.json"), summary)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(md + "\n![learning curves](curves.png)\n")
        out_files += [png, os.path.join(args.out, "results.json"),
                      os.path.join(args.out, "results.md")]
    if args.json:
        _write_json(args.json, summary)
        out_files.append(args.json)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(md)
        out_files.append(args.markdown)
    if out_files:
        print("wrote " + ", ".join(out_files))
    return 0


def _info_text(info):
    """Task facts (TaskData.info) as 'key = value; ...'."""
    return "; ".join(f"{k} = {_fmt_info(v)}" for k, v in info.items())


def _fmt_info(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _compare_markdown(task, cfg, seed, summary, header, body):
    info = next(iter(summary["variants"].values()))["task_info"]
    return "\n".join([
        f"### {task.name}", "", _heading(task, cfg, seed) + ".", "",
        bench._markdown_table(header, body, left=(0, 1, 5)), "",
        "Gap: variant - float32. B/param: training-state bytes per parameter (trainable "
        "weights + optimizer slots + Kahan buffers, from the variables). Weights moved: share "
        "of trainable weights that differ from their initial value; last 10%: share that the "
        "last 10% of the steps changed. " + NEAREST_FOOTNOTE,
        ""] + ([f"Data: {_info_text(info)}.", ""] if info else []) + [
        f"Machine: {bench._machine_line(summary['machine'])}. Command: `{summary['command']}`. "
        f"Total {summary['elapsed_s']:.1f} s.", ""])


# ---------------------------------------------------------------------------
# list

def run_list(args):
    """`list`: one line per task."""
    from tf_bf16 import tasks as tasks_module

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
    print(bench._text_table(header, body, left=(0, 1, 2, 6, 7, 8)))
    for name, message in missing:
        print(f"\n{name} cannot run here:\n  " + message.strip().replace("\n", "\n  "))
    return 0


# ---------------------------------------------------------------------------
# results

def _mean_std(values):
    values = [float(v) for v in values]
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _mean_or_none(values):
    values = list(values)
    return None if any(v is None for v in values) else statistics.fmean(values)


def tolerance(task, float32_mean):
    """Absolute tolerance on the gap: 0.5 pp for accuracy, else 1% relative."""
    if "accuracy" in task.metric.lower():
        return 0.005, "0.5 pp"
    return 0.01 * abs(float32_mean), "1% rel."


def summarize(task, per_seed, variants):
    """per_seed: list of run_task outputs. Returns per-variant statistics.

    The gap of a seed is variant - float32 for that seed (the same seed gives
    every variant the same initial weights and data order); ``gap`` is their
    mean (= difference of the means). A variant is within seed noise of
    float32 when |gap| <= 2 std of float32's own results over the seeds (the
    noise a float32 rerun with another seed shows), or |gap| <= the task's
    tolerance (see ``tolerance``). The std of the paired gaps is reported too,
    but not used for the verdict: a variant that is consistently worse by a
    seed-dependent amount would otherwise "match".
    """
    stats = {}
    ref = None
    if "float32" in variants:
        ref = [r["float32"]["metric"] for r in per_seed]
    for v in variants:
        values = [r[v]["metric"] for r in per_seed]
        mean, std = _mean_std(values)
        entry = {"values": values, "mean": mean, "std": std,
                 "bytes_per_parameter": per_seed[0][v]["bytes_per_parameter"],
                 "wall_s_mean": statistics.fmean(r[v]["wall_s"] for r in per_seed),
                 "weights_moved_mean": statistics.fmean(
                     r[v]["weights_changed_fraction"] for r in per_seed),
                 "late_weights_moved_mean": _mean_or_none(
                     r[v].get("late_weights_changed_fraction") for r in per_seed)}
        if ref is not None:
            gaps = [a - b for a, b in zip(values, ref)]
            gap, gap_std = _mean_std(gaps)
            tol, tol_text = tolerance(task, statistics.fmean(ref))
            _, float32_std = _mean_std(ref)
            entry.update({"gaps": gaps, "gap": gap, "gap_std": gap_std,
                          "two_std": 2 * float32_std, "tolerance": tol,
                          "tolerance_text": tol_text,
                          "matches_float32": bool(math.isfinite(gap) and (
                              abs(gap) <= 2 * float32_std or abs(gap) <= tol))})
        stats[v] = entry
    return stats


def run_results(args):
    """`results`: every task x variant x seed, docs/results.md."""
    from tf_bf16 import tasks as tasks_module

    all_tasks = tasks_module.all_tasks()
    if args.from_json:
        return _render_results(args.from_json, args.output, all_tasks)
    keras, tf, _ = _import_keras()
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
    report = {"tasks": {}, "unavailable": {}, "variants": variants, "seeds": args.seeds,
              "reduced": bool(args.reduced), "machine": bench._machine_info(tf, keras),
              "command": _command_line(args, "results"),
              "started": started_at}
    for name in names:
        task = all_tasks[name]
        message = task.available()
        if message:
            report["unavailable"][name] = message
            print(f"skipping {name}: {message}", file=sys.stderr)
            continue
        cfg = _config(task, args)
        cfg["reduced"] = bool(args.reduced)
        per_seed = []
        task_started = time.perf_counter()
        for seed in range(args.seeds):
            per_seed.append(run_task(task, seed, variants, cfg, progress=not args.no_progress))
        stats = summarize(task, per_seed, variants)
        png = _plot_task(out_dir, name, task, per_seed, variants)
        report["tasks"][name] = {
            "summary": task.summary, "metric": task.metric,
            "higher_is_better": task.higher_is_better,
            "paper_application": task.paper_application, "config": cfg,
            "stats": stats, "runs": per_seed, "plot": png,
            "elapsed_s": time.perf_counter() - task_started,
        }
        print(f"{name}: " + ", ".join(
            f"{LABELS[v]} {_fmt_metric(task, s['mean'])} +- {_fmt_metric(task, s['std'])}"
            for v, s in stats.items()), flush=True)
    report["elapsed_s"] = time.perf_counter() - started
    _write_json(os.path.join(out_dir, "results.json"), report)
    markdown = _results_markdown(report, all_tasks, args.output)
    with open(args.output, "w") as f:
        f.write(markdown)
    print(f"wrote {args.output} and {out_dir}/")
    return 0


def _plot_task(out_dir, name, task, per_seed, variants):
    """<out_dir>/<name>.png: the task's curves over all seeds; returns its path."""
    png = os.path.join(out_dir, f"{name}.png")
    first = per_seed[0][variants[0]]
    _plot_curves(png, task, {v: [r[v]["curve"] for r in per_seed] for v in variants},
                 f"{name}: mean over {len(per_seed)} seed(s)", first["steps_per_epoch"],
                 first.get("curve_steps"))
    return png


def _render_results(json_path, output, all_tasks):
    """`results --from-json`: the report and plots of an earlier run, no training."""
    try:
        with open(json_path) as f:
            report = json.load(f)
    except (OSError, ValueError) as e:
        print(f"cannot read {json_path}: {e}", file=sys.stderr)
        return 2
    unknown = [name for name in report.get("tasks", {}) if name not in all_tasks]
    if unknown:
        print(f"{json_path} has tasks this version does not know: {', '.join(unknown)}",
              file=sys.stderr)
        return 2
    out_dir = os.path.join(os.path.dirname(os.path.abspath(output)), "results")
    os.makedirs(out_dir, exist_ok=True)
    variants = report["variants"]
    for name, entry in report["tasks"].items():
        task = all_tasks[name]
        per_seed = entry["runs"]
        entry["stats"] = summarize(task, per_seed, variants)
        entry["plot"] = _plot_task(out_dir, name, task, per_seed, variants)
    new_json = os.path.join(out_dir, "results.json")
    if os.path.abspath(new_json) != os.path.abspath(json_path):
        _write_json(new_json, report)
    with open(output, "w") as f:
        f.write(_results_markdown(report, all_tasks, output))
    print(f"wrote {output} and {out_dir}/ from {json_path}")
    return 0


def _table_cell(text):
    """One Markdown table cell: no line breaks, no unescaped pipes."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _epochs(count):
    return f"{count} epoch" + ("" if count == 1 else "s")


def _sentence(text):
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def _pm(task, mean, std):
    if "accuracy" in task.metric.lower():
        return f"{100 * mean:.2f} ± {100 * std:.2f}%"
    return f"{mean:.4g} ± {std:.2g}"


def _results_markdown(report, all_tasks, output):
    variants = report["variants"]
    m = report["machine"]
    out = ["# Results: float32 vs pure-bf16 training with nearest, stochastic and Kahan "
           "rounding", "",
           "Generated by `python -m tf_bf16 results` — do not edit by hand. Regenerate with:", "",
           f"```\n{report['command']}\n```", "",
           f"Started {report['started']}; {report['elapsed_s'] / 60:.1f} min in all. "
           f"{report['seeds']} seed(s) per task and variant (seeds 0..{report['seeds'] - 1}); "
           "each seed fixes the initial weights, the data order and the rounding's random bits, "
           "the same for every variant."
           + (" **Reduced configurations** (CI sizes), not the full tasks." if report["reduced"]
              else ""), "",
           f"Machine: {bench._machine_line(m)}.", ""]
    header = ["task", "metric"] + [LABELS[v] for v in variants]
    body = []
    for name, entry in report["tasks"].items():
        task = all_tasks[name]
        row = [name, f"{task.metric} ({'↑' if task.higher_is_better else '↓'})"]
        for v in variants:
            s = entry["stats"][v]
            cell = _pm(task, s["mean"], s["std"])
            if v != "float32" and "gap" in s:
                cell += (f" (gap {_fmt_gap(task, s['gap'])}, "
                         f"{'✓' if s['matches_float32'] else '✗'})")
            row.append(cell)
        body.append(row)
    out += ["## Summary", "", "Mean ± std over seeds; gap = variant mean − float32 mean "
            "(= mean over seeds of the paired gap: the same seed gives every variant the same "
            "initial weights and data order); ✓ = |gap| ≤ 2 std of float32's results over the seeds, or within "
            "tolerance (0.5 percentage points of accuracy; 1% relative for lower-is-better "
            "metrics), ✗ = not. With few seeds 2 std is wide: read the per-seed values below.",
            ""]
    if body:
        out += [bench._markdown_table(header, body, left=(0, 1)), ""]
    else:
        out += ["No task could run.", ""]
    if os.path.exists(os.path.join(os.path.dirname(os.path.abspath(output)), DISCUSSION)):
        out += [f"What these numbers mean, task by task (hand-written; check it against the "
                f"numbers above after a regeneration): [{DISCUSSION}]({DISCUSSION}).", ""]
    out += ["Variants: float32 = Keras float32 policy with the stock Keras optimizer "
            "(sparse Embedding gradients densified, so that Keras's Adam computes its dense "
            "update, as the tf_bf16 optimizers do; see `compare --help`); "
            "bf16 SR / Kahan = `tf_bf16.set_policy()` (every variable bf16, BatchNorm "
            "statistics stored with stochastic rounding) with the tf_bf16 optimizer and that "
            "rounding. " + NEAREST_FOOTNOTE, ""]
    if report["unavailable"]:
        out += ["## Tasks not run", "", "| task | why |", "| --- | --- |"]
        for name, message in report["unavailable"].items():
            out.append(f"| {name} | {_table_cell(message)} |")
        out.append("")
    for name, entry in report["tasks"].items():
        task = all_tasks[name]
        cfg = entry["config"]
        rel = os.path.relpath(entry["plot"], os.path.dirname(os.path.abspath(output)))
        out += [f"## {name}", "", _sentence(task.summary)
                + (f" Paper application: {task.paper_application}." if task.paper_application
                   else ""),
                f"Metric: {task.metric} ({'higher' if task.higher_is_better else 'lower'} is "
                f"better). {cfg['optimizer']} lr {cfg['learning_rate']}, "
                f"{_epochs(cfg['epochs'])}, batch {cfg['batch_size']}"
                + (f", {cfg['steps_per_epoch']} steps/epoch" if cfg["steps_per_epoch"] else "")
                + f"; {entry['elapsed_s']:.0f} s for all runs.", ""]
        h = ["variant", "mean ± std", "per seed", "gap to float32", "2 std float32", "tolerance",
             "matches", "weights moved", "moved in last 10%", "B/param", "wall s/run"]
        b = []
        for v in variants:
            s = entry["stats"][v]
            b.append([LABELS[v], _pm(task, s["mean"], s["std"]),
                      ", ".join(_fmt_metric(task, x) for x in s["values"]),
                      "-" if v == "float32" or "gap" not in s else _fmt_gap(task, s["gap"]),
                      "-" if v == "float32" or "two_std" not in s
                      else _fmt_gap(task, s["two_std"]).lstrip("+"),
                      "-" if "tolerance" not in s else s["tolerance_text"],
                      "-" if v == "float32" or "gap" not in s else
                      ("yes" if s["matches_float32"] else "no"),
                      f"{100 * s['weights_moved_mean']:.1f}%",
                      "-" if s["late_weights_moved_mean"] is None
                      else f"{100 * s['late_weights_moved_mean']:.1f}%",
                      f"{s['bytes_per_parameter']:.2f}", f"{s['wall_s_mean']:.1f}"])
        info = entry["runs"][0][variants[0]].get("task_info") or {}
        out += [bench._markdown_table(h, b, left=(0, 1, 2, 5, 6)), "",
                "2 std float32: twice the std of float32's results over the seeds. Weights "
                "moved: share of trainable weights that differ from their initial value at "
                "the end; moved in last 10%: share that the last 10% of the steps changed "
                "(means over seeds). Round-to-nearest leaves a weight untouched when every "
                "update it received was below half an ulp of it.", ""]
        if info:
            out += [f"Data (seed 0): {_info_text(info)}.", ""]
        out += [f"![{name} learning curves]({rel})", ""]
    return "\n".join(out)
