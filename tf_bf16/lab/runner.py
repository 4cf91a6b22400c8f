"""Training the variants of a task: what ``python -m tf_bf16 compare`` and
``results`` run, and what ``tf_bf16.compare`` runs on the user's own model (the
command line is tf_bf16/lab/cli.py, tables and plots tf_bf16/lab/report.py,
the user's model and data tf_bf16/lab/own_model.py).

``run_task(task, seed, variants, cfg)`` trains the same model, with the same
initial weights, data order and seed, once per variant
(``tf_bf16.lab.tasks.VARIANTS``, plus ``STOCK``):

- ``float32``: Keras's default float32 policy and the stock Keras optimizer
  (``keras.optimizers.SGD(momentum=0.9)``, ``Adam``, ``AdamW`` or ``Lion``, per
  task), given densified sparse gradients (see ``_with_dense_gradients``);
- ``mixed_bfloat16``: Keras's ``"mixed_bfloat16"`` policy (float32 variables,
  bf16 compute) and the same stock Keras optimizer with densified sparse
  gradients: the usual alternative to pure bf16, float32 master weights and
  optimizer state;
- ``nearest``: Keras's ``"bfloat16"`` policy and the tf_bf16 optimizer with
  ``rounding="nearest"``: what plain bf16 training gives, minus Keras's bf16
  Adam bug (stock Keras Adam never moves a weight in pure bf16 because
  ``beta_2 = 0.999`` rounds to 1.0; ``--include-stock`` adds that column,
  ``stock``: the ``"bfloat16"`` policy with the stock Keras optimizer);
- ``stochastic`` / ``kahan``: ``tf_bf16.set_policy()`` (strict; BatchNorm
  moving statistics stored with stochastic rounding; ``cfg["keep_float32"]``
  patterns kept in float32) and the tf_bf16 optimizer with that rounding.

Same initial weights: the model is built once under the float32 policy after
``keras.utils.set_random_seed(seed)``; every variant builds its own model under
its policy and receives those weights (``set_weights``: rounded to nearest
bf16 for the bf16 variants). Same data order: ``Task.make_data(seed)`` is
called once per seed and shared; for array data the runner shuffles every
epoch with ``numpy.random.RandomState(seed * 1000 + epoch)``, the same for all
variants; before every epoch it calls ``keras.utils.set_random_seed(seed * 1000
+ epoch)``, so a dataset whose order follows TensorFlow's global seed repeats
it. Keras's global dtype policy is restored (``tf_bf16.reset_policy()``)
after each run. A variant that fails raises ``VariantError``, which names the
variant, what it was doing and what to try.

Training-state bytes per parameter come from ``tf_bf16.audit(model,
optimizer=..., trace=False)`` (trainable weights + per-parameter optimizer
slots + Kahan buffers, over trainable parameters).

TaskData.train may be a tuple ``(x, y)`` of arrays (``x`` may be a dict or list
of arrays, for models with several inputs; batched and shuffled by the
runner, see above) or a ``tf.data.Dataset`` of ``(x, y)`` batches in a fixed
order (then ``steps_per_epoch`` says how many batches make an epoch; it is
required for an infinite dataset).

What depends on the Keras backend (TensorFlow here) sits in its own functions:
the dense-gradient optimizer wrapper (``_with_dense_gradients``), the
``tf.data`` handling (``is_dataset``, ``_dataset_first_x``,
``_dataset_cardinality``) and the weight transfer (``_set_initial_weights``).

Not for the command line or the outputs; TensorFlow, Keras and tqdm are
imported when training starts, not when this module is imported.
"""

import math
import time

from tf_bf16.lab import common
from tf_bf16.lab import report
from tf_bf16.lab.tasks.base import MIXED, STOCK

# The variants trained with the stock Keras optimizer (densified sparse gradients).
KERAS_OPTIMIZER_VARIANTS = ("float32", MIXED, STOCK)
# Optimizer names -> class name, the same in keras.optimizers and tf_bf16.optimizers.
OPTIMIZER_CLASSES = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "lion": "Lion"}

