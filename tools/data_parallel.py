"""Data-parallel pure-bf16 training on Keras's JAX backend: replicas' bits, one device's
bits, step time at fixed per-device batch, gradient all-reduce bytes (issue 13).

    python tools/data_parallel.py --size h200 --out $OUT        # one or more GPUs
    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \\
        python tools/data_parallel.py --size tiny --out out/data_parallel   # CPU host devices

The model is the GPT-style character model of the `transformer_lm` task
(tf_bf16/lab/tasks/transformer_lm.py, built here from the same blocks of
tf_bf16/lab/tasks/corpus.py at the size `--size` names), trained with AdamW
on windows of the Python standard library's source, through `model.fit` under
`keras.distribution.DataParallel` (XLA's SPMD partitioner inserts the
gradient all-reduce: NCCL on GPUs). With N devices:

1. **Bits.** Pure bf16 (`tf_bf16.set_policy()`) with stochastic rounding and
   with Kahan summation, `--bit-steps` steps on N devices at a global batch of
   N x `batch_per_device`, then every variable (weights, moments, Kahan
   buffers) gathered to the host from every device: are the N copies
   bit-identical? Then the same steps on one device with the same global
   batch: the same bits? The gradient's batch sum is split into per-device
   partial sums there, so the model's own arithmetic can differ in the last
   bit; a control model whose gradients are exact in any summation order
   (Dense + Embedding, loss linear in the outputs, small integer inputs) shows
   whether tf_bf16's update itself sees the device count (it must not).
2. **Time.** Median step time of `fit` (a callback waits for each step's
   loss) on 1 device and on N devices at fixed per-device batch, for pure bf16
   SR, pure bf16 Kahan and Keras's `mixed_bfloat16` (float32 weights, stock
   AdamW); scaling efficiency = t(1) / t(N) (1.0 is perfect weak scaling).
3. **Bytes.** Gradient bytes per step from the parameter count and the
   variables' dtypes (bf16 gradients under pure bf16, float32 under
   mixed_bfloat16), the bytes a ring all-reduce sends per device
   (2 (N - 1) / N of them), and the all-reduce operands XLA actually
   compiled into the gradient computation (parsed from its HLO).

With one device the script does everything that needs only one and says
plainly that the N-device half was not run. Prints timestamped lines and
writes `data_parallel.json` to `--out`. Needs JAX and Keras, not TensorFlow.
Not a test (tests/test_data_parallel_tool.py runs it on CPU host devices).
"""

import argparse
import hashlib
import json
import math
import os
import re
import signal
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_bf16  # noqa: E402
from tf_bf16.lab.tasks import corpus  # noqa: E402

SIZES = {
    # ~12k parameters: the whole logic in seconds on CPU host devices.
    "tiny": dict(seq_len=32, dim=32, heads=4, ff_dim=64, layers=1, batch_per_device=4,
                 bit_steps=4, time_steps=6, warmup=2),
    # ~43M parameters, ~5M tokens of state per step on each device: an H200 run of
    # every part within about 2.5 minutes (one device; two add three compilations).
    "h200": dict(seq_len=256, dim=768, heads=12, ff_dim=3072, layers=6, batch_per_device=16,
                 bit_steps=8, time_steps=20, warmup=3),
}
LEARNING_RATE = 1e-3
SEED = 1234
START = time.monotonic()
RESULTS_PATH = None   # set by main(); results are rewritten after every measurement


def checkpoint(results):
    if RESULTS_PATH is not None:
        with open(RESULTS_PATH, "w") as f:
            json.dump(results, f, indent=1)


def say(message):
    print(f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - START:5.0f}s] {message}",
          flush=True)


# ---------------------------------------------------------------------------
# Models and data


def char_gpt(cfg, seed=SEED):
    """The transformer_lm task's model (pre-LayerNorm causal blocks) at `cfg`'s size."""
    ids = keras.Input(shape=(cfg["seq_len"],), dtype="int32", name="chars")
    x = corpus.TokenAndPositionEmbedding(corpus.VOCAB_SIZE, cfg["seq_len"], cfg["dim"],
                                         seed=seed, name="embedding")(ids)
    for i in range(cfg["layers"]):
        x = corpus.transformer_block(x, heads=cfg["heads"], dim=cfg["dim"],
                                     ff_dim=cfg["ff_dim"], causal=True,
                                     seed=seed + 10 * (i + 1), name=f"block{i}")
    x = keras.layers.LayerNormalization(epsilon=1e-5, name="final_ln")(x)
    logits = keras.layers.Dense(
        corpus.VOCAB_SIZE, kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 99),
        name="logits")(x)
    return keras.Model(ids, logits, name="char_gpt")


