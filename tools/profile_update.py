"""What the bf16 Adam update alone spends its time on, on Keras's JAX backend.

``bench-gpu`` measured tf_bf16's Adam update on 268M bf16 parameters at 74-81%
of a device copy's bandwidth on the H200, while mixed precision's float32 Adam,
with twice the bytes, ran at 125% of its copy (docs/bench_gpu.md). XLA fuses
each update into one kernel, so the bytes are read and written once; this tool
takes the difference apart by timing, in one process, updates that add the
specification's pieces one at a time (docs/rounding.md), each on the same
arrays, jitted with donated buffers and timed as ``bench-gpu`` times them:

  copy u16     XOR with a run-time zero over the update's bytes as uint16
               (bench-gpu's copy: its targets' baseline)
  copy u32     the same bytes as uint32 elements
  plain        Adam in float32 from bf16 arrays, stored with XLA's own convert
               (round to nearest): no flush, no product fence, no NaN bits
  plain+SR     the same, the weight stochastically rounded with the
               specification's hash (one Mix32 chain per element)
  plain+SR3    the weight and both moments stochastically rounded, as
               tf_bf16's "stochastic" does (two Mix32 chains per element)
  tf_bf16      tf_bf16.jax_ops.apply_adam, "nearest" and "stochastic": the
               specification in full (subnormal flushes after each operation,
               product fences, NaN canonicalisation)

Rows are medians of ``--repeats`` timings of ``--calls`` chained calls. The
plain rows are measurements only, not a second implementation: their bits
differ from the specification's.

  KERAS_BACKEND=jax python tools/profile_update.py                # 268M, on a GPU
  KERAS_BACKEND=jax python tools/profile_update.py --parameters 1048576   # CPU
"""

import argparse
import functools
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BYTES_PER_PARAMETER = 14   # bf16 w, g, m, v read; w, m, v written


def _log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _plain_adam(stochastic):
    """Adam from bf16 arrays in float32 without the specification's emulation;
    `stochastic`: 0 (XLA's nearest convert), 1 (weight SR), 3 (weight, m, v SR)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from tf_bf16 import jax_ops

    def store(x, draw):
        if draw is None:
            return x.astype(jnp.bfloat16)
        bits = lax.bitcast_convert_type(x, jnp.uint32)
        return lax.bitcast_convert_type(((bits + draw) >> 16).astype(jnp.uint16), jnp.bfloat16)

    @functools.partial(jax.jit, donate_argnums=(0, 2, 3))
    def update(w, g, m, v, lr, step):
        f32 = jnp.float32
        t = (step + 1).astype(f32)
        alpha = lr * jnp.sqrt(1 - f32(0.999) ** t) / (1 - f32(0.9) ** t)
        w32, g32, m32, v32 = (x.astype(f32) for x in (w, g, m, v))
        m32 = m32 + (g32 - m32) * f32(0.1)
        v32 = v32 + (g32 * g32 - v32) * f32(0.001)
        w32 = w32 - alpha * m32 / (jnp.sqrt(v32) + f32(1e-7))
        d = [None, None, None]
        if stochastic:
            key = jax_ops.stream_key(0, step, 0)
            d = jax_ops.draws(jax_ops.element_hash(key, w.shape), stochastic)
            d = d + [None] * (3 - len(d))
        return store(w32, d[0]), store(m32, d[1]), store(v32, d[2])

    def call(state, gradient, lr, step):
        return update(state[0], gradient, state[1], state[2], lr, step)
    return call


def _spec_adam(rounding):
    import jax

    from tf_bf16 import jax_ops

    update = jax.jit(functools.partial(jax_ops.apply_adam, rounding=rounding, seed=0),
                     donate_argnames=("variable", "m", "v"))

    def call(state, gradient, lr, step):
        new = update(variable=state[0], gradient=gradient, m=state[1], v=state[2],
                     learning_rate=lr, step=step)
        return (new["variable"], new["m"], new["v"])
    return call


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("  copy u16"):],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parameters", type=int, default=2**28,
                        help="bf16 parameters updated (default 268,435,456 = 2**28)")
    parser.add_argument("--calls", type=int, default=10,
                        help="chained calls per timing (default 10)")
    parser.add_argument("--repeats", type=int, default=10,
                        help="timings per row; the median is reported (default 10)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.parameters < 2 or args.parameters % 2:
        parser.error(f"--parameters must be an even number >= 2, got {args.parameters}")

    import jax
    import jax.numpy as jnp
    import numpy as np

    from tf_bf16.lab.bench_gpu_worker import _copy_seconds, _timed

    n = args.parameters
    keys = jax.random.split(jax.random.key(1234), 4)
    lr = jnp.asarray(1e-3, jnp.float32)
    step = jnp.asarray(1000, jnp.int32)
    gradient = (1e-3 * jax.random.normal(keys[1], (n,))).astype(jnp.bfloat16)

    def adam_state():
        return ((jax.random.normal(keys[0], (n,))).astype(jnp.bfloat16),
                (1e-3 * jax.random.normal(keys[2], (n,))).astype(jnp.bfloat16),
                (1e-6 * jnp.abs(jax.random.normal(keys[3], (n,)))).astype(jnp.bfloat16))

    copy_bytes = n * BYTES_PER_PARAMETER // 2      # read once, written once
    updates = [("plain", _plain_adam(0)), ("plain+SR", _plain_adam(1)),
               ("plain+SR3", _plain_adam(3)), ("tf_bf16 nearest", _spec_adam("nearest")),
               ("tf_bf16 SR", _spec_adam("stochastic"))]
    _log(f"{n:,} bf16 parameters, {BYTES_PER_PARAMETER} B/parameter; devices {jax.devices()}")
    results = []

    def record(label, median, times):
        results.append({"row": label, "median_ms": 1e3 * median,
                        "times_ms": [1e3 * t for t in times],
                        "gb_s": n * BYTES_PER_PARAMETER / median / 1e9})
        _log(f"{label}: {1e3 * median:.3f} ms")

    for label, dtype in (("copy u16", "uint16"), ("copy u32", "uint32")):
        record(label, *_copy_seconds(copy_bytes // np.dtype(dtype).itemsize, args.calls,
                                     args.repeats, dtype))
    for label, update in updates:
        call = functools.partial(update, gradient=gradient, lr=lr, step=step)
        median, times, state = _timed(call, adam_state(), args.calls, args.repeats)
        del state
        record(label, median, times)
    copy_ms = results[0]["median_ms"]
    plain_ms = results[2]["median_ms"]
    print(f"Adam update, {n:,} bf16 parameters ({BYTES_PER_PARAMETER} B/parameter moved); "
          f"median of {args.repeats} timings of {args.calls} chained calls")
    print(f"{'row':<16} {'ms':>8} {'GB/s':>7} {'vs copy u16':>12} {'vs plain':>9}")
    for r in results:
        print(f"{r['row']:<16} {r['median_ms']:8.3f} {r['gb_s']:7.0f} "
              f"{copy_ms / r['median_ms']:11.1%} {r['median_ms'] / plain_ms:8.3f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"parameters": n, "bytes_per_parameter": BYTES_PER_PARAMETER,
                       "calls": args.calls, "repeats": args.repeats,
                       "devices": [str(d) for d in jax.devices()], "rows": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
