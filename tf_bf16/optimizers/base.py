"""What every tf_bf16 optimizer adds to its Keras counterpart, written once.

An optimizer file (sgd.py, adam.py, ...) holds only its `__init__` (Keras's
arguments and defaults, plus `rounding` and `seed`) and its fused update
(`fused_update_step`). Its class puts `Bf16Optimizer` before the Keras class
it replaces (`class SGD(Bf16Optimizer, keras.optimizers.SGD)`), so that the
methods here wrap Keras's:

- ``rounding`` ("kahan", "stochastic" or "nearest") and ``seed`` arguments,
  saved in the config;
- Kahan compensation buffers (bfloat16, one per bfloat16 weight) when
  ``rounding="kahan"``, created after Keras's slots;
- `update_step`: the fused update on bfloat16 and float32 variables, Keras's
  own update on the others (float16, float64);
- decoupled weight decay folded into the fused update (one rounding per step,
  instead of Keras's separate bf16 ``assign``);
- EMA weights and gradient accumulators updated with the same rounding
  machinery, since they too are bf16 state moved by small increments;
- the strict all-bf16 policy check when the optimizer is built;
- the Keras docstring splice (``{{base_optimizer_keyword_args}}``).

Not here: the update math itself (tf_bf16.ops and the C++ kernels on the
TensorFlow backend, tf_bf16.jax_ops on the JAX backend; `tf_bf16.backend.ops`
is the running backend's) and the policy (tf_bf16.policy).

Random streams (docs/rounding.md, section 6): weight ``i`` of the optimizer's
variable list uses ``var_id = i``; its EMA copy ``i + 2**32`` and its gradient
accumulator ``i + 2 * 2**32``; the step is the optimizer's iteration counter
(Adam's bias-correction step, ``iterations``, under gradient accumulation), so
a run resumed from a checkpoint draws exactly the bits it would have drawn.
"""

import secrets
import warnings
import weakref

import keras
import numpy as np
from keras.src.optimizers import optimizer as _keras_optimizer

from tf_bf16 import backend
from tf_bf16 import policy
from tf_bf16._spec import EMA_STREAM
from tf_bf16._spec import GRADIENT_ACCUMULATOR_STREAM
from tf_bf16._spec import ROUNDINGS
from tf_bf16.backend import ops

# Keras fills its optimizers' docstrings from this text; ours too.
BASE_OPTIMIZER_KEYWORD_ARGS = _keras_optimizer.base_optimizer_keyword_args


def check_rounding(rounding):
    if rounding not in ROUNDINGS:
        raise ValueError(
            f"Argument `rounding` must be one of {ROUNDINGS}. Received: rounding={rounding!r}")
    return rounding


# The seed lives in an int32 optimizer variable (`rounding_seed`), so that a
# checkpoint restores it: int32 because Keras's JAX backend has no int64
# variables (JAX without x64), and a .keras file moves between backends.
SEED_RANGE = (-2**31, 2**31 - 1)


def resolve_seed(seed):
    """An explicit seed (Python or NumPy integer in SEED_RANGE), or a fresh random one."""
    if seed is None:
        return secrets.randbelow(2**31)
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"Argument `seed` must be an int or None. Received: seed={seed!r}")
    seed = int(seed)
    low, high = SEED_RANGE
    if not low <= seed <= high:
        raise ValueError(
            f"Argument `seed` must be in [{low}, {high}] (a 32-bit signed integer: the seed "
            f"is kept in an int32 optimizer variable so that checkpoints restore it). "
            f"Received: seed={seed}")
    return seed


def has_fused_update(variable):
    """The fused ops update bfloat16 and float32 variables; others use Keras's math."""
    return keras.backend.standardize_dtype(variable.dtype) in ("bfloat16", "float32")


def dense_gradient(gradient, variable=None, learning_rate=None):
    """IndexedSlices -> dense float32 tensor (Keras applies these optimizers densely),
    indices checked against `variable`'s rows first; dense gradients (all of them
    on JAX) as they are. With `learning_rate`: (gradient, learning rate), the
    rate made NaN under XLA when an index is bad (the update is then skipped)."""
    return ops.dense_gradient(gradient, variable, learning_rate)


