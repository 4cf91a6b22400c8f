"""The examples/ scripts run: each in a subprocess with small sizes, and must exit 0.

compare_own_model.py's functions also go through the command line
(`compare --model FILE:build_model --data FILE:load_data`), as its docstring says.

They take their data from scikit-learn and tensorflow-datasets (the lab extra,
which `make test` installs); nothing is downloaded.
"""

import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

EXAMPLES = {
    "quickstart.py": ["--epochs", "3"],
    "tfds_pipeline.py": ["--epochs", "1", "--mock-examples", "64"],
    "fit_with_callbacks.py": ["--epochs", "3", "--more-epochs", "1"],
    "export_and_serve.py": ["--epochs", "2"],
    "compare_own_model.py": ["--epochs", "1", "--steps", "5"],
}
OWN_MODEL = os.path.join(ROOT, "examples", "compare_own_model.py")
COMMANDS = {
    "compare --model examples/compare_own_model.py:build_model": [
        "-m", "tf_bf16", "compare", "--model", f"{OWN_MODEL}:build_model",
        "--data", f"{OWN_MODEL}:load_data", "--epochs", "1", "--steps", "3",
        "--variants", "float32,mixed_bfloat16,kahan", "--no-progress"],
}


@pytest.mark.slow
def test_examples_run(tmp_path):
    """Each example exits 0 (run concurrently to keep the suite short)."""
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2",
               TFDS_DATA_DIR=str(tmp_path / "tensorflow_datasets"), TMPDIR=str(tmp_path))
    processes = {}
    start = time.time()
    for script, args in EXAMPLES.items():
        extra = {"fit_with_callbacks.py": ["--dir", str(tmp_path / script)],
                 "export_and_serve.py": ["--dir", str(tmp_path / script)],
                 "compare_own_model.py": ["--out", str(tmp_path / script)]}.get(script, [])
        processes[script] = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "examples", script), *args, *extra],
            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for name, argv in COMMANDS.items():
        processes[name] = subprocess.Popen(
            [sys.executable, *argv], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
    failures = []
    for script, process in processes.items():
        output, _ = process.communicate(timeout=max(10, 240 - (time.time() - start)))
        if process.returncode != 0:
            failures.append(f"{script} exited {process.returncode}:\n{output[-3000:]}")
    assert not failures, "\n\n".join(failures)
