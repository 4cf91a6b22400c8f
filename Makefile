# Quickstart: `make demo` and `make test` work on a fresh machine with Python 3.10+.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# tensorflow-cpu and tensorflow are one module in two distributions; set
# TF_PACKAGE=tensorflow==2.21.0 for the GPU-capable wheel.
TF_PACKAGE ?= tensorflow-cpu==2.21.0
# The extras of setup.py to install: lab (the tools' packages: tqdm,
# matplotlib, scikit-learn, tensorflow-datasets), test (pytest, hypothesis, atheris) and
# jax (Keras's JAX backend, whose tests compare it with the TensorFlow kernels).
EXTRAS ?= lab,test,jax
STAMP := .make-install.stamp

.PHONY: install build demo test test-fast bench bazel-build gpu-build-check clean

# Installs TensorFlow and Keras, then builds the op library against that
# TensorFlow and installs tf_bf16 (editable) with its extras.
install: $(STAMP)
$(STAMP): setup.py Makefile $(wildcard cc/*/*.cc cc/*/*.h)
	$(PIP) install -q "$(TF_PACKAGE)" "keras==3.15.1"
	# keras-hub (examples/keras_hub_gpt2.py, tests/test_keras_hub.py) without its
	# dependencies: its tensorflow-text needs the full tensorflow wheel, which
	# would overwrite tensorflow-cpu; what it needs here is listed instead.
	$(PIP) install -q --no-deps "keras-hub==0.32.0"
	$(PIP) install -q "tokenizers==0.23.3" "sentencepiece==0.2.3" regex
	$(MAKE) build
	touch $(STAMP)

build:
	$(PIP) install -q --no-build-isolation -e ".[$(EXTRAS)]"

demo: install
	$(PYTHON) -m tf_bf16 compare --task transformer_lm --include-stock --out out/demo

# Everything: the library, the tools (pytest -m lab), the slow tests (-m slow),
# the Bazel build and the GPU library's build check; prints the 15 slowest tests.
# (tests/test_gpu_build.py's build test is deselected: gpu-build-check ran it.)
test: install bazel-build gpu-build-check
	$(PYTHON) -m pytest -q --durations=15 tests \
		--deselect tests/test_gpu_build.py::test_gpu_library_builds_and_registers_its_kernels

# The library's tests (ops, reference, optimizers, policy, audit, save/serve)
# without the tools' tests and the slow ones: ~1,100 tests, measured 3 min 45 s
# on 2 quiet cores and 5 min 10 s on 2 cores busy with other work.
test-fast: install
	$(PYTHON) -m pytest -q -m "not lab and not slow" tests

bench: install
	$(PYTHON) -m tf_bf16 bench

# Proves that BUILD builds the same op library with Bazel (see tools/bazel_build.sh).
bazel-build:
	bash tools/bazel_build.sh

# Compiles the CUDA kernels and links the GPU library against the installed
# TensorFlow (nvcc from PyPI if none is found); see tools/gpu_build_check.sh.
gpu-build-check: install
	bash tools/gpu_build_check.sh

clean:
	rm -rf build $(STAMP) tf_bf16/_tf_bf16_ops*.so tf_bf16/_build_info.json *.egg-info
