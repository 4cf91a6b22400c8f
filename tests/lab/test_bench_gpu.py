"""`python -m tf_bf16 bench-gpu --backend jax`: the depth prediction, the
verdict (PASS, MISS, SKIPPED) and the tables, on results made up here; the
command itself runs end to end, at --tiny sizes with TensorFlow blocked, in
tests/lab/test_h200_scripts.py."""

import contextlib
import copy
import io

import pytest

from tf_bf16 import __main__ as cli
from tf_bf16.lab import bench_gpu
from tf_bf16.lab import bench_gpu_report
from tf_bf16.lab import common

pytestmark = pytest.mark.lab

GIB = 2**30


def test_predicted_depth_is_the_deepest_that_leaves_the_margin_free():
    memory = [{"depth": 1, "total_bytes": 30 * GIB}, {"depth": 2, "total_bytes": 45 * GIB}]
    depth, per_block, base = bench_gpu.predict_depth(memory, 140 * GIB, 0.05)
    assert per_block == 15 * GIB and base == 15 * GIB
    # 15 + 7 * 15 = 120 <= 133 < 135 = 15 + 8 * 15
    assert depth == 7
    assert bench_gpu.predict_depth(memory, 20 * GIB, 0.0)[0] == 0
    flat = [{"depth": 1, "total_bytes": GIB}, {"depth": 2, "total_bytes": GIB}]
    assert bench_gpu.predict_depth(flat, 140 * GIB, 0.05)[0] is None


def _fit_row(ms, peak):
    return {"median_ms": ms, "p25_ms": ms, "p75_ms": ms, "peak_bytes": peak,
            "parameters": 404_443_264, "compile_and_warmup_s": 30.0, "loss": 4.0}


def _results():
    fit = {"spec": dict(bench_gpu.FIT_SPEC), "steps": 10, "rounds": 5, "skipped": {},
           "rows": {"mixed_bfloat16": _fit_row(41.0, 11.46 * GIB),
                    "stochastic": _fit_row(38.0, 7.0 * GIB),
                    "kahan": _fit_row(39.9, 8.22 * GIB),
                    "float32": _fit_row(96.1, 22.9 * GIB)}}
    base = fit["rows"]["mixed_bfloat16"]
    for row in fit["rows"].values():
        row["step_ratio"] = row["median_ms"] / base["median_ms"]
        row["memory_ratio"] = row["peak_bytes"] / base["peak_bytes"]
    update_rows = []
    for key, ms in (("sgd_nearest", 0.63), ("sgd_stochastic", 0.632), ("sgd_kahan", 0.95),
                    ("adam_nearest", 0.88), ("adam_stochastic", 0.89), ("adam_kahan", 1.15)):
        optimizer, rounding = key.split("_")
        copy_ms = {"sgd": 0.62, "adam": 0.87}[optimizer] * (1.3 if rounding == "kahan" else 1)
        update_rows.append({"key": key, "label": key, "optimizer": optimizer,
                            "rounding": rounding, "bytes_per_parameter": 10, "median_ms": ms,
                            "copy_ms": copy_ms, "effective_gb_s": 4000.0, "copy_gb_s": 4100.0,
                            "fraction_of_copy": copy_ms / ms,
                            "vs_nearest": None if rounding == "nearest" else
                            ms / {"sgd": 0.63, "adam": 0.88}[optimizer]})
    capacity_rows = {}
    for variant, depth in (("mixed_bfloat16", 8), ("stochastic", 14), ("kahan", 12)):
        capacity_rows[variant] = {
            "bytes_per_block": 15 * GIB, "base_bytes": GIB, "predicted_depth": depth,
            "predicted_bytes": 120 * GIB, "confirmed_depth": depth,
            "confirmed_parameters": depth * 805_000_000, "peak_bytes": 120 * GIB,
            "runs": [{"wall_s": 50.0, "fits": True}]}
    for row in capacity_rows.values():
        row["ratio"] = row["confirmed_parameters"] / capacity_rows["mixed_bfloat16"][
            "confirmed_parameters"]
    return {"config": {"command": "python -m tf_bf16 bench-gpu --backend jax",
                       "update_calls": 10, "update_repeats": 10},
            "update": {"parameters": 2**28, "rows": update_rows},
            "fit": fit,
            "capacity": {"spec": dict(bench_gpu.CAPACITY_SPEC), "depths": [1, 2],
                         "margin": 0.05, "rows": capacity_rows, "skipped": {},
                         "limit_bytes": 132 * GIB, "limit_source": "JAX bytes_limit"},
            "elapsed_s": 500.0}


