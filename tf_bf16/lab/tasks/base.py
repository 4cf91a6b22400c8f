"""The interface every task of `python -m tf_bf16 compare` implements.

A task is one module in tf_bf16/lab/tasks/ that defines a module-level ``TASK``
(an instance of a ``Task`` subclass). ``tf_bf16.lab.tasks.all_tasks()`` discovers
them. The runner (tf_bf16/lab/runner.py) trains the same model, data order and
seed several ways (``VARIANTS``) and owns the dtype policy, the progress bars and
the timing; tf_bf16/lab/report.py the outputs. A task only says what to train,
how to score it, and what it needs (``requires``, ``available``).

A task module must stay importable without its own requirements (import them
inside the methods), so that ``list`` can say what is missing.
"""

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

from tf_bf16.lab import common

# float32: Keras defaults (float32 policy), the stock Keras optimizer.
# mixed_bfloat16: Keras's "mixed_bfloat16" policy (float32 variables, bf16
#          compute) and the stock Keras optimizer: the usual alternative, with
#          float32 master weights and optimizer state (12 B/param with Adam).
# nearest: pure bf16 (keras "bfloat16" policy), round-to-nearest updates: what
#          plain bf16 training gives (tf_bf16 optimizer with rounding="nearest",
#          so that Keras's bf16 Adam bug does not hide the rounding effect).
# stochastic / kahan: tf_bf16.set_policy() and the tf_bf16 optimizer.
MIXED = "mixed_bfloat16"
VARIANTS = ("float32", MIXED, "nearest", "stochastic", "kahan")
# stock: Keras "bfloat16" policy with the stock Keras optimizer (compare
#        --include-stock): what Keras gives today.
STOCK = "stock"


@dataclasses.dataclass
class TaskData:
    """What a task trains and evaluates on. Arrays or tf.data.Datasets.

    ``train`` yields (x, y) batches in a fixed order for a given seed (the same
    order for every variant); ``eval`` is used by ``Task.evaluate``.
    """
    train: Any
    eval: Any
    steps_per_epoch: Optional[int] = None
    info: Dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Task:
    """Base class. Subclasses set the fields and implement the methods."""

    name: str = ""
    summary: str = ""            # one line for `python -m tf_bf16 list`
    paper_application: str = ""  # which of the paper's seven applications it mirrors
    metric: str = ""             # e.g. "test accuracy", "bits/char", "distance to optimum"
    higher_is_better: bool = True
    optimizer: str = "sgd"       # "sgd" (momentum 0.9 unless optimizer_kwargs say otherwise),
                                 # "adam", "adamw" or "lion"
    learning_rate: float = 0.01
    epochs: int = 1
    batch_size: int = 32
    # Extra keyword arguments of the optimizer (e.g. {"weight_decay": 0.01}),
    # the same for the Keras and the tf_bf16 optimizer. Optional.
    optimizer_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
    # Overrides used by the CI tests (reduced sizes; must run in seconds).
    reduced: Dict[str, Any] = dataclasses.field(default_factory=dict)
    # A task's own settings (model and data sizes, step counts), full and what
    # the reduced configuration changes; ``config`` merges them. Optional.
    sizes: Dict[str, Any] = dataclasses.field(default_factory=dict)
    reduced_sizes: Dict[str, Any] = dataclasses.field(default_factory=dict)
    # Modules beyond the library that the task imports (e.g. "sklearn"), all
    # from the lab extra; ``available`` reports the missing ones.
    requires: Tuple[str, ...] = ()
    # The Keras backends whose runner can train the task: "tensorflow" (the
    # runner of tf_bf16/lab/runner.py) and "jax" (tf_bf16/lab/jax_runner.py:
    # one process per variant; the task then implements ``make_arrays``).
    backends: Tuple[str, ...] = ("tensorflow",)
    # Named configurations besides the default and the reduced one (``compare
    # --config NAME``), e.g. "gpu": name -> overrides of ``sizes``, of the batch
    # size and of the training settings (``epochs``, ``learning_rate``,
    # ``optimizer``, ``optimizer_kwargs``, ``curve_points_per_epoch``,
    # ``warmup_fraction``: a linear warmup over that share of the steps, then a
    # cosine decay to 0, from ``learning_rate``), plus "description".
    configs: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)

    def config(self, reduced: bool, name: Optional[str] = None) -> Dict[str, Any]:
        """``sizes`` and the batch size; reduced: updated by ``reduced_sizes``, then
        by ``reduced``; a named configuration (``configs``): updated by it."""
        cfg = dict(self.sizes, batch_size=self.batch_size)
        if reduced:
            cfg.update(self.reduced_sizes)
            cfg.update(self.reduced)
        if name is not None:
            if name not in self.configs:
                raise KeyError(f"task {self.name} has no configuration {name!r}; it has: "
                               f"{', '.join(self.configs) or 'none besides the default'}")
            cfg.update(self.configs[name])
        return cfg

    def available(self) -> Optional[str]:
        """None if the task can run here, else a message saying what is missing
        and how to get it: a package of ``requires`` that is not installed here;
        subclasses add their own checks (e.g. a dataset that must be prepared
        first) after calling this one."""
        return common.requirement_problem(f"task {self.name}", self.requires)

    def make_data(self, seed: int, reduced: bool = False) -> TaskData:
        raise NotImplementedError

    def make_model(self, seed: int, reduced: bool = False):
        """A fresh, compiled-ready keras.Model, built under the dtype policy in force."""
        raise NotImplementedError

    def make_arrays(self, seed: int, reduced: bool = False, config: Optional[str] = None,
                    steps: Optional[int] = None) -> TaskData:
        """For the JAX runner (``backends`` has "jax"): a TaskData whose ``train`` is
        ``(x, y)`` NumPy arrays holding the training examples in the order they are
        trained (``steps`` batches per epoch; None: the configuration's), and
        ``eval`` what ``evaluate`` takes. No tf.data, no TensorFlow."""
        raise NotImplementedError

    def loss(self):
        """The Keras loss for model.compile."""
        raise NotImplementedError

    def compile_arguments(self, model):
        """The arguments of ``model.compile`` besides the optimizer (default: the loss)."""
        return {"loss": self.loss()}

    def evaluate(self, model, data: TaskData) -> float:
        """The task's metric on the held-out data."""
        raise NotImplementedError

    # Learning-curve points per epoch: 1 = at the end of every epoch; N > 1
    # also every steps_per_epoch // N steps inside an epoch (for tasks that
    # train one long epoch, e.g. one pass over a stream).
    curve_points_per_epoch: int = 1

    # Optional: the metric of the learning-curve points (default: evaluate);
    # the runner calls it at every curve point when provided.
    curve: Optional[Callable] = None
