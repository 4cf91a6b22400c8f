"""Runs the HLO exported by tools/xla_hlo_export.py with JAX's XLA client and
compares its outputs with TensorFlow's CPU results, bit for bit.

For the H200 (no TensorFlow there; Python 3.12, JAX 0.11.2 with CUDA 13): each
exported module is compiled for the first device of JAX's default backend (or
--backend) with XLA's default flags (whatever XLA_FLAGS says, printed), fed
the exported inputs, and every output is compared with the CPU kernels'
result bit for bit. Runs the same way on JAX's CPU backend.

Prints one verdict per output, a line per case, and a summary; exits 1 if any
tf_bf16 case differs. The control case (plain multiply-adds, not tf_bf16) is
reported, not judged: whether this backend contracts ``a * b + c`` into an FMA
and keeps subnormal results, which the lowering must be (and, by the cases
above, is) immune to.

Needs numpy, ml_dtypes and jax (jaxlib); nothing from this repository.
Usage: python3 tools/xla_hlo_run_jax.py [DIR] [--backend gpu|cpu] [--only NAME ...]
"""

import argparse
import json
import os
import sys
import time

import numpy as np


def load_case(case_dir):
    with open(os.path.join(case_dir, "module.hlo.pb"), "rb") as f:
        module = f.read()
    inputs = np.load(os.path.join(case_dir, "inputs.npz"))
    expected = np.load(os.path.join(case_dir, "expected.npz"))
    return (module, [inputs[f"p{k}"] for k in range(len(inputs.files))],
            [expected[f"o{k}"] for k in range(len(expected.files))])


def typed(bits, dtype):
    """The exported bit pattern as an array of its real dtype."""
    import ml_dtypes

    if dtype == "bfloat16":
        return bits.view(ml_dtypes.bfloat16)
    if dtype == "float32":
        return bits.view(np.float32)
    return bits.astype(dtype)


def bits_of(array):
    a = np.asarray(array)
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


class Runner:
    def __init__(self, backend_name):
        import jax

        jax.config.update("jax_enable_x64", True)   # the modules take int64 steps and seeds
        from jax._src import xla_bridge
        from jax._src.lib import xla_client

        self.jax, self.xc = jax, xla_client
        self.backend = xla_bridge.get_backend(backend_name)
        self.device = self.backend.devices()[0]

    def describe(self):
        return (f"jax {self.jax.__version__}, backend {self.backend.platform} "
                f"({getattr(self.device, 'device_kind', self.device)}), "
                f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '(unset: XLA defaults)')!r}")

    def run(self, serialized_hlo, arguments):
        xc = self.xc
        module = xc._xla.mlir.hlo_to_stablehlo(serialized_hlo)
        devices = xc.DeviceList((self.device,))
        executable = self.backend.compile_and_load(module, devices, xc.CompileOptions())
        buffers = [self.jax.device_put(a, self.device) for a in arguments]
        results = executable.execute_sharded(buffers)
        return [np.asarray(per_device[0])
                for per_device in results.disassemble_into_single_device_arrays()]


def compare(got, want, dtype):
    """(identical, message) for one output."""
    got_bits, want_bits = bits_of(got).reshape(-1), want.reshape(-1)
    if got_bits.shape != want_bits.shape:
        return False, f"shape {got.shape} != expected {want.shape}"
    differ = np.flatnonzero(got_bits != want_bits)
    if differ.size == 0:
        return True, f"bit-identical ({want_bits.size} elements)"
    i = differ[0]
    got_v = typed(got_bits[i:i + 1], dtype).astype(np.float64)[0] if dtype in (
        "bfloat16", "float32") else got_bits[i]
    want_v = typed(want_bits[i:i + 1], dtype).astype(np.float64)[0] if dtype in (
        "bfloat16", "float32") else want_bits[i]
    return False, (f"DIFFERS in {differ.size} of {want_bits.size} elements; first at flat "
                   f"index {i}: got {int(got_bits[i]):#x} ({got_v!r}), expected "
                   f"{int(want_bits[i]):#x} ({want_v!r})")


def control_report(outputs, expected):
    """What the plain-arithmetic control says about this backend."""
    fma = np.flatnonzero(bits_of(outputs[0]).reshape(-1) != expected[0].reshape(-1)).size
    product = np.asarray(outputs[1]).reshape(-1)
    kept = int(np.count_nonzero(product))
    return [f"a * b + c: {fma} of {product.size} elements differ from rounding after each "
            f"operation -> multiply-adds {'ARE' if fma else 'are not'} contracted into FMAs "
            "on this backend",
            f"(a * 1e-20) * 1e-20: {kept} of {product.size} results are subnormal (not "
            f"flushed) -> denormals {'are KEPT' if kept else 'are flushed'} on this backend "
            "(TensorFlow's CPU kernels flush them)"]


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", nargs="?", default=os.path.join(here, "..", "out", "xla_hlo"),
                        help="folder written by xla_hlo_export.py (default: out/xla_hlo)")
    parser.add_argument("--backend", default=None, help="JAX backend (default: JAX's default)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these cases")
    args = parser.parse_args(argv)

    with open(os.path.join(args.dir, "manifest.json")) as f:
        manifest = json.load(f)
    runner = Runner(args.backend)
    print(f"xla_hlo_run_jax: {runner.describe()}")
    print(f"exported by TensorFlow {manifest['tensorflow']}: {len(manifest['cases'])} cases, "
          f"{manifest['steps']} steps each, {manifest['elements']} elements per dense tensor")
    failed, t_start = [], time.time()
    for name, info in manifest["cases"].items():
        if args.only and name not in args.only:
            continue
        t0 = time.time()
        module, params, expected = load_case(os.path.join(args.dir, name))
        arguments = [typed(p, d["dtype"]) for p, d in zip(params, info["parameters"])]
        try:
            outputs = runner.run(module, arguments)
        except Exception as e:  # a module that does not compile or run is a failure
            failed.append(name)
            print(f"[FAIL] {name}: {type(e).__name__}: {str(e)[:2000]}")
            continue
        elapsed = time.time() - t0
        if info["control"]:
            print(f"[info] {name} (plain TensorFlow arithmetic, not tf_bf16; {elapsed:.1f} s):")
            for line in control_report(outputs, expected):
                print(f"         {line}")
            continue
        verdicts = [compare(outputs[k], expected[k], d["dtype"])
                    for k, d in enumerate(info["outputs"])]
        ok = all(v[0] for v in verdicts)
        if not ok:
            failed.append(name)
        print(f"[{'OK' if ok else 'FAIL'}] {name} ({elapsed:.1f} s):")
        for label, (_, message) in zip(info["output_names"], verdicts):
            print(f"         {label}: {message}")
    judged = [n for n, i in manifest["cases"].items()
              if not i["control"] and (not args.only or n in args.only)]
    print(f"SUMMARY: {len(judged) - len(failed)} of {len(judged)} tf_bf16 cases bit-identical "
          f"to TensorFlow's CPU kernels on {runner.backend.platform}"
          f"{'' if not failed else '; DIFFERENT: ' + ', '.join(failed)} "
          f"({time.time() - t_start:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