def _by_status(targets):
    out = {}
    for t in targets:
        out.setdefault(t["status"], []).append(t["target"])
    return out


def test_verdict_passes_misses_and_skips():
    results = _results()
    targets = bench_gpu.verdict(results)
    assert len(targets) == 6 + 4 + 2
    statuses = _by_status(targets)
    # Kahan's peak (0.717x) misses 0.65x; its step (0.973x) misses 0.95x; the
    # Kahan updates (1.3 x copy / time) reach 86% / 98%.
    assert set(statuses["MISS"]) == {
        "fit step: bf16 Kahan (tf_bf16 Adam) <= 0.95x mixed_bfloat16",
        "fit peak memory: bf16 Kahan (tf_bf16 Adam) <= 0.65x mixed_bfloat16",
        "update alone: SGD-momentum Kahan >= 95% of a copy's bandwidth",
    }, statuses["MISS"]
    assert "capacity: bf16 Kahan (tf_bf16 Adam) trains >= 1.5x the parameters of " \
           "mixed_bfloat16" in statuses["PASS"]
    assert "SKIPPED" not in statuses
    assert common.verdict_exit_status(targets, check=False) == 0

    # Without the baseline nothing compares with it: SKIPPED, never PASS.
    broken = copy.deepcopy(results)
    del broken["fit"]["rows"]["mixed_bfloat16"]
    broken["fit"]["skipped"]["mixed_bfloat16"] = "not run: 10 s left of --max-minutes"
    broken["capacity"]["rows"]["mixed_bfloat16"].pop("confirmed_parameters")
    broken["capacity"]["skipped"]["mixed_bfloat16"] = "depth 8: stopped after 200 s"
    statuses = _by_status(bench_gpu.verdict(broken))
    assert len(statuses["SKIPPED"]) == 6, statuses
    # A variant that trained no confirmed depth is a MISS.
    unconfirmed = copy.deepcopy(results)
    unconfirmed["capacity"]["rows"]["stochastic"].pop("confirmed_parameters")
    unconfirmed["capacity"]["rows"]["stochastic"]["ratio"] = None
    targets = bench_gpu.verdict(unconfirmed)
    miss = [t for t in targets if t["status"] == "MISS" and "capacity" in t["target"]]
    assert len(miss) == 1 and miss[0]["value"] == "not confirmed"
    assert common.verdict_exit_status(targets, check=True) == 1


def test_tables_hold_every_part():
    results = _results()
    results["targets"] = bench_gpu.verdict(results)
    text = bench_gpu_report.format_text(results)
    for needle in ("1. The optimizer update alone: 268,435,456 parameters",
                   "2. model.fit step: GPT-style char model, 404,443,264 parameters",
                   "3. Largest model that trains, width 8192",
                   "bf16 SR (tf_bf16 Adam)", "0.927x", "1.75x", "verdict:"):
        assert needle in text, needle
    markdown = bench_gpu_report.format_markdown(results)
    assert "| bf16 Kahan (tf_bf16 Adam) | 39.90 |" in markdown
    assert "- **MISS** fit peak memory: bf16 Kahan" in markdown


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench-gpu", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--backend", "--parts", "--tiny", "--variants", "--capacity-width",
                   "--capacity-depths", "--memory-limit", "--margin", "--confirm-steps",
                   "--update-parameters", "--max-minutes", "--memory-fraction", "--json",
                   "--markdown", "--check"):
        assert option in out, option


def test_backend_is_required():
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit):
        cli.main(["bench-gpu"])
    assert "--backend" in stderr.getvalue()
