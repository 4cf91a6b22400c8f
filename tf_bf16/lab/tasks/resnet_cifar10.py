"""ResNet-18 on CIFAR-10 through ``tfds.load("cifar10")``.

The paper's first application. The model is the standard CIFAR variant of
ResNet-18 (He et al. 2016, as in the usual CIFAR reimplementations): a 3x3
stem convolution with 64 filters, four stages of two BasicBlocks with 64, 128,
256 and 512 filters (stride 2 at the start of stages 2-4, 1x1 projection
shortcuts where the shape changes), BatchNormalization after every convolution,
global average pooling and a 10-way dense head; 11.2 M parameters.

Data: the 50,000 training and 10,000 test images of CIFAR-10 from TensorFlow
Datasets, normalized with the per-channel training-set mean and standard
deviation; training images are augmented the standard way (pad 4 pixels,
random 32x32 crop, random horizontal flip). The whole training set is
reshuffled every epoch. Shuffling and augmentation are seeded by the run's
seed and by numpy's global RNG when an epoch starts (the runner seeds it per
epoch), so every variant of one seed sees the same batches in the same order.

Training: SGD with momentum 0.9, learning rate 0.1, batch 128, L2 weight
decay 5e-4 on the convolution and dense kernels (the standard CIFAR recipe),
constant learning rate, 30 epochs (the usual recipe trains 200 epochs with a
decaying rate; this is the shortened constant-rate version, the same for every
variant). This is a GPU-scale run: on a 2-core CPU (Nov 2026, TF 2.21) one
training step of batch 128 took 7.2 s in float32 and 2.9 s in pure bf16 with
SR, i.e. ~47 / ~19 minutes per epoch; ``--epochs`` shortens it.

The data is not downloaded at run time. ``available()`` looks for prepared
CIFAR-10 in ``$TFDS_DATA_DIR`` (else ``~/tensorflow_datasets``) and says how to
get it when it is missing. The pipeline is tested with
``tfds.testing.mock_data`` (tests/lab/test_vision_and_ctr_tasks.py).
"""

import glob
import math
import os

from tf_bf16.lab.tasks.base import Task, TaskData

NUM_CLASSES = 10
# Per-channel mean and standard deviation of the CIFAR-10 training images (0..1 scale).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
WEIGHT_DECAY = 5e-4


def data_dir():
    """Where TensorFlow Datasets looks for prepared data: $TFDS_DATA_DIR or tfds's default."""
    path = os.environ.get("TFDS_DATA_DIR")
    if path:
        return os.path.expanduser(path)
    return os.path.expanduser(os.path.join("~", "tensorflow_datasets"))


def _normalize(image):
    import tensorflow as tf
    image = tf.cast(image, tf.float32) / 255.0
    return (image - tf.constant(CIFAR10_MEAN)) / tf.constant(CIFAR10_STD)


def _augment(image, seed):
    """Pad 4, random 32x32 crop, random horizontal flip; `seed` is a stateless [2] int seed."""
    import tensorflow as tf
    padded = tf.pad(image, [[4, 4], [4, 4], [0, 0]], mode="CONSTANT")
    cropped = tf.image.stateless_random_crop(padded, tf.shape(image), seed=seed)
    return tf.image.stateless_random_flip_left_right(cropped, seed=seed + 1)


def _epoch_seeds():
    """One pair of int64 seeds per pass over the data, from numpy's global RNG.

    Drawn when an iterator over the training set starts (each ``fit`` epoch).
    The compare runner calls ``keras.utils.set_random_seed(seed * 1000 + epoch)``
    (which seeds numpy) before every epoch, so each variant of a seed gets the
    same shuffle and augmentation at epoch ``e``, and each epoch a new one.
    """
    import numpy as np
    yield np.random.randint(0, 2**31 - 1, size=2).astype(np.int64)


