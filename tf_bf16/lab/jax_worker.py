"""The process of one variant of ``compare``/``results --backend jax``.

``python -m tf_bf16.lab.jax_worker RUN_DIR VARIANT [--deadline T] [--stop-at-step N]``,
started by tf_bf16/lab/jax_runner.py (whose docstring describes the method:
the shared initial weights, the segments, the pieces and what a checkpoint
holds), with ``KERAS_BACKEND=jax``. Trains the variant from
``RUN_DIR/run.json``, continuing from ``RUN_DIR/VARIANT/checkpoint.npz`` when
an earlier piece saved one, and writes ``RUN_DIR/VARIANT/result.json`` (exit
status 0), its saved state (``jax_runner.PAUSED``) or ``error.txt`` (1).
Timestamped progress goes to stderr. Imports no TensorFlow.
"""

import argparse
import hashlib
import math
import os
import statistics
import sys
import time
import traceback

from tf_bf16.lab import common
from tf_bf16.lab.jax_runner import (DEADLINE_MARGIN_S, PAUSED, SAVE_BYTES_PER_S,
                                    _read_json, _schedule_config, _write_json, segments)


def _log_line(label, step, total, loss, metric_text, ms_per_step):
    parts = [f"{label}: step {step}/{total} ({100 * step / total:.0f}%)"]
    if loss is not None:
        parts.append(f"loss {loss:.4g}")
    if metric_text is not None:
        parts.append(metric_text)
    if ms_per_step is not None:
        parts.append(f"{ms_per_step:.1f} ms/step")
    common.log(", ".join(parts))


def _raw(array):
    """A NumPy array that np.savez stores exactly (bfloat16 as its 16-bit pattern)."""
    import numpy as np

    return array.view(np.uint16) if array.dtype.name == "bfloat16" else array


def _cooked(array, dtype_name):
    import ml_dtypes
    import numpy as np

    if dtype_name == "bfloat16":
        return array.view(ml_dtypes.bfloat16)
    return array.astype(np.dtype(dtype_name), copy=False)