def char_windows(cfg, count, seed=SEED):
    """`count` (input, target) windows of the standard library's training files."""
    train_files, _ = corpus.split_files()
    ids = corpus.encoded_corpus(train_files)
    length = cfg["seq_len"] + 1
    starts = np.random.default_rng(seed).integers(0, len(ids) - length, size=count)
    windows = ids[starts[:, None] + np.arange(length)]
    return windows[:, :-1], windows[:, 1:]


EXACT_FEATURES, EXACT_VOCAB, EXACT_SEQ = 16, 32, 4


def exact_model(seed=SEED):
    """Dense and Embedding weights whose gradients are exact in any summation
    order (with `linear_loss` and `exact_data`): the control of part 1."""
    features = keras.Input((EXACT_FEATURES,), name="features")
    ids = keras.Input((EXACT_SEQ,), dtype="int32", name="ids")
    dense = keras.layers.Dense(16, name="dense",
                               kernel_initializer=keras.initializers.GlorotUniform(seed))(features)
    embedded = keras.layers.GlobalAveragePooling1D()(keras.layers.Embedding(
        EXACT_VOCAB, 16, name="table",
        embeddings_initializer=keras.initializers.RandomNormal(seed=seed))(ids))
    return keras.Model([features, ids], keras.layers.Add()([dense, embedded]))


def linear_loss(y_true, y_pred):
    return keras.ops.mean(keras.ops.cast(y_pred, "float32"), axis=-1)


def exact_data(count, seed=SEED):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, EXACT_VOCAB, (count, EXACT_SEQ)).astype(np.int32)
    ids[:, 0] = ids[:, 1]
    return ({"features": rng.integers(-2, 3, (count, EXACT_FEATURES)).astype(np.float32),
             "ids": ids}, np.zeros((count, 1), np.float32))


# ---------------------------------------------------------------------------
# Training under a distribution


def set_variant(variant):
    """'sr' / 'kahan': pure bf16 with tf_bf16's AdamW; 'mixed': Keras's
    mixed_bfloat16 with its own AdamW (float32 weights and moments)."""
    if variant == "mixed":
        tf_bf16.reset_policy()
        keras.config.set_dtype_policy("mixed_bfloat16")
        return keras.optimizers.AdamW(LEARNING_RATE)
    tf_bf16.set_policy()
    rounding = {"sr": "stochastic", "kahan": "kahan"}[variant]
    return tf_bf16.optimizers.AdamW(LEARNING_RATE, rounding=rounding, seed=SEED)


def distribution(devices):
    return keras.distribution.DataParallel(devices=list(devices))


class StepTimer(keras.callbacks.Callback):
    """Wall time at the end of each step, once its loss is on the host."""

    def __init__(self):
        super().__init__()
        self.times = []

    def on_train_batch_end(self, batch, logs=None):
        jax.block_until_ready(logs)
        self.times.append(time.perf_counter())


