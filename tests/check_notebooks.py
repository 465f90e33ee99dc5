"""Lint the notebook series: no outputs committed, the shared skeleton, machine-independent checks.

Run by ``make lint`` (part of ``make test``); exits non-zero with one line per problem. A check is
machine-independent when its tolerance is derived (from a dtype's eps and the number of summed
terms; never a bare number such as ``atol=1e-4``, never a library default) and when an ``assert``
orders measured medians, means or Δ's only with a stated margin (a ``# margin: ...`` comment); the
rest is printed, not asserted.

Exercises (``exercise_problems``): every numbered item of a notebook's exercises (a markdown cell
with a ``## Exercises`` heading or an ``**Exercises**`` line) carries a ``*Hint:*`` and has a
solution: a code cell after the list, tagged ``solution``, hidden by default (``jupyter``
metadata ``source_hidden`` and ``outputs_hidden``), whose first line is ``# Solution to exercise
<k>``. Solution cells run with the notebook, so CI executes them at the ci size like every other
cell (tests/README.md says how to add one).
"""

from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
CLOSE_CALLS = {"assert_close", "allclose", "assert_allclose", "isclose"}
TOLERANCES = ("rtol", "atol")
ORDER = (ast.Lt, ast.LtE, ast.Gt, ast.GtE)
MEASURED = re.compile(r"median|\bmean\b|delta|Δ")
DERIVE = "derive it from the dtype's eps and the number of terms, with a comment"
SOLUTION_TAG = "solution"
EXERCISES_HEADING = re.compile(r"^(#+ *Exercises|\*\*Exercises\*\*) *$", re.MULTILINE)
ITEM = re.compile(r"^(\d+)\. ")
SOLUTION_FIRST_LINE = re.compile(r"^# Solution to exercise (\d+)\b")


