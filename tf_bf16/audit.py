"""What still runs, and what is still stored, in 32 bits: an audit of a training step.

`audit(model, x, y, optimizer)` returns an `AuditReport`:

1. **Variables**: every variable that training touches (model weights,
   non-trainable statistics such as BatchNormalization's moving mean and
   variance, optimizer slots, Kahan buffers, bookkeeping such as the
   iteration counter and the learning rate, metric accumulators), with its
   owner (layer, optimizer or metric), role, dtype, shape and bytes; totals
   by dtype.
2. **Training-state bytes per parameter**: (bytes of the trainable weights +
   bytes of the per-parameter optimizer slots, Kahan buffers included) /
   number of trainable parameters. With all-bf16 weights: SGD with momentum
   is 4 B (stochastic rounding) or 6 B (Kahan), Adam 6 B or 8 B; Keras's
   `mixed_bfloat16` policy with Keras Adam is 12 B (float32 weights and
   moments; plus the bf16 copies of the weights it makes in every step,
   which are activations-like temporaries, not state).
3. **float32/float64 compute in the traced train step**: one training step is
   traced with `tf.function` (not run) and every op of its graph that produces
   a float32/float64 tensor and is not plumbing is listed, grouped by the
   Keras layer (or loss, optimizer, metric) it belongs to, by phase (forward,
   backward, update, metrics) and by op type, with counts and the number of
   float32 elements produced. Upcasts (Cast bf16/f16 -> float32/64), where 32-bit
   computation starts, are listed per layer. The fused tf_bf16 update ops are
   listed apart: they compute in float32 registers and store bf16.
4. **A summary**: the share of float elements produced by float32/64 ops in the
   training math, and the layers responsible.
5. **Fixes**: per finding, whether a sound 16-bit fix exists and how to enable
   it. One is implemented here: `bf16_loss` (softmax cross-entropy on logits
   computed in bfloat16, see its docstring for why it is sound and the
   others are not).

Rules the audit follows (so that the numbers can be checked):

- **Which op counts.** An op counts when it produces at least one
  float32/float64 output and its type is not plumbing (`PLUMBING_OP_TYPES`:
  constants, placeholders, identities, shape queries, variable reads and
  assignments, reshapes, transposes, slices, concatenation, broadcasts,
  tiles, fills, selects, one-hot, control flow). Plumbing moves or names
  data without arithmetic; what a variable *stores* is reported in the
  variables section instead. `Cast` to float32 counts (it is where 32-bit
  work starts, and it writes 32-bit tensors). Ops in the bodies of
  functional control flow (`While`, `If`, calls) are counted once per body,
  attributed to the op that calls them.
- **Elements** are the static sizes of the float outputs; the step is traced
  with the sample batch's exact shapes, so they are known except for
  data-dependent shapes (counted as ops with unknown size).
- **The percentage** is float32/64 elements / all float elements (bf16, f16,
  float32, float64) produced by counted ops in the forward, backward and
  update phases. Metric updates are excluded from it (their accumulators are
  float32 by design and are not training math) and reported apart. The
  fused update ops produce no tensors; they are counted apart, by the
  number of parameters they update.
- **Kernel internals are not visible.** The audit reads tensor dtypes in the
  graph. Kernels of bf16 ops may accumulate in float32 inside (TensorFlow's
  bf16 `Sum`, `MatMul` and `Conv2D` on CPU do), as bf16 matrix units do in
  hardware; that is not counted as float32 work.
- **Attribution.** Ops are attributed to the innermost Keras name scope that
  a layer, the optimizer or the loss opened while the step was traced
  (recorded during tracing, so repeated and nested calls are exact).
  Gradient ops (`gradient_tape/<forward op>/...`) go to the layer of their
  forward op; unscoped ops that feed a metric variable go to that metric;
  other unscoped ops (gradient aggregation `AddN`) inherit from their inputs.

Sample batch: when `x` is not given it is built from `model.inputs`: zeros
of each input's dtype and shape, the batch dimension set to 2 and any other
unknown dimension to 8. When `y` is not given it is zeros of each output's
shape (float32), or integer class labels of shape `output.shape[:-1]` when
the compiled loss is a sparse categorical one. The values do not matter:
the step is traced, not run.

Names: the package exports the function, so `tf_bf16.audit` is `audit`
(`tf_bf16.audit(model)`); the fix is reachable as `tf_bf16.audit.bf16_loss`
(an attribute of the function) or `from tf_bf16.audit import bf16_loss`.

What the audit changes: it builds the optimizer if it is not built (creating
its slots, zero-initialized), builds the model's compiled metrics, and, if
`tf_bf16.set_policy()` is active, installs the stochastic rounding of
BatchNormalization moving statistics that `fit` would install. It runs no
step: no weight, slot or counter changes.
"""

import contextlib
import dataclasses
import json
import math
import textwrap

import keras
import numpy as np
import tensorflow as tf
from keras.src import backend as _keras_backend
from keras.src.backend.tensorflow import core as _keras_tf_core
from keras.src.losses import loss as _keras_loss

from tf_bf16 import policy as _policy

__all__ = ["audit", "AuditReport", "bf16_loss", "BFloat16SoftmaxCrossEntropy"]

# ---------------------------------------------------------------------------
# Vocabulary

ROLE_TRAINABLE = "trainable weight"
ROLE_STATISTIC = "non-trainable statistic"
ROLE_SLOT = "optimizer slot"
ROLE_KAHAN = "kahan buffer"
ROLE_BOOKKEEPING = "bookkeeping"
ROLE_METRIC = "metric"

PHASE_FORWARD = "forward"
PHASE_BACKWARD = "backward"
PHASE_UPDATE = "update"
PHASE_METRICS = "metrics"
_PHASE_ORDER = (PHASE_FORWARD, PHASE_BACKWARD, PHASE_UPDATE, PHASE_METRICS)

KIND_LAYER = "layer"
KIND_LOSS = "loss"
KIND_OPTIMIZER = "optimizer"
KIND_METRIC = "metric"
KIND_OTHER = "other"

WIDE_FLOAT_DTYPES = ("float32", "float64")
NARROW_FLOAT_DTYPES = ("bfloat16", "float16")

FUSED_OP_PREFIX = "TfBf16>"
FUSED_LABEL = "fused update (float32 registers, bf16 storage)"

# Ops that move, name or select data without arithmetic (see module docstring).
PLUMBING_OP_TYPES = frozenset({
    # Graph structure, constants, debugging.
    "Const", "Placeholder", "PlaceholderWithDefault", "NoOp", "Identity", "IdentityN",
    "StopGradient", "PreventGradient", "Snapshot", "Assert", "Print", "PrintV2",
    "CheckNumerics", "CheckNumericsV2", "EnsureShape",
    # Shape queries.
    "Shape", "ShapeN", "Size", "Rank", "BroadcastArgs", "BroadcastGradientArgs",
    # Variable access: what a variable stores is in the variables section.
    "ReadVariableOp", "VarHandleOp", "VarIsInitializedOp", "ResourceGather",
    "AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp",
    # Data movement.
    "Reshape", "ExpandDims", "Squeeze", "Transpose", "ConcatV2", "Concat", "Pack",
    "Unpack", "Split", "SplitV", "Slice", "StridedSlice", "StridedSliceGrad", "GatherV2",
    "GatherNd", "Tile", "BroadcastTo", "Fill", "ZerosLike", "OnesLike", "Pad", "PadV2",
    "MirrorPad", "ReverseV2", "OneHot", "Select", "SelectV2", "Where",
    # Control flow (bodies are inspected separately).
    "Switch", "Merge", "Enter", "Exit", "NextIteration", "LoopCond", "If", "StatelessIf",
    "While", "StatelessWhile", "Case", "StatelessCase", "PartitionedCall",
    "StatefulPartitionedCall",
})

