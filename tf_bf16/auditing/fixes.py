"""The audit's fix catalogue: per finding, whether a sound 16-bit fix exists.

Each finding of the inventory and the trace (float32 per-parameter state, a
layer, loss or optimizer computing in float32, metric updates, the fused
updates' float32 registers) becomes a `FixRow` whose `sound` is "yes" (and
`how` enables the fix), "no" (and `how` says why none is sound), "depends" or
"n/a". The same finding in several groups (every LayerNormalization of a
transformer) is one row listing the groups, so each fix is said once. The one fix implemented in tf_bf16 itself is `tf_bf16.losses.bf16_loss`.

Not here: finding the ops (trace.py) and the variables (inventory.py).
"""

import keras

from tf_bf16 import optimizers as _optimizers
from tf_bf16.auditing.inventory import dtype_name
from tf_bf16.auditing.inventory import layer_paths
from tf_bf16.auditing.report import FUSED_OP_PREFIX
from tf_bf16.auditing.report import KIND_LOSS
from tf_bf16.auditing.report import KIND_METRIC
from tf_bf16.auditing.report import KIND_OPTIMIZER
from tf_bf16.auditing.report import PHASE_METRICS
from tf_bf16.auditing.report import ROLE_KAHAN
from tf_bf16.auditing.report import ROLE_SLOT
from tf_bf16.auditing.report import ROLE_STATISTIC
from tf_bf16.auditing.report import ROLE_TRAINABLE
from tf_bf16.auditing.report import WIDE_FLOAT_DTYPES
from tf_bf16.auditing.report import FixRow
from tf_bf16.auditing.report import merge_fixes

_NORMALIZATION_CLASSES = ("BatchNormalization", "LayerNormalization", "GroupNormalization",
                          "RMSNormalization", "UnitNormalization", "SpectralNormalization")

# The optimizers tf_bf16 has a fused update for.
_TF_BF16_OPTIMIZERS = tuple(_optimizers.__all__)


def fix_rows(model, optimizer, loss, variables, float_ops, fused_ops):
    """The `FixRow`s: one per finding of the inventory and the trace."""
    fixes = []
    wide_state = [r for r in variables if r.dtype in WIDE_FLOAT_DTYPES
                  and r.role in (ROLE_TRAINABLE, ROLE_STATISTIC, ROLE_SLOT, ROLE_KAHAN)]
    if wide_state:
        owners = sorted({r.owner for r in wide_state})
        fixes.append(FixRow(
            "float32/float64 per-parameter state ("
            f"{sum(r.bytes for r in wide_state):,} B)", ", ".join(owners), "yes",
            "Build the model under tf_bf16.set_policy() and train with a tf_bf16 optimizer "
            "(rounding='stochastic' or 'kahan'): updates below half a bf16 ulp are kept "
            "unbiasedly or compensated, and BatchNormalization moving statistics are stored "
            "with stochastic rounding. Weights kept float32 on purpose: "
            "tf_bf16.keep_float32(layer)."))

    seen_groups = set()
    for row in float_ops:
        if row.phase == PHASE_METRICS or row.scalar_only or row.elements == 0:
            continue
        key = (row.group, row.group_class, row.kind)
        if key in seen_groups:
            continue
        seen_groups.add(key)
        fixes.append(_group_fix(model, optimizer, loss, *key))

    scalar_groups = sorted({r.group for r in float_ops if r.scalar_only
                            and r.phase != PHASE_METRICS} - {g for g, _, _ in seen_groups})
    if scalar_groups:
        fixes.append(FixRow(
            "scalar float32 arithmetic (learning rate, bias correction, loss total)",
            ", ".join(scalar_groups), "n/a",
            "One number per op and step: no per-element cost. Keras casts the total loss "
            "to floatx for its loss tracker; schedules and Adam's bias correction need "
            "float32 (0.999**t is 1.0 in bf16)."))
    if any(r.kind == KIND_METRIC for r in float_ops):
        fixes.append(FixRow(
            "metric updates in float32", "metrics", "n/a",
            "Metric accumulators (Keras's loss tracker, compiled metrics) are float32 by "
            "design: a bf16 running total stalls after 256 equal increments; under "
            "tf_bf16.set_policy() compiled metrics also compute on float32 casts of the "
            "predictions. They are not training math and are left out of the percentage."))
    for row in fused_ops:
        if row.op_type == f"{FUSED_OP_PREFIX}StochasticRound":
            how = ("By design: Keras computes the moving-statistics update in float32 and "
                   "tf_bf16 stores it with one stochastic rounding; rounded to nearest in "
                   "bf16 the (1 - momentum) step vanishes and the statistics stall.")
        else:
            how = ("By design: rounding the exact float32 result once (stochastically or "
                   "with a Kahan buffer) is what keeps small updates; a 16-bit-only update "
                   "rounds every partial result to nearest and loses increments below half "
                   "an ulp (the failure tf_bf16 exists to fix). Storage stays bf16.")
        fixes.append(FixRow(f"{row.op_type}: float32 registers", row.group, "no", how))
    if not fixes:
        fixes.append(FixRow("nothing in float32", "-", "n/a", "No finding."))
    return merge_fixes(fixes)


