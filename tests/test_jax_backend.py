"""tf_bf16 on Keras's JAX backend: same bits as the TensorFlow CPU kernels, portable state,
no TensorFlow needed.

The TensorFlow side runs in this process; the JAX side in subprocesses with
``KERAS_BACKEND=jax`` (Keras picks its backend once per process), JAX on the
CPU:

- every case of tools/jax_parity.py (each optimizer x rounding x dtype, dense
  and sparse gradients, schedules, weight decay with exclusion, EMA, gradient
  accumulation, clipping, `fit` with BatchNormalization statistics and with an
  Embedding, Adam's bias correction): the reference is computed here with the
  C++ kernels, the subprocess recomputes it with tf_bf16.jax_ops under `jit`
  and compares the bits of every variable after every step, once with XLA's
  default flags and once with ``--xla_allow_excess_precision=false``;
- a `.keras` file saved on TensorFlow resumes on JAX, and one saved on JAX
  resumes on TensorFlow, to the bits of the run that did not stop;
- tests/jax_without_tensorflow.py: everything the JAX backend offers, with
  `import tensorflow` blocked.
"""

import json
import os
import subprocess
import sys

import pytest

import jax  # noqa: F401  (the jax extra: missing fails, not skips)

from conftest import assert_bits_equal, fresh_global_state  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import jax_parity  # noqa: E402

restore_global_state = fresh_global_state(4321)

XLA_FLAG_SETTINGS = {"default": None,
                     "no_excess_precision": "--xla_allow_excess_precision=false"}
CASES = [case["name"] for case in jax_parity.cases()]


def run_on_jax(args, xla_flags=None, timeout=1500):
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    if xla_flags:
        env["XLA_FLAGS"] = xla_flags
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode in (0, 1), result.stdout[-4000:] + result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """{xla flag setting: {case name: result}} from one reference and two checks."""
    directory = tmp_path_factory.mktemp("jax_parity")
    import tf_bf16

    try:
        jax_parity.write_reference(str(directory))
    finally:
        tf_bf16.reset_policy()
    results = {}
    for setting, flags in XLA_FLAG_SETTINGS.items():
        out = directory / f"results-{setting}.json"
        run_on_jax([os.path.join(ROOT, "tools", "jax_parity.py"), "check", str(directory),
                    "--json", str(out)], flags)
        with open(out) as f:
            results[setting] = {r["name"]: r for r in json.load(f)["results"]}
    return results


@pytest.mark.parametrize("setting", sorted(XLA_FLAG_SETTINGS))
@pytest.mark.parametrize("case", CASES)
def test_jax_backend_gives_the_bits_of_the_tensorflow_kernels(parity, case, setting):
    result = parity[setting][case]
    assert result["verdict"] == "PASS", "\n".join(result["problems"][:10])


def test_cases_cover_every_optimizer_rounding_and_dtype():
    names = set(CASES)
    for label in jax_parity.OPTIMIZERS:
        for rounding in jax_parity.ROUNDINGS:
            for dtype in jax_parity.DTYPES:
                assert f"opt/{label}-{rounding}-{dtype}" in names
    for label in ("SGD", "SGD_momentum", "Adam", "AdamW", "Lion"):
        assert f"opt/{label}+sparse-kahan-bfloat16" in names


@pytest.fixture(scope="module")
def portability(tmp_path_factory):
    """Both directions: TensorFlow trains and saves here; the JAX subprocess resumes
    those files and trains and saves its own; then TensorFlow resumes JAX's."""
    import tf_bf16

    directory = str(tmp_path_factory.mktemp("portable"))
    try:
        jax_parity.portable(directory)
        run_on_jax([os.path.join(ROOT, "tools", "jax_parity.py"), "portable", directory,
                    "--resume-from", "tensorflow"])
        resumed_here = {label: jax_parity.load_and_continue(label, directory, "jax")
                        for label in jax_parity.PORTABLE}
    finally:
        tf_bf16.reset_policy()
    return directory, resumed_here


@pytest.mark.parametrize("label", sorted(jax_parity.PORTABLE))
def test_keras_file_saved_on_tensorflow_resumes_on_jax_bit_identically(portability, label):
    directory, _ = portability
    want = jax_parity.load_records(os.path.join(directory, f"{label}.tensorflow.npz"))
    got = jax_parity.load_records(
        os.path.join(directory, f"{label}.tensorflow-on-jax.npz"))
    problems = jax_parity.compare(want, got)
    assert not problems, "\n".join(problems[:10])


@pytest.mark.parametrize("label", sorted(jax_parity.PORTABLE))
def test_keras_file_saved_on_jax_resumes_on_tensorflow_bit_identically(portability, label):
    directory, resumed_here = portability
    want = jax_parity.load_records(os.path.join(directory, f"{label}.jax.npz"))
    problems = jax_parity.compare(want, resumed_here[label])
    assert not problems, "\n".join(problems[:10])


def test_resumed_runs_moved_and_kept_their_state(portability):
    """The comparisons above are not vacuous: training moved the table, and the
    slots (moments, Kahan buffers, EMA copies) hold non-zero state."""
    import numpy as np

    directory, _ = portability
    for label in jax_parity.PORTABLE:
        final = jax_parity.load_records(os.path.join(directory, f"{label}.tensorflow.npz"))
        initial = jax_parity.make_inputs(jax_parity.portable_case(label))["in/table"]
        table = np.asarray(final["final/var/0"], np.float32)
        assert np.any(table != np.asarray(initial, np.float32)), label
        slots = [k for k in final if k.startswith("final/opt/") and final[k].ndim > 0]
        assert slots and all(np.any(np.asarray(final[k], np.float32) != 0) for k in slots), label


