"""Smoke tests of `python -m tf_bf16 bench-fit` (tiny sizes; timings are not asserted),
and of its verdict and exit status on made-up results that pass and that miss.

The bytes per parameter are deterministic (tf_bf16.audit sums them from the
variables' dtypes and shapes), so they are checked exactly.
"""

import argparse
import contextlib
import io
import json

import keras
import pytest

import tf_bf16
from tf_bf16 import __main__ as cli
from tf_bf16 import policy
from tf_bf16.lab import bench_fit
from tf_bf16.lab import common

pytestmark = pytest.mark.lab

# --threads 0: TensorFlow has already started in the test process.
TINY = ["bench-fit", "--width", "8", "--batch-size", "4", "--steps", "2", "--repeats", "2",
        "--apply-calls", "1", "--threads", "0", "--no-progress", "--check"]

EXPECTED_BYTES = {
    "tf_bf16_sgd_sr": 4, "tf_bf16_sgd_kahan": 6, "tf_bf16_adam_sr": 6,
    "tf_bf16_adam_kahan": 8, "keras_sgd_bf16": 4, "keras_adam_bf16": 6,
    "keras_sgd_mixed": 8, "keras_adam_mixed": 12, "keras_sgd_float32": 8,
    "keras_adam_float32": 12,
}


@pytest.fixture(autouse=True, scope="module")
def _reset_policy():
    tf_bf16.reset_policy()
    yield
    tf_bf16.reset_policy()


