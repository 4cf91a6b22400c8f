"""`pip install .` builds the op library against the installed TensorFlow,
also under pip's build isolation (where TensorFlow is not importable)."""

import json
import os
import re
import subprocess
import sys
import zipfile

import pytest
import tensorflow as tf

import tf_bf16

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # a full build of the op library in a fresh environment
def test_isolated_wheel_build_contains_library_built_for_this_tensorflow(tmp_path):
    # A copy of the tracked sources only, so no build output of the checkout leaks in.
    source = tmp_path / "src"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes((open(os.path.join(ROOT, name), "rb")).read())
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "dist"),
         str(source)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    wheels = list((tmp_path / "dist").glob("tf_bf16-*.whl"))
    assert len(wheels) == 1
    assert wheels[0].name.startswith(f"tf_bf16-{tf_bf16.__version__}-")
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = wheel.namelist()
        assert any(n.startswith("tf_bf16/_tf_bf16_ops") and n.endswith(".so") for n in names)
        info = json.loads(wheel.read("tf_bf16/_build_info.json"))
        # The library requires Keras and NumPy only; the tools' packages are the lab extra.
        metadata = wheel.read(f"tf_bf16-{tf_bf16.__version__}.dist-info/METADATA").decode()
        assert "tf_bf16/lab/cli.py" in names and "tf_bf16/lab/tasks/base.py" in names
    assert info["tensorflow_version"] == tf.__version__
    assert "-ffp-contract=off" in info["compile_flags"]
    requires = [line.split(": ", 1)[1] for line in metadata.splitlines()
                if line.startswith("Requires-Dist: ")]

    def names(extra):
        return sorted(re.match(r"[A-Za-z0-9_.-]+", r).group(0) for r in requires
                      if (f'extra == "{extra}"' in r if extra else "extra ==" not in r))

    assert names(None) == ["keras", "numpy"], requires
    assert names("lab") == ["matplotlib", "scikit-learn", "tensorflow-datasets", "tqdm"], requires
    assert names("test") == ["atheris", "hypothesis", "pytest"], requires
