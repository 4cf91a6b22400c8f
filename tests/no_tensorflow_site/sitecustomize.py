"""Makes `import tensorflow` fail in every Python process that has this folder
on PYTHONPATH, subprocesses included, as on the H200 (no TensorFlow there): the
tests run the H200 scripts (tools/h200/*.sh) this way."""

import importlib.util
import os

_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "blocker.py")
_spec = importlib.util.spec_from_file_location("_tf_bf16_test_blocker", _path)
_blocker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_blocker)
_blocker.block("tensorflow")
