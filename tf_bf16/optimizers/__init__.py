"""Keras 3 optimizers for pure-bfloat16 training (TensorFlow and JAX backends).

Drop-in replacements for their Keras namesakes with two more arguments,
`rounding` ("kahan" by default, "stochastic", "nearest") and `seed`.
"""

from tf_bf16.optimizers.adam import Adam
from tf_bf16.optimizers.adamw import AdamW
from tf_bf16.optimizers.lion import Lion
from tf_bf16.optimizers.sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "Lion"]
