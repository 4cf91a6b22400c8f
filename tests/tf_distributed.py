"""tf_bf16 under tf.distribute: the training runs that tests/test_distributed.py compares.

Run in subprocesses, because tf.distribute needs its devices (or its cluster)
configured before TensorFlow starts:

    python tests/tf_distributed.py mirrored OUT      # 2 logical CPU devices
    TF_CONFIG=... python tests/tf_distributed.py worker OUT   # one MultiWorkerMirrored worker
    python tests/tf_distributed.py single OUT         # the workers' cases on one replica

Each run writes one record (``.npz``, tests/distributed_cases.py) per case:
every replica's copy of every model and optimizer variable (slots, Kahan
buffers, iteration count). Nothing is compared here. The models, data and
optimizers are tests/distributed_cases.py's.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from distributed_cases import (GLOBAL_BATCH, OPTIMIZERS, REPLICAS, ROUNDINGS, STEPS,  # noqa: E402
                               build_model, exact_data, linear_loss, load, real_data, save)

# What the MultiWorkerMirroredStrategy workers train (seed=None: the default,
# drawn in each process, must be agreed on).
WORKER_CASES = {"exact-adamw_amsgrad-stochastic": ("exact", "adamw_amsgrad", "stochastic", None),
                "exact-sgd_plain-kahan": ("exact", "sgd_plain", "kahan", None),
                "real-adam-stochastic": ("real", "adam", "stochastic", 5)}


def train(kind, optimizer_name, rounding, seed, strategy=None):
    """Builds, compiles and fits one case (in `strategy`'s scope if given);
    returns {key: array} of every replica's copy of every variable."""
    import contextlib

    import keras

    import tf_bf16

    tf_bf16.set_policy()
    keras.utils.set_random_seed(1)
    class_name, kwargs = OPTIMIZERS[optimizer_name]
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        model = build_model(kind)
        optimizer = getattr(tf_bf16.optimizers, class_name)(rounding=rounding, seed=seed,
                                                            **kwargs)
        loss = linear_loss if kind == "exact" else keras.losses.SparseCategoricalCrossentropy(
            from_logits=True)
        model.compile(optimizer=optimizer, loss=loss)
    # This process's own draw if seed=None (the rounding_seed variable, created in the
    # strategy's scope, may already hold worker 0's).
    drawn_seed = optimizer._initial_seed
    initial = initial_values(model)
    x, y = exact_data() if kind == "exact" else real_data()
    model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    return replica_values(model, optimizer) | initial | {
        "seed": np.int64(optimizer.seed), "drawn_seed": np.int64(drawn_seed)}


def initial_values(model):
    """{"initial/<path>": array} of the trainable weights before training."""
    return {f"initial/{v.path}": v.numpy() for v in model.trainable_variables}


def replica_values(model, optimizer):
    """{"<path>@<replica>": numpy array}: each replica's own copy of every model
    and optimizer variable (component `replica` of a MirroredVariable; "@0"
    alone for a plain variable). Optimizer variables are keyed
    "optimizer/<name>" (without the optimizer's auto-numbered name)."""
    out = {}
    named = [(v.path, v) for v in model.weights] + [
        ("optimizer/" + v.path.split("/", 1)[-1], v) for v in optimizer.variables]
    for path, variable in named:
        value = variable.value
        copies = getattr(value, "values", None) or (value,)
        for replica, copy in enumerate(copies):
            out[f"{path}@{replica}"] = copy.numpy()
    return out


def mirrored_cases():
    cases = {}
    for name in OPTIMIZERS:
        for rounding in ROUNDINGS:
            cases[f"exact-{name}-{rounding}"] = ("exact", name, rounding, 5)
    for name in ("sgd_nesterov", "adam", "lion"):
        cases[f"real-{name}-stochastic"] = ("real", name, "stochastic", 5)
        cases[f"real-{name}-kahan"] = ("real", name, "kahan", 5)
    return cases


def run_mirrored(out, *cases):
    """The `mirrored_cases` (or those named) on REPLICAS logical CPU devices,
    on one replica, and (real model) on one replica with another seed; then
    the IndexedSlices carrier check."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * REPLICAS)
    strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(REPLICAS)])
    assert strategy.num_replicas_in_sync == REPLICAS
    for case, (kind, name, rounding, seed) in mirrored_cases().items():
        if cases and case not in cases:
            continue
        save(os.path.join(out, f"{case}.mirrored.npz"),
             train(kind, name, rounding, seed, strategy))
        save(os.path.join(out, f"{case}.single.npz"), train(kind, name, rounding, seed))
        if kind == "real":   # the same run with another seed: the scale of SR noise
            save(os.path.join(out, f"{case}.other_seed.npz"),
                 train(kind, name, rounding, seed + 1))
        print(case, "done", flush=True)
    save(os.path.join(out, "carrier.npz"), carrier_check(strategy))


def carrier_check(strategy):
    """Every bf16 bit pattern as the rows of an IndexedSlices gradient, half
    on each replica, through tf.distribute's all-reduce: first as stock Keras
    sends it (the error is recorded), then through
    `tf_bf16.backend.tf_distribute.all_reduce_sum_gradients`."""
    import tensorflow as tf

    from tf_bf16.backend import tf_distribute

    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).reshape(REPLICAS, -1, 8)
    rows = patterns.shape[1]

    def slices(context):
        replica = context.replica_id_in_sync_group
        values = tf.bitcast(tf.gather(tf.constant(patterns), replica), tf.bfloat16)
        return tf.IndexedSlices(values, tf.range(rows) + replica * rows,
                                tf.constant([REPLICAS * rows, 8], tf.int64))

    def all_reduce(grads_and_vars):
        context = tf.distribute.get_replica_context()
        reduced = context.all_reduce(tf.distribute.ReduceOp.SUM, [g for g, _ in grads_and_vars])
        return list(zip(reduced, [v for _, v in grads_and_vars]))

    def stock():
        return all_reduce([(slices(tf.distribute.get_replica_context()), None)])[0][0].values

    def carried():
        gradient = slices(tf.distribute.get_replica_context())
        reduced = tf_distribute.all_reduce_sum_gradients(all_reduce, [(gradient, None)])[0][0]
        return tf.bitcast(reduced.values, tf.uint16), reduced.indices

    try:
        strategy.run(tf.function(stock))
        stock_error = ""
    except TypeError as e:
        stock_error = str(e)
    values, indices = strategy.run(tf.function(carried))
    local = strategy.experimental_local_results
    return {"patterns": patterns.reshape(-1, 8), "stock_error": np.array(stock_error),
            **{f"values@{r}": v.numpy() for r, v in enumerate(local(values))},
            **{f"indices@{r}": i.numpy() for r, i in enumerate(local(indices))}}


def train_custom_loop(kind, optimizer_name, rounding, seed, strategy, init_seed=1):
    """The custom training loop of tf.distribute's guide: `strategy.run` of a
    step that computes the replica's gradients (loss / replicas) and calls
    `optimizer.apply`, each worker feeding its own slice of every global batch.
    The same code with the default strategy is the one-replica run.

    (Keras 3.15's `fit` fails under MultiWorkerMirroredStrategy with any
    model, float32 too: it calls `strategy.reduce` on the (x, y) batch, then
    with `axis=0` on the scalar loss; docs/distributed.md.)"""
    import keras
    import tensorflow as tf

    import tf_bf16

    tf_bf16.set_policy()
    keras.utils.set_random_seed(init_seed)
    class_name, kwargs = OPTIMIZERS[optimizer_name]
    with strategy.scope():
        model = build_model(kind)
        optimizer = getattr(tf_bf16.optimizers, class_name)(rounding=rounding, seed=seed,
                                                            **kwargs)
        drawn_seed = optimizer._initial_seed   # this process's own draw if seed=None
        optimizer.build(model.trainable_variables)
    initial = initial_values(model)
    loss_fn = linear_loss if kind == "exact" else keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction=None)
    x, y = exact_data() if kind == "exact" else real_data()

    def dataset_fn(context):
        per_replica = context.get_per_replica_batch_size(GLOBAL_BATCH)
        start = context.input_pipeline_id * per_replica
        end = start + per_replica
        batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)
        return batches.map(lambda a, b: (a[start:end], b[start:end]))

    @tf.function
    def step(batch):
        def replica_step(features, labels):
            with tf.GradientTape() as tape:
                per_example = loss_fn(labels, model(features, training=True))
                loss = tf.reduce_mean(tf.cast(per_example, tf.float32)) / \
                    strategy.num_replicas_in_sync
            trainable = model.trainable_variables
            optimizer.apply(tape.gradient(loss, trainable), trainable)

        strategy.run(replica_step, args=batch)

    for batch in strategy.distribute_datasets_from_function(dataset_fn):
        step(batch)
    assert int(optimizer.iterations.numpy()) == STEPS
    return replica_values(model, optimizer) | initial | {
        "seed": np.int64(optimizer.seed), "drawn_seed": np.int64(drawn_seed)}


def run_worker(out, *_):
    import json

    import tensorflow as tf

    task = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    assert strategy.num_replicas_in_sync == REPLICAS, strategy.num_replicas_in_sync
    for case, (kind, name, rounding, seed) in WORKER_CASES.items():
        # Each worker initializes its model from its own seed; the strategy
        # broadcasts worker 0's initial values (bf16 ones too, tf_bf16.backend.tf_distribute).
        save(os.path.join(out, f"{case}.worker{task}.npz"),
             train_custom_loop(kind, name, rounding, seed, strategy, init_seed=1 + task))
        print(f"worker {task}: {case} done", flush=True)


def run_single(out, *_):
    """The workers' cases on one replica, with the seed the workers agreed on."""
    import tensorflow as tf

    strategy = tf.distribute.get_strategy()
    for case, (kind, name, rounding, _) in WORKER_CASES.items():
        seed = int(load(os.path.join(out, f"{case}.worker0.npz"))["seed"])
        save(os.path.join(out, f"{case}.single.npz"),
             train_custom_loop(kind, name, rounding, seed, strategy))
        if kind == "real":
            save(os.path.join(out, f"{case}.other_seed.npz"),
                 train_custom_loop(kind, name, rounding, seed + 1, strategy))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    mode, out, *names = sys.argv[1:]
    {"mirrored": run_mirrored, "worker": run_worker, "single": run_single}[mode](out, *names)
