"""A DLRM-style click-through-rate model on synthetic click logs.

The regime where lost updates hurt most: large embedding tables whose rows are
updated only when their id appears in a batch, and ids that follow a Zipf law,
so most rows see few and small gradient contributions.

Ground truth (fixed, independent of the run's seed): ``NUM_DENSE`` Gaussian
dense features and ``len(VOCAB_SIZES)`` categorical features with Zipf(1.05)
distributed ids. Every id of every feature has a latent vector
(``TRUE_DIM``-dimensional, N(0, 0.5^2)) and a scalar effect; the click
probability is

    p = sigmoid(bias + w . dense + sum_f effect_f[id_f]
                + sum_{f<g} <latent_f[id_f], latent_g[id_g]> / sqrt(#pairs))

which is exactly the family a DLRM can represent (per-feature embeddings,
pairwise dot interactions). Click logs are Bernoulli draws from ``p``; the
training log (``TRAIN_EXAMPLES``) and the test log (``TEST_EXAMPLES``) are
drawn with the run's seed, in a fixed order.

Model (Naumov et al. 2019, "Deep Learning Recommendation Model"): a bottom MLP
maps the dense features to an ``EMBEDDING_DIM`` vector, one embedding table per
categorical feature, the strictly-upper-triangular pairwise dot products of
those ``1 + #features`` vectors are concatenated with the bottom output and go
through a top MLP to the click logit. 2.9 M parameters, 99% of them in the
embedding tables. Adam, learning rate 1e-3, batch 256, one pass over the log
(the usual one-epoch training of CTR models). Embedding gradients are
IndexedSlices; `compare` densifies them for the Keras optimizer of the float32
variant so that it runs the same (dense) Adam as the tf_bf16 optimizers.

Metric: test log-loss (binary cross-entropy, lower is better). The ground-truth
model's own log-loss on the same test log, the floor no model can beat in
expectation, is in ``TaskData.info["ground_truth_log_loss"]``, with the log-loss
of always predicting the training click rate (``"constant_log_loss"``).
"""

import math

import numpy as np

from tf_bf16.lab.tasks.base import Task, TaskData

NUM_DENSE = 8
VOCAB_SIZES = (100000, 50000, 20000, 10000, 2000, 500, 100, 20)
TRUE_DIM = 4
EMBEDDING_DIM = 16
ZIPF_EXPONENT = 1.05
TRAIN_EXAMPLES = 256 * 2000
TEST_EXAMPLES = 50000
WORLD_SEED = 20190531  # the ground truth is the same for every run seed

REDUCED_VOCAB_SIZES = (2000, 500, 100, 20)


def _zipf_ids(rng, vocab_size, n, exponent=ZIPF_EXPONENT):
    """n ids in [0, vocab_size) with P(k) proportional to (k + 1)^-exponent, ranks shuffled."""
    weights = (np.arange(1, vocab_size + 1, dtype=np.float64)) ** -exponent
    cdf = np.cumsum(weights / weights.sum())
    ranks = np.minimum(np.searchsorted(cdf, rng.random(n)), vocab_size - 1)
    return ranks


class GroundTruth:
    """The known click model the logs are drawn from."""

    def __init__(self, vocab_sizes, num_dense=NUM_DENSE, dim=TRUE_DIM, seed=WORLD_SEED):
        rng = np.random.default_rng(seed)
        self.vocab_sizes = tuple(vocab_sizes)
        self.num_dense = num_dense
        self.bias = -1.5
        self.dense_weights = rng.normal(0.0, 0.3, num_dense)
        self.effects = [rng.normal(0.0, 0.5, v) for v in self.vocab_sizes]
        self.latents = [rng.normal(0.0, 0.5, (v, dim)) for v in self.vocab_sizes]
        # A fixed random relabelling of Zipf ranks per feature, so that the
        # frequent ids are not simply the first rows of the tables.
        self.relabel = [rng.permutation(v) for v in self.vocab_sizes]

    def logits(self, dense, ids):
        f = len(self.vocab_sizes)
        logit = self.bias + dense @ self.dense_weights
        vectors = []
        for j in range(f):
            logit = logit + self.effects[j][ids[:, j]]
            vectors.append(self.latents[j][ids[:, j]])
        pairs = f * (f - 1) // 2
        for a in range(f):
            for b in range(a + 1, f):
                logit = logit + np.sum(vectors[a] * vectors[b], axis=1) / math.sqrt(pairs)
        return logit

    def sample(self, rng, n):
        dense = rng.normal(0.0, 1.0, (n, self.num_dense))
        ids = np.stack([self.relabel[j][_zipf_ids(rng, v, n)]
                        for j, v in enumerate(self.vocab_sizes)], axis=1)
        probability = 1.0 / (1.0 + np.exp(-self.logits(dense, ids)))
        clicks = (rng.random(n) < probability).astype(np.float32)
        return dense.astype(np.float32), ids.astype(np.int32), clicks, probability