# The last share of the steps in which the runner counts the weights that still
# move: where the paper locates the lost updates (small steps late in training).
LATE_FRACTION = 0.1


def import_keras():
    """(keras, tf, tf_bf16), with Keras on its TensorFlow backend."""
    tf, keras = common.import_tensorflow_keras("compare")
    import tf_bf16

    return keras, tf, tf_bf16


def training_config(task, args):
    """Effective training settings: the task's, its reduced overrides (when
    ``args.reduced``), then ``args.epochs``, ``.steps``, ``.learning_rate`` and
    ``.batch_size`` where not None (the command line's overrides).

    A task's "sgd" is SGD with momentum 0.9 unless its optimizer_kwargs set
    the momentum."""
    kwargs = dict(getattr(task, "optimizer_kwargs", None) or {})
    if task.optimizer.lower() == "sgd":
        kwargs.setdefault("momentum", 0.9)
    cfg = {"epochs": task.epochs, "learning_rate": task.learning_rate,
           "batch_size": task.batch_size, "steps_per_epoch": None,
           "optimizer": task.optimizer, "optimizer_kwargs": kwargs}
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


# ---------------------------------------------------------------------------
# Policy and optimizer of a variant.

def _set_policy(variant, seed, cfg):
    # Keras and tf_bf16 as imported (the JAX runner uses this too).
    import keras
    import tf_bf16
    from tf_bf16 import keras_hooks

    tf_bf16.reset_policy()
    # nearest: Embedding gradients summed in float32 as under the policy of SR and
    # Kahan (JAX backend; nothing changes on TensorFlow), so that it differs from
    # them in the weight rounding only.
    keras_hooks.float32_embedding_gradients(variant == "nearest")
    if variant == "nearest":
        keras.config.set_dtype_policy("bfloat16")
    elif variant == STOCK:
        keras.config.set_dtype_policy("bfloat16")
    elif variant == MIXED:
        keras.config.set_dtype_policy("mixed_bfloat16")
    elif variant in ("stochastic", "kahan"):
        tf_bf16.set_policy(seed=seed, keep_float32=tuple(cfg.get("keep_float32") or ()))


def make_optimizer(variant, cfg, seed):
    """The optimizer of one variant: stock Keras (float32, mixed_bfloat16, stock;
    densified sparse gradients on TensorFlow; JAX's are dense) or tf_bf16 with the
    variant's rounding.

    ``cfg["optimizer"]`` names the class (``OPTIMIZER_CLASSES``);
    ``cfg["optimizer_kwargs"]`` are its arguments, the same for both libraries
    (a learning-rate schedule may be given serialized, as in
    ``optimizer.get_config()``); ``cfg["learning_rate"]``, when not None,
    overrides theirs.
    """
    import keras
    import tf_bf16

    name = cfg["optimizer"].lower()
    if name not in OPTIMIZER_CLASSES:
        raise ValueError(f"unknown optimizer {cfg['optimizer']!r}; "
                         f"expected one of {', '.join(OPTIMIZER_CLASSES)}")
    kwargs = dict(cfg.get("optimizer_kwargs") or {})
    if cfg.get("learning_rate") is not None:
        kwargs["learning_rate"] = cfg["learning_rate"]
    class_name = OPTIMIZER_CLASSES[name]
    # from_config: the arguments, with a serialized learning-rate schedule revived.
    if variant in KERAS_OPTIMIZER_VARIANTS:
        keras_class = getattr(keras.optimizers, class_name)
        if keras.backend.backend() == "tensorflow":
            keras_class = _with_dense_gradients(keras_class)
        return keras_class.from_config(kwargs)
    kwargs.update(rounding=variant, seed=seed)
    return getattr(tf_bf16.optimizers, class_name).from_config(kwargs)


# ---------------------------------------------------------------------------
# What depends on the Keras backend (TensorFlow): the dense-gradient wrapper,
# tf.data, the weight transfer.

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


def is_dataset(value):
    """Whether `value` is a tf.data.Dataset."""
    import tensorflow as tf

    return isinstance(value, tf.data.Dataset)


