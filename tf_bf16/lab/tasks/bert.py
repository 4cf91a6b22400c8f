"""BERT-style encoder: masked-LM pre-training, then fine-tuning, on stdlib source.

Mirrors the paper's BERT application (pre-train with masked language
modelling, fine-tune on a classification task) at a size a 2-core CPU trains
in about half a minute, offline: the text is the Python standard library's
source (see ``tf_bf16.lab.tasks.corpus``; files split into training and held-out
sets by file). Examples are single source lines (at least 8 characters,
leading/trailing whitespace removed) as a [CLS] token followed by up to 31
ASCII characters, padded.

Fine-tuning task, derived from the corpus, in the spirit of GLUE's CoLA
(acceptability) and of ELECTRA's replaced-token detection: is this line as
written, or has it been corrupted? Half the lines have 2 characters (distinct
positions) replaced by different random printable characters; the model sees
only the line. Chance is 50%. It needs what MLM pre-training teaches (which
characters are plausible in context: identifiers, keywords, brackets,
English in comments) and is not solvable to 100% (a replacement can yield
valid text). An earlier candidate, predicting a stripped line's indentation
depth, was dropped: a first-5-characters lookup table already gets 45%
against a 40% majority baseline and the Transformer only 41-47%, too little
room to see any rounding effect.

Model: token + learned position embeddings (dim 64), 2 bidirectional pre-LN
Transformer blocks (4 heads, feed-forward 256, GELU, padding masked out of
attention), a final LayerNormalization; an MLM head (Dense to the vocabulary
at every position) and a classification head on [CLS] (Dense 64 tanh "pooler",
then Dense 2); ~123k parameters. One model with two outputs ``{"mlm", "cls"}``;
the loss of each ignores label -1.

Training (one pass over ``TaskData.train``, in order, ``epochs=1``): 600 MLM
steps (15% of the characters chosen; of those 80% replaced by [MASK], 10% by
a random character, 10% kept; classification labels all -1), then 600
fine-tuning steps on the corrupted/intact lines (MLM labels all -1), batch 32,
AdamW with the Keras defaults and a constant learning rate of 1e-3 for both
phases (a standard small-Transformer setting, not tuned per variant; one
optimizer, its state carried from pre-training into fine-tuning). Reduced
config: 20 + 20 steps, smaller model.

Metric: fine-tuned accuracy on 2000 lines sampled from the held-out files and
corrupted with a fixed seed (the same for every seed and variant).
"""

import dataclasses
import functools

import keras
import numpy as np

from tf_bf16.lab.tasks import corpus
from tf_bf16.lab.tasks.base import Task, TaskData

PAD = corpus.VOCAB_SIZE
CLS = corpus.VOCAB_SIZE + 1
MASK = corpus.VOCAB_SIZE + 2
VOCAB = corpus.VOCAB_SIZE + 3
CLASSES = 2
IGNORE = -1

DEFAULTS = dict(seq_len=32, dim=64, heads=4, ff_dim=256, layers=2, pretrain_steps=600,
                finetune_steps=600, eval_lines=2000)
REDUCED = dict(seq_len=24, dim=32, heads=2, ff_dim=64, layers=1, pretrain_steps=20,
               finetune_steps=20, eval_lines=128)


@functools.lru_cache(maxsize=None)
def lines_of(files, seq_len):
    """ids (n, seq_len): [CLS], a stripped source line (truncated), PAD after it."""
    rows = []
    for path in files:
        for line in corpus.read_text(path).splitlines():
            stripped = line.strip()
            if len(stripped) < 8:
                continue
            row = np.full(seq_len, PAD, np.int32)
            row[0] = CLS
            chars = corpus.encode(stripped[:seq_len - 1])
            row[1:1 + len(chars)] = chars
            rows.append(row)
    return np.stack(rows)


def corrupt(ids, rng, replaced=2):
    """(inputs, labels): half the lines kept (label 1), half corrupted (label 0).

    A corrupted line has `replaced` of its characters (distinct positions)
    replaced by different random printable characters.
    """
    inputs = ids.copy()
    labels = (rng.random(len(ids)) < 0.5).astype(np.int32)
    keys = rng.random(ids.shape)
    new = rng.integers(32, 127, ids.shape)
    for n in np.flatnonzero(labels == 0):
        row = inputs[n]
        length = int(np.sum(row != PAD)) - 1  # characters after [CLS]
        positions = 1 + np.argsort(keys[n, 1:1 + length])[:replaced]
        for i in positions:
            row[i] = new[n, i] if new[n, i] != row[i] else (row[i] - 32 + 1) % 95 + 32
    return inputs, labels


def mask_for_mlm(ids, rng, rate=0.15):
    """BERT masking of the character positions: (inputs, labels with -1 where not chosen)."""
    real = (ids != PAD) & (ids != CLS)
    chosen = real & (rng.random(ids.shape) < rate)
    action = rng.random(ids.shape)
    inputs = ids.copy()
    inputs[chosen & (action < 0.8)] = MASK
    random_positions = chosen & (action >= 0.8) & (action < 0.9)
    inputs[random_positions] = rng.integers(32, 127, random_positions.sum())
    labels = np.where(chosen, ids, IGNORE).astype(np.int32)
    return inputs, labels


