"""Character-level Transformer language model on the Python standard library.

Mirrors the paper's language-modelling application (a Transformer LM) at a
size a 2-core CPU trains in about a minute. Offline and the same on every
machine: the corpus is the top-level ``*.py`` files of the standard library
(see ``tf_bf16.lab.tasks.corpus``), split by file: every 10th file (sorted by name)
is held out. Characters map to a 128-symbol ASCII vocabulary.

Model (GPT-style, pre-LayerNorm): token + learned position embeddings (dim 64),
2 causal Transformer blocks (``keras.layers.MultiHeadAttention`` with
``use_causal_mask=True``, 4 heads, feed-forward 256, GELU), a final
LayerNormalization and a Dense projection to 128 logits; ~121k parameters.

Training: AdamW (Keras defaults: betas 0.9/0.999, weight decay 0.004),
constant learning rate 1e-3 (a standard small-Transformer setting, not tuned
per variant), batch 32 windows of 64 characters drawn at seed-dependent random
offsets of the training files, 800 steps (one pass over the sampled windows,
~1.6M characters, about 40% of the training text). Reduced config: 30
steps, sequence 32.

Metric: bits per character on held-out files (lower is better): the mean
next-character cross-entropy, in bits, over 256 fixed non-overlapping
65-character windows spread evenly through the held-out files (the same
windows for every seed and variant).

GPU configuration (``compare --backend jax --config gpu``; ``GPU`` below): the
same model at 101M parameters (dim 1024, 8 blocks of 16 heads, feed-forward
4096, sequence 512), Adam with a linear warmup over 5% of the steps to 6e-4 and
a cosine decay to 0, batch 16 windows of 512 characters, 2,000 steps (16.4M
characters), 16 learning-curve points; the held-out windows are 513 characters.

Runs on Keras's TensorFlow backend (``make_data``: a tf.data pipeline) and on
its JAX backend (``make_arrays``: the same windows as NumPy arrays); TensorFlow
is imported only by ``make_data``.
"""

import dataclasses
import math

import keras
import numpy as np

from tf_bf16.lab.tasks import corpus
from tf_bf16.lab.tasks.base import Task, TaskData

DEFAULTS = dict(seq_len=64, dim=64, heads=4, ff_dim=256, layers=2, steps=800,
                eval_windows=256)
REDUCED = dict(seq_len=32, dim=32, heads=2, ff_dim=64, layers=1, steps=30,
               eval_windows=32)
GPU = dict(seq_len=512, dim=1024, heads=16, ff_dim=4096, layers=8, steps=2000,
           eval_windows=256, batch_size=16, optimizer="adam", learning_rate=6e-4,
           warmup_fraction=0.05, curve_points_per_epoch=16,
           description="101M parameters (dim 1024, 8 blocks, sequence 512), batch 16, "
                       "Adam 6e-4 with 5% linear warmup and cosine decay to 0")


def build_model(seq_len, dim, heads, ff_dim, layers, seed, name="char_transformer", **_):
    """The GPT-style character model (pre-LayerNorm blocks, learned positions),
    under the dtype policy in force. Also the model of ``bench-gpu``."""
    ids = keras.Input(shape=(seq_len,), dtype="int32", name="chars")
    x = corpus.TokenAndPositionEmbedding(corpus.VOCAB_SIZE, seq_len, dim, seed=seed,
                                        name="embedding")(ids)
    for i in range(layers):
        x = corpus.transformer_block(x, heads=heads, dim=dim, ff_dim=ff_dim, causal=True,
                                    seed=seed + 10 * (i + 1), name=f"block{i}")
    x = keras.layers.LayerNormalization(epsilon=1e-5, name="final_ln")(x)
    logits = keras.layers.Dense(
        corpus.VOCAB_SIZE, kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 99),
        name="logits")(x)
    return keras.Model(ids, logits, name=name)


def parameter_count(seq_len, dim, ff_dim, layers, **_):
    """Trainable parameters of ``build_model`` (without building it)."""
    vocab = corpus.VOCAB_SIZE
    block = (4 * (dim * dim + dim)          # attention: query, key, value, output
             + (dim * ff_dim + ff_dim) + (ff_dim * dim + dim)  # feed-forward
             + 2 * 2 * dim)                  # two LayerNormalizations
    return (vocab * dim + seq_len * dim + layers * block + 2 * dim
            + dim * vocab + vocab)


@dataclasses.dataclass
class TransformerLMTask(Task):

    def make_arrays(self, seed, reduced=False, config=None, steps=None):
        cfg = self.config(reduced, config)
        steps = cfg["steps"] if steps is None else steps
        train_files, held_files = corpus.split_files()
        train_ids = corpus.encoded_corpus(train_files)
        held_ids = corpus.encoded_corpus(held_files)
        length = cfg["seq_len"] + 1
        count = steps * cfg["batch_size"]
        rng = np.random.default_rng(seed)
        windows = corpus.random_windows(train_ids, length, count, rng)
        # Held-out windows: evenly spaced, non-overlapping, seed-independent.
        n_eval = min(cfg["eval_windows"], len(held_ids) // length)
        offsets = np.linspace(0, len(held_ids) - length, n_eval).astype(np.int64)
        eval_windows = held_ids[offsets[:, None] + np.arange(length)]
        info = dict(train_chars=int(len(train_ids)), held_out_chars=int(len(held_ids)),
                    train_files=len(train_files), held_out_files=len(held_files),
                    corpus=corpus.stdlib_dir())
        return TaskData(train=(windows[:, :-1], windows[:, 1:]),
                        eval=(eval_windows[:, :-1], eval_windows[:, 1:]),
                        steps_per_epoch=steps, info=info)

    def make_data(self, seed, reduced=False, config=None):
        import tensorflow as tf

        data = self.make_arrays(seed, reduced, config)
        data.train = tf.data.Dataset.from_tensor_slices(data.train).batch(
            self.config(reduced, config)["batch_size"])
        return data

    def make_model(self, seed, reduced=False, config=None):
        return build_model(seed=seed, **self.config(reduced, config))

    def loss(self):
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def evaluate(self, model, data):
        x, y = data.eval
        nll = []
        for i in range(0, len(x), 64):
            logits = model(x[i:i + 64], training=False)
            logp = corpus.log_softmax_np(keras.ops.convert_to_numpy(
                keras.ops.cast(logits, "float32")))
            nll.append(-np.take_along_axis(logp, y[i:i + 64, :, None], axis=-1)[..., 0])
        return float(np.mean(np.concatenate(nll)) / math.log(2.0))


TASK = TransformerLMTask(
    name="transformer_lm",
    summary="char-level causal Transformer LM on Python stdlib source; held-out bits/char",
    paper_application="language modelling (Transformer)",
    metric="held-out bits/char",
    higher_is_better=False,
    optimizer="adamw",
    learning_rate=1e-3,
    epochs=1,
    batch_size=32,
    curve_points_per_epoch=8,  # one long epoch: 8 learning-curve points
    sizes=DEFAULTS,
    reduced_sizes=REDUCED,
    reduced=dict(batch_size=16),
    backends=("tensorflow", "jax"),
    configs={"gpu": GPU},
)
