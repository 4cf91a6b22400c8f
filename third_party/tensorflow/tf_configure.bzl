"""Repository rule that configures the pip-installed TensorFlow for custom ops.

`tf_configure(name = "local_config_tf")` runs `${PYTHON_BIN_PATH:-python3}`,
imports tensorflow and asks `tf.sysconfig` what setup.py asks it. It then
generates a local repository, with nothing downloaded:

  include/                        symlink to tf.sysconfig.get_include()
  libtensorflow_framework.so.2    symlink to the library the link flags name
  libtensorflow_cc.so.2           symlink to the library with the XLA op-kernel
                                  symbols (the XLA lowering links it)
  BUILD                           :tf_header_lib, :libtensorflow_framework and
                                  :libtensorflow_cc (from BUILD.tpl beside this file)
  build_defs.bzl                  TF_VERSION, TF_COMPILE_FLAGS, TF_LINK_FLAGS,
                                  TF_COPTS (the compile flags that are neither
                                  -I nor -D: those travel with :tf_header_lib)
                                  and HOST_CPU_COPTS (setup.py's cpu_flags():
                                  ["-mavx2"] where /proc/cpuinfo lists avx2, plus
                                  -mfma -mavx512{f,vl,bw,dq} where it lists all four,
                                  [] when TF_BF16_PORTABLE is set)

The rule is `local` and `configure`: it runs again in every new Bazel server,
on `bazel sync --configure` and whenever PYTHON_BIN_PATH or TF_BF16_PORTABLE
change, so a reinstalled TensorFlow is picked up.
"""

_PYTHON_BIN_PATH = "PYTHON_BIN_PATH"

# setup.py's XLA_LINK_FLAGS: -l:libtensorflow_cc.so.2.
_TF_CC_LIBRARY = "libtensorflow_cc.so.2"
_TF_BF16_PORTABLE = "TF_BF16_PORTABLE"

# Printed as one JSON line; the same questions setup.py asks, plus the avx2
# test of setup.py's cpu_flags().
_TF_QUERY = """
import json, re, sys
import tensorflow as tf
try:
    with open("/proc/cpuinfo") as f:
        cpuinfo = f.read()
except OSError:
    cpuinfo = ""
print(json.dumps({
    "python": sys.executable,
    "version": tf.__version__,
    "include": tf.sysconfig.get_include(),
    "lib": tf.sysconfig.get_lib(),
    "compile": tf.sysconfig.get_compile_flags(),
    "link": tf.sysconfig.get_link_flags(),
    "avx2": bool(re.search(r"\\bavx2\\b", cpuinfo)),
    "avx512": all(re.search(r"\\b%s\\b" % f, cpuinfo)
                  for f in ("avx512f", "avx512vl", "avx512bw", "avx512dq")),
}))
"""

def _fail(msg):
    fail("\nTensorFlow configuration error (@local_config_tf): %s\n" % msg)

def _python_bin(repository_ctx):
    python_bin = repository_ctx.os.environ.get(_PYTHON_BIN_PATH, "python3")
    if "/" in python_bin:
        path = repository_ctx.path(python_bin)
        if not path.exists:
            _fail("%s=%s does not exist" % (_PYTHON_BIN_PATH, python_bin))
        return path
    path = repository_ctx.which(python_bin)
    if path == None:
        _fail("'%s' is not on PATH; set %s to the Python that has TensorFlow" %
              (python_bin, _PYTHON_BIN_PATH))
    return path

def _query_tensorflow(repository_ctx, python_bin):
    result = repository_ctx.execute(
        [python_bin, "-c", _TF_QUERY],
        environment = {"TF_CPP_MIN_LOG_LEVEL": "3"},
        quiet = True,
    )
    if result.return_code != 0:
        _fail(("`import tensorflow` failed with %s (exit %d):\n%s\n" +
               "Install TensorFlow first (pip install tensorflow-cpu==2.21.0) or set %s.") %
              (python_bin, result.return_code, result.stderr[-2000:], _PYTHON_BIN_PATH))
    lines = [line for line in result.stdout.strip().split("\n") if line.startswith("{")]
    if not lines:
        _fail("no answer from %s:\n%s" % (python_bin, result.stdout[-2000:]))
    return json.decode(lines[-1])

def _realpath(repository_ctx, path):
    return str(repository_ctx.path(path).realpath)

