"""The audit's trace: one training step as a graph, its ops attributed and counted.

The step `fit` would run is traced with `tf.function` (not run), with the
sample batch's exact shapes, while the TF backend's `name_scope` is watched to
learn which layer, loss or optimizer opened each scope. Every op of the graph,
function bodies included, is then attributed to a group (layer, loss,
optimizer, metric) and a phase (forward, backward, update, metrics), and the
ops that produce float32/float64 tensors are counted into `FloatOpRow`s,
`UpcastRow`s and `FusedOpRow`s.

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

Sample batch: `x`, `y` and `sample_weight` are whatever `fit` accepts
(arrays, tuples, lists or dicts of them, a `tf.data.Dataset`, a generator, a
`PyDataset`); Keras's data adapter makes the batches, as in `fit`, and the
first one is traced (arrays are one batch unless `batch_size` is given). When
`x` is not given it is built from the model's inputs, in their structure (a
dict for dict-input models such as keras-hub's): zeros of each input's dtype
and shape, the batch dimension set to 2 and any other unknown dimension to 8.
When `y` is not given it is zeros of each output's shape (float32), or integer
class labels of shape `output.shape[:-1]` when the compiled loss is a sparse
categorical one. The values do not matter: the step is traced, not run.

Groups are named by the layer's path in the model (`inventory.layer_paths`):
"transformer_layer_0/self_attention_layer_norm", not a name that every
transformer block repeats.

Not here: the variables (inventory.py) and what to do about the findings
(fixes.py).
"""

import contextlib
import dataclasses
import math

import keras
import tensorflow as tf
from keras.src import tree
from keras.src.backend.tensorflow import core as _keras_tf_core
from keras.src.trainers import data_adapters

from tf_bf16 import policy as _policy
from tf_bf16.auditing.inventory import layer_paths
from tf_bf16.auditing.report import FUSED_OP_PREFIX
from tf_bf16.auditing.report import KIND_LAYER
from tf_bf16.auditing.report import KIND_LOSS
from tf_bf16.auditing.report import KIND_METRIC
from tf_bf16.auditing.report import KIND_OPTIMIZER
from tf_bf16.auditing.report import KIND_OTHER
from tf_bf16.auditing.report import NARROW_FLOAT_DTYPES
from tf_bf16.auditing.report import PHASE_BACKWARD
from tf_bf16.auditing.report import PHASE_FORWARD
from tf_bf16.auditing.report import PHASE_METRICS
from tf_bf16.auditing.report import PHASE_ORDER
from tf_bf16.auditing.report import PHASE_UPDATE
from tf_bf16.auditing.report import WIDE_FLOAT_DTYPES
from tf_bf16.auditing.report import FloatOpRow
from tf_bf16.auditing.report import FusedOpRow
from tf_bf16.auditing.report import UpcastRow

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


# ---------------------------------------------------------------------------
# Sample batch and tracing


def to_tensors(value):
    """Arrays to tensors as Keras hands them to the step (float64 becomes float32)."""
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


def sample_batch(model, x, y, loss, sample_weight=None, batch_size=None):
    """(x, y, sample_weight, description): one batch of what `fit` would get.

    `x`, `y`, `sample_weight` are anything `model.fit` accepts (arrays, lists,
    tuples or dicts of them, a `tf.data.Dataset`, a generator, a
    `keras.utils.PyDataset`); Keras's own data adapter turns them into batches,
    as in `fit`, and the first batch is traced. Arrays are one batch unless
    `batch_size` is given. With `x=None`, zeros in the structure of the model's
    inputs (a dict for dict-input models).
    """
    described = []
    if x is None:
        x = _zeros_like_inputs(model)
        described.append("x = zeros from model.inputs (batch 2)")
    else:
        if batch_size is None and data_adapters.array_data_adapter.can_convert_arrays(
                (x, y, sample_weight)):
            batch_size = int(tree.flatten(x)[0].shape[0])   # the arrays are one batch
        adapter = data_adapters.get_data_adapter(x, y, sample_weight, batch_size=batch_size,
                                                 shuffle=False)
        first = next(iter(adapter.get_tf_dataset()))
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(first)
        if not isinstance(adapter, data_adapters.ArrayDataAdapter):
            described.append(f"the first batch of {type(adapter).__name__}")
    x = to_tensors(x)
    if y is None:
        outputs = _model_outputs(model)
        compiled = loss if loss is not None else getattr(model, "loss", None)
        if outputs:
            targets = []
            for index, output in enumerate(outputs):
                shape = _concrete_shape(output.shape, batch_size=_batch_size(x))
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
    y = to_tensors(y)
    sample_weight = to_tensors(sample_weight)

    def spec(value):
        if isinstance(value, dict):
            return ", ".join(f"{k}: {spec(v)}" for k, v in value.items())
        return ", ".join(f"{t.dtype.name} {tuple(t.shape)}" for t in tf.nest.flatten(value))
    sample = f"x: {spec(x)}; y: {spec(y)}"
    if sample_weight is not None:
        sample += f"; sample_weight: {spec(sample_weight)}"
    if described:
        sample += " [" + "; ".join(described) + "]"
    return x, y, sample_weight, sample


