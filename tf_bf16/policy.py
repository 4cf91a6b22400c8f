"""The all-bfloat16 policy: bf16 variables and compute, and nothing else.

``set_policy()`` makes Keras's global dtype policy ``"bfloat16"`` and turns on
strictness: when training starts (``fit``/``train_on_batch`` creating their
train function, or a tf_bf16 optimizer being built in a custom loop) any
float32/float64 per-parameter state — a model weight, a non-trainable
statistic, an optimizer slot — is refused with an error that names each
offending variable and its layer, before any weight changes. Scalar
bookkeeping (iteration counters, the learning rate) and metric accumulators
are exempt. ``keep_float32`` is the escape hatch for layers that must stay in
float32.

The policy also makes BatchNormalization's moving statistics train in bf16:
their update ``moving = moving * momentum + batch * (1 - momentum)`` is
computed in float32 by Keras and, under the policy, stored with stochastic
rounding instead of round-to-nearest (which cancels the ``(1 - momentum)``
step once it is below half an ulp, so the statistics stall). The random
stream is keyed on the optimizer's iteration counter and seed and on the
variable's path, so resumed training draws the same bits. No model change.

Compiled metrics compute in float32 and initializers without a bf16 kernel
(Keras's `Orthogonal`) draw in float32 and cast, while the policy is active
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
import re
import weakref
import zlib

import keras

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
    _STATE.seed = int(seed)
    _install_training_hook()
    keras_hooks.install(lambda: _STATE.active)
    return keras.config.dtype_policy()


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


def _describe(variable, layer):
    where = f"layer '{layer.name}' ({type(layer).__name__})" if layer is not None else \
        "optimizer slot"
    return (f"  - {variable.path}: {keras.backend.standardize_dtype(variable.dtype)} "
            f"{tuple(variable.shape)}, {where}")


def raise_if_wide_state(found, context):
    if not found:
        return
    lines = "\n".join(_describe(v, layer) for v, layer in found)
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
    raise_if_wide_state(found, f"optimizer '{optimizer.name}' (trainable variables)")


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


def stream_id(name):
    """A stable 64-bit stream id from a name (CRC-32, bit 62 set to keep it apart
    from optimizer variable indices)."""
    return MOVING_STATISTICS_STREAM | zlib.crc32(name.encode())


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
    """Stores bf16 BatchNormalization statistics of `model` with stochastic rounding."""
    ops = backend.ops
    seed = getattr(optimizer, "seed", None)
    seed = _STATE.seed if not isinstance(seed, int) else seed
    for layer in model._flatten_layers(include_self=False):
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        for attr in _MOVING_STATISTICS:
            variable = getattr(layer, attr, None)
            if variable is None or keras.backend.standardize_dtype(variable.dtype) != "bfloat16":
                continue
            original = getattr(variable, "_tf_bf16_original_assign", None) or variable.assign
            variable._tf_bf16_original_assign = original

            def assign(value, _original=original, _stream=stream_id(f"{layer.name}/{attr}")):
                value, is_float32 = ops.is_float32_tensor(value)
                if not is_float32:
                    return _original(value)
                # Keyed on "layer name/attribute": unlike the variable path (which
                # Keras prefixes differently after a Sequential model is reloaded),
                # it survives save and load, so resumed training is bit-identical.
                rounded = ops.stochastic_round(value, seed, ops.statistics_step(optimizer),
                                               _stream)
                return _original(rounded)

            variable.assign = assign
