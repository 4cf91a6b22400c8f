"""Serving a model trained in bfloat16: a SavedModel that returns float32, and
the route to TFLite.

- `export(model, path)` writes a SavedModel whose `serve` endpoint runs the
  model as trained (bf16 weights, bf16 compute) and returns its outputs cast
  to float32: many serving clients (TF Serving's JSON API, gRPC clients with
  float-only handling, TFLite-style consumers) cannot take bf16 tensors. The
  cast is exact (every bf16 value is a float32 value), so the float32 outputs
  are the bf16 outputs. `outputs="bfloat16"` gives what `model.export(path)`
  gives. The custom ops are not needed to serve (they only update weights).
- TFLite: the TFLite runtime has no bf16 kernels for MatMul and friends; a
  bf16 model converts only with TensorFlow "Flex" ops, which the standard
  interpreter refuses ("Select TensorFlow op(s) ... not supported",
  `ERROR_NEEDS_FLEX_OPS`). `export(model, "model.tflite", format="litert")`
  converts a float32 copy instead (`float32_copy`): the same bf16 weights,
  cast exactly to float32, computing in float32. Its outputs differ from the
  bf16 model's by the bf16 rounding of the activations that the copy no
  longer does; README ("Serving") gives the measured difference and
  tests/test_save_and_serve.py the bound derived from bf16's unit roundoff.

Not here: training, saving for resumed training (`model.save`, which needs
nothing from this module).
"""

import keras
import numpy as np
from keras.src import tree
from keras.src.export import export_utils

FORMATS = ("tf_saved_model", "litert")
OUTPUT_DTYPES = ("float32", "bfloat16")
_NARROW_POLICIES = ("bfloat16", "float16", "mixed_bfloat16", "mixed_float16")


def export(model, filepath, format="tf_saved_model", outputs="float32", verbose=True):
    """Exports a (bf16-trained) Keras model for serving, with float32 outputs.

    Args:
        model: a built Keras model.
        filepath: a directory for `format="tf_saved_model"`, a path ending in
            `.tflite` for `format="litert"`.
        format: `"tf_saved_model"`: the model as trained, in a SavedModel
            whose `serve` endpoint returns `outputs`. `"litert"`: a TFLite
            flatbuffer of `float32_copy(model)` (TFLite has no bf16 kernels);
            float32 in and out.
        outputs: `"float32"` (default): floating outputs cast to float32,
            exactly. `"bfloat16"`: as `model.export` (SavedModel only).
        verbose: print where the artifact was written.

    Returns:
        `filepath`.

    Example:

    ```python
    tf_bf16.export(model, "serving/")                  # float32 outputs
    served = tf.saved_model.load("serving/")
    served.serve(x)                                    # float32
    tf_bf16.export(model, "model.tflite", format="litert")
    ```
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}.")
    if outputs not in OUTPUT_DTYPES:
        raise ValueError(f"outputs must be one of {OUTPUT_DTYPES}, got {outputs!r}.")
    if not model.built:
        raise ValueError("export: the model is not built; call it on a batch (or fit) first.")
    filepath = str(filepath)
    if format == "litert":
        if outputs != "float32":
            raise ValueError("format='litert' serves a float32 copy of the model: its "
                             "outputs are float32 (TFLite has no bf16 kernels).")
        float32_copy(model).export(filepath, format="litert", verbose=verbose)
        return filepath

    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)
    signature = export_utils.get_input_signature(model)
    signature = tree.map_structure(export_utils.make_tf_tensor_spec, signature)

    def serve(*args):
        result = model(*args, training=False)
        return tree.map_structure(lambda t: _cast_float(t, outputs, tf), result)

    archive.add_endpoint("serve", serve, input_signature=signature)
    archive.write_out(filepath, verbose=verbose)
    return filepath


def _cast_float(tensor, dtype, tf):
    if tensor.dtype.is_floating and tensor.dtype != dtype:
        return tf.cast(tensor, dtype)
    return tensor


def float32_copy(model, dtype="float32"):
    """A copy of `model` whose layers store and compute in `dtype` (float32 by
    default, or float16), with the model's weights cast to it.

    Built from the model's config with every 16-bit dtype policy replaced by
    `dtype` (so custom and keras-hub layers that serialize their dtype work
    too), then given the weights: bf16 -> float32 is exact. The model itself is
    not changed. Use it where bf16 cannot go (TFLite, float-only runtimes).
    """
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}.")
    config = keras.saving.serialize_keras_object(model)
    config.pop("compile_config", None)   # a serving copy is not trained
    config = _with_dtype(config, dtype)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(dtype)
    try:
        copy = keras.saving.deserialize_keras_object(config)
    finally:
        keras.config.set_dtype_policy(previous)
    weights = model.get_weights()
    copy_weights = copy.get_weights()
    if [w.shape for w in weights] != [w.shape for w in copy_weights]:
        raise ValueError(f"float32_copy: the copy of '{model.name}' built from its config has "
                         "other weights than the model; the model's get_config does not "
                         "describe it completely.")
    copy.set_weights([np.asarray(w).astype(c.dtype) if np.issubdtype(c.dtype, np.floating)
                      else np.asarray(w) for w, c in zip(weights, copy_weights)])
    return copy


def _with_dtype(config, dtype):
    """The config with every 16-bit (or mixed) dtype policy replaced by `dtype`."""
    if isinstance(config, dict):
        if config.get("class_name") in ("DTypePolicy", "FloatDTypePolicy") and \
                config.get("config", {}).get("name") in _NARROW_POLICIES:
            return dict(config, config=dict(config["config"], name=dtype))
        return {key: (dtype if key == "dtype" and value in _NARROW_POLICIES
                      else _with_dtype(value, dtype)) for key, value in config.items()}
    if isinstance(config, list):
        return [_with_dtype(value, dtype) for value in config]
    return config
