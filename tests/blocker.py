"""A sys.meta_path entry that makes modules look uninstalled, for subprocess tests.

``python -c "import blocker; blocker.block('tqdm', 'sklearn'); ..."`` (with
tests/ on sys.path): afterwards importing those top-level modules, or their
submodules, raises ModuleNotFoundError, as when the package is not installed,
and ``importlib.util.find_spec`` raises it too.
"""

import sys


class Blocker:
    def __init__(self, names):
        self.names = frozenset(names)

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)",
                                      name=name)
        return None


def block(*names):
    sys.meta_path.insert(0, Blocker(names))
