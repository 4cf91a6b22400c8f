"""The GPU section of docs/results.md: runs on Keras's JAX backend (``compare
--backend jax`` or ``results --backend jax``, e.g. on the H200), rendered from
their JSON after the CPU sections, which stay byte-for-byte what
``results --from-json`` renders without it.

``results --from-json docs/results/results.json --gpu-json RUN.json`` renders
the report with the section: RUN.json is a ``results --backend jax`` suite or
a ``compare --backend jax`` results.json (one seed); it is copied, as a suite,
to ``docs/results/gpu/results.json`` and its curves are plotted to
``docs/results/gpu/<task>.png``. ``results --backend jax`` writes the same
files from the runs it makes. Not for training (tf_bf16/lab/jax_runner.py) or
for the CPU sections (tf_bf16/lab/report.py).
"""

import json
import os

from tf_bf16.lab import common
from tf_bf16.lab import report

GPU_DIR = "gpu"


def suite_from_json(obj, partial=False):
    """A GPU suite (the format ``results --backend jax`` writes) from a suite or
    from a ``compare --backend jax`` summary; raises ValueError for anything else.

    A paused run (a variant left unfinished) is refused unless `partial`: then
    the finished variants are rendered and the report names the one that did
    not finish ("not_finished")."""
    if obj.get("backend") != "jax":
        raise ValueError("not the JSON of a run on the JAX backend (no \"backend\": \"jax\")")
    if "tasks" in obj:
        return obj
    if "variants" not in obj or "task" not in obj:
        raise ValueError("neither a 'results --backend jax' suite nor a 'compare --backend "
                         "jax' results.json")
    if obj.get("paused") and not partial:
        raise ValueError(f"the run is incomplete: variant {obj['paused']!r} paused; resume it "
                         "first (or render the finished variants with --gpu-partial)")
    variants = list(obj["variants"])
    entry = {"summary": obj["summary"], "metric": obj["metric"],
             "higher_is_better": obj["higher_is_better"], "config": obj["config"],
             "variants": variants, "runs": [obj["variants"]],
             "elapsed_s": obj["elapsed_s"]}
    return {"backend": "jax", "tasks": {obj["task"]: entry}, "unavailable": {},
            "failed": {obj["task"]: obj["failed"]} if obj.get("failed") else {},
            "variants": variants, "seeds": 1, "seed_values": [obj["seed"]],
            "reduced": bool(obj["config"].get("reduced")), "config": obj["config"].get("config"),
            "command": obj["command"], "machine": obj["machine"],
            "started": obj.get("started", "-"), "elapsed_s": obj["elapsed_s"],
            "not_finished": {obj["task"]: obj["paused"]} if obj.get("paused") else {}}


def _prepare(suite, all_tasks, gpu_dir):
    """Statistics and plot paths of every task (recomputed from the runs)."""
    unknown = [name for name in suite["tasks"] if name not in all_tasks]
    if unknown:
        raise ValueError(f"the GPU JSON has tasks this version does not know: "
                         f"{', '.join(unknown)}")
    for name, entry in suite["tasks"].items():
        entry["stats"] = report.summarize(all_tasks[name], entry["runs"], entry["variants"])
        entry["plot"] = os.path.join(gpu_dir, f"{name}.png")


def _cell(task, stats, seeds):
    if seeds == 1:
        return report.format_metric(task, stats["mean"])
    return report._pm(task, stats["mean"], stats["std"])


def _gib(value):
    return "-" if value is None else f"{value / 2**30:.2f}"


def _ms(value):
    return "-" if value is None else f"{value:.1f}"


def _configuration(cfg, runs):
    sizes = cfg.get("sizes") or {}
    first = next(iter(runs[0].values()))
    parts = [cfg.get("description") or ", ".join(f"{k} {v}" for k, v in sizes.items()
                                                   if k not in ("steps", "batch_size"))]
    parts.append(f"{first['trainable_parameters']:,} trainable parameters")
    parts.append(f"{cfg['optimizer']} lr {report.learning_rate_text(cfg)}")
    parts.append(f"{cfg['epochs'] * cfg['steps_per_epoch']:,} steps of batch "
                 f"{cfg['batch_size']}")
    return "; ".join(parts)


# The 16-bit variants, whose Embedding gradients tf_bf16 sums in float32 on JAX.
_SIXTEEN_BIT = ("nearest", "stochastic", "kahan")


