"""tools/h200/bench_jax.sh and accuracy_jax.sh end to end, here on JAX's CPU
backend at test sizes, with `import tensorflow` failing in every process (as on
the H200, which has no TensorFlow): what the lead's device calls will run.

Slow: one JAX process per variant and measurement, ~30-60 s each on 2 cores.
"""

import json
import os
import shutil
import subprocess

import pytest

pytestmark = [pytest.mark.lab, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NO_TENSORFLOW = os.path.join(ROOT, "tests", "no_tensorflow_site")


def _script(name, out, extra_env, timeout):
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    env = dict(os.environ, OUT=str(out), PYTHONPATH=NO_TENSORFLOW)
    env.pop("KERAS_BACKEND", None)
    env.update(extra_env)
    return subprocess.run(["bash", os.path.join(ROOT, "tools", "h200", name)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


def test_tensorflow_is_blocked_in_the_scripts_processes():
    proc = subprocess.run(["python3", "-c", "import tensorflow"], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=NO_TENSORFLOW))
    assert proc.returncode != 0 and "blocked by the test" in proc.stderr


def test_accuracy_script_trains_every_variant_without_tensorflow(tmp_path):
    work = tmp_path / "work"
    proc = _script("accuracy_jax.sh", tmp_path / "out",
                   {"WORK": str(work), "ACC_ARGS": "--reduced --steps 8",
                    "ACC_SECONDS": "900"}, timeout=1200)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "done; results in" in log
    summary = json.loads((tmp_path / "out" / "accuracy" / "results.json").read_text())
    assert summary["backend"] == "jax" and summary["same_initial_weights"]
    assert list(summary["variants"]) == ["float32", "mixed_bfloat16", "nearest",
                                         "stochastic", "kahan"]
    for variant, r in summary["variants"].items():
        assert r["finite"] and r["steps"] == 8 and len(r["curve"]) == 8, variant
    policies = {v: r["dtype_policy"] for v, r in summary["variants"].items()}
    assert policies["mixed_bfloat16"] == "mixed_bfloat16" and policies["kahan"] == "bfloat16"
    assert summary["variants"]["kahan"]["bytes_per_parameter"] == 8.0
    for name in ("results.md", "curves.png"):
        assert (tmp_path / "out" / "accuracy" / name).stat().st_size > 0
    table = (tmp_path / "out" / "accuracy.txt").read_text()
    assert "ms/step" in table and "bf16 Kahan" in table
    progress = (tmp_path / "out" / "accuracy.log").read_text()
    assert "transformer_lm seed 0 bf16 SR: step 8/8 (100%)" in progress
    # At most 8 files come back from the device, two folders deep.
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(files) <= 8, files
    # Called again, the script finds the finished run and trains nothing.
    again = _script("accuracy_jax.sh", tmp_path / "out2",
                    {"WORK": str(work), "ACC_SECONDS": "900"}, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "resuming the run saved in" in again.stdout
    assert "done in an earlier piece" in again.stderr
    assert json.loads((tmp_path / "out2" / "accuracy" / "results.json").read_text())[
        "variants"]["kahan"]["state_sha256"] == summary["variants"]["kahan"]["state_sha256"]


def test_bench_script_measures_every_part_without_tensorflow(tmp_path):
    args = ("--tiny --memory-limit 0.006 --variants mixed_bfloat16,stochastic,kahan "
            "--steps 2 --rounds 2 --update-calls 2 --update-repeats 2")
    proc = _script("bench_jax.sh", tmp_path, {"BENCH_ARGS": args, "BENCH_SECONDS": "1500"},
                   timeout=1800)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "bench-gpu exit status 0" in log
    results = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert results["machine"]["backend"] == "jax"
    assert {r["key"] for r in results["update"]["rows"]} == {
        "sgd_nearest", "sgd_stochastic", "sgd_kahan", "adam_nearest", "adam_stochastic",
        "adam_kahan", "adam_mixed"}
    assert set(results["fit"]["rows"]) == {"mixed_bfloat16", "stochastic", "kahan"}
    for row in results["fit"]["rows"].values():
        assert row["finite"] and row["median_ms"] > 0 and row["synced_start"]
    capacity = results["capacity"]
    assert capacity["limit_source"] == "--memory-limit"
    for variant, row in capacity["rows"].items():
        assert row["predicted_depth"] >= 1, variant
        # A CPU has no memory limit: the predicted depth always trains.
        assert row["confirmed_depth"] == row["predicted_depth"], variant
    statuses = {t["target"]: t["status"] for t in results["targets"]}
    # No device memory statistics on a CPU: the peak-memory targets are SKIPPED.
    assert [s for t, s in statuses.items() if "peak memory" in t] == ["SKIPPED"] * 2
    assert all(s in ("PASS", "MISS") for t, s in statuses.items() if "peak memory" not in t)
    text = (tmp_path / "bench_gpu.txt").read_text()
    for needle in ("1. The optimizer update alone", "2. model.fit step",
                   "3. Largest model that trains", "verdict:"):
        assert needle in text, needle
    assert "| bf16 SR (tf_bf16 Adam) |" in (tmp_path / "bench_gpu.md").read_text()
    assert "fit stochastic:" in (tmp_path / "bench_gpu.log").read_text()


def test_determinism_script_times_the_update_and_repeats_a_deterministic_run(tmp_path):
    proc = _script("gpu_determinism.sh", tmp_path,
                   {"DET_ARGS": "--reduced", "DET_STEPS": "4",
                    "UPDATE_ARGS": "--parameters 4096 --calls 1 --repeats 1"}, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    rows = json.loads((tmp_path / "profile_update.json").read_text())["rows"]
    assert [r["row"] for r in rows] == ["copy u16", "copy u32", "plain", "plain+SR",
                                        "plain+SR3", "tf_bf16 nearest", "tf_bf16 SR"]
    assert all(r["median_ms"] > 0 for r in rows)
    runs = {}
    for line in (tmp_path / "determinism.txt").read_text().splitlines()[1:]:
        name, _, initial, _, final = line.split()[:5]
        runs[name] = (initial, final)
    assert list(runs) == ["plain1", "plain2", "deterministic1", "deterministic2"]
    assert len({initial for initial, _ in runs.values()}) == 1
    assert runs["deterministic1"] == runs["deterministic2"]
    assert len([p for p in tmp_path.rglob("*") if p.is_file()]) <= 8