def _group_fix(model, optimizer, loss, group, class_name, kind):
    finding = f"{class_name or group} computes in float32"
    if kind == KIND_LOSS:
        sound, how = _loss_fix(model, loss, group[len("loss: "):])
        return FixRow("loss computed in float32 (Keras losses cast y_pred to floatx)", group,
                      sound, how)
    if kind == KIND_OPTIMIZER:
        name = type(optimizer).__name__
        if type(optimizer).__module__.startswith("tf_bf16"):
            if any(dtype_name(v.dtype) in WIDE_FLOAT_DTYPES
                   for v in model.trainable_variables):
                return FixRow("optimizer arithmetic on float32 weights", group, "yes",
                              "Build the model in bf16 (tf_bf16.set_policy()): the fused "
                              "update then keeps bf16 weights with stochastic rounding or "
                              "Kahan summation.")
            return FixRow(
                "gradients converted to float32 before the fused update", group, "no",
                "tf_bf16 optimizers densify sparse gradients (IndexedSlices, e.g. from "
                "Embedding) in float32 (tf_bf16.optimizers.base.dense_gradient) and, "
                "without momentum, sum duplicate rows in float32. No option changes that "
                "today; summing duplicate rows in bf16 would round every partial sum. Its "
                "cost is one float32 temporary of the table's size per step, no state.")
        if name in _TF_BF16_OPTIMIZERS:
            return FixRow("optimizer update in float32 ops", group, "yes",
                          f"Use tf_bf16.optimizers.{name}(rounding='stochastic' or 'kahan') "
                          "on bf16 weights: one fused op per variable, bf16 storage.")
        return FixRow("optimizer update in float32 ops", group, "no",
                      f"tf_bf16 has no fused {name}; a stock Keras update on bf16 state "
                      "rounds to nearest and loses small updates (Adam's beta_2=0.999 is "
                      "1.0 in bf16).")
    if class_name == "BatchNormalization":
        return FixRow(finding + " (batch statistics, normalization, moving statistics)",
                      group, "no",
                      "Keras upcasts BatchNormalization to float32. Batch mean/variance in "
                      "bf16 are not sound: x - mean cancels when |mean| >> std (the mean's "
                      "rounding error |mean|*2^-8 swamps small deviations) and the variance "
                      "of low-variance channels collapses. Kept in float32; its moving "
                      "statistics are stored in bf16 with stochastic rounding under "
                      "tf_bf16.set_policy().")
    if class_name in _NORMALIZATION_CLASSES:
        return FixRow(finding + " (statistics and normalization)", group, "no",
                      "Normalization statistics in bf16 are not sound: for a row of H "
                      "features the mean's rounding error (|mean|*2^-8) and the "
                      "cancellation in x - mean grow with the activations' offset, and "
                      "for large hidden sizes (H in the thousands, residual streams with "
                      "large offsets) the normalized output loses most of its bits. "
                      "Kept in float32.")
    layer = _find_layer(model, group)
    if layer is not None and any(dtype_name(v.dtype) in WIDE_FLOAT_DTYPES
                                 for v in layer.weights):
        return FixRow(f"{class_name} has float32 weights (their gradients are upcast to "
                      "float32 and they are read through casts)", group, "yes",
                      "Store them in bf16: build the layer under tf_bf16.set_policy() and "
                      "train with a tf_bf16 optimizer (stochastic rounding or Kahan keeps "
                      "the small updates that float32 master weights exist to keep).")
    compute_dtype = getattr(layer, "compute_dtype", None)
    if compute_dtype in WIDE_FLOAT_DTYPES:
        return FixRow(finding + f" (its dtype policy computes in {compute_dtype})", group,
                      "depends",
                      "Create the layer under tf_bf16.set_policy() (or dtype='bfloat16'); "
                      "whether bf16 is sound depends on the layer: matmul/conv/elementwise "
                      "layers are, normalizations and long reductions are not. It may be "
                      "float32 on purpose (tf_bf16.keep_float32).")
    return FixRow(finding, group, "no",
                  "No sound 16-bit replacement known to this audit: the layer upcasts "
                  "internally; check its numerics before forcing bf16.")


def _loss_scope_name(loss):
    if isinstance(loss, str):
        return loss
    if isinstance(loss, keras.losses.Loss):
        return loss.name
    return getattr(loss, "__name__", None)


def _loss_fix(model, loss, loss_name):
    # Only for a traced step, which exists on the TensorFlow backend only.
    from tf_bf16.auditing.trace import compiled_losses
    from tf_bf16.losses import BFloat16SoftmaxCrossEntropy
    from tf_bf16.losses import bf16_loss

    losses = compiled_losses(model, loss)
    # The loss behind this group: same scope name, or the only one there is.
    matching = [item for item in losses if _loss_scope_name(item) == loss_name]
    losses = matching or (losses if len(losses) == 1 else [])
    if any(isinstance(item, BFloat16SoftmaxCrossEntropy) for item in losses):
        return ("depends", "Already bf16_loss; float32 ops left here are the scalar total that "
                "Keras casts to floatx, or another output's loss.")
    for item in losses:
        try:
            bf16_loss(item)
        except (TypeError, ValueError) as refusal:
            reason = str(refusal)
            continue
        what = type(item).__name__ if isinstance(item, keras.losses.Loss) else repr(item)
        return ("yes", "model.compile(loss=tf_bf16.losses.bf16_loss(loss)) with loss = your "
                f"{what}: softmax cross-entropy on logits in bf16 "
                "with a cancellation-free gradient (see bf16_loss's docstring).")
    return ("no", reason if losses else "Could not tell which compiled loss this is; "
            "bf16_loss covers softmax cross-entropy on logits only.")


def _find_layer(model, path):
    """The layer whose path in `model` (the group's name) is `path`."""
    paths = layer_paths(model)
    for layer in model._flatten_layers(include_self=True):
        if paths.get(id(layer)) == path:
            return layer
    return None


def standing_notes(traced):
    """Caveats every traced audit carries."""
    notes = []
    if traced:
        notes.append("The step is traced, not run. Kernel-internal accumulation is not "
                     "visible: bf16 MatMul/Conv/Sum kernels may accumulate in float32 "
                     "inside, as bf16 hardware does; they count as bf16.")
    return notes
