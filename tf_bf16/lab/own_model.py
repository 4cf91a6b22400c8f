"""``tf_bf16.compare`` and ``compare --model/--data``: the user's own model and data.

The user's callables become a ``UserTask`` (a ``Task`` of tasks/base.py), so
that the runner and the report of the built-in tasks train and report it: one
implementation for both. This module only checks and converts the inputs
(the data: own_data.py):

- ``prepare(...)`` checks every argument and the model, data, loss and metric,
  before anything trains (a bad input raises ``TypeError`` or ``ValueError``
  naming it and saying what is expected), runs one trial step of every variant
  (a model that fails under a bf16 policy raises ``runner.VariantError`` now,
  not after the variants before it trained), and returns a ``Prepared`` run;
- ``run(prepared)`` trains it (``runner.compare_summary``), prints the table,
  writes the files (``report.write_compare``) and returns a ``CompareResult``;
- ``load_callable("module:function")`` resolves the command line's
  ``--model`` and ``--data``.

Not for the built-in tasks (tasks/) or the command line's options (cli.py).
Importing it imports neither TensorFlow nor the lab extra's packages.
"""

import dataclasses
import importlib
import importlib.util
import math
import numbers
import os
import sys
from typing import Any, Callable, Optional

from tf_bf16.lab import common
from tf_bf16.lab import report
from tf_bf16.lab import runner
from tf_bf16.lab.own_data import describe, make_task_data
from tf_bf16.lab.tasks.base import STOCK, VARIANTS, Task, TaskData

ALL_VARIANTS = tuple(VARIANTS) + (STOCK,)


# ---------------------------------------------------------------------------
# The user's model and data as a task.

@dataclasses.dataclass
class UserTask(Task):
    """A Task made of the user's callables (see ``prepare``)."""

    build_model: Optional[Callable] = None
    source: str = ""                   # how to name build_model in messages
    evaluate_fn: Optional[Callable] = None
    metric_key: Optional[str] = None   # the key of model.evaluate's results
    loss_arg: Any = None
    metrics_arg: Any = None
    data: Optional[TaskData] = None

    def make_data(self, seed, reduced=False):
        return self.data

    def make_model(self, seed, reduced=False):
        import keras

        model = self.build_model()
        if not isinstance(model, keras.Model):
            raise TypeError(
                f"{self.source} must return a keras.Model built under the current dtype "
                f"policy (uncompiled, or compiled with its loss and metrics); it returned "
                f"{describe(model)}")
        return model

    def compile_arguments(self, model):
        """The model's own compile arguments (when build_model compiled it), then
        the ``loss`` and ``metrics`` given to compare; metric objects are copied,
        so that no two models share one."""
        import keras

        args = {}
        compiled = getattr(model, "_compile_config", None) if model.compiled else None
        if compiled is not None:
            for key in ("loss", "loss_weights", "metrics", "weighted_metrics", "run_eagerly",
                        "steps_per_execution", "jit_compile"):
                if compiled.config.get(key) is not None:
                    args[key] = compiled.config[key]
        if self.loss_arg is not None:
            args["loss"] = self.loss_arg
        if self.metrics_arg is not None:
            args["metrics"] = self.metrics_arg
        if args.get("loss") is None:
            raise ValueError(
                f"no loss: {self.source} returned an uncompiled model (or one compiled "
                f"without a loss) and no loss was given. Pass loss=... (command line: "
                f"--loss NAME), or compile the model in build_model with its loss.")

        def fresh(value):
            if isinstance(value, keras.metrics.Metric):
                return type(value).from_config(value.get_config())
            return value

        for key in ("metrics", "weighted_metrics"):
            if key in args:
                args[key] = keras.tree.map_structure(fresh, args[key])
        return args

    def loss(self):
        return self.loss_arg

    def evaluate(self, model, data):
        if self.evaluate_fn is not None:
            return _number(self.evaluate_fn(model), "evaluate(model)")
        results = _keras_evaluate(model, data.eval, self.batch_size)
        return float(results[self.metric_key])


def _number(value, what):
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must return a number; it returned {describe(value)}")
    return number


def _keras_evaluate(model, validation, batch_size, steps=None):
    """model.evaluate on the validation data: (x, y) arrays or a dataset."""
    if isinstance(validation, (tuple, list)):
        x, y = validation
        return model.evaluate(x, y, batch_size=batch_size, steps=steps, verbose=0,
                              return_dict=True)
    return model.evaluate(validation, steps=steps, verbose=0, return_dict=True)


