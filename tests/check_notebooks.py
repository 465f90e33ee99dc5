"""Lint the notebook series: committed without outputs, the shared skeleton, and thin (library-backed).

Run by ``make lint`` (part of ``make test``); exits non-zero with one line per problem.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def problems(path: Path) -> list[str]:
    """What is wrong with one notebook (empty when it passes)."""
    try:
        nb = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        return [f"{path.name}: not valid JSON ({exc})"]
    out = []
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    for i, cell in enumerate(code):
        if cell.get("outputs"):
            out.append(f"{path.name}: code cell {i} has outputs (commit notebooks without outputs: nbstripout)")
        if cell.get("execution_count") is not None:
            out.append(f"{path.name}: code cell {i} has an execution count")
    if not code or "env.report()" not in "".join(code[0]["source"]):
        out.append(f"{path.name}: the first code cell must call nthr_book.env.report()")
    if not any("config.fast_mode()" in "".join(c["source"]) and "mode_name()" in "".join(c["source"]) for c in code):
        out.append(f"{path.name}: no parameters cell reading config.fast_mode() and printing config.mode_name()")
    first = "".join(nb["cells"][0]["source"]) if nb["cells"] else ""
    if nb["cells"] and (nb["cells"][0]["cell_type"] != "markdown" or not first.startswith("# ")):
        out.append(f"{path.name}: the first cell must be a markdown title")
    if "## Summary" not in "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown"):
        out.append(f"{path.name}: no '## Summary' section")
    return out


def main() -> int:
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if not paths:
        print(f"no notebooks found in {NOTEBOOKS}")
        return 1
    found = [p for path in paths for p in problems(path)]
    print("\n".join(found) if found else f"{len(paths)} notebooks: no outputs, skeleton ok")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
