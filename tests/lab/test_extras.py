"""Without the lab extra's packages, every tool says what to install before it
trains anything, `list` says which tasks cannot run and why, and `--help`
still works. Each case runs in a fresh interpreter in which a sys.meta_path
entry (tests/blocker.py) makes the packages look uninstalled."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.lab

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INSTALL = 'pip install "tf_bf16[lab]"'

# Runs each argv of sys.argv[2] through the command line with the modules of
# sys.argv[1] blocked; prints {argv: [exit status, stdout, stderr]} as JSON.
RUNNER = r"""
import contextlib, io, json, sys
import blocker
blocker.block(*json.loads(sys.argv[1]))
from tf_bf16.__main__ import main
out = {}
for argv in json.loads(sys.argv[2]):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            status = main(argv)
        except SystemExit as e:
            status = e.code
    out[" ".join(argv)] = [status, stdout.getvalue(), stderr.getvalue()]
print(json.dumps(out))
"""


def _run_blocked(blocked, argvs, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
               TF_CPP_MIN_LOG_LEVEL="3", TFDS_DATA_DIR=str(tmp_path / "tensorflow_datasets"))
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(blocked), json.dumps(argvs)],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_tools_name_the_missing_package_before_training(tmp_path):
    out_dir = tmp_path / "out"
    results = _run_blocked(
        ["tqdm", "matplotlib", "sklearn", "tensorflow_datasets"],
        [["bench", "--params", "4096", "--no-memory"],
         ["bench-fit", "--model", "mlp", "--no-bytes"],
         ["compare", "--task", "transformer_lm", "--reduced"],
         ["compare", "--task", "transformer_lm", "--reduced", "--out", str(out_dir)],
         ["results", "--reduced", "--output", str(tmp_path / "results.md")],
         ["results", "--from-json", os.path.join(ROOT, "docs", "results", "results.json"),
          "--output", str(tmp_path / "again.md")]],
        tmp_path)
    expected = {"bench": ["tqdm"], "bench-fit": ["tqdm"], "compare": ["tqdm"],
                "compare --out": ["tqdm", "matplotlib"], "results": ["tqdm", "matplotlib"],
                "results --from-json": ["matplotlib"]}
    for argv, (status, stdout, stderr) in results.items():
        words = argv.split()
        command = " ".join([words[0]] + [w for w in words if w in ("--out", "--from-json")])
        assert status == 2, (argv, stdout, stderr)
        assert INSTALL in stderr, (argv, stderr)
        needs = stderr.split(" needs ", 1)[1].split(", which")[0]
        assert needs.split(", ") == expected[command], (argv, stderr)
        assert stdout == "", (argv, stdout)  # nothing trained, timed or written
    assert not out_dir.exists()
    assert not (tmp_path / "results.md").exists() and not (tmp_path / "again.md").exists()


def test_list_and_compare_report_a_task_whose_package_is_missing(tmp_path):
    results = _run_blocked(
        ["matplotlib", "sklearn", "tensorflow_datasets"],
        [["list"], ["compare", "--task", "digits_cnn", "--reduced"],
         ["compare", "--task", "least_squares", "--reduced", "--out", str(tmp_path / "out")]],
        tmp_path)
    status, text, _ = results["list"]
    assert status == 0
    table = text.split("\n\n", 1)[0].splitlines()[2:]  # below the header and its rule
    rows = {line.split()[0]: line for line in table}
    for name in ("digits_cnn", "least_squares", "resnet_cifar10"):
        assert "no (see below)" in rows[name], rows[name]
    for name in ("transformer_lm", "dlrm", "bert", "recurrent"):
        assert " yes " in rows[name], rows[name]
    notes = text.split("cannot run here:")
    assert text.count("cannot run here:") == 3
    assert any("scikit-learn" in note and INSTALL in note for note in notes)
    assert any("tensorflow-datasets" in note and "CIFAR-10" in note for note in notes)

    status, stdout, stderr = results["compare --task digits_cnn --reduced"]
    assert status == 2 and stdout == ""
    assert "task digits_cnn cannot run here" in stderr and "scikit-learn" in stderr
    assert INSTALL in stderr
    # The command's own packages are checked first: --out needs matplotlib.
    status, stdout, stderr = results[
        f"compare --task least_squares --reduced --out {tmp_path / 'out'}"]
    assert status == 2 and stdout == "" and "matplotlib" in stderr


def test_help_works_without_the_lab_packages(tmp_path):
    results = _run_blocked(["tqdm", "matplotlib", "sklearn", "tensorflow_datasets"],
                           [["--help"], ["compare", "--help"], ["bench", "--help"]], tmp_path)
    for argv, (status, stdout, _) in results.items():
        assert status == 0, argv
        assert "usage:" in stdout, argv


def test_command_modules_import_no_lab_package_or_task():
    """What `python -m tf_bf16 --help` imports: the command modules, but none of
    the lab extra's packages that TensorFlow/Keras do not import already, and
    no task module."""
    code = ("import json, sys\n"
            "import tensorflow, keras\n"
            "before = set(sys.modules)\n"
            "import tf_bf16.__main__\n"
            "tf_bf16.__main__.build_parser()\n"
            "print(json.dumps(sorted(set(sys.modules) - before)))\n")
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    added = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "tf_bf16.lab.cli" in added and "tf_bf16.lab.bench_fit" in added
    heavy = [m for m in added if m.split(".")[0] in (
        "tqdm", "matplotlib", "sklearn", "tensorflow_datasets")]
    assert not heavy, heavy
    tasks = [m for m in added if m.startswith("tf_bf16.lab.tasks.")
             and m not in ("tf_bf16.lab.tasks.base",)]
    assert not tasks, tasks
