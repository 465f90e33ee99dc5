"""Integrations of NTHR (arXiv 2505.18830) with other training stacks:
``nthr_book.integrations.trl`` (TRL).

Import the submodule explicitly (``from nthr_book.integrations.trl import NTHRGRPOTrainer``): it
needs the optional dependency ``trl`` (``pip install -e ".[trl]"``), which the rest of the package
does not.
"""

from __future__ import annotations

__all__: list[str] = []
