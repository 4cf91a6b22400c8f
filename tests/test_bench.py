"""Smoke tests of `python -m tf_bf16 bench` (tiny sizes; timings are not asserted)."""

import argparse
import contextlib
import io
import json

import pytest

from tf_bf16 import __main__ as cli
from tf_bf16 import bench

TINY = ["bench", "--params", "4096", "--memory-params", "65536", "--repeats", "3",
        "--warmup", "1", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny benchmark run: (exit status, stdout, JSON results, Markdown)."""
    out = tmp_path_factory.mktemp("bench")
    json_path, md_path = out / "bench.json", out / "bench.md"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = cli.main(TINY + ["--json", str(json_path), "--markdown", str(md_path)])
    return status, stdout.getvalue(), json.loads(json_path.read_text()), md_path.read_text()


def test_exit_status(tiny_run):
    assert tiny_run[0] == 0


def test_table_has_every_row(tiny_run):
    _, text, _, _ = tiny_run
    for row in bench.ROWS:
        assert row.label in text, row.label
    for header in ("median ms", "vs Keras SGD", "vs Keras Adam", "B/param", "eff. GB/s",
                   "% of copy"):
        assert header in text
    assert "TensorFlow" in text and "machine:" in text


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


def test_memory_results(tiny_run):
    _, text, results, _ = tiny_run
    cases = {c["key"]: c for c in results["memory"]["cases"]}
    assert set(cases) == {key for key, _ in bench.MEMORY_CASES}
    for case in cases.values():
        assert case["params"] == 65536
        assert case["extra_bytes"] >= 0
        assert case["hwm_reset_ok"]
    assert "peak extra memory" in text


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


def test_miss_and_skip_are_reported():
    """A missed target prints MISS; --no-memory prints SKIPPED, never PASS."""
    rows = []
    for row in bench.ROWS:
        slow = row.fused
        rows.append({"key": row.key, "label": row.label, "fused": row.fused,
                     "family": row.family, "median_ms": 100.0 if slow else 10.0,
                     "fraction_of_copy": 0.1 if slow else 1.0})
    targets = bench._verdict({"rows": rows, "memory": None})
    statuses = {t["target"]: t["status"] for t in targets}
    assert list(statuses.values()).count("SKIPPED") == 3
    assert all(s == "MISS" for name, s in statuses.items() if "temporary" not in name)


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
