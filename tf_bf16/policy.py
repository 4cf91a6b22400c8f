"""The all-bfloat16 policy: bf16 variables and compute, and nothing else.

``set_policy()`` makes Keras's global dtype policy ``"bfloat16"`` and turns on
strictness: when training starts (``fit``/``train_on_batch`` creating their
train function; in a custom loop, a built model's first call with
``training=True`` or a tf_bf16 optimizer being built) any float32/float64
per-parameter state — a model weight, a non-trainable statistic, an optimizer
slot — is refused with an error that names each offending variable, its layer
and its role, before any variable changes. Scalar
bookkeeping (iteration counters, the learning rate) and metric accumulators
are exempt. ``keep_float32`` is the escape hatch for layers that must stay in
float32.

The policy also makes BatchNormalization's moving statistics train in bf16:
their update ``moving = moving * momentum + batch * (1 - momentum)`` is
computed in float32 by Keras and, under the policy, stored with stochastic
rounding instead of round-to-nearest (which cancels the ``(1 - momentum)``
step once it is below half an ulp, so the statistics stall). The random
stream is keyed on the optimizer's raw iteration counter and seed variable and
on the statistic's position in the model's variables, so resumed training, and
the same model built again, draw the same bits. No model change.

Compiled metrics compute in float32, initializers without a bf16 kernel
(Keras's `Orthogonal`) draw in float32 and cast, and on JAX a 16-bit Embedding
table's gradient sums in float32, while the policy is active
(tf_bf16.keras_hooks).

Both Keras backends: on TensorFlow the hook is the trainer's
`make_train_function`; on JAX also, and the JAX train step hands its traced
iteration count to the statistics' rounding (tf_bf16.backend.jax). In a custom
JAX training loop that calls `model.stateless_call(..., training=True)` under
`jax.jit`, wrap that call in `tf_bf16.moving_statistics_step(optimizer,
optimizer_variables)`, else the statistics are keyed on a trace-time constant.
"""

import contextlib
import dataclasses
import functools
import re
import weakref

import keras
import numpy as np

from tf_bf16 import backend
from tf_bf16._spec import MOVING_STATISTICS_STREAM

from tf_bf16 import keras_hooks

_FLOAT_WIDE = ("float32", "float64")


class StrictPolicyError(ValueError):
    """Float32/float64 per-parameter state found under the strict bf16 policy."""


@dataclasses.dataclass
class PolicyState:
    active: bool = False
    strict: bool = True
    moving_statistics: bool = True
    float32_patterns: tuple = ()
    seed: int = 0


_STATE = PolicyState()


def set_policy(strict=True, keep_float32=(), moving_statistics=True, seed=0):
    """Switches Keras to all-bfloat16 training.

    Args:
        strict: refuse float32/float64 per-parameter state when training
            starts (see module docstring). `False` only sets the dtype policy
            and the moving-statistics fix.
        keep_float32: regular expressions matched (`re.search`) against
            variable paths (e.g. `"^head/"`) and layer names that may stay
            float32. Create those layers with `dtype="float32"`.
        moving_statistics: store BatchNormalization moving statistics of
            bf16 layers with stochastic rounding (recommended).
        seed: seed of the moving-statistics rounding when the optimizer is
            not a tf_bf16 optimizer (whose own seed is used otherwise).

    Returns:
        The `keras.DTypePolicy` now in force.
    """
    keras.config.set_dtype_policy("bfloat16")
    _STATE.active = True
    _STATE.strict = bool(strict)
    _STATE.moving_statistics = bool(moving_statistics)
    _STATE.float32_patterns = tuple(re.compile(p) for p in _as_tuple(keep_float32))
    _STATE.seed = _checked_seed(seed)
    _install_training_hook()
    _install_call_hook()
    keras_hooks.install(lambda: _STATE.active)
    return keras.config.dtype_policy()


def _checked_seed(seed):
    """The policy's seed: a Python or NumPy integer of the ops' int64 range."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"Argument `seed` must be an int. Received: seed={seed!r}")
    if not -2**63 <= int(seed) < 2**63:
        raise ValueError(f"Argument `seed` must be in [-2**63, 2**63). Received: seed={seed}")
    return int(seed)


def reset_policy():
    """Back to Keras's default float32 policy; strictness and hooks off."""
    keras.config.set_dtype_policy("float32")
    _STATE.active = False
    _STATE.float32_patterns = ()


def policy_state():
    """The current policy settings (a copy)."""
    return dataclasses.replace(_STATE)


_KEPT_LAYERS = weakref.WeakSet()


def keep_float32(layer):
    """Marks a layer (built or not) whose float32 variables strict mode accepts.

    Its optimizer slots are accepted too. Create the layer with
    `dtype="float32"`. Returns the layer, so it can wrap the constructor call.
    """
    layer._tf_bf16_keep_float32 = True
    _KEPT_LAYERS.add(layer)
    return layer


def _as_tuple(value):
    if isinstance(value, str):
        return (value,)
    return tuple(value or ())


# ---------------------------------------------------------------------------
# Strict check


