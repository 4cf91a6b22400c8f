"""The user's data for ``tf_bf16.compare`` / ``compare --data``, as a TaskData.

``make_task_data(data, ...)`` accepts ``(x, y)`` arrays (``x`` may be a dict or
list of arrays), a dict ``{"train": ..., "validation": ...}`` of those or of
``tf.data.Dataset``s, or a dataset of ``(x, y)`` batches; it holds out the last
``validation_split`` of the arrays when no validation data is given (as
``model.fit`` does), checks what it can before training (lengths, batching,
an endless dataset without ``steps_per_epoch``, a dataset whose order changes
from one iteration to the next: the variants would not see the same data) and
raises ``TypeError`` / ``ValueError`` naming the input.

For own_model.py; not for the built-in tasks, whose data is their own.
Importing it imports neither TensorFlow nor the lab extra's packages.
"""

import math

from tf_bf16.lab import runner
from tf_bf16.lab.tasks.base import TaskData

DATA_KEYS = ("train", "validation")


def describe(value):
    """A value for an error message: its type and a short repr."""
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type(value).__name__} {text}"


def _as_arrays(x, y, where):
    """(x, y) with every leaf a NumPy array, all of one length."""
    import keras
    import numpy as np

    x = keras.tree.map_structure(np.asarray, x)
    y = keras.tree.map_structure(np.asarray, y)
    lengths = {}
    for name, part in (("x", x), ("y", y)):
        for leaf in keras.tree.flatten(part):
            if leaf.ndim == 0:
                raise ValueError(f"{where}: {name} holds a scalar; every array needs one row "
                                 "per example")
            lengths.setdefault(name, set()).add(len(leaf))
    sizes = lengths.get("x", set()) | lengths.get("y", set())
    if len(sizes) != 1:
        raise ValueError(f"{where}: x and y must have the same number of examples; got "
                         f"{sorted(lengths.get('x', ()))} for x, "
                         f"{sorted(lengths.get('y', ()))} for y")
    if sizes == {0}:
        raise ValueError(f"{where}: no examples")
    return x, y


def _split(x, y, fraction):
    """The last `fraction` of the examples as validation (Keras's validation_split)."""
    n = runner.array_length(x)
    n_val = int(math.floor(n * fraction))
    if n_val < 1 or n_val >= n:
        raise ValueError(f"validation_split={fraction} of {n} examples leaves "
                         f"{n - n_val} for training and {n_val} for validation; "
                         "both need at least one")
    cut = n - n_val
    first = (runner.map_arrays(lambda a: a[:cut], x), runner.map_arrays(lambda a: a[:cut], y))
    last = (runner.map_arrays(lambda a: a[cut:], x), runner.map_arrays(lambda a: a[cut:], y))
    return first, last


def _part(value, where):
    """One part of `data`: (x, y) arrays -> tuple of arrays; a dataset as is."""
    if runner.is_dataset(value):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return _as_arrays(value[0], value[1], where)
    raise TypeError(f"{where} must be an (x, y) tuple of arrays or a tf.data.Dataset of "
                    f"(x, y) batches; got {describe(value)}")


def _check_dataset(dataset, where, steps_per_epoch, validation=False):
    spec = dataset.element_spec
    if not isinstance(spec, tuple) or len(spec) not in (2, 3):
        raise ValueError(f"{where}: a dataset must yield (x, y) or (x, y, sample_weight) "
                         f"batches, as model.fit takes them; its elements are {spec}")
    y_spec = spec[1]
    if hasattr(y_spec, "shape") and y_spec.shape.rank == 0:
        raise ValueError(f"{where}: the labels are scalars, so the dataset is not batched; "
                         "call .batch(batch_size) on it")
    cardinality = runner._dataset_cardinality(dataset)
    if cardinality == 0:
        raise ValueError(f"{where}: the dataset is empty")
    if cardinality == -1 and validation:
        raise ValueError(f"{where}: the dataset repeats forever, so evaluating on it would "
                         "never end; pass a finite one")
    if cardinality == -1 and steps_per_epoch is None:
        raise ValueError(f"{where}: the dataset repeats forever; pass steps_per_epoch "
                         "(command line: --steps) to say how many batches make an epoch")


def _check_same_order(dataset, seed):
    """Every variant iterates the dataset anew, after the same
    ``keras.utils.set_random_seed``: its first batch must come out the same."""
    import keras
    import numpy as np

    batches = []
    for _ in range(2):
        keras.utils.set_random_seed(seed * 1000)  # what the runner does before epoch 1
        batches.append([np.asarray(a) for a in keras.tree.flatten(next(iter(dataset)))])
    if not all(np.array_equal(a, b) for a, b in zip(*batches)):
        raise ValueError(
            "the training dataset gives a different first batch each time it is iterated "
            "(e.g. shuffle() with reshuffle_each_iteration=True, or a seed drawn per "
            "iteration), so the variants would not see the same data order. Shuffle with "
            "reshuffle_each_iteration=False (or random ops seeded from TensorFlow's global "
            "seed, which compare sets before every epoch), or pass (x, y) arrays: compare "
            "shuffles those every epoch, the same way for every variant.")


def make_task_data(data, validation_split, evaluate, seed, steps_per_epoch):
    """`data` -> TaskData (train, eval = the validation data), with its facts."""
    if isinstance(data, dict):
        unknown = sorted(set(data) - set(DATA_KEYS))
        if unknown or "train" not in data:
            raise ValueError(f"data as a dict needs the key 'train' and may have "
                             f"'validation'; got keys {sorted(data)}")
        train = _part(data["train"], "data['train']")
        validation = (None if data.get("validation") is None
                      else _part(data["validation"], "data['validation']"))
    elif runner.is_dataset(data) or isinstance(data, (tuple, list)):
        train, validation = _part(data, "data"), None
    else:
        raise TypeError("data must be an (x, y) tuple of arrays, a dict {'train': ..., "
                        "'validation': ...} of those or of tf.data.Datasets, or a "
                        f"tf.data.Dataset of (x, y) batches; got {describe(data)}")
    info = {}
    if validation is None and evaluate is None:
        if runner.is_dataset(train):
            raise ValueError("data is a tf.data.Dataset without validation data: pass "
                             "{'train': dataset, 'validation': (x, y) or dataset}, or "
                             "evaluate=callable(model) -> float")
        if not validation_split:
            raise ValueError("no validation data: pass {'train': (x, y), 'validation': "
                             "(x, y)}, validation_split (a fraction of the arrays), or "
                             "evaluate=callable(model) -> float")
        train, validation = _split(train[0], train[1], validation_split)
        info["validation_split"] = validation_split
    if runner.is_dataset(train):
        _check_dataset(train, "data['train']" if isinstance(data, dict) else "data",
                       steps_per_epoch)
        _check_same_order(train, seed)
        cardinality = runner._dataset_cardinality(train)
        info["train"] = ("dataset" if cardinality < 0 else f"dataset of {cardinality} batches")
    else:
        info["train"] = runner.array_length(train[0])
    if evaluate is not None:
        info["validation"] = f"evaluate={getattr(evaluate, '__name__', 'callable')}"
    elif runner.is_dataset(validation):
        _check_dataset(validation, "data['validation']", None, validation=True)
        info["validation"] = "dataset"
    else:
        info["validation"] = runner.array_length(validation[0])
    return TaskData(train=train, eval=validation, info=info)
