"""`pip install .` builds the op library against the installed TensorFlow,
also under pip's build isolation (where TensorFlow is not importable)."""

import json
import os
import subprocess
import sys
import zipfile

import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = wheel.namelist()
        assert any(n.startswith("tf_bf16/_tf_bf16_ops") and n.endswith(".so") for n in names)
        info = json.loads(wheel.read("tf_bf16/_build_info.json"))
    assert info["tensorflow_version"] == tf.__version__
    assert "-ffp-contract=off" in info["compile_flags"]