def _owned_variables(layer):
    """Variables created by this layer itself (not by nested layers)."""
    own = list(getattr(layer, "_trainable_variables", [])) + list(
        getattr(layer, "_non_trainable_variables", []))
    return own


def variable_owners(model):
    """Maps id(variable) -> layer that created it, for every layer of `model`."""
    owners = {}
    layers = [model] + list(model._flatten_layers(include_self=False))
    for layer in layers:
        for variable in _owned_variables(layer):
            owners.setdefault(id(variable), layer)
    return owners


def _kept_layer_owns(variable):
    return any(any(variable is w for w in layer.weights) for layer in list(_KEPT_LAYERS))


def _exempt(variable, layer):
    """Whether strict mode accepts this float32 variable.

    `layer` is the owner when known. Optimizer slots carry a reference to the
    variable they were created from (see tf_bf16.optimizers.base) and are
    exempt when it is. Patterns match the variable path, the owner's name and
    every layer name along the path (so `"^head$"` works where the owner is
    not known).
    """
    reference = getattr(variable, "_tf_bf16_slot_of", None)
    if reference is not None and reference() is not None:
        return _exempt(reference(), None)
    if layer is not None:
        if getattr(layer, "_tf_bf16_keep_float32", False):
            return True
    elif _kept_layer_owns(variable):
        return True
    names = [variable.path] + variable.path.split("/")[:-1]
    if layer is not None:
        names.append(layer.name)
    return any(p.search(n) for p in _STATE.float32_patterns for n in names)


def _is_wide_float(variable):
    return keras.backend.standardize_dtype(variable.dtype) in _FLOAT_WIDE


def find_wide_state(model, optimizer=None):
    """(variable, layer or None) pairs of float32/64 per-parameter state, not exempt."""
    owners = variable_owners(model)
    found = []
    for variable in model.variables:
        layer = owners.get(id(variable))
        if _is_wide_float(variable) and not _exempt(variable, layer):
            found.append((variable, layer))
    if optimizer is not None and getattr(optimizer, "built", False):
        found.extend(_wide_optimizer_slots(optimizer))
    return found


def _wide_optimizer_slots(optimizer):
    bookkeeping = {id(optimizer._iterations)}
    learning_rate = getattr(optimizer, "_learning_rate", None)
    if isinstance(learning_rate, keras.Variable):
        bookkeeping.add(id(learning_rate))
    found = []
    for variable in optimizer.variables:
        if id(variable) in bookkeeping or not _is_wide_float(variable):
            continue
        if len(variable.shape) == 0 and not _exempt(variable, None):
            # Scalar optimizer state (e.g. a loss-scale factor) is bookkeeping.
            continue
        if not _exempt(variable, None):
            found.append((variable, None))
    return found


def _role(variable, layer, unowned):
    """What the variable is: a layer's trainable weight or non-trainable state, an
    optimizer slot (of which weight), or `unowned` (the caller knows)."""
    if layer is not None:
        kind = "trainable" if variable.trainable else "non-trainable"
        return f"layer '{layer.name}' ({type(layer).__name__}), {kind}"
    reference = getattr(variable, "_tf_bf16_slot_of", None)
    if reference is not None and reference() is not None:
        return f"optimizer slot of '{reference().path}'"
    return unowned


def _describe(variable, layer, unowned="optimizer variable"):
    return (f"  - {variable.path}: {keras.backend.standardize_dtype(variable.dtype)} "
            f"{tuple(variable.shape)}, {_role(variable, layer, unowned)}")


def raise_if_wide_state(found, context, unowned="optimizer variable"):
    if not found:
        return
    lines = "\n".join(_describe(v, layer, unowned) for v, layer in found)
    raise StrictPolicyError(
        f"tf_bf16 strict bf16 policy: {context} found {len(found)} float32/float64 "
        f"per-parameter variable(s); no weight was changed:\n{lines}\n"
        "Fix: create these layers under the policy (do not pass dtype='float32'), or "
        "cast the weights you load. To keep a layer in float32 on purpose, call "
        "tf_bf16.keep_float32(layer) or pass set_policy(keep_float32=[...]) patterns; "
        "set_policy(strict=False) turns the check off.")


def check_model(model, optimizer=None):
    """Raises StrictPolicyError if `model` (and optimizer) hold non-exempt float32 state."""
    raise_if_wide_state(find_wide_state(model, optimizer), "the model")


def check_optimizer_variables(optimizer, variables):
    """Called when a tf_bf16 optimizer is built (covers custom training loops)."""
    if not (_STATE.active and _STATE.strict):
        return
    found = [(v, None) for v in variables if _is_wide_float(v) and not _exempt(v, None)]
    raise_if_wide_state(found, f"optimizer '{optimizer.name}' (trainable variables)",
                        unowned=f"trainable variable given to optimizer '{optimizer.name}'")


# ---------------------------------------------------------------------------
# Custom training loops: the model is checked on its first training call.

_CHECKED_MODELS = weakref.WeakKeyDictionary()   # model -> number of variables checked