# Layers whose float32 statistics have no sound 16-bit replacement.
_NORMALIZATION_CLASSES = ("BatchNormalization", "LayerNormalization", "GroupNormalization",
                          "RMSNormalization", "UnitNormalization", "SpectralNormalization")

_TF_BF16_OPTIMIZERS = ("SGD", "Adam", "AdamW", "Lion")

# ---------------------------------------------------------------------------
# The report


@dataclasses.dataclass
class VariableRow:
    """One variable: where it lives, what it is for, what it costs."""

    path: str
    owner: str
    owner_class: str
    role: str
    dtype: str
    shape: list
    elements: int
    bytes: int


@dataclasses.dataclass
class DtypeTotal:
    """All variables of one dtype."""

    dtype: str
    variables: int
    elements: int
    bytes: int


@dataclasses.dataclass
class TrainingStateBytes:
    """Bytes of trainable weights and their per-parameter optimizer state."""

    trainable_parameters: int
    weight_bytes: int
    slot_bytes: int
    kahan_bytes: int
    total_bytes: int
    bytes_per_parameter: float


@dataclasses.dataclass
class FloatOpRow:
    """float32/float64 ops of one (group, phase, op type, dtype) in the traced step."""

    group: str
    group_class: str
    kind: str
    phase: str
    op_type: str
    dtype: str
    count: int
    elements: int
    scalar_only: bool
    unknown_size_ops: int


@dataclasses.dataclass
class UpcastRow:
    """Casts from a 16-bit float to float32/64 of one (group, phase)."""

    group: str
    group_class: str
    kind: str
    phase: str
    source_dtype: str
    target_dtype: str
    count: int
    elements: int


@dataclasses.dataclass
class FusedOpRow:
    """tf_bf16 custom ops: float32 arithmetic in registers, bf16 in memory."""

    group: str
    group_class: str
    op_type: str
    rounding: str
    count: int
    elements: int
    description: str = FUSED_LABEL


@dataclasses.dataclass
class FixRow:
    """One finding and whether a sound 16-bit fix exists.

    `sound` is `"yes"` (a sound fix exists; `how` enables it), `"no"` (none is
    known to be sound; `how` says why), `"depends"` or `"n/a"` (nothing to fix).
    """

    finding: str
    group: str
    sound: str
    how: str


@dataclasses.dataclass
class AuditReport:
    """Result of `tf_bf16.audit`: printable (`print(report)`,
    `report.to_markdown()`) and data (`dataclasses` rows, `report.to_dict()`).

    Attributes:
        model, optimizer: descriptions of what was audited.
        sample: dtypes and shapes of the sample batch, and how it was built.
        traced: which step was traced (`model.train_step` or a custom step).
        variables: `VariableRow`s, model weights first, then optimizer
            variables, then metric accumulators.
        dtype_totals: `DtypeTotal`s, largest first.
        training_state: `TrainingStateBytes` (see `bytes_per_parameter`).
        float_ops: `FloatOpRow`s of the traced step, grouped by layer (or
            loss, optimizer, metric), phase, op type and dtype.
        upcasts: `UpcastRow`s: Casts from bf16/f16 to float32/64 per group.
        fused_ops: `FusedOpRow`s: tf_bf16 custom ops.
        float_elements: float elements produced by counted ops in the
            forward, backward and update phases (all float dtypes).
        wide_float_elements: the float32/64 part of `float_elements`.
        wide_percent: `100 * wide_float_elements / float_elements`.
        metric_wide_float_elements: float32/64 elements of metric updates
            (not in the percentage).
        fused_updated_elements: parameters updated by fused update ops.
        responsible: "group (class)" of the groups with non-scalar float32
            training math, most float32 elements first.
        summary: one paragraph with the figures above.
        fixes: `FixRow`s, one per finding.
        notes: caveats of this audit.
    """

    model: str
    optimizer: str
    sample: str
    traced: str
    variables: list
    dtype_totals: list
    training_state: TrainingStateBytes
    float_ops: list
    upcasts: list
    fused_ops: list
    float_elements: int
    wide_float_elements: int
    wide_percent: float
    metric_wide_float_elements: int
    fused_updated_elements: int
    responsible: list
    summary: str
    fixes: list
    notes: list

    @property
    def bytes_per_parameter(self):
        """Training-state bytes per trainable parameter (see `TrainingStateBytes`)."""
        return self.training_state.bytes_per_parameter

    def variables_with_role(self, role):
        """The `VariableRow`s of one role (e.g. `"kahan buffer"`)."""
        return [row for row in self.variables if row.role == role]

    def float_ops_of(self, group=None, kind=None, phase=None, layer_class=None):
        """The `FloatOpRow`s matching every given filter."""
        return [row for row in self.float_ops
                if (group is None or row.group == group)
                and (kind is None or row.kind == kind)
                and (phase is None or row.phase == phase)
                and (layer_class is None or row.group_class == layer_class)]

    def to_dict(self):
        """A JSON-serialisable dict of the whole report."""
        return _jsonable(dataclasses.asdict(self))

    def to_json(self, **kwargs):
        """`json.dumps(self.to_dict(), **kwargs)`."""
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self):
        return self._render(markdown=False)

    def to_text(self):
        """The aligned plain-text report (what `print(report)` shows)."""
        return self._render(markdown=False)

    def to_markdown(self):
        """The report as Markdown: headings and pipe tables."""
        return self._render(markdown=True)

    # -- rendering ----------------------------------------------------------

    def _render(self, markdown):
        out = []

        def heading(text):
            out.append("")
            out.append(f"## {text}" if markdown else f"{text}\n{'-' * len(text)}")

        def table(headers, rows, right=()):
            out.append(_table(headers, rows, right, markdown))

        title = f"tf_bf16 audit of {self.model}"
        out.append(f"# {title}" if markdown else f"{title}\n{'=' * len(title)}")
        out.append(f"optimizer: {self.optimizer}")
        out.append(f"sample batch: {self.sample}")
        out.append(f"traced: {self.traced}")
        out.append("")
        out.append(("**Summary:** " if markdown else "Summary: ") + self.summary)

        heading(f"Variables ({len(self.variables)})")
        table(["path", "owner", "class", "role", "dtype", "shape", "bytes"],
              [[r.path, r.owner, r.owner_class, r.role, r.dtype, _shape(r.shape),
                f"{r.bytes:,}"] for r in self.variables], right={6})
        out.append("")
        table(["dtype", "variables", "elements", "bytes"],
              [[t.dtype, t.variables, f"{t.elements:,}", f"{t.bytes:,}"]
               for t in self.dtype_totals], right={1, 2, 3})
        state = self.training_state
        params = max(state.trainable_parameters, 1)
        out.append("")
        out.append(
            f"Training state: {state.total_bytes:,} B / {state.trainable_parameters:,} "
            f"trainable parameters = {state.bytes_per_parameter:.2f} B/parameter "
            f"(weights {state.weight_bytes / params:.2f} + optimizer slots "
            f"{state.slot_bytes / params:.2f} + Kahan buffers "
            f"{state.kahan_bytes / params:.2f})")

        heading("float32/float64 ops in the train step")
        if self.float_ops:
            table(["group", "class", "phase", "op type", "dtype", "count", "elements", "note"],
                  [[r.group, r.group_class, r.phase, r.op_type, r.dtype, r.count,
                    f"{r.elements:,}" + ("+?" if r.unknown_size_ops else ""),
                    "scalar" if r.scalar_only else ""] for r in self.float_ops],
                  right={5, 6})
        else:
            out.append("none")

        heading("Upcasts to float32/float64 (where 32-bit compute starts)")
        if self.upcasts:
            table(["group", "class", "phase", "cast", "count", "elements"],
                  [[r.group, r.group_class, r.phase, f"{r.source_dtype}->{r.target_dtype}",
                    r.count, f"{r.elements:,}"] for r in self.upcasts], right={4, 5})
        else:
            out.append("none")

        heading("Fused tf_bf16 ops (float32 registers, bf16 storage)")
        if self.fused_ops:
            table(["group", "class", "op type", "rounding", "count", "elements", "what"],
                  [[r.group, r.group_class, r.op_type, r.rounding, r.count,
                    f"{r.elements:,}", r.description] for r in self.fused_ops], right={4, 5})
        else:
            out.append("none")

        heading("Fixes")
        if markdown:
            table(["finding", "group", "sound fix?", "how / why not"],
                  [[f.finding, f.group, f.sound, f.how] for f in self.fixes])
        else:
            # The explanations are sentences: wrapped paragraphs, not a table.
            for fix in self.fixes:
                out.append(f"[{fix.sound}] {fix.group}: {fix.finding}")
                out.append(textwrap.fill(fix.how, width=96, initial_indent="      ",
                                         subsequent_indent="      "))

        if self.notes:
            heading("Notes")
            for note in self.notes:
                out.append(f"- {note}")
        return "\n".join(out) + "\n"