# ---------------------------------------------------------------------------
# Optimizer.

def optimizer_spec(optimizer, optimizer_kwargs, where="optimizer"):
    """(name, constructor arguments) of an optimizer given as a name, a Keras
    optimizer (its class and get_config() are the template) or a zero-argument
    callable returning one."""
    import keras

    if isinstance(optimizer, str):
        name = optimizer.lower()
        if name not in runner.OPTIMIZER_CLASSES:
            raise ValueError(f"{where}={optimizer!r}: expected one of "
                             f"{', '.join(runner.OPTIMIZER_CLASSES)} (tf_bf16 has bf16 "
                             "versions of those), a Keras optimizer of those classes, or a "
                             "zero-argument callable returning one")
        return name, dict(optimizer_kwargs or {})
    instance = optimizer
    if callable(optimizer) and not isinstance(optimizer, keras.optimizers.Optimizer):
        instance = optimizer()
        where = f"{where}()"
    if not isinstance(instance, keras.optimizers.Optimizer):
        raise TypeError(f"{where} must be a name, a Keras optimizer or a zero-argument "
                        f"callable returning one; got {describe(instance)}")
    name = _optimizer_name(instance)
    if name is None:
        raise ValueError(
            f"{where} is a {type(instance).__name__}, which tf_bf16 has no bfloat16 version "
            f"of: pass optimizer= (command line: --optimizer) one of "
            f"{', '.join(runner.OPTIMIZER_CLASSES)}")
    config = dict(instance.get_config())
    for key in ("name", "rounding", "seed"):
        config.pop(key, None)
    config.update(optimizer_kwargs or {})
    return name, config


def _optimizer_name(instance):
    import keras

    # AdamW before Adam: it subclasses Adam (tf_bf16's subclass Keras's).
    for name in ("adamw", "adam", "sgd", "lion"):
        if isinstance(instance, getattr(keras.optimizers, runner.OPTIMIZER_CLASSES[name])):
            return name
    return None


# ---------------------------------------------------------------------------
# Metric.

def _metric_objects(model):
    """Every compiled metric of `model`, flattened (as Keras's callbacks do)."""
    found = []
    for metric in model.metrics:
        found.extend(getattr(metric, "metrics", None) or [metric])
    return found


def resolve_metric(task, model, metric, higher_is_better, data):
    """Sets task.metric_key, .metric and .higher_is_better from one evaluation
    batch of `model` (compiled): the reported metric must be one of
    model.evaluate's results, and its direction known."""
    if task.evaluate_fn is not None:
        if higher_is_better is None:
            raise ValueError("with evaluate=..., pass higher_is_better=True or False "
                             "(command line: --higher-is-better / --lower-is-better)")
        task.metric = metric or getattr(task.evaluate_fn, "__name__", "metric")
        task.higher_is_better = bool(higher_is_better)
        _number(task.evaluate_fn(model), "evaluate(model)")
        return
    validation = data.eval
    if isinstance(validation, (tuple, list)):
        head = runner.map_arrays(lambda a: a[: task.batch_size], validation)
        results = _keras_evaluate(model, head, task.batch_size)
    else:
        results = _keras_evaluate(model, validation, task.batch_size, steps=1)
    if metric is None:
        others = [k for k in results if k != "loss" and not k.endswith("_loss")]
        metric = others[0] if others else "loss"
    if metric not in results:
        raise ValueError(f"metric={metric!r} is not one of model.evaluate's results: "
                         f"{', '.join(results)} (compile the model with it, or pass "
                         "metrics=[...])")
    if higher_is_better is None:
        if metric == "loss" or metric.endswith("_loss"):
            higher_is_better = False
        else:
            for m in _metric_objects(model):
                if m.name == metric and getattr(m, "_direction", None) in ("up", "down"):
                    higher_is_better = m._direction == "up"
            if higher_is_better is None:
                raise ValueError(f"Keras does not say whether a higher or a lower {metric!r} "
                                 "is better: pass higher_is_better=True or False (command "
                                 "line: --higher-is-better / --lower-is-better)")
    task.metric_key = metric
    task.metric = f"validation {metric}"
    task.higher_is_better = bool(higher_is_better)


# ---------------------------------------------------------------------------
# Arguments.

