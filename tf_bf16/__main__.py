"""Command-line interface: ``python -m tf_bf16 COMMAND`` or ``tf-bf16 COMMAND``.

Each command is a module that provides ``SUMMARY`` (one line for the command
list), ``DESCRIPTION`` (the command's --help text), ``add_arguments(parser)``
and ``run(args) -> int`` (the exit status). To add a command, add its module to
``_COMMANDS``. An entry ``(name, module, prefix)`` takes ``PREFIX_SUMMARY``,
``PREFIX_DESCRIPTION``, ``add_prefix_arguments`` and ``run_prefix`` instead, so
that one module can provide several commands. Command modules must not import TensorFlow at import time, so
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
    ("compare", "tf_bf16.compare"),
    ("list", "tf_bf16.compare", "list"),
    ("results", "tf_bf16.compare", "results"),
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
    for name, module_name, *prefix in _COMMANDS:
        module = importlib.import_module(module_name)
        upper = f"{prefix[0].upper()}_" if prefix else ""
        lower = f"_{prefix[0]}" if prefix else ""
        sub = subparsers.add_parser(
            name, help=getattr(module, f"{upper}SUMMARY"),
            description=getattr(module, f"{upper}DESCRIPTION"),
            formatter_class=argparse.RawDescriptionHelpFormatter)
        getattr(module, f"add{lower}_arguments")(sub)
        sub.set_defaults(_run=getattr(module, f"run{lower}"))
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
