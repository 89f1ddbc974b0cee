"""Errors in what the user asked for, which the command line reports in one line instead of a traceback."""

from __future__ import annotations

import contextlib
import importlib
import sys
from types import ModuleType


class UserError(ValueError):
    """A bad dataset, path, switch, checkpoint or option, or a missing optional package.

    A ``ValueError``, so library callers catch it as before; ``python -m paradis_fast`` prints its
    message as one line on stderr and exits with status 2, like argparse does for a bad flag.
    """


def require(module: str, needed_for: str, package: str | None = None) -> ModuleType:
    """Import an optional dependency, or name the ``pip install`` that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        name = package or module.split(".")[0]
        raise UserError(f"{needed_for} needs the {name} package: pip install {name}") from error


@contextlib.contextmanager
def reported_as_one_line(prog: str, debug: bool = False):
    """Turn a `UserError` inside the block into ``PROG: error: MESSAGE`` and exit status 2.

    With ``debug`` the error propagates with its traceback.
    """
    try:
        yield
    except UserError as error:
        if debug:
            raise
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
