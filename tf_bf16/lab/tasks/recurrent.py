"""GRU recogniser of spoken-word-like spectrograms: the paper's speech stand-in.

The paper's speech application is DeepSpeech2 (convolution + stacked
recurrent layers over spectrogram frames, SGD with momentum). Real speech is
not on every machine and cannot be downloaded here, so this task generates
spectrogram sequences from a known source-filter model of speech, offline and
deterministically, and trains a stacked GRU on them with SGD + momentum as
DeepSpeech2 did. What matters for the rounding comparison is kept: recurrent
weights updated over many time steps, noisy frame sequences, and a label
that depends on the *order* of the frames.

The generator (``synthesize``): a fixed "language" (independent of the seed)
of 16 phonemes, each with two formant frequencies on a 24-channel mel-like
axis and a voiced/unvoiced flag (unvoiced: broadband high-channel noise), and
a vocabulary of 20 words of 3-5 phonemes; words 10-19 are the reversed
phoneme sequences of words 0-9, so a bag of frames cannot tell them apart.
Each utterance draws (from the data seed) a speaker formant scale (+/-12%),
per-phoneme durations (3-8 frames), formant jitter, coarticulation (formants
glide between phonemes), a loudness contour, random leading silence, and
additive Gaussian noise (standard deviation 1.5 on the log-energies, about the
spread of the features themselves: at noise 0.6 every variant reached 98-99%,
too close to the ceiling to compare anything; at 1.5 float32 levels off near
87%; chosen on the float32 run alone); frames are log-energies, padded to 48 frames.

Model: GRU(64, return_sequences) -> GRU(64) -> Dense(20) (~44k parameters;
``glorot_uniform`` recurrent initializers, because the default orthogonal
initializer needs a QR decomposition that has no bf16 kernel).

Training: SGD, momentum 0.9, constant learning rate 0.05 (a standard
momentum-SGD setting; not tuned per variant), batch 32, 4000 training
utterances, 20 epochs (2500 steps; the runner draws a fixed permutation per
seed and epoch). Training starts on a plateau at chance (loss ln 20 = 3.0)
whose length depends on the seed: float32 leaves it after 4 epochs for seeds
0 and 2 but only after 8 for seed 1, which at an earlier 10-epoch setting was
still mid-descent (58% against 87%) and made the comparison a race out of the
plateau. At 20 epochs float32's training loss is below 0.01 for every seed
(seed 1: 81.6% test accuracy). Metric: accuracy on 1000 held-out
utterances generated with a different stream of the same seed. Reduced
config: 256 utterances, 1 epoch.
"""

import dataclasses

import keras
import numpy as np

from tf_bf16.lab.tasks.base import Task, TaskData

CHANNELS = 24
FRAMES = 48
PHONEMES = 16
WORDS = 20
LANGUAGE_SEED = 1234  # the phoneme inventory and the words: the same for every seed

DEFAULTS = dict(train=4000, test=1000, units=64)
REDUCED = dict(train=256, test=128, units=16)


def language():
    """(formants (PHONEMES, 2), voiced (PHONEMES,), words: list of phoneme-index lists)."""
    rng = np.random.default_rng(LANGUAGE_SEED)
    f1 = rng.uniform(2.0, 9.0, PHONEMES)
    f2 = rng.uniform(9.0, 21.0, PHONEMES)
    voiced = rng.random(PHONEMES) < 0.75
    words = []
    while len(words) < WORDS // 2:
        word = list(rng.choice(PHONEMES, size=rng.integers(3, 6), replace=False))
        if word not in words and word[::-1] not in words:
            words.append(word)
    words += [w[::-1] for w in words]
    return np.stack([f1, f2], axis=1), voiced, words


def synthesize(labels, rng, noise=1.5):
    """Spectrogram-like frames (len(labels), FRAMES, CHANNELS), float32."""
    formants, voiced, words = language()
    channels = np.arange(CHANNELS, dtype=np.float64)
    out = np.zeros((len(labels), FRAMES, CHANNELS))
    for n, label in enumerate(labels):
        scale = rng.uniform(0.88, 1.12)
        t = int(rng.integers(0, 6))  # leading silence
        previous = None
        for phoneme in words[label]:
            target = formants[phoneme] * scale + rng.normal(0.0, 0.4, 2)
            duration = int(rng.integers(3, 9))
            for k in range(duration):
                if t >= FRAMES:
                    break
                # Coarticulation: glide from the previous phoneme over 2 frames.
                f = target if previous is None or k >= 2 else \
                    previous + (target - previous) * (k + 1) / 3.0
                loudness = rng.uniform(0.7, 1.0)
                if voiced[phoneme]:
                    frame = (np.exp(-0.5 * ((channels - f[0]) / 1.2) ** 2)
                             + 0.7 * np.exp(-0.5 * ((channels - f[1]) / 1.5) ** 2))
                else:
                    frame = 0.5 / (1.0 + np.exp(-(channels - f[1])))
                    frame = frame * rng.uniform(0.5, 1.0, CHANNELS)
                out[n, t] = loudness * frame
                t += 1
            previous = target
    out = np.log(out + 0.05) + rng.normal(0.0, noise, out.shape)
    out = out + 2.5  # roughly zero-mean features
    return out.astype(np.float32)


@dataclasses.dataclass
class RecurrentTask(Task):

    def make_data(self, seed, reduced=False):
        cfg = self.config(reduced)
        train_rng, test_rng = (np.random.default_rng([seed, stream]) for stream in (0, 1))
        y_train = train_rng.integers(0, WORDS, cfg["train"]).astype(np.int32)
        x_train = synthesize(y_train, train_rng)
        y_test = test_rng.integers(0, WORDS, cfg["test"]).astype(np.int32)
        x_test = synthesize(y_test, test_rng)
        # Arrays: the runner draws a fixed permutation per seed and epoch.
        return TaskData(train=(x_train, y_train), eval=(x_test, y_test),
                        info=dict(classes=WORDS, frames=FRAMES, channels=CHANNELS,
                                  train=cfg["train"], test=cfg["test"]))

    def make_model(self, seed, reduced=False):
        cfg = self.config(reduced)
        units = cfg["units"]

        def init(offset):
            return keras.initializers.GlorotUniform(seed=seed + offset)

        frames = keras.Input(shape=(FRAMES, CHANNELS), name="frames")
        x = keras.layers.GRU(units, return_sequences=True, kernel_initializer=init(0),
                             recurrent_initializer=init(1), name="gru1")(frames)
        x = keras.layers.GRU(units, kernel_initializer=init(2),
                             recurrent_initializer=init(3), name="gru2")(x)
        logits = keras.layers.Dense(WORDS, kernel_initializer=init(4), name="logits")(x)
        return keras.Model(frames, logits, name="gru_words")

    def loss(self):
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def evaluate(self, model, data):
        x, y = data.eval
        logits = keras.ops.convert_to_numpy(keras.ops.cast(
            model.predict(x, batch_size=256, verbose=0), "float32"))
        return float(np.mean(np.argmax(logits, axis=-1) == y))


TASK = RecurrentTask(
    name="recurrent",
    summary="stacked GRU recognising synthetic spoken-word spectrograms; test accuracy",
    paper_application="speech recognition (DeepSpeech2 stand-in: recurrent layers)",
    metric="test accuracy",
    higher_is_better=True,
    optimizer="sgd",
    learning_rate=0.05,
    epochs=20,
    batch_size=32,
    sizes=DEFAULTS,
    reduced_sizes=REDUCED,
    reduced=dict(epochs=1),
)