def _split_compile_flags(repository_ctx, info):
    """-I (TF's include dir) -> includes, -D -> defines, the rest -> copts."""
    include_dir = _realpath(repository_ctx, info["include"])
    defines = []
    copts = []
    for flag in info["compile"]:
        if flag.startswith("-I"):
            if _realpath(repository_ctx, flag[2:]) != include_dir:
                _fail("unexpected include flag %s (TensorFlow's include dir is %s)" %
                      (flag, info["include"]))
        elif flag.startswith("-D"):
            defines.append(flag[2:])
        else:
            copts.append(flag)
    return defines, copts

def _framework_library(repository_ctx, info):
    """The library that tf.sysconfig.get_link_flags() links: (dir, file name)."""
    lib_dir = info["lib"]
    name = None
    for flag in info["link"]:
        if flag.startswith("-L"):
            lib_dir = flag[2:]
        elif flag.startswith("-l:"):
            name = flag[3:]
        elif flag.startswith("-l"):
            name = "lib%s.so" % flag[2:]
    if name == None:
        _fail("no -l flag in tf.sysconfig.get_link_flags() = %s" % info["link"])
    if not repository_ctx.path(lib_dir + "/" + name).exists:
        _fail("%s/%s does not exist" % (lib_dir, name))
    return lib_dir, name

def _tf_configure_impl(repository_ctx):
    python_bin = _python_bin(repository_ctx)
    info = _query_tensorflow(repository_ctx, python_bin)
    defines, copts = _split_compile_flags(repository_ctx, info)
    lib_dir, lib_name = _framework_library(repository_ctx, info)

    repository_ctx.symlink(info["include"], "include")
    repository_ctx.symlink(lib_dir + "/" + lib_name, lib_name)
    if not repository_ctx.path(info["lib"] + "/" + _TF_CC_LIBRARY).exists:
        _fail("%s/%s does not exist (the XLA lowering links it)" % (info["lib"], _TF_CC_LIBRARY))
    repository_ctx.symlink(info["lib"] + "/" + _TF_CC_LIBRARY, _TF_CC_LIBRARY)

    portable = repository_ctx.os.environ.get(_TF_BF16_PORTABLE, "")
    host_cpu_copts = ["-mavx2"] if info["avx2"] and not portable else []
    if host_cpu_copts and info["avx512"]:
        host_cpu_copts += ["-mfma", "-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq"]

    repository_ctx.template(
        "BUILD",
        Label("//third_party/tensorflow:BUILD.tpl"),
        {
            "%{PYTHON_BIN}": str(python_bin),
            "%{TF_VERSION}": info["version"],
            "%{TF_LIB_DIR}": lib_dir,
            "%{TF_DEFINES}": repr(defines),
            "%{TF_SHARED_LIBRARY_NAME}": lib_name,
            "%{TF_CC_LIBRARY_NAME}": _TF_CC_LIBRARY,
        },
    )
    repository_ctx.file("WORKSPACE", "workspace(name = \"%s\")\n" % repository_ctx.name)
    repository_ctx.file("build_defs.bzl", "\n".join([
        "\"\"\"TensorFlow %s as seen by %s (generated by tf_configure.bzl).\"\"\"" %
        (info["version"], python_bin),
        "",
        "TF_VERSION = %s" % repr(info["version"]),
        "TF_INCLUDE_DIR = %s" % repr(info["include"]),
        "TF_LIB_DIR = %s" % repr(lib_dir),
        "# tf.sysconfig.get_compile_flags() / get_link_flags(), verbatim.",
        "TF_COMPILE_FLAGS = %s" % repr(info["compile"]),
        "TF_LINK_FLAGS = %s" % repr(info["link"]),
        "# The compile flags other than -I/-D (those come with :tf_header_lib).",
        "TF_COPTS = %s" % repr(copts),
        "# setup.py's cpu_flags() for this host (TF_BF16_PORTABLE=%s)." % repr(portable),
        "HOST_CPU_COPTS = %s" % repr(host_cpu_copts),
        "",
    ]))

tf_configure = repository_rule(
    implementation = _tf_configure_impl,
    environ = [_PYTHON_BIN_PATH, _TF_BF16_PORTABLE],
    local = True,
    configure = True,
    doc = "Generates a repository for the TensorFlow that PYTHON_BIN_PATH (default python3) imports.",
)
