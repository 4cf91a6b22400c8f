#!/usr/bin/env bash
# Downloads the PyTorch peers' packages that the H200 machine lacks, as wheels
# for its Python 3.12, into <repo>/.whl/ (git-ignored), for run_h200.sh:
# torchao 0.18.0 (no requirements) and torch-optimi 0.3.3 (requires torch,
# which is there). About 3.4 MB.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl torchao==0.18.0 torch-optimi==0.3.3
ls -l .whl
