"""The constants of docs/rounding.md, importable without TensorFlow or JAX.

One definition for every implementation: the TensorFlow ops and their
reference (tf_bf16.ops, tf_bf16.reference), the JAX functions
(tf_bf16.jax_ops) and the Keras integration (tf_bf16.optimizers,
tf_bf16.policy). Not here: any arithmetic.
"""

# How a bf16 result is rounded (docs/rounding.md): round to nearest even, stochastic
# rounding, or round to nearest with a Kahan compensation buffer.
ROUNDINGS = ("nearest", "stochastic", "kahan")

# Section 3: the stream key's initial value and final word, and the odd
# constant C of an element's second hash h1 = Mix32(h0 ^ C).
STREAM_KEY_INIT = 0x6A09E667
STREAM_KEY_FINAL_WORD = 0
SECOND_HASH_CONSTANT = 0x9E3779B9

# Section 2: the canonical quiet NaN of every stored result.
CANONICAL_NAN_BF16 = 0x7FC0
CANONICAL_NAN_FLOAT32 = 0x7FC00000

# Section 6: var_id offsets of the Keras integration's streams. Weight i of an
# optimizer uses var_id i; its EMA copy i + EMA_STREAM, its gradient
# accumulator i + GRADIENT_ACCUMULATOR_STREAM; BatchNormalization statistics
# MOVING_STATISTICS_STREAM + the statistic's position in model.variables.
EMA_STREAM = 1 << 32
GRADIENT_ACCUMULATOR_STREAM = 2 << 32
MOVING_STATISTICS_STREAM = 1 << 62
