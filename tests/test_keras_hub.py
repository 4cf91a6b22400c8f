"""keras-hub models under tf_bf16, unchanged: examples/keras_hub_gpt2.py.

keras-hub is an optional extra of tf_bf16, but `make test` installs it, so a
missing keras-hub fails here rather than skipping. Nothing is downloaded: the
preset test writes its own preset directory (`save_to_preset` of a small
float32 GPT-2) and loads it back.
"""

import argparse
import importlib.util
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_bf16

from conftest import assert_bits_equal, fresh_global_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import keras_hub  # noqa: E402  a missing keras-hub is an error, not a skip

restore_global_state = fresh_global_state(11)

TINY = ["--steps", "60", "--batch-size", "16", "--length", "32", "--layers", "2",
        "--heads", "2", "--hidden", "32", "--corpus-bytes", "120000"]


def load_example():
    spec = importlib.util.spec_from_file_location(
        "keras_hub_gpt2", os.path.join(ROOT, "examples", "keras_hub_gpt2.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unigram_entropy(tokens):
    counts = np.bincount(tokens, minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def loss_went_down(example, before, after):
    """The held-out loss starts at ln(256) (a random initialization predicts
    nearly uniform bytes) and must end below the corpus's byte-unigram entropy,
    the loss of a model that learned nothing but byte frequencies."""
    tokens = example.stdlib_bytes(120_000)
    assert abs(before["loss"] - math.log(256)) < 0.1, before
    assert after["loss"] < unigram_entropy(tokens[:int(0.9 * len(tokens))]), after


def test_random_init_gpt2_trains_with_the_three_lines(capsys):
    example = load_example()
    before, after, report = example.main(TINY)
    loss_went_down(example, before, after)
    out = capsys.readouterr().out
    assert "preset part (float32 weights cast to bf16) is skipped" in out
    assert "weight and optimizer-state dtypes: ['bfloat16']" in out
    # The audit's summary: one screen, transformer blocks told apart by path.
    summary = report.to_text(detail="summary")
    assert summary in out and len(summary.splitlines()) <= 50
    assert "5 LayerNormalization layers" in report.summary
    groups = {r.group for r in report.float_ops if r.group_class == "LayerNormalization"}
    assert {"gpt2_backbone/transformer_layer_0/self_attention_layer_norm",
            "gpt2_backbone/transformer_layer_1/self_attention_layer_norm"} <= groups
    assert report.bytes_per_parameter == 8.0


def save_float32_preset(path):
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(4)
    backbone = keras_hub.models.GPT2Backbone(vocabulary_size=256, num_layers=2, num_heads=2,
                                             hidden_dim=32, intermediate_dim=128,
                                             max_sequence_length=32)
    backbone.save_to_preset(str(path))
    return backbone


def test_preset_float32_weights_are_cast_to_bf16_and_fine_tuned(tmp_path, capsys):
    saved = save_float32_preset(tmp_path / "preset")
    example = load_example()
    tf_bf16.set_policy()
    args = argparse.Namespace(preset=str(tmp_path / "preset"))
    model, tokenizer = example.build_model(args, keras_hub)
    assert tokenizer is None    # this preset has no tokenizer.json: bytes are the tokens
    assert {str(v.dtype) for v in model.weights} == {"bfloat16"}
    for loaded, original in zip(model.backbone.weights, saved.weights):
        assert_bits_equal(loaded.value, tf.cast(original.value, tf.bfloat16), loaded.path)
    tf_bf16.reset_policy()

    before, after, _ = example.main(TINY + ["--preset", str(tmp_path / "preset")])
    assert "skipped" not in capsys.readouterr().out
    loss_went_down(example, before, after)
    with pytest.raises(SystemExit, match="does not download"):
        example.main(["--preset", "gpt2_base_en"])


def test_keras_hub_gpt2_exports_float32(tmp_path):
    tf_bf16.set_policy()
    backbone = keras_hub.models.GPT2Backbone(vocabulary_size=256, num_layers=1, num_heads=2,
                                             hidden_dim=16, intermediate_dim=32,
                                             max_sequence_length=16)
    model = keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)
    tokens = np.random.default_rng(0).integers(0, 256, (2, 16)).astype("int32")
    x = {"token_ids": tokens, "padding_mask": np.ones((2, 16), "int32")}
    predicted = model.predict(x, verbose=0)
    served = tf.saved_model.load(tf_bf16.export(model, str(tmp_path / "gpt2"), verbose=False))
    logits = served.serve({k: tf.constant(v) for k, v in x.items()})
    assert logits.dtype == tf.float32
    assert_bits_equal(logits, tf.cast(predicted, tf.float32), "serve vs predict")
