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
"""

from tf_bf16._version import __version__  # noqa: F401

from tf_bf16 import losses  # noqa: E402,F401
from tf_bf16 import ops  # noqa: E402,F401
from tf_bf16 import optimizers  # noqa: E402,F401
from tf_bf16._args import ROUNDINGS  # noqa: E402,F401
from tf_bf16._loader import OpLibraryError  # noqa: E402,F401
from tf_bf16.policy import StrictPolicyError  # noqa: E402,F401
from tf_bf16.policy import check_model  # noqa: E402,F401
from tf_bf16.policy import keep_float32  # noqa: E402,F401
from tf_bf16.policy import prepare_model  # noqa: E402,F401
from tf_bf16.policy import reset_policy  # noqa: E402,F401
from tf_bf16.policy import set_policy  # noqa: E402,F401
from tf_bf16.auditing import AuditReport  # noqa: E402,F401
from tf_bf16.auditing import audit  # noqa: E402,F401
from tf_bf16.comparing import compare  # noqa: E402,F401
from tf_bf16.serving import export  # noqa: E402,F401
from tf_bf16.serving import float32_copy  # noqa: E402,F401
