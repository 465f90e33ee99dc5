"""``import_trl()``: TRL for the tests of the ``trl`` extra, a skip or a failure when it is missing.

``make`` installs the extra (``pip install -e ".[dev,trl]"``) and its ``unit`` targets set
``NTHR_BOOK_TRL_REQUIRED=1``: there a ``trl`` that does not import fails the tests that need it,
with the import error. Without the variable (a user who installed the package without the extra)
those tests skip and say why.
"""

from __future__ import annotations

import os

import pytest


def import_trl():
    """The ``trl`` module; else a skip, or a failure under ``NTHR_BOOK_TRL_REQUIRED=1``."""
    try:
        import trl
    except ImportError as exc:
        message = f"trl does not import ({exc}); install the extra: pip install -e '.[trl]'"
        if os.environ.get("NTHR_BOOK_TRL_REQUIRED") == "1":
            pytest.fail(f"NTHR_BOOK_TRL_REQUIRED=1 (make unit): {message}", pytrace=False)
        pytest.skip(message, allow_module_level=True)
    return trl
