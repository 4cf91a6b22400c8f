"""tf_bf16 under tf.distribute: replicas bit-identical, one replica's bits where the
reduction is exact, within SR noise where it is not, bf16 Embeddings, several workers.

The runs happen in subprocesses (tests/tf_distributed.py), because the
logical CPU devices of MirroredStrategy and the cluster of
MultiWorkerMirroredStrategy must be configured before TensorFlow starts:

- ``MirroredStrategy`` on 2 logical CPU devices, Keras ``fit``: every
  optimizer (SGD plain, which updates an Embedding's rows sparsely, and
  Nesterov; Adam; AdamW with AMSGrad; Lion) x every rounding on the *exact*
  model (Dense + Embedding with gradients exact in any summation order), and
  SGD-Nesterov/Adam/Lion with stochastic and Kahan rounding on the *real*
  model (ReLU network, cross-entropy). Also every bf16 bit pattern through the
  IndexedSlices all-reduce.
- ``MultiWorkerMirroredStrategy``, two worker processes on loopback
  (``TF_CONFIG``, free ports), started and killed by the test: the custom
  training loop of tf.distribute's guide (Keras 3.15's ``fit`` fails under
  that strategy, float32 models too; docs/distributed.md), with the default
  ``seed=None`` and a different model initialization in each worker.

What the comparisons mean:

- *Replicas bit-identical*: every replica's own copy of every variable
  (weights, Adam moments, momentum, Kahan buffers, the iteration count) has
  the same bits. tf.distribute gives every replica the same all-reduced
  gradient and the SR bits depend only on (seed, step, var_id, element index).
- *Exact model = one replica, bit for bit*: with gradients that every
  summation order computes exactly, the optimizer update is the only
  arithmetic left; it must not see the replica count.
- *Real model, within SR noise*: the gradient's per-replica partial sums are
  rounded to bf16 and then summed, so the weights differ from one replica's
  in a few elements. Bound, for stochastic rounding: the RMS difference over
  all weights is at most what SR itself puts between two runs — derived,
  sqrt(steps / 2) times the RMS SR spacing (each step's SR error has variance
  at most spacing^2 / 4, independent across steps, so two independent runs
  differ by at most that RMS), and measured, the RMS difference between two
  one-replica runs with different seeds.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "tf_distributed.py")
sys.path.insert(0, os.path.join(ROOT, "tests"))
import distributed_cases as cases  # noqa: E402
import tf_distributed  # noqa: E402
from distributed_cases import (assert_replicas_identical, assert_same_bits,  # noqa: E402
                               assert_within_sr_noise, paths)

FAST_CASES = ("exact-sgd_plain-stochastic", "real-adam-stochastic")
MIRRORED = tf_distributed.mirrored_cases()


def start(mode, out, args=(), env=None, log_name=None):
    """A subprocess of tests/tf_distributed.py in its own process group,
    output to a log file (a full pipe would block it)."""
    env = dict(os.environ if env is None else env,
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               TF_CPP_MIN_LOG_LEVEL="3")
    log = open(os.path.join(out, log_name or f"{mode}.log"), "w")
    return subprocess.Popen([sys.executable, SCRIPT, mode, out, *args], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def finish(processes, out, timeout):
    """Waits for all, at most `timeout` seconds in all; always kills what is
    left (the whole process group); fails with the logs' tails."""
    deadline = time.monotonic() + timeout
    try:
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    failed = [p for p in processes if p.returncode != 0]
    if failed:
        tails = []
        for name in sorted(os.listdir(out)):
            if name.endswith(".log"):
                with open(os.path.join(out, name)) as f:
                    tails.append(f"--- {name}\n" + f.read()[-3000:])
        pytest.fail(f"{len(failed)} process(es) failed or timed out "
                    f"(return codes {[p.returncode for p in processes]}):\n" + "\n".join(tails))


def run(mode, out, args=(), timeout=600):
    finish([start(mode, out, args)], out, timeout)


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


# ---------------------------------------------------------------------------
# MirroredStrategy, fast: one exact and one real case, and the carrier


