"""tf_bf16: pure-bfloat16 training for Keras and TensorFlow.

    import tf_bf16
    tf_bf16.set_policy()
    model.compile(optimizer=tf_bf16.optimizers.AdamW(1e-3), loss=...)
    model.fit(...)

``tf_bf16.ops`` holds the fused, in-place bf16 update ops (stochastic rounding
and Kahan summation); ``tf_bf16.reference`` a pure-TensorFlow implementation of
the same specification (docs/rounding.md); ``tf_bf16.losses`` the bf16
softmax cross-entropy; ``tf_bf16.audit(model)`` (package ``tf_bf16.auditing``)
reports what a training step still stores and computes in 32 bits;
``tf_bf16.compare(build_model, data)`` (module ``tf_bf16.comparing``) trains
your model in float32, mixed_bfloat16 and pure bf16 and compares them (it
imports the tools of ``tf_bf16.lab`` when called, not before);
``tf_bf16.export(model, path)`` writes a SavedModel with float32 outputs (or,
with ``format="litert"``, a TFLite model of a float32 copy). The compiled op
library is loaded on first use.

On Keras's JAX backend (``KERAS_BACKEND=jax``) the optimizers, the policy and
the audit's variable report work the same, computed by ``tf_bf16.jax_ops``
(the same specification in ``jax.numpy``, bit-identical); TensorFlow is not
imported, and ``tf_bf16.ops``, ``tf_bf16.reference`` and ``tf_bf16.losses``,
which are TensorFlow code, are not loaded. ``tf_bf16.backend`` is where the
choice is made.
"""

from tf_bf16._version import __version__  # noqa: F401

import importlib  # noqa: E402

from tf_bf16 import backend  # noqa: E402,F401
from tf_bf16 import optimizers  # noqa: E402,F401
from tf_bf16._loader import OpLibraryError  # noqa: E402,F401
from tf_bf16._spec import ROUNDINGS  # noqa: E402,F401
from tf_bf16.policy import StrictPolicyError  # noqa: E402,F401
from tf_bf16.policy import check_model  # noqa: E402,F401
from tf_bf16.policy import keep_float32  # noqa: E402,F401
from tf_bf16.policy import moving_statistics_step  # noqa: E402,F401
from tf_bf16.policy import prepare_model  # noqa: E402,F401
from tf_bf16.policy import reset_policy  # noqa: E402,F401
from tf_bf16.policy import set_policy  # noqa: E402,F401
from tf_bf16.auditing import AuditReport  # noqa: E402,F401
from tf_bf16.auditing import audit  # noqa: E402,F401
from tf_bf16.comparing import compare  # noqa: E402,F401
from tf_bf16.serving import export  # noqa: E402,F401
from tf_bf16.serving import float32_copy  # noqa: E402,F401

if backend.NAME == "tensorflow":
    from tf_bf16 import losses  # noqa: E402,F401
    from tf_bf16 import ops  # noqa: E402,F401

_TENSORFLOW_ONLY = ("ops", "reference", "losses")


def __getattr__(name):
    # Reached only for names not imported above. The TensorFlow-only modules
    # load on first use on TensorFlow; on JAX they are refused (an explicit
    # `import tf_bf16.ops` still loads them where TensorFlow is installed).
    if name in _TENSORFLOW_ONLY and backend.NAME == "tensorflow":
        return importlib.import_module(f"tf_bf16.{name}")
    if name in _TENSORFLOW_ONLY:
        raise AttributeError(
            f"tf_bf16.{name} is TensorFlow code and is not loaded on Keras's "
            f"{backend.NAME!r} backend. On JAX, tf_bf16.jax_ops holds the same update "
            f"functions; `import tf_bf16.{name}` loads it anyway (TensorFlow required).")
    raise AttributeError(f"module 'tf_bf16' has no attribute {name!r}")
