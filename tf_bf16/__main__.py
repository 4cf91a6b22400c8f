"""Command-line interface: ``python -m tf_bf16 COMMAND`` or ``tf-bf16 COMMAND``.

The commands are the tools of ``tf_bf16.lab``. Each is one row of
``COMMANDS``: its name, one line for the command list, the ``--help`` text,
the function that adds its options to an argparse parser and the function
that runs it (``run(args) -> exit status``). To add a command, add a row.
The command modules import TensorFlow and the lab extra's packages only when
a command runs, so that ``--help`` stays fast.
"""

import argparse
import collections
import os
import sys

from tf_bf16.lab import bench
from tf_bf16.lab import bench_fit
from tf_bf16.lab import bench_gpu
from tf_bf16.lab import cli

Command = collections.namedtuple("Command", "name summary description add_arguments run")

# Order is the order of the help text.
COMMANDS = (
    Command("bench", bench.SUMMARY, bench.DESCRIPTION, bench.add_arguments, bench.run),
    Command("bench-fit", bench_fit.SUMMARY, bench_fit.DESCRIPTION, bench_fit.add_arguments,
            bench_fit.run),
    Command("bench-gpu", bench_gpu.SUMMARY, bench_gpu.DESCRIPTION, bench_gpu.add_arguments,
            bench_gpu.run),
    Command("compare", cli.COMPARE_SUMMARY, cli.COMPARE_DESCRIPTION, cli.add_compare_arguments,
            cli.run_compare),
    Command("list", cli.LIST_SUMMARY, cli.LIST_DESCRIPTION, cli.add_list_arguments,
            cli.run_list),
    Command("results", cli.RESULTS_SUMMARY, cli.RESULTS_DESCRIPTION, cli.add_results_arguments,
            cli.run_results),
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
    for command in COMMANDS:
        sub = subparsers.add_parser(
            command.name, help=command.summary, description=command.description,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv=None):
    """Entry point of ``python -m tf_bf16`` and of the ``tf-bf16`` console script."""
    from tf_bf16.lab import jax_runner

    argv = list(sys.argv[1:] if argv is None else argv)
    argv = jax_runner.expand_resume(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
