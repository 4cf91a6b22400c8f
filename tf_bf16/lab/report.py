"""The outputs of ``python -m tf_bf16 compare`` and ``results``: tables, the
Markdown report (docs/results.md), the statistics over seeds, JSON files and
the learning-curve plots.

Not for training (tf_bf16/lab/runner.py) or the command line
(tf_bf16/lab/cli.py). matplotlib (lab extra) is imported by the plotting
functions only, so a report can be written without it.
"""

import json
import math
import os
import statistics

from tf_bf16.lab import common
from tf_bf16.lab.tasks.base import MIXED, STOCK

# A hand-written discussion next to the generated report; linked when present.
DISCUSSION = "results_discussion.md"
LABELS = {
    "float32": "float32",
    MIXED: "mixed_bfloat16",
    "nearest": "bf16 nearest",
    "stochastic": "bf16 SR",
    "kahan": "bf16 Kahan",
    STOCK: "bf16 stock Keras",
}
COLORS = {"float32": "black", MIXED: "tab:purple", "nearest": "tab:red", "stochastic": "tab:blue",
          "kahan": "tab:green", STOCK: "tab:gray"}

NEAREST_FOOTNOTE = (
    "nearest = Keras's \"bfloat16\" policy with the tf_bf16 optimizer and rounding=\"nearest\" "
    "(plain round-to-nearest bf16 training). It is not stock Keras because stock Keras Adam "
    "never moves a weight in pure bf16 (beta_2 = 0.999 rounds to 1.0 in bf16, so every step "
    "is 0) and stock SGD's momentum 0.9 becomes 0.898; `--include-stock` adds the stock "
    "Keras column.")


MIXED_FOOTNOTE = (
    "mixed_bfloat16 = Keras's \"mixed_bfloat16\" policy with the stock Keras optimizer: "
    "float32 weights and optimizer state (the master copy), bf16 compute.")


def variant_notes(variants):
    """The notes on the variants shown: nearest's always, mixed_bfloat16's when present."""
    return NEAREST_FOOTNOTE + (" " + MIXED_FOOTNOTE if MIXED in variants else "")