def log_loss(labels, probability):
    p = np.clip(np.asarray(probability, np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(labels, np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def auc(labels, scores):
    """ROC AUC by the rank-sum formula (ties get average ranks)."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, np.float64)
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), np.float64)
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        return float("nan")
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def dlrm_model(vocab_sizes, num_dense=NUM_DENSE, embedding_dim=EMBEDDING_DIM,
               bottom=(64,), top=(64, 32)):
    """DLRM: bottom MLP, one table per feature, pairwise dot interactions, top MLP."""
    import keras

    dense_in = keras.Input(shape=(num_dense,), name="dense")
    ids_in = keras.Input(shape=(len(vocab_sizes),), dtype="int32", name="ids")
    x = dense_in
    for i, units in enumerate(bottom):
        x = keras.layers.Dense(units, activation="relu", name=f"bottom_{i}")(x)
    x = keras.layers.Dense(embedding_dim, activation="relu", name="bottom_out")(x)
    vectors = [x]
    for j, vocab in enumerate(vocab_sizes):
        column = keras.layers.Lambda(lambda t, j=j: t[:, j], name=f"id_{j}")(ids_in)
        vectors.append(keras.layers.Embedding(vocab, embedding_dim, name=f"table_{j}")(column))
    interactions = DotInteraction(name="interactions")(vectors)
    x = keras.layers.Concatenate(name="top_in")([x, interactions])
    for i, units in enumerate(top):
        x = keras.layers.Dense(units, activation="relu", name=f"top_{i}")(x)
    logit = keras.layers.Dense(1, name="logit")(x)
    return keras.Model({"dense": dense_in, "ids": ids_in}, logit, name="dlrm")


def _dot_interaction_class():
    import keras

    class _DotInteraction(keras.layers.Layer):
        """Strictly-upper-triangular pairwise dot products of a list of [batch, d] vectors."""

        def call(self, vectors):
            stacked = keras.ops.stack(vectors, axis=1)                          # [b, n, d]
            gram = keras.ops.matmul(stacked, keras.ops.transpose(stacked, (0, 2, 1)))
            n = len(vectors)
            rows, cols = np.triu_indices(n, k=1)
            flat = keras.ops.reshape(gram, (-1, n * n))
            return keras.ops.take(flat, rows * n + cols, axis=1)

        def compute_output_shape(self, shapes):
            n = len(shapes)
            return (shapes[0][0], n * (n - 1) // 2)

    return _DotInteraction


def DotInteraction(**kwargs):  # noqa: N802 - a layer constructor
    return _dot_interaction_class()(**kwargs)


class Dlrm(Task):

    def _sizes(self, reduced):
        if reduced:
            return (self.reduced["vocab_sizes"], self.reduced["train_examples"],
                    self.reduced["test_examples"], self.reduced["batch_size"])
        return VOCAB_SIZES, TRAIN_EXAMPLES, TEST_EXAMPLES, self.batch_size

    def make_data(self, seed, reduced=False):
        import tensorflow as tf
        vocab_sizes, n_train, n_test, batch_size = self._sizes(reduced)
        truth = GroundTruth(vocab_sizes)
        rng = np.random.default_rng([WORLD_SEED, seed])
        dense, ids, clicks, _ = truth.sample(rng, n_train)
        test_dense, test_ids, test_clicks, test_p = truth.sample(rng, n_test)
        # The logs are i.i.d. draws: generation order is the (fixed) training order.
        train = tf.data.Dataset.from_tensor_slices(
            ({"dense": dense, "ids": ids}, clicks)).batch(batch_size).prefetch(2)
        seen = np.zeros(sum(vocab_sizes), bool)
        offsets = np.concatenate([[0], np.cumsum(vocab_sizes)[:-1]])
        seen[(ids + offsets).ravel()] = True
        info = {
            "ground_truth_log_loss": log_loss(test_clicks, test_p),
            "ground_truth_auc": auc(test_clicks, test_p),
            "constant_log_loss": log_loss(test_clicks, np.full(n_test, clicks.mean())),
            "click_rate": float(clicks.mean()),
            "embedding_rows": int(sum(vocab_sizes)),
            "rows_seen_in_training": int(seen.sum()),
        }
        return TaskData(train=train,
                        eval={"x": {"dense": test_dense, "ids": test_ids}, "y": test_clicks},
                        steps_per_epoch=None, info=info)

    def make_model(self, seed, reduced=False):
        import keras
        keras.utils.set_random_seed(seed)
        return dlrm_model(self._sizes(reduced)[0])

    def loss(self):
        import keras
        return keras.losses.BinaryCrossentropy(from_logits=True)

    def evaluate(self, model, data):
        logits = model.predict(data.eval["x"], batch_size=4096, verbose=0)
        logits = np.asarray(logits, np.float64).reshape(-1)
        return log_loss(data.eval["y"], 1.0 / (1.0 + np.exp(-logits)))

    def evaluate_auc(self, model, data):
        logits = np.asarray(model.predict(data.eval["x"], batch_size=4096, verbose=0),
                            np.float64).reshape(-1)
        return auc(data.eval["y"], logits)


TASK = Dlrm(
    name="dlrm",
    summary="DLRM click-through model, Zipf ids, large embedding tables (synthetic logs)",
    paper_application="recommendation: DLRM click-through-rate prediction",
    metric="test log-loss",
    higher_is_better=False,
    optimizer="adam",
    learning_rate=1e-3,
    epochs=1,
    batch_size=256,
    curve_points_per_epoch=8,  # one long epoch: 8 learning-curve points
    reduced={"epochs": 1, "batch_size": 128, "vocab_sizes": REDUCED_VOCAB_SIZES,
             "train_examples": 4096, "test_examples": 2048},
)
