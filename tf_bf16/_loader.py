"""Lazy loading of the compiled op library, with errors that say how to fix it."""

import glob
import json
import os
import threading

_LOCK = threading.Lock()
_LIBRARY = None

LIBRARY_ENV_VAR = "TF_BF16_OPS_LIBRARY"
REBUILD_HINT = (
    "Rebuild it against the installed TensorFlow: from a source checkout run "
    "`make build` (i.e. `pip install --no-build-isolation -e .`), or reinstall with "
    "`pip install --no-build-isolation --force-reinstall <path to tf_bf16>`."
)


class OpLibraryError(ImportError):
    """The tf_bf16 op library is missing, or was built for another TensorFlow."""


def _tensorflow_built_with_cuda():
    import tensorflow as tf

    return tf.test.is_built_with_cuda()


def library_path():
    """Path of the op library that `load()` will use (None if there is none).

    ``TF_BF16_OPS_LIBRARY`` if set; else the GPU library
    (``_tf_bf16_gpu_ops*.so``: CPU and CUDA kernels) when it was built and this
    TensorFlow is built with CUDA; else the CPU library (``_tf_bf16_ops*.so``).
    """
    override = os.environ.get(LIBRARY_ENV_VAR)
    if override:
        return override
    package_dir = os.path.dirname(os.path.abspath(__file__))
    if _tensorflow_built_with_cuda():
        found = sorted(glob.glob(os.path.join(package_dir, "_tf_bf16_gpu_ops*.so")))
        if found:
            return found[0]
    found = sorted(glob.glob(os.path.join(package_dir, "_tf_bf16_ops*.so")))
    return found[0] if found else None


def _check_built_for_this_tensorflow(path, tf_version):
    info_path = os.path.join(os.path.dirname(path), "_build_info.json")
    if not os.path.exists(info_path):
        return
    with open(info_path) as f:
        built_for = json.load(f).get("tensorflow_version")
    if built_for and built_for != tf_version:
        raise OpLibraryError(
            f"The tf_bf16 op library {path} was built for TensorFlow {built_for}, but "
            f"TensorFlow {tf_version} is installed. {REBUILD_HINT}")


def load():
    """Loads the op library once and returns its generated op module."""
    global _LIBRARY
    if _LIBRARY is not None:
        return _LIBRARY
    with _LOCK:
        if _LIBRARY is None:
            import tensorflow as tf

            path = library_path()
            if path is None or not os.path.exists(path):
                raise OpLibraryError(
                    "The tf_bf16 op library (_tf_bf16_ops*.so) was not found next to "
                    f"{__file__}" + (f" nor at {path}" if path else "") + ". "
                    + REBUILD_HINT)
            _check_built_for_this_tensorflow(path, tf.__version__)
            try:
                _LIBRARY = tf.load_op_library(path)
            except (tf.errors.NotFoundError, OSError) as e:
                raise OpLibraryError(
                    f"Loading the tf_bf16 op library {path} into TensorFlow "
                    f"{tf.__version__} failed: {e}\n{REBUILD_HINT}") from e
    return _LIBRARY