def learning_rate_text(cfg):
    """The learning rate of a config: its number, a schedule's class, or the
    optimizer's default."""
    schedule = cfg.get("schedule")
    if schedule and schedule.get("name") == "warmup_cosine":
        return (f"{cfg['learning_rate']} after {schedule['warmup_steps']} steps of linear "
                f"warmup, cosine decay to 0 over {schedule['decay_steps']}")
    if cfg.get("learning_rate") is not None:
        return str(cfg["learning_rate"])
    value = (cfg.get("optimizer_kwargs") or {}).get("learning_rate")
    if value is None:
        return "default"
    if isinstance(value, dict):
        return value.get("class_name", "schedule")
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_metric(task, value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    if "accuracy" in task.metric.lower():
        return f"{100 * value:.2f}%"
    return f"{value:.4g}"


def format_gap(task, gap):
    if gap is None or math.isnan(gap):
        return "nan"
    if "accuracy" in task.metric.lower():
        return f"{100 * gap:+.2f} pp"
    return f"{gap:+.3g}"


# ---------------------------------------------------------------------------
# compare: one task, one seed.

def compare_table(task, results):
    """The table of one run; runs on the JAX backend (tf_bf16/lab/jax_runner.py)
    add ms/step and the peak device memory of each variant's process."""
    device_columns = any("peak_device_bytes" in r for r in results.values())
    header = ["variant", "optimizer", task.metric or "metric", "gap to float32",
              "B/param", "state dtypes", "weights moved", "last 10%", "wall s"]
    if device_columns:
        header[-1:-1] = ["ms/step", "peak device GiB"]
    body = []
    for r in results.values():
        gap = r.get("gap_to_float32")
        row = [r["label"], r["optimizer"], format_metric(task, r["metric"]),
               "-" if gap is None or r["variant"] == "float32" else format_gap(task, gap),
               f"{r['bytes_per_parameter']:.2f}", "/".join(r["state_dtypes"]),
               f"{100 * r['weights_changed_fraction']:.1f}%",
               "-" if r.get("late_weights_changed_fraction") is None
               else f"{100 * r['late_weights_changed_fraction']:.1f}%",
               f"{r['wall_s']:.1f}"]
        if device_columns:
            ms, peak = r.get("ms_per_step"), r.get("peak_device_bytes")
            row[-1:-1] = ["-" if ms is None else f"{ms:.1f}",
                          "-" if peak is None else f"{peak / 2**30:.2f}"]
        body.append(row)
    return header, body


def _heading(task, cfg, seed):
    better = "higher" if task.higher_is_better else "lower"
    return (f"{task.name}: {_sentence(task.summary)} Metric: {task.metric} ({better} is better). "
            f"{cfg['optimizer']} lr {learning_rate_text(cfg)}, {_epochs(cfg['epochs'])}, "
            f"batch {cfg['batch_size']}, seed {seed}"
            + (", reduced configuration" if cfg["reduced"] else ""))


def compare_text(task, summary):
    """The text `compare` prints: heading, machine, table, notes, data facts, time."""
    results, cfg = summary["variants"], summary["config"]
    header, body = compare_table(task, results)
    lines = [_heading(task, cfg, summary["seed"]),
             f"machine: {common.machine_line(summary['machine'])}", "",
             common.text_table(header, body, left=(0, 1, 5)), "",
             "gap: variant - float32; B/param: training-state bytes per parameter (trainable "
             "weights + optimizer slots + Kahan buffers, from the variables); weights moved: "
             "share of trainable weights that differ from their initial value; last 10%: "
             "share that the last 10% of the steps changed (round-to-nearest leaves a weight "
             "untouched when every update was below half an ulp of it).",
             variant_notes(results)]
    info = next(iter(results.values()))["task_info"]
    if info:
        lines.append(f"data: {info_text(info)}")
    lines.append(f"total {summary['elapsed_s']:.1f} s")
    return "\n".join(lines)


def compare_markdown(task, summary):
    """The Markdown of `compare --out` / `--markdown` (without the plot)."""
    results, cfg = summary["variants"], summary["config"]
    header, body = compare_table(task, results)
    info = next(iter(results.values()))["task_info"]
    return "\n".join([
        f"### {task.name}", "", _heading(task, cfg, summary["seed"]) + ".", "",
        common.markdown_table(header, body, left=(0, 1, 5)), "",
        "Gap: variant - float32. B/param: training-state bytes per parameter (trainable "
        "weights + optimizer slots + Kahan buffers, from the variables). Weights moved: share "
        "of trainable weights that differ from their initial value; last 10%: share that the "
        "last 10% of the steps changed. " + variant_notes(results),
        ""] + ([f"Data: {info_text(info)}.", ""] if info else []) + [
        f"Machine: {common.machine_line(summary['machine'])}. Command: `{summary['command']}`. "
        f"Total {summary['elapsed_s']:.1f} s.", ""])


def write_compare(task, summary, out=None, json_path=None, markdown_path=None):
    """The files of one `compare` run; returns their paths.

    `out`: a directory for results.json, results.md and curves.png (the plot
    last: a failure while plotting must not lose the results); `json_path`,
    `markdown_path`: extra copies of the JSON and of the Markdown table.
    """
    md = compare_markdown(task, summary)
    files = []
    if out:
        os.makedirs(out, exist_ok=True)
        write_json(os.path.join(out, "results.json"), summary)
        with open(os.path.join(out, "results.md"), "w") as f:
            f.write(md + "\n![learning curves](curves.png)\n")
        files += [os.path.join(out, "results.json"), os.path.join(out, "results.md")]
    if json_path:
        write_json(json_path, summary)
        files.append(json_path)
    if markdown_path:
        os.makedirs(os.path.dirname(os.path.abspath(markdown_path)), exist_ok=True)
        with open(markdown_path, "w") as f:
            f.write(md)
        files.append(markdown_path)
    if out:
        png = os.path.join(out, "curves.png")
        plot_compare(png, task, summary)
        files.append(png)
    return files


def plot_compare(path, task, summary):
    """The learning curves of one `compare` run (one seed) to `path` (PNG)."""
    results = summary["variants"]
    first = next(iter(results.values()))
    plot_curves(path, task, {v: [r["curve"]] for v, r in results.items()},
                f"{task.name}, seed {summary['seed']}", first["steps_per_epoch"],
                first.get("curve_steps"))


# ---------------------------------------------------------------------------
# Plots and files.

def plot_curves(path, task, curves_by_variant, title, steps_per_epoch=None, curve_steps=None):
    """curves_by_variant: variant -> list of curves (one per seed); mean +- std band.
    curve_steps: the optimizer step of each point (x axis); else epochs 1, 2, ...

    With a float32 variant, a second panel shows each variant minus float32
    (paired by seed): the differences that matter are often far smaller than
    the metric's range over training and invisible in the first panel.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    arrays = {v: np.array(c, dtype=np.float64) for v, c in curves_by_variant.items()}
    length = {a.shape[1] for a in arrays.values()}
    show_gap = "float32" in arrays and len(arrays) > 1 and len(length) == 1
    if curve_steps and len(length) == 1 and len(curve_steps) == length.pop():
        x = np.asarray(curve_steps)
        xlabel = "optimizer step" + (f" ({steps_per_epoch} per epoch)" if steps_per_epoch else "")
    else:
        x = None
        xlabel = "epoch" + (f" ({steps_per_epoch} steps each)" if steps_per_epoch else "")
    fig, axes = plt.subplots(1, 2 if show_gap else 1, figsize=(12 if show_gap else 7, 4.5),
                             squeeze=False)
    ax = axes[0][0]
    values = np.concatenate([a.ravel() for a in arrays.values()])
    log_scale = (not task.higher_is_better and np.all(np.isfinite(values))
                 and np.all(values > 0))

    def band(axis, variant, arr, min_max=False):
        xs = x if x is not None else np.arange(1, arr.shape[1] + 1)
        mean = arr.mean(0)
        axis.plot(xs, mean, label=LABELS[variant], color=COLORS.get(variant), marker=".")
        if arr.shape[0] > 1:
            if min_max:
                low, high = arr.min(0), arr.max(0)
            else:
                std = arr.std(0, ddof=1)
                low, high = mean - std, mean + std
            axis.fill_between(xs, low, high, alpha=0.2, color=COLORS.get(variant))

    # On a log axis a mean - std band can reach zero or below: show min..max.
    for variant, arr in arrays.items():
        band(ax, variant, arr, min_max=log_scale)
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(task.metric)
    several = any(a.shape[0] > 1 for a in arrays.values())
    ax.set_title(title + ("" if not several else
                          " (band: min..max)" if log_scale else " (band: +- std)"),
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if show_gap:
        gap_ax = axes[0][1]
        scale = 100.0 if "accuracy" in task.metric.lower() else 1.0
        # Stock Keras's gap (it may not train at all) would flatten the others.
        for variant, arr in arrays.items():
            if variant not in ("float32", STOCK):
                band(gap_ax, variant, scale * (arr - arrays["float32"]))
        gap_ax.axhline(0.0, color=COLORS["float32"], linewidth=1)
        gap_ax.set_xlabel(xlabel)
        gap_ax.set_ylabel(f"gap ({'pp' if scale == 100 else task.metric}; "
                          + ("higher" if task.higher_is_better else "lower") + " is better)")
        gap_ax.set_title("variant - float32, paired by seed" + (" (mean +- std)" if several else "")
                         + (" (stock Keras: left only)" if STOCK in arrays else ""),
                         fontsize=10)
        gap_ax.grid(True, alpha=0.3)
        gap_ax.legend()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_json(path, obj):
    """`obj` as JSON (non-finite floats as strings), creating the directory."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(_jsonable(obj), f, indent=1)
        f.write("\n")


def info_text(info):
    """Task facts (TaskData.info) as 'key = value; ...'."""
    return "; ".join(f"{k} = {_fmt_info(v)}" for k, v in info.items())


def _fmt_info(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


# ---------------------------------------------------------------------------
# results: every task, several seeds.

def _mean_std(values):
    values = [float(v) for v in values]
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _mean_or_none(values):
    values = list(values)
    return None if any(v is None for v in values) else statistics.fmean(values)


def tolerance(task, float32_mean):
    """Absolute tolerance on the gap: 0.5 pp for accuracy, else 1% relative."""
    if "accuracy" in task.metric.lower():
        return 0.005, "0.5 pp"
    return 0.01 * abs(float32_mean), "1% rel."


def summarize(task, per_seed, variants):
    """per_seed: list of run_task outputs. Returns per-variant statistics.

    The gap of a seed is variant - float32 for that seed (the same seed gives
    every variant the same initial weights and data order); ``gap`` is their
    mean (= difference of the means). A variant is within seed noise of
    float32 when |gap| <= 2 std of float32's own results over the seeds (the
    noise a float32 rerun with another seed shows), or |gap| <= the task's
    tolerance (see ``tolerance``). The std of the paired gaps is reported too,
    but not used for the verdict: a variant that is consistently worse by a
    seed-dependent amount would otherwise "match".
    """
    stats = {}
    ref = None
    if "float32" in variants:
        ref = [r["float32"]["metric"] for r in per_seed]
    for v in variants:
        values = [r[v]["metric"] for r in per_seed]
        mean, std = _mean_std(values)
        entry = {"values": values, "mean": mean, "std": std,
                 "bytes_per_parameter": per_seed[0][v]["bytes_per_parameter"],
                 "wall_s_mean": statistics.fmean(r[v]["wall_s"] for r in per_seed),
                 "weights_moved_mean": statistics.fmean(
                     r[v]["weights_changed_fraction"] for r in per_seed),
                 "late_weights_moved_mean": _mean_or_none(
                     r[v].get("late_weights_changed_fraction") for r in per_seed)}
        if ref is not None:
            gaps = [a - b for a, b in zip(values, ref)]
            gap, gap_std = _mean_std(gaps)
            tol, tol_text = tolerance(task, statistics.fmean(ref))
            _, float32_std = _mean_std(ref)
            entry.update({"gaps": gaps, "gap": gap, "gap_std": gap_std,
                          "two_std": 2 * float32_std, "tolerance": tol,
                          "tolerance_text": tol_text,
                          "matches_float32": bool(math.isfinite(gap) and (
                              abs(gap) <= 2 * float32_std or abs(gap) <= tol))})
        stats[v] = entry
    return stats


def plot_path(out_dir, name):
    """Where `results` puts the learning curves of task `name`."""
    return os.path.join(out_dir, f"{name}.png")


def plot_task(out_dir, name, task, per_seed, variants):
    """<out_dir>/<name>.png: the task's curves over all seeds; returns its path."""
    png = plot_path(out_dir, name)
    first = per_seed[0][variants[0]]
    plot_curves(png, task, {v: [r[v]["curve"] for r in per_seed] for v in variants},
                f"{name}: mean over {len(per_seed)} seed(s)", first["steps_per_epoch"],
                first.get("curve_steps"))
    return png


def _table_cell(text):
    """One Markdown table cell: no line breaks, no unescaped pipes."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _epochs(count):
    return f"{count} epoch" + ("" if count == 1 else "s")


def _sentence(text):
    text = text.strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def _pm(task, mean, std):
    if "accuracy" in task.metric.lower():
        return f"{100 * mean:.2f} ± {100 * std:.2f}%"
    return f"{mean:.4g} ± {std:.2g}"


def results_markdown(report, all_tasks, output):
    variants = report["variants"]
    m = report["machine"]
    out = ["# Results: float32 vs pure-bf16 training with nearest, stochastic and Kahan "
           "rounding", "",
           "Generated by `python -m tf_bf16 results` — do not edit by hand. Regenerate with:", "",
           f"```\n{report['command']}\n```", "",
           f"Started {report['started']}; {report['elapsed_s'] / 60:.1f} min in all. "
           f"{report['seeds']} seed(s) per task and variant (seeds 0..{report['seeds'] - 1}); "
           "each seed fixes the initial weights, the data order and the rounding's random bits, "
           "the same for every variant."
           + (" **Reduced configurations** (CI sizes), not the full tasks." if report["reduced"]
              else ""), "",
           f"Machine: {common.machine_line(m)}.", ""]
    header = ["task", "metric"] + [LABELS[v] for v in variants]
    body = []
    for name, entry in report["tasks"].items():
        task = all_tasks[name]
        row = [name, f"{task.metric} ({'↑' if task.higher_is_better else '↓'})"]
        for v in variants:
            s = entry["stats"][v]
            cell = _pm(task, s["mean"], s["std"])
            if v != "float32" and "gap" in s:
                cell += (f" (gap {format_gap(task, s['gap'])}, "
                         f"{'✓' if s['matches_float32'] else '✗'})")
            row.append(cell)
        body.append(row)
    out += ["## Summary", "", "Mean ± std over seeds; gap = variant mean − float32 mean "
            "(= mean over seeds of the paired gap: the same seed gives every variant the same "
            "initial weights and data order); ✓ = |gap| ≤ 2 std of float32's results over the seeds, or within "
            "tolerance (0.5 percentage points of accuracy; 1% relative for lower-is-better "
            "metrics), ✗ = not. With few seeds 2 std is wide: read the per-seed values below.",
            ""]
    if body:
        out += [common.markdown_table(header, body, left=(0, 1)), ""]
    else:
        out += ["No task could run.", ""]
    if os.path.exists(os.path.join(os.path.dirname(os.path.abspath(output)), DISCUSSION)):
        out += [f"What these numbers mean, task by task (hand-written; check it against the "
                f"numbers above after a regeneration): [{DISCUSSION}]({DISCUSSION}).", ""]
    out += ["Variants: float32 = Keras float32 policy with the stock Keras optimizer "
            "(sparse Embedding gradients densified, so that Keras's Adam computes its dense "
            "update, as the tf_bf16 optimizers do; see `compare --help`); "
            "bf16 SR / Kahan = `tf_bf16.set_policy()` (every variable bf16, BatchNorm "
            "statistics stored with stochastic rounding) with the tf_bf16 optimizer and that "
            "rounding. " + variant_notes(variants), ""]
    if report["unavailable"]:
        out += ["## Tasks not run", "", "| task | why |", "| --- | --- |"]
        for name, message in report["unavailable"].items():
            out.append(f"| {name} | {_table_cell(message)} |")
        out.append("")
    for name, entry in report["tasks"].items():
        task = all_tasks[name]
        cfg = entry["config"]
        rel = os.path.relpath(entry["plot"], os.path.dirname(os.path.abspath(output)))
        out += [f"## {name}", "", _sentence(task.summary)
                + (f" Paper application: {task.paper_application}." if task.paper_application
                   else ""),
                f"Metric: {task.metric} ({'higher' if task.higher_is_better else 'lower'} is "
                f"better). {cfg['optimizer']} lr {learning_rate_text(cfg)}, "
                f"{_epochs(cfg['epochs'])}, batch {cfg['batch_size']}"
                + (f", {cfg['steps_per_epoch']} steps/epoch" if cfg["steps_per_epoch"] else "")
                + f"; {entry['elapsed_s']:.0f} s for all runs.", ""]
        h = ["variant", "mean ± std", "per seed", "gap to float32", "2 std float32", "tolerance",
             "matches", "weights moved", "moved in last 10%", "B/param", "wall s/run"]
        b = []
        for v in variants:
            s = entry["stats"][v]
            b.append([LABELS[v], _pm(task, s["mean"], s["std"]),
                      ", ".join(format_metric(task, x) for x in s["values"]),
                      "-" if v == "float32" or "gap" not in s else format_gap(task, s["gap"]),
                      "-" if v == "float32" or "two_std" not in s
                      else format_gap(task, s["two_std"]).lstrip("+"),
                      "-" if "tolerance" not in s else s["tolerance_text"],
                      "-" if v == "float32" or "gap" not in s else
                      ("yes" if s["matches_float32"] else "no"),
                      f"{100 * s['weights_moved_mean']:.1f}%",
                      "-" if s["late_weights_moved_mean"] is None
                      else f"{100 * s['late_weights_moved_mean']:.1f}%",
                      f"{s['bytes_per_parameter']:.2f}", f"{s['wall_s_mean']:.1f}"])
        info = entry["runs"][0][variants[0]].get("task_info") or {}
        out += [common.markdown_table(h, b, left=(0, 1, 2, 5, 6)), "",
                "2 std float32: twice the std of float32's results over the seeds. Weights "
                "moved: share of trainable weights that differ from their initial value at "
                "the end; moved in last 10%: share that the last 10% of the steps changed "
                "(means over seeds). Round-to-nearest leaves a weight untouched when every "
                "update it received was below half an ulp of it.", ""]
        if info:
            out += [f"Data (seed 0): {info_text(info)}.", ""]
        out += [f"![{name} learning curves]({rel})", ""]
    return "\n".join(out)