def make_pipelines(train, test, seed, batch_size, augment=True):
    """(train, test, batches per epoch) from tfds (image uint8, label) datasets.

    Every pass over ``train`` is one epoch: the cached training set shuffled
    completely and augmented (pad-crop-flip, stateless random ops) with seeds
    from ``seed`` and from ``_epoch_seeds``. Test batches are in file order,
    unaugmented.
    """
    import tensorflow as tf

    n_train = int(train.cardinality())
    if n_train < 0:  # unknown: count once
        n_train = int(train.reduce(tf.constant(0, tf.int64), lambda count, _: count + 1))
    # Held in memory (CIFAR-10: 150 MB of uint8) so each epoch can be a
    # stateless permutation: Dataset.shuffle takes only a Python int seed (a
    # tensor seed fails inside TF's get_seed when the global seed is 0).
    images, labels = next(iter(train.batch(n_train)))
    run_seed = tf.constant(seed, tf.int64)

    def one_epoch(epoch_seeds):
        keys = tf.random.stateless_uniform(
            [n_train], seed=tf.stack([epoch_seeds[0] + run_seed, tf.constant(0, tf.int64)]))
        order = tf.argsort(keys, stable=True)
        shuffled = tf.data.Dataset.from_tensor_slices(order).map(
            lambda i: (tf.gather(images, i), tf.gather(labels, i)))

        def preprocess(index, example):
            image, label = example
            image = _normalize(image)
            if augment:
                image = _augment(image, tf.stack([epoch_seeds[1] + run_seed, 2 * index]))
            return image, label

        return shuffled.enumerate().map(preprocess, num_parallel_calls=tf.data.AUTOTUNE,
                                        deterministic=True)

    seeds = tf.data.Dataset.from_generator(
        _epoch_seeds, output_signature=tf.TensorSpec([2], tf.int64))
    steps = math.ceil(n_train / batch_size)
    train = (seeds.flat_map(one_epoch).batch(batch_size)
             .apply(tf.data.experimental.assert_cardinality(steps))
             .prefetch(tf.data.AUTOTUNE))
    test = test.map(lambda image, label: (_normalize(image), label),
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    test = test.batch(256).cache().prefetch(tf.data.AUTOTUNE)
    return train, test, steps


def _l2(weight_decay):
    """L2 penalty ``weight_decay / 2 * sum(w**2)`` summed in float32.

    Its gradient ``weight_decay * w`` is SGD's classic coupled weight decay.
    Keras's own L2 returns the bf16 dtype of a bf16 weight, which Keras then
    cannot add to the float32 loss; this one always returns float32.
    """
    import keras

    class L2Float32(keras.regularizers.Regularizer):
        def __call__(self, x):
            x = keras.ops.cast(x, "float32")
            return (weight_decay / 2) * keras.ops.sum(keras.ops.square(x))

        def get_config(self):
            return {}

    return L2Float32()


def _basic_block(x, filters, stride, name, regularizer):
    import keras
    conv_args = dict(padding="same", use_bias=False, kernel_initializer="he_normal",
                     kernel_regularizer=regularizer)
    shortcut = x
    y = keras.layers.Conv2D(filters, 3, strides=stride, name=f"{name}_conv1", **conv_args)(x)
    y = keras.layers.BatchNormalization(name=f"{name}_bn1")(y)
    y = keras.layers.ReLU(name=f"{name}_relu1")(y)
    y = keras.layers.Conv2D(filters, 3, name=f"{name}_conv2", **conv_args)(y)
    y = keras.layers.BatchNormalization(name=f"{name}_bn2")(y)
    if stride != 1 or x.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(filters, 1, strides=stride, name=f"{name}_proj",
                                       **conv_args)(x)
        shortcut = keras.layers.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_out")(y)


def resnet18(width=64, num_classes=NUM_CLASSES, input_shape=(32, 32, 3),
             weight_decay=WEIGHT_DECAY, blocks_per_stage=(2, 2, 2, 2)):
    """CIFAR ResNet-18 (3x3 stem, no max-pool); `width` is the first stage's filters."""
    import keras
    regularizer = _l2(weight_decay) if weight_decay else None
    inputs = keras.Input(shape=input_shape, name="image")
    x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False,
                            kernel_initializer="he_normal", kernel_regularizer=regularizer,
                            name="stem_conv")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    for stage, blocks in enumerate(blocks_per_stage):
        filters = width * 2 ** stage
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            x = _basic_block(x, filters, stride, f"stage{stage + 1}_block{block + 1}", regularizer)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(num_classes, kernel_regularizer=regularizer, name="logits")(x)
    return keras.Model(inputs, outputs, name=f"resnet18_w{width}")


