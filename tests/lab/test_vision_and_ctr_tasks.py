"""The resnet_cifar10 and dlrm tasks of `python -m tf_bf16 compare`.

ResNet-18's tfds pipeline runs on `tfds.testing.mock_data` (nothing is
downloaded); the DLRM task on its reduced synthetic click logs.
"""

import tempfile

import keras
import numpy as np
import pytest
import sklearn.metrics
import tensorflow as tf
import tensorflow_datasets as tfds

import tf_bf16
from tf_bf16.lab import runner
from tf_bf16.lab.tasks import dlrm, resnet_cifar10

pytestmark = pytest.mark.lab


@pytest.fixture(autouse=True)
def restore_global_state():
    tf_bf16.reset_policy()
    yield
    tf_bf16.reset_policy()


@pytest.fixture
def empty_tfds_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tensorflow_datasets"))
    # tfds's DatasetInfo makes a tempfile.mkdtemp("tfds") it never removes:
    # keep those under pytest's tmp_path instead of /tmp.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    return tmp_path / "tensorflow_datasets"


def _per_parameter_dtypes(model):
    variables = list(model.variables) + list(model.optimizer.variables)
    return {keras.backend.standardize_dtype(v.dtype) for v in variables if len(v.shape) > 0}


def _fit_steps(task, model, data, rounding, steps):
    optimizer_class = {"sgd": tf_bf16.optimizers.SGD, "adam": tf_bf16.optimizers.Adam}
    kwargs = {"momentum": 0.9} if task.optimizer == "sgd" else {}
    model.compile(optimizer=optimizer_class[task.optimizer](
        task.learning_rate, rounding=rounding, seed=0, **kwargs), loss=task.loss())
    before = [v.numpy().copy() for v in model.trainable_variables]
    history = model.fit(data.train.take(steps), epochs=1, verbose=0)
    changed = [not np.array_equal(b, v.numpy()) for b, v in zip(before, model.trainable_variables)]
    return history.history["loss"][-1], changed


# ---------------------------------------------------------------------------
# ResNet-18 / CIFAR-10


def test_resnet18_is_the_cifar_variant():
    model = resnet_cifar10.resnet18()
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert convs[0].kernel_size == (3, 3) and convs[0].strides == (1, 1)
    # stem + 8 BasicBlocks x 2 convs + 3 projection shortcuts; a BN after each conv
    assert len(convs) == 20 and len(norms) == 20
    assert sorted({c.filters for c in convs}) == [64, 128, 256, 512]
    assert model.output_shape == (None, 10)
    assert 11.1e6 < model.count_params() < 11.3e6
    assert not any(isinstance(layer, keras.layers.MaxPooling2D) for layer in model.layers)


def test_resnet_unavailable_without_prepared_cifar10(empty_tfds_dir):
    message = resnet_cifar10.TASK.available()
    assert message is not None
    assert str(empty_tfds_dir) in message
    assert "tfds.load('cifar10')" in message and "TFDS_DATA_DIR" in message
    assert not empty_tfds_dir.exists() or not any(empty_tfds_dir.iterdir()), "must not download"


def test_resnet_pipeline_and_training_on_mock_cifar10(empty_tfds_dir):
    task = resnet_cifar10.TASK
    tf_bf16.set_policy()
    with tfds.testing.mock_data(num_examples=48):
        data = task.make_data(seed=3, reduced=True)
        other = task.make_data(seed=4, reduced=True)
        batch = task.reduced["batch_size"]
        assert int(data.train.cardinality()) == data.steps_per_epoch == 48 // batch

        def first_batch(dataset, epoch):
            keras.utils.set_random_seed(epoch)  # what the runner does before every epoch
            return next(iter(dataset))

        images, labels = first_batch(data.train, 0)
        assert images.shape == (batch, 32, 32, 3) and images.dtype == tf.float32
        assert labels.dtype == tf.int64 and labels.shape == (batch,)
        # normalized: roughly zero-mean, unit-scale values, not 0..255
        assert -3.5 < float(tf.reduce_min(images)) and float(tf.reduce_max(images)) < 3.5
        # The same batches for the same seed and epoch, whatever was iterated before
        # (the variants share one TaskData); other ones for another epoch or seed.
        first_batch(data.train, 7)
        again, _ = first_batch(data.train, 0)
        np.testing.assert_array_equal(images.numpy(), again.numpy())
        epoch1, _ = first_batch(data.train, 1)
        assert not np.array_equal(images.numpy(), epoch1.numpy())
        other_seed, _ = first_batch(other.train, 0)
        assert not np.array_equal(images.numpy(), other_seed.numpy())
        # one epoch is one complete pass
        keras.utils.set_random_seed(0)
        assert sum(int(y.shape[0]) for _, y in data.train) == 48

        model = task.make_model(seed=3, reduced=True)
        loss, changed = _fit_steps(task, model, data, "stochastic", steps=2)
        assert np.isfinite(loss)
        assert all(changed)
        assert _per_parameter_dtypes(model) == {"bfloat16"}
        accuracy = task.evaluate(model, data)
        assert 0.0 <= accuracy <= 1.0


