"""`python -m tf_bf16 compare | list | results` end to end, on reduced configurations."""

import argparse
import contextlib
import io
import json
import math
import os
import shutil

import keras
import pytest

import tf_bf16
from tf_bf16 import __main__ as cli
from tf_bf16 import policy
from tf_bf16.lab import report
from tf_bf16.lab import runner
from tf_bf16.lab.tasks import VARIANTS, all_tasks

pytestmark = pytest.mark.lab

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MY_TASKS = ("least_squares", "digits_cnn")
# Every task but resnet_cifar10 runs offline here; resnet_cifar10 needs prepared
# CIFAR-10 and goes through the runner on tfds mock data instead
# (test_vision_and_ctr_tasks.py).
OFFLINE_TASKS = sorted(set(all_tasks()) - {"resnet_cifar10"})


@pytest.fixture(autouse=True, scope="module")
def _reset_policy():
    tf_bf16.reset_policy()
    yield
    tf_bf16.reset_policy()


def _main(argv):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = cli.main(argv)
    return status, stdout.getvalue()


@pytest.fixture(scope="module", params=MY_TASKS)
def compare_run(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"compare_{request.param}")
    status, text = _main(["compare", "--task", request.param, "--reduced", "--no-progress",
                          "--seed", "3", "--out", str(out)])
    return (request.param, status, text, out, keras.config.dtype_policy().name,
            policy.policy_state().active)


def test_compare_outputs(compare_run):
    name, status, text, out, dtype_policy, active = compare_run
    assert status == 0
    # Keras's global policy is back to float32 and the tf_bf16 policy is off.
    assert dtype_policy == "float32" and not active
    for label in ("float32", "mixed_bfloat16", "bf16 nearest", "bf16 SR", "bf16 Kahan",
                  "B/param", "wall s", "gap to float32"):
        assert label in text, label
    assert (out / "curves.png").stat().st_size > 1000
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "results.md").read_text()
    assert "| bf16 Kahan |" in md and "curves.png" in md
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == name and results["seed"] == 3
    assert set(results["variants"]) == set(VARIANTS)


def test_compare_variants_trained(compare_run):
    _, _, _, out, _, _ = compare_run
    results = json.loads((out / "results.json").read_text())
    # mixed_bfloat16 keeps float32 weights and momentum, as float32 does.
    expected_bytes = {"float32": 8, "mixed_bfloat16": 8, "nearest": 4, "stochastic": 4,
                      "kahan": 6}
    for variant, r in results["variants"].items():
        assert r["finite"], variant
        assert all(isinstance(x, float) and math.isfinite(x) for x in r["curve"]), variant
        assert r["steps"] == r["epochs"] * r["steps_per_epoch"] > 0
        assert r["weights_changed_fraction"] > 0.5, variant
        late = r["late_weights_changed_fraction"]
        assert 0 <= late <= 1, variant
        if variant == "float32":
            # Every float32 SGD-momentum step changes almost every weight.
            assert late > 0.5, late
        # SGD momentum: weights + momentum (+ Kahan buffer), from the variables.
        assert r["bytes_per_parameter"] == expected_bytes[variant], variant
        if variant in ("float32", "mixed_bfloat16"):
            assert r["state_dtypes"] == ["float32"], variant
            assert r["optimizer"] == "keras.SGD"
            assert r["dtype_policy"] == variant
        else:
            # Only bf16 state: every model variable and every optimizer slot.
            assert r["state_dtypes"] == ["bfloat16"], variant
            assert r["optimizer"] == f"tf_bf16.SGD(rounding={variant!r})"
    assert results["variants"]["float32"]["gap_to_float32"] == 0.0


def test_list():
    status, text = _main(["list"])
    assert status == 0
    for name in all_tasks():
        assert name in text
    assert "distance to optimum" in text and "test accuracy" in text


def _help(argv):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), pytest.raises(SystemExit):
        cli.main(argv + ["--help"])
    return stdout.getvalue()


@pytest.mark.parametrize("command", ["compare", "list", "results"])
def test_help_documents_every_option(command):
    text = _help([command])
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    options = [s for action in sub.choices[command]._actions for s in action.option_strings]
    for option in options:
        assert option in text, option
    for action in sub.choices[command]._actions:
        assert action.help, action.option_strings
    if command != "list":
        for option in ("--seed" if command == "compare" else "--seeds", "--steps", "--epochs",
                       "--learning-rate", "--batch-size", "--reduced", "--variants"):
            assert option in text


