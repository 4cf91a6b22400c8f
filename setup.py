"""Build and install tf_bf16.

The op library is compiled against the TensorFlow that is installed in the
target environment (flags from ``tf.sysconfig``), so TensorFlow must be
installed first::

    pip install tensorflow-cpu==2.21.0      # or tensorflow==2.21.0
    pip install --no-build-isolation .       # or -e . for development

Under pip's default build isolation TensorFlow is not importable inside the
build; ``setup.py`` then asks the same interpreter outside the isolated
environment, so plain ``pip install .`` works too.
"""

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
OP_SOURCES = [
    "cc/ops/bf16_training_ops.cc",
    "cc/kernels/bf16_training_ops.cc",
]
HEADERS = [
    "cc/kernels/bf16_update_math.h",
    "cc/kernels/bf16_training_ops.h",
]

# XLA lowering (REGISTER_XLA_OP, for jit_compile=True): the tf2xla/XLA headers
# include highwayhash and farmhash from the wheel's external/ directory, and
# the XlaOpKernel symbols live in libtensorflow_cc.so.2. Applied to every
# source so that one set of compile flags describes the library (BUILD too).
OP_SOURCES += ["cc/kernels/bf16_training_ops_xla.cc"]
HEADERS += ["cc/kernels/bf16_update_math_xla.h"]
XLA_INCLUDE_SUBDIRS = ["external/highwayhash", "external/farmhash_archive/src"]
XLA_LINK_FLAGS = ["-l:libtensorflow_cc.so.2"]


def xla_include_flags(tf_include_flags):
    """-I<tf include>/<subdir> for XLA_INCLUDE_SUBDIRS, next to TensorFlow's -I."""
    tf_include = next(f[2:] for f in tf_include_flags if f.startswith("-I"))
    return ["-I" + os.path.join(tf_include, sub) for sub in XLA_INCLUDE_SUBDIRS]
# -ffp-contract=off: no fused multiply-add, so the float32 math rounds after
# every operation exactly as the TensorFlow reference does (docs/rounding.md).
# -fno-trapping-math: nothing here relies on floating-point traps; without it
# GCC will not turn the branch-free selects into vector blends.
CXXFLAGS = ["-std=c++17", "-O3", "-fPIC", "-ffp-contract=off", "-fno-trapping-math",
            "-fno-math-errno",
            "-Wno-sign-compare", "-Wno-ignored-attributes", "-Wno-deprecated-declarations"]

_TF_QUERY = (
    "import json, tensorflow as tf; print(json.dumps({'version': tf.__version__, "
    "'compile': tf.sysconfig.get_compile_flags(), 'link': tf.sysconfig.get_link_flags(), "
    "'lib': tf.sysconfig.get_lib()}))"
)


def tensorflow_build_info():
    """Compile/link flags of the installed TensorFlow, also from inside pip's build isolation."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    for attempt_env in (os.environ, env):
        proc = subprocess.run([sys.executable, "-c", _TF_QUERY], capture_output=True,
                              text=True, env=attempt_env)
        if proc.returncode == 0:
            return json.loads(proc.stdout.strip().splitlines()[-1])
    raise RuntimeError(
        "tf_bf16 compiles its ops against the installed TensorFlow, but `import "
        "tensorflow` failed with " + sys.executable + ":\n" + proc.stderr[-2000:] +
        "\nInstall TensorFlow first: pip install tensorflow-cpu==2.21.0")


AVX512_FEATURES = ("avx512f", "avx512vl", "avx512bw", "avx512dq")


def cpu_flags():
    """Vector ISA flags for the build machine (the library is built where it runs).

    -mavx2, plus AVX-512 (F/VL/BW/DQ) where all four are present: the update
    loops are integer-heavy (hash, rounding) and AVX-512VL's masks and ternary
    logic make them 20-30% faster. TF_BF16_PORTABLE=1 builds for plain x86-64.
    Kept in step with third_party/tensorflow/tf_configure.bzl (Bazel).
    """
    if os.environ.get("TF_BF16_PORTABLE"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            cpuinfo = f.read()
    except OSError:
        return []
    present = set(re.findall(r"\b(avx2|avx512f|avx512vl|avx512bw|avx512dq)\b", cpuinfo))
    flags = ["-mavx2"] if "avx2" in present else []
    if flags and all(feature in present for feature in AVX512_FEATURES):
        # Eigen refuses -mavx512f without -mfma; -ffp-contract=off still keeps
        # the compiler from fusing our multiply-adds.
        flags += ["-mfma"] + ["-m" + feature for feature in AVX512_FEATURES]
    return flags


class BuildTfOps(build_ext):
    """Compiles the op library with g++ and TensorFlow's flags."""

    def build_extension(self, ext):
        info = tensorflow_build_info()
        out = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        obj_dir = os.path.join(self.build_temp, "tf_bf16_objs")
        os.makedirs(obj_dir, exist_ok=True)
        cxx = os.environ.get("CXX", "g++")
        compile_flags = (CXXFLAGS + cpu_flags() + info["compile"]
                         + xla_include_flags(info["compile"]) + ["-I" + ROOT])

        def compile_one(src):
            obj = os.path.join(obj_dir, src.replace("/", "_").replace(".cc", ".o"))
            cmd = [cxx, "-c", os.path.join(ROOT, src), "-o", obj] + compile_flags
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
            return obj

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            objs = list(pool.map(compile_one, ext.sources))
        link = [cxx, "-shared", "-o", out] + objs + info["link"] + XLA_LINK_FLAGS + [
            "-Wl,-rpath," + info["lib"], "-Wl,--no-undefined"]
        print(" ".join(link), flush=True)
        subprocess.run(link, check=True)
        # Recorded so that loading a library built for another TensorFlow
        # fails with a message instead of an undefined symbol.
        # An editable install loads the library from the source tree, where
        # setuptools copies the .so but not this file.
        build_info = {"tensorflow_version": info["version"], "library": os.path.basename(out),
                      "compile_flags": compile_flags}
        for package_dir in {os.path.dirname(out), os.path.join(ROOT, "tf_bf16")}:
            with open(os.path.join(package_dir, "_build_info.json"), "w") as f:
                json.dump(build_info, f, indent=1)


setup(
    name="tf_bf16",
    version="0.1.0",
    description="Pure-bfloat16 training for Keras/TensorFlow: stochastic rounding and "
                "Kahan-compensated fused optimizer updates",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tf_bf16", "tf_bf16.*"]),
    ext_modules=[Extension("tf_bf16._tf_bf16_ops", sources=OP_SOURCES, depends=HEADERS)],
    cmdclass={"build_ext": BuildTfOps},
    package_data={"tf_bf16": ["_build_info.json"]},
    # TensorFlow itself is deliberately not a requirement: tensorflow and
    # tensorflow-cpu are two distributions of one module, and depending on
    # either would install it beside the other. The library is built against
    # whichever is installed.
    install_requires=["keras>=3.15,<3.16", "numpy", "tqdm"],
    extras_require={"test": ["pytest"], "cpu": ["tensorflow-cpu==2.21.0"],
                    "gpu": ["tensorflow[and-cuda]==2.21.0"]},
    entry_points={"console_scripts": ["tf-bf16=tf_bf16.__main__:main"]},
)
