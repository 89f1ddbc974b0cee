"""Command line: `python -m paradis_fast COMMAND`; each part of the package registers its commands."""

from __future__ import annotations

import argparse
import sys

from .deploy import commands as deploy_commands
from .errors import reported_as_one_line
from .train import commands as train_commands

PROG = "python -m paradis_fast"
COMMAND_MODULES = (train_commands, deploy_commands)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; each option's default appended unless its help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".lstrip()


def add_debug_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show the traceback of an error, not only its message")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog=PROG, description=__doc__)
    subparsers = root.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(subparsers)
    for command in subparsers.choices.values():
        command.formatter_class = HelpFormatter
        add_debug_argument(command)
    return root


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    with reported_as_one_line(f"{PROG} {args.command}", args.debug):
        args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
