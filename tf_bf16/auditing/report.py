"""The audit's result: its rows, its summary paragraph and how it is printed.

`AuditReport` holds the rows the other modules of tf_bf16.auditing compute
(variables, float32 ops, upcasts, fused ops, fixes) as dataclasses, and renders
them as aligned text, Markdown or JSON. The vocabulary the rows use (roles,
phases, kinds, dtypes) is defined here, once.

Not here: how the rows are computed (inventory.py, trace.py, fixes.py).
"""

import dataclasses
import json
import re
import textwrap

import numpy as np

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
PHASE_ORDER = (PHASE_FORWARD, PHASE_BACKWARD, PHASE_UPDATE, PHASE_METRICS)

KIND_LAYER = "layer"
KIND_LOSS = "loss"
KIND_OPTIMIZER = "optimizer"
KIND_METRIC = "metric"
KIND_OTHER = "other"

WIDE_FLOAT_DTYPES = ("float32", "float64")
NARROW_FLOAT_DTYPES = ("bfloat16", "float16")

FUSED_OP_PREFIX = "TfBf16>"
FUSED_LABEL = "fused update (float32 registers, bf16 storage)"


# ---------------------------------------------------------------------------
# Rows


@dataclasses.dataclass
class VariableRow:
    """One variable: where it lives, what it is for, what it costs.

    `owner` is the path of the layer that created it in the model (see
    `inventory.layer_paths`), or the optimizer's or the metric's name.
    """

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
    A finding made in several groups (every LayerNormalization of a
    transformer) is one row: `groups` lists them, `group` joins them.
    """

    finding: str
    group: str
    sound: str
    how: str
    groups: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if not self.groups:
            self.groups = [self.group]


def merge_fixes(fixes):
    """One `FixRow` per distinct (finding, sound, how), its groups in order."""
    merged = {}
    for fix in fixes:
        key = (fix.finding, fix.sound, fix.how)
        if key in merged:
            merged[key].groups.extend(g for g in fix.groups if g not in merged[key].groups)
        else:
            merged[key] = FixRow(fix.finding, fix.group, fix.sound, fix.how, list(fix.groups))
    for fix in merged.values():
        fix.group = ", ".join(fix.groups)
    return list(merged.values())


# ---------------------------------------------------------------------------
# The report


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

    def to_text(self, detail="full"):
        """The aligned plain-text report (`print(report)` shows the full one).

        Args:
            detail: `"full"`: every variable and every (group, phase, op type)
                row, each fix with its explanation. `"summary"`: one screen:
                variables by role and dtype, float32 compute by layer class,
                each fix in one or two lines.
        """
        return self._render_summary(markdown=False) if _detail(detail) == "summary" \
            else self._render(markdown=False)

    def to_markdown(self, detail="full"):
        """The report as Markdown: headings and pipe tables (`detail` as in `to_text`)."""
        return self._render_summary(markdown=True) if _detail(detail) == "summary" \
            else self._render(markdown=True)

    # -- rendering ----------------------------------------------------------

    def _render_summary(self, markdown):
        out = []

        def heading(text):
            out.append("")
            out.append(f"## {text}" if markdown else text)

        def table(headers, rows, right=()):
            out.append(_table(headers, rows, right, markdown))

        title = f"tf_bf16 audit of {self.model} (summary)"
        out.append(f"# {title}" if markdown else f"{title}\n{'=' * len(title)}")
        out.append(f"optimizer: {self.optimizer}")
        out.append(f"sample batch: {self.sample}")
        out.append(f"traced: {self.traced}")
        out.append("")
        out.append(("**Summary:** " + self.summary) if markdown else textwrap.fill(
            "Summary: " + self.summary, width=100))

        heading(f"Variables by role ({len(self.variables)})")
        by_role = {}
        for row in self.variables:
            total = by_role.setdefault((row.role, row.dtype), [0, 0, 0])
            total[0] += 1
            total[1] += row.elements
            total[2] += row.bytes
        table(["role", "dtype", "variables", "elements", "bytes"],
              [[role, dtype, n, f"{e:,}", f"{b:,}"]
               for (role, dtype), (n, e, b) in by_role.items()], right={2, 3, 4})
        state = self.training_state
        out.append(f"Training state: {state.bytes_per_parameter:.2f} B/parameter "
                   f"({state.total_bytes:,} B for {state.trainable_parameters:,} parameters)")

        heading("float32/float64 compute by class (metrics: not in the percentage)")
        classes = {}
        for row in self.float_ops:
            key = (row.group_class or row.group, row.kind)
            entry = classes.setdefault(key, dict(groups=set(), ops=0, elements=0,
                                                 scalar=True, upcast=0))
            entry["groups"].add(row.group)
            entry["ops"] += row.count
            entry["elements"] += row.elements
            entry["scalar"] = entry["scalar"] and row.scalar_only
        for row in self.upcasts:
            key = (row.group_class or row.group, row.kind)
            if key in classes:
                classes[key]["upcast"] += row.elements
        if classes:
            ordered = sorted(classes.items(), key=lambda kv: (kv[0][1] == "metric",
                                                              -kv[1]["elements"]))
            table(["class", "kind", "groups", "ops", "float32 elements", "upcast elements",
                   "note"],
                  [[c, k, len(e["groups"]), e["ops"], f"{e['elements']:,}",
                    f"{e['upcast']:,}", "scalar" if e["scalar"] else ""]
                   for (c, k), e in ordered], right={2, 3, 4, 5})
        else:
            out.append("none")
        if self.fused_ops:
            fused = {}
            for row in self.fused_ops:
                entry = fused.setdefault((row.op_type, row.rounding), [0, 0])
                entry[0] += row.count
                entry[1] += row.elements
            out.append("Fused tf_bf16 ops (float32 registers, bf16 storage): " + "; ".join(
                f"{op} ({rounding}) x{n}, {e:,} elements"
                for (op, rounding), (n, e) in fused.items()))

        heading("Fixes (each once; to_text() explains them and lists every row)")
        for fix in self.fixes:
            where = fix.groups[0] if len(fix.groups) == 1 else f"{len(fix.groups)} groups"
            first = re.split(r"(?<=[a-z0-9)])\. (?=[A-Z])", fix.how)[0].rstrip(".") + "."
            line = f"[{fix.sound}] {fix.finding} -- {where}"
            if markdown:
                out.append(f"- {line}: {first}")
            else:
                # The fix itself ("yes") in full; the reasons against, their first line.
                lines = textwrap.wrap(first, width=94)
                if fix.sound != "yes" and len(lines) > 1:
                    lines = [lines[0] + " ..."]
                out.append(line)
                out.extend("      " + text for text in lines)
        return "\n".join(out) + "\n"

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
            table(["finding", "groups", "sound fix?", "how / why not"],
                  [[f.finding, f.group, f.sound, f.how] for f in self.fixes])
        else:
            # The explanations are sentences: wrapped paragraphs, not a table.
            # A finding made in several groups is said once, with the groups.
            for fix in self.fixes:
                if len(fix.groups) == 1:
                    out.append(f"[{fix.sound}] {fix.group}: {fix.finding}")
                else:
                    out.append(f"[{fix.sound}] {fix.finding}")
                    out.append(textwrap.fill(f"in {len(fix.groups)} groups: {fix.group}",
                                             width=96, initial_indent="      ",
                                             subsequent_indent="        "))
                out.append(textwrap.fill(fix.how, width=96, initial_indent="      ",
                                         subsequent_indent="      "))

        if self.notes:
            heading("Notes")
            for note in self.notes:
                out.append(f"- {note}")
        return "\n".join(out) + "\n"


def _detail(detail):
    if detail not in ("full", "summary"):
        raise ValueError(f"detail must be 'full' or 'summary', got {detail!r}.")
    return detail


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
# The summary paragraph


def responsible(float_ops):
    """(group, class, float32 elements) of groups with non-scalar float32 training math."""
    totals = {}
    for row in float_ops:
        if row.phase == PHASE_METRICS or row.scalar_only or row.elements == 0:
            continue
        key = (row.group, row.group_class)
        totals[key] = totals.get(key, 0) + row.elements
    return sorted(((g, c, n) for (g, c), n in totals.items()), key=lambda t: -t[2])


def responsible_classes(float_ops):
    """(class, kind, groups, float32 elements) of the groups with non-scalar float32
    training math, one entry per class and kind, most float32 elements first."""
    totals = {}
    for group, class_name, elements in responsible(float_ops):
        kind = next(r.kind for r in float_ops if r.group == group)
        entry = totals.setdefault((class_name or group, kind), [[], 0])
        entry[0].append(group)
        entry[1] += elements
    return sorted(((c, k, g, n) for (c, k), (g, n) in totals.items()), key=lambda t: -t[3])


def summary(traced, counts, wide_percent, responsible_groups, variables):
    """The report's summary paragraph (`responsible_groups`: from `responsible_classes`:
    one entry per class, so that twelve transformer blocks make one entry)."""
    wide_state = [r for r in variables if r.dtype in WIDE_FLOAT_DTYPES
                  and r.role in (ROLE_TRAINABLE, ROLE_STATISTIC, ROLE_SLOT, ROLE_KAHAN)]
    state = (f"{len(wide_state)} float32/float64 per-parameter variable(s)" if wide_state
             else "No float32/float64 per-parameter state")
    if not traced:
        return f"{state}; the train step was not traced."
    text = (f"{wide_percent:.1f}% of the float elements produced in the train step "
            f"({counts['wide']:,} of {counts['float']:,}) come from float32/float64 ops")
    if responsible_groups:
        text += "; responsible: " + ", ".join(
            f"{groups[0]} ({c}, {_percent(n, counts['wide'])})" if len(groups) == 1 else
            f"{len(groups)} {c} {'layers' if kind == KIND_LAYER else 'groups'} "
            f"({_percent(n, counts['wide'])})"
            for c, kind, groups, n in responsible_groups)
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
