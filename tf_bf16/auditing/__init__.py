"""What still runs, and what is still stored, in 32 bits: an audit of a training step.

`tf_bf16.audit(model, x, y, optimizer)` returns an `AuditReport`:

1. **Variables** (inventory.py): every variable that training touches (model
   weights, non-trainable statistics such as BatchNormalization's moving mean
   and variance, optimizer slots, Kahan buffers, bookkeeping such as the
   iteration counter and the learning rate, metric accumulators), with its
   owner (layer, optimizer or metric), role, dtype, shape and bytes; totals
   by dtype.
2. **Training-state bytes per parameter** (inventory.py): (bytes of the
   trainable weights + bytes of the per-parameter optimizer slots, Kahan
   buffers included) / number of trainable parameters.
3. **float32/float64 compute in the traced train step** (trace.py): one
   training step is traced with `tf.function` (not run) and every op of its
   graph that produces a float32/float64 tensor and is not plumbing is
   listed, grouped by the Keras layer (or loss, optimizer, metric) it belongs
   to, by phase (forward, backward, update, metrics) and by op type, with
   counts and the number of float32 elements produced. Upcasts (Cast
   bf16/f16 -> float32/64), where 32-bit computation starts, are listed per
   layer. The fused tf_bf16 update ops are listed apart: they compute in
   float32 registers and store bf16. The counting rules are in trace.py's
   docstring.
4. **A summary** (report.py): the share of float elements produced by
   float32/64 ops in the training math, and the layers responsible.
5. **Fixes** (fixes.py): per finding, whether a sound 16-bit fix exists and
   how to enable it. One is implemented in tf_bf16: `tf_bf16.losses.bf16_loss`
   (softmax cross-entropy on logits computed in bfloat16; its docstring says
   why it is sound and the others are not).

`report.py` holds the `AuditReport` and its rows and renders them (text,
Markdown, JSON). This module only puts the parts together.

Names: `tf_bf16.audit` is the function `audit` below and `tf_bf16.AuditReport`
its result; the bf16 loss the fixes recommend is `tf_bf16.losses.bf16_loss`.

On Keras's JAX backend the audit reports parts 1, 2 and 4 (variables,
bytes, summary) and says that nothing was traced: part 3 reads the graph of a
`tf.function`, which exists only on the TensorFlow backend (a JAX train step
is an XLA computation; its float32 ops are not attributed to layers here).

What the audit changes: it builds the optimizer if it is not built (creating
its slots, zero-initialized), builds the model's compiled metrics, and, if
`tf_bf16.set_policy()` is active, installs the stochastic rounding of
BatchNormalization moving statistics that `fit` would install. It runs no
step: no weight, slot or counter changes.

Not here: anything that changes how a model trains (tf_bf16.policy,
tf_bf16.optimizers, tf_bf16.losses).
"""

from tf_bf16 import backend as _backend
from tf_bf16 import policy as _policy
from tf_bf16.auditing import fixes as _fixes
from tf_bf16.auditing import inventory as _inventory
from tf_bf16.auditing import report as _report
from tf_bf16.auditing.report import AuditReport
from tf_bf16.auditing.report import DtypeTotal
from tf_bf16.auditing.report import FixRow
from tf_bf16.auditing.report import FloatOpRow
from tf_bf16.auditing.report import FusedOpRow
from tf_bf16.auditing.report import TrainingStateBytes
from tf_bf16.auditing.report import UpcastRow
from tf_bf16.auditing.report import VariableRow

__all__ = ["audit", "AuditReport", "VariableRow", "DtypeTotal", "TrainingStateBytes",
           "FloatOpRow", "UpcastRow", "FusedOpRow", "FixRow"]


