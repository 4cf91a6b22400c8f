"""tf_bf16: pure-bfloat16 training for Keras and TensorFlow."""
