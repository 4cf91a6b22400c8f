"""`compare`/`results --backend jax` (tf_bf16/lab/jax_runner.py, report_gpu.py):
configuration, pieces and bit-identical resume, the GPU section of the report.

The end-to-end runs start one JAX process per variant (~30 s each on 2 cores)
and are marked slow; tests/lab/test_h200_scripts.py runs all five variants
through tools/h200/accuracy_jax.sh with TensorFlow blocked.
"""

import argparse
import contextlib
import copy
import io
import json
import os
import shutil
import subprocess
import sys

import pytest

from tf_bf16 import __main__ as cli
from tf_bf16.lab import jax_runner
from tf_bf16.lab import report_gpu
from tf_bf16.lab.tasks import all_tasks
from tf_bf16.lab.tasks import transformer_lm

pytestmark = pytest.mark.lab

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _args(**overrides):
    values = dict(reduced=False, config=None, epochs=None, steps=None, learning_rate=None,
                  batch_size=None)
    values.update(overrides)
    return argparse.Namespace(**values)


def test_gpu_config_is_the_101m_model_with_warmup_cosine():
    task = all_tasks()["transformer_lm"]
    cfg = jax_runner.training_config(task, _args(config="gpu"))
    assert transformer_lm.parameter_count(**cfg["sizes"]) == 101_558_400
    assert cfg["steps_per_epoch"] == 2000 and cfg["batch_size"] == 16
    assert cfg["optimizer"] == "adam" and cfg["learning_rate"] == 6e-4
    assert cfg["schedule"] == {"name": "warmup_cosine", "warmup_steps": 100,
                               "decay_steps": 1900}
    assert cfg["curve_points_per_epoch"] == 16
    # The command line wins: fewer steps shorten the schedule too.
    cfg = jax_runner.training_config(task, _args(config="gpu", steps=1000))
    assert cfg["steps_per_epoch"] == 1000 and cfg["schedule"]["decay_steps"] == 950


def test_parameter_count_matches_the_built_model():
    import keras

    keras.utils.set_random_seed(0)
    sizes = dict(seq_len=16, dim=32, heads=2, ff_dim=48, layers=3)
    model = transformer_lm.build_model(seed=0, **sizes)
    assert model.count_params() == transformer_lm.parameter_count(**sizes)


def test_unknown_config_is_refused():
    task = all_tasks()["transformer_lm"]
    with pytest.raises(KeyError, match="no configuration 'huge'"):
        jax_runner.training_config(task, _args(config="huge"))


def test_segments_end_at_curve_points_and_the_late_start():
    cfg = {"steps_per_epoch": 30, "epochs": 1, "curve_points_per_epoch": 8}
    ends, curve, late = jax_runner.segments(cfg)
    assert curve == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30] and late == 27
    assert ends == curve
    cfg = {"steps_per_epoch": 2000, "epochs": 1, "curve_points_per_epoch": 16}
    ends, curve, late = jax_runner.segments(cfg)
    assert curve == list(range(125, 2001, 125)) and late == 1800
    assert ends == sorted(curve + [1800])