def test_top_level_help_lists_commands():
    text = _help([])
    for command in ("compare", "list", "results"):
        assert command in text


def test_unknown_task_and_bad_variant():
    assert _main(["compare", "--task", "no_such_task"])[0] == 2
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["compare", "--task", "x", "--variants", "fp8"])


def test_results_file(tmp_path):
    output = tmp_path / "docs" / "results.md"
    status, text = _main(["results", "--reduced", "--seeds", "2", "--tasks",
                          ",".join(MY_TASKS), "--no-progress", "--output", str(output)])
    assert status == 0
    assert keras.config.dtype_policy().name == "float32"
    md = output.read_text()
    assert "## Summary" in md and "±" in md
    for name in MY_TASKS:
        assert f"## {name}" in md
        assert (tmp_path / "docs" / "results" / f"{name}.png").stat().st_size > 1000
        assert f"results/{name}.png" in md
    assert "python -m tf_bf16" in md and "Machine:" in md
    data = json.loads((tmp_path / "docs" / "results" / "results.json").read_text())
    for name in MY_TASKS:
        stats = data["tasks"][name]["stats"]
        assert set(stats) == set(VARIANTS)
        for variant, s in stats.items():
            assert len(s["values"]) == 2 and math.isfinite(s["mean"])
            assert isinstance(s["matches_float32"], bool)
    # Re-rendering from the JSON, without training, gives the same report.
    again = tmp_path / "again" / "results.md"
    again.parent.mkdir()
    status, text = _main(["results", "--from-json",
                          str(tmp_path / "docs" / "results" / "results.json"),
                          "--output", str(again)])
    assert status == 0 and "from" in text
    assert again.read_text() == md
    for name in MY_TASKS:
        assert (tmp_path / "again" / "results" / f"{name}.png").stat().st_size > 1000
    status, _ = _main(["results", "--from-json", str(tmp_path / "missing.json")])
    assert status == 2


@pytest.mark.parametrize("name", OFFLINE_TASKS)
def test_every_task_runs_reduced(name):
    """Every offline task trains through the runner, reduced, one seed, all variants."""
    task = all_tasks()[name]
    assert task.available() is None
    args = cli.build_parser().parse_args(["compare", "--task", name, "--reduced"])
    cfg = runner.training_config(task, args)
    cfg["reduced"] = True
    results = runner.run_task(task, 0, list(VARIANTS), cfg, progress=False)
    assert keras.config.dtype_policy().name == "float32"
    for variant, r in results.items():
        assert r["finite"], (name, variant)
        assert r["steps"] > 0 and r["weights_changed_fraction"] > 0, (name, variant)
        if variant == "mixed_bfloat16":
            # float32 master weights and optimizer state (no bf16 state).
            assert ("float32" in r["state_dtypes"]
                    and "bfloat16" not in r["state_dtypes"]), (name, variant)
        elif variant != "float32":
            assert "bfloat16" in r["state_dtypes"], (name, variant)


