"""tf_bf16 on Keras's JAX backend over 4 CPU host devices: replicas bit-identical,
sharded weights trained to the unsharded bits, because the rounding keys on global
element indices.

The runs happen in subprocesses (tests/jax_distributed.py) with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``:

- **jax_ops on sharded arrays**: every update (SGD-Nesterov with weight
  decay, AdamW-AMSGrad, Lion, rounded_assign_add; each rounding) and
  stochastic_round, jitted on arrays sharded by rows, columns, tiles of a
  2 x 2 mesh (also transposed, and rows over all 4 devices), and unevenly
  (37 x 53, padded last shards): the same bits as unsharded. XLA's SPMD
  partitioner gives each shard the global values of the per-axis iotas
  (`jax_ops.flat_index`), so each element draws the bits of its global
  index. The control: the same update run shard by shard (`shard_map`),
  i.e. keyed on local indices as an optimizer that sees only its shard
  would, gives other bits: the check can fail.
- **keras.distribution.DataParallel** (4 replicas), `fit`: every optimizer x
  rounding on the exact model (tests/distributed_cases.py): each device's
  copy of every variable bit-identical, and the one-device run's bits. The
  real model (SR): replicas identical, within SR noise of one device.
- **keras.distribution.ModelParallel** with a LayoutMap on a 2 (batch) x 2
  (model) mesh (Dense kernel by output units, Embedding by rows), `fit`:
  every optimizer x rounding on the exact model trains to the unsharded
  run's bits; the shards replicated along the batch axis are identical.
- **jax.distributed**: two processes of one CPU device each
  (`keras.distribution.initialize` on loopback, gloo collectives),
  DataParallel over both, each process feeding its half of every global
  batch, `seed=None`: the processes drew different seeds and both trained
  with process 0's; both hold the same bits, and one device's.
- **The char GPT of tools/data_parallel.py with tensor parallelism** (1 x 4
  mesh: attention heads, feed-forward units, vocabulary, both embedding
  tables): with the same gradients, `optimizer.stateless_apply` under `jit`
  gives the unsharded bits for every optimizer x rounding. `fit` under the
  same LayoutMap stays within SR noise of the unsharded fit but does not
  give its bits: sharding a kernel splits a contraction (the backward
  dx = dy W^T over a sharded output dimension, or the forward over a sharded
  input dimension) into per-device partial sums that XLA adds in another
  order; stock Keras in float32 differs the same way (the control test).
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import jax  # noqa: F401  (the jax extra: missing fails, not skips)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "jax_distributed.py")
sys.path.insert(0, os.path.join(ROOT, "tests"))
import distributed_cases as cases  # noqa: E402
from distributed_cases import (assert_replicas_identical, assert_same_bits,  # noqa: E402
                               assert_shards_consistent, assert_within_sr_noise, bits,
                               paths)

DEVICES = 4
EXACT = [f"exact-{name}-{rounding}" for name in cases.OPTIMIZERS for rounding in cases.ROUNDINGS]
REAL = [f"real-{name}-stochastic" for name in ("sgd_nesterov", "adam", "lion")]


def run_jax(mode, out, args=(), timeout=900):
    """tests/jax_distributed.py in its own process group, output to a log;
    killed (the whole group) if it outlives `timeout`."""
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    log_path = os.path.join(out, f"{mode}.log")
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, SCRIPT, mode, out, *args], cwd=ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    if process.returncode != 0:
        with open(log_path) as f:
            pytest.fail(f"{mode} exited with {process.returncode}:\n{f.read()[-4000:]}")
    return out


def load(out, name):
    return cases.load(os.path.join(out, name))


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def ops_results(out):
    with open(os.path.join(out, "ops.json")) as f:
        return json.load(f)


def check_ops(results):
    sharded = {k: v for k, v in results.items() if not k.startswith("control/")}
    controls = {k: v for k, v in results.items() if k.startswith("control/")}
    assert sharded and controls
    differing = {k: v for k, v in sharded.items() if v}
    assert not differing, f"sharded updates with other bits than unsharded ones: {differing}"
    assert all(v > 0 for v in controls.values()), controls   # local indices: other bits
    assert any("uneven" in k for k in sharded)


def check_data_parallel(out, case):
    replicated = load(out, f"{case}.data_parallel.npz")
    assert_replicas_identical(replicated, DEVICES, case)
    single = load(out, f"{case}.single.npz")
    if case.startswith("exact"):
        assert_same_bits(replicated, single, case)
    else:
        assert_within_sr_noise(replicated, single, load(out, f"{case}.other_seed.npz"),
                               cases.STEPS, case)


def check_model_parallel(out, case):
    sharded = load(out, f"{case}.model_parallel.npz")
    names = assert_shards_consistent(sharded, case)
    assert {"dense/kernel", "embedding/embeddings"} <= set(names), names
    if not case.startswith("exact-sgd_plain-") or case.endswith("kahan"):   # it has slots
        assert any(n.startswith("optimizer/") for n in names), names   # sharded like them
    assert_same_bits(sharded, load(out, f"{case}.single.npz"), case)


# ---------------------------------------------------------------------------
# Fast: a subset in one subprocess


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    return run_jax("quick", str(tmp_path_factory.mktemp("jax_quick")), timeout=600)


def test_sharded_updates_give_the_unsharded_bits(quick):
    check_ops(ops_results(quick))


def test_data_parallel_replicas_identical_and_one_device_bits(quick):
    check_data_parallel(quick, "exact-adamw_amsgrad-kahan")


def test_model_parallel_layout_map_trains_to_the_unsharded_bits(quick):
    check_model_parallel(quick, "exact-adamw_amsgrad-stochastic")


# ---------------------------------------------------------------------------
# Slow: everything


@pytest.fixture(scope="module")
def ops_all(tmp_path_factory):
    return run_jax("ops", str(tmp_path_factory.mktemp("jax_ops")))


@pytest.mark.slow
def test_every_update_layout_and_rounding_gives_the_unsharded_bits(ops_all):
    results = ops_results(ops_all)
    check_ops(results)
    assert len(results) >= 13 * (5 * 2 + 1)


@pytest.fixture(scope="module")
def data_parallel(tmp_path_factory):
    return run_jax("data_parallel", str(tmp_path_factory.mktemp("jax_data_parallel")),
                   timeout=1500)


@pytest.mark.slow
@pytest.mark.parametrize("case", EXACT + REAL)
def test_data_parallel_every_optimizer_and_rounding(data_parallel, case):
    check_data_parallel(data_parallel, case)


@pytest.fixture(scope="module")
def model_parallel(tmp_path_factory):
    return run_jax("model_parallel", str(tmp_path_factory.mktemp("jax_model_parallel")),
                   timeout=1500)


@pytest.mark.slow
@pytest.mark.parametrize("case", EXACT)
def test_model_parallel_every_optimizer_and_rounding(model_parallel, case):
    check_model_parallel(model_parallel, case)


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    return run_jax("gpt", str(tmp_path_factory.mktemp("jax_gpt")), timeout=1500)


@pytest.mark.slow
@pytest.mark.parametrize("rounding", cases.ROUNDINGS)
@pytest.mark.parametrize("name", sorted(cases.OPTIMIZERS))
def test_gpt_tensor_parallel_update_gives_the_unsharded_bits(gpt, name, rounding):
    case = f"gpt_same_gradients-{name}-{rounding}"
    sharded = load(gpt, f"{case}.sharded.npz")
    sharded_names = assert_shards_consistent(sharded, case)
    for layer in ("tokens", "positions", "query", "attention_output", "ff1", "ff2", "logits"):
        assert any(layer in n and not n.startswith("optimizer/") for n in sharded_names), layer
    assert_same_bits(sharded, load(gpt, f"{case}.unsharded.npz"), case,
                     every_weight_moves=rounding != "nearest")


@pytest.mark.slow
def test_gpt_tensor_parallel_fit_within_sr_noise(gpt):
    sharded = load(gpt, "gpt_fit-sr.sharded.npz")
    assert_shards_consistent(sharded, "gpt fit")
    assert_within_sr_noise(sharded, load(gpt, "gpt_fit-sr.unsharded.npz"),
                           load(gpt, "gpt_fit-sr.other_seed.npz"), 6, "gpt fit")


@pytest.mark.slow
def test_sharding_changes_the_models_own_arithmetic_in_float32_too(gpt):
    """The control of the test above: stock Keras SGD in float32 on the same
    model and LayoutMap also ends with other weights than unsharded, so the
    difference comes from the partitioned forward/backward pass, not from
    tf_bf16's update."""
    sharded = load(gpt, "gpt_fit-float32.sharded.npz")
    unsharded = load(gpt, "gpt_fit-float32.unsharded.npz")
    weights = [p for p in paths(unsharded) if not p.startswith("optimizer/")]
    assert any(np.any(bits(sharded[f"{p}@0"]) != bits(unsharded[f"{p}@0"])) for p in weights)


