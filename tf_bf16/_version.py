"""The version of tf_bf16, defined here only: setup.py reads this file (without
importing the package, which needs TensorFlow) and tf_bf16.__version__ is this."""

__version__ = "0.1.0"