def _shape(shape):
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _table(headers, rows, right, markdown):
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    if markdown:
        def line(row):
            return "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"
        align = ["---:" if i in right else "---" for i in range(len(headers))]
        return "\n".join([line(cells[0]), "| " + " | ".join(align) + " |"]
                         + [line(r) for r in cells[1:]])
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row):
        return "  ".join((c.rjust(w) if i in right else c.ljust(w))
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)]
                     + [line(r) for r in cells[1:]])


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# ---------------------------------------------------------------------------
# Entry point


def audit(model, x=None, y=None, optimizer=None, *, loss=None, trace=True):
    """Audits what a training step of `model` stores and computes in 32 bits.

    Traces (does not run) the step `fit` would run and reports the variables,
    the training-state bytes per parameter, the float32/float64 ops of the
    step by layer, the upcasts, the fused updates, a summary and the fixes.
    The counting rules are in the docstring of the module (tf_bf16/audit.py).

    Args:
        model: a built Keras model (or one with `model.inputs`).
        x: a sample input batch (array, tensor, or list/dict of them), or
            `None` to build zeros from `model.inputs` with batch size 2.
        y: sample targets, or `None` to build zeros from the model outputs
            (integer labels for a sparse categorical loss).
        optimizer: the optimizer whose state to report and whose update to
            trace; defaults to `model.optimizer`. Built on the trainable
            variables if it is not built yet.
        loss: a loss (`keras.losses.Loss`, name or callable) for a model that
            was not compiled with one.
        trace: `False` skips tracing the step: only variables and bytes.

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
    if not model.built:
        if x is None:
            raise ValueError("audit: the model is not built; pass a sample batch `x`.")
        model(_to_tensors(x))
    if optimizer is not None and not optimizer.built:
        _build_optimizer(optimizer, model)
        notes.append(f"The optimizer '{optimizer.name}' was not built; the audit built it "
                     "(its slots are zeros).")

    traced_graph = None
    sample = "not traced"
    traced = "no (trace=False)"
    if trace:
        x, y, sample = _sample_batch(model, x, y, loss)
        traced_graph, traced, step_notes = _trace_train_step(model, optimizer, x, y, loss)
        notes.extend(step_notes)

    variables, metric_owner = _variable_rows(model, optimizer)
    dtype_totals = _dtype_totals(variables)
    training_state = _training_state_bytes(variables)

    float_ops, upcasts, fused_ops, counts = [], [], [], dict(
        float=0, wide=0, metric_wide=0, fused=0)
    if traced_graph is not None:
        float_ops, upcasts, fused_ops, counts, graph_notes = _analyse_graph(
            traced_graph, model, optimizer, metric_owner, loss)
        notes.extend(graph_notes)

    responsible = _responsible(float_ops)
    wide_percent = 100.0 * counts["wide"] / counts["float"] if counts["float"] else 0.0
    summary = _summary(traced_graph is not None, counts, wide_percent, responsible, variables)
    fixes = _fixes(model, optimizer, loss, variables, float_ops, fused_ops)
    notes.extend(_standing_notes(traced_graph is not None))

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


# ---------------------------------------------------------------------------
# Variables


def _dtype_name(dtype):
    return keras.backend.standardize_dtype(dtype)


def _dtype_size(dtype):
    return tf.as_dtype(_dtype_name(dtype)).size


def _variable_row(variable, owner, owner_class, role):
    shape = [int(d) for d in variable.shape]
    elements = math.prod(shape)
    return VariableRow(path=variable.path, owner=owner, owner_class=owner_class, role=role,
                       dtype=_dtype_name(variable.dtype), shape=shape, elements=elements,
                       bytes=elements * _dtype_size(variable.dtype))


def _metric_variable_owners(model):
    """id(variable) -> innermost metric owning it (compile metrics are containers)."""
    owners = {}

    def visit(metric):
        for inner in getattr(metric, "metrics", None) or []:
            if inner is not metric:
                visit(inner)
        for variable in metric.variables:
            owners.setdefault(id(variable), metric)

    for metric in getattr(model, "metrics", []):
        visit(metric)
    return owners


def _variable_rows(model, optimizer):
    rows, seen = [], set()
    owners = _policy.variable_owners(model)
    for variable in model.variables:
        if id(variable) in seen:
            continue
        seen.add(id(variable))
        layer = owners.get(id(variable))
        if variable.trainable:
            role = ROLE_TRAINABLE
        elif keras.backend.is_float_dtype(variable.dtype) and len(variable.shape) > 0:
            role = ROLE_STATISTIC
        else:
            # Random-seed state, counters: not per-parameter numerics.
            role = ROLE_BOOKKEEPING
        layer = layer if layer is not None else model
        rows.append(_variable_row(variable, layer.name, type(layer).__name__, role))

    if optimizer is not None:
        for variable in optimizer.variables:
            if id(variable) in seen:
                continue
            seen.add(id(variable))
            if len(variable.shape) == 0:
                # Iteration counter, learning rate, loss scale: one number each.
                role = ROLE_BOOKKEEPING
            elif variable.name.endswith("kahan_compensation"):
                role = ROLE_KAHAN
            else:
                role = ROLE_SLOT
            rows.append(_variable_row(variable, optimizer.name, type(optimizer).__name__,
                                      role))

    metric_owner = _metric_variable_owners(model)
    for variable in getattr(model, "metrics_variables", []):
        if id(variable) in seen:
            continue
        seen.add(id(variable))
        metric = metric_owner.get(id(variable))
        rows.append(_variable_row(variable, metric.name if metric else "(metric)",
                                  type(metric).__name__ if metric else "", ROLE_METRIC))
    return rows, metric_owner


def _dtype_totals(rows):
    totals = {}
    for row in rows:
        total = totals.setdefault(row.dtype, DtypeTotal(row.dtype, 0, 0, 0))
        total.variables += 1
        total.elements += row.elements
        total.bytes += row.bytes
    return sorted(totals.values(), key=lambda t: -t.bytes)


def _training_state_bytes(rows):
    def total(role, what):
        return sum(getattr(r, what) for r in rows if r.role == role)

    params = total(ROLE_TRAINABLE, "elements")
    weights = total(ROLE_TRAINABLE, "bytes")
    slots = total(ROLE_SLOT, "bytes")
    kahan = total(ROLE_KAHAN, "bytes")
    state = weights + slots + kahan
    return TrainingStateBytes(trainable_parameters=params, weight_bytes=weights,
                              slot_bytes=slots, kahan_bytes=kahan, total_bytes=state,
                              bytes_per_parameter=state / params if params else 0.0)


# ---------------------------------------------------------------------------
# Sample batch and tracing


def _to_tensors(value):
    def convert(item):
        if item is None:
            return None
        tensor = tf.convert_to_tensor(item)
        # Keras's data adapters hand float64 arrays to the step as floatx.
        return tf.cast(tensor, tf.float32) if tensor.dtype == tf.float64 else tensor
    return tf.nest.map_structure(convert, value)


def _loss_identifier_name(loss):
    if loss is None:
        return ""
    if isinstance(loss, str):
        return loss
    if isinstance(loss, keras.losses.Loss):
        return f"{type(loss).__name__} {loss.name}"
    return getattr(loss, "__name__", type(loss).__name__)


def _is_sparse_loss(loss):
    return "sparse" in _loss_identifier_name(loss).lower()


def _per_output(loss, index, name):
    if isinstance(loss, dict):
        return loss.get(name)
    if isinstance(loss, (list, tuple)):
        return loss[index] if index < len(loss) else None
    return loss


def _sample_batch(model, x, y, loss):
    described = []
    inputs = _model_inputs(model)
    if x is None:
        if not inputs:
            raise ValueError("audit: the model has no `inputs` to build a sample batch from "
                             "(subclassed model?); pass `x`.")
        zeros = [tf.zeros(_concrete_shape(t.shape), dtype=t.dtype) for t in inputs]
        x = zeros[0] if len(zeros) == 1 else zeros
        described.append("x = zeros from model.inputs (batch 2)")
    x = _to_tensors(x)
    if y is None:
        outputs = _model_outputs(model)
        compiled = loss if loss is not None else getattr(model, "loss", None)
        if outputs:
            targets = []
            for index, output in enumerate(outputs):
                shape = _concrete_shape(output.shape)
                name = getattr(getattr(output, "_keras_history", None), "operation", None)
                name = getattr(name, "name", None)
                if _is_sparse_loss(_per_output(compiled, index, name)):
                    targets.append(tf.zeros(shape[:-1], tf.int32))
                else:
                    targets.append(tf.zeros(shape, tf.float32))
            y = targets[0] if len(targets) == 1 else targets
            described.append("y = zeros from the model outputs" + (
                " (integer labels for the sparse loss)" if _is_sparse_loss(compiled) else ""))
        else:
            raise ValueError("audit: cannot build targets without `model.outputs`; pass `y`.")
    y = _to_tensors(y)

    def spec(value):
        return ", ".join(f"{t.dtype.name} {tuple(t.shape)}" for t in tf.nest.flatten(value))
    sample = f"x: {spec(x)}; y: {spec(y)}"
    if described:
        sample += " [" + "; ".join(described) + "]"
    return x, y, sample


def _model_inputs(model):
    try:
        return list(model.inputs or [])
    except (AttributeError, ValueError):
        return []


def _model_outputs(model):
    try:
        return list(model.outputs or [])
    except (AttributeError, ValueError):
        return []


def _concrete_shape(shape, batch_size=2, unknown=8):
    return [batch_size if i == 0 and d is None else unknown if d is None else int(d)
            for i, d in enumerate(shape)]


@contextlib.contextmanager
def _recording_keras_scopes():
    """Records which object (layer, optimizer, loss) opened each TF name scope.

    Keras opens `name_scope(layer.name, caller=layer)` around every layer call
    and TensorFlow uniquifies the scope string per graph (`dense` is often
    `dense_1`), so names alone cannot identify the layer. The TF backend's
    `name_scope.__enter__` is wrapped while tracing to note the scope string
    TensorFlow actually used.
    """
    scopes = {}
    original_enter = _keras_tf_core.name_scope.__enter__

    def recording_enter(self):
        result = original_enter(self)
        if getattr(self, "_pop_on_exit", False):
            scopes.setdefault(tf.get_current_name_scope(), (self.caller, self.name))
        return result

    _keras_tf_core.name_scope.__enter__ = recording_enter
    try:
        yield scopes
    finally:
        _keras_tf_core.name_scope.__enter__ = original_enter


_LOSS_SCOPE = "compile_loss"


def _trace_train_step(model, optimizer, x, y, loss):
    notes = []
    state = _policy.policy_state()
    if state.active and state.moving_statistics and optimizer is not None:
        # What fit() installs when training starts, so the traced step is fit's.
        _policy.install_moving_statistics_rounding(model, optimizer)

    compiled_loss = getattr(model, "_compile_loss", None) is not None
    use_train_step = (loss is None and optimizer is not None
                      and optimizer is getattr(model, "optimizer", None)
                      and (compiled_loss or _overrides_train_step(model)))
    if use_train_step:
        def step(x, y):
            return model.train_step((x, y))
        traced = "model.train_step (what fit runs), in tf.function"
    else:
        if loss is None and not compiled_loss and not model.losses:
            raise ValueError("audit: the model has no compiled loss; compile it with one or "
                             "pass `loss=`.")
        loss_fn = keras.losses.get(loss) if isinstance(loss, str) else loss

        def step(x, y):
            with tf.GradientTape() as tape:
                y_pred = model(x, training=True)
                if loss_fn is not None:
                    with keras.name_scope(_LOSS_SCOPE):
                        value = loss_fn(y, y_pred)
                    for extra in model.losses:
                        value = value + tf.cast(tf.reduce_sum(extra), value.dtype)
                else:
                    value = model.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
            variables = model.trainable_variables
            gradients = tape.gradient(value, variables)
            if optimizer is not None:
                optimizer.apply(gradients, variables)
            return value
        traced = ("custom step in tf.function: model(x, training=True), "
                  + ("the given loss" if loss_fn is not None else "model.compute_loss")
                  + ", GradientTape" + (", optimizer.apply" if optimizer is not None else ""))
        if optimizer is None:
            notes.append("No optimizer: the traced step has no update phase and the "
                         "training state has no optimizer slots.")

    with _recording_keras_scopes() as scopes:
        concrete = tf.function(step).get_concrete_function(x, y)
    return (concrete.graph, scopes), traced, notes


def _overrides_train_step(model):
    return type(model).train_step is not keras.Model.train_step and any(
        "train_step" in vars(cls) for cls in type(model).__mro__
        if cls.__module__.split(".")[0] not in ("keras", "tf_keras"))


# ---------------------------------------------------------------------------
# Graph analysis


@dataclasses.dataclass
class _Group:
    key: tuple
    name: str
    class_name: str
    kind: str
    order: int


class _Attributor:
    """Assigns each op of the traced graph to a group and a phase."""

    def __init__(self, graph, scopes, model, optimizer, metric_owner, loss_classes):
        self.graph = graph
        self.loss_classes = loss_classes
        self.scopes = scopes
        self.optimizer = optimizer
        self.metric_owner = metric_owner
        self.groups = {}
        self.by_op = {}
        self.variables_by_handle = {}
        for variable in list(model.variables) + list(getattr(model, "metrics_variables", [])) \
                + (list(optimizer.variables) if optimizer is not None else []):
            self.variables_by_handle.setdefault(id(variable.value.handle), variable)
        self.placeholder_variable = {}
        for external, internal in graph.captures:
            variable = self.variables_by_handle.get(id(external))
            if variable is not None:
                self.placeholder_variable[internal.op.name] = variable

    def group(self, key, name, class_name, kind):
        if key not in self.groups:
            self.groups[key] = _Group(key, name, class_name, kind, len(self.groups))
        return self.groups[key]

    def variable_of(self, tensor):
        return self.placeholder_variable.get(tensor.op.name)

    def by_scope(self, op_name):
        """(group, phase) from the recorded Keras scopes, or None if unscoped."""
        gradient = op_name.startswith("gradient_tape/")
        name = op_name[len("gradient_tape/"):] if gradient else op_name
        parts = name.split("/")
        phase = PHASE_BACKWARD if gradient else PHASE_FORWARD
        # Innermost first: the layer (or optimizer) whose call created the op.
        for end in range(len(parts) - 1, 0, -1):
            caller, _ = self.scopes.get("/".join(parts[:end]), (None, None))
            if isinstance(caller, keras.layers.Layer):
                return self.group(("layer", id(caller)), caller.name, type(caller).__name__,
                                  KIND_LAYER), phase
            if isinstance(caller, keras.optimizers.Optimizer):
                return self.group(("optimizer",), caller.name, type(caller).__name__,
                                  KIND_OPTIMIZER), PHASE_UPDATE
        # The compiled loss: compile_loss/<loss name>/...
        _, outer = self.scopes.get(parts[0], (None, None))
        if outer == _LOSS_SCOPE and len(parts) > 1:
            _, inner = self.scopes.get("/".join(parts[:2]), (None, None))
            loss_name = inner if inner is not None and len(parts) > 2 else "total"
            class_name = self.loss_classes.get(loss_name, "CompileLoss" if loss_name == "total"
                                               else "loss")
            return self.group(("loss", loss_name), f"loss: {loss_name}", class_name,
                              KIND_LOSS), phase
        return None

    def attribute(self, operations):
        unscoped = []
        for op in operations:
            found = self.by_scope(op.name)
            if found is not None:
                self.by_op[op.name] = found
            else:
                unscoped.append(op)
        self._attribute_metric_updates(operations)
        other = self.group(("other",), "(unscoped)", "", KIND_OTHER)
        for op in unscoped:
            if op.name in self.by_op:
                continue
            inherited = None
            for tensor in op.inputs:
                source = self.by_op.get(tensor.op.name)
                if source is not None and source[0].kind != KIND_OTHER:
                    inherited = source
                    break
            gradient = op.name.startswith("gradient_tape/")
            if inherited is None:
                inherited = (other, PHASE_BACKWARD if gradient else PHASE_FORWARD)
            self.by_op[op.name] = inherited

    def _attribute_metric_updates(self, operations):
        """Unscoped ops whose results land in a metric variable belong to that metric."""
        assigns = ("AssignVariableOp", "AssignAddVariableOp", "AssignSubVariableOp")
        for op in operations:
            if op.type not in assigns or not op.inputs:
                continue
            variable = self.variable_of(op.inputs[0])
            metric = self.metric_owner.get(id(variable)) if variable is not None else None
            if metric is None:
                continue
            group = self.group(("metric", id(metric)), f"metric: {metric.name}",
                               type(metric).__name__, KIND_METRIC)
            stack = [op]
            while stack:
                current = stack.pop()
                if current.name in self.by_op:
                    continue
                if current is not op and self.by_scope(current.name) is not None:
                    continue
                self.by_op[current.name] = (group, PHASE_METRICS)
                # Data inputs only: automatic control dependencies chain every
                # stateful op of the step, metrics' and the optimizer's alike.
                stack.extend(t.op for t in current.inputs)


def _static_elements(tensor):
    shape = tensor.shape
    if shape.rank is None or any(d is None for d in shape.as_list()):
        return None
    return math.prod(shape.as_list())


def _function_bodies(op):
    """Graphs of the functions an op calls (While bodies, If branches, calls)."""
    bodies = []
    for attr in op.node_def.attr.values():
        names = [attr.func.name] if attr.HasField("func") else [f.name for f in attr.list.func]
        for name in names:
            if not name:
                continue
            try:
                function = op.graph._get_function(name)
            except Exception:  # Private API: a missing body is reported, not fatal.
                function = None
            body = getattr(function, "graph", None)
            bodies.append((name, body))
    return bodies


def _walk(graph, attributor, notes, caller=None, depth=0):
    """(op, group, phase) for every op, descending into function bodies."""
    operations = graph.get_operations()
    if caller is None:
        attributor.attribute(operations)
    for op in operations:
        group, phase = caller if caller is not None else attributor.by_op[op.name]
        yield op, group, phase
        if depth < 8:
            for name, body in _function_bodies(op):
                if body is None:
                    notes.append(f"Could not inspect function '{name}' called by {op.name}.")
                    continue
                yield from _walk(body, attributor, notes, (group, phase), depth + 1)


def _analyse_graph(traced, model, optimizer, metric_owner, loss):
    graph, scopes = traced
    notes = []
    loss_classes = {item.name: type(item).__name__ for item in _compiled_losses(model, loss)
                    if isinstance(item, keras.losses.Loss)}
    attributor = _Attributor(graph, scopes, model, optimizer, metric_owner, loss_classes)
    float_rows, upcast_rows, fused_rows = {}, {}, {}
    counts = dict(float=0, wide=0, metric_wide=0, fused=0)

    for op, group, phase in _walk(graph, attributor, notes):
        if op.type.startswith(FUSED_OP_PREFIX):
            _add_fused(fused_rows, op, group, attributor)
            if op.type != f"{FUSED_OP_PREFIX}StochasticRound":
                counts["fused"] += _updated_elements(op, attributor)
            continue
        if op.type in PLUMBING_OP_TYPES:
            continue
        for output in op.outputs:
            dtype = output.dtype.name
            elements = _static_elements(output)
            if dtype in NARROW_FLOAT_DTYPES and phase != PHASE_METRICS:
                counts["float"] += elements or 0
        wide = [o for o in op.outputs if o.dtype.name in WIDE_FLOAT_DTYPES]
        if not wide:
            continue
        sizes = [_static_elements(o) for o in wide]
        known = sum(s for s in sizes if s is not None)
        unknown = any(s is None for s in sizes)
        if phase == PHASE_METRICS:
            counts["metric_wide"] += known
        else:
            counts["float"] += known
            counts["wide"] += known
        scalar = all(o.shape.rank == 0 for o in wide)
        dtype = wide[0].dtype.name
        key = (group.order, _PHASE_ORDER.index(phase), op.type, dtype)
        row = float_rows.get(key)
        if row is None:
            row = float_rows[key] = FloatOpRow(group.name, group.class_name, group.kind, phase,
                                               op.type, dtype, 0, 0, True, 0)
        row.count += 1
        row.elements += known
        row.scalar_only = row.scalar_only and scalar
        row.unknown_size_ops += int(unknown)

        if op.type == "Cast" and op.inputs and op.inputs[0].dtype.name in NARROW_FLOAT_DTYPES:
            source = op.inputs[0].dtype.name
            key = (group.order, _PHASE_ORDER.index(phase), source, dtype)
            upcast = upcast_rows.get(key)
            if upcast is None:
                upcast = upcast_rows[key] = UpcastRow(group.name, group.class_name, group.kind,
                                                      phase, source, dtype, 0, 0)
            upcast.count += 1
            upcast.elements += known

    float_ops = [float_rows[k] for k in sorted(float_rows)]
    upcasts = [upcast_rows[k] for k in sorted(upcast_rows)]
    fused = [fused_rows[k] for k in sorted(fused_rows)]
    if any(r.unknown_size_ops for r in float_ops):
        notes.append("Some float32 ops have data-dependent shapes; their elements are not "
                     "counted ('+?').")
    return float_ops, upcasts, fused, counts, list(dict.fromkeys(notes))


def _updated_elements(op, attributor):
    """Parameters a fused update touches: the size of the variable it updates."""
    variable = attributor.variable_of(op.inputs[0]) if op.inputs else None
    if variable is not None:
        return math.prod(int(d) for d in variable.shape)
    sizes = [_static_elements(t) for t in op.inputs if t.dtype != tf.resource]
    return max((s for s in sizes if s is not None), default=0)


def _add_fused(rows, op, group, attributor):
    try:
        rounding = op.get_attr("rounding")
        rounding = rounding.decode() if isinstance(rounding, bytes) else str(rounding)
    except ValueError:
        rounding = "stochastic"  # StochasticRound has no attribute: it is SR by definition.
    key = (group.order, op.type, rounding)
    row = rows.get(key)
    if row is None:
        row = rows[key] = FusedOpRow(group.name, group.class_name, op.type, rounding, 0, 0)
    row.count += 1
    if op.type == f"{FUSED_OP_PREFIX}StochasticRound":
        row.elements += _static_elements(op.outputs[0]) or 0
        row.description = "stochastic rounding float32 -> bf16 (float32 registers)"
    else:
        row.elements += _updated_elements(op, attributor)


# ---------------------------------------------------------------------------
# Summary and fixes


def _responsible(float_ops):
    """(group, class, float32 elements) of groups with non-scalar float32 training math."""
    totals = {}
    for row in float_ops:
        if row.phase == PHASE_METRICS or row.scalar_only or row.elements == 0:
            continue
        key = (row.group, row.group_class)
        totals[key] = totals.get(key, 0) + row.elements
    return sorted(((g, c, n) for (g, c), n in totals.items()), key=lambda t: -t[2])


def _summary(traced, counts, wide_percent, responsible, variables):
    wide_state = [r for r in variables if r.dtype in WIDE_FLOAT_DTYPES
                  and r.role in (ROLE_TRAINABLE, ROLE_STATISTIC, ROLE_SLOT, ROLE_KAHAN)]
    state = (f"{len(wide_state)} float32/float64 per-parameter variable(s)" if wide_state
             else "No float32/float64 per-parameter state")
    if not traced:
        return f"{state}; the train step was not traced."
    text = (f"{wide_percent:.1f}% of the float elements produced in the train step "
            f"({counts['wide']:,} of {counts['float']:,}) come from float32/float64 ops")
    if responsible:
        text += "; responsible: " + ", ".join(
            f"{g} ({c}, {_percent(n, counts['wide'])})" for g, c, n in responsible)
    else:
        text += " (scalar bookkeeping only)" if counts["wide"] else ""
    text += f". {state}."
    if counts["fused"]:
        text += (f" Fused updates: {counts['fused']:,} parameters updated in float32 "
                 "registers, stored in bf16 (by design).")
    if counts["metric_wide"]:
        text += f" Metrics (excluded): {counts['metric_wide']:,} float32 elements."
    return text


def _percent(part, whole):
    share = 100.0 * part / whole if whole else 0.0
    return "<1%" if 0 < share < 1 else f"{share:.0f}%"


def _compiled_losses(model, loss):
    if loss is not None:
        return [loss]
    compiled = getattr(model, "loss", None)
    if isinstance(compiled, dict):
        return list(compiled.values())
    if isinstance(compiled, (list, tuple)):
        return list(compiled)
    return [compiled] if compiled is not None else []


def _loss_scope_name(loss):
    if isinstance(loss, str):
        return loss
    if isinstance(loss, keras.losses.Loss):
        return loss.name
    return getattr(loss, "__name__", None)


def _loss_fix(model, loss, loss_name):
    losses = _compiled_losses(model, loss)
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
        return ("yes", "model.compile(loss=tf_bf16.audit.bf16_loss(loss)) with loss = your "
                f"{what}: softmax cross-entropy on logits in bf16 "
                "with a cancellation-free gradient (see bf16_loss's docstring).")
    return ("no", reason if losses else "Could not tell which compiled loss this is; "
            "bf16_loss covers softmax cross-entropy on logits only.")


def _fixes(model, optimizer, loss, variables, float_ops, fused_ops):
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
            "design: a bf16 running total stalls after 256 equal increments. They are not "
            "training math and are left out of the percentage."))
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
    return fixes


def _group_fix(model, optimizer, loss, group, class_name, kind):
    finding = f"{class_name or group} computes in float32"
    if kind == KIND_LOSS:
        sound, how = _loss_fix(model, loss, group[len("loss: "):])
        return FixRow("loss computed in float32 (Keras losses cast y_pred to floatx)", group,
                      sound, how)
    if kind == KIND_OPTIMIZER:
        name = type(optimizer).__name__
        if type(optimizer).__module__.startswith("tf_bf16"):
            if any(_dtype_name(v.dtype) in WIDE_FLOAT_DTYPES
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
    if layer is not None and any(_dtype_name(v.dtype) in WIDE_FLOAT_DTYPES
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


def _find_layer(model, name):
    for layer in model._flatten_layers(include_self=True):
        if layer.name == name:
            return layer
    return None


def _standing_notes(traced):
    notes = []
    if traced:
        notes.append("The step is traced, not run. Kernel-internal accumulation is not "
                     "visible: bf16 MatMul/Conv/Sum kernels may accumulate in float32 "
                     "inside, as bf16 hardware does; they count as bf16.")
    return notes


# ---------------------------------------------------------------------------
# The fix: softmax cross-entropy on logits in bfloat16


def bf16_loss(loss, from_logits=None):
    """Softmax cross-entropy on logits computed entirely in bfloat16.

    Returns a `BFloat16SoftmaxCrossEntropy` to pass to `model.compile(loss=...)`
    in place of a `SparseCategoricalCrossentropy(from_logits=True)` or a
    `CategoricalCrossentropy(from_logits=True)` (one-hot labels). Keras
    losses cast `y_pred` to float32 (floatx), so the loss, its gradient and
    the softmax run in 32 bits; this loss keeps every float tensor of the
    loss and of its gradient in bf16 (the traced step has only the scalar
    total in float32, which Keras casts to floatx for its loss tracker).

    What it computes, per example (logits `z` in bf16, label `y`, `m = max z`,
    `d = z - m <= 0`, `e = exp(d)`, so `e[argmax] = 1`):

    ```
    tail  = sum of e over the classes other than argmax(z)     (>= 0)
    loss  = log1p(tail) - d[y]                                  (two terms >= 0)
    dL/dz_j = e_j / (1 + tail)                                 j != y
    dL/dz_y = -(sum of e over the classes other than y) / (1 + tail)
    ```

    Why this is sound (and a plain bf16 cross-entropy is not). `u = 2^-8` is
    bf16's unit roundoff (half the spacing just above 1.0):

    - The textbook gradient `softmax(z) - onehot(y)` cancels for the label
      class: once the model is confident (`p_y > 1 - 2^-9`), `p_y` rounds to
      1.0 and the label's gradient is exactly 0 while the other classes still
      get theirs, so confident examples stop pulling their logit up and the
      gradient no longer sums to zero. Here `1 - p_y` is a sum of the other
      classes' positive terms, never `1 - p_y`: every gradient element keeps
      a small *relative* error whatever the confidence. To first order it is
      at most `(|d_j| + max_k |d_k| + 6) * u` (rounding of `d`, of `exp`, of
      the sums, of `1 + tail`, of the division), which `tests/test_audit.py`
      checks against a float64 reference.
    - The loss value `log(sum exp d)` would round to 0 for confident examples
      (`1 + tail` is 1.0 once `tail <= u`); `log1p(tail)` keeps its relative
      precision, and adding `-d[y] >= 0` cannot cancel.
    - The largest error term is the rounding of `d = z - m` (exact when `z_j`
      and `m` are within a factor 2, otherwise up to `|d| * u`), which changes
      `p_j` by a relative `|d| * u`. That is the order of the quantization the
      bf16 logits already carry: one ulp of a logit of size `|z|` (between
      `|z| * u` and `|z| * 2u`) moves its probability by that much relative.
      The large-`|d|` elements are the tiny probabilities (`e^-20`...), whose
      absolute contribution is negligible. It is not float32 accuracy: the
      float32 path computes the gradient of the bf16 logits to ~1e-7.
    - The batch mean is computed in bf16 too: its gradient is the constant
      `1/N` (rounded: one uniform scale error of at most `u`, like a
      learning-rate change below 0.4%), so the *gradient* does not depend on
      the mean's precision. The *reported* loss value does: 2 to 3
      significant digits. Sample weights are cast to bf16 (relative error up
      to `u` each).

    What is not offered, and why:

    - `from_logits=False` (a softmax layer before the loss): a probability
      above `1 - 2^-9` rounds to 1.0 in bf16, whose log is 0, and the gradient
      `-1/p * dp` inherits the cancellation above. Remove the softmax and use
      logits.
    - Soft labels / `label_smoothing`: their gradient `p - y` cancels near the
      optimum (`p ~= y`) in any formulation, leaving bf16 rounding noise of
      `p * u`; not sound in bf16. One-hot labels are checked in the graph
      (a failing assertion, not a silent change of meaning).
    - Regression losses (MSE, MAE, Huber): the per-element math is easy, but
      the targets must be cast to bf16, which rounds each target by up to
      `|y| * u`; residuals smaller than that are lost (a target of 1001.3
      becomes 1000, where the bf16 spacing is 4). That is only sound when the
      targets are exactly representable in bf16, which a loss cannot know.
      Their float32 cost is elementwise over the outputs only; they are left
      in float32.
    - Integer labels are not cast to bf16 (labels above 256 are not exact in
      bf16); they stay integers.

    Args:
        loss: a `keras.losses.SparseCategoricalCrossentropy` or
            `keras.losses.CategoricalCrossentropy` instance with
            `from_logits=True` (no `ignore_class`, `label_smoothing=0`, last
            axis), or the name `"sparse_categorical_crossentropy"` /
            `"categorical_crossentropy"` together with `from_logits=True`.
        from_logits: only with a loss name; must be `True`.

    Returns:
        A `BFloat16SoftmaxCrossEntropy` with the same name and reduction.

    Raises:
        ValueError: for a configuration that has no sound bf16 form (the
            message says why), or `TypeError` for another kind of loss.
    """
    if isinstance(loss, str):
        name = loss.lower()
        if name not in ("sparse_categorical_crossentropy", "categorical_crossentropy"):
            raise TypeError(_unsupported_loss_message(loss))
        if from_logits is not True:
            raise ValueError(
                f"bf16_loss('{loss}'): a loss name means from_logits=False (probabilities). "
                "In bf16 a probability above 1 - 2^-9 rounds to 1 (log 0) and its gradient "
                "cancels; there is no sound bf16 form. Output logits and pass "
                "from_logits=True.")
        return BFloat16SoftmaxCrossEntropy(sparse=name.startswith("sparse"), name=f"bf16_{name}")
    if isinstance(loss, BFloat16SoftmaxCrossEntropy):
        return loss
    if from_logits is not None:
        raise ValueError("bf16_loss: `from_logits` goes with a loss name; a loss instance "
                         "carries its own.")
    sparse = isinstance(loss, keras.losses.SparseCategoricalCrossentropy)
    if not sparse and not isinstance(loss, keras.losses.CategoricalCrossentropy):
        raise TypeError(_unsupported_loss_message(loss))
    config = loss.get_config()
    what = type(loss).__name__
    if not config.get("from_logits", False):
        raise ValueError(
            f"bf16_loss({what}(from_logits=False)): the cross-entropy of probabilities has "
            "no sound bf16 form (a probability above 1 - 2^-9 rounds to 1, log 0, and its "
            "gradient cancels). Remove the final softmax and use from_logits=True.")
    if config.get("ignore_class") is not None:
        raise ValueError(f"bf16_loss({what}): ignore_class is not supported; mask with "
                         "sample weights instead.")
    if config.get("label_smoothing"):
        raise ValueError(
            f"bf16_loss({what}(label_smoothing={config['label_smoothing']})): smoothed "
            "labels make the gradient p - y cancel near the optimum, leaving bf16 rounding "
            "noise; not sound in bf16.")
    if config.get("axis", -1) != -1:
        raise ValueError(f"bf16_loss({what}): only axis=-1 is supported.")
    return BFloat16SoftmaxCrossEntropy(sparse=sparse, name=f"bf16_{loss.name}",
                                       reduction=loss.reduction)


def _unsupported_loss_message(loss):
    return (f"bf16_loss: no sound bf16 form is implemented for "
            f"{_loss_identifier_name(loss) or type(loss).__name__}. Supported: "
            "SparseCategoricalCrossentropy / CategoricalCrossentropy with from_logits=True. "
            "Regression losses are not offered: casting targets to bf16 rounds them by "
            "|y|*2^-8, which is only sound for targets exactly representable in bf16.")


@keras.saving.register_keras_serializable(package="tf_bf16")
class BFloat16SoftmaxCrossEntropy(keras.losses.Loss):
    """Softmax cross-entropy on logits in bfloat16; build it with `bf16_loss`.

    Args:
        sparse: `True` for integer labels (as `SparseCategoricalCrossentropy`),
            `False` for one-hot labels (as `CategoricalCrossentropy`; checked
            in the graph).
        name: loss name (also the name scope of its ops).
        reduction: as `keras.losses.Loss`; computed in bf16.
    """

    def __init__(self, sparse=True, name=None, reduction="sum_over_batch_size"):
        super().__init__(name=name or "bf16_softmax_cross_entropy", reduction=reduction,
                         dtype="bfloat16")
        self.sparse = bool(sparse)

    def __call__(self, y_true, y_pred, sample_weight=None):
        # Not Loss.__call__: that casts y_true to the loss dtype, and integer
        # labels above 256 are not exact in bf16.
        mask = _keras_backend.get_keras_mask(y_pred)
        with keras.name_scope(self.name):
            y_pred = tf.cast(y_pred, tf.bfloat16)
            losses = self.call(y_true, y_pred)
            return _keras_loss.reduce_weighted_values(
                losses, sample_weight=sample_weight, mask=mask, reduction=self.reduction,
                dtype="bfloat16")

    def call(self, y_true, y_pred):
        logits = tf.cast(y_pred, tf.bfloat16)
        if self.sparse:
            labels = tf.convert_to_tensor(y_true)
            if labels.shape.rank == logits.shape.rank and labels.shape[-1] == 1:
                labels = tf.squeeze(labels, axis=-1)
            labels = tf.cast(labels, tf.int32)  # from int or integer-valued float: exact
        else:
            labels = _one_hot_labels(y_true)
        return softmax_cross_entropy_bf16(labels, logits)

    def get_config(self):
        return {"sparse": self.sparse, "name": self.name, "reduction": self.reduction}


def _one_hot_labels(y_true):
    """Class indices of one-hot targets; an assertion fails on soft targets."""
    y_true = tf.convert_to_tensor(y_true)
    # Comparisons only (bool results): no float arithmetic on the targets.
    is_zero_or_one = tf.logical_or(tf.equal(y_true, 0), tf.equal(y_true, 1))
    one_per_row = tf.equal(tf.math.count_nonzero(y_true, axis=-1), 1)
    check = tf.debugging.Assert(
        tf.logical_and(tf.reduce_all(is_zero_or_one), tf.reduce_all(one_per_row)),
        ["bf16_loss: categorical targets must be one-hot (soft labels have no sound bf16 "
         "cross-entropy)"])
    with tf.control_dependencies([check]):
        return tf.argmax(y_true, axis=-1, output_type=tf.int32)


def softmax_cross_entropy_bf16(labels, logits):
    """Per-example softmax cross-entropy of bf16 logits, in bf16 (see `bf16_loss`).

    Args:
        labels: int32 class indices of shape `logits.shape[:-1]`.
        logits: bfloat16 tensor `[..., classes]`.

    Returns:
        bfloat16 per-example losses of shape `logits.shape[:-1]`, with a
        custom gradient that has no cancellation for the label class.
    """
    logits = tf.convert_to_tensor(logits)
    if logits.dtype != tf.bfloat16:
        raise ValueError(f"softmax_cross_entropy_bf16: logits are {logits.dtype.name}; "
                         "pass bfloat16.")
    classes = tf.shape(logits)[-1]
    is_label = tf.one_hot(labels, classes, on_value=True, off_value=False, dtype=tf.bool)

    @tf.custom_gradient
    def cross_entropy(logits):
        top = tf.argmax(logits, axis=-1, output_type=tf.int32)
        is_top = tf.one_hot(top, classes, on_value=True, off_value=False, dtype=tf.bool)
        shifted = logits - tf.reduce_max(logits, axis=-1, keepdims=True)  # <= 0
        exps = tf.exp(shifted)  # in (0, 1]; exactly 1 at argmax
        zeros = tf.zeros_like(exps)
        tail = tf.reduce_sum(tf.where(is_top, zeros, exps), axis=-1)
        # Selecting with a sum of zeros is exact: shifted[label].
        label_shift = tf.reduce_sum(tf.where(is_label, shifted, zeros), axis=-1)
        loss = tf.math.log1p(tail) - label_shift

        def gradient(upstream):
            denominator = 1 + tail[..., tf.newaxis]
            # 1 - p_label as a sum of positive terms, never as 1 - p_label.
            others = tf.reduce_sum(tf.where(is_label, zeros, exps), axis=-1, keepdims=True)
            per_class = tf.where(is_label, -others / denominator, exps / denominator)
            return tf.cast(upstream, tf.bfloat16)[..., tf.newaxis] * per_class

        return loss, gradient

    return cross_entropy(logits)


# `tf_bf16.audit` is this module's `audit` function once the package imports
# it; these make `tf_bf16.audit.bf16_loss(...)` work as documented.
audit.bf16_loss = bf16_loss
audit.AuditReport = AuditReport
audit.BFloat16SoftmaxCrossEntropy = BFloat16SoftmaxCrossEntropy
audit.softmax_cross_entropy_bf16 = softmax_cross_entropy_bf16