def _dataset_first_x(dataset):
    for batch in dataset.take(1):
        return batch[0]
    raise ValueError("the training dataset is empty")


def _dataset_cardinality(dataset):
    """The number of batches; -1 infinite, -2 unknown (tf.data's constants)."""
    return int(dataset.cardinality())


def _set_initial_weights(model, weights):
    """The shared initial weights into a variant's model (cast to its dtypes:
    round to nearest for bfloat16 variables)."""
    model.set_weights(weights)


# ---------------------------------------------------------------------------
# Data.

def map_arrays(function, x):
    """`function` applied to every array of `x` (an array, or a dict/list/tuple of them)."""
    import keras

    return keras.tree.map_structure(function, x)


def array_length(x):
    """The number of examples of `x` (an array, or a dict/list/tuple of arrays)."""
    import keras

    return len(keras.tree.flatten(x)[0])


def _first_batch_x(data, cfg):
    train = data.train
    if isinstance(train, (tuple, list)):
        return map_arrays(lambda a: a[: cfg["batch_size"]], train[0])
    return _dataset_first_x(train)


def _ensure_built(model, data, cfg):
    if not model.built or not model.weights:
        model(_first_batch_x(data, cfg))


def _array_epoch(data, cfg, seed, epoch):
    import numpy as np

    x, y = data.train[0], data.train[1]
    n = array_length(x)
    order = np.random.RandomState(seed * 1000 + epoch).permutation(n)
    batch = cfg["batch_size"]
    steps = math.ceil(n / batch)
    if cfg["steps_per_epoch"] is not None:
        steps = min(steps, cfg["steps_per_epoch"])
        order = order[: steps * batch]
    return map_arrays(lambda a: a[order], x), map_arrays(lambda a: a[order], y), steps


def _steps_per_epoch(data, cfg):
    """Steps per epoch; None for a finite dataset of unknown length (one pass)."""
    if isinstance(data.train, (tuple, list)):
        n = array_length(data.train[0])
        steps = math.ceil(n / cfg["batch_size"])
        if cfg["steps_per_epoch"] is not None:
            steps = min(steps, cfg["steps_per_epoch"])
        return steps
    steps = data.steps_per_epoch
    cardinality = _dataset_cardinality(data.train)
    if steps is None and cardinality >= 0:
        steps = cardinality
    if cfg["steps_per_epoch"] is not None:
        steps = cfg["steps_per_epoch"]
        if cardinality >= 0:
            steps = min(steps, cardinality)
    return steps


# ---------------------------------------------------------------------------
# Measurements.

def optimizer_label(optimizer):
    """`keras.Adam`, `tf_bf16.Adam(rounding='kahan')`: the optimizer of a result row."""
    rounding = getattr(optimizer, "rounding", None)
    return (type(optimizer).__module__.split(".")[0] + "." + type(optimizer).__name__
            + (f"(rounding={rounding!r})" if rounding else ""))


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


# ---------------------------------------------------------------------------
# Failures.

# What each variant is, for a failure message.
_VARIANT_SETUPS = {
    "float32": "Keras's float32 policy, stock Keras optimizer",
    MIXED: "Keras's \"mixed_bfloat16\" policy, stock Keras optimizer",
    "nearest": "Keras's \"bfloat16\" policy, tf_bf16 optimizer with rounding=\"nearest\"",
    STOCK: "Keras's \"bfloat16\" policy, stock Keras optimizer",
    "stochastic": "tf_bf16.set_policy(), tf_bf16 optimizer with rounding=\"stochastic\"",
    "kahan": "tf_bf16.set_policy(), tf_bf16 optimizer with rounding=\"kahan\"",
}
_BF16_ADVICE = (
    "Under a bfloat16 policy every layer computes in bfloat16: look for an op without a "
    "bfloat16 kernel (e.g. a QR-based initializer such as \"orthogonal\": pass another "
    "one) or for float32 tensors or constants mixed with the layer's bfloat16 inputs "
    "(create them with the layer's compute dtype).")