@pytest.mark.parametrize("variant", ["float32", "mixed_bfloat16"])
@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "Lion"])
def test_keras_baseline_densifies_sparse_gradients(name, variant):
    """The Keras optimizer of the float32 and mixed_bfloat16 variants must run
    the dense update on an Embedding's IndexedSlices gradient (duplicate rows
    summed before Adam squares them), bit for bit as if the gradient had been
    dense."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(5)
    table = rng.standard_normal((6, 3)).astype("float32")
    values = tf.constant(rng.standard_normal((5, 3)).astype("float32"))
    indices = tf.constant([1, 4, 1, 1, 2])  # row 1 three times
    sparse = tf.IndexedSlices(values, indices, tf.constant([6, 3]))
    dense = tf.convert_to_tensor(sparse)
    kwargs = {"learning_rate": 0.01}
    if name == "SGD":
        kwargs["momentum"] = 0.9
    cfg = {"optimizer": name, "learning_rate": 0.01,
           "optimizer_kwargs": {k: v for k, v in kwargs.items() if k != "learning_rate"}}

    def run(optimizer, grad):
        var = keras.Variable(table)
        for _ in range(3):
            optimizer.apply_gradients([(grad, var)])
        return var.numpy()

    baseline = runner.make_optimizer(variant, cfg, 0)
    assert isinstance(baseline, getattr(keras.optimizers, name))
    got = run(baseline, sparse)
    want = run(getattr(keras.optimizers, name)(**kwargs), dense)
    np.testing.assert_array_equal(got, want)
    if name in ("Adam", "AdamW"):
        # Why the wrapper exists: stock Keras on the IndexedSlices differs.
        stock = run(getattr(keras.optimizers, name)(**kwargs), sparse)
        assert np.max(np.abs(stock - want)) > 1e-4


def test_task_info_reaches_outputs(tmp_path):
    status, text = _main(["compare", "--task", "least_squares", "--reduced", "--no-progress",
                          "--variants", "float32,kahan", "--out", str(tmp_path)])
    assert status == 0
    assert "data: samples = 442" in text
    assert "Data: samples = 442" in (tmp_path / "results.md").read_text()
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["variants"]["kahan"]["task_info"]["features"] == 10


def _failing_plot(*args, **kwargs):
    raise RuntimeError("plotting failed")


def test_compare_out_writes_results_before_plotting(tmp_path, monkeypatch):
    """A failure while plotting loses neither the JSON nor the Markdown."""
    monkeypatch.setattr(report, "plot_curves", _failing_plot)
    with pytest.raises(RuntimeError, match="plotting failed"):
        _main(["compare", "--task", "least_squares", "--reduced", "--no-progress",
               "--variants", "float32,kahan", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["variants"]) == {"float32", "kahan"}
    assert "| bf16 Kahan |" in (tmp_path / "results.md").read_text()
    assert not (tmp_path / "curves.png").exists()


def test_results_writes_report_before_plotting(tmp_path, monkeypatch):
    """results (here re-rendering the committed run) writes results.json and the
    report before the plots, so a plotting failure loses nothing."""
    monkeypatch.setattr(report, "plot_curves", _failing_plot)
    shutil.copy(os.path.join(ROOT, "docs", "results_discussion.md"), tmp_path)
    output = tmp_path / "results.md"
    with pytest.raises(RuntimeError, match="plotting failed"):
        _main(["results", "--from-json", os.path.join(ROOT, "docs", "results", "results.json"),
               "--output", str(output)])
    assert output.read_text() == _committed_cpu_sections()
    assert json.loads((tmp_path / "results" / "results.json").read_text())["tasks"]


def _committed_cpu_sections():
    """docs/results.md without its GPU section (rendered from docs/results/gpu/)."""
    with open(os.path.join(ROOT, "docs", "results.md")) as f:
        text = f.read()
    cpu, _, _ = text.partition("\n\n## GPU runs:")
    return cpu if cpu == text else cpu + "\n"


def test_committed_results_rerender_identically(tmp_path):
    """docs/results.md is what `results --from-json docs/results/results.json
    --gpu-json docs/results/gpu/results.json` renders (the CPU sections alone
    without the GPU JSON)."""
    shutil.copy(os.path.join(ROOT, "docs", "results_discussion.md"), tmp_path)
    output = tmp_path / "results.md"
    status, _ = _main(["results", "--from-json",
                       os.path.join(ROOT, "docs", "results", "results.json"),
                       "--output", str(output)])
    assert status == 0
    assert output.read_text() == _committed_cpu_sections()
    gpu_json = os.path.join(ROOT, "docs", "results", "gpu", "results.json")
    if os.path.exists(gpu_json):
        with_gpu = tmp_path / "with_gpu.md"
        status, _ = _main(["results", "--from-json",
                           os.path.join(ROOT, "docs", "results", "results.json"),
                           "--gpu-json", gpu_json, "--output", str(with_gpu)])
        assert status == 0
        with open(os.path.join(ROOT, "docs", "results.md")) as f:
            assert with_gpu.read_text() == f.read()
    pngs = sorted(p.name for p in (tmp_path / "results").glob("*.png"))
    assert pngs == sorted(f"{name}.png" for name in json.loads(
        (tmp_path / "results" / "results.json").read_text())["tasks"])