def test_everything_works_where_tensorflow_cannot_be_imported():
    result = run_on_jax([os.path.join(ROOT, "tests", "jax_without_tensorflow.py")],
                        timeout=900)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), (
        result.stdout[-4000:] + result.stderr[-4000:])


def test_sparse_sgd_under_kahan_takes_the_dense_step_as_jax_does():
    """A Kahan step with a zero gradient is not always a no-op: with w = 1 + 2**-7 (odd
    last bit) and compensation c = -2**-8, w - c is a tie and rounds to the even
    neighbour 1 + 2**-6. So SGD densifies IndexedSlices under Kahan: rows without a
    gradient take that step on TensorFlow as in JAX's dense update, to the same bits."""
    import keras
    import ml_dtypes
    import numpy as np
    import tensorflow as tf

    import tf_bf16
    from tf_bf16 import jax_ops

    bf16 = ml_dtypes.bfloat16
    table = np.full((3, 2), 1 + 2**-7, bf16)
    compensation = np.full((3, 2), -2**-8, bf16)
    variable = keras.Variable(table, dtype="bfloat16", name="table")
    optimizer = tf_bf16.optimizers.SGD(learning_rate=0.5, rounding="kahan", seed=1)
    optimizer.build([variable])
    optimizer._compensations[0].assign(compensation)
    gradient = tf.IndexedSlices(tf.constant([[0.25, 0.25]], tf.bfloat16), tf.constant([0]),
                                tf.constant([3, 2], tf.int64))
    optimizer.apply([gradient], [variable])
    got = np.asarray(variable.value, np.float32)
    assert np.all(got[1:] == 1 + 2**-6), got        # the rows without a gradient moved

    dense = np.zeros((3, 2), bf16)
    dense[0] = 0.25
    want = jax_ops.apply_sgd(table, dense, 0.5, rounding="kahan", compensation=compensation,
                             seed=1, step=0, var_id=0)
    assert_bits_equal(variable.value, np.asarray(want["variable"]), "weight")
    assert_bits_equal(optimizer._compensations[0].value, np.asarray(want["compensation"]),
                      "compensation")


EMBEDDING_GRADIENT_CHECK = r"""
import json, sys
import jax, jax.numpy as jnp, keras, ml_dtypes, numpy as np
import tf_bf16
from tf_bf16 import keras_hooks

def table_gradient(ids, cotangent, table):
    layer = keras.layers.Embedding(table.shape[0], table.shape[1], dtype="bfloat16")
    layer.build()
    layer.embeddings.assign(table)
    assert np.array_equal(np.asarray(layer(jnp.asarray(ids)), np.float32),
                          np.asarray(table, np.float32)[ids]), "the lookup changed"
    def loss(t):
        out, _ = layer.stateless_call([t], [], jnp.asarray(ids))
        return jnp.sum(out.astype(jnp.float32) * cotangent)
    return np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(table)), np.float32).tolist()

case = json.loads(sys.argv[1])
ids = np.asarray(case["ids"], np.int32)
cotangent = np.asarray(case["cotangent"], np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)
table = np.asarray(case["table"], np.float32).astype(ml_dtypes.bfloat16)
out = {"stock": table_gradient(ids, cotangent, table)}
tf_bf16.set_policy()
out["policy"] = table_gradient(ids, cotangent, table)
tf_bf16.reset_policy()
out["after_reset"] = table_gradient(ids, cotangent, table)
keras_hooks.float32_embedding_gradients()
out["forced"] = table_gradient(ids, cotangent, table)
keras_hooks.float32_embedding_gradients(False)
out["unforced"] = table_gradient(ids, cotangent, table)
print("RESULT " + json.dumps(out))
"""


def test_policy_sums_embedding_gradients_in_float32_on_jax():
    """Under the policy on JAX, a bf16 Embedding table's gradient is the float32 sum
    of its occurrences rounded once to bf16; Keras's is a bf16 scatter-add. Row 0
    gets 1.0 then 64 x 2**-9: each 2**-9 is below half an ulp of 1.0 in bf16
    (2**-8), so bf16 adds in that order stay at 1.0, while the float32 sum 1.125 is
    a bf16 value. Rows 1-3: random occurrences, against NumPy's float32 sums."""
    import ml_dtypes
    import numpy as np

    rng = np.random.default_rng(5)
    ids = np.concatenate([np.zeros(65, np.int32), rng.integers(1, 4, size=200)])
    cotangent = np.zeros((len(ids), 4), np.float32)
    cotangent[0] = 1.0
    cotangent[1:65] = 2.0**-9
    cotangent[65:] = rng.standard_normal((200, 4)).astype(ml_dtypes.bfloat16)
    table = rng.standard_normal((4, 4))
    case = {"ids": ids.tolist(), "cotangent": cotangent.tolist(), "table": table.tolist()}
    result = run_on_jax(["-c", EMBEDDING_GRADIENT_CHECK, json.dumps(case)], timeout=600)
    lines = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-3000:]
    got = {k: np.asarray(v, np.float32) for k, v in json.loads(lines[-1][7:]).items()}

    summed = np.zeros((4, 4), np.float32)
    np.add.at(summed, ids, cotangent)
    expected = summed.astype(ml_dtypes.bfloat16).astype(np.float32)
    assert got["policy"][0, 0] == 1.125 and got["stock"][0, 0] == 1.0
    assert_bits_equal(got["policy"], expected)
    assert_bits_equal(got["forced"], expected)
    # Off the policy (and before it), Keras's own bf16 gradient.
    assert_bits_equal(got["after_reset"], got["stock"])
    assert_bits_equal(got["unforced"], got["stock"])
    assert not np.array_equal(got["stock"], expected)