_ADVICE = {
    "float32": "The model fails in float32 too: check build_model and the data with a plain "
               "model.fit first.",
    MIXED: "Under \"mixed_bfloat16\" the variables are float32 and the layers compute in "
           "bfloat16: look for float32 tensors or constants mixed with the layers' bfloat16 "
           "outputs (cast them to the layer's compute dtype).",
    "nearest": _BF16_ADVICE,
    STOCK: _BF16_ADVICE,
    "stochastic": _BF16_ADVICE + " tf_bf16.set_policy() also refuses float32 per-parameter "
                  "state (a StrictPolicyError names each variable): keep chosen layers in "
                  "float32 with keep_float32=[regex] (command line: --keep-float32).",
}
_ADVICE["kahan"] = _ADVICE["stochastic"]


class VariantError(RuntimeError):
    """A variant failed: names it, its setup, the stage, the error and what to try.

    The original exception is the ``__cause__``; ``variant`` and ``stage`` are
    attributes.
    """

    def __init__(self, variant, stage, task_name, cause):
        self.variant = variant
        self.stage = stage
        others = ", ".join(v for v in ("float32", MIXED, "nearest", "stochastic", "kahan")
                           if v != variant)
        super().__init__(
            f"{task_name}: variant {variant!r} ({_VARIANT_SETUPS.get(variant, variant)}) "
            f"failed while {stage}: {type(cause).__name__}: {cause}\n"
            f"{_ADVICE.get(variant, '')} To compare without it, leave it out of the variants "
            f"(variants=[...] / --variants, e.g. {others}).")


# ---------------------------------------------------------------------------
# Training one variant.

class _Progress:
    """A keras Callback driving a tqdm bar over all steps of one variant."""

    def __new__(cls, keras, total, desc, disable, snapshot_at=None, evaluate_every=None,
                evaluate=None, steps_per_epoch=None, format_metric=str):
        class Callback(keras.callbacks.Callback):
            """Also copies the trainable weights before global step ``snapshot_at``
            (``self.snapshot``), to measure how many weights the last steps moved,
            and records ``evaluate()`` every ``evaluate_every`` steps inside an
            epoch (``self.points``: (global step, value); epoch ends excluded)."""

            def __init__(self):
                super().__init__()
                self.bar = common.progress(total, desc, disable, unit="step")
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


def _reporting_failures(task, variant, work, *args):
    """``work(*args, stage)`` under the variant's policy, restored afterwards;
    any failure becomes a ``VariantError`` naming the stage that ``work``
    reported last through ``stage(name)``."""
    _, _, tf_bf16 = import_keras()
    current = ["setting its dtype policy"]

    def stage(name):
        current[0] = name

    try:
        return work(*args, stage)
    except (KeyboardInterrupt, VariantError):
        raise
    except Exception as e:
        raise VariantError(variant, current[0], task.name, e) from e
    finally:
        tf_bf16.reset_policy()


def train_variant(task, variant, seed, data, initial_weights, cfg, progress=True):
    """Trains one variant; returns a dict of results. Restores the float32 policy.

    Raises ``VariantError`` (the cause chained) if the variant fails."""
    return _reporting_failures(task, variant, _train_variant, task, variant, seed, data,
                               initial_weights, cfg, progress)


def try_variant(task, variant, seed, data, initial_weights, cfg):
    """Builds and compiles the variant's model as ``train_variant`` does and
    runs one training step on the first batch, on a throwaway model: a model
    that cannot train under the variant's policy fails here (``VariantError``),
    before hours of other variants. Restores the float32 policy."""
    def work(stage):
        model, _, _ = _build_variant(task, variant, seed, data, initial_weights, cfg, stage)
        stage("running one trial training step (before any variant trained)")
        if isinstance(data.train, (tuple, list)):
            x = map_arrays(lambda a: a[: cfg["batch_size"]], data.train[0])
            y = map_arrays(lambda a: a[: cfg["batch_size"]], data.train[1])
            model.train_on_batch(x, y)
        else:
            model.train_on_batch(*next(iter(data.train)))

    _reporting_failures(task, variant, work)


