"""Docs stay true to the code."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_api_page_matches_docstrings():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gen_api_docs.py"),
                             "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_readme_quickstart_has_exactly_the_two_make_commands():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = quickstart.split("```", 2)[1]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make demo", "make test"]


def test_readme_says_what_make_demo_runs():
    with open(os.path.join(ROOT, "Makefile")) as f:
        makefile = f.read()
    recipe = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    (command,) = [line.strip().replace("$(PYTHON)", "python") for line in recipe]
    with open(os.path.join(ROOT, "README.md")) as f:
        quickstart = f.read().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    assert f"`make demo` runs `{command}`" in quickstart, command


def test_every_op_function_is_specified_in_rounding_md():
    from tf_bf16 import ops

    with open(os.path.join(ROOT, "docs", "rounding.md")) as f:
        spec = f.read()
    missing = [name for name in ops.__all__ if f"`{name}`" not in spec]
    assert not missing, f"docs/rounding.md does not specify {missing}"
