"""tools/data_parallel.py and tools/h200/two_gpu.sh (issue 13), here on CPU host
devices, with `import tensorflow` blocked as on the GPU machine.

- Two devices (``--xla_force_host_platform_device_count=2``), the tiny model,
  every part: both devices' copies of every variable bit-identical (SR and
  Kahan, the char GPT and the exact control); the control equal to one
  device's bits; the char GPT compared with one device (reported, not
  required: its batch sum is split); step times on 1 and 2 devices and the
  scaling efficiency for SR, Kahan and mixed_bfloat16; gradient bytes
  (2 per parameter in pure bf16, 4 in mixed_bfloat16) and the all-reduce XLA
  compiled.
- One device (what the single-H200 run does): the one-device half, and the
  plain statement that the multi-device half was not run.
- The HLO parser on the collectives XLA:CPU and XLA:GPU print.

The first two take minutes on 2 cores (about 10 and 5 model compilations).
"""

import json
import os
import subprocess
import sys

import pytest

import jax  # noqa: F401  (the jax extra: missing fails, not skips)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))


def run_script(tmp_path, devices):
    """tools/h200/two_gpu.sh with SIZE=tiny on `devices` CPU host devices,
    TensorFlow blocked (a sitecustomize that installs tests/blocker.py)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {os.path.join(ROOT, 'tests')!r})\n"
        "import blocker\nblocker.block('tensorflow')\n")
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), SIZE="tiny", JAX_PLATFORMS="cpu", LIMIT="1200",
               BUDGET="1200", PYTHON=sys.executable, PYTHONPATH=str(site),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    result = subprocess.run(["bash", os.path.join(ROOT, "tools", "h200", "two_gpu.sh")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    log = result.stdout + result.stderr
    assert result.returncode == 0 and "exit status 0" in log, log[-4000:]
    with open(out / "data_parallel.json") as f:
        return json.load(f), log


@pytest.mark.slow
def test_two_devices_every_part(tmp_path):
    results, log = run_script(tmp_path, 2)
    assert "NOT RUN" not in log
    assert results["platform"] == "cpu" and len(results["devices"]) == 2
    for key in ("gpt/sr", "gpt/kahan", "exact/sr", "exact/kahan"):
        entry = results["bits"][key]
        assert entry["devices"] == 2 and entry["copies_per_variable"] == 2, (key, entry)
        assert entry["replicas_identical"], (key, entry)
        assert "versus_one_device" in entry, key
    for key in ("exact/sr", "exact/kahan"):
        assert results["bits"][key]["versus_one_device"]["differing_elements"] == 0, key
    for variant in ("sr", "kahan", "mixed"):
        timed = results["time"][variant]
        assert timed["1"]["global_batch"] * 2 == timed["2"]["global_batch"]
        assert timed["1"]["median_step_s"] > 0 and timed["2"]["median_step_s"] > 0
        assert timed["scaling_efficiency"] > 0
    pure, mixed = results["bytes"]["sr"], results["bytes"]["mixed"]
    assert pure["parameters"] == mixed["parameters"] > 0
    assert pure["gradient_bytes_per_step"] == 2 * pure["parameters"]
    assert mixed["gradient_bytes_per_step"] == 4 * mixed["parameters"]
    for entry in (pure, mixed):
        assert entry["ring_all_reduce_bytes_sent_per_device"] == entry["gradient_bytes_per_step"]
        compiled = sum(sum(v.values()) for v in entry["compiled_collectives"].values())
        assert compiled >= entry["gradient_bytes_per_step"], entry


@pytest.mark.slow
def test_one_device_runs_its_half_and_says_the_rest_was_not_run(tmp_path):
    results, log = run_script(tmp_path, 1)
    assert "NOT RUN: the multi-device half" in log
    assert set(results["bits"]) == {"gpt/sr", "gpt/kahan"}
    assert all("versus_one_device" not in e for e in results["bits"].values())
    for variant in ("sr", "kahan", "mixed"):
        assert set(results["time"][variant]) == {"1"}
    assert all("compiled_collectives" not in e for e in results["bytes"].values())
    assert results["bytes"]["sr"]["ring_all_reduce_bytes_sent_per_device"] == 0


def test_collective_bytes_from_compiled_hlo(monkeypatch):
    # Importing the tool sets KERAS_BACKEND=jax where it is unset (setdefault): kept out
    # of this process's environment, which later tests' subprocesses inherit (they
    # would run on JAX). Restored (or removed) after the test.
    monkeypatch.setenv("KERAS_BACKEND", os.environ.get("KERAS_BACKEND", "tensorflow"))
    import data_parallel

    hlo = "\n".join([
        # XLA:CPU, a combined all-reduce of float32 gradients (and the scalar loss)
        "  %all-reduce.39 = (f32[], f32[128,32]{1,0}, /*index=2*/f32[4,8]{1,0}) "
        "all-reduce(%a, %b, %c), channel_id=1, replica_groups=[1,2]<=[2], to_apply=%add",
        "  %get-tuple-element.28 = f32[128,32]{1,0} get-tuple-element(%all-reduce.39), index=1",
        # XLA:GPU, asynchronous
        "  %all-reduce-start = bf16[1024,768]{1,0} all-reduce-start(bf16[1024,768]{1,0} %p), "
        "channel_id=2, to_apply=%add.1",
        "  %all-reduce-done = bf16[1024,768]{1,0} all-reduce-done(%all-reduce-start)",
        "  %reduce-scatter = bf16[512]{0} reduce-scatter(bf16[1024]{0} %q), dimensions={0}",
    ])
    assert data_parallel.hlo_collective_bytes(hlo) == {
        "all-reduce": {"f32": 4 + 128 * 32 * 4 + 4 * 8 * 4, "bf16": 1024 * 768 * 2},
        "reduce-scatter": {"bf16": 512 * 2}}
