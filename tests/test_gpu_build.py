"""The GPU code builds here, where no GPU runs it.

- tools/gpu_build_check.sh builds the GPU op library (CPU and CUDA kernels,
  nvcc from pip if there is none) against the installed TensorFlow, checks
  its machine code and TensorFlow's registrations of its GPU kernels, and
  that its CPU kernels give the CPU library's bits.
- The H200 harness (cc/harness/bf16_harness.cu), built as plain C++, runs the
  kernels' per-thread code on kernels::HostEmulator for several grids and
  compares every op x rounding x dtype, dense and sparse, with the host math;
  with --corrupt it must report the flipped bit and fail.

Both compile for a minute or more on two cores: marked slow.
"""

import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_library_builds_and_registers_its_kernels():
    result = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_build_check.sh")],
                            capture_output=True, text=True, timeout=1800)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu_build_check: OK"), output[-4000:]


@pytest.mark.slow
def test_harness_in_host_mode(tmp_path):
    binary = tmp_path / "bf16_harness"
    build = subprocess.run(["bash", os.path.join(ROOT, "cc", "harness", "build.sh"),
                            str(binary), "host"], capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    env = dict(os.environ, OMP_NUM_THREADS="2")
    run = subprocess.run([str(binary), "--log2n", "12"], capture_output=True, text=True,
                         timeout=600, env=env)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    cases = [line for line in run.stdout.splitlines() if "emulated grids" in line]
    assert len(cases) >= 40, run.stdout
    assert all("identical" in line for line in cases), run.stdout
    assert "bf16_harness: OK" in run.stdout
    # The comparison can fail: one flipped result bit per case is reported.
    corrupt = subprocess.run([str(binary), "--log2n", "12", "--only", "adam", "--corrupt"],
                             capture_output=True, text=True, timeout=600, env=env)
    assert corrupt.returncode == 1, corrupt.stdout
    differ = [line for line in corrupt.stdout.splitlines() if "DIFFER" in line]
    assert differ and all("first: var[" in line for line in differ), corrupt.stdout
    assert "bf16_harness: FAILED" in corrupt.stdout