def fit(model_name, variant, devices, x, y, global_batch, steps, cfg, callbacks=()):
    """Builds and compiles the model under DataParallel(`devices`) and fits
    `steps` steps of `global_batch`; returns (model, optimizer)."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(SEED)
    keras.distribution.set_distribution(distribution(devices))   # before any variable
    try:
        optimizer = set_variant(variant)
        if model_name == "exact":
            model = exact_model()
            loss = linear_loss
        else:
            model = char_gpt(cfg)
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        model.compile(optimizer=optimizer, loss=loss)
        model.fit(x, y, batch_size=global_batch, epochs=1, steps_per_epoch=steps,
                  shuffle=False, verbose=0, callbacks=list(callbacks))
    finally:
        keras.distribution.set_distribution(None)
    return model, optimizer


def state_of(model, optimizer):
    """{name: jax.Array} of every model and optimizer variable."""
    named = [(v.path, v) for v in model.weights]
    named += [("optimizer/" + v.path.split("/", 1)[-1], v) for v in optimizer.variables]
    return {name: v.value for name, v in named}


def bits(array):
    array = np.asarray(array)
    return array.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[array.itemsize])


def replica_copies_identical(array):
    """Whether every device's copy of a replicated array has the same bits
    (each copy fetched to the host on its own)."""
    copies = [bits(np.asarray(shard.data)) for shard in array.addressable_shards]
    return len(copies), all(np.array_equal(c, copies[0]) for c in copies[1:])


def compare_states(replicated, single):
    """Elements whose bits differ, and the largest weight difference (also in
    learning rates: AdamW moves a weight by about one learning rate a step)."""
    report = {"variables": len(single), "differing_variables": 0, "elements": 0,
              "differing_elements": 0, "max_weight_difference": 0.0}
    for name, value in single.items():
        a, b = np.asarray(replicated[name]), np.asarray(value)
        differ = bits(a) != bits(b)
        report["elements"] += a.size
        if not np.any(differ):
            continue
        report["differing_variables"] += 1
        report["differing_elements"] += int(np.sum(differ))
        if name.startswith("optimizer/") or a.dtype.kind not in "fV":   # V: bfloat16
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        finite = np.isfinite(a64) & np.isfinite(b64)
        report["max_weight_difference"] = max(
            report["max_weight_difference"], float(np.max(np.abs(a64 - b64)[finite], initial=0.0)))
    report["max_weight_difference_in_learning_rates"] = \
        report["max_weight_difference"] / LEARNING_RATE
    return report


def record_bits(label, model, optimizer, n, entry):
    """Every device's copy of every variable compared on the host; returns the
    variables as host arrays. `bits_sha256` digests them all (in order), to
    compare runs made apart."""
    state = state_of(model, optimizer)
    copies = [replica_copies_identical(v) for v in state.values()]
    host = {name: np.asarray(v) for name, v in state.items()}
    digest = hashlib.sha256()
    for name, value in host.items():
        digest.update(name.encode())
        digest.update(bits(value).tobytes())
    entry.update(copies_per_variable=min(c for c, _ in copies),
                 replicas_identical=all(same for _, same in copies),
                 bits_sha256=digest.hexdigest())
    same = "bit-identical" if entry["replicas_identical"] else "DIFFERENT"
    copies_verdict = ("one device, no copies to compare" if n == 1 else
                      f"every device's copy {same} ({entry['copies_per_variable']} copies each)")
    say(f"{label}: {len(state)} variables; {copies_verdict}; sha256 {entry['bits_sha256'][:16]}")
    return host


def record_versus_one_device(label, host, model, optimizer, n, entry):
    comparison = compare_states(host, {name: np.asarray(v) for name, v in
                                       state_of(model, optimizer).items()})
    entry["versus_one_device"] = comparison
    verdict = ("the same bits" if comparison["differing_elements"] == 0 else
               f"{comparison['differing_elements']} of {comparison['elements']} elements "
               f"differ in {comparison['differing_variables']} of {comparison['variables']} "
               f"variables; weights at most {comparison['max_weight_difference']:.3g} apart "
               f"({comparison['max_weight_difference_in_learning_rates']:.2f} learning rates)")
    say(f"{label}: {n} devices vs one device, same global batch: {verdict}")


def record_time(variant, n, global_batch, cfg, timer, started, results):
    step_times = np.diff(timer.times[cfg["warmup"] - 1:])
    median = float(np.median(step_times))
    tokens = global_batch * cfg["seq_len"]
    results["time"].setdefault(variant, {})[str(n)] = {
        "devices": n, "global_batch": global_batch, "median_step_s": median,
        "steps_timed": len(step_times), "compile_and_first_step_s": timer.times[0] - started,
        "tokens_per_s": tokens / median}
    say(f"time/{variant}: {n} device(s), global batch {global_batch}: median step "
        f"{median * 1e3:.2f} ms over {len(step_times)} steps ({tokens / median:,.0f} tokens/s)")


def part_train(cfg, devices, results, deadline):
    """Parts 1 and 2. Per variant: the N-device run (bits and time), then on
    one device the same global batch (bits) and the per-device batch (time)."""
    n = len(devices)
    steps = max(cfg["bit_steps"], cfg["warmup"] + cfg["time_steps"])
    per_device = cfg["batch_per_device"]
    data = char_windows(cfg, per_device * n * steps)
    for variant in ("sr", "kahan", "mixed"):
        if time.monotonic() > deadline:
            say(f"{variant}: skipped (time budget spent)")
            continue
        timer, started = StepTimer(), time.perf_counter()
        model, optimizer = fit("gpt", variant, devices, *data, per_device * n, steps, cfg,
                               callbacks=[timer])
        record_time(variant, n, per_device * n, cfg, timer, started, results)
        if variant != "mixed":
            entry = results["bits"][f"gpt/{variant}"] = {
                "devices": n, "global_batch": per_device * n, "steps": steps}
            host = record_bits(f"bits/gpt/{variant}", model, optimizer, n, entry)
        checkpoint(results)
        del model, optimizer
        if n == 1:
            continue
        if variant != "mixed":
            model, optimizer = fit("gpt", variant, devices[:1], *data, per_device * n, steps, cfg)
            record_versus_one_device(f"bits/gpt/{variant}", host, model, optimizer, n, entry)
            del model, optimizer, host
        timer, started = StepTimer(), time.perf_counter()
        model, _ = fit("gpt", variant, devices[:1], *data, per_device, steps, cfg,
                       callbacks=[timer])
        record_time(variant, 1, per_device, cfg, timer, started, results)
        del model
        timed = results["time"][variant]
        timed["scaling_efficiency"] = timed["1"]["median_step_s"] / timed[str(n)]["median_step_s"]
        say(f"time/{variant}: scaling efficiency t(1)/t({n}) at {per_device} per device = "
            f"{timed['scaling_efficiency']:.3f}")
        checkpoint(results)
    if n == 1:
        return   # the control needs two device counts
    # The control: gradients exact in any summation order.
    exact = exact_data(per_device * n * cfg["bit_steps"])
    for variant in ("sr", "kahan"):
        label = f"bits/exact/{variant}"
        model, optimizer = fit("exact", variant, devices, *exact, per_device * n,
                               cfg["bit_steps"], cfg)
        entry = results["bits"][f"exact/{variant}"] = {
            "devices": n, "global_batch": per_device * n, "steps": cfg["bit_steps"]}
        host = record_bits(label, model, optimizer, n, entry)
        model, optimizer = fit("exact", variant, devices[:1], *exact, per_device * n,
                               cfg["bit_steps"], cfg)
        record_versus_one_device(label, host, model, optimizer, n, entry)
        checkpoint(results)


# ---------------------------------------------------------------------------
# All-reduce bytes


_HLO_SHAPE = re.compile(r"\b(bf16|f16|f32|f64|s32|u32|s64|pred)\[([0-9,]*)\]")
_HLO_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "s32": 4, "u32": 4, "s64": 8, "pred": 1}


def hlo_collective_bytes(hlo_text):
    """{op: {dtype: bytes}} of the results of all-reduce (also async
    all-reduce-start) and reduce-scatter instructions in compiled HLO text."""
    found = {}
    for line in hlo_text.splitlines():
        match = re.search(r"=\s*(.*?)\s(all-reduce-start|all-reduce|reduce-scatter)\(", line)
        if not match:
            continue
        result_type, op = match.groups()
        op = "all-reduce" if op.startswith("all-reduce") else op
        for dtype, dims in _HLO_SHAPE.findall(result_type):
            size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
            per_op = found.setdefault(op, {})
            per_op[dtype] = per_op.get(dtype, 0) + size * _HLO_BYTES[dtype]
    return found


def compiled_gradient_collectives(model, devices, x, y):
    """Compiles Keras's loss-and-gradient computation (the train step's
    `compute_loss_and_updates` under `jax.value_and_grad`) with the
    DataParallel shardings and returns `hlo_collective_bytes` of it."""
    dist = distribution(devices)
    batch = dist.get_data_layout(x.shape).backend_layout
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    metrics = [v.value for v in model.metrics_variables]

    optimizer_variables = [v.value for v in model.optimizer.variables]

    def loss_and_grads(trainable, non_trainable, x, y):
        return jax.value_and_grad(model.compute_loss_and_updates, has_aux=True)(
            trainable, non_trainable, metrics, x, y, None, training=True,
            optimizer_variables=optimizer_variables)

    lowered = jax.jit(loss_and_grads).lower(trainable, non_trainable,
                                            jax.device_put(x, batch), jax.device_put(y, batch))
    return hlo_collective_bytes(lowered.compile().as_text())


def size(count):
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:,.0f} {unit}" if unit == "bytes" else f"{count:,.1f} {unit}"
        count /= 1024


def part_bytes(cfg, devices, results):
    n = len(devices)
    for variant in ("sr", "mixed"):
        keras.backend.clear_session()
        keras.utils.set_random_seed(SEED)
        keras.distribution.set_distribution(distribution(devices))
        try:
            optimizer = set_variant(variant)
            model = char_gpt(cfg)
            model.compile(optimizer=optimizer,
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            params = sum(math.prod(v.shape) for v in model.trainable_variables)
            gradient_bytes = sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize
                                 for v in model.trainable_variables)
            entry = {"parameters": params, "variable_dtypes": sorted(
                {keras.backend.standardize_dtype(v.dtype) for v in model.trainable_variables}),
                "gradient_bytes_per_step": gradient_bytes,
                "ring_all_reduce_bytes_sent_per_device": 2 * (n - 1) / n * gradient_bytes}
            if n > 1:
                x, y = char_windows(cfg, cfg["batch_per_device"] * n)
                entry["compiled_collectives"] = compiled_gradient_collectives(model, devices,
                                                                              x, y)
        finally:
            keras.distribution.set_distribution(None)
        results["bytes"][variant] = entry
        checkpoint(results)
        compiled = entry.get("compiled_collectives")
        compiled = "none (one device)" if compiled is None else ", ".join(
            f"{op} {dtype} {size(count)}" for op, by_dtype in compiled.items()
            for dtype, count in by_dtype.items())
        say(f"bytes/{variant}: {params:,} parameters ({', '.join(entry['variable_dtypes'])}); "
            f"gradients {size(gradient_bytes)} per step; a ring all-reduce over {n} device(s) "
            f"sends {size(entry['ring_all_reduce_bytes_sent_per_device'])} per device; "
            f"compiled collectives of the gradient computation: {compiled}")
    tf_bf16.reset_policy()
    keras.config.set_dtype_policy("float32")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--out", default="out/data_parallel")
    parser.add_argument("--parts", default="train,bytes",
                        help="comma-separated subset of train (bits and time), bytes")
    parser.add_argument("--budget", type=float, default=float("inf"),
                        help="seconds after which no further variant is trained")
    args = parser.parse_args(argv)
    global RESULTS_PATH
    cfg = SIZES[args.size]
    devices = jax.devices()
    os.makedirs(args.out, exist_ok=True)
    RESULTS_PATH = os.path.join(args.out, "data_parallel.json")
    results = {"size": args.size, "config": cfg, "jax": jax.__version__,
               "keras": keras.__version__, "platform": devices[0].platform,
               "devices": [str(d) for d in devices], "device_kind": devices[0].device_kind,
               "bits": {}, "time": {}, "bytes": {}}
    say(f"jax {jax.__version__}, keras {keras.__version__}, {len(devices)} "
        f"{devices[0].platform} device(s): {devices[0].device_kind}; size {args.size} {cfg}")
    if len(devices) == 1:
        say("one device: the multi-device half (replicas compared, one device's bits "
            "compared, N-device step time, compiled all-reduce) is NOT run")
    parts = args.parts.split(",")
    # A `timeout` (SIGTERM) still writes what was measured.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by SIGTERM (time limit)"))
    try:
        if "bytes" in parts:   # first: it compiles no train step
            part_bytes(cfg, devices, results)
        if "train" in parts:
            part_train(cfg, devices, results, START + args.budget)
        if len(devices) == 1:
            say("NOT RUN: the multi-device half (needs two or more devices)")
    finally:
        checkpoint(results)
        say(f"results in {RESULTS_PATH}")
    return results


if __name__ == "__main__":
    main()