def test_resume_repeats_the_saved_command(tmp_path):
    argv = ["compare", "--backend", "jax", "--task", "transformer_lm", "--reduced",
            "--max-minutes", "2", "--out", "o", "--work-dir", str(tmp_path)]
    jax_runner._save_command(str(tmp_path), argv)
    saved = json.loads((tmp_path / "command.json").read_text())["argv"]
    assert saved == ["compare", "--backend", "jax", "--task", "transformer_lm", "--reduced"]
    assert jax_runner.expand_resume(["compare", "--resume", str(tmp_path), "--max-minutes",
                                     "3", "--out", "p"]) == saved + [
        "--max-minutes", "3", "--out", "p", "--work-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match="repeats the options"):
        jax_runner.expand_resume(["compare", "--resume", str(tmp_path), "--seed", "2"])
    with pytest.raises(SystemExit, match="no command.json"):
        jax_runner.expand_resume(["compare", "--resume", str(tmp_path / "none")])
    assert jax_runner.expand_resume(["list"]) == ["list"]


def _main(argv):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = cli.main(argv)
    return status, stdout.getvalue(), stderr.getvalue()


def test_jax_options_need_the_jax_backend():
    status, _, err = _main(["compare", "--task", "transformer_lm", "--max-minutes", "1"])
    assert status == 2 and "--max-minutes: with --backend jax only" in err
    status, _, err = _main(["compare", "--backend", "jax", "--task", "digits_cnn"])
    assert status == 2 and "not been ported to the JAX runner" in err
    status, _, err = _main(["results", "--gpu-json", "x.json"])
    assert status == 2 and "--gpu-json goes with --from-json" in err


def _compare(work, *extra):
    env = jax_runner.worker_env()
    proc = subprocess.run(
        [sys.executable, "-m", "tf_bf16", "compare", "--backend", "jax", "--task",
         "transformer_lm", "--reduced", "--variants", "kahan", "--seed", "2",
         "--work-dir", str(work)] + list(extra),
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    return proc


@pytest.mark.slow
def test_a_run_split_in_two_pieces_gives_the_bits_of_an_unsplit_run(tmp_path):
    """The split is at step 27 of 30: after the snapshot of the last 10% (step 27)
    was taken, so the saved state holds it too."""
    whole = _compare(tmp_path / "whole", "--json", str(tmp_path / "whole.json"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = _compare(tmp_path / "split", "--stop-at-step", "27")
    assert first.returncode == jax_runner.PAUSED, first.stderr[-3000:]
    assert "paused at step 27/30" in first.stderr
    assert f"compare --resume {tmp_path / 'split'}" in first.stderr
    saved = json.loads((tmp_path / "split" / "transformer_lm_seed2" / "kahan" /
                        "progress.json").read_text())
    assert saved["step"] == 27 and "snapshot" in saved["variables"]
    # Kahan buffers, moments and the iteration count are among the saved variables.
    names = [v[0] for v in saved["variables"]["optimizer"]]
    assert any("kahan" in n or "compensation" in n for n in names), names
    assert any("iteration" in n for n in names), names
    env = jax_runner.worker_env()
    second = subprocess.run(
        [sys.executable, "-m", "tf_bf16", "compare", "--resume", str(tmp_path / "split"),
         "--json", str(tmp_path / "split.json")],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming at step 27/30 (piece 2)" in second.stderr
    a = json.loads((tmp_path / "whole.json").read_text())["variants"]["kahan"]
    b = json.loads((tmp_path / "split.json").read_text())["variants"]["kahan"]
    assert b["pieces"] == 2 and a["pieces"] == 1
    assert a["state_sha256"] == b["state_sha256"]
    for key in ("curve", "curve_steps", "train_loss", "metric", "weights_changed_fraction",
                "late_weights_changed_fraction", "steps", "initial_weights_sha256"):
        assert a[key] == b[key], key
    # The saved state is gone once the variant finished.
    assert not (tmp_path / "split" / "transformer_lm_seed2" / "kahan" / "checkpoint.npz").exists()


# ---------------------------------------------------------------------------
# The GPU section of docs/results.md.

def _fake_result(variant, metric, curve):
    return {
        "variant": variant, "label": variant, "seed": 0, "metric": metric, "curve": curve,
        "curve_steps": [1, 2], "train_loss": [2.0, 1.9], "steps": 2, "steps_per_epoch": 2,
        "epochs": 1, "optimizer": "x", "dtype_policy": "bfloat16", "bytes_per_parameter": 6.0,
        "trainable_parameters": 101_558_400, "state_dtypes": ["bfloat16"],
        "weights_changed_fraction": 0.9, "late_weights_changed_fraction": 0.5,
        "finite": True, "wall_s": 60.0, "ms_per_step": 14.2,
        "peak_device_bytes": 5 * 2**30, "pieces": 1, "initial_weights_sha256": "abc",
        "state_sha256": variant, "task_info": {"train_chars": 10},
        "embedding_gradient_sums": "float32" if variant in ("nearest", "stochastic", "kahan")
        else "table dtype",
        "machine": {"backend": "jax", "cpu": "Some CPU", "cpu_flags": [], "logical_cpus": 16,
                    "usable_cpus": 16, "memory_bytes": 2**37, "os": "Linux",
                    "python": "3.12.3", "jax": "0.11.2", "keras": "3.15.1",
                    "device": "NVIDIA H200", "device_platform": "gpu", "device_count": 1,
                    "device_memory_bytes": 130 * 2**30, "xla_flags": ""}}


def _fake_compare_json(path):
    variants = {v: _fake_result(v, m, [2.0, m]) for v, m in (
        ("float32", 1.606), ("mixed_bfloat16", 1.615), ("nearest", 1.699),
        ("stochastic", 1.616), ("kahan", 1.614))}
    for r in variants.values():
        r["gap_to_float32"] = r["metric"] - 1.606
    cfg = jax_runner.training_config(all_tasks()["transformer_lm"], _args(config="gpu"))
    summary = {"task": "transformer_lm", "summary": "s", "metric": "held-out bits/char",
               "higher_is_better": False, "seed": 0, "config": cfg, "variants": variants,
               "failed": {}, "elapsed_s": 300.0, "machine": variants["kahan"]["machine"],
               "command": "python -m tf_bf16 compare --backend jax --task transformer_lm "
                          "--config gpu", "backend": "jax", "started": "2026-11-20 10:00 UTC",
               "same_initial_weights": True}
    path.write_text(json.dumps(summary))
    return summary


def test_results_from_json_appends_the_gpu_section_and_keeps_the_cpu_sections(tmp_path):
    import matplotlib  # noqa: F401  (the lab extra)
    shutil.copy(os.path.join(ROOT, "docs", "results_discussion.md"), tmp_path)
    gpu_json = tmp_path / "gpu_run.json"
    _fake_compare_json(gpu_json)
    output = tmp_path / "results.md"
    status, _, err = _main(["results", "--from-json",
                            os.path.join(ROOT, "docs", "results", "results.json"),
                            "--gpu-json", str(gpu_json), "--output", str(output)])
    assert status == 0, err
    with open(os.path.join(ROOT, "docs", "results.md")) as f:
        cpu = f.read().partition("\n\n## GPU runs:")[0]   # the committed CPU sections
    text = output.read_text()
    assert text.startswith(cpu)
    gpu = text[len(cpu):]
    assert "## GPU runs: Keras's JAX backend on NVIDIA H200" in gpu
    assert "compare --backend jax --task transformer_lm --config gpu" in gpu
    assert "| bf16 nearest | 1.699 | +0.093 | no |" in gpu
    assert "| bf16 Kahan | 1.614 | +0.008 | yes |" in gpu
    assert "101,558,400 trainable parameters" in gpu
    assert "Made before tf_bf16 summed bf16 Embedding gradients" not in gpu
    assert ("Embedding gradients of bf16 nearest, bf16 SR, bf16 Kahan: each token's "
            "occurrences summed in float32") in gpu
    assert "6e-4" in gpu or "0.0006" in gpu
    assert "![transformer_lm on NVIDIA H200: learning curves](results/gpu/transformer_lm.png)" \
        in gpu
    assert (tmp_path / "results" / "gpu" / "transformer_lm.png").stat().st_size > 0
    suite = json.loads((tmp_path / "results" / "gpu" / "results.json").read_text())
    assert suite["backend"] == "jax" and list(suite["tasks"]) == ["transformer_lm"]
    # Rendering the copied suite again gives the same report.
    again = tmp_path / "again.md"
    shutil.copytree(tmp_path / "results", tmp_path / "copy")
    status, _, err = _main(["results", "--from-json",
                            os.path.join(ROOT, "docs", "results", "results.json"),
                            "--gpu-json", str(tmp_path / "copy" / "gpu" / "results.json"),
                            "--output", str(again)])
    assert status == 0, err
    assert again.read_text() == text


def test_gpu_json_must_be_a_complete_jax_run(tmp_path):
    summary = _fake_compare_json(tmp_path / "run.json")
    paused = dict(copy.deepcopy(summary), paused="kahan")
    with pytest.raises(ValueError, match="incomplete"):
        report_gpu.suite_from_json(paused)
    with pytest.raises(ValueError, match="JAX backend"):
        report_gpu.suite_from_json(dict(summary, backend=None))


def test_gpu_partial_renders_the_finished_variants_and_names_the_paused_one(tmp_path):
    import matplotlib  # noqa: F401  (the lab extra)
    summary = _fake_compare_json(tmp_path / "run.json")
    del summary["variants"]["kahan"]   # a paused variant has no result yet
    for variant in ("nearest", "stochastic"):   # results of a run before the float32 sums
        del summary["variants"][variant]["embedding_gradient_sums"]
    summary["paused"] = "kahan"
    gpu_json = tmp_path / "paused.json"
    gpu_json.write_text(json.dumps(summary))
    output = tmp_path / "results.md"
    cpu_json = os.path.join(ROOT, "docs", "results", "results.json")
    args = ["results", "--from-json", cpu_json, "--gpu-json", str(gpu_json),
            "--output", str(output)]
    status, _, err = _main(args)
    assert status == 2 and "incomplete" in err and "--gpu-partial" in err
    status, _, err = _main(args + ["--gpu-partial"])
    assert status == 0, err
    gpu = output.read_text().split("## GPU runs:", 1)[1]
    assert "**Not finished: bf16 Kahan**" in gpu
    assert "| bf16 SR | 1.616 |" in gpu
    assert "| bf16 Kahan |" not in gpu
    assert ("**Made before tf_bf16 summed bf16 Embedding gradients in float32** "
            "(bf16 nearest, bf16 SR)") in gpu


@pytest.mark.parametrize("xla_flags, platform, expected", [
    ("", "gpu", "**Reruns differ.**"),
    ("--xla_gpu_deterministic_ops=true", "gpu", "a rerun of the command on the same machine"),
    ("", "cpu", None),
])
def test_gpu_section_says_whether_a_rerun_repeats_the_bits(tmp_path, xla_flags, platform,
                                                          expected):
    summary = _fake_compare_json(tmp_path / "run.json")
    summary["machine"] = dict(summary["machine"], xla_flags=xla_flags, device_platform=platform)
    suite = report_gpu.suite_from_json(summary)
    report_gpu._prepare(suite, all_tasks(), str(tmp_path))
    gpu = report_gpu.gpu_markdown(suite, all_tasks(), str(tmp_path / "results.md"))
    notes = [line for line in gpu.splitlines() if "rerun" in line]
    if expected is None:
        assert notes == []
    else:
        assert len(notes) == 1 and expected in notes[0]
        assert ("not evidence" in notes[0]) == (not xla_flags)


@pytest.mark.slow
def test_profile_fit_step_tool_runs_on_the_cpu(tmp_path):
    """tools/profile_fit_step.py (the next GPU measurement, docs/bench_gpu.md) at
    the tests' size: a step, the step without the update, kernel counts."""
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "profile_fit_step.py"), "--tiny",
         "--variants", "mixed_bfloat16,stochastic", "--steps", "2", "--rounds", "1",
         "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "profile_fit.json").read_text())
    assert [r["variant"] for r in results] == ["mixed_bfloat16", "stochastic"]
    for r in results:
        assert r["step_ms"] > 0 and r["no_update_ms"] > 0 and r["kernels"].get("fusion", 0) > 0
    assert (tmp_path / "hlo_stochastic.txt").stat().st_size > 0