def _positive_int(value, name, optional=False):
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


def variant_list(variants, include_stock):
    if variants is None:
        names = list(VARIANTS)
    elif isinstance(variants, str):
        names = [v.strip() for v in variants.split(",") if v.strip()]
    else:
        names = list(variants)
    bad = [v for v in names if v not in ALL_VARIANTS]
    if bad or not names:
        raise ValueError(f"variants: unknown {', '.join(map(repr, bad)) or '(none given)'}; "
                         f"choose from {', '.join(ALL_VARIANTS)}")
    if include_stock and STOCK not in names:
        names.append(STOCK)
    return list(dict.fromkeys(names))


def _callable_name(function):
    module = getattr(function, "__module__", None)
    name = getattr(function, "__qualname__", None) or getattr(function, "__name__", None)
    if not name:
        return type(function).__name__
    return f"{module}.{name}" if module and module not in ("__main__", "builtins") else name


def _call_text(build_model, options):
    """The tf_bf16.compare call, as the outputs' "command"."""
    parts = [_callable_name(build_model), "data"]
    for key, value in options.items():
        if callable(value) and not isinstance(value, type):
            value_text = _callable_name(value)
        else:
            value_text = repr(value)
            if len(value_text) > 60:
                value_text = type(value).__name__ + "(...)"
        parts.append(f"{key}={value_text}")
    return "tf_bf16.compare(" + ", ".join(parts) + ")"


def check_lab_packages(who, out):
    """ImportError naming the lab extra when a package `who` needs is missing."""
    problem = common.requirement_problem(who, ("tqdm",) + (("matplotlib",) if out else ()))
    if problem:
        raise ImportError(problem)