def _embedding_note(entry, variants):
    """A note for runs made before tf_bf16 summed bf16 Embedding gradients in
    float32 (their results have no "embedding_gradient_sums")."""
    sixteen_bit = [v for v in variants if v in _SIXTEEN_BIT]
    older = [v for v in sixteen_bit
             if any("embedding_gradient_sums" not in run[v] for run in entry["runs"])]
    if not older:
        summed = [v for v in sixteen_bit
                  if all(run[v]["embedding_gradient_sums"] == "float32" for run in entry["runs"])]
        if not summed:
            return []
        return [f"Embedding gradients of {', '.join(report.LABELS[v] for v in summed)}: "
                "each token's occurrences summed in float32 and rounded once to bf16 "
                "(tf_bf16's JAX policy; Keras's own gradient is a bf16 scatter-add).", ""]
    return [f"**Made before tf_bf16 summed bf16 Embedding gradients in float32** "
            f"({', '.join(report.LABELS[v] for v in older)}): their Embedding gradients "
            "were Keras's bf16 scatter-add, which on this text cost about 18 ms of each "
            "step on the H200 (contended bf16 atomics on frequent characters; "
            "docs/bench_gpu.md, \"The pure-bf16 fit step\"), so their ms/step is not what "
            "tf_bf16 takes now, and each occurrence of a character was added to its "
            "gradient row in bf16.", ""]


DETERMINISTIC_FLAG = "--xla_gpu_deterministic_ops=true"


def _determinism_note(suite):
    """Whether a rerun of the command gives the same bits: on a GPU, only with
    XLA's deterministic ops (its default reductions and scatter-adds are not)."""
    m = suite["machine"]
    if m.get("device_platform") != "gpu":
        return []
    if DETERMINISTIC_FLAG in (m.get("xla_flags") or ""):
        return [f"Run with XLA_FLAGS={DETERMINISTIC_FLAG}: XLA:GPU's reductions and "
                "scatter-adds in a fixed order, so a rerun of the command on the same "
                "machine and software repeats its bits.", ""]
    return ["**Reruns differ.** Made with XLA:GPU's default, non-deterministic reductions "
            "and scatter-adds: a rerun of the same command starts from the same weights "
            "and data but does not repeat the bits, and the difference grows over the run "
            f"(docs/results_discussion.md measures it; XLA_FLAGS={DETERMINISTIC_FLAG} "
            "makes reruns repeat)."
            + (" With one seed, a gap smaller than that rerun spread is not evidence."
               if suite["seeds"] == 1 else ""), ""]


def gpu_markdown(suite, all_tasks, output):
    """The GPU section (Markdown) of the report at `output`."""
    base = os.path.dirname(os.path.abspath(output))
    m = suite["machine"]
    seeds = suite["seeds"]
    out = [f"## GPU runs: Keras's JAX backend on {m['device']}", "",
           f"Trained with the command below (one process per variant; "
           f"{'seed ' + str(suite['seed_values'][0]) if suite.get('seed_values') else str(seeds) + ' seed(s)'}"
           f"), started {suite['started']}, {suite['elapsed_s'] / 60:.1f} min of training in "
           f"all. Rendered from "
           f"`{os.path.relpath(os.path.join(base, 'results', GPU_DIR, 'results.json'), base)}`."
           + (" **Reduced configuration** (CI size), not the full task."
              if suite.get("reduced") else ""), "",
           f"```\n{suite['command']}\n```", "",
           f"Machine: {common.machine_line(m)}.", ""]
    out += _determinism_note(suite)
    if suite.get("unavailable"):
        out += ["Not run on this backend: " + "; ".join(
            f"{name} ({report._table_cell(message)})"
            for name, message in suite["unavailable"].items()) + ".", ""]
    for name, entry in suite["tasks"].items():
        task = all_tasks[name]
        variants = entry["variants"]
        cfg = entry["config"]
        better = "higher" if task.higher_is_better else "lower"
        out += [f"### {name} on {m['device']}", "",
                f"{report._sentence(task.summary)} Metric: {task.metric} ({better} is better). "
                f"{_configuration(cfg, entry['runs'])}; "
                f"{entry['elapsed_s'] / 60:.1f} min for all runs.", ""]
        header = ["variant", task.metric, "gap to float32", "matches float32", "weights moved",
                  "moved in last 10%", "B/param", "ms/step", "peak device GiB", "wall s"]
        body = []
        for v in variants:
            s = entry["stats"][v]
            runs = [run[v] for run in entry["runs"]]
            body.append([
                report.LABELS[v], _cell(task, s, seeds),
                "-" if v == "float32" or "gap" not in s else report.format_gap(task, s["gap"]),
                "-" if v == "float32" or "gap" not in s else
                ("yes" if s["matches_float32"] else "no"),
                f"{100 * s['weights_moved_mean']:.1f}%",
                "-" if s["late_weights_moved_mean"] is None
                else f"{100 * s['late_weights_moved_mean']:.1f}%",
                f"{s['bytes_per_parameter']:.2f}",
                _ms(runs[0].get("ms_per_step")), _gib(runs[0].get("peak_device_bytes")),
                f"{s['wall_s_mean']:.0f}"])
        out += [common.markdown_table(header, body, left=(0,)), ""]
        pieces = max(r.get("pieces", 1) for run in entry["runs"] for r in run.values())
        same = len({r.get("initial_weights_sha256") for run in entry["runs"]
                    for r in run.values()}) <= 1 or seeds > 1
        notes = ("Gap: variant - float32; matches: |gap| within the task's tolerance "
                 f"({s.get('tolerance_text', '-')})" + (" or 2 std of float32 over the seeds"
                                                        if seeds > 1 else "")
                 + ". Weights moved: share of trainable weights that differ from their "
                 "initial value; last 10%: share the last 10% of the steps changed. "
                 "ms/step: median over the fit segments between curve points (the first, "
                 "with compilation, left out) of the segment's time over its steps, blocked "
                 "on the weights. Peak device GiB: JAX's peak_bytes_in_use in the variant's "
                 "own process (training, evaluation, and the float32 model it built first "
                 "for the shared initial weights). " + report.variant_notes(variants)
                 + (" Every variant started from the same initial weights (SHA-256 "
                    "checked across the processes)." if same else
                    " WARNING: the processes built different initial weights.")
                 + (f" Trained in up to {pieces} resumed pieces." if pieces > 1 else ""))
        out += [notes, ""]
        out += _embedding_note(entry, variants)
        unfinished = suite.get("not_finished", {}).get(name)
        if unfinished:
            out += [f"**Not finished: {report.LABELS.get(unfinished, unfinished)}** (paused "
                    "with its state saved when the run's device time ran out; the "
                    "variants after it were not started). The table has the variants "
                    "that finished; a resumed run (`compare --resume`) completes it.", ""]
        failed = suite.get("failed", {}).get(name)
        if failed:
            out += ["Failed: " + "; ".join(
                f"{v}: {report._table_cell(text.splitlines()[0])}"
                for v, text in failed.items()) + ".", ""]
        info = next(iter(entry["runs"][0].values())).get("task_info") or {}
        if info:
            out += [f"Data: {report.info_text(info)}.", ""]
        out += [f"![{name} on {m['device']}: learning curves]"
                f"({os.path.relpath(entry['plot'], base)})", ""]
    return "\n".join(out)