@pytest.fixture(scope="module")
def mirrored_fast(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mirrored_fast"))
    run("mirrored", out, FAST_CASES, timeout=300)
    return out


def load(out, name):
    return cases.load(os.path.join(out, name))


def test_mirrored_replicas_identical_and_exact_model_equals_one_replica(mirrored_fast):
    """Plain SGD with stochastic rounding: the Embedding's gradient travels as
    IndexedSlices and is applied sparsely (deduplicated rows)."""
    case = FAST_CASES[0]
    replicated = load(mirrored_fast, f"{case}.mirrored.npz")
    assert_replicas_identical(replicated, cases.REPLICAS, case)
    assert_same_bits(replicated, load(mirrored_fast, f"{case}.single.npz"), case)


def test_mirrored_real_model_within_sr_noise(mirrored_fast):
    case = FAST_CASES[1]
    replicated = load(mirrored_fast, f"{case}.mirrored.npz")
    assert_replicas_identical(replicated, cases.REPLICAS, case)
    assert_within_sr_noise(replicated, load(mirrored_fast, f"{case}.single.npz"),
                           load(mirrored_fast, f"{case}.other_seed.npz"),
                           cases.STEPS, case)


def test_indexed_slices_carry_every_bf16_bit_pattern(mirrored_fast):
    """Stock tf.distribute refuses bf16 IndexedSlices; tf_bf16's carrier brings
    all 65,536 bf16 bit patterns (NaN payloads, subnormals, signed zeros)
    through the all-reduce to every replica unchanged, rows in replica order."""
    record = np.load(os.path.join(mirrored_fast, "carrier.npz"))
    assert "DataType bfloat16 not in list of allowed values" in str(record["stock_error"])
    patterns = record["patterns"]
    for r in range(cases.REPLICAS):
        np.testing.assert_array_equal(record[f"values@{r}"], patterns)
        np.testing.assert_array_equal(record[f"indices@{r}"], np.arange(len(patterns)))


# ---------------------------------------------------------------------------
# MirroredStrategy, every optimizer x rounding (slow: ~25 fits)


@pytest.fixture(scope="module")
def mirrored_all(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mirrored_all"))
    run("mirrored", out, timeout=900)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(MIRRORED))
def test_mirrored_every_replica_bit_identical(mirrored_all, case):
    record = load(mirrored_all, f"{case}.mirrored.npz")
    assert_replicas_identical(record, cases.REPLICAS, case)
    _, name, rounding, _ = MIRRORED[case]
    # The scalars (iteration, learning rate, the int32 rounding seed) are not slots.
    slots = [p for p in paths(record) if p.startswith("optimizer/")
             and p not in ("optimizer/iteration", "optimizer/learning_rate",
                           "optimizer/rounding_seed")]
    per_weight = {"sgd_plain": 0, "sgd_nesterov": 1, "adam": 2, "adamw_amsgrad": 3, "lion": 1}
    weights = len([p for p in paths(record) if not p.startswith("optimizer/")])
    assert len(slots) == weights * (per_weight[name] + (rounding == "kahan")), slots


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(c for c in MIRRORED if c.startswith("exact")))
def test_mirrored_exact_model_equals_one_replica_bit_for_bit(mirrored_all, case):
    replicated = load(mirrored_all, f"{case}.mirrored.npz")
    single = load(mirrored_all, f"{case}.single.npz")
    assert_same_bits(replicated, single, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(c for c in MIRRORED
                                        if c.startswith("real") and c.endswith("stochastic")))
def test_mirrored_real_model_within_sr_noise_every_optimizer(mirrored_all, case):
    assert_within_sr_noise(load(mirrored_all, f"{case}.mirrored.npz"),
                           load(mirrored_all, f"{case}.single.npz"),
                           load(mirrored_all, f"{case}.other_seed.npz"),
                           cases.STEPS, case)


# ---------------------------------------------------------------------------
# MultiWorkerMirroredStrategy: two processes (slow: ~35 s)


@pytest.fixture(scope="module")
def multi_worker(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("multi_worker"))
    cluster = {"worker": [f"localhost:{port}" for port in free_ports(2)]}
    workers = []
    try:
        for index in range(2):
            env = dict(os.environ, TF_CONFIG=json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": index}}))
            workers.append(start("worker", out, env=env, log_name=f"worker{index}.log"))
    finally:
        finish(workers, out, timeout=300)
    run("single", out, timeout=300)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(tf_distributed.WORKER_CASES))
def test_multi_worker_replicas_bit_identical(multi_worker, case):
    workers = [load(multi_worker, f"{case}.worker{i}.npz") for i in range(2)]
    assert_replicas_identical(workers[0], 1, case)
    assert_same_bits(workers[1], workers[0], f"{case}: worker 1 vs worker 0")


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(c for c in tf_distributed.WORKER_CASES
                                        if c.startswith("exact")))
def test_multi_worker_default_seed_agreed_and_exact_model_equals_one_replica(multi_worker,
                                                                             case):
    """seed=None: each worker drew its own seed, both trained with worker 0's.
    Each worker initialized its model from its own random seed: the strategy
    broadcast worker 0's bf16 values. The one-replica run (worker 0's seed and
    initialization) has the same bits."""
    workers = [load(multi_worker, f"{case}.worker{i}.npz") for i in range(2)]
    assert workers[0]["drawn_seed"] != workers[1]["drawn_seed"]
    assert workers[0]["seed"] == workers[1]["seed"] == workers[0]["drawn_seed"]
    assert_same_bits(workers[0], load(multi_worker, f"{case}.single.npz"), case)


@pytest.mark.slow
def test_multi_worker_real_model_within_sr_noise(multi_worker):
    case = "real-adam-stochastic"
    assert_within_sr_noise(load(multi_worker, f"{case}.worker0.npz"),
                           load(multi_worker, f"{case}.single.npz"),
                           load(multi_worker, f"{case}.other_seed.npz"),
                           cases.STEPS, case)