def state_sha256(variables):
    """SHA-256 over the bits of `variables` (Keras variables or arrays), in order."""
    import numpy as np

    digest = hashlib.sha256()
    for v in variables:
        a = np.ascontiguousarray(np.asarray(v.value if hasattr(v, "value") else v))
        digest.update(a.dtype.name.encode() + str(a.shape).encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


class _Worker:
    """Trains one variant of a run directory, possibly in several pieces."""

    def __init__(self, directory, variant, deadline, stop_at_step):
        from tf_bf16.lab import report
        from tf_bf16.lab.tasks import get_task

        self.directory = directory
        self.variant = variant
        self.variant_dir = os.path.join(directory, variant)
        os.makedirs(self.variant_dir, exist_ok=True)
        run = _read_json(os.path.join(directory, "run.json"))
        self.task = get_task(run["task"])
        self.seed = run["seed"]
        self.cfg = run["cfg"]
        self.deadline = deadline
        self.stop_at_step = stop_at_step
        self.label = f"{self.task.name} seed {self.seed} {report.LABELS[variant]}"
        self.stage = "starting"
        # Seconds JAX has spent tracing, lowering and compiling in this process
        # (jax.monitoring's /jax/core/compile/ events), for the pause decision.
        self._compile_s = 0.0
        import jax.monitoring

        def count_compilation(event, duration_secs, **_):
            if event.startswith("/jax/core/compile/"):
                self._compile_s += duration_secs

        jax.monitoring.register_event_duration_secs_listener(count_compilation)

    def _path(self, name):
        return os.path.join(self.variant_dir, name)

    def build(self):
        import keras
        import numpy as np
        import tf_bf16
        from tf_bf16.lab import runner

        task, cfg, seed = self.task, self.cfg, self.seed
        self.stage = "making the data"
        self.data = task.make_arrays(seed, reduced=cfg["reduced"], config=cfg["config"],
                                     steps=cfg["steps_per_epoch"])
        self.stage = "building the float32 model (the shared initial weights)"
        tf_bf16.reset_policy()
        keras.utils.set_random_seed(seed)
        base = task.make_model(seed, reduced=cfg["reduced"], config=cfg["config"])
        weights = base.get_weights()
        self.initial_sha = state_sha256(weights)
        del base
        self.stage = "setting its dtype policy"
        runner._set_policy(self.variant, seed, cfg)
        self.stage = "building the model"
        keras.utils.set_random_seed(seed)
        self.model = task.make_model(seed, reduced=cfg["reduced"], config=cfg["config"])
        self.stage = "setting the shared initial weights"
        self.model.set_weights(weights)
        del weights
        self.start = [np.array(v.value) for v in self.model.trainable_variables]
        self.stage = "creating the optimizer and compiling"
        self.optimizer = runner.make_optimizer(self.variant, _schedule_config(cfg), seed)
        self.model.compile(optimizer=self.optimizer, **task.compile_arguments(self.model))
        # Built here, not by the first fit, so that a resumed piece can restore
        # the optimizer's variables before training.
        self.optimizer.build(self.model.trainable_variables)

    # -- pieces -------------------------------------------------------------

    def save(self, progress, snapshot):
        import numpy as np

        arrays, kinds = {}, {}
        for prefix, variables in (("model", self.model.variables),
                                  ("optimizer", self.optimizer.variables)):
            kinds[prefix] = []
            for i, v in enumerate(variables):
                a = np.asarray(v.value)
                arrays[f"{prefix}_{i}"] = _raw(a)
                kinds[prefix].append([v.path, a.dtype.name, list(a.shape)])
        if snapshot is not None:
            kinds["snapshot"] = []
            for i, a in enumerate(snapshot):
                arrays[f"snapshot_{i}"] = _raw(a)
                kinds["snapshot"].append(a.dtype.name)
        tmp = self._path("checkpoint.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, self._path("checkpoint.npz"))
        _write_json(self._path("progress.json"), dict(progress, variables=kinds))

    def restore(self):
        """The saved progress, with the variables restored; None if there is none."""
        import numpy as np

        progress = _read_json(self._path("progress.json"))
        if progress is None:
            return None, None
        self.stage = "restoring the saved state"
        if progress["initial_weights_sha256"] != self.initial_sha:
            raise RuntimeError("the initial weights differ from those of the saved piece "
                               "(another machine or library version?); delete "
                               f"{self.variant_dir} to start this variant afresh")
        kinds = progress["variables"]
        with np.load(self._path("checkpoint.npz")) as saved:
            for prefix, variables in (("model", self.model.variables),
                                      ("optimizer", self.optimizer.variables)):
                if [v.path for v in variables] != [k[0] for k in kinds[prefix]]:
                    raise RuntimeError(f"the saved {prefix} variables are not this model's")
                for i, (v, (_, dtype, _)) in enumerate(zip(variables, kinds[prefix])):
                    v.assign(_cooked(saved[f"{prefix}_{i}"], dtype))
            snapshot = None
            if "snapshot" in kinds:
                snapshot = [_cooked(saved[f"snapshot_{i}"], dtype)
                            for i, dtype in enumerate(kinds["snapshot"])]
        return progress, snapshot

    # -- training -----------------------------------------------------------

    def _evaluate(self, final=False):
        function = self.task.curve if (self.task.curve is not None and not final) \
            else self.task.evaluate
        return float(function(self.model, self.data))

    def train(self):
        import jax
        import keras
        import numpy as np
        from tf_bf16.lab import report

        piece_started = time.perf_counter()
        started_at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        self.build()
        progress, snapshot = self.restore()
        if progress is None:
            progress = {"step": 0, "curve": [], "curve_steps": [], "train_loss": [],
                        "started": started_at,
                        "segment_ms_per_step": [], "wall_s": 0.0, "pieces": 0,
                        "initial_weights_sha256": self.initial_sha}
        progress["pieces"] += 1
        cfg, batch = self.cfg, self.cfg["batch_size"]
        per_epoch = cfg["steps_per_epoch"]
        total = per_epoch * cfg["epochs"]
        ends, curve_steps, late_start = segments(cfg)
        x, y = self.data.train
        step = progress["step"]
        self.piece_start = step
        if step:
            common.log(f"{self.label}: resuming at step {step}/{total} "
                       f"(piece {progress['pieces']})")
        first_segment_s = None
        last_cost = None
        for end in ends:
            if end <= step:
                continue
            if self._should_pause(step, last_cost):
                progress["wall_s"] += time.perf_counter() - piece_started
                self.stage = "saving its state"
                self.save(progress, snapshot)
                common.log(f"{self.label}: paused at step {step}/{total}, state saved in "
                           f"{self.variant_dir}")
                return PAUSED
            segment_started = time.perf_counter()
            compile_before = self._compile_s
            epoch = step // per_epoch
            first, last = step - epoch * per_epoch, end - epoch * per_epoch
            self.stage = f"training (steps {step + 1}-{end})"
            keras.utils.set_random_seed(self.seed * 1000 + epoch)
            history = self.model.fit(x[first * batch:last * batch], y[first * batch:last * batch],
                                     batch_size=batch, epochs=1, shuffle=False, verbose=0)
            jax.block_until_ready([v.value for v in self.model.trainable_variables])
            fit_s = time.perf_counter() - segment_started
            loss = float(history.history["loss"][-1])
            progress["train_loss"].append(loss)
            progress["segment_ms_per_step"].append(1e3 * fit_s / (end - step))
            step = end
            progress["step"] = step
            metric_text = None
            if end in curve_steps:
                self.stage = f"evaluating (step {end})"
                value = self._evaluate()
                progress["curve"].append(value)
                progress["curve_steps"].append(end)
                metric_text = f"{self.task.metric} {report.format_metric(self.task, value)}"
            if end == late_start:
                snapshot = [np.array(v.value) for v in self.model.trainable_variables]
            # The next segment's predicted cost leaves out what this one spent
            # tracing and compiling (the first segment of a piece: 35-60 s on the
            # H200), which the next one does not repeat.
            last_cost = max(time.perf_counter() - segment_started
                            - (self._compile_s - compile_before), 0.0)
            if first_segment_s is None:
                first_segment_s = time.perf_counter() - piece_started
            _log_line(self.label, step, total, loss, metric_text,
                      progress["segment_ms_per_step"][-1])
        progress["wall_s"] += time.perf_counter() - piece_started
        self.finish(progress, snapshot, first_segment_s)
        return 0

    def _should_pause(self, step, last_cost):
        """Whether to save and stop at `step`, a segment boundary. Every piece
        trains at least one segment first."""
        if last_cost is None:
            return False
        if self.stop_at_step is not None and self.piece_start < self.stop_at_step <= step:
            return True
        if self.deadline is None:
            return False
        import jax.numpy as jnp
        import numpy as np

        state_bytes = sum(int(np.prod(v.shape)) * jnp.dtype(v.dtype).itemsize
                          for v in list(self.model.variables) + list(self.optimizer.variables))
        saving_s = 2.0 + state_bytes / SAVE_BYTES_PER_S
        return time.time() + 1.25 * last_cost + saving_s + DEADLINE_MARGIN_S > self.deadline

    def finish(self, progress, snapshot, first_segment_s):
        import jax
        import keras
        import numpy as np
        import tf_bf16
        from tf_bf16 import keras_hooks
        from tf_bf16.lab import report
        from tf_bf16.lab import runner

        self.stage = "evaluating"
        final = (self._evaluate(final=True) if self.task.curve is not None
                 else progress["curve"][-1])
        self.stage = "auditing the training state"
        state = tf_bf16.audit(self.model, optimizer=self.optimizer, trace=False).training_state

        def changed(reference):
            moved = count = 0
            for before, v in zip(reference, self.model.trainable_variables):
                now = np.asarray(v.value, dtype=np.float32)
                moved += int(np.sum(now != np.asarray(before, dtype=np.float32)))
                count += now.size
            return moved / count if count else 0.0

        timings = progress["segment_ms_per_step"]
        steady = timings[1:] if len(timings) > 1 else timings
        stats = jax.devices()[0].memory_stats() or {}
        optimizer = self.optimizer
        result = {
            "variant": self.variant, "label": report.LABELS[self.variant], "seed": self.seed,
            "metric": final, "curve": progress["curve"], "curve_steps": progress["curve_steps"],
            # Mean training loss of each fit segment (the TensorFlow runner: of each epoch).
            "train_loss": progress["train_loss"],
            "steps": int(np.asarray(optimizer.iterations.value)),
            "steps_per_epoch": self.cfg["steps_per_epoch"], "epochs": self.cfg["epochs"],
            "optimizer": runner.optimizer_label(optimizer),
            "dtype_policy": keras.config.dtype_policy().name,
            "bytes_per_parameter": float(state.bytes_per_parameter),
            "trainable_parameters": int(state.trainable_parameters),
            "state_dtypes": runner._state_dtypes(keras, self.model, optimizer),
            "weights_changed_fraction": changed(self.start),
            "late_weights_changed_fraction": None if snapshot is None else changed(snapshot),
            "finite": bool(math.isfinite(final)
                           and all(math.isfinite(x) for x in progress["train_loss"])),
            "wall_s": progress["wall_s"],
            # Median over fit segments of (segment time / its steps), blocked on the
            # weights; the first segment of a run (compilation) left out.
            "ms_per_step": statistics.median(steady) if steady else None,
            "peak_device_bytes": stats.get("peak_bytes_in_use"),
            "pieces": progress["pieces"],
            "started": progress["started"],
            "first_segment_s": first_segment_s,
            "initial_weights_sha256": self.initial_sha,
            "state_sha256": state_sha256(list(self.model.variables) + list(optimizer.variables)),
            # How the bf16 variants' Embedding gradients were summed (keras_hooks).
            "embedding_gradient_sums": keras_hooks.embedding_gradient_sums(),
            "machine": common.jax_machine_info(),
            "task_info": dict(self.data.info),
        }
        _write_json(self._path("result.json"), result)
        for name in ("checkpoint.npz", "progress.json"):
            try:
                os.remove(self._path(name))
            except OSError:
                pass
        common.log(f"{self.label}: {self.task.metric} {report.format_metric(self.task, final)}"
                   f", {result['ms_per_step'] or float('nan'):.1f} ms/step, "
                   f"{progress['wall_s']:.0f} s")


def _worker_main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m tf_bf16.lab.jax_worker",
        description="Trains one variant of a JAX compare run (started by 'compare "
                    "--backend jax'; see tf_bf16/lab/jax_runner.py).")
    parser.add_argument("run_dir")
    parser.add_argument("variant")
    parser.add_argument("--deadline", type=float, help="Unix time by which to have stopped")
    parser.add_argument("--stop-at-step", type=int, help="pause at the first segment end "
                        "at or after this step")
    args = parser.parse_args(argv)
    worker = _Worker(args.run_dir, args.variant, args.deadline, args.stop_at_step)
    try:
        return worker.train()
    except KeyboardInterrupt:
        raise
    except Exception as e:
        from tf_bf16.lab import runner

        error = runner.VariantError(args.variant, worker.stage, worker.task.name, e)
        with open(worker._path("error.txt"), "w") as f:
            f.write(str(error) + "\n\n" + traceback.format_exc())
        common.log(str(error))
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(_worker_main())
