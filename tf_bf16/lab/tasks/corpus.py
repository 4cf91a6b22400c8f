"""Shared pieces of the text tasks (transformer_lm, bert): the offline corpus
and small Transformer building blocks.

The corpus is the Python standard library's own source: the top-level ``*.py``
files of ``os.path.dirname(os.__file__)``, sorted by name, so every machine
with the same Python has exactly the same text, and no download is needed.
Files are split into training and held-out sets *by file* (every
``HELD_OUT_EVERY``-th file in sorted order is held out), so held-out text is
never seen in training, not even as an overlapping window.

Characters are mapped to a 128-symbol vocabulary: ASCII code points 1..127
are their own ids, anything else (non-ASCII, NUL) is id 0.
"""

import functools
import glob
import os

import keras
import numpy as np

VOCAB_SIZE = 128
HELD_OUT_EVERY = 10


def stdlib_dir():
    return os.path.dirname(os.__file__)


@functools.lru_cache(maxsize=None)
def stdlib_files():
    """Sorted paths of the top-level standard-library modules (*.py)."""
    files = sorted(glob.glob(os.path.join(stdlib_dir(), "*.py")))
    if len(files) < 2 * HELD_OUT_EVERY:
        raise RuntimeError(f"Too few Python source files under {stdlib_dir()} "
                           f"({len(files)}) to build the text corpus")
    return tuple(files)


def split_files():
    """(train_files, held_out_files): every HELD_OUT_EVERY-th file is held out."""
    files = stdlib_files()
    held = tuple(f for i, f in enumerate(files) if i % HELD_OUT_EVERY == 0)
    train = tuple(f for i, f in enumerate(files) if i % HELD_OUT_EVERY != 0)
    return train, held


@functools.lru_cache(maxsize=None)
def read_text(path):
    with open(path, "rb") as handle:
        return handle.read().decode("utf-8", errors="replace")


def encode(text):
    """str -> int32 ids in [0, VOCAB_SIZE)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    return np.where(codes < VOCAB_SIZE, codes, 0).astype(np.int32)


@functools.lru_cache(maxsize=None)
def encoded_corpus(files):
    """One int32 array of the files' characters, each file ending in a newline."""
    texts = (read_text(f) for f in files)
    return np.concatenate([encode(t if t.endswith("\n") else t + "\n") for t in texts])


def random_windows(ids, length, count, rng):
    """`count` windows of `length` consecutive ids of `ids`, at starts drawn from `rng`
    (the transformer_lm task's training batches; bench-gpu's and the profiler's)."""
    starts = rng.integers(0, len(ids) - length, size=count)
    return ids[starts[:, None] + np.arange(length)]


class TokenAndPositionEmbedding(keras.layers.Layer):
    """Token embedding plus a learned position embedding (GPT/BERT style)."""

    def __init__(self, vocab_size, max_length, dim, seed=None, **kwargs):
        super().__init__(**kwargs)
        init = keras.initializers.RandomNormal(stddev=0.02, seed=seed)
        init2 = keras.initializers.RandomNormal(
            stddev=0.02, seed=None if seed is None else seed + 1)
        self.tokens = keras.layers.Embedding(vocab_size, dim, embeddings_initializer=init,
                                             name="tokens", dtype=self.dtype_policy)
        self.positions = keras.layers.Embedding(max_length, dim, embeddings_initializer=init2,
                                                name="positions", dtype=self.dtype_policy)

    def build(self, input_shape):
        self.tokens.build(input_shape)
        self.positions.build(input_shape[-1:])
        self.built = True

    def call(self, ids):
        length = keras.ops.shape(ids)[-1]
        return self.tokens(ids) + self.positions(keras.ops.arange(length))


def transformer_block(x, *, heads, dim, ff_dim, causal, seed, name, dropout=0.0,
                      attention_mask=None):
    """Pre-LayerNorm Transformer block (as in GPT-2): x + MHA(LN(x)); x + FFN(LN(x))."""
    def kinit(offset):
        return keras.initializers.GlorotUniform(seed=seed + offset)

    h = keras.layers.LayerNormalization(epsilon=1e-5, name=f"{name}_ln1")(x)
    h = keras.layers.MultiHeadAttention(
        num_heads=heads, key_dim=dim // heads, dropout=dropout,
        kernel_initializer=kinit(0), name=f"{name}_attention")(h, h, attention_mask=attention_mask,
                                                 use_causal_mask=causal)
    x = keras.layers.Add(name=f"{name}_add1")([x, h])
    h = keras.layers.LayerNormalization(epsilon=1e-5, name=f"{name}_ln2")(x)
    h = keras.layers.Dense(ff_dim, activation="gelu", kernel_initializer=kinit(1),
                           name=f"{name}_ff1")(h)
    h = keras.layers.Dense(dim, kernel_initializer=kinit(2), name=f"{name}_ff2")(h)
    return keras.layers.Add(name=f"{name}_add2")([x, h])


def log_softmax_np(logits):
    """float64 log-softmax along the last axis (logits may be bf16)."""
    logits = np.asarray(logits, dtype=np.float64)
    logits = logits - logits.max(axis=-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
