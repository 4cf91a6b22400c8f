"""A missing, broken or mismatched op library gives an OpLibraryError that says how to rebuild.

The loader's state is patched, never the real files: the module-global
``_LIBRARY`` cache is reset, ``TF_BF16_OPS_LIBRARY`` is set or cleared, and
the package directory the loader searches (derived from ``_loader.__file__``)
is pointed at a temporary directory holding a copy of the real library and a
fake ``_build_info.json``. One test runs a fresh interpreter on a copy of the
package, where nothing is loaded yet.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import tensorflow as tf

import tf_bf16
from tf_bf16 import _loader
from tf_bf16 import ops

REBUILD_WORDS = ("pip install --no-build-isolation", "make build")
REAL_LIBRARY = _loader.library_path()  # the library this test session uses
ORIGINAL_OVERRIDE = os.environ.get(_loader.LIBRARY_ENV_VAR)


def _assert_says_how_to_rebuild(message):
    for words in REBUILD_WORDS:
        assert words in message, f"no rebuild hint ({words!r}) in: {message}"


@pytest.fixture
def loader_state(monkeypatch):
    """A loader with nothing loaded and no override; everything restored afterwards."""
    assert REAL_LIBRARY and os.path.exists(REAL_LIBRARY), "the op library is not built"
    _loader.load()  # the real library stays loaded in TensorFlow, whatever the test does
    monkeypatch.setattr(_loader, "_LIBRARY", None)
    monkeypatch.delenv(_loader.LIBRARY_ENV_VAR, raising=False)
    return monkeypatch


def _restore_override(monkeypatch):
    """The session's own TF_BF16_OPS_LIBRARY (usually none), so that load() finds
    the library that is already loaded rather than a second copy."""
    if ORIGINAL_OVERRIDE:
        monkeypatch.setenv(_loader.LIBRARY_ENV_VAR, ORIGINAL_OVERRIDE)
    else:
        monkeypatch.delenv(_loader.LIBRARY_ENV_VAR, raising=False)


def _forbid_loading(monkeypatch, reason):
    """Fails the test if the loader calls tf.load_op_library.

    Loading a second copy of the op library registers every kernel twice, after
    which each tf_bf16 op in this process fails with "Multiple OpKernel
    registrations": a test must not get that far even when the loader is wrong.
    """

    def load_op_library(path):
        raise AssertionError(f"the loader loaded {path} although {reason}")

    monkeypatch.setattr(tf, "load_op_library", load_op_library)


def _package_dir(tmp_path, monkeypatch, library=True, build_info=None):
    """Makes the loader search tmp_path as its package directory."""
    package = tmp_path / "tf_bf16_copy"
    package.mkdir()
    if library:
        shutil.copy(REAL_LIBRARY, package / os.path.basename(REAL_LIBRARY))
    if build_info is not None:
        (package / "_build_info.json").write_text(json.dumps(build_info))
    monkeypatch.setattr(_loader, "__file__", str(package / "_loader.py"))
    return package


def test_op_library_error_is_an_import_error():
    assert issubclass(_loader.OpLibraryError, ImportError)
    assert tf_bf16.OpLibraryError is _loader.OpLibraryError


def test_missing_library_in_package(loader_state, tmp_path):
    package = _package_dir(tmp_path, loader_state, library=False)
    _forbid_loading(loader_state, "there is no library")
    assert _loader.library_path() is None
    with pytest.raises(_loader.OpLibraryError) as info:
        _loader.load()
    message = str(info.value)
    assert "_tf_bf16_ops" in message and "not found" in message and str(package) in message
    _assert_says_how_to_rebuild(message)
    assert _loader._LIBRARY is None


def test_missing_library_named_by_environment(loader_state, tmp_path):
    missing = str(tmp_path / "nowhere" / "_tf_bf16_ops.so")
    loader_state.setenv(_loader.LIBRARY_ENV_VAR, missing)
    assert _loader.library_path() == missing
    with pytest.raises(_loader.OpLibraryError) as info:
        _loader.load()
    assert missing in str(info.value)
    _assert_says_how_to_rebuild(str(info.value))


def test_missing_library_surfaces_through_the_ops(loader_state, tmp_path):
    """The public functions raise it (an ImportError) on first use, not a TF error."""
    loader_state.setenv(_loader.LIBRARY_ENV_VAR, str(tmp_path / "missing.so"))
    variable = tf.Variable(tf.ones([3], tf.bfloat16))
    with pytest.raises(ImportError) as info:
        ops.stochastic_round(tf.ones([3]), seed=1)
    assert isinstance(info.value, _loader.OpLibraryError)
    with pytest.raises(_loader.OpLibraryError):
        ops.apply_sgd(variable, tf.ones([3]), 0.1)
    assert variable.numpy().tolist() == [1, 1, 1]


def test_library_built_for_another_tensorflow(loader_state, tmp_path):
    _package_dir(tmp_path, loader_state,
                 build_info={"tensorflow_version": "2.16.1", "library": "x.so"})
    _forbid_loading(loader_state, "its _build_info.json names TensorFlow 2.16.1")
    with pytest.raises(_loader.OpLibraryError) as info:
        _loader.load()
    message = str(info.value)
    assert "2.16.1" in message and tf.__version__ in message
    _assert_says_how_to_rebuild(message)
    assert _loader._LIBRARY is None


def test_library_named_by_environment_built_for_another_tensorflow(loader_state, tmp_path):
    """The override names a library whose _build_info.json says another TensorFlow.

    Loading it anyway is what the build info exists to prevent: with a real
    mismatch the load fails with an undefined symbol at best. (Here the copy is
    in fact loadable, so only the build-info check can raise.)
    """
    package = _package_dir(tmp_path, loader_state,
                           build_info={"tensorflow_version": "2.16.1", "library": "x.so"})
    loader_state.setenv(_loader.LIBRARY_ENV_VAR,
                        str(package / os.path.basename(REAL_LIBRARY)))
    _forbid_loading(loader_state, "its _build_info.json names TensorFlow 2.16.1")
    with pytest.raises(_loader.OpLibraryError) as info:
        _loader.load()
    assert "2.16.1" in str(info.value)
    _assert_says_how_to_rebuild(str(info.value))


def test_build_info_for_this_tensorflow_is_accepted(loader_state, tmp_path):
    """Control for the two tests above: the same check passes for the right version."""
    package = _package_dir(tmp_path, loader_state, library=False,
                           build_info={"tensorflow_version": tf.__version__})
    _loader._check_built_for_this_tensorflow(str(package / "_tf_bf16_ops.so"), tf.__version__)
    _loader._check_built_for_this_tensorflow(str(tmp_path / "no_info_here.so"), "0.0.0")


@pytest.mark.parametrize("content", [b"", b"not a shared object\n", b"\x7fELF\x02\x01\x01"])
def test_corrupt_library(loader_state, tmp_path, content):
    broken = tmp_path / "_tf_bf16_ops.broken.so"
    broken.write_bytes(content)
    loader_state.setenv(_loader.LIBRARY_ENV_VAR, str(broken))
    with pytest.raises(_loader.OpLibraryError) as info:
        _loader.load()
    message = str(info.value)
    assert str(broken) in message and tf.__version__ in message
    _assert_says_how_to_rebuild(message)
    assert isinstance(info.value.__cause__, Exception)


def test_library_with_an_undefined_symbol(loader_state, tmp_path):
    """What a library built against another TensorFlow's ABI looks like to dlopen."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler to build a library with a missing symbol")
    source = tmp_path / "x.cc"
    source.write_text(
        "namespace tensorflow { void SymbolOfAnotherTensorFlowVersion(); }\n"
        "static int init = (tensorflow::SymbolOfAnotherTensorFlowVersion(), 0);\n")
    library = tmp_path / "_tf_bf16_ops.other_abi.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    loader_state.setenv(_loader.LIBRARY_ENV_VAR, str(library))
    with pytest.raises(_loader.OpLibraryError) as info:
        _loader.load()
    assert "SymbolOfAnotherTensorFlowVersion" in str(info.value)
    _assert_says_how_to_rebuild(str(info.value))


