"""Command line: `python -m paradis_fast COMMAND`; each part of the package registers its commands."""

from __future__ import annotations

import argparse
import sys

from .deploy import commands as deploy_commands
from .train import commands as train_commands

COMMAND_MODULES = (train_commands, deploy_commands)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m paradis_fast", description=__doc__)
    subparsers = root.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(subparsers)
    return root


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    args.run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
