"""tf_bf16: pure-bfloat16 training for Keras and TensorFlow.

``tf_bf16.ops`` holds the fused, in-place bf16 update ops (stochastic rounding
and Kahan summation); ``tf_bf16.reference`` a pure-TensorFlow implementation of
the same specification (docs/rounding.md). The compiled op library is loaded
on first use.
"""

__version__ = "0.1.0"

from tf_bf16 import ops  # noqa: E402,F401
from tf_bf16._loader import OpLibraryError  # noqa: E402,F401