def import_keras_tensorflow():
    """runner.import_keras(), with a RuntimeError (not SystemExit) for another backend."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError("tf_bf16.compare runs on Keras's TensorFlow backend; KERAS_BACKEND "
                           f"is {keras.backend.backend()!r}")
    return runner.import_keras()


@dataclasses.dataclass
class Prepared:
    """A checked `compare` run, ready to train."""
    task: UserTask
    data: TaskData
    weights: list
    cfg: dict
    variants: list
    seed: int
    command: str
    out: Optional[str] = None
    json_path: Optional[str] = None
    markdown_path: Optional[str] = None


def prepare(build_model, data, *, optimizer=None, learning_rate=None, optimizer_kwargs=None,
            loss=None, metrics=None, metric=None, higher_is_better=None, evaluate=None,
            epochs=1, batch_size=32, steps_per_epoch=None, validation_split=0.2, seed=0,
            variants=None, include_stock=False, keep_float32=(), out=None, name=None,
            source=None, command=None, json_path=None, markdown_path=None):
    """Checks the arguments of tf_bf16.compare (see its docstring); builds the
    float32 model for the shared initial weights; runs one trial step of every
    variant (``runner.try_variant``: a ``VariantError`` if one fails); returns a
    Prepared run.

    `source` names build_model in messages (default: its qualified name);
    `command` is the command line recorded in the outputs (default: the call)."""
    check_lab_packages("tf_bf16.compare" + (" with out=" if out else ""), out)
    if not callable(build_model):
        raise TypeError("build_model must be a zero-argument callable returning a Keras "
                        f"model; got {describe(build_model)}")
    if evaluate is not None and not callable(evaluate):
        raise TypeError(f"evaluate must be a callable(model) -> float; got "
                        f"{describe(evaluate)}")
    epochs = _positive_int(epochs, "epochs")
    batch_size = _positive_int(batch_size, "batch_size")
    steps_per_epoch = _positive_int(steps_per_epoch, "steps_per_epoch", optional=True)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer; got {seed!r}")
    if validation_split is not None and not (
            isinstance(validation_split, numbers.Real) and 0 <= validation_split < 1):
        raise ValueError(f"validation_split must be a fraction in [0, 1); got "
                         f"{validation_split!r}")
    if learning_rate is not None and not (
            isinstance(learning_rate, numbers.Real) and math.isfinite(learning_rate)
            and learning_rate > 0):
        raise ValueError(f"learning_rate must be a finite number > 0; got {learning_rate!r}")
    if optimizer_kwargs is not None and not isinstance(optimizer_kwargs, dict):
        raise TypeError(f"optimizer_kwargs must be a dict; got {describe(optimizer_kwargs)}")
    if isinstance(keep_float32, str):
        keep_float32 = (keep_float32,)
    variant_names = variant_list(variants, include_stock)
    keras, _, _ = import_keras_tensorflow()
    if isinstance(build_model, keras.Model):
        raise TypeError("build_model must be a zero-argument callable returning a new Keras "
                        "model, not a model: every variant builds its own under its dtype "
                        "policy; pass the function that builds it")

    if source is None:
        qualified = _callable_name(build_model)
        source = "build_model" + (f" ({qualified})" if qualified != "build_model" else "")
    task_data = make_task_data(data, validation_split, evaluate, int(seed), steps_per_epoch)
    task_name = name or getattr(build_model, "__name__", None) or "model"
    if task_name == "<lambda>":
        task_name = "model"
    task = UserTask(
        name=task_name,
        summary=f"your model ({source}) and data",
        metric=metric or "metric", higher_is_better=True, epochs=epochs,
        batch_size=batch_size, build_model=build_model, source=source,
        evaluate_fn=evaluate, loss_arg=loss, metrics_arg=metrics, data=task_data)
    cfg = {"epochs": epochs, "learning_rate": learning_rate, "batch_size": batch_size,
           "steps_per_epoch": steps_per_epoch, "optimizer": None, "optimizer_kwargs": {},
           "keep_float32": list(keep_float32), "reduced": False}
    if optimizer is not None:
        cfg["optimizer"], cfg["optimizer_kwargs"] = optimizer_spec(optimizer, optimizer_kwargs)

    model = runner.initial_model(task, int(seed), task_data, cfg)
    weights = model.get_weights()
    if cfg["optimizer"] is None:
        if model.compiled and getattr(model, "optimizer", None) is not None:
            if _optimizer_name(model.optimizer) is None:
                raise ValueError(
                    f"{source} compiles the model with {type(model.optimizer).__name__} "
                    "(compile's default when it gets no optimizer is RMSprop), which tf_bf16 "
                    "has no bfloat16 version of: pass optimizer= (command line: "
                    f"--optimizer) one of {', '.join(runner.OPTIMIZER_CLASSES)}, or compile "
                    "with one of those")
            cfg["optimizer"], cfg["optimizer_kwargs"] = optimizer_spec(
                model.optimizer, optimizer_kwargs)
        else:
            cfg["optimizer"], cfg["optimizer_kwargs"] = "adamw", dict(optimizer_kwargs or {})
    # Compile the float32 model as the variants will be (this checks the loss
    # and the metrics), and learn the metric's name and direction.
    model.compile(optimizer=runner.make_optimizer("float32", cfg, int(seed)),
                  **task.compile_arguments(model))
    resolve_metric(task, model, metric, higher_is_better, task_data)
    task.optimizer = cfg["optimizer"]
    task.learning_rate = learning_rate
    # One step of every variant on a throwaway model, so that a model that
    # fails under a bf16 policy fails now, not after the variants before it trained.
    for variant in variant_names:
        runner.try_variant(task, variant, int(seed), task_data, weights, cfg)
    if command is None:
        options = {k: v for k, v in (
            ("optimizer", optimizer), ("learning_rate", learning_rate),
            ("optimizer_kwargs", optimizer_kwargs), ("loss", loss), ("metrics", metrics),
            ("metric", metric), ("higher_is_better", higher_is_better),
            ("evaluate", evaluate), ("epochs", epochs), ("batch_size", batch_size),
            ("steps_per_epoch", steps_per_epoch), ("seed", seed),
            ("variants", variants), ("include_stock", include_stock or None),
            ("keep_float32", list(keep_float32) or None), ("out", out)) if v is not None}
        command = _call_text(build_model, options)
    return Prepared(task=task, data=task_data, weights=weights, cfg=cfg,
                    variants=variant_names, seed=int(seed), command=command, out=out,
                    json_path=json_path, markdown_path=markdown_path)


# ---------------------------------------------------------------------------
# Running and the result.

class CompareResult:
    """What ``tf_bf16.compare`` returns: the results of every variant.

    Attributes:
        variants: variant name -> dict of its results (``metric``, ``curve``,
            ``curve_steps``, ``train_loss``, ``gap_to_float32``,
            ``bytes_per_parameter``, ``state_dtypes``, ``optimizer``,
            ``dtype_policy``, ``weights_changed_fraction``, ``wall_s``, ...),
            in training order.
        metric: the name of the reported metric (e.g. ``"validation accuracy"``).
        higher_is_better: its direction.
        summary: everything, as written to ``results.json``.
        text: the table as printed; ``markdown``: as in ``results.md``.
        files: the paths written (``out=``), else empty.

    ``result.metrics`` maps each variant to its final metric and
    ``result.gaps`` to its gap to float32 (variant - float32); ``str(result)``
    is the table.
    """

    def __init__(self, task, summary, files):
        self.summary = summary
        self.variants = summary["variants"]
        self.metric = task.metric
        self.higher_is_better = task.higher_is_better
        self.text = report.compare_text(task, summary)
        self.markdown = report.compare_markdown(task, summary)
        self.files = list(files)

    @property
    def metrics(self):
        return {v: r["metric"] for v, r in self.variants.items()}

    @property
    def gaps(self):
        return {v: r.get("gap_to_float32") for v, r in self.variants.items()}

    def __getitem__(self, variant):
        return self.variants[variant]

    def __str__(self):
        return self.text

    def __repr__(self):
        cells = ", ".join(f"{v}={r['metric']:.4g}" for v, r in self.variants.items())
        return f"<CompareResult {self.metric}: {cells}>"


def run(prepared, progress=True, verbose=True):
    """Trains a Prepared run; prints the table (verbose); writes the files."""
    summary = runner.compare_summary(prepared.task, prepared.seed, prepared.variants,
                                     prepared.cfg, prepared.command, progress=progress,
                                     data=prepared.data, weights=prepared.weights)
    summary["model"] = {"build_model": prepared.task.source,
                        "metric_key": prepared.task.metric_key}
    text = report.compare_text(prepared.task, summary)
    if verbose:
        print(text, flush=True)
    files = report.write_compare(prepared.task, summary, out=prepared.out,
                                 json_path=prepared.json_path,
                                 markdown_path=prepared.markdown_path)
    if verbose and files:
        print("wrote " + ", ".join(files), flush=True)
    return CompareResult(prepared.task, summary, files)


def compare(build_model, data, *, progress=True, verbose=True, **kwargs):
    """The implementation of ``tf_bf16.compare`` (whose docstring documents it)."""
    return run(prepare(build_model, data, **kwargs), progress=progress, verbose=verbose)


# ---------------------------------------------------------------------------
# The command line's MODULE:FUNCTION.

def load_callable(spec, option):
    """The function named by `spec`, "MODULE:FUNCTION": MODULE an importable
    module (the current directory is searched first) or a path to a .py file.
    Raises ValueError with a message for the command line's `option`."""
    usage = (f"{option} takes MODULE:FUNCTION, where MODULE is a module on the Python path "
             "(e.g. my_models) or a .py file (e.g. path/to/models.py)")
    module_name, sep, function_name = spec.rpartition(":")
    if not sep or not module_name or not function_name.isidentifier():
        raise ValueError(f"{usage}; got {spec!r}")
    try:
        if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
            path = os.path.abspath(module_name)
            if not os.path.isfile(path):
                raise ValueError(f"{option} {spec}: no such file {module_name!r}")
            unique = "tf_bf16_user_" + os.path.splitext(os.path.basename(path))[0]
            module_spec = importlib.util.spec_from_file_location(unique, path)
            if module_spec is None:
                raise ValueError(f"{option} {spec}: {module_name!r} is not a Python file")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[unique] = module
            module_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except ValueError:
        raise
    except ModuleNotFoundError as e:
        raise ValueError(f"{option} {spec}: cannot import {module_name!r} ({e}). {usage}.")
    except Exception as e:
        raise ValueError(f"{option} {spec}: importing {module_name!r} raised "
                         f"{type(e).__name__}: {e}")
    if not hasattr(module, function_name):
        functions = sorted(n for n, v in vars(module).items()
                           if callable(v) and not n.startswith("_")
                           and getattr(v, "__module__", None) == module.__name__)
        raise ValueError(f"{option} {spec}: {module_name!r} has no {function_name!r}"
                         + (f" (its functions: {', '.join(functions)})" if functions else ""))
    function = getattr(module, function_name)
    if not callable(function):
        raise ValueError(f"{option} {spec}: {function_name!r} is not a function (it is "
                         f"{describe(function)})")
    return function