def _batch_size(x):
    flat = [t for t in tf.nest.flatten(x) if t.shape.rank]
    return int(flat[0].shape[0]) if flat and flat[0].shape[0] is not None else 2


def _zeros_like_inputs(model):
    """Zeros of each model input's dtype and shape, in the model's input structure."""
    structure = getattr(model, "_inputs_struct", None)
    if structure is None:
        inputs = _model_inputs(model)
        if not inputs:
            raise ValueError("audit: the model has no `inputs` to build a sample batch "
                             "from (subclassed model?); pass `x`.")
        structure = inputs[0] if len(inputs) == 1 else inputs
    return tree.map_structure(
        lambda t: tf.zeros(_concrete_shape(t.shape), dtype=t.dtype), structure)


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


def trace_train_step(model, optimizer, x, y, loss, sample_weight=None):
    """((graph, scopes), description, notes) of the step `fit` would run, traced."""
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
        def step(x, y, sample_weight):
            data = (x, y) if sample_weight is None else (x, y, sample_weight)
            return model.train_step(data)
        traced = "model.train_step (what fit runs), in tf.function"
    else:
        if loss is None and not compiled_loss and not model.losses:
            raise ValueError("audit: the model has no compiled loss; compile it with one or "
                             "pass `loss=`.")
        loss_fn = keras.losses.get(loss) if isinstance(loss, str) else loss

        def step(x, y, sample_weight):
            with tf.GradientTape() as tape:
                y_pred = model(x, training=True)
                if loss_fn is not None:
                    with keras.name_scope(_LOSS_SCOPE):
                        value = (loss_fn(y, y_pred) if sample_weight is None
                                 else loss_fn(y, y_pred, sample_weight=sample_weight))
                    for extra in model.losses:
                        value = value + tf.cast(tf.reduce_sum(extra), value.dtype)
                else:
                    value = model.compute_loss(x=x, y=y, y_pred=y_pred,
                                               sample_weight=sample_weight, training=True)
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
        concrete = tf.function(step).get_concrete_function(x, y, sample_weight)
    return (concrete.graph, scopes), traced, notes


def _overrides_train_step(model):
    return type(model).train_step is not keras.Model.train_step and any(
        "train_step" in vars(cls) for cls in type(model).__mro__
        if cls.__module__.split(".")[0] not in ("keras", "tf_keras"))


# ---------------------------------------------------------------------------
# Attribution and counting


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
        self.paths = layer_paths(model)
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
                return self.group(("layer", id(caller)),
                                  self.paths.get(id(caller), caller.name),
                                  type(caller).__name__, KIND_LAYER), phase
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


def compiled_losses(model, loss):
    """The given loss, or the losses the model was compiled with, as a list."""
    if loss is not None:
        return [loss]
    compiled = getattr(model, "loss", None)
    if isinstance(compiled, dict):
        return list(compiled.values())
    if isinstance(compiled, (list, tuple)):
        return list(compiled)
    return [compiled] if compiled is not None else []


def analyse_graph(traced, model, optimizer, metric_owner, loss):
    """(float_ops, upcasts, fused_ops, counts, notes) of a traced step (see module doc)."""
    graph, scopes = traced
    notes = []
    loss_classes = {item.name: type(item).__name__ for item in compiled_losses(model, loss)
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
        key = (group.order, PHASE_ORDER.index(phase), op.type, dtype)
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
            key = (group.order, PHASE_ORDER.index(phase), source, dtype)
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