def test_resnet_through_the_compare_runner_on_mock_cifar10(empty_tfds_dir):
    """The runner trains the task from one shared TaskData, float32 and pure bf16."""
    from tf_bf16 import __main__ as cli
    task = resnet_cifar10.TASK
    args = cli.build_parser().parse_args(["compare", "--task", task.name, "--reduced"])
    cfg = runner.training_config(task, args)
    cfg["reduced"] = True
    with tfds.testing.mock_data(num_examples=16):
        results = runner.run_task(task, 0, ["float32", "stochastic"], cfg, progress=False)
    for variant, r in results.items():
        assert r["finite"] and r["steps"] == 1, (variant, r)
    assert set(results["stochastic"]["state_dtypes"]) == {"bfloat16"}


# ---------------------------------------------------------------------------
# DLRM


def test_dlrm_ground_truth_and_metrics():
    truth = dlrm.GroundTruth(dlrm.REDUCED_VOCAB_SIZES)
    dense, ids, clicks, p = truth.sample(np.random.default_rng(0), 20000)
    assert ids.shape == (20000, len(dlrm.REDUCED_VOCAB_SIZES))
    assert (ids >= 0).all() and (ids < np.array(dlrm.REDUCED_VOCAB_SIZES)).all()
    # Zipf: the most frequent id of the largest table is far above the median id's count
    counts = np.bincount(ids[:, 0], minlength=dlrm.REDUCED_VOCAB_SIZES[0])
    assert counts.max() > 50 * max(np.median(counts), 1)
    assert 0.1 < clicks.mean() < 0.5
    # the truth scores better than the constant predictor
    assert dlrm.log_loss(clicks, p) < dlrm.log_loss(clicks, np.full_like(p, clicks.mean()))
    assert dlrm.auc(clicks, p) == pytest.approx(sklearn.metrics.roc_auc_score(clicks, p))
    scores = np.round(p, 1)  # with ties
    assert dlrm.auc(clicks, scores) == pytest.approx(sklearn.metrics.roc_auc_score(clicks, scores))


def test_dlrm_data_is_fixed_per_seed():
    a = dlrm.TASK.make_data(seed=1, reduced=True)
    b = dlrm.TASK.make_data(seed=1, reduced=True)
    c = dlrm.TASK.make_data(seed=2, reduced=True)
    (xa, ya), (xb, yb), (xc, _) = (next(iter(d.train)) for d in (a, b, c))
    np.testing.assert_array_equal(xa["ids"].numpy(), xb["ids"].numpy())
    np.testing.assert_array_equal(ya.numpy(), yb.numpy())
    assert not np.array_equal(xa["ids"].numpy(), xc["ids"].numpy())
    assert a.info["ground_truth_log_loss"] < a.info["constant_log_loss"]


@pytest.mark.parametrize("rounding", ["nearest", "kahan"])
def test_dlrm_trains_in_pure_bf16(rounding):
    task = dlrm.TASK
    if rounding == "nearest":
        keras.config.set_dtype_policy("bfloat16")
    else:
        tf_bf16.set_policy()
    data = task.make_data(seed=0, reduced=True)
    model = task.make_model(seed=0, reduced=True)
    untrained = task.evaluate(model, data)
    loss, changed = _fit_steps(task, model, data, rounding, steps=20)
    assert np.isfinite(loss) and all(changed)
    assert _per_parameter_dtypes(model) == {"bfloat16"}
    tables = [layer for layer in model.layers if isinstance(layer, keras.layers.Embedding)]
    assert [t.input_dim for t in tables] == list(task.reduced["vocab_sizes"])
    trained = task.evaluate(model, data)
    assert np.isfinite(trained) and trained < untrained
    assert 0.0 <= task.evaluate_auc(model, data) <= 1.0


def test_task_fields():
    import pkgutil
    import tf_bf16.lab.tasks
    modules = {m.name for m in pkgutil.iter_modules(tf_bf16.lab.tasks.__path__)}
    for module in (resnet_cifar10, dlrm):
        task = module.TASK
        assert module.__name__.rsplit(".", 1)[1] in modules
        assert task.name and task.summary and task.paper_application and task.metric
        assert task.optimizer in ("sgd", "adam", "adamw")
    assert dlrm.TASK.available() is None
    assert not dlrm.TASK.higher_is_better and resnet_cifar10.TASK.higher_is_better