def plot(suite, all_tasks):
    for name, entry in suite["tasks"].items():
        first = entry["runs"][0][entry["variants"][0]]
        report.plot_curves(
            entry["plot"], all_tasks[name],
            {v: [run[v]["curve"] for run in entry["runs"]] for v in entry["variants"]},
            f"{name} on {suite['machine']['device']} (JAX)", first["steps_per_epoch"],
            first.get("curve_steps"))


def cpu_markdown(json_path, all_tasks, output):
    """The CPU report as ``results --from-json`` renders it (without plotting)."""
    with open(json_path) as f:
        suite = json.load(f)
    out_dir = os.path.join(os.path.dirname(os.path.abspath(output)), "results")
    for name, entry in suite["tasks"].items():
        entry["stats"] = report.summarize(all_tasks[name], entry["runs"], suite["variants"])
        entry["plot"] = report.plot_path(out_dir, name)
    return report.results_markdown(suite, all_tasks, output)


def write_report(suite, all_tasks, output, cpu_text=None, source=None):
    """Writes <output dir>/results/gpu/results.json (and copies `source`'s name
    into it), the report `output` (`cpu_text`, else the CPU report rendered from
    <output dir>/results/results.json when there is one, then the GPU section),
    then the GPU plots. Returns the exit status."""
    base = os.path.dirname(os.path.abspath(output))
    gpu_dir = os.path.join(base, "results", GPU_DIR)
    os.makedirs(gpu_dir, exist_ok=True)
    _prepare(suite, all_tasks, gpu_dir)
    json_path = os.path.join(gpu_dir, "results.json")
    if source is None or os.path.abspath(source) != os.path.abspath(json_path):
        report.write_json(json_path, suite)
    if cpu_text is None:
        cpu_json = os.path.join(base, "results", "results.json")
        cpu_text = (cpu_markdown(cpu_json, all_tasks, output) if os.path.exists(cpu_json)
                    else "# Results\n")
    with open(output, "w") as f:
        f.write(cpu_text.rstrip("\n") + "\n\n" + gpu_markdown(suite, all_tasks, output))
    plot(suite, all_tasks)
    print(f"wrote {output} (with the GPU section) and {gpu_dir}/")
    return 0


def load(path, partial=False):
    """A GPU suite from `path` (see ``suite_from_json``)."""
    with open(path) as f:
        return suite_from_json(json.load(f), partial=partial)