def deduplicated_slices(gradient):
    """Sums the rows of duplicate indices (in float32), as a plain scatter-add would."""
    return ops.deduplicated_slices(gradient)


class Bf16Optimizer:
    """Rounding, Kahan buffers, folded weight decay, rounded EMA/accumulators.

    A mixin placed before a Keras optimizer class; subclasses implement
    `fused_update_step`.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__doc__ is not None:
            cls.__doc__ = cls.__doc__.replace("{{base_optimizer_keyword_args}}",
                                              BASE_OPTIMIZER_KEYWORD_ARGS)

    def __init__(self, *, rounding="kahan", seed=None, **kwargs):
        super().__init__(**kwargs)
        self.rounding = check_rounding(rounding)
        # A drawn seed differs from process to process; build() agrees on one.
        self._seed_drawn = seed is None
        seed = self._initial_seed = resolve_seed(seed)
        if self._seed_drawn and keras.backend.backend() == "jax":
            # JAX checks that a replicated variable starts equal in every process
            # (jax.distributed): the drawn seed is agreed on (process 0's) before the
            # variable exists. One process: unchanged. (TensorFlow: in build().)
            seed = ops.agreed_seed(self, seed)
        # Created here, beside Keras's iteration counter, so that it exists before
        # the first train step reads it (BatchNormalization statistics, before the
        # optimizer is built) and is restored with every checkpoint of the optimizer.
        with keras.name_scope(self.name, caller=self):
            # (Assigning it to an attribute tracks it among the optimizer's variables.)
            self._rounding_seed = keras.Variable(
                seed, name="rounding_seed", dtype="int32", trainable=False,
                aggregation="only_first_replica")

    @property
    def seed(self):
        """The seed of the stochastic rounding, as a Python int: the value of the
        `rounding_seed` variable, which checkpoints restore (the config's seed, or
        the drawn one, until a checkpoint is loaded)."""
        return int(np.asarray(self._rounding_seed.numpy()))

    @property
    def rounding_seed(self):
        """The int32 variable holding the seed; the ops read it at run time."""
        return self._rounding_seed

    def build(self, variables):
        """Creates Keras's slots, then the Kahan compensation buffers."""
        if self.built:
            return
        super().build(variables)
        policy.check_optimizer_variables(self, variables)
        # Drawn in each process: every worker takes worker 0's (JAX: agreed already,
        # before the variable was created; an assignment in only some processes would
        # not be one value on each).
        if self._seed_drawn and keras.backend.backend() != "jax":
            agreed = ops.agreed_seed(self, self._initial_seed)
            if agreed != self._initial_seed:
                self._rounding_seed.assign(agreed)
        self._compensations = []
        for variable in variables:
            needs_buffer = (self.rounding == "kahan"
                            and keras.backend.standardize_dtype(variable.dtype) == "bfloat16")
            self._compensations.append(
                self.add_variable_from_reference(variable, name="kahan_compensation")
                if needs_buffer else None)

    def update_step(self, gradient, variable, learning_rate):
        """One fused, in-place update of `variable` (Keras's update for float16/float64)."""
        if has_fused_update(variable):
            return self.fused_update_step(gradient, variable, learning_rate)
        # Outside the policy: Keras's own math, after the weight decay that
        # _apply_weight_decay leaves to the update step.
        weight_decay = self._weight_decay_for(variable)
        if weight_decay:
            lr = keras.ops.cast(learning_rate, variable.dtype)
            variable.assign(
                variable - variable * keras.ops.cast(weight_decay, variable.dtype) * lr)
        return super().update_step(gradient, variable, learning_rate)

    def fused_update_step(self, gradient, variable, learning_rate):
        """The fused update of a bfloat16 or float32 `variable`, weight decay included."""
        raise NotImplementedError(f"{type(self).__name__} must implement fused_update_step.")

    def get_config(self):
        config = super().get_config()
        config.update({"rounding": self.rounding, "seed": self.seed})
        return config

    def _stream(self, variable):
        """Keyword arguments of the fused ops for this variable."""
        index = self._get_variable_index(variable)
        return dict(rounding=self.rounding, compensation=self._compensations[index],
                    seed=self._rounding_seed, var_id=index)

    def _tf_bf16_state(self):
        """The variables tf_bf16 adds to Keras's: the seed and the Kahan buffers."""
        return [self._rounding_seed] + [
            c for c in getattr(self, "_compensations", []) if c is not None]

    def load_own_variables(self, store):
        """Keras's loading, plus the layouts saved without tf_bf16's own state.

        A built optimizer loads (by position, as Keras does) a store with all of
        its variables; one without the `rounding_seed` variable (tf_bf16 before
        the seed became a variable), keeping this optimizer's seed; or one with
        only Keras's variables (a stock Keras optimizer, e.g. `keras.optimizers.Adam`
        of a mixed-precision model), keeping the seed and starting every Kahan
        buffer at zero. Values saved in another dtype (float32 slots of a
        mixed-precision model) are rounded to nearest. Every such conversion is
        reported with a warning; any other count or shape is refused (Keras would
        skip the optimizer's state with a warning and train on zeroed slots).
        Like Keras, the state is matched by position: a state of another
        optimizer with as many variables of the same shapes cannot be told apart.
        """
        count = len(store.keys())
        if not self.built or count == len(self.variables):
            return super().load_own_variables(store)
        ours = {id(v) for v in self._tf_bf16_state()}
        kahan = [v for v in self._tf_bf16_state() if v is not self._rounding_seed]
        without_seed = [v for v in self.variables if v is not self._rounding_seed]
        keras_only = [v for v in self.variables if id(v) not in ours]
        if count == len(without_seed):
            targets, zeroed = without_seed, []
        elif count == len(keras_only):
            targets, zeroed = keras_only, kahan
        else:
            raise ValueError(
                f"Cannot load the state of optimizer '{self.name}' "
                f"({type(self).__name__}, rounding={self.rounding!r}): the saved optimizer "
                f"has {count} variables, this one {len(self.variables)} ({len(keras_only)} "
                f"of Keras's, {len(kahan)} Kahan buffers and the rounding seed). Was it "
                "saved with another optimizer class, other arguments (amsgrad, momentum, "
                "use_ema, gradient_accumulation_steps) or another model? Nothing was loaded.")
        values = [np.asarray(store[str(i)]) for i in range(count)]
        for i, (value, variable) in enumerate(zip(values, targets)):
            if tuple(value.shape) != tuple(variable.shape):
                raise ValueError(
                    f"Cannot load the state of optimizer '{self.name}': saved variable {i} "
                    f"has shape {value.shape}, '{variable.path}' has {tuple(variable.shape)}. "
                    "Nothing was loaded.")
        converted = []
        for value, variable in zip(values, targets):
            saved_dtype = keras.backend.standardize_dtype(value.dtype)
            if saved_dtype != keras.backend.standardize_dtype(variable.dtype):
                converted.append(f"{variable.path} ({saved_dtype} -> {variable.dtype})")
                value = keras.ops.cast(value, variable.dtype)
            variable.assign(value)
        for buffer in zeroed:
            buffer.assign(keras.ops.zeros(buffer.shape, buffer.dtype))
        notes = [f"the rounding seed was not saved: this optimizer's seed {self.seed} is used "
                 "(pass the seed of the saved run, from its .keras config, to continue its "
                 "random streams)"]
        if zeroed:
            notes.append(f"{len(zeroed)} Kahan compensation buffer(s) were not saved and "
                         "start at zero (the low bits they would hold, at most half a "
                         "bfloat16 ulp per weight, are lost once)")
        if converted:
            notes.append(f"{len(converted)} variable(s) were saved in another dtype and "
                         "rounded to nearest: " + ", ".join(converted[:8])
                         + (" ..." if len(converted) > 8 else ""))
        warnings.warn(
            f"tf_bf16: loaded optimizer '{self.name}' from a state saved without tf_bf16's "
            f"variables ({count} of {len(self.variables)}); " + "; ".join(notes) + ".",
            stacklevel=2)

    def _weight_decay_for(self, variable):
        """Decoupled weight decay of this variable (0 if none or excluded)."""
        if self.weight_decay is None:
            return 0.0
        # Asked about the variable update_step receives, as Keras's backend asks:
        # on TensorFlow the tf.Variable, whose name is the variable's path
        # ("sequential/dense_a/kernel:0"), so var_names match layer names too.
        return self.weight_decay if self._use_weight_decay(variable) else 0.0

    def _apply_weight_decay(self, variables):
        # Folded into update_step, so each weight is rounded once per step.
        return

    def add_variable_from_reference(self, reference_variable, name=None, initializer="zeros"):
        """Keras's slot creation; the slot remembers its variable (for the strict
        policy's float32 exemptions)."""
        slot = super().add_variable_from_reference(reference_variable, name=name,
                                                   initializer=initializer)
        slot._tf_bf16_slot_of = weakref.ref(reference_variable)
        return slot

    def _state_rounding(self):
        """Rounding for bf16 state without a Kahan buffer (EMA, accumulators)."""
        return "nearest" if self.rounding == "nearest" else "stochastic"

    def _update_model_variables_moving_average(self, trainable_variables):
        if not self.use_ema:
            return
        for index, (var, average) in enumerate(
                zip(trainable_variables, self._model_variables_moving_average)):
            if average is None:
                continue
            if not has_fused_update(average):  # Keras's own EMA, in the variable's dtype
                momentum = keras.ops.cast(keras.ops.not_equal(self.iterations, 0), var.dtype) * \
                    keras.ops.cast(self.ema_momentum, var.dtype)
                average.assign(momentum * average + (1 - momentum) * var)
                continue
            ops.moving_average(average, var, self.ema_momentum, self.iterations,
                               rounding=self._state_rounding(), seed=self._rounding_seed,
                               step=self._iterations, var_id=index + EMA_STREAM)

    def _overwrite_model_variables_with_average_value(self, trainable_variables):
        if backend.NAME != "jax":
            return super()._overwrite_model_variables_with_average_value(trainable_variables)
        # Keras assigns the average's array itself: the weight and its average then
        # share one buffer, and the next `fit` (whose train step donates its state)
        # fails ("Attempt to donate the same buffer twice"; stock Keras 3.15.1 too).
        for var, average in zip(trainable_variables, self._model_variables_moving_average):
            if average is not None:
                var.assign(keras.ops.copy(average.value))

    def _all_reduce_sum_gradients(self, grads_and_vars):
        # TensorFlow's optimizer under tf.distribute; bf16 IndexedSlices need help there.
        return ops.all_reduce_sum_gradients(super()._all_reduce_sum_gradients, grads_and_vars)

    def _backend_apply_gradients(self, grads, trainable_variables):
        if self.gradient_accumulation_steps and backend.NAME == "jax":
            # Keras's JAX optimizer adds accumulators in bf16, rounded to nearest.
            return ops.apply_gradients_accumulating(self, grads, trainable_variables)
        return super()._backend_apply_gradients(grads, trainable_variables)

    def _backend_increment_gradient_accumulators(self, grads, acc_grads):
        for grad, accumulator in zip(grads, acc_grads):
            if not has_fused_update(accumulator):
                accumulator.assign(
                    accumulator + keras.ops.cast(dense_gradient(grad), accumulator.dtype))
                continue
            index = next(i for i, a in enumerate(self._accumulated_gradients)
                         if a is accumulator)
            ops.accumulate_gradient(accumulator, grad, rounding=self._state_rounding(),
                                    seed=self._rounding_seed, step=self._iterations,
                                    var_id=index + GRADIENT_ACCUMULATOR_STREAM)