class ResNetCifar10(Task):

    def available(self):
        message = (
            "CIFAR-10 is not prepared in {dir}. On a machine with internet run\n"
            "    python -c \"import tensorflow_datasets as tfds; tfds.load('cifar10')\"\n"
            "(it downloads 163 MB and prepares ~/tensorflow_datasets/cifar10), or copy a\n"
            "prepared tensorflow_datasets/cifar10 directory here; set TFDS_DATA_DIR to use\n"
            "another directory.")
        missing = super().available()
        if missing:
            return f"{missing}\n{message.format(dir=data_dir())}"
        import tensorflow_datasets as tfds

        # Look on disk first: for a dataset that is not prepared, tfds.builder
        # asks GCS for its metadata (network) and leaves a temp directory behind.
        if not glob.glob(os.path.join(data_dir(), "cifar10", "*", "dataset_info.json")):
            return message.format(dir=data_dir())
        try:
            builder = tfds.builder("cifar10", data_dir=data_dir())
            if builder.is_prepared():
                return None
        except Exception as error:  # noqa: BLE001 - any failure means "not usable here"
            return f"{message.format(dir=data_dir())}\n({type(error).__name__}: {error})"
        return message.format(dir=data_dir())

    def make_data(self, seed, reduced=False):
        import tensorflow_datasets as tfds
        splits = ("train", "test")
        if reduced:
            splits = (f"train[:{self.reduced['train_examples']}]",
                      f"test[:{self.reduced['test_examples']}]")
        train, test = tfds.load("cifar10", split=list(splits), as_supervised=True,
                                data_dir=data_dir(), download=False, shuffle_files=False)
        batch_size = self.reduced["batch_size"] if reduced else self.batch_size
        train, test, steps = make_pipelines(train, test, seed, batch_size)
        # One pass over `train` is one epoch (a new shuffle and augmentation each time).
        return TaskData(train=train, eval=test, steps_per_epoch=steps,
                        info={"batches_per_epoch": steps, "batch_size": batch_size})

    def make_model(self, seed, reduced=False):
        import keras
        keras.utils.set_random_seed(seed)
        width = self.reduced["width"] if reduced else 64
        return resnet18(width=width)

    def loss(self):
        import keras
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def evaluate(self, model, data):
        import numpy as np
        correct = total = 0
        for images, labels in data.eval:
            logits = model(images, training=False)
            predicted = np.argmax(np.asarray(logits, dtype=np.float32), axis=-1)
            correct += int(np.sum(predicted == labels.numpy()))
            total += int(labels.shape[0])
        return correct / max(total, 1)


TASK = ResNetCifar10(
    name="resnet_cifar10",
    summary="ResNet-18 on CIFAR-10 (tfds; needs the prepared dataset), SGD momentum",
    paper_application="image classification: ResNet-18 on CIFAR-10",
    metric="test accuracy",
    higher_is_better=True,
    optimizer="sgd",
    learning_rate=0.1,
    epochs=30,
    batch_size=128,
    reduced={"epochs": 1, "batch_size": 16, "width": 8,
             "train_examples": 64, "test_examples": 32},
    requires=("tensorflow_datasets",),
)
