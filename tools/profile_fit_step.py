"""Where a pure-bf16 ``model.fit`` step spends its time on Keras's JAX backend.

Measured on the H200 (docs/bench_gpu.md): at 101M parameters a tf_bf16 step
took 3.1x mixed precision's, while the optimizer update alone was as fast as
mixed precision's Adam. This tool is the next measurement. For each variant
given, in its own process (one device, its own memory), it builds the GPT-style
char model of ``bench-gpu`` (tf_bf16/lab/tasks/transformer_lm.build_model) and:

1. times Keras's jitted train step (median of rounds);
2. times the same step with the optimizer's update taken out (gradients
   computed, weights untouched: ``optimizer.stateless_apply`` replaced by a
   no-op), so that step - forward/backward = the update's share inside the step;
3. times the update alone (``optimizer.stateless_apply`` jitted by itself on
   fixed gradients), to compare with its share inside the step;
4. times ``model.fit`` itself (one epoch of the same batch repeated, after a
   warm-up epoch), so that fit's own overhead shows beside the jitted step;
5. writes XLA's optimized HLO of the train step and counts its top-level
   instructions (kernels: fusions, custom calls, copies; with
   ``--xla-dump DIR`` XLA's own dump too).

Variant ``stock`` (Keras's "bfloat16" policy with the stock Keras optimizer)
is the control: the same pure-bf16 forward and backward pass without tf_bf16.
A variant name ending in ``+f32embed`` (e.g. ``stock+f32embed``) sums the
Embedding layers' gradients in float32 (``tf_bf16.keras_hooks.
float32_embedding_gradients``; the policy's SR and Kahan and compare's nearest
do already), for variants without it.

``--text`` takes the batches from the transformer_lm task's corpus (Python's
standard library: characters repeat as in text) instead of uniform random ids;
``--train-steps N`` trains N steps on them before measuring; ``--fit-only``
measures ``model.fit`` and its kernels only (one compilation per variant).

``--trace`` lists the top kernels of a step from JAX's profiler
(tools/h200/profile_fit.sh passes it; nsys is not on the H200 machines). On a
CPU (JAX's CPU backend) it runs at any size; ``--tiny`` is the tests' size.

  KERAS_BACKEND=jax python tools/profile_fit_step.py --variants mixed_bfloat16,nearest,stochastic
"""

import argparse
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 1234
TINY = dict(seq_len=32, dim=64, heads=2, ff_dim=256, layers=2, batch_size=4)
# The configuration of docs/results.md's GPU run (101M parameters).
GPU_101M = dict(seq_len=512, dim=1024, heads=16, ff_dim=4096, layers=8, batch_size=16)


def _log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def kernel_counts(hlo_text):
    """Counts of the entry computation's instructions by opcode (what runs as
    kernels or copies; parameters, tuples and bitcasts cost nothing)."""
    entry = hlo_text[hlo_text.index("ENTRY"):]
    counts = collections.Counter()
    for line in entry.splitlines()[1:]:
        match = re.search(r"= \S+ ([a-z][\w-]*)\(", line)
        if match and match.group(1) not in ("parameter", "tuple", "get-tuple-element",
                                            "bitcast", "constant"):
            counts[match.group(1)] += 1
    return counts


def _median_ms(run, steps, rounds):
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        run(steps)
        times.append(1e3 * (time.perf_counter() - started) / steps)
    return statistics.median(times), times


