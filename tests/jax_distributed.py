"""tf_bf16 on Keras's JAX backend over several devices: the runs that
tests/test_distributed_jax.py compares.

Run in a subprocess with ``KERAS_BACKEND=jax JAX_PLATFORMS=cpu
XLA_FLAGS=--xla_force_host_platform_device_count=4`` (JAX fixes its device
count when it starts):

    python tests/jax_distributed.py ops OUT                    # jax_ops on sharded arrays
    python tests/jax_distributed.py data_parallel OUT [CASE..]  # DataParallel, 4 devices
    python tests/jax_distributed.py model_parallel OUT [CASE..] # ModelParallel + LayoutMap
    python tests/jax_distributed.py gpt OUT                     # the char GPT, sharded
    python tests/jax_distributed.py quick OUT                   # a subset of the above
    python tests/jax_distributed.py process OUT INDEX PORT      # one of 2 jax.distributed processes
    python tests/jax_distributed.py single OUT                  # the processes' cases, one device

Records are tests/distributed_cases.py's. For a sharded array the record
also holds every device's shard as ``"<path>#<device>"`` with its place in
the array as ``"<path>#<device>:index"`` (start, stop per axis), and the
array gathered to the host as ``"<path>@0"``. Nothing is compared here,
except in ``ops``, whose results are counts of differing elements (JSON).
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT, os.path.join(ROOT, "tools")]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import tf_bf16  # noqa: E402
from tf_bf16 import jax_ops  # noqa: E402
from distributed_cases import (GLOBAL_BATCH, OPTIMIZERS, ROUNDINGS, bits,  # noqa: E402
                               build_model, exact_data, linear_loss, real_data, save)

DEVICES = 4
PROCESSES = 2
assert keras.backend.backend() == "jax"


# ---------------------------------------------------------------------------
# jax_ops on sharded arrays


def op_cases():
    """name -> (function of (w, g, a, b, c, lr, step) returning the dict of
    new arrays, which of a/b/c it reads). Every update, every rounding."""
    def comp(c, rounding):
        return c if rounding == "kahan" else None

    cases = {}
    for rounding in ROUNDINGS:
        cases[f"sgd_nesterov_wd-{rounding}"] = lambda w, g, a, b, c, lr, t, r=rounding: \
            jax_ops.apply_sgd(w, g, lr, momentum=0.9, accumulator=a, nesterov=True,
                              weight_decay=0.01, rounding=r, compensation=comp(c, r), seed=7,
                              step=t, var_id=3)
        cases[f"adamw_amsgrad-{rounding}"] = lambda w, g, a, b, c, lr, t, r=rounding: \
            jax_ops.apply_adam(w, g, a, b, lr, step=t, vhat=b, weight_decay=0.01,
                               rounding=r, compensation=comp(c, r), seed=7, var_id=3)
        cases[f"lion-{rounding}"] = lambda w, g, a, b, c, lr, t, r=rounding: \
            jax_ops.apply_lion(w, g, a, lr, weight_decay=0.01, rounding=r,
                               compensation=comp(c, r), seed=7, step=t, var_id=3)
        cases[f"rounded_assign_add-{rounding}"] = lambda w, g, a, b, c, lr, t, r=rounding: \
            jax_ops.rounded_assign_add(w, g, rounding=r, compensation=comp(c, r), seed=7, step=t,
                                       var_id=3)
    cases["stochastic_round"] = lambda w, g, a, b, c, lr, t: {
        "variable": jax_ops.stochastic_round(g.astype(jnp.float32) * 1.001, seed=7, step=t,
                                             var_id=3)}
    return cases


def op_inputs(shape, seed=0):
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(shape), rng.standard_normal(shape) * 1e-2,
              rng.standard_normal(shape) * 1e-2, np.abs(rng.standard_normal(shape)) * 1e-4,
              rng.standard_normal(shape) * 1e-4]
    return [jnp.asarray(a.astype(np.float32), jnp.bfloat16) for a in arrays]


def count_differences(a, b):
    return sum(int(np.sum(bits(a[k]) != bits(b[k]))) for k in b)


def run_ops(out, *names):
    """Each update jitted on unsharded arrays, then on arrays sharded in
    several layouts of a 2 x 2 mesh (even shapes through `device_put`, an
    uneven one through a sharding constraint inside `jit`, which pads the
    last shard): the number of elements whose bits differ. Then the
    control: the same update applied to each shard on its own
    (`shard_map`), keying the bits on the shard's local indices, as an
    optimizer that knows only its shard would. ``quick``: one shape in one
    layout, and the uneven one."""
    quick = "quick" in names
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("a", "b"))
    layouts = {"rows": P("a"), "columns": P(None, "b"), "tiles": P("a", "b"),
               "rows_4": P(("a", "b")), "transposed_tiles": P("b", "a")}
    lr, step = jnp.float32(1e-3), jnp.int32(5)
    results = {}
    if quick:
        layouts = {"rows_4": layouts["rows_4"]}
    for shape in ((64, 48),) if quick else ((64, 48), (8, 6, 20)):
        inputs = op_inputs(shape)
        for name, update in op_cases().items():
            unsharded = jax.jit(update)(*inputs, lr, step)
            for layout, spec in layouts.items():
                sharding = NamedSharding(mesh, spec)
                sharded = jax.jit(update)(*[jax.device_put(x, sharding) for x in inputs],
                                          lr, step)
                shard_shapes = {s.data.shape for s in sharded["variable"].addressable_shards}
                assert all(s != shape for s in shard_shapes), (name, layout, shard_shapes)
                results[f"{name}/{shape}/{layout}"] = count_differences(sharded, unsharded)
    shape, spec = (37, 53), P("a", "b")   # neither axis divisible by 2
    inputs = op_inputs(shape, seed=1)
    sharding = NamedSharding(mesh, spec)
    for name, update in op_cases().items():
        def constrained(*args, update=update):
            args = [jax.lax.with_sharding_constraint(x, sharding) for x in args[:5]] + \
                list(args[5:])
            return update(*args)
        unsharded = jax.jit(update)(*inputs, lr, step)
        sharded = jax.jit(constrained)(*inputs, lr, step)
        results[f"{name}/{shape}/uneven_tiles"] = count_differences(sharded, unsharded)
    inputs = op_inputs((64, 48))
    for name in ("adamw_amsgrad-stochastic", "sgd_nesterov_wd-stochastic"):
        update = op_cases()[name]
        local = jax.jit(jax.shard_map(lambda *a, u=update: u(*a), mesh=mesh,
                                      in_specs=(P("a", "b"),) * 5 + (P(), P()),
                                      out_specs=P("a", "b")))
        results[f"control/local_indices/{name}"] = count_differences(
            local(*inputs, lr, step), jax.jit(update)(*inputs, lr, step))
    with open(os.path.join(out, "ops.json"), "w") as f:
        json.dump(results, f, indent=1)


# ---------------------------------------------------------------------------
# Keras models under keras.distribution


def host_copy(array):
    """A replicated array's local copy (in a multi-process run the array
    itself is not fully addressable), else the array gathered to the host."""
    shards = array.addressable_shards
    if all(shard.data.shape == array.shape for shard in shards):
        return np.asarray(shards[0].data)
    return np.asarray(array)


def initial_values(model):
    return {f"initial/{v.path}": host_copy(v.value) for v in model.trainable_variables}


def record(model, optimizer, initial, drawn_seed):
    """Every device's copy/shard of every variable, the host copy, the
    initial weights and the seeds (tests/distributed_cases.py's record)."""
    out = dict(initial)
    named = [(v.path, v) for v in model.weights]
    named += [("optimizer/" + v.path.split("/", 1)[-1], v) for v in optimizer.variables]
    for path, variable in named:
        array = variable.value
        shards = sorted(array.addressable_shards, key=lambda s: s.device.id)
        full = all(s.data.shape == array.shape for s in shards)
        if full:   # replicated: each device's own copy is a replica
            for k, shard in enumerate(shards):
                out[f"{path}@{k}"] = np.asarray(shard.data)
            continue
        out[f"{path}@0"] = np.asarray(array)
        for shard in shards:
            out[f"{path}#{shard.device.id}"] = np.asarray(shard.data)
            out[f"{path}#{shard.device.id}:index"] = np.array(
                [[s.start or 0, array.shape[i] if s.stop is None else s.stop]
                 for i, s in enumerate(shard.index)] or np.zeros((0, 2)), np.int64)
    out["seed"] = np.int64(optimizer.seed)
    out["drawn_seed"] = np.int64(drawn_seed)
    return out


def fit_case(kind, optimizer_name, rounding, seed, distribution=None):
    keras.backend.clear_session()
    tf_bf16.set_policy()
    keras.utils.set_random_seed(1)
    keras.distribution.set_distribution(distribution)
    try:
        class_name, kwargs = OPTIMIZERS[optimizer_name]
        optimizer = getattr(tf_bf16.optimizers, class_name)(rounding=rounding, seed=seed,
                                                            **kwargs)
        model = build_model(kind)
        loss = linear_loss if kind == "exact" else keras.losses.SparseCategoricalCrossentropy(
            from_logits=True)
        model.compile(optimizer=optimizer, loss=loss)
        initial = initial_values(model)
        x, y = exact_data() if kind == "exact" else real_data()
        model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
        return record(model, optimizer, initial, optimizer.seed)
    finally:
        keras.distribution.set_distribution(None)


def keras_cases():
    cases = {f"exact-{name}-{rounding}": ("exact", name, rounding, 5)
             for name in OPTIMIZERS for rounding in ROUNDINGS}
    for name in ("sgd_nesterov", "adam", "lion"):
        cases[f"real-{name}-stochastic"] = ("real", name, "stochastic", 5)
    return cases


def run_keras(out, distribution, label, names):
    for case, (kind, name, rounding, seed) in keras_cases().items():
        if names and case not in names:
            continue
        save(os.path.join(out, f"{case}.{label}.npz"),
             fit_case(kind, name, rounding, seed, distribution))
        save(os.path.join(out, f"{case}.single.npz"), fit_case(kind, name, rounding, seed))
        if kind == "real":
            save(os.path.join(out, f"{case}.other_seed.npz"),
                 fit_case(kind, name, rounding, seed + 1))
        print(case, "done", flush=True)


def run_data_parallel(out, *names):
    run_keras(out, keras.distribution.DataParallel(devices=jax.devices()), "data_parallel",
              names)


def exact_layout_map():
    """A 2 (batch) x 2 (model) mesh: the Dense kernel split by output units,
    the Embedding table by rows; the batch split over the other axis."""
    mesh = keras.distribution.DeviceMesh((2, 2), ("batch", "model"), jax.devices())
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*dense.*kernel"] = (None, "model")
    layout_map[".*hidden.*kernel"] = (None, "model")
    layout_map[".*logits.*kernel"] = ("model", None)
    layout_map[".*embedding.*embeddings"] = ("model", None)
    return layout_map


def run_model_parallel(out, *names):
    distribution = keras.distribution.ModelParallel(layout_map=exact_layout_map(),
                                                    batch_dim_name="batch")
    run_keras(out, distribution, "model_parallel",
              names or [c for c in keras_cases() if c.startswith("exact")])


# ---------------------------------------------------------------------------
# The char GPT of tools/data_parallel.py, sharded over 4 devices


def gpt_layout_map():
    """Tensor parallelism over a 1 x 4 mesh: attention heads, the
    feed-forward hidden units, the logits' vocabulary and both embedding
    tables split over "model"; the batch is not split."""
    mesh = keras.distribution.DeviceMesh((1, DEVICES), ("batch", "model"), jax.devices())
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*tokens.*embeddings"] = ("model", None)
    layout_map[".*positions.*embeddings"] = (None, "model")
    layout_map[".*(query|key|value).*kernel"] = (None, "model", None)
    layout_map[".*attention_output.*kernel"] = ("model", None, None)
    layout_map[".*ff1.*kernel"] = (None, "model")
    layout_map[".*ff2.*kernel"] = ("model", None)
    layout_map[".*logits.*kernel"] = (None, "model")
    return layout_map


def gpt_optimizer(name, rounding, seed=3):
    class_name, kwargs = OPTIMIZERS[name]
    return getattr(tf_bf16.optimizers, class_name)(rounding=rounding, seed=seed, **kwargs)


GPT_STEPS = 4


def gpt_same_gradients(name, rounding, distribution):
    """The GPT's variables (with `distribution`'s layouts), updated GPT_STEPS
    times by `optimizer.stateless_apply` under `jit` with the same fixed
    gradients (normal, scaled 0.1, bf16) as the unsharded run gets."""
    import data_parallel

    keras.backend.clear_session()
    tf_bf16.set_policy()
    keras.utils.set_random_seed(1)
    keras.distribution.set_distribution(distribution)
    try:
        optimizer = gpt_optimizer(name, rounding)
        model = data_parallel.char_gpt(data_parallel.SIZES["tiny"])
        optimizer.build(model.trainable_variables)
        initial = initial_values(model)
        trainable = [v.value for v in model.trainable_variables]
        optimizer_state = [v.value for v in optimizer.variables]
        rng = np.random.default_rng(11)
        apply = jax.jit(optimizer.stateless_apply)
        for _ in range(GPT_STEPS):
            grads = [jax.device_put(jnp.asarray((rng.standard_normal(t.shape) * 0.1)
                                                .astype(np.float32), jnp.bfloat16), t.sharding)
                     for t in trainable]
            trainable, optimizer_state = apply(optimizer_state, grads, trainable)
        for variable, value in zip(model.trainable_variables, trainable):
            variable.assign(value)
        for variable, value in zip(optimizer.variables, optimizer_state):
            variable.assign(value)
        return record(model, optimizer, initial, optimizer.seed)
    finally:
        keras.distribution.set_distribution(None)


def gpt_fit(distribution, variant, seed=3):
    """`fit` of the GPT, AdamW with stochastic rounding ('sr') or Keras's own
    SGD in float32 ('float32', the control)."""
    import data_parallel

    cfg = data_parallel.SIZES["tiny"]
    keras.backend.clear_session()
    if variant == "float32":
        tf_bf16.reset_policy()
        keras.config.set_dtype_policy("float32")
    else:
        tf_bf16.set_policy()
    keras.utils.set_random_seed(1)
    keras.distribution.set_distribution(distribution)
    try:
        optimizer = keras.optimizers.SGD(0.1, momentum=0.9) if variant == "float32" else \
            tf_bf16.optimizers.AdamW(1e-3, rounding="stochastic", seed=seed)
        model = data_parallel.char_gpt(cfg)
        model.compile(optimizer=optimizer,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        initial = initial_values(model)
        x, y = data_parallel.char_windows(cfg, 8 * 6)
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        if variant == "float32":
            optimizer.seed = -1
        return record(model, optimizer, initial, optimizer.seed)
    finally:
        keras.distribution.set_distribution(None)
        tf_bf16.reset_policy()


def run_gpt(out, *names):
    distribution = keras.distribution.ModelParallel(layout_map=gpt_layout_map(),
                                                    batch_dim_name="batch")
    for name in OPTIMIZERS:
        for rounding in ROUNDINGS:
            case = f"gpt_same_gradients-{name}-{rounding}"
            if names and case not in names:
                continue
            save(os.path.join(out, f"{case}.sharded.npz"),
                 gpt_same_gradients(name, rounding, distribution))
            save(os.path.join(out, f"{case}.unsharded.npz"),
                 gpt_same_gradients(name, rounding, None))
            print(case, "done", flush=True)
    if names and "gpt_fit" not in names:
        return
    for variant in ("sr", "float32"):
        save(os.path.join(out, f"gpt_fit-{variant}.sharded.npz"), gpt_fit(distribution, variant))
        save(os.path.join(out, f"gpt_fit-{variant}.unsharded.npz"), gpt_fit(None, variant))
    save(os.path.join(out, "gpt_fit-sr.other_seed.npz"), gpt_fit(None, "sr", seed=4))
    print("gpt_fit done", flush=True)


def run_quick(out, *_):
    """What `make test-fast` runs: the quick ops check and one exact case
    each under DataParallel and ModelParallel."""
    run_ops(out, "quick")
    run_data_parallel(out, "exact-adamw_amsgrad-kahan")
    run_model_parallel(out, "exact-adamw_amsgrad-stochastic")


# ---------------------------------------------------------------------------
# jax.distributed: PROCESSES processes of one CPU device each


PROCESS_CASES = {"exact-adamw_amsgrad-stochastic": ("exact", "adamw_amsgrad", "stochastic"),
                 "exact-sgd_nesterov-kahan": ("exact", "sgd_nesterov", "kahan")}


def process_fit(kind, optimizer_name, rounding, seed, process=None):
    """`fit` with DataParallel over every process's devices, each process
    feeding its own slice of every global batch (`process` None: one device,
    the whole batch)."""
    keras.backend.clear_session()
    tf_bf16.set_policy()
    keras.utils.set_random_seed(1)   # JAX requires equal initial values in every process
    if process is not None:
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(auto_shard_dataset=False))   # sharded here
    try:
        class_name, kwargs = OPTIMIZERS[optimizer_name]
        optimizer = getattr(tf_bf16.optimizers, class_name)(rounding=rounding, seed=seed,
                                                            **kwargs)
        drawn_seed = optimizer._initial_seed   # this process's own draw (seed=None)
        model = build_model(kind)
        model.compile(optimizer=optimizer, loss=linear_loss)
        # (Before training, a multi-process variable's shards cannot be read
        # here: "the input arrays must have one shard each"; the one-device run
        # records the initial values.)
        initial = initial_values(model) if process is None else {}
        x, y = exact_data()
        batch = GLOBAL_BATCH
        if process is not None:
            batch = GLOBAL_BATCH // PROCESSES
            x, y = (a.reshape(-1, PROCESSES, batch, *a.shape[1:])[:, process]
                    .reshape(-1, *a.shape[1:]) for a in (x, y))
        model.fit(x, y, batch_size=batch, epochs=1, shuffle=False, verbose=0)
        return record(model, optimizer, initial, drawn_seed)
    finally:
        keras.distribution.set_distribution(None)


def run_process(out, index, port):
    """One of PROCESSES processes (`keras.distribution.initialize`, gloo
    collectives on the CPU); seed=None, so each draws its own."""
    index = int(index)
    keras.distribution.initialize(job_addresses=f"localhost:{port}", num_processes=PROCESSES,
                                  process_id=index)
    assert jax.process_count() == PROCESSES and len(jax.devices()) == PROCESSES
    for case, (kind, name, rounding) in PROCESS_CASES.items():
        save(os.path.join(out, f"{case}.process{index}.npz"),
             process_fit(kind, name, rounding, None, index))
        print(f"process {index}: {case} done", flush=True)


def run_single(out, *_):
    from distributed_cases import load

    for case, (kind, name, rounding) in PROCESS_CASES.items():
        seed = int(load(os.path.join(out, f"{case}.process0.npz"))["seed"])
        save(os.path.join(out, f"{case}.single.npz"), process_fit(kind, name, rounding, seed))


if __name__ == "__main__":
    mode, out, *names = sys.argv[1:]
    if mode == "process":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        run_process(out, *names)
        sys.exit()
    if mode != "single":
        assert len(jax.devices()) == DEVICES, jax.devices()
    {"ops": run_ops, "data_parallel": run_data_parallel, "model_parallel": run_model_parallel,
     "gpt": run_gpt, "quick": run_quick, "single": run_single}[mode](out, *names)