def _run(argv, tmp_path):
    json_path, md_path = tmp_path / "bench_fit.json", tmp_path / "bench_fit.md"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = cli.main(argv + ["--json", str(json_path), "--markdown", str(md_path)])
    return status, stdout.getvalue(), json.loads(json_path.read_text()), md_path.read_text()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run of both models: (exit status, stdout, JSON results, Markdown, policy
    name after the run, tf_bf16 policy active after the run)."""
    status, text, results, markdown = _run(TINY, tmp_path_factory.mktemp("bench_fit"))
    return (status, text, results, markdown, keras.config.dtype_policy().name,
            policy.policy_state().active)


def _missed(results):
    return [t for t in results["targets"] if t["status"] == "MISS"]


def test_exit_status_and_policy_restored(tiny_run):
    status, _, results, _, dtype_policy, active = tiny_run
    # --check: 1 exactly when a target was missed (tiny timings may miss).
    assert status == (1 if _missed(results) else 0)
    # The run switches policies (pure bf16, mixed_bfloat16, float32) and puts
    # the one it found back.
    assert dtype_policy == "float32"
    assert not active


def test_timing_table_has_every_row(tiny_run):
    _, text, results, markdown, _, _ = tiny_run
    assert [e["spec"]["model"] for e in results["models"]] == list(bench_fit.MODELS)
    for entry in results["models"]:
        rows = {r["key"]: r for r in entry["timing"]}
        assert list(rows) == [row.key for row in bench_fit.TIMING_ROWS]
        for row in bench_fit.TIMING_ROWS:
            r = rows[row.key]
            assert len(r["times_ms"]) == 2 * 2  # repeats x steps
            assert len(r["round_medians_ms"]) == 2
            assert r["median_ms"] > 0 and r["apply_alone_ms"] > 0
            assert (r["ratio"] is not None) == (row.baseline is not None)
            assert (r["paired_ratio"] is not None) == (row.baseline is not None)
            assert (r["update_in_step_ms"] is None) == (row.key == "gradients_only")
        assert rows["tf_bf16_sgd_kahan"]["baseline"] == "keras_sgd"
        assert rows["tf_bf16_adam_sr"]["baseline"] == "keras_adam"
        assert entry["parameters"] > 0
        assert entry["background"]["seconds"] > 0
    for row in bench_fit.TIMING_ROWS:
        assert row.label in text, row.label
        assert markdown.count(f"| {row.label} |") == 2, row.label  # one table per model
    for header in ("step ms", "vs stock", "paired", "update in step ms", "update alone ms"):
        assert header in text
    assert "machine:" in text and "TensorFlow" in text and "load:" in text


def test_bytes_per_parameter_exact(tiny_run):
    _, text, results, _, _, _ = tiny_run
    for entry in results["models"]:
        rows = {r["key"]: r for r in entry["bytes"]["rows"]}
        assert set(rows) == set(EXPECTED_BYTES)
        params = entry["parameters"]
        for key, expected in EXPECTED_BYTES.items():
            r = rows[key]
            assert r["trainable_parameters"] == params, key
            assert r["bytes_per_parameter"] == expected, key
            assert r["total_bytes"] == expected * params, key
            assert r["matches_expected"], key
        # Pure bf16: 2 B weights; Kahan buffers 2 B; mixed/float32: float32 state.
        assert rows["tf_bf16_sgd_kahan"]["kahan_bytes"] == 2 * params
        assert rows["tf_bf16_adam_sr"]["kahan_bytes"] == 0
        assert rows["tf_bf16_adam_kahan"]["slot_bytes"] == 4 * params
        assert rows["keras_adam_mixed"]["weight_dtypes"] == ["float32"]
        assert rows["keras_adam_mixed"]["slot_dtypes"] == ["float32"]
        assert rows["tf_bf16_adam_kahan"]["weight_dtypes"] == ["bfloat16"]
        assert rows["tf_bf16_adam_kahan"]["ratio_to_reference"] == pytest.approx(8 / 12)
        # Scalar bookkeeping is excluded, and said to be.
        assert "iteration" in rows["tf_bf16_sgd_sr"]["excluded_optimizer_scalars"]
    cnn = next(e for e in results["models"] if e["spec"]["model"] == "cnn")
    # BatchNormalization moving statistics: non-trainable, excluded.
    assert cnn["bytes"]["rows"][0]["excluded_non_trainable_variables"] == 6
    assert "B/param" in text and "vs mixed Adam" in text
    assert "from tf_bf16.audit(model, optimizer=optimizer, trace=False).training_state" in text


def test_verdict_lists_every_target(tiny_run):
    _, text, results, markdown, _, _ = tiny_run
    targets = results["targets"]
    # Per model: 4 time ratios and 4 bytes-per-parameter targets.
    assert len(targets) == 2 * 8
    for t in targets:
        assert t["status"] in ("PASS", "MISS")
        assert f"{t['status']:<7} {t['target']}" in text
        assert f"**{t['status']}** {t['target']}" in markdown
    assert all(t["status"] == "PASS" for t in targets if "B/param" in t["target"])


def test_no_bytes_is_skipped_not_passed(tmp_path):
    status, text, results, _ = _run(["bench-fit", "--model", "mlp", "--width", "4",
                                     "--batch-size", "2", "--steps", "1", "--repeats", "1",
                                     "--warmup", "0", "--apply-calls", "0", "--no-bytes",
                                     "--threads", "0", "--no-progress", "--check"], tmp_path)
    # SKIPPED targets do not fail --check; the (tiny, noisy) timing targets may.
    assert status == (1 if _missed(results) else 0)
    entry = results["models"][0]
    assert entry["bytes"] is None
    assert all(r["apply_alone_ms"] is None for r in entry["timing"])
    statuses = [t["status"] for t in results["targets"] if "B/param" in t["target"]]
    assert statuses == ["SKIPPED"] * 4
    assert "training-state bytes per parameter (" not in text
    assert keras.config.dtype_policy().name == "float32"


def _made_up_results(ratio, extra_bytes):
    """Results in which every tf_bf16 row takes `ratio` x its baseline's step time
    and has `extra_bytes` more bytes per parameter than expected."""
    timing = []
    for row in bench_fit.TIMING_ROWS:
        ms = 10.0 if row.rounding is None else 10.0 * ratio
        timing.append({"key": row.key, "label": row.label, "baseline": row.baseline,
                       "median_ms": ms, "ratio": ratio if row.baseline else None})
    rows = [{"key": row.key, "bytes_per_parameter": row.expected + extra_bytes,
             "matches_expected": extra_bytes == 0} for row in bench_fit.BYTES_ROWS]
    return {"models": [{"spec": {"model": "mlp"}, "timing": timing,
                        "bytes": {"rows": rows}}]}


def test_verdict_pass_exits_0_with_check():
    targets = bench_fit.verdict(_made_up_results(ratio=1.05, extra_bytes=0))
    assert len(targets) == 8
    assert [t["status"] for t in targets] == ["PASS"] * 8
    assert common.verdict_exit_status(targets, check=True) == 0


def test_verdict_miss_exits_1_with_check_only(capsys):
    """A tf_bf16 row slower than 1.05x its baseline is a MISS; a wrong byte count too."""
    targets = bench_fit.verdict(_made_up_results(ratio=1.06, extra_bytes=1))
    assert len(targets) == 8
    assert [t["status"] for t in targets] == ["MISS"] * 8
    assert common.verdict_exit_status(targets, check=False) == 0
    assert common.verdict_exit_status(targets, check=True) == 1
    err = capsys.readouterr().err
    assert "8 of 8 targets missed" in err
    for t in targets:
        assert f"MISS {t['target']}" in err
    # Time alone, or bytes alone, fails the check too.
    for ratio, extra in ((1.06, 0), (1.0, 2)):
        targets = bench_fit.verdict(_made_up_results(ratio=ratio, extra_bytes=extra))
        assert [t["status"] for t in targets].count("MISS") == 4
        assert common.verdict_exit_status(targets, check=True) == 1


def test_state_bytes_small_model():
    """Dense(3) on 5 inputs: 18 parameters; bytes as tf_bf16.audit reports them."""
    try:
        tf_bf16.set_policy()
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
        optimizer = tf_bf16.optimizers.Adam(rounding="kahan", seed=1)
        optimizer.build(model.trainable_variables)
        measured = bench_fit.state_bytes(tf_bf16, model, optimizer)
    finally:
        tf_bf16.reset_policy()
    assert measured["trainable_parameters"] == 18
    assert measured["weight_bytes"] == 36
    assert measured["slot_bytes"] == 72
    assert measured["kahan_bytes"] == 36
    assert measured["total_bytes"] == 144
    assert measured["bytes_per_parameter"] == 8.0
    assert measured["weight_dtypes"] == ["bfloat16"]
    assert measured["slot_dtypes"] == ["bfloat16"]
    assert measured["excluded_optimizer_scalars"] == ["iteration", "learning_rate",
                                                      "rounding_seed"]
    # int64 iteration + float32 learning rate + int32 rounding seed
    assert measured["excluded_optimizer_scalar_bytes"] == 16
    assert measured["excluded_non_trainable_variables"] == 0


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench-fit", "--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    parser = argparse.ArgumentParser()
    bench_fit.add_arguments(parser)
    for action in parser._actions:
        for option in action.option_strings:
            assert option in help_text
        assert action.help, action.option_strings
    assert "1.05x" in help_text


def test_listed_in_command_help(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert "bench-fit" in err and "bench" in err