def traced_kernels(run, trace_dir, steps=3, top=30):
    """Runs `steps` steps under JAX's profiler and returns the `top` device
    events by total time, [(name, ms per step, count per step)]: the kernels of
    the step on a GPU (XLA's fusion names, as in the HLO), XLA's ops on a CPU."""
    import gzip
    import glob

    import jax

    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        run(steps)
    found = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not found:
        _log(f"no perfetto trace under {trace_dir}")
        return []
    with gzip.open(sorted(found)[-1]) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    processes = {e["pid"]: e["args"]["name"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    devices = {pid for pid, name in processes.items() if "/device:" in name}
    totals, counts = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and (e["pid"] in devices or not devices):
            totals[e["name"]] += e.get("dur", 0.0)
            counts[e["name"]] += 1
    return [(name, round(total / 1e3 / steps, 4), counts[name] / steps)
            for name, total in totals.most_common(top)]


def measure_fit_only(label, model, spec, steps, rounds, out_dir, trace, params, data):
    """model.fit's ms/step (median of `rounds` fits of `steps` steps) and the
    top kernels of a traced fit of 3 steps."""
    import jax
    import numpy as np

    batch = spec["batch_size"]
    x, y = data
    if len(x) < batch * steps:   # one batch: repeated
        x, y = np.repeat(x, steps, axis=0), np.repeat(y, steps, axis=0)
    x, y = x[-batch * steps:], y[-batch * steps:]

    def run(count):
        model.fit(x[:batch * count], y[:batch * count], batch_size=batch, epochs=1, verbose=0,
                  shuffle=False)
        jax.block_until_ready([v.value for v in model.trainable_variables])

    run(1)
    fit_ms, fit_times = _median_ms(run, steps, rounds)
    top_kernels = traced_kernels(run, os.path.join(out_dir, f"trace_{label}")) if trace else []
    result = {"variant": label, "parameters": params, "fit_ms": fit_ms,
              "fit_round_ms": fit_times, "device": str(jax.devices()[0]),
              "top_kernels": top_kernels}
    _log(f"{label}: model.fit {fit_ms:.2f} ms/step (rounds {[round(t, 2) for t in fit_times]})")
    return result


def text_batches(spec, count):
    """`count` batches of windows of the transformer_lm task's training text."""
    import numpy as np

    from tf_bf16.lab.tasks import corpus

    train_files, _ = corpus.split_files()
    ids = corpus.encoded_corpus(train_files)
    windows = corpus.random_windows(ids, spec["seq_len"] + 1, count * spec["batch_size"],
                                    np.random.default_rng(SEED)).astype(np.int32)
    return windows[:, :-1], windows[:, 1:]


def measure(variant, spec, steps, rounds, out_dir, trace=False, text=False, train_steps=0,
            fit_only=False):
    """One variant, in this process: fit step, step without the update, HLO counts."""
    import jax
    import keras
    import numpy as np

    sys.path.insert(0, ROOT)
    from tf_bf16.lab import runner
    from tf_bf16.lab.tasks import transformer_lm

    label = variant
    variant, _, experiment = variant.partition("+")
    if experiment == "f32embed":
        # What set_policy() now does on JAX (measured with this tool's own copy of it
        # before it moved into tf_bf16.backend.jax).
        from tf_bf16 import keras_hooks

        keras_hooks.float32_embedding_gradients()
    elif experiment:
        raise SystemExit(f"unknown experiment {experiment!r} (known: f32embed)")
    runner._set_policy(variant, SEED, {})
    keras.utils.set_random_seed(SEED)
    sizes = {k: v for k, v in spec.items() if k != "batch_size"}
    model = transformer_lm.build_model(seed=SEED, name=f"gpt_{variant}", **sizes)
    optimizer = runner.make_optimizer(
        variant, {"optimizer": "adam", "optimizer_kwargs": {}, "learning_rate": 3e-4}, SEED)
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    batch = spec["batch_size"]
    if text:
        text_x, text_y = text_batches(spec, 1 + train_steps + steps * rounds + 3)
        x, y = text_x[:batch], text_y[:batch]
    else:
        rng = np.random.default_rng(SEED)
        ids = rng.integers(0, 128, size=(batch, spec["seq_len"] + 1), dtype=np.int32)
        x, y = ids[:, :-1], ids[:, 1:]
    params = int(sum(np.prod(v.shape) for v in model.trainable_variables))
    _log(f"{label}: {params:,} parameters")
    if train_steps:
        data = (text_x[batch:], text_y[batch:]) if text else \
            (np.repeat(x, train_steps, axis=0), np.repeat(y, train_steps, axis=0))
        started = time.perf_counter()
        model.fit(data[0][:train_steps * batch], data[1][:train_steps * batch],
                  batch_size=batch, epochs=1, verbose=0, shuffle=False)
        _log(f"{label}: trained {train_steps} steps first ({time.perf_counter() - started:.1f} s "
             "with compilation)")
    if fit_only:
        return measure_fit_only(label, model, spec, steps, rounds, out_dir, trace, params,
                                (text_x[batch:], text_y[batch:]) if text else (x, y))

    model._symbolic_build(data_batch=(x, y))
    model.optimizer.build(model.trainable_variables)
    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in model.optimizer.variables],
        [v.value for v in model.metrics_variables],
    )

    def timed_step(train_step):
        step = jax.jit(train_step, donate_argnums=0)
        started = time.perf_counter()
        compiled = step.lower(state, (x, y)).compile()
        compile_s = time.perf_counter() - started
        holder = {"state": jax.tree_util.tree_map(lambda a: a.copy(), state)}

        def run(count):
            current = holder["state"]
            for _ in range(count):
                _, current = compiled(current, (x, y))
            jax.block_until_ready(current)
            holder["state"] = current

        run(2)
        median, times = _median_ms(run, steps, rounds)
        return compiled, compile_s, median, times, run

    compiled, compile_s, full_ms, full_times, run_full = timed_step(model.train_step)
    top_kernels = traced_kernels(run_full, os.path.join(out_dir, f"trace_{label}")) \
        if trace else []
    counts = kernel_counts(compiled.as_text())
    with open(os.path.join(out_dir, f"hlo_{label}.txt"), "w") as f:
        f.write(compiled.as_text())

    # The same step without the update: gradients computed, nothing applied.
    original_apply = model.optimizer.stateless_apply

    # A float32 scalar among the optimizer's variables (the learning rate) carries
    # a sum of every gradient times 0.0, so that XLA keeps the backward pass
    # (it does not fold a float multiply by zero: NaN * 0 is NaN).
    keep = next(i for i, v in enumerate(model.optimizer.variables)
                if v.dtype == "float32" and tuple(v.shape) == ())

    def no_update(optimizer_variables, grads, trainable_variables):
        total = sum(jax.numpy.sum(g.astype("float32")) for g in grads)
        kept = list(optimizer_variables)
        kept[keep] = kept[keep] + 0.0 * total
        return trainable_variables, kept

    model.optimizer.stateless_apply = no_update
    try:
        _, _, grad_ms, grad_times, _ = timed_step(model.train_step)
    finally:
        model.optimizer.stateless_apply = original_apply

    # The update alone, on gradients of the variables' shapes and dtypes.
    key = jax.random.PRNGKey(SEED)
    grads = [1e-3 * jax.random.normal(jax.random.fold_in(key, i), v.shape).astype(v.dtype)
             for i, v in enumerate(model.trainable_variables)]
    update = jax.jit(model.optimizer.stateless_apply, donate_argnums=(0, 2))
    update_state = {"state": jax.tree_util.tree_map(lambda a: a.copy(), (state[2], state[0]))}

    def run_update(count):
        optimizer_values, trainable_values = update_state["state"]
        for _ in range(count):
            trainable_values, optimizer_values = update(optimizer_values, grads,
                                                        trainable_values)
        jax.block_until_ready(trainable_values)
        update_state["state"] = (optimizer_values, trainable_values)

    run_update(2)
    update_ms, _ = _median_ms(run_update, steps, rounds)
    del update_state

    # model.fit itself: a warm-up epoch (compilation), then a timed one.
    fit_steps = steps * rounds
    fit_x, fit_y = np.repeat(x, fit_steps, axis=0), np.repeat(y, fit_steps, axis=0)
    model.fit(fit_x[:2 * batch], fit_y[:2 * batch], batch_size=batch, epochs=1, verbose=0,
              shuffle=False)
    started = time.perf_counter()
    model.fit(fit_x, fit_y, batch_size=batch, epochs=1, verbose=0, shuffle=False)
    fit_ms = 1e3 * (time.perf_counter() - started) / fit_steps
    result = {"variant": label, "parameters": params, "step_ms": full_ms,
              "step_round_ms": full_times, "no_update_ms": grad_ms,
              "no_update_round_ms": grad_times, "update_share_ms": full_ms - grad_ms,
              "update_alone_ms": update_ms, "fit_ms": fit_ms,
              "compile_s": compile_s, "kernels": dict(counts),
              "device": str(jax.devices()[0]), "top_kernels": top_kernels}
    _log(f"{label}: step {full_ms:.2f} ms, without the update {grad_ms:.2f} ms, "
         f"update {full_ms - grad_ms:.2f} ms (alone {update_ms:.2f} ms); "
         f"model.fit {fit_ms:.2f} ms/step; compile {compile_s:.1f} s; "
         f"{sum(counts.values())} top-level instructions {dict(counts.most_common(4))}")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="mixed_bfloat16,stock,nearest,stochastic,kahan",
                        help="comma-separated, one process each (default: %(default)s)")
    parser.add_argument("--tiny", action="store_true", help="the tests' size (seconds on a CPU)")
    parser.add_argument("--steps", type=int, default=10, help="steps per round (default 10)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the median is kept")
    parser.add_argument("--out", default="out/profile_fit", help="HLO and JSON go here")
    parser.add_argument("--xla-dump", metavar="DIR",
                        help="also XLA's own dump (--xla_dump_to DIR/<variant>)")
    parser.add_argument("--trace", action="store_true",
                        help="also profile 3 steps (jax.profiler) and list the top kernels")
    parser.add_argument("--text", action="store_true",
                        help="batches of the transformer_lm corpus, not uniform random ids")
    parser.add_argument("--train-steps", type=int, default=0, metavar="N",
                        help="train N steps before measuring (default 0)")
    parser.add_argument("--fit-only", action="store_true",
                        help="measure model.fit (and its kernels with --trace) only")
    parser.add_argument("--one", metavar="VARIANT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    spec = TINY if args.tiny else GPU_101M
    os.makedirs(args.out, exist_ok=True)
    if args.one:
        result = measure(args.one, spec, args.steps, args.rounds, args.out, trace=args.trace,
                         text=args.text, train_steps=args.train_steps, fit_only=args.fit_only)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    results = []
    for variant in args.variants.split(","):
        env = dict(os.environ, KERAS_BACKEND="jax")
        if args.xla_dump:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                                f" --xla_dump_to={os.path.join(args.xla_dump, variant)}").strip()
        command = [sys.executable, os.path.abspath(__file__), "--one", variant, "--out",
                   args.out, "--steps", str(args.steps), "--rounds", str(args.rounds)]
        if args.tiny:
            command.append("--tiny")
        for flag in ("trace", "text", "fit_only"):
            if getattr(args, flag):
                command.append("--" + flag.replace("_", "-"))
        command += ["--train-steps", str(args.train_steps)]
        done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
        lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
        if done.returncode or not lines:
            _log(f"{variant}: failed (exit status {done.returncode})")
            continue
        results.append(json.loads(lines[-1][len("RESULT "):]))
        # After each variant, so that a time limit keeps the ones done.
        with open(os.path.join(args.out, "profile_fit.json"), "w") as f:
            json.dump(results, f, indent=1)
    print(f"{'variant':<22} {'step ms':>8} {'no update':>9} {'update':>7} {'alone':>6} "
          f"{'fit ms':>7} {'kernels':>8}  top instructions")
    for r in results:
        if "step_ms" not in r:   # --fit-only
            print(f"{r['variant']:<22} {'':>8} {'':>9} {'':>7} {'':>6} {r['fit_ms']:7.2f}")
            continue
        top = ", ".join(f"{k} {n}" for k, n in sorted(r["kernels"].items(),
                                                      key=lambda kv: -kv[1])[:4])
        print(f"{r['variant']:<22} {r['step_ms']:8.2f} {r['no_update_ms']:9.2f} "
              f"{r['update_share_ms']:7.2f} {r['update_alone_ms']:6.2f} {r['fit_ms']:7.2f} "
              f"{sum(r['kernels'].values()):8d}  {top}")
    for r in results:
        if r.get("top_kernels"):
            print(f"\n{r['variant']}: top kernels of one step (ms, launches)")
            for name, ms, count in r["top_kernels"]:
                print(f"  {ms:9.3f} {count:6.0f}  {name[:100]}")
    return 0 if len(results) == len(args.variants.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