@dataclasses.dataclass
class BertTask(Task):

    def make_data(self, seed, reduced=False):
        import tensorflow as tf

        cfg = self.config(reduced)
        train_files, held_files = corpus.split_files()
        ids = lines_of(train_files, cfg["seq_len"])
        rng = np.random.default_rng(seed)
        batch = cfg["batch_size"]
        n_pre, n_fine = cfg["pretrain_steps"] * batch, cfg["finetune_steps"] * batch
        pre_ids, mlm_labels = mask_for_mlm(ids[rng.integers(0, len(ids), n_pre)], rng)
        fine_ids, fine_labels = corrupt(ids[rng.integers(0, len(ids), n_fine)], rng)
        x = np.concatenate([pre_ids, fine_ids])
        y_mlm = np.concatenate([mlm_labels, np.full_like(fine_ids, IGNORE)])
        y_cls = np.concatenate([np.full(n_pre, IGNORE, np.int32), fine_labels])
        train = tf.data.Dataset.from_tensor_slices(
            (x, {"mlm": y_mlm, "cls": y_cls})).batch(batch)
        held_ids = lines_of(held_files, cfg["seq_len"])
        eval_rng = np.random.default_rng(12345)
        pick = np.sort(eval_rng.choice(len(held_ids), min(cfg["eval_lines"], len(held_ids)),
                                       replace=False))
        eval_ids, eval_labels = corrupt(held_ids[pick], eval_rng)
        counts = np.bincount(eval_labels, minlength=CLASSES)
        info = dict(train_lines=int(len(ids)), held_out_lines=int(len(held_ids)),
                    pretrain_steps=cfg["pretrain_steps"], finetune_steps=cfg["finetune_steps"],
                    majority_baseline=float(counts.max() / counts.sum()))
        return TaskData(train=train, eval=(eval_ids, eval_labels),
                        steps_per_epoch=cfg["pretrain_steps"] + cfg["finetune_steps"],
                        info=info)

    def make_model(self, seed, reduced=False):
        cfg = self.config(reduced)
        ids = keras.Input(shape=(cfg["seq_len"],), dtype="int32", name="chars")
        x = corpus.TokenAndPositionEmbedding(VOCAB, cfg["seq_len"], cfg["dim"], seed=seed,
                                            name="embedding")(ids)
        real = keras.ops.not_equal(ids, PAD)
        attention_mask = keras.ops.logical_and(real[:, None, :], real[:, :, None])
        for i in range(cfg["layers"]):
            x = corpus.transformer_block(x, heads=cfg["heads"], dim=cfg["dim"],
                                        ff_dim=cfg["ff_dim"], causal=False,
                                        seed=seed + 10 * (i + 1), name=f"block{i}",
                                        attention_mask=attention_mask)
        x = keras.layers.LayerNormalization(epsilon=1e-5, name="final_ln")(x)
        mlm = keras.layers.Dense(VOCAB, kernel_initializer=keras.initializers.GlorotUniform(
            seed=seed + 97), name="mlm")(x)
        pooled = keras.layers.Dense(
            cfg["dim"], activation="tanh",
            kernel_initializer=keras.initializers.GlorotUniform(seed=seed + 98),
            name="pooler")(x[:, 0])
        cls = keras.layers.Dense(CLASSES, kernel_initializer=keras.initializers.GlorotUniform(
            seed=seed + 99), name="cls")(pooled)
        return keras.Model(ids, {"mlm": mlm, "cls": cls}, name="char_bert")

    def loss(self):
        return {
            "mlm": keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                              ignore_class=IGNORE),
            "cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True,
                                                              ignore_class=IGNORE),
        }

    def evaluate(self, model, data):
        x, y = data.eval
        correct = 0
        for i in range(0, len(x), 256):
            logits = model(x[i:i + 256], training=False)["cls"]
            predicted = np.argmax(keras.ops.convert_to_numpy(
                keras.ops.cast(logits, "float32")), axis=-1)
            correct += int(np.sum(predicted == y[i:i + 256]))
        return correct / len(x)


TASK = BertTask(
    name="bert",
    summary="char-level BERT: masked-LM pre-training, then fine-tuning to detect corrupted "
            "lines of Python stdlib source; held-out accuracy",
    paper_application="BERT (masked-LM pre-training, fine-tuning)",
    metric="fine-tuned held-out accuracy",
    higher_is_better=True,
    optimizer="adamw",
    learning_rate=1e-3,
    epochs=1,
    batch_size=32,
    curve_points_per_epoch=8,  # one long epoch: 8 learning-curve points
    sizes=DEFAULTS,
    reduced_sizes=REDUCED,
    reduced=dict(batch_size=16),
)
