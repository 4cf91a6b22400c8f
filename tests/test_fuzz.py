"""Findings of the coverage-guided fuzzing of tools/fuzz_ops.py, as regression tests,
and a short fuzzing run (slow).

tools/fuzz_ops.py (atheris) calls tf_bf16.ops (eagerly and in a tf.function) and
tf_bf16.jax_ops with arguments built from the fuzzer's bytes and accepts only
success, or an InvalidArgumentError / ValueError / TypeError that names an input
and leaves every variable with its bits. docs/reliability.md has the campaign's
numbers; each finding below failed that check before its fix.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tf_bf16 import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMED = (tf.errors.InvalidArgumentError, ValueError, TypeError)


def _variables(shape=(3,)):
    return [tf.Variable(tf.ones(shape, tf.bfloat16), name=f"v{i}") for i in range(4)]


def _expect(call, variables, name):
    before = [np.array(v.numpy(), copy=True) for v in variables]
    with pytest.raises(NAMED) as info:
        call()
    assert f"'{name}'" in str(info.value), str(info.value)
    for v, b in zip(variables, before):
        assert np.array_equal(np.asarray(v.numpy()).view(np.uint16), b.view(np.uint16))


# Finding 1: None or an unconvertible value as a hyperparameter, seed, step or var_id
# raised TensorFlow's conversion error ("Attempt to convert a value (None) ...",
# "None values not supported.", "Can't convert Python sequence with a value out of
# range for a double-precision float") without naming the argument.
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("argument,value", [
    ("learning_rate", None), ("momentum", None), ("weight_decay", "0.1"),
    pytest.param("learning_rate", 10**400, id="learning_rate-10**400"),
    pytest.param("momentum", [0.1, object()], id="momentum-list"), ("seed", None),
    ("step", "3"), ("var_id", None)])
def test_unconvertible_arguments_name_the_argument(argument, value, graph):
    w, accum, _, _ = state = _variables()

    def call():
        kwargs = {"learning_rate": 0.1, "momentum": 0.9, argument: value}
        ops.apply_sgd(w, tf.ones(3), kwargs.pop("learning_rate"), accumulator=accum, **kwargs)

    _expect(tf.function(call) if graph else call, state, argument)


# Finding 2: a missing slot (m=None) raised AttributeError ('NoneType' object has no
# attribute 'dtype').
def test_missing_slot_names_the_slot():
    w, m, v, _ = state = _variables()
    _expect(lambda: ops.apply_lion(w, tf.ones(3), None, 0.01), state, "m")
    _expect(lambda: ops.apply_adam(w, tf.ones(3), m, None, 0.01), state, "v")
    _expect(lambda: ops.apply_adam(w, tf.ones(3), m, v, 0.01, vhat=np.ones(3)), state, "vhat")
    _expect(lambda: ops.rounded_assign_add(None, tf.ones(3)), state, "variable")


# Finding 3: a sparse gradient for a scalar variable named the variable but not
# the argument at fault.
@pytest.mark.parametrize("op", ["sgd", "lion"])
def test_sparse_gradient_for_a_scalar_names_the_gradient(op):
    w, m, _, _ = state = _variables(shape=())
    g = tf.IndexedSlices(tf.ones([1]), tf.constant([0]), tf.constant([1], tf.int64))
    call = (lambda: ops.apply_sgd(w, g, 0.1)) if op == "sgd" else \
        (lambda: ops.apply_lion(w, g, m, 0.01))
    _expect(call, state, "gradient")


# Finding 5 (10-minute campaign): an empty sparse gradient densified in a graph
# (Lion; Adam, AdamW and SGD with momentum in Keras) failed in the index check's
# message: "Reduction axis 0 is empty in shape [0]" (ArgMax of no indices).
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf.function"])
def test_empty_sparse_gradient_is_densified(graph):
    w, m, w_dense, m_dense = _variables(shape=(4, 3))

    def call():
        g = tf.IndexedSlices(tf.zeros([0, 3]), tf.zeros([0], tf.int64),
                             tf.constant([4, 3], tf.int64))
        ops.apply_lion(w, g, m, 0.01, seed=3)

    (tf.function(call) if graph else call)()
    # The update of a dense zero gradient.
    ops.apply_lion(w_dense, tf.zeros([4, 3]), m_dense, 0.01, seed=3)
    for a, b in [(w, w_dense), (m, m_dense)]:
        assert np.array_equal(np.asarray(a.numpy()).view(np.uint16),
                              np.asarray(b.numpy()).view(np.uint16))


# Finding 4 (tf_bf16.jax_ops): None as a hyperparameter ("None is not a valid value
# for jnp.array") and a non-scalar array as step or seed ("Incompatible shapes for
# broadcasting", raised from the middle of the update) named no argument.
def test_jax_ops_name_bad_scalars_before_computing():
    from tf_bf16 import jax_ops
    import jax.numpy as jnp
    w = jnp.ones((3, 3), jnp.bfloat16)
    m, v = jnp.zeros_like(w), jnp.zeros_like(w)
    g = jnp.ones((3, 3), jnp.float32)
    cases = [(dict(learning_rate=None), "learning_rate"), (dict(beta_1="0.9"), "beta_1"),
             (dict(epsilon=[1e-7, 1e-7]), "epsilon"), (dict(step=jnp.arange(2)), "step"),
             (dict(seed=jnp.ones((2,), jnp.int32)), "seed"), (dict(var_id=1.5), "var_id"),
             (dict(step=None), "step"), (dict(weight_decay=jnp.ones(2)), "weight_decay")]
    for kwargs, name in cases:
        args = dict(learning_rate=1e-3)
        args.update(kwargs)
        with pytest.raises((ValueError, TypeError), match=f"'{name}'"):
            jax_ops.apply_adam(w, g, m, v, args.pop("learning_rate"), **args)
    with pytest.raises((ValueError, TypeError), match="'m'"):
        jax_ops.apply_lion(w, g, None, 1e-3)


@pytest.mark.slow
def test_fuzzing_smoke_run(tmp_path):
    """A bounded run of tools/fuzz_ops.py (fixed seed, 40 s): no finding."""
    import atheris  # noqa: F401  (the test extra; a missing one fails here, not skips)
    import jax  # noqa: F401  (the jax extra)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("TF_BF16_FUZZ_FINDINGS", None)
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "fuzz_ops.py"), "-max_total_time=40",
         "-seed=1", "-len_control=0", "-max_len=512", f"-artifact_prefix={tmp_path}/"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "Done " in output, output[-2000:]
