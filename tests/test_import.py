"""`import tf_bf16` is the library alone: no tool of tf_bf16.lab, none of the lab
extra's packages; and the library trains without them."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAB_PACKAGES = ("tqdm", "matplotlib", "sklearn", "tensorflow_datasets")


def _python(code):
    """Runs `code` in a fresh interpreter that imports this checkout; returns
    the JSON it prints on its last line."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
               TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_tf_bf16_imports_no_tool_and_no_lab_package():
    # TensorFlow and Keras themselves import matplotlib and scikit-learn when
    # they are installed: what counts is what `import tf_bf16` adds to them.
    added = _python(
        "import json, sys\n"
        "import tensorflow, keras\n"
        "before = set(sys.modules)\n"
        "import tf_bf16\n"
        "print(json.dumps({'file': tf_bf16.__file__,\n"
        "                  'added': sorted(set(sys.modules) - before),\n"
        "                  'all': sorted(sys.modules)}))\n")
    assert added["file"] == os.path.join(ROOT, "tf_bf16", "__init__.py")
    assert "tf_bf16.ops" in added["added"]  # the probe sees the library's imports
    tools = [m for m in added["all"] if m == "tf_bf16.lab" or m.startswith("tf_bf16.lab.")]
    assert not tools, tools
    lab = [m for m in added["added"] if m.split(".")[0] in LAB_PACKAGES]
    assert not lab, lab
    assert not [m for m in added["all"] if m.split(".")[0] in ("tqdm", "tensorflow_datasets")]


def test_library_trains_and_audits_without_the_lab_packages():
    result = _python(
        "import blocker\n"
        f"blocker.block(*{LAB_PACKAGES!r})\n"
        "import json, sys\n"
        "import keras, numpy as np\n"
        "import tf_bf16\n"
        "tf_bf16.set_policy(seed=1)\n"
        "model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])\n"
        "model.compile(optimizer=tf_bf16.optimizers.Adam(rounding='kahan'), loss='mse')\n"
        "model.fit(np.ones((4, 3)), np.ones((4, 2)), verbose=0)\n"
        "report = tf_bf16.audit(model)\n"
        "print(json.dumps({'bytes_per_parameter': report.bytes_per_parameter,\n"
        "                  'steps': int(model.optimizer.iterations.numpy()),\n"
        "                  'lab': sorted(m for m in sys.modules\n"
        f"                                if m.split('.')[0] in {LAB_PACKAGES!r})}}))\n")
    assert result == {"bytes_per_parameter": 8.0, "steps": 1, "lab": []}


def test_compare_without_the_lab_packages_says_what_to_install():
    """tf_bf16.compare is in the library's namespace; called without the lab
    extra, it names what is missing and how to install it, before any work."""
    message = _python(
        "import blocker\n"
        f"blocker.block(*{LAB_PACKAGES!r})\n"
        "import json\n"
        "import tf_bf16\n"
        "try:\n"
        "    tf_bf16.compare(lambda: None, None, out='never_written')\n"
        "except ImportError as e:\n"
        "    print(json.dumps(str(e)))\n")
    assert message.startswith("tf_bf16.compare with out= needs tqdm, matplotlib,"), message
    assert 'pip install "tf_bf16[lab]"' in message
    assert not os.path.exists(os.path.join(ROOT, "never_written"))


def test_version_is_defined_once():
    import tf_bf16

    proc = subprocess.run([sys.executable, "setup.py", "--version"], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == tf_bf16.__version__
    from tf_bf16 import _version

    assert tf_bf16.__version__ is _version.__version__
