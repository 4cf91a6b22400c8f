"""Smoke tests of `python -m tf_bf16 bench` (tiny sizes; timings are not asserted),
and of its verdict and exit status on made-up results that pass and that miss."""

import argparse
import contextlib
import io
import json

import pytest

from tf_bf16 import __main__ as cli
from tf_bf16.lab import bench
from tf_bf16.lab import common

pytestmark = pytest.mark.lab

TINY = ["bench", "--params", "4096", "--memory-params", "65536", "--repeats", "3",
        "--warmup", "1", "--no-progress", "--check"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny benchmark run: (exit status, stdout, JSON results, Markdown)."""
    out = tmp_path_factory.mktemp("bench")
    json_path, md_path = out / "bench.json", out / "bench.md"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = cli.main(TINY + ["--json", str(json_path), "--markdown", str(md_path)])
    return status, stdout.getvalue(), json.loads(json_path.read_text()), md_path.read_text()


@pytest.mark.slow  # the tiny run starts five subprocesses: ~30 s
def test_exit_status_follows_the_verdict(tiny_run):
    """With --check, 1 exactly when a target was missed (tiny sizes may miss)."""
    status, _, results, _ = tiny_run
    missed = [t for t in results["targets"] if t["status"] == "MISS"]
    assert status == (1 if missed else 0)


@pytest.mark.slow
def test_table_has_every_row(tiny_run):
    _, text, _, _ = tiny_run
    for row in bench.ROWS:
        assert row.label in text, row.label
    for header in ("median ms", "vs Keras SGD", "vs Keras Adam", "B/param", "eff. GB/s",
                   "% of copy"):
        assert header in text
    assert "TensorFlow" in text and "machine:" in text


@pytest.mark.slow
def test_json_has_every_row_and_field(tiny_run):
    _, _, results, _ = tiny_run
    rows = {r["key"]: r for r in results["rows"]}
    assert set(rows) == {row.key for row in bench.ROWS}
    for row in bench.ROWS:
        r = rows[row.key]
        assert r["bytes_per_param"] == row.bytes_per_param
        assert len(r["times_ms"]) == 3
        for field in ("median_ms", "ratio_keras_sgd", "gbps", "fraction_of_copy"):
            assert r[field] > 0, (row.key, field)
        assert (r["ratio_keras_adam"] is not None) == (row.family == "adam")
    assert rows["keras_sgd"]["ratio_keras_sgd"] == pytest.approx(1.0)
    assert results["machine"]["tensorflow"]
    assert results["copy_check"]["values_equal"]


@pytest.mark.slow
def test_memory_results(tiny_run):
    _, text, results, _ = tiny_run
    cases = {c["key"]: c for c in results["memory"]["cases"]}
    assert set(cases) == {key for key, _ in bench.MEMORY_CASES}
    for case in cases.values():
        assert case["params"] == 65536
        assert case["extra_bytes"] >= 0
        assert case["hwm_reset_ok"]
    assert "peak extra memory" in text


@pytest.mark.slow
def test_verdict_lists_every_target(tiny_run):
    _, text, results, markdown = tiny_run
    targets = results["targets"]
    # 4 time ratios, 1 speedup over the reference, 5 bandwidths, 3 temporaries.
    assert len(targets) == 13
    for t in targets:
        assert t["status"] in ("PASS", "MISS")
        assert f"{t['status']:<7} {t['target']}" in text
        assert f"**{t['status']}** {t['target']}" in markdown
    assert "| update (bf16, 1 step) |" in markdown


def _made_up_results(fused_ms, fraction_of_copy, extra_fraction):
    """Results of a run in which every fused update takes `fused_ms` (stock Keras
    10 ms, the composite-op reference 100 ms) and reaches `fraction_of_copy` of
    the copy's bandwidth; memory cases with `extra_fraction` (None: --no-memory)."""
    rows = [{"key": row.key, "label": row.label, "fused": row.fused, "family": row.family,
             "median_ms": fused_ms if row.fused else 100.0 if row.key.startswith("reference")
             else 10.0,
             "fraction_of_copy": fraction_of_copy if row.fused else 1.0}
            for row in bench.ROWS]
    memory = None
    if extra_fraction is not None:
        memory = {"cases": [{"key": key, "label": label, "extra_fraction": extra_fraction,
                             "extra_mib": 512 * extra_fraction}
                            for key, label in bench.MEMORY_CASES]}
    return {"rows": rows, "memory": memory}


def test_verdict_pass_exits_0_with_check(capsys):
    targets = bench.verdict(_made_up_results(fused_ms=4.0, fraction_of_copy=0.8,
                                             extra_fraction=0.0))
    assert len(targets) == 13
    assert [t["status"] for t in targets] == ["PASS"] * 13
    assert common.verdict_exit_status(targets, check=True) == 0
    assert capsys.readouterr().err == ""


def test_verdict_miss_exits_1_with_check_only(capsys):
    """A slow fused update misses the time, speedup and bandwidth targets; a
    parameter-sized temporary misses the memory targets."""
    targets = bench.verdict(_made_up_results(fused_ms=40.0, fraction_of_copy=0.1,
                                             extra_fraction=1.0))
    assert [t["status"] for t in targets] == ["MISS"] * 13
    assert common.verdict_exit_status(targets, check=False) == 0
    assert capsys.readouterr().err == ""
    assert common.verdict_exit_status(targets, check=True) == 1
    err = capsys.readouterr().err
    assert "13 of 13 targets missed" in err
    for t in targets:
        assert f"MISS {t['target']}" in err


def test_one_miss_fails_the_check():
    targets = bench.verdict(_made_up_results(fused_ms=4.0, fraction_of_copy=0.8,
                                             extra_fraction=0.0))
    targets[-1]["status"] = "MISS"
    assert common.verdict_exit_status(targets, check=True) == 1


def test_skipped_is_not_passed_and_does_not_fail_the_check():
    """--no-memory: the memory targets are SKIPPED, never PASS, and not a failure."""
    targets = bench.verdict(_made_up_results(fused_ms=4.0, fraction_of_copy=0.8,
                                             extra_fraction=None))
    statuses = [t["status"] for t in targets]
    assert statuses.count("SKIPPED") == 3 and statuses.count("PASS") == 10
    assert common.verdict_exit_status(targets, check=True) == 0


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    for action in parser._actions:
        for option in action.option_strings:
            assert option in help_text
        assert action.help, action.option_strings


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "bench" in capsys.readouterr().err
