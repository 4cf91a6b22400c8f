"""The text and recurrent tasks of `python -m tf_bf16 compare` (reduced configs).

transformer_lm, recurrent, bert: deterministic data per seed, pure-bf16
models under the strict policy, a few Kahan-rounded fit steps that lower the
loss, and a finite metric.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_bf16
from tf_bf16.lab.tasks import all_tasks, corpus

pytestmark = pytest.mark.lab

NAMES = ("transformer_lm", "recurrent", "bert")


@pytest.fixture
def bf16_policy():
    tf_bf16.set_policy()
    yield
    tf_bf16.reset_policy()


def first_batches(train, n, batch_size=16):
    """The first n (x, y) batches of a task's training data (dataset or arrays)."""
    if isinstance(train, (tuple, list)):
        x, y = train
        return [(x[i:i + batch_size], y[i:i + batch_size])
                for i in range(0, min(len(x), n * batch_size), batch_size)]
    return [tf.nest.map_structure(lambda t: t.numpy(), b) for b in train.take(n)]


def assert_structures_equal(a, b):
    for x, y in zip(tf.nest.flatten(a), tf.nest.flatten(b)):
        np.testing.assert_array_equal(x, y)


def make_optimizer(task, seed=0):
    kwargs = dict(getattr(task, "optimizer_kwargs", None) or {})
    kwargs.update(learning_rate=task.learning_rate, rounding="kahan", seed=seed)
    if task.optimizer == "sgd":
        kwargs.setdefault("momentum", 0.9)
    classes = {"sgd": tf_bf16.optimizers.SGD, "adam": tf_bf16.optimizers.Adam,
               "adamw": tf_bf16.optimizers.AdamW}
    return classes[task.optimizer](**kwargs)


def test_tasks_are_discovered():
    tasks = all_tasks()
    for name in NAMES:
        assert name in tasks
        task = tasks[name]
        assert task.summary and task.paper_application and task.metric
        assert task.available() is None


def test_corpus_is_fixed_and_split_by_file():
    train, held = corpus.split_files()
    assert held and train and not set(train) & set(held)
    assert list(train + held) != [] and sorted(train + held) == list(corpus.stdlib_files())
    ids = corpus.encoded_corpus(held)
    assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < corpus.VOCAB_SIZE


@pytest.mark.parametrize("name", NAMES)
def test_data_is_deterministic_per_seed(name):
    task = all_tasks()[name]
    a, b, c = (task.make_data(seed, reduced=True) for seed in (0, 0, 1))
    assert_structures_equal(first_batches(a.train, 3), first_batches(b.train, 3))
    assert_structures_equal(a.eval, b.eval)
    differs = any(not np.array_equal(x, y) for x, y in zip(
        tf.nest.flatten(first_batches(a.train, 1)), tf.nest.flatten(first_batches(c.train, 1))))
    assert differs, "seed 1 gives the same training batches as seed 0"


@pytest.mark.parametrize("name", NAMES)
def test_reduced_task_trains_in_pure_bf16(name, bf16_policy):
    task = all_tasks()[name]
    keras.utils.set_random_seed(0)
    data = task.make_data(0, reduced=True)
    model = task.make_model(0, reduced=True)
    floats = [v for v in model.variables if "float" in keras.backend.standardize_dtype(v.dtype)]
    assert floats
    wide = [v.path for v in floats if keras.backend.standardize_dtype(v.dtype) != "bfloat16"]
    assert not wide, f"non-bf16 variables: {wide}"
    tf_bf16.check_model(model)

    model.compile(optimizer=make_optimizer(task), loss=task.loss())
    batches = first_batches(data.train, 8)
    if name == "bert":
        # The pre-training (MLM) batches come first.
        assert np.all(batches[0][1]["cls"] == -1) and np.any(batches[0][1]["mlm"] >= 0)
    x0, y0 = batches[0]
    before = float(model.evaluate(x0, y0, verbose=0, return_dict=True)["loss"])
    for _ in range(3):
        for x, y in batches[:4]:
            model.train_on_batch(x, y)
    after = float(model.evaluate(x0, y0, verbose=0, return_dict=True)["loss"])
    assert math.isfinite(before) and math.isfinite(after)
    assert after < before, f"{name}: loss {before} -> {after}"
    for v in model.trainable_variables:
        assert keras.backend.standardize_dtype(v.dtype) == "bfloat16"
    metric = task.evaluate(model, data)
    assert math.isfinite(metric)


def test_bert_fine_tuning_batches_follow_pre_training():
    task = all_tasks()["bert"]
    data = task.make_data(0, reduced=True)
    batches = first_batches(data.train, data.steps_per_epoch + 1)
    assert len(batches) == data.steps_per_epoch
    last_x, last_y = batches[-1]
    assert np.all(last_y["mlm"] == -1) and np.all(last_y["cls"] >= 0)
    from tf_bf16.lab.tasks import bert
    assert not np.any(last_x == bert.MASK)  # no [MASK] in fine-tuning inputs
    assert 0 < data.info["majority_baseline"] < 1


def test_recurrent_words_need_frame_order():
    from tf_bf16.lab.tasks import recurrent
    _, _, words = recurrent.language()
    assert len(words) == recurrent.WORDS
    half = recurrent.WORDS // 2
    for i in range(half):
        assert words[i + half] == words[i][::-1]
