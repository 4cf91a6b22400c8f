"""Command-line interface: ``python -m tf_bf16 COMMAND`` or ``tf-bf16 COMMAND``.

Each command is a module that provides ``SUMMARY`` (one line for the command
list), ``DESCRIPTION`` (the command's --help text), ``add_arguments(parser)``
and ``run(args) -> int`` (the exit status). To add a command, add its module to
``_COMMANDS``. Command modules must not import TensorFlow at import time, so
that ``--help`` stays fast.
"""

import argparse
import importlib
import os
import sys

# (command name, module). Order is the order of the help text.
_COMMANDS = (
    ("bench", "tf_bf16.bench"),
    ("bench-fit", "tf_bf16.bench_fit"),
)


def _prog():
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "tf-bf16" if name.startswith("tf-bf16") else "python -m tf_bf16"


def build_parser():
    """The argparse parser with one subparser per command."""
    parser = argparse.ArgumentParser(
        prog=_prog(),
        description="tf_bf16 tools: pure-bfloat16 training ops for TensorFlow/Keras.",
        epilog="Run '%(prog)s COMMAND --help' for the options of a command.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, module_name in _COMMANDS:
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(
            name, help=module.SUMMARY, description=module.DESCRIPTION,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv=None):
    """Entry point of ``python -m tf_bf16`` and of the ``tf-bf16`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help(sys.stderr)
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
