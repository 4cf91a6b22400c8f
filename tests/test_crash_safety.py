"""A training process killed with SIGKILL mid-epoch and restarted with
`keras.callbacks.BackupAndRestore` ends with the bits of a run that was never
interrupted: weights, Adam's moments, Kahan buffers, BatchNormalization
statistics, iteration count and the (default, drawn) seed.

Real processes (tests/crash_child.py): the child trains 4 epochs of 4 batches,
backing up at every epoch end; it says when it has finished a chosen batch in
the middle of an epoch and waits; the test kills it (SIGKILL: no handler, no
flush, no atexit) and starts it again. Killed twice (in epochs 2 and 3), then
the third process resumes from the last backup, finishes, and trains the same
model uninterrupted with the seed the killed runs drew, for comparison.

Keras's BackupAndRestore resumes at the start of the epoch of its last backup
(it records the batch but does not skip to it), so with `save_freq="epoch"` the
interrupted epoch is replayed from its start, with the state and the random
streams (keyed on the restored iteration count and seed) it had: the same bits.
With an integer `save_freq` Keras would restore a mid-epoch state and replay
the epoch's first batches a second time -- a different run, in float32 too.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = os.path.join(ROOT, "tests", "crash_child.py")
STOPS = [(1, 2), (2, 1)]          # (epoch, batch) after which each process is killed


def _env(backend):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3",
               JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    return env


def _run_until_killed(backend, backup, out, stop):
    ready = os.path.join(out, "ready")
    if os.path.exists(ready):
        os.remove(ready)
    child = subprocess.Popen([sys.executable, CHILD, backup, out, "train", *map(str, stop)],
                             env=_env(backend), cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not os.path.exists(ready):
        if child.poll() is not None:
            raise AssertionError(f"the child exited ({child.returncode}) before its stop "
                                 f"point:\n{child.stdout.read()[-4000:]}")
        if time.monotonic() > deadline:
            child.kill()
            raise AssertionError("the child never reached its stop point")
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    with open(ready) as f:
        assert f.read() == f"{stop[0]} {stop[1]}"
    with open(os.path.join(out, f"seed.{child.pid}")) as f:
        return int(f.read())


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_sigkill_mid_epoch_then_backup_and_restore_is_bit_identical(backend, tmp_path):
    if backend == "jax":
        import jax  # noqa: F401  (the jax extra: missing fails, not skips)
    backup, out = str(tmp_path / "backup"), str(tmp_path)
    seeds = [_run_until_killed(backend, backup, out, stop) for stop in STOPS]
    # The second process restored the first one's drawn seed from the backup.
    assert seeds[0] == seeds[1]
    result = subprocess.run([sys.executable, CHILD, backup, out, "finish"], env=_env(backend),
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    resumed = np.load(os.path.join(out, "resumed.npz"))
    uninterrupted = np.load(os.path.join(out, "uninterrupted.npz"))
    assert sorted(resumed.files) == sorted(uninterrupted.files)
    roles = {"kahan_compensation": 0, "moving_mean": 0, "moving_variance": 0, "momentum": 0,
             "velocity": 0, "iteration": 0, "rounding_seed": 0}
    differ = []
    for key in sorted(resumed.files):
        for role in roles:
            roles[role] += role in key
        if not np.array_equal(resumed[key], uninterrupted[key]):
            differ.append(key)
    assert not differ, f"{backend}: differ after the kills: {differ}"
    assert all(roles.values()), roles       # every kind of state was compared
    seed_key = next(k for k in resumed.files if "rounding_seed" in k)
    assert int(resumed[seed_key].view(np.int32)[0]) == seeds[0]
    iteration_key = next(k for k in resumed.files if ":iteration:" in k)
    iterations = resumed[iteration_key].view(np.dtype(iteration_key.rsplit(":", 1)[1]))
    assert int(iterations[0]) == 4 * 4     # EPOCHS * BATCHES of tests/crash_child.py