def test_a_failed_load_is_not_cached(loader_state, tmp_path):
    loader_state.setenv(_loader.LIBRARY_ENV_VAR, str(tmp_path / "missing.so"))
    for _ in range(2):
        with pytest.raises(_loader.OpLibraryError):
            _loader.load()
    _restore_override(loader_state)
    library = _loader.load()
    assert _loader._LIBRARY is library
    assert hasattr(library, "tf_bf16_resource_apply_sgd")
    assert ops.stochastic_round(tf.constant([1.0]), seed=1).numpy().tolist() == [1.0]


def test_fresh_interpreter_with_mismatched_build_info(tmp_path):
    """An installed copy of the package whose build info names another TensorFlow."""
    package = tmp_path / "site" / "tf_bf16"
    shutil.copytree(os.path.dirname(tf_bf16.__file__), package,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (package / "_build_info.json").write_text(json.dumps({"tensorflow_version": "2.15.0"}))
    env = {k: v for k, v in os.environ.items() if k != _loader.LIBRARY_ENV_VAR}
    env["PYTHONPATH"] = str(tmp_path / "site")
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    code = ("import tensorflow as tf, tf_bf16\n"
            "assert tf_bf16.__file__.startswith(%r), tf_bf16.__file__\n"
            "tf_bf16.ops.stochastic_round(tf.ones([2]), seed=1)\n" % str(package))
    # cwd: not the source checkout, whose tf_bf16 would be found first.
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    assert result.returncode != 0
    assert "tf_bf16._loader.OpLibraryError" in result.stderr, result.stderr[-2000:]
    assert "built for TensorFlow 2.15.0" in result.stderr
    _assert_says_how_to_rebuild(result.stderr)
