"""Runs Keras's own optimizer tests with tf_bf16's optimizers in place of Keras's.

    python tools/run_keras_optimizer_tests.py              # per-test table and verdict
    python tools/run_keras_optimizer_tests.py --json r.json
    python tools/run_keras_optimizer_tests.py --stock      # Keras's own classes (baseline)
    python tools/run_keras_optimizer_tests.py -k test_config

The test files are the ones in the installed Keras wheel
(`keras/src/optimizers/{sgd,adam,adamw,lion,optimizer,optimizer_sparse,
loss_scale_optimizer}_test.py`), run unmodified by pytest in this process.
Before they are imported, `SGD`, `Adam`, `AdamW` and `Lion` are replaced by
tf_bf16's classes everywhere those files (and `keras.optimizers.get` /
`deserialize`) look them up: the defining modules (`keras.src.optimizers.sgd`
...), the `keras.src.optimizers` package, the public `keras.optimizers`
namespace and the name table of `keras.optimizers.get`. The variables in
these tests are float32, where tf_bf16's optimizers must reproduce Keras.

Every test's outcome is compared with `EXPECTED_DIFFERENCES` below (each with
its reason). The exit status is 1 when a test fails that is not listed, or
when a listed test no longer fails (the list must stay true), else 0. Written
for Keras 3.15.1 (`KERAS_VERSION`); another Keras version is refused, since
its test files and their expectations differ.

Not for: tf_bf16's own tests (tests/), which check bf16 behaviour that
Keras's suite does not know about.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Test the checkout this script belongs to, whatever tf_bf16 is installed.
sys.path.insert(0, ROOT)

KERAS_VERSION = "3.15.1"
TEST_FILES = ("sgd_test.py", "adam_test.py", "adamw_test.py", "lion_test.py",
              "optimizer_test.py", "optimizer_sparse_test.py",
              "loss_scale_optimizer_test.py")
SWAPPED = {"SGD": "sgd", "Adam": "adam", "AdamW": "adamw", "Lion": "lion"}

# Test id (file::class::test) -> why tf_bf16 differs there. Only failures are
# listed; a listed test that passes is reported as stale.
_FUSED_NOT_ASSIGN = (
    "The test mocks the optimizer's `assign`/`assign_add` to see whether an "
    "IndexedSlices gradient reaches the model variable as a sparse update. tf_bf16 "
    "updates the variable inside its fused op ({}), not through `assign`, so the "
    "mock sees no update at all. The sparse result itself is Keras's: "
    "test_sparse_correctness passes for this case.")
_SEED_VARIABLE = (
    "The test counts the optimizer's variables before it is built (2: the iteration "
    "counter and the learning rate). A tf_bf16 optimizer has one more from its "
    "creation: the int32 `rounding_seed` variable that holds the stochastic-rounding "
    "seed, so that every checkpoint restores it (docs/reliability.md, F3); so 3 != 2, "
    "and the test stops at that count.")
EXPECTED_DIFFERENCES = {
    "optimizer_test.py::OptimizerTest::test_setting_lr_to_callable_untracks_lr_var":
        _SEED_VARIABLE,
    "sgd_test.py::SGDTest::test_single_step": _SEED_VARIABLE,
    "optimizer_sparse_test.py::OptimizerSparseTest::test_sparse_gradients_sgd":
        _FUSED_NOT_ASSIGN.format("`ResourceSparseApplySgd` on the touched rows"),
    "optimizer_sparse_test.py::OptimizerSparseTest::test_sparse_gradients_loss_scale_optimizer_sgd":
        _FUSED_NOT_ASSIGN.format("`ResourceSparseApplySgd` on the touched rows"),
}


class OutcomeRecorder:
    """A pytest plugin that keeps each test's outcome (the worst of its phases)
    and, after collection, which class each test module got for each swapped name."""

    def __init__(self):
        self.outcomes = {}
        self.messages = {}
        self.classes_seen = {}

    def pytest_collection_finish(self, session):
        import keras.src.optimizers as keras_src_optimizers

        for module_name, module in list(sys.modules.items()):
            if not (module_name.endswith("_test") and "optimizers" in module_name):
                continue
            for name in SWAPPED:
                found = getattr(module, name, None)
                if found is None and getattr(module, "optimizers", None) is keras_src_optimizers:
                    found = getattr(keras_src_optimizers, name)
                if found is not None:
                    self.classes_seen[f"{module_name.rsplit('.', 1)[-1]}.{name}"] = (
                        f"{found.__module__}.{found.__qualname__}")

    def pytest_runtest_logreport(self, report):
        rank = {"passed": 0, "skipped": 1, "failed": 2}
        previous = self.outcomes.get(report.nodeid)
        if report.when != "call" and report.outcome == "passed":
            self.outcomes.setdefault(report.nodeid, "passed")
            return
        if previous is None or rank[report.outcome] > rank[previous]:
            self.outcomes[report.nodeid] = report.outcome
            if report.outcome == "failed":
                lines = report.longreprtext.strip().splitlines()
                errors = [line[1:].strip() for line in lines if line.startswith("E ")]
                self.messages[report.nodeid] = " | ".join(errors)[:500] or (
                    lines[-1] if lines else "")


def swap_in_tf_bf16():
    """Replaces Keras's SGD/Adam/AdamW/Lion by tf_bf16's wherever the tests look."""
    import keras
    import keras.src.optimizers as keras_src_optimizers

    import tf_bf16

    for name, module_name in SWAPPED.items():
        replacement = getattr(tf_bf16.optimizers, name)
        module = sys.modules.get(f"keras.src.optimizers.{module_name}")
        setattr(module, name, replacement)
        setattr(keras_src_optimizers, name, replacement)
        setattr(keras.optimizers, name, replacement)
        keras_src_optimizers.ALL_OBJECTS_DICT[name.lower()] = replacement
    return tf_bf16.__file__


def keras_test_directory():
    import keras

    return os.path.join(os.path.dirname(keras.__file__), "src", "optimizers")


def compare(outcomes, expected):
    """(unexpected failures, stale expectations, expected failures seen)."""
    failed = {t for t, outcome in outcomes.items() if outcome == "failed"}
    unexpected = sorted(failed - set(expected))
    seen = sorted(failed & set(expected))
    stale = sorted(t for t in expected if outcomes.get(t) != "failed")
    return unexpected, stale, seen


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stock", action="store_true",
                        help="run with Keras's own classes (the baseline: all should pass)")
    parser.add_argument("--json", metavar="PATH", help="write the outcomes as JSON")
    parser.add_argument("-k", metavar="EXPR", help="pytest -k selection")
    parser.add_argument("--quiet", action="store_true",
                        help="print only the summary, not each test's outcome")
    args = parser.parse_args(argv)

    import keras
    import pytest

    if keras.__version__ != KERAS_VERSION:
        print(f"Keras {keras.__version__} is installed; this runner and its expected "
              f"differences are written for Keras {KERAS_VERSION}.", file=sys.stderr)
        return 2
    directory = keras_test_directory()
    origin = "keras (stock)" if args.stock else swap_in_tf_bf16()
    expected = {} if args.stock else EXPECTED_DIFFERENCES

    recorder = OutcomeRecorder()
    pytest_args = [os.path.join(directory, f) for f in TEST_FILES]
    pytest_args += ["-qq", "-p", "no:cacheprovider", "--rootdir", directory,
                    "-W", "ignore", "--tb=no", "-o", "addopts=", "--no-header"]
    if args.k:
        pytest_args += ["-k", args.k]
    start = time.time()
    pytest.main(pytest_args, plugins=[recorder])
    seconds = time.time() - start

    outcomes = recorder.outcomes
    unexpected, stale, seen = compare(outcomes, expected)
    # The swap must have reached the test modules, or this run proves nothing.
    wanted = "keras." if args.stock else "tf_bf16."
    not_swapped = sorted(f"{k} is {v}" for k, v in recorder.classes_seen.items()
                         if not v.startswith(wanted))
    if not recorder.classes_seen:
        not_swapped = ["no test module was seen"]
    if args.k:   # a selection cannot show that an unselected expectation is stale
        stale = [t for t in stale if t in outcomes]
    counts = {k: sum(1 for o in outcomes.values() if o == k)
              for k in ("passed", "failed", "skipped")}

    if not args.quiet:
        print()
        for test in sorted(outcomes):
            verdict = ("expected difference" if test in seen else
                       "UNEXPECTED" if test in unexpected else "")
            print(f"{outcomes[test]:8} {test}  {verdict}".rstrip())
    print(f"\nKeras {keras.__version__} optimizer tests with {origin}: "
          f"{counts['passed']} passed, {counts['failed']} failed "
          f"({len(seen)} expected), {counts['skipped']} skipped, {seconds:.0f} s")
    for test in seen:
        print(f"  expected difference: {test}\n      {expected[test]}")
    for test in unexpected:
        print(f"  UNEXPECTED FAILURE: {test}\n      {recorder.messages.get(test, '')}")
    for test in stale:
        print(f"  STALE EXPECTATION (did not fail: {outcomes.get(test, 'not run')}): {test}")
    for problem in not_swapped:
        print(f"  NOT SWAPPED: {problem}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"keras": keras.__version__, "optimizers": origin,
                       "outcomes": outcomes, "messages": recorder.messages,
                       "expected_differences": expected, "unexpected": unexpected,
                       "stale": stale, "counts": counts, "seconds": round(seconds, 1),
                       "classes_seen": recorder.classes_seen, "not_swapped": not_swapped},
                      f, indent=1, sort_keys=True)
    ok = not unexpected and not stale and not not_swapped and outcomes
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