def audit(model, x=None, y=None, optimizer=None, *, loss=None, sample_weight=None,
          batch_size=None, trace=True):
    """Audits what a training step of `model` stores and computes in 32 bits.

    Traces (does not run) the step `fit` would run and reports the variables,
    the training-state bytes per parameter, the float32/float64 ops of the
    step by layer, the upcasts, the fused updates, a summary and the fixes.
    The counting rules are in the docstring of tf_bf16/auditing/trace.py.

    Args:
        model: a built Keras model (or one with `model.inputs`).
        x: what `model.fit` accepts: a batch of inputs (array, tensor, or a
            list, tuple or dict of them, as the model takes them), a
            `tf.data.Dataset` (of `(x, y)` or `(x, y, sample_weight)`), a
            generator or a `keras.utils.PyDataset`: the first batch is traced.
            `None` builds zeros in the structure of the model's inputs, batch 2.
        y: targets for array `x`, or `None` (zeros from the model outputs,
            integer labels for a sparse categorical loss; unused for a dataset).
        sample_weight: sample weights for array `x`, as in `fit`.
        batch_size: for array `x`, the rows traced as one batch (default: all).
        optimizer: the optimizer whose state to report and whose update to
            trace; defaults to `model.optimizer`. Built on the trainable
            variables if it is not built yet.
        loss: a loss (`keras.losses.Loss`, name or callable) for a model that
            was not compiled with one.
        trace: `False` skips tracing the step: only variables and bytes.
            On the JAX backend the step is never traced (a note says so).

    Returns:
        An `AuditReport`. `print(report)` shows it; `report.to_dict()` is
        JSON-serialisable.

    Example:

    ```python
    tf_bf16.set_policy()
    model = ...  # built under the policy
    model.compile(tf_bf16.optimizers.Adam(rounding="kahan"), loss=...)
    report = tf_bf16.audit(model, x_batch, y_batch)
    print(report)                  # or report.to_markdown()
    report.bytes_per_parameter     # 8.0
    ```
    """
    optimizer = optimizer if optimizer is not None else getattr(model, "optimizer", None)
    notes = []
    traced = "no (trace=False)"
    if trace and _backend.NAME != "tensorflow":
        trace = False
        traced = f"no (Keras {_backend.NAME} backend)"
        notes.append(f"Not traced: the op-level report reads a tf.function graph, which only "
                     f"the TensorFlow backend has; on the {_backend.NAME} backend the audit "
                     "reports variables and bytes only.")
    if not model.built:
        if x is None:
            raise ValueError("audit: the model is not built; pass a sample batch `x`.")
        if _backend.NAME == "tensorflow":
            from tf_bf16.auditing import trace as _trace

            model(_trace.sample_batch(model, x, y, loss, sample_weight, batch_size)[0])
        else:
            model(_to_tensors(x))
    if optimizer is not None and not optimizer.built:
        _build_optimizer(optimizer, model)
        notes.append(f"The optimizer '{optimizer.name}' was not built; the audit built it "
                     "(its slots are zeros).")

    traced_graph = None
    sample = "not traced"
    if trace:
        from tf_bf16.auditing import trace as _trace

        x, y, sample_weight, sample = _trace.sample_batch(model, x, y, loss, sample_weight,
                                                          batch_size)
        traced_graph, traced, step_notes = _trace.trace_train_step(model, optimizer, x, y, loss,
                                                                   sample_weight)
        notes.extend(step_notes)

    variables, metric_owner = _inventory.variable_rows(model, optimizer)
    dtype_totals = _inventory.dtype_totals(variables)
    training_state = _inventory.training_state_bytes(variables)

    float_ops, upcasts, fused_ops, counts = [], [], [], dict(
        float=0, wide=0, metric_wide=0, fused=0)
    if traced_graph is not None:
        float_ops, upcasts, fused_ops, counts, graph_notes = _trace.analyse_graph(
            traced_graph, model, optimizer, metric_owner, loss)
        notes.extend(graph_notes)

    responsible = _report.responsible(float_ops)
    wide_percent = 100.0 * counts["wide"] / counts["float"] if counts["float"] else 0.0
    summary = _report.summary(traced_graph is not None, counts, wide_percent,
                              _report.responsible_classes(float_ops), variables)
    fixes = _fixes.fix_rows(model, optimizer, loss, variables, float_ops, fused_ops)
    notes.extend(_fixes.standing_notes(traced_graph is not None))

    return AuditReport(
        model=f"'{model.name}' ({type(model).__name__})",
        optimizer=_describe_optimizer(optimizer),
        sample=sample,
        traced=traced,
        variables=variables,
        dtype_totals=dtype_totals,
        training_state=training_state,
        float_ops=float_ops,
        upcasts=upcasts,
        fused_ops=fused_ops,
        float_elements=counts["float"],
        wide_float_elements=counts["wide"],
        wide_percent=round(wide_percent, 2),
        metric_wide_float_elements=counts["metric_wide"],
        fused_updated_elements=counts["fused"],
        responsible=[f"{g} ({c})" for g, c, _ in responsible],
        summary=summary,
        fixes=fixes,
        notes=notes,
    )


def _to_tensors(x):
    if _backend.NAME == "tensorflow":
        from tf_bf16.auditing import trace as _trace

        return _trace.to_tensors(x)
    return x


def _describe_optimizer(optimizer):
    if optimizer is None:
        return "none (the traced step computes gradients and applies no update)"
    module = type(optimizer).__module__
    origin = "tf_bf16" if module.startswith("tf_bf16") else "keras" if module.startswith(
        "keras") else module
    text = f"'{optimizer.name}' ({origin} {type(optimizer).__name__}"
    if getattr(optimizer, "rounding", None):
        text += f", rounding={optimizer.rounding}"
    return text + ")"


def _build_optimizer(optimizer, model):
    # The audit must report a float32 model, not refuse it: the strict-policy
    # check that a tf_bf16 optimizer runs when built is suspended meanwhile
    # (fit still runs it when training starts).
    state = _policy._STATE
    strict = state.strict
    state.strict = False
    try:
        optimizer.build(model.trainable_variables)
    finally:
        state.strict = strict
