"""Shared fixtures and helpers: the device, fresh global state, bit-level comparisons.

The rounding modes come from the package (`tf_bf16.ROUNDINGS`), not from here."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf

DTYPES = (tf.bfloat16, tf.float32)


def fresh_global_state(seed):
    """An autouse fixture for a test module: every test starts and ends with
    Keras's float32 policy and no tf_bf16 policy, and starts from `seed`.
    Use: ``restore_global_state = fresh_global_state(1234)``."""
    import keras
    import tf_bf16

    @pytest.fixture(autouse=True)
    def restore_global_state():
        tf_bf16.reset_policy()
        keras.config.set_dtype_policy("float32")
        keras.utils.set_random_seed(seed)
        yield
        tf_bf16.reset_policy()
        keras.config.set_dtype_policy("float32")

    return restore_global_state


def available_devices():
    """CPU always; GPU when TensorFlow sees one and the GPU op library (with the
    CUDA kernels) is the one tf_bf16 loads. Without both, a GPU parameter would
    only rerun the CPU kernels under soft placement, so it is not listed."""
    from tf_bf16 import _loader

    devices = ["CPU"]
    if tf.config.list_physical_devices("GPU") and \
            "_tf_bf16_gpu_ops" in (_loader.library_path() or ""):
        devices.append("GPU")
    return devices


@pytest.fixture(params=available_devices())
def device(request):
    """Runs the test on each device that has tf_bf16 kernels here."""
    with tf.device(f"/{request.param}:0"):
        yield request.param


def bits(x):
    """Raw bit pattern of a tensor/variable/array as an unsigned integer array."""
    if hasattr(x, "numpy"):
        x = x.numpy()
    x = np.asarray(x)
    return x.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize])


def assert_bits_equal(a, b, what=""):
    a_bits, b_bits = bits(a), bits(b)
    assert a_bits.shape == b_bits.shape, f"{what}: shapes {a_bits.shape} != {b_bits.shape}"
    mismatch = np.flatnonzero(a_bits.reshape(-1) != b_bits.reshape(-1))
    assert mismatch.size == 0, (
        f"{what}: {mismatch.size} of {a_bits.size} elements differ; first at flat index "
        f"{mismatch[0]}: {a_bits.reshape(-1)[mismatch[0]]:#x} != {b_bits.reshape(-1)[mismatch[0]]:#x}")
