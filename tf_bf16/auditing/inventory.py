"""The audit's inventory: every variable training touches, and what it costs.

Each variable of the model, the optimizer and the compiled metrics becomes a
`VariableRow` (owner, role, dtype, shape, bytes); roles are a trainable
weight, a non-trainable statistic (BatchNormalization's moving mean and
variance), an optimizer slot, a Kahan buffer, bookkeeping (iteration counter,
learning rate, seed state) or a metric accumulator. From the rows come the
totals by dtype and the training-state bytes per parameter:

    (bytes of the trainable weights + bytes of the per-parameter optimizer
     slots, Kahan buffers included) / number of trainable parameters

With all-bf16 weights: SGD with momentum is 4 B (stochastic rounding) or 6 B
(Kahan), Adam 6 B or 8 B; Keras's `mixed_bfloat16` policy with Keras Adam is
12 B (float32 weights and moments; plus the bf16 copies of the weights it makes
in every step, which are activations-like temporaries, not state).

Not here: what the step computes (trace.py). Nothing is traced or run.
"""

import math

import keras
import ml_dtypes
import numpy as np

from tf_bf16 import policy as _policy
from tf_bf16.auditing.report import DtypeTotal
from tf_bf16.auditing.report import ROLE_BOOKKEEPING
from tf_bf16.auditing.report import ROLE_KAHAN
from tf_bf16.auditing.report import ROLE_METRIC
from tf_bf16.auditing.report import ROLE_SLOT
from tf_bf16.auditing.report import ROLE_STATISTIC
from tf_bf16.auditing.report import ROLE_TRAINABLE
from tf_bf16.auditing.report import TrainingStateBytes
from tf_bf16.auditing.report import VariableRow


def layer_paths(model):
    """id(layer) -> its path in `model`: the names of the layers that contain it,
    outermost first, joined by "/" ("transformer_layer_0/self_attention_layer_norm").

    The model itself is its name. A layer reachable along several paths (shared)
    gets the first one found. Names alone are not unique: every transformer
    block of a keras-hub model has a "self_attention_layer_norm".
    """
    paths = {id(model): model.name}

    def visit(layer, prefix):
        for child in getattr(layer, "_layers", None) or []:
            if id(child) in paths:
                continue
            path = f"{prefix}/{child.name}" if prefix else child.name
            paths[id(child)] = path
            visit(child, path)

    visit(model, "")
    return paths


def dtype_name(dtype):
    """Keras's name of a dtype ("bfloat16", "float32", ...)."""
    return keras.backend.standardize_dtype(dtype)


def _dtype_size(dtype):
    name = dtype_name(dtype)
    return np.dtype(getattr(ml_dtypes, name, name)).itemsize   # ml_dtypes: bfloat16, float8


def _variable_row(variable, owner, owner_class, role):
    shape = [int(d) for d in variable.shape]
    elements = math.prod(shape)
    return VariableRow(path=variable.path, owner=owner, owner_class=owner_class, role=role,
                       dtype=dtype_name(variable.dtype), shape=shape, elements=elements,
                       bytes=elements * _dtype_size(variable.dtype))


def _metric_variable_owners(model):
    """id(variable) -> innermost metric owning it (compile metrics are containers)."""
    owners = {}

    def visit(metric):
        for inner in getattr(metric, "metrics", None) or []:
            if inner is not metric:
                visit(inner)
        for variable in metric.variables:
            owners.setdefault(id(variable), metric)

    for metric in getattr(model, "metrics", []):
        visit(metric)
    return owners


def variable_rows(model, optimizer):
    """(`VariableRow`s: model, then optimizer, then metric variables; id(variable) -> metric)."""
    rows, seen = [], set()
    owners = _policy.variable_owners(model)
    paths = layer_paths(model)
    for variable in model.variables:
        if id(variable) in seen:
            continue
        seen.add(id(variable))
        layer = owners.get(id(variable))
        if variable.trainable:
            role = ROLE_TRAINABLE
        elif keras.backend.is_float_dtype(variable.dtype) and len(variable.shape) > 0:
            role = ROLE_STATISTIC
        else:
            # Random-seed state, counters: not per-parameter numerics.
            role = ROLE_BOOKKEEPING
        layer = layer if layer is not None else model
        rows.append(_variable_row(variable, paths.get(id(layer), layer.name),
                                  type(layer).__name__, role))

    if optimizer is not None:
        for variable in optimizer.variables:
            if id(variable) in seen:
                continue
            seen.add(id(variable))
            if len(variable.shape) == 0:
                # Iteration counter, learning rate, loss scale: one number each.
                role = ROLE_BOOKKEEPING
            elif variable.name.endswith("kahan_compensation"):
                role = ROLE_KAHAN
            else:
                role = ROLE_SLOT
            rows.append(_variable_row(variable, optimizer.name, type(optimizer).__name__,
                                      role))

    metric_owner = _metric_variable_owners(model)
    for variable in getattr(model, "metrics_variables", []):
        if id(variable) in seen:
            continue
        seen.add(id(variable))
        metric = metric_owner.get(id(variable))
        rows.append(_variable_row(variable, metric.name if metric else "(metric)",
                                  type(metric).__name__ if metric else "", ROLE_METRIC))
    return rows, metric_owner


def dtype_totals(rows):
    """`DtypeTotal`s of the rows, most bytes first."""
    totals = {}
    for row in rows:
        total = totals.setdefault(row.dtype, DtypeTotal(row.dtype, 0, 0, 0))
        total.variables += 1
        total.elements += row.elements
        total.bytes += row.bytes
    return sorted(totals.values(), key=lambda t: -t.bytes)


def training_state_bytes(rows):
    """`TrainingStateBytes`: trainable weights, their slots and Kahan buffers."""
    def total(role, what):
        return sum(getattr(r, what) for r in rows if r.role == role)

    params = total(ROLE_TRAINABLE, "elements")
    weights = total(ROLE_TRAINABLE, "bytes")
    slots = total(ROLE_SLOT, "bytes")
    kahan = total(ROLE_KAHAN, "bytes")
    state = weights + slots + kahan
    return TrainingStateBytes(trainable_parameters=params, weight_bytes=weights,
                              slot_bytes=slots, kahan_bytes=kahan, total_bytes=state,
                              bytes_per_parameter=state / params if params else 0.0)