def _number(node: ast.AST) -> float | None:
    """The value of a numeric literal (``1e-4``, ``-0.5``), else None."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        value = _number(node.operand)
        return None if value is None else -value
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value)
    return None


def _call_name(node: ast.Call) -> str:
    return node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")


def _top_compares(test: ast.AST) -> list[ast.Compare]:
    """What an assert states: ``a < b``, ``a < b and c``, ``not a < b``, ``(a < b).all()``."""
    if isinstance(test, ast.Compare):
        return [test]
    if isinstance(test, ast.BoolOp):
        return [c for value in test.values for c in _top_compares(value)]
    if isinstance(test, ast.UnaryOp):
        return _top_compares(test.operand)
    if (
        isinstance(test, ast.Call)
        and isinstance(test.func, ast.Attribute)
        and test.func.attr in ("all", "any")
    ):
        return _top_compares(test.func.value)
    return []


def _tolerance_problems(node: ast.Call) -> list[str]:
    """assert_close / allclose with a default tolerance or a bare-number one."""
    name, given = _call_name(node), {k.arg: k.value for k in node.keywords}
    missing = [t for t in TOLERANCES if t not in given]
    out = (
        [
            f"line {node.lineno}: {name} without {'/'.join(missing)} uses a default tolerance; "
            + DERIVE
        ]
        if missing
        else []
    )
    for tol in TOLERANCES:
        value = _number(given[tol]) if tol in given else None
        if value:  # 0 means exact, which needs no derivation; any other literal is a guess
            out.append(f"line {node.lineno}: {tol}={value:g} is a bare number; {DERIVE}")
    return out


def _assert_problems(node: ast.Assert, lines: list[str]) -> list[str]:
    """An ordering with a bare slack, or one of measured values without a stated margin."""
    if not any(isinstance(op, ORDER) for c in _top_compares(node.test) for op in c.ops):
        return []
    out = []
    slack = [v for n in ast.walk(node.test) if (v := _number(n)) and abs(v) < 1e-3]
    if slack:
        out.append(f"line {node.lineno}: an ordering with a bare slack of {slack[0]:g}; {DERIVE}")
    said = "\n".join(lines[max(node.lineno - 2, 0) : node.end_lineno])  # the assert, the line above
    test = ast.unparse(node.test)
    if MEASURED.search(test) and "margin" not in said:
        out.append(
            f"line {node.lineno}: an assert orders measured values ({test[:60]}); assert "
            "only what holds with a wide margin on any CPU (say so in a '# margin:' "
            "comment) and print the rest"
        )
    return out


def check_problems(source: str) -> list[str]:
    """Machine-dependent checks of one code cell: bare or default tolerances, unmargined orders."""
    try:
        tree = ast.parse(source)
    except SyntaxError:  # IPython syntax (magics): not ours to lint here
        return []
    lines = source.splitlines()
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _call_name(node) in CLOSE_CALLS:
            out += _tolerance_problems(node)
        if isinstance(node, ast.Compare) and any(isinstance(op, ORDER) for op in node.ops):
            sides = [node.left, *node.comparators]
            has_abs = any(isinstance(x, ast.Call) and _call_name(x) == "abs" for x in sides)
            if has_abs and any(0 < abs(_number(x) or 0) < 1 for x in sides):
                out.append(
                    f"line {node.lineno}: abs(...) compared with a bare number; {DERIVE} "
                    "(or compare exactly when both sides compute the same thing)"
                )
        if isinstance(node, ast.Assert):
            out += _assert_problems(node, lines)
    return out


def exercise_items(markdown: str) -> dict[int, str]:
    """The numbered items after the Exercises heading of a markdown cell: {number: text}. An item
    runs until the next item or the first unindented line that is not one."""
    heading = EXERCISES_HEADING.search(markdown)
    if heading is None:
        return {}
    items: dict[int, str] = {}
    current = None
    for line in markdown[heading.end() :].splitlines():
        match = ITEM.match(line)
        if match:
            current = int(match.group(1))
            items[current] = line
        elif current is not None and (line.startswith((" ", "\t")) or not line.strip()):
            items[current] += "\n" + line
        elif current is not None:
            break
    return items


def exercise_problems(cells: list[dict], name: str) -> list[str]:
    """Every exercise has a hint and a hidden solution cell after the list (module docstring)."""
    where = [
        i
        for i, c in enumerate(cells)
        if c["cell_type"] == "markdown" and EXERCISES_HEADING.search("".join(c["source"]))
    ]
    solutions = [
        (i, c)
        for i, c in enumerate(cells)
        if c["cell_type"] == "code" and SOLUTION_TAG in c.get("metadata", {}).get("tags", [])
    ]
    if not where:
        return [f"{name}: no Exercises section"] if solutions else []
    at = where[-1]
    items = exercise_items("".join(cells[at]["source"]))
    out = [] if items else [f"{name}: the Exercises section has no numbered items"]
    for k, text in items.items():
        if "Hint:" not in text:
            out.append(f"{name}: exercise {k} has no '*Hint:*'")
    solved = {}
    for i, cell in solutions:
        source = "".join(cell["source"])
        match = SOLUTION_FIRST_LINE.match(source)
        if match is None:
            out.append(
                f"{name}: cell {i} is tagged solution but does not start with "
                "'# Solution to exercise <k>'"
            )
            continue
        k = int(match.group(1))
        if k in solved:
            out.append(f"{name}: exercise {k} has two solution cells ({solved[k]} and {i})")
        solved[k] = i
        if k not in items:
            out.append(f"{name}: cell {i} solves exercise {k}, which the list does not have")
        if i < at:
            out.append(f"{name}: the solution to exercise {k} (cell {i}) comes before the list")
        hidden = cell.get("metadata", {}).get("jupyter", {})
        if not (hidden.get("source_hidden") and hidden.get("outputs_hidden")):
            out.append(
                f"{name}: the solution to exercise {k} (cell {i}) is not hidden: set "
                "metadata.jupyter.source_hidden and outputs_hidden to true"
            )
    out += [f"{name}: exercise {k} has no solution cell" for k in items if k not in solved]
    return out


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
            out.append(
                f"{path.name}: code cell {i} has outputs (commit notebooks without outputs: "
                "nbstripout)"
            )
        if cell.get("execution_count") is not None:
            out.append(f"{path.name}: code cell {i} has an execution count")
        out += [f"{path.name}: code cell {i}, {p}" for p in check_problems("".join(cell["source"]))]
    if not code or "env.report()" not in "".join(code[0]["source"]):
        out.append(f"{path.name}: the first code cell must call nthr_book.env.report()")
    if not any(
        "config.announce_size(" in source
        and ("config.by_size(" in source or "GroupsPreset.current()" in source)
        for source in ("".join(c["source"]) for c in code)
    ):
        out.append(
            f"{path.name}: no parameters cell that prints the run size and its cost "
            "(config.announce_size) and picks parameters by size (config.by_size or "
            "GroupsPreset.current())"
        )
    first = "".join(nb["cells"][0]["source"]) if nb["cells"] else ""
    if nb["cells"] and (nb["cells"][0]["cell_type"] != "markdown" or not first.startswith("# ")):
        out.append(f"{path.name}: the first cell must be a markdown title")
    if "## Summary" not in "".join(
        "".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown"
    ):
        out.append(f"{path.name}: no '## Summary' section")
    out += exercise_problems(nb["cells"], path.name)
    return out


def main() -> int:
    paths = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if not paths:
        print(f"no notebooks found in {NOTEBOOKS}")
        return 1
    found = [p for path in paths for p in problems(path)]
    ok = f"{len(paths)} notebooks: no outputs, skeleton and checks ok"
    print("\n".join(found) if found else ok)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