def _build_variant(task, variant, seed, data, initial_weights, cfg, stage):
    """The variant's model (its policy set), with the shared weights, compiled;
    returns (model, optimizer, the trainable weights at the start as float32)."""
    import numpy as np

    keras, _, _ = import_keras()
    _set_policy(variant, seed, cfg)
    stage("building the model")
    keras.utils.set_random_seed(seed)
    model = task.make_model(seed, reduced=cfg["reduced"])
    _ensure_built(model, data, cfg)
    stage("setting the shared initial weights (build_model must build the same "
          "architecture every call)")
    _set_initial_weights(model, initial_weights)
    start_weights = [np.asarray(v.numpy(), dtype=np.float32)
                     for v in model.trainable_variables]
    stage("creating the optimizer and compiling")
    optimizer = make_optimizer(variant, cfg, seed)
    model.compile(optimizer=optimizer, **task.compile_arguments(model))
    return model, optimizer, start_weights


def _train_variant(task, variant, seed, data, initial_weights, cfg, progress, stage):
    keras, _, tf_bf16 = import_keras()
    started = time.perf_counter()
    model, optimizer, start_weights = _build_variant(task, variant, seed, data,
                                                     initial_weights, cfg, stage)
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
    bar = _Progress(keras, total, f"{task.name} seed {seed} {report.LABELS[variant]:>16}",
                    not progress, snapshot_at=late_start, evaluate_every=evaluate_every,
                    evaluate=lambda: curve_fn(model, data), steps_per_epoch=steps,
                    format_metric=lambda value: report.format_metric(task, value))
    curve, curve_steps, losses = [], [], []
    try:
        for epoch in range(epochs):
            stage(f"training (epoch {epoch + 1})")
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
            stage(f"evaluating (epoch {epoch + 1})")
            value = float(curve_fn(model, data))
            curve.append(value)
            curve_steps.append(bar.steps_done)
            bar.metric = report.format_metric(task, value)
    finally:
        bar.close()
    stage("evaluating")
    final = float(task.evaluate(model, data)) if task.curve is not None else curve[-1]
    stage("auditing the training state")
    state = tf_bf16.audit(model, optimizer=optimizer, trace=False).training_state
    result = {
        "variant": variant,
        "label": report.LABELS[variant],
        "seed": seed,
        "metric": final,
        "curve": curve,
        "curve_steps": curve_steps,  # optimizer steps done at each curve point
        "train_loss": losses,
        "steps": int(optimizer.iterations.numpy()),
        "steps_per_epoch": steps,
        "epochs": epochs,
        "optimizer": optimizer_label(optimizer),
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
    result["wall_s"] = time.perf_counter() - started
    return result


def initial_model(task, seed, data, cfg):
    """The float32 model whose initial weights every variant of `seed` shares."""
    keras, _, tf_bf16 = import_keras()
    tf_bf16.reset_policy()
    keras.utils.set_random_seed(seed)
    model = task.make_model(seed, reduced=cfg["reduced"])
    _ensure_built(model, data, cfg)
    return model


def initial_weights(task, seed, data, cfg):
    """The float32 model's initial weights for `seed` (shared by every variant)."""
    return initial_model(task, seed, data, cfg).get_weights()


def run_task(task, seed, variants, cfg, progress=True, data=None, weights=None):
    """All variants of one task and seed: {variant: result}.

    `data` (the task's TaskData) and `weights` (the shared initial weights)
    are made here unless given."""
    import_keras()
    if data is None:
        data = task.make_data(seed, reduced=cfg["reduced"])
    if weights is None:
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


def compare_summary(task, seed, variants, cfg, command, progress=True, data=None,
                    weights=None):
    """One `compare` run: run_task plus what the outputs need (the task's facts,
    config, machine, command, total time); report.py writes it."""
    keras, tf, _ = import_keras()
    started = time.perf_counter()
    results = run_task(task, seed, variants, cfg, progress=progress, data=data,
                       weights=weights)
    return {
        "task": task.name, "summary": task.summary, "metric": task.metric,
        "higher_is_better": task.higher_is_better, "seed": seed,
        "config": cfg, "variants": results, "elapsed_s": time.perf_counter() - started,
        "machine": common.machine_info(tf, keras), "command": command,
    }
