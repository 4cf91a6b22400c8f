"""Build and install tf_bf16.

The op library is compiled against the TensorFlow that is installed in the
target environment (flags from ``tf.sysconfig``), so TensorFlow must be
installed first::

    pip install tensorflow-cpu==2.21.0      # or tensorflow==2.21.0
    pip install --no-build-isolation .       # or -e . for development

Under pip's default build isolation TensorFlow is not importable inside the
build; ``setup.py`` then asks the same interpreter outside the isolated
environment, so plain ``pip install .`` works too.

The library needs Keras and NumPy only. The tools (``python -m tf_bf16
bench``, ``compare``, ...; ``tf_bf16.lab``) need the ``lab`` extra, the tests
the ``lab`` and ``test`` extras: ``pip install --no-build-isolation -e
".[lab,test]"`` (what ``make install`` does).

Two libraries: ``tf_bf16/_tf_bf16_ops*.so`` (CPU kernels) always, and
``tf_bf16/_tf_bf16_gpu_ops*.so`` (the same CPU kernels plus the CUDA kernels,
cudart linked statically) when the installed TensorFlow is built with CUDA
and ``nvcc`` is found. Environment:

- ``TF_BF16_GPU``: ``auto`` (default; as above), ``0`` (CPU library only) or
  ``1`` (build the GPU library even for a TensorFlow without CUDA, e.g. as a
  build test; fails if nvcc is missing).
- ``TF_BF16_CUDA_ARCHS``: compute capabilities to compile for, default
  ``80,90`` (sm_80, sm_90, plus PTX of the highest for newer GPUs).
- ``NVCC``: the nvcc to use; else ``nvcc`` on PATH, ``$CUDA_HOME/bin/nvcc``,
  ``/usr/local/cuda/bin/nvcc``, or the ``nvidia-cuda-nvcc`` pip package's.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
OP_SOURCES = [
    "cc/ops/bf16_training_ops.cc",
    "cc/kernels/bf16_training_ops.cc",
]


def read_version():
    """tf_bf16/_version.py's __version__, read without importing tf_bf16 (which
    imports TensorFlow)."""
    with open(os.path.join(ROOT, "tf_bf16", "_version.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"$', f.read(), re.M).group(1)


HEADERS = [
    "cc/kernels/bf16_update_math.h",
    "cc/kernels/bf16_training_ops.h",
    "cc/kernels/bf16_training_op_helpers.h",
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

GPU_SOURCES = ["cc/kernels/bf16_training_ops_gpu.cu.cc"]
GPU_HEADERS = HEADERS + ["cc/kernels/bf16_update_kernels.cu.h"]
DEFAULT_CUDA_ARCHS = "80,90"
GPU_EXTENSION = "tf_bf16._tf_bf16_gpu_ops"
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
    "'lib': tf.sysconfig.get_lib(), 'include': tf.sysconfig.get_include(), "
    "'cuda': tf.test.is_built_with_cuda()}))"
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


# NVCC flags, besides TensorFlow's -I/-D flags and the architectures.
# --fmad=false: no fused multiply-add; the spec rounds after every float32
# operation (docs/rounding.md 1), as the CPU build does with -ffp-contract=off.
# --ftz=true: denormals flushed, as TensorFlow's CPU kernels (and so the CPU
# kernels and the reference) do. Division and square root stay IEEE
# (-prec-div/-prec-sqrt default to true without --use_fast_math).
NVCC_FLAGS = ["-std=c++17", "-O3", "-x", "cu", "-Xcompiler", "-fPIC", "-DGOOGLE_CUDA=1",
              "--expt-relaxed-constexpr", "--fmad=false", "--ftz=true", "-w"]


def find_nvcc():
    """The nvcc to build with, or None."""
    candidates = [os.environ.get("NVCC"), shutil.which("nvcc")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    candidates += sorted(glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia",
                                                "cu*", "bin", "nvcc")))
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def cuda_archs():
    """Compute capabilities from TF_BF16_CUDA_ARCHS ("80,90", "sm_80;sm_90", ...)."""
    text = os.environ.get("TF_BF16_CUDA_ARCHS") or DEFAULT_CUDA_ARCHS
    archs = sorted({int(a) for a in re.findall(r"\d+", text)})
    if not archs:
        raise RuntimeError(f"TF_BF16_CUDA_ARCHS={text!r} names no compute capability")
    return archs


def gpu_build_plan(info):
    """(nvcc, None) to build the GPU library, or (None, the reason not to)."""
    mode = os.environ.get("TF_BF16_GPU", "auto").strip().lower()
    if mode in ("0", "no", "off", "false"):
        return None, "TF_BF16_GPU=0"
    nvcc = find_nvcc()
    if mode in ("1", "yes", "on", "true"):
        if nvcc is None:
            raise RuntimeError("TF_BF16_GPU=1 but no nvcc was found: set NVCC or CUDA_HOME, or "
                               "pip install nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cuda-cccl")
        return nvcc, None
    if not info["cuda"]:
        return None, f"TensorFlow {info['version']} is not built with CUDA"
    if nvcc is None:
        return None, "no nvcc found (set NVCC or CUDA_HOME)"
    return nvcc, None


def nvcc_dirs(nvcc):
    """(include dir, dirs holding libcudart_static.a) of this nvcc's CUDA, as nvcc says.

    Asked of nvcc itself (--dryrun prints its INCLUDES and LIBRARIES), since
    the nvcc found may be a wrapper script away from its CUDA.
    """
    run = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True)
    text = run.stdout + run.stderr
    includes = re.findall(r'INCLUDES=.*?-I"?([^"\s]+)', text)
    lib_dirs = [d for d in re.findall(r'-L"?([^"\s]+)', text)
                if os.path.exists(os.path.join(d, "libcudart_static.a"))]
    if not includes or not lib_dirs:
        raise RuntimeError(f"could not find the CUDA headers and libcudart_static.a of {nvcc} "
                           f"from `nvcc --dryrun`:\n{text[-2000:]}")
    return os.path.normpath(includes[0]), os.path.normpath(lib_dirs[0])


def cuda_include_shim(info, nvcc, temp_dir):
    """-I flags that make TensorFlow's `third_party/gpus/cuda/include/...` resolve.

    The full tensorflow wheel ships CUDA headers there; tensorflow-cpu does
    not, so a shim directory links it to the CUDA headers of nvcc.
    """
    if os.path.isdir(os.path.join(info["include"], "third_party", "gpus", "cuda", "include")):
        return []
    shim = os.path.join(os.path.abspath(temp_dir), "cuda_shim")
    link = os.path.join(shim, "third_party", "gpus", "cuda", "include")
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if os.path.islink(link):
        os.remove(link)
    os.symlink(nvcc_dirs(nvcc)[0], link)
    return ["-I" + shim]


def run_command(cmd):
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


class BuildTfOps(build_ext):
    """Compiles the op libraries with g++ (and nvcc) and TensorFlow's flags."""

    def run(self):
        self._tf_info = tensorflow_build_info()
        self._nvcc, reason = gpu_build_plan(self._tf_info)
        if self._nvcc is None:
            self.extensions = [e for e in self.extensions if e.name != GPU_EXTENSION]
            print(f"tf_bf16: building the CPU op library only ({reason}).", flush=True)
        else:
            archs = ", ".join(f"sm_{a}" for a in cuda_archs())
            print(f"tf_bf16: building the CPU op library and the GPU op library ({archs}) "
                  f"with {self._nvcc}.", flush=True)
        self._objects = {}
        super().run()

    def build_extension(self, ext):
        info = self._tf_info
        out = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        obj_dir = os.path.join(self.build_temp, "tf_bf16_objs")
        os.makedirs(obj_dir, exist_ok=True)
        cxx = os.environ.get("CXX", "g++")
        compile_flags = (CXXFLAGS + cpu_flags() + info["compile"]
                         + xla_include_flags(info["compile"]) + ["-I" + ROOT])
        gpu = ext.name == GPU_EXTENSION
        if gpu:
            shim = cuda_include_shim(info, self._nvcc, self.build_temp)
            archs = cuda_archs()
            nvcc_flags = NVCC_FLAGS + info["compile"] + shim + ["-I" + ROOT]
            for arch in archs:
                nvcc_flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
            nvcc_flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")

        def compile_one(src):
            if src.endswith(".cu.cc"):
                obj = os.path.join(obj_dir, src.replace("/", "_").replace(".cu.cc", ".cu.o"))
                run_command([self._nvcc, "-c", os.path.join(ROOT, src), "-o", obj] + nvcc_flags)
                return obj
            # The kernels' .cc registers the GPU kernels when GOOGLE_CUDA is set:
            # a second object for the GPU library. Op definitions are shared.
            cuda_variant = gpu and src == "cc/kernels/bf16_training_ops.cc"
            key = (src, cuda_variant)
            if key not in self._objects:
                suffix = ".cuda.o" if cuda_variant else ".o"
                obj = os.path.join(obj_dir, src.replace("/", "_").replace(".cc", suffix))
                extra = ["-DGOOGLE_CUDA=1"] + shim if cuda_variant else []
                run_command([cxx, "-c", os.path.join(ROOT, src), "-o", obj] + compile_flags
                            + extra)
                self._objects[key] = obj
            return self._objects[key]

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            objs = list(pool.map(compile_one, ext.sources))
        link = [cxx, "-shared", "-o", out] + objs + info["link"] + XLA_LINK_FLAGS
        if gpu:
            # cudart linked statically: no libcudart.so of one CUDA version
            # beside the one TensorFlow loads.
            link += ["-L" + nvcc_dirs(self._nvcc)[1], "-l:libcudart_static.a", "-ldl",
                     "-lpthread", "-lrt"]
        link += ["-Wl,-rpath," + info["lib"], "-Wl,--no-undefined"]
        run_command(link)
        self._write_build_info(out, compile_flags, nvcc_flags if gpu else None)

    def _write_build_info(self, out, compile_flags, nvcc_flags):
        # Recorded so that loading a library built for another TensorFlow
        # fails with a message instead of an undefined symbol.
        # An editable install loads the library from the source tree, where
        # setuptools copies the .so but not this file.
        package_dirs = {os.path.dirname(out), os.path.join(ROOT, "tf_bf16")}
        previous = {}
        info_path = os.path.join(os.path.dirname(out), "_build_info.json")
        if os.path.exists(info_path):
            with open(info_path) as f:
                previous = json.load(f)
        if nvcc_flags is None:
            build_info = {"tensorflow_version": self._tf_info["version"],
                          "library": os.path.basename(out), "compile_flags": compile_flags,
                          "gpu": None}
        else:
            build_info = dict(previous, gpu={"library": os.path.basename(out),
                                             "nvcc": self._nvcc, "nvcc_flags": nvcc_flags,
                                             "cuda_archs": cuda_archs()})
        for package_dir in package_dirs:
            with open(os.path.join(package_dir, "_build_info.json"), "w") as f:
                json.dump(build_info, f, indent=1)


