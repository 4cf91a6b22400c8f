"""A keras-hub GPT-2 trained in pure bfloat16 with the three lines, unchanged.

    tf_bf16.set_policy()                                         # every variable bf16
    model.compile(optimizer=tf_bf16.optimizers.AdamW(...), ...)  # SR/Kahan fused updates
    model.fit(...)

The model is keras-hub's own `GPT2CausalLM` (dict inputs `token_ids` and
`padding_mask`, its transformer decoder blocks, its reversible embedding),
trained on the Python standard library's source as bytes (a corpus present on
every machine: nothing is downloaded). It prints the held-out loss before and
after training and the audit's one-screen summary.

Two starts:

- random initialization of a small GPT-2 configuration (the default);
- `--preset DIR`: a keras-hub GPT-2 preset directory already on this machine
  (`config.json`, `model.weights.h5`, and `tokenizer.json` + vocabulary if the
  tokenizer should be used): its float32 weights are loaded into bf16
  variables (rounded to nearest) and fine-tuned. The example never downloads:
  a preset name such as `gpt2_base_en` is refused. On a machine with internet
  access, `keras_hub.models.GPT2CausalLM.from_preset("gpt2_base_en")` fetches
  and caches one; then pass that cached directory (or any `save_to_preset`
  output). Without `--preset` that part is skipped, saying so.

keras-hub is an optional extra of tf_bf16 (the `keras-hub` extra; with Keras
3.15.1 and TensorFlow 2.21: `pip install --no-deps keras-hub==0.32.0` and
`pip install tokenizers sentencepiece regex`, since its `tensorflow-text`
dependency would install the full `tensorflow` wheel beside `tensorflow-cpu`).

    python examples/keras_hub_gpt2.py [--steps 300] [--layers 2] [--preset DIR]
"""

import argparse
import glob
import os
import sys
import sysconfig

import keras
import numpy as np

import tf_bf16


def stdlib_bytes(limit):
    """The first `limit` bytes of the standard library's .py files, in sorted order."""
    chunks, total = [], 0
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        with open(path, "rb") as f:
            chunks.append(f.read())
        total += len(chunks[-1])
        if total >= limit:
            break
    return np.frombuffer(b"".join(chunks)[:limit], dtype=np.uint8)


def windows(tokens, length, count, rng):
    """`count` random windows of `length + 1` tokens: inputs and next-token targets."""
    starts = rng.integers(0, len(tokens) - length - 1, count)
    rows = np.stack([tokens[s:s + length + 1] for s in starts]).astype("int32")
    x = {"token_ids": rows[:, :-1], "padding_mask": np.ones((count, length), "int32")}
    return x, rows[:, 1:]


def build_model(args, keras_hub):
    if args.preset is None:
        backbone = keras_hub.models.GPT2Backbone(
            vocabulary_size=256, num_layers=args.layers, num_heads=args.heads,
            hidden_dim=args.hidden, intermediate_dim=4 * args.hidden,
            max_sequence_length=args.length)
        return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None), None
    # float32 weights from the preset, cast to the bf16 variables the policy creates.
    backbone = keras_hub.models.GPT2Backbone.from_preset(args.preset, dtype="bfloat16")
    tokenizer = None
    if os.path.exists(os.path.join(args.preset, "tokenizer.json")):
        tokenizer = keras_hub.models.GPT2Tokenizer.from_preset(args.preset)
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None), tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--corpus-bytes", type=int, default=400_000)
    parser.add_argument("--preset", metavar="DIR",
                        help="a keras-hub GPT-2 preset directory on this machine (no download)")
    args = parser.parse_args(argv)

    try:
        import keras_hub
    except ImportError:
        sys.exit("keras-hub is not installed: pip install --no-deps keras-hub==0.32.0 && "
                 "pip install tokenizers sentencepiece regex")
    if args.preset is None:
        print("No --preset: random initialization of a small GPT-2 configuration. The "
              "preset part (float32 weights cast to bf16) is skipped; give --preset DIR "
              "with a keras-hub GPT-2 preset already on this machine to run it.")
    elif not os.path.isdir(args.preset):
        sys.exit(f"--preset {args.preset!r} is not a directory on this machine; this example "
                 "does not download presets (see its docstring for how to get one).")

    tf_bf16.set_policy()                                      # 1. all-bf16
    keras.utils.set_random_seed(0)
    model, tokenizer = build_model(args, keras_hub)
    model.compile(                                            # 2. a tf_bf16 optimizer
        optimizer=tf_bf16.optimizers.AdamW(args.learning_rate, weight_decay=0.01, seed=0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    text = stdlib_bytes(args.corpus_bytes)
    tokens = (np.asarray(tokenizer(text.tobytes().decode("utf-8", "replace")))
              if tokenizer is not None else text)
    split = int(0.9 * len(tokens))
    rng = np.random.default_rng(0)
    x_train, y_train = windows(tokens[:split], args.length, args.steps * args.batch_size, rng)
    x_test, y_test = windows(tokens[split:], args.length, 8 * args.batch_size, rng)

    def held_out():
        return model.evaluate(x_test, y_test, batch_size=args.batch_size, verbose=0,
                              return_dict=True)

    before = held_out()
    model.fit(x_train, y_train, batch_size=args.batch_size, epochs=1, shuffle=False,
              verbose=0)                                      # 3. train (windows are random)
    after = held_out()

    dtypes = sorted({str(v.dtype) for v in model.trainable_variables + model.optimizer.variables
                     if len(v.shape) > 0})
    print(f"GPT2CausalLM, {model.count_params():,} parameters, {args.steps} steps of "
          f"{args.batch_size} x {args.length} tokens")
    print(f"weight and optimizer-state dtypes: {dtypes}")
    accuracy = [k for k in after if "accuracy" in k]   # keras-hub's default weighted metric
    print(f"held-out loss: {before['loss']:.4f} before training, {after['loss']:.4f} after "
          f"({after['loss'] / np.log(2):.3f} bits/token)" + "".join(
              f"; {k} {before[k]:.3f} -> {after[k]:.3f}" for k in accuracy))
    report = tf_bf16.audit(model, x_test, y_test, batch_size=args.batch_size)
    print(report.to_text(detail="summary"))
    return before, after, report


if __name__ == "__main__":
    main()