def _check_before_training_call(model, kwargs):
    """Under the strict policy, a built model's first call with `training=True`
    (`model(x, training=True)`, `model.stateless_call(..., training=True)`)
    checks every variable of the model -- trainable and non-trainable -- before
    the call can change any (BatchNormalization's statistics move during the
    forward pass, before the optimizer sees anything)."""
    if not (_STATE.active and _STATE.strict) or kwargs.get("training") is not True:
        return
    if not getattr(model, "built", False):
        return
    count = len(model.variables)
    if _CHECKED_MODELS.get(model) == count:
        return
    check_model(model)
    _CHECKED_MODELS[model] = count


_CALL_HOOK_INSTALLED = False


def _install_call_hook():
    global _CALL_HOOK_INSTALLED
    if _CALL_HOOK_INSTALLED:
        return
    original_call = keras.Model.__call__
    original_stateless_call = keras.Model.stateless_call

    @functools.wraps(original_call)
    def __call__(self, *args, **kwargs):
        _check_before_training_call(self, kwargs)
        return original_call(self, *args, **kwargs)

    @functools.wraps(original_stateless_call)
    def stateless_call(self, *args, **kwargs):
        _check_before_training_call(self, kwargs)
        return original_stateless_call(self, *args, **kwargs)

    keras.Model.__call__ = __call__
    keras.Model.stateless_call = stateless_call
    _CALL_HOOK_INSTALLED = True


# ---------------------------------------------------------------------------
# Training hook: strict check and moving statistics, once per train function.


def prepare_model(model):
    """What set_policy() does when training starts; call it in custom loops.

    Checks the model and its optimizer for float32 state (strict mode) and
    installs stochastic rounding on BatchNormalization moving statistics.
    """
    optimizer = getattr(model, "optimizer", None)
    if _STATE.strict:
        check_model(model, optimizer)
    if _STATE.moving_statistics and optimizer is not None:
        install_moving_statistics_rounding(model, optimizer)


_HOOK_INSTALLED = False


def _prepare_if_active(model):
    if _STATE.active:
        prepare_model(model)


def _install_training_hook():
    global _HOOK_INSTALLED
    if _HOOK_INSTALLED:
        return
    backend.ops.install_training_hook(_prepare_if_active)
    _HOOK_INSTALLED = True


# ---------------------------------------------------------------------------
# Moving statistics


_MOVING_STATISTICS = ("moving_mean", "moving_variance", "moving_stddev", "renorm_mean",
                      "renorm_stddev")


def stream_id(position):
    """The var_id of a BatchNormalization statistic: MOVING_STATISTICS_STREAM plus its
    position in the model's variable order (`model.variables`), which a model
    built twice by the same code, or loaded from a save, gives it again."""
    return MOVING_STATISTICS_STREAM + int(position)


def moving_statistics_step(optimizer, optimizer_variables):
    """Context manager for custom JAX training loops (a no-op on TensorFlow).

    Inside it, BatchNormalization statistics are keyed on the iteration count
    held in `optimizer_variables` (the values a stateless loop passes for
    `optimizer.variables`, traced under `jax.jit`), as `fit` does:

        with tf_bf16.moving_statistics_step(optimizer, optimizer_variables):
            y, non_trainable = model.stateless_call(trainable, non_trainable, x,
                                                    training=True)
    """
    if backend.NAME == "jax":
        return backend.ops.optimizer_state(optimizer, optimizer_variables)
    return contextlib.nullcontext()


def install_moving_statistics_rounding(model, optimizer):
    """Stores bf16 BatchNormalization statistics of `model` with stochastic rounding.

    Streams (docs/rounding.md, section 6): seed = a tf_bf16 optimizer's
    `rounding_seed` variable (else the policy's seed); step = the optimizer's
    raw iteration counter, which advances every micro-step under gradient
    accumulation (BatchNormalization moves on every batch); var_id =
    `stream_id(position of the variable in model.variables)`. Not the layer
    name: Keras numbers automatic names per process ("batch_normalization_1"
    when the model is built a second time), while the position is the same
    for the same model code, and after loading a save.
    """
    ops = backend.ops
    positions = {id(v): i for i, v in enumerate(model.variables)}
    if hasattr(optimizer, "rounding_seed"):
        def seed():
            return ops.statistics_seed(optimizer)
    else:
        policy_seed = _STATE.seed

        def seed():
            return policy_seed
    for layer in model._flatten_layers(include_self=False):
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        for attr in _MOVING_STATISTICS:
            variable = getattr(layer, attr, None)
            if variable is None or keras.backend.standardize_dtype(variable.dtype) != "bfloat16":
                continue
            if id(variable) not in positions:
                continue
            original = getattr(variable, "_tf_bf16_original_assign", None) or variable.assign
            variable._tf_bf16_original_assign = original

            def assign(value, _original=original, _stream=stream_id(positions[id(variable)])):
                value, is_float32 = ops.is_float32_tensor(value)
                if not is_float32:
                    return _original(value)
                rounded = ops.stochastic_round(value, seed(), ops.statistics_step(optimizer),
                                               _stream)
                return _original(rounded)

            variable.assign = assign
