"""Loads the compiled extension (paradis_fast._C) once; without it the reference backend serves."""

from __future__ import annotations

import functools
import warnings

import torch  # noqa: F401  (torch must be imported before the extension)


@functools.lru_cache(maxsize=None)
def load_error() -> str | None:
    """None when the C++ extension is loaded, else why not (warned about once)."""
    try:
        from paradis_fast import _C  # noqa: F401  (registers the paradis ops)
    except ImportError as error:
        reason = f"the C++ extension paradis_fast._C is not built ({error})"
        warnings.warn(
            f"paradis_fast: {reason}; using the reference backend. "
            "Build it with `pip install --no-build-isolation -e .`",
            RuntimeWarning,
            stacklevel=3,
        )
        return reason
    return None