setup(
    name="tf_bf16",
    version=read_version(),
    description="Pure-bfloat16 training for Keras/TensorFlow: stochastic rounding and "
                "Kahan-compensated fused optimizer updates",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["tf_bf16", "tf_bf16.*"]),
    # The GPU library is dropped in BuildTfOps.run when it is not to be built.
    ext_modules=[Extension("tf_bf16._tf_bf16_ops", sources=OP_SOURCES, depends=HEADERS),
                 Extension(GPU_EXTENSION, sources=OP_SOURCES + GPU_SOURCES,
                           depends=GPU_HEADERS)],
    cmdclass={"build_ext": BuildTfOps},
    package_data={"tf_bf16": ["_build_info.json"]},
    # TensorFlow itself is deliberately not a requirement: tensorflow and
    # tensorflow-cpu are two distributions of one module, and depending on
    # either would install it beside the other. The library is built against
    # whichever is installed.
    install_requires=["keras>=3.15,<3.16", "numpy"],
    extras_require={
        # The tools of tf_bf16.lab: progress bars, plots, and the tasks' data
        # (scikit-learn's bundled datasets; TensorFlow Datasets for CIFAR-10).
        "lab": ["tqdm", "matplotlib", "scikit-learn", "tensorflow-datasets==4.9.10"],
        # atheris: tests/test_fuzz.py's bounded run of tools/fuzz_ops.py.
        "test": ["pytest", "hypothesis", "atheris"],
        # Keras's JAX backend (KERAS_BACKEND=jax): tf_bf16.jax_ops; the tests
        # compare it with the TensorFlow kernels bit for bit.
        "jax": ["jax==0.10.2", "jaxlib==0.10.2"],
        "cpu": ["tensorflow-cpu==2.21.0"],
        "gpu": ["tensorflow[and-cuda]==2.21.0"],
    },
    entry_points={"console_scripts": ["tf-bf16=tf_bf16.__main__:main"]},
)
