"""The tables of ``bench-gpu`` (tf_bf16/lab/bench_gpu.py): text for stdout,
Markdown for docs/bench_gpu.md, from the results dict that bench_gpu.run
makes. Not for measuring anything."""

from tf_bf16.lab import common
from tf_bf16.lab.bench_gpu import FIT_VARIANTS, LABELS


def _gib(value):
    return "-" if not value else f"{value / 2**30:.2f}"


def _x(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}x"


def _update_table(update):
    header = ["update (bf16 unless said)", "B/param", "median ms", "eff. GB/s", "copy ms",
              "copy GB/s", "% of copy", "vs nearest"]
    body = [[r["label"], str(r["bytes_per_parameter"]), f"{r['median_ms']:.3f}",
             f"{r['effective_gb_s']:.0f}", f"{r['copy_ms']:.3f}", f"{r['copy_gb_s']:.0f}",
             f"{100 * r['fraction_of_copy']:.1f}%", _x(r["vs_nearest"])]
            for r in update["rows"]]
    return header, body


def _fit_table(fit):
    header = ["variant", "ms/step", "IQR ms", "vs mixed", "peak GiB", "vs mixed",
              "compile+warmup s", "loss"]
    body = []
    for variant in FIT_VARIANTS:
        r = fit["rows"].get(variant)
        if r is None:
            if variant in fit["skipped"]:
                body.append([LABELS[variant], "-", "-", "-", "-", "-", "-",
                             "not run: " + fit["skipped"][variant][:60]])
            continue
        body.append([LABELS[variant], f"{r['median_ms']:.2f}",
                     f"{r['p25_ms']:.2f}-{r['p75_ms']:.2f}", _x(r["step_ratio"]),
                     _gib(r["peak_bytes"]), _x(r["memory_ratio"]),
                     f"{r['compile_and_warmup_s']:.0f}", f"{r['loss']:.3f}"])
    return header, body


def _capacity_table(capacity):
    header = ["variant", "GiB/block (compiled)", "GiB at depth 0", "predicted depth",
              "predicted GiB", "trained depth", "parameters", "peak GiB", "vs mixed",
              "depth + 1"]
    body = []
    for variant, row in capacity["rows"].items():
        above = row.get("above")
        if above is None:
            above_text = "-"
        elif "skipped" in above:
            above_text = "not run"
        else:
            above_text = "trains" if above.get("fits") else "does not fit"
        confirmed = row.get("confirmed_depth")
        body.append([LABELS[variant], f"{row['bytes_per_block'] / 2**30:.3f}",
                     f"{row['base_bytes'] / 2**30:.3f}", str(row["predicted_depth"]),
                     _gib(row.get("predicted_bytes")),
                     str(confirmed) if confirmed else
                     ("not confirmed" if row.get("runs") else "not run"),
                     "-" if not row.get("confirmed_parameters") else
                     f"{row['confirmed_parameters']:,}",
                     _gib(row.get("peak_bytes")), _x(row.get("ratio"), 2), above_text])
    return header, body


def _spec_text(spec):
    layers = f", {spec['layers']} blocks" if "layers" in spec else ""
    return (f"dim {spec['dim']}{layers}, {spec['heads']} heads, feed-forward {spec['ff_dim']}, "
            f"sequence {spec['seq_len']}, batch {spec['batch_size']}")


def _sections(results):
    """(title, note lines, (header, body) or None) for every part."""
    out = []
    update = results.get("update")
    if update is not None:
        notes = ["Effective bandwidth: bytes each tensor is read and written once / median time "
                 f"of one call (timings of {results['config']['update_calls']} chained calls, "
                 f"median of {results['config']['update_repeats']}; donated buffers, blocked "
                 "at the end); copy: a donated XOR with a run-time "
                 "zero over the same bytes, timed in the same process; vs nearest: time / the "
                 "nearest-rounding update's."]
        if update.get("skipped"):
            notes.append(f"Not measured: {update['skipped']}")
        out.append((f"1. The optimizer update alone: {update['parameters']:,} parameters",
                    notes, _update_table(update) if update["rows"] else None))
    fit = results.get("fit")
    if fit is not None:
        params = next((r["parameters"] for r in fit["rows"].values()), None)
        notes = [f"ms/step: median over {fit['rounds']} rounds of one fit call each, timed from "
                 f"its second batch to its end over {fit['steps']} steps (dispatched "
                 "asynchronously, blocked on the weights at the end); vs mixed: / "
                 "mixed_bfloat16's. Peak GiB: JAX's peak_bytes_in_use of the variant's own "
                 "process. Adam (learning rate 3e-4): stock Keras Adam for float32 and "
                 "mixed_bfloat16, tf_bf16.optimizers.Adam for bf16."]
        out.append((f"2. model.fit step: GPT-style char model, "
                    f"{'?' if params is None else format(params, ',')} parameters "
                    f"({_spec_text(fit['spec'])})", notes,
                    _fit_table(fit) if (fit["rows"] or fit["skipped"]) else None))
    capacity = results.get("capacity")
    if capacity is not None:
        notes = []
        if capacity.get("limit_bytes"):
            notes.append(
                f"Memory limit {capacity['limit_bytes'] / 2**30:.2f} GiB "
                f"({capacity['limit_source']}), {capacity['margin']:.0%} kept free. Compiled "
                "bytes (arguments + outputs not aliased + temporaries of the train step "
                f"at depths {capacity['depths'][0]} and {capacity['depths'][1]}) extrapolated "
                "per block; the predicted depth was trained "
                "(one block less if it ran out of memory); depth + 1: tried with the time left.")
        for variant, why in capacity["skipped"].items():
            notes.append(f"{variant}: {why}")
        out.append((f"3. Largest model that trains, width {capacity['spec']['dim']} "
                    f"({_spec_text(capacity['spec'])})", notes,
                    _capacity_table(capacity) if capacity["rows"] else None))
    return out


def format_text(results):
    lines = ["tf_bf16 GPU benchmark on Keras's JAX backend (bench-gpu)"]
    if results.get("machine"):
        lines.append(f"machine: {common.machine_line(results['machine'])}")
    lines.append(f"command: {results['config']['command']}")
    for title, notes, table in _sections(results):
        lines += ["", "== " + title]
        if table is not None:
            lines.append(common.text_table(*table, left=(0,)))
        lines += notes
    lines += common.verdict_lines(results)
    return "\n".join(lines)


def format_markdown(results):
    out = ["### GPU benchmark on Keras's JAX backend", ""]
    if results.get("machine"):
        out += [f"Machine: {common.machine_line(results['machine'])}.", ""]
    out += [f"Command: `{results['config']['command']}`; {results['elapsed_s'] / 60:.1f} min.",
            ""]
    for title, notes, table in _sections(results):
        out += [f"#### {title}", ""]
        if table is not None:
            out += [common.markdown_table(*table, left=(0,)), ""]
        out += [" ".join(notes), ""]
    out += ["#### Targets", ""]
    for t in results["targets"]:
        out.append(f"- **{t['status']}** {t['target']}: {t['value']} (target {t['threshold']})")
    out.append("")
    return "\n".join(out)