@pytest.fixture(scope="module")
def processes(tmp_path_factory):
    """Two jax.distributed processes, started here and always killed, then the
    one-device runs with the seed they agreed on."""
    out = str(tmp_path_factory.mktemp("jax_processes"))
    port = free_port()
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    workers, logs = [], []
    try:
        for index in range(2):
            logs.append(open(os.path.join(out, f"process{index}.log"), "w"))
            workers.append(subprocess.Popen(
                [sys.executable, SCRIPT, "process", out, str(index), str(port)], cwd=ROOT,
                env=env, stdout=logs[-1], stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + 600
        for worker in workers:
            try:
                worker.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
    finally:
        for worker in workers:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
        for log in logs:
            log.close()
    if any(w.returncode != 0 for w in workers):
        tails = []
        for index in range(2):
            with open(os.path.join(out, f"process{index}.log")) as f:
                tails.append(f"--- process {index}\n" + f.read()[-3000:])
        pytest.fail("jax.distributed processes failed:\n" + "\n".join(tails))
    return run_jax("single", out)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["exact-adamw_amsgrad-stochastic", "exact-sgd_nesterov-kahan"])
def test_jax_distributed_processes_agree_on_the_seed_and_the_bits(processes, case):
    first, second = (load(processes, f"{case}.process{i}.npz") for i in range(2))
    assert first["drawn_seed"] != second["drawn_seed"]
    assert first["seed"] == second["seed"] == first["drawn_seed"]
    single = load(processes, f"{case}.single.npz")
    for index, record in enumerate((first, second)):
        assert_same_bits(record, single, f"{case}: process {index} vs one device")
