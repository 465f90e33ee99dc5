"""Cross-references: every notebook, file and library name the project's text points to exists.

The text is every docstring, comment, markdown cell and document of the project: ``nthr_book/``,
``scripts/``, ``bench/``, ``tests/``, ``recipes/``, ``data/``, ``notebooks/`` and the top-level
documents. A pointer such as "notebook 02", "notebooks 05/06", "nb 01", ``notebooks/03_x.ipynb``,
"**04 · The threshold explorer**", ``nthr_book.groups.Group``, ``viz.plot_displacement`` or
``scripts/lld_displacement.py`` must name something that exists; a library function or module
whose docstring names a notebook must be used (or named) in that notebook when any notebook uses it.
The last tests hold the notebooks to ``tests/check_notebooks.py``, whose machine-independence rules
(derived tolerances, no unmargined orderings of measured numbers) they also check on small cells.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import io
import json
import re
import sys
import tokenize
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "nthr_book"
SKIP_DIRS = {".git", ".venv", "build", "runs", "node_modules", ".ipynb_checkpoints", "__pycache__"}
TEXT_SUFFIXES = {".py", ".md", ".ipynb", ".sh", ".toml", ".cfg", ".yml", ".yaml"}
THIS_FILE = Path(__file__).resolve()

NOTEBOOKS = {p.name[:2]: p for p in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))}
# Short names of modules as prose writes them (``viz.plot_displacement``); ``config`` is left out,
# since ``config.method`` or ``config.json`` in a docstring usually mean a config object or file.
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "config"))
MODULES.append("integrations")

# "notebook 02", "Notebook 02's", "notebooks 05/06", "notebooks 01 and 05", "nb 01"
NUMBERED = re.compile(r"\b(?:[Nn]otebooks?|nb)\s+(\d{2}(?:\s*(?:,|/|and|or|-|–)\s*\d{2})*)\b")
NOTEBOOK_FILE = re.compile(r"\b(\d{2}_[A-Za-z0-9_]+)\.ipynb\b")
# "**04 · The threshold explorer**", "**Before this:** 00 · Quickstart."
TITLE = re.compile(r"\b(\d{2}) · ([A-Za-z][^*.:\n(]*[A-Za-z])")
DOTTED = re.compile(r"\bnthr_book((?:\.[A-Za-z_]\w*)+)(?![\w-])")
BACKTICKED = re.compile(r"`+([^`\n]+)`+")
SHORT_NAME = re.compile(
    r"^(?:nthr_book\.)?(" + "|".join(MODULES) + r")((?:\.[A-Za-z_]\w*)+)(\(.*\))?$"
)
PATH = re.compile(r"(?<![\w./-])((?:\.\./)*[\w-]+(?:/[\w.-]+)*\.(?:py|md|ipynb))\b")
GENERATED = ("build/", "runs/", "../")  # outputs of a run, or folders beside the project


def _text_files() -> Iterator[Path]:
    for path in sorted(ROOT.rglob("*")):
        rel = path.relative_to(ROOT)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts):
            continue
        text = path.suffix in TEXT_SUFFIXES or path.name == "Makefile"
        if path.is_file() and text and path != THIS_FILE:
            yield path


def _notebook_cells(path: Path) -> list[tuple[str, str]]:
    """(cell_type, source) of every cell."""
    cells = json.loads(path.read_text())["cells"]
    return [(c["cell_type"], "".join(c["source"])) for c in cells]


def _python_prose(source: str) -> str:
    """Docstrings and comments of Python source, each at its own line number (code left blank)."""
    lines = [""] * (source.count("\n") + 1)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            lines[token.start[0] - 1] += token.string
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if (
            isinstance(first, ast.Expr)
            and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)
        ):
            doc = first.value
            for i, line in enumerate(source.splitlines()[doc.lineno - 1 : doc.end_lineno]):
                lines[doc.lineno - 1 + i] += " " + line
    return "\n".join(lines)


def _prose(path: Path) -> str:
    """The text a reader reads: docstrings and comments of Python, markdown cells and comments of a
    notebook, the whole of any other file."""
    if path.suffix == ".py":
        return _python_prose(path.read_text())
    if path.suffix != ".ipynb":
        return path.read_text()
    parts = []
    for kind, source in _notebook_cells(path):
        parts.append(source if kind == "markdown" else "\n".join(re.findall(r"#.*", source)))
    return "\n".join(parts)


def _lines(path: Path) -> Iterator[tuple[str, str]]:
    """(where, line) of the prose of one file."""
    rel = path.relative_to(ROOT)
    for number, line in enumerate(_prose(path).splitlines(), 1):
        yield (f"{rel}:{number}" if path.suffix != ".ipynb" else f"{rel} (cells)"), line


def _numbers(group: str) -> list[str]:
    return re.findall(r"\d{2}", group)


def _resolve(dotted: str) -> object:
    """The object named ``nthr_book.<dotted>``: the longest importable module, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(["nthr_book", *parts[:cut]]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)  # AttributeError: the name does not exist
        return obj
    return importlib.import_module("nthr_book")


def _keyword_problems(obj: object, name: str, call: str, where: str) -> list[str]:
    """Keyword arguments written in ``func(..., kw=...)`` that ``func`` does not take."""
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return []
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    return [
        f"{where}: `{name}{call}` passes {kw}=, which nthr_book.{name} does not take"
        for kw in re.findall(r"(?<![\w.])(\w+)\s*=(?!=)", call)
        if kw not in params
    ]


# ----------------------------------------------------------------------------------- notebooks


def notebook_pointer_problems() -> list[str]:
    """Every "notebook NN", ``NN_name.ipynb``, "NN · Title" names a notebook that exists."""
    titles = {
        nn: _notebook_cells(p)[0][1].splitlines()[0].lstrip("# ").strip()
        for nn, p in NOTEBOOKS.items()
    }
    out = []
    for path in _text_files():
        for where, line in _lines(path):
            for m in NUMBERED.finditer(line):
                out += [
                    f"{where}: {m.group()!r} names notebook {nn}, which does not exist"
                    for nn in _numbers(m.group(1))
                    if nn not in NOTEBOOKS
                ]
            for m in NOTEBOOK_FILE.finditer(line):
                if not (ROOT / "notebooks" / f"{m.group(1)}.ipynb").exists():
                    out.append(f"{where}: {m.group()!r} is not a notebook of notebooks/")
            for m in TITLE.finditer(line):
                nn, title = m.group(1), m.group(2).strip()
                if nn not in NOTEBOOKS:
                    out.append(f"{where}: {m.group()!r} names notebook {nn}, which does not exist")
                elif not titles[nn].lower().startswith(f"{nn} · {title}".lower()):
                    out.append(
                        f"{where}: {m.group()!r} does not match notebook {nn}'s title "
                        f"{titles[nn]!r}"
                    )
    return out


def next_notebook_problems() -> list[str]:
    """A notebook's closing "Next: **NN · ...**" names the notebook that follows it."""
    numbers = sorted(NOTEBOOKS)
    out = []
    for nn, path in NOTEBOOKS.items():
        for kind, source in _notebook_cells(path):
            for m in re.finditer(r"Next:\s*\*\*(\d{2})", source if kind == "markdown" else ""):
                following = numbers[numbers.index(nn) + 1] if nn != numbers[-1] else None
                if m.group(1) != following:
                    out.append(
                        f"{path.name}: 'Next' names {m.group(1)}, the next notebook is {following}"
                    )
    return out


# ----------------------------------------------------------------------------------- names


def library_name_problems() -> list[str]:
    """Every ``nthr_book.x.y`` and backticked ``module.func`` exists, with the keywords given."""
    out = []
    for path in _text_files():
        for where, line in _lines(path):
            names = {m.group(1)[1:] for m in DOTTED.finditer(line)}
            calls = {}
            for span in BACKTICKED.findall(line):
                m = SHORT_NAME.match(span.strip())
                if m:
                    names.add(m.group(1) + m.group(2))
                    if m.group(3):
                        calls[m.group(1) + m.group(2)] = m.group(3)
            for name in sorted(names):
                try:
                    obj = _resolve(name)
                except (AttributeError, ImportError) as exc:
                    out.append(f"{where}: nthr_book.{name} does not exist ({exc})")
                    continue
                if name in calls:
                    out += _keyword_problems(obj, name, calls[name], where)
    return out


def file_pointer_problems() -> list[str]:
    """Every project file a text names (``scripts/x.py``, ``data/README.md``, ...) exists."""
    files = [p.relative_to(ROOT).as_posix() for p in _text_files()]
    files.append(f"tests/{THIS_FILE.name}")
    out = []
    for path in _text_files():
        for where, line in _lines(path):
            for m in PATH.finditer(line):
                target = m.group(1)
                if target.startswith(GENERATED) or target.startswith("nthr_book.egg"):
                    continue
                # a path from the project root, or from a folder of it ("integrations/trl.py")
                if not any(f == target or f.endswith("/" + target) for f in files):
                    out.append(f"{where}: {target!r} is not a file of the project")
    return out


# ----------------------------------------------------------------------------------- docstrings


def _docstrings(module_path: Path) -> Iterator[tuple[str, str, int]]:
    """(name, docstring, line) of the module ("" as name), (name, first paragraph, line) of every
    function, class and method: where the one-line summary says which notebook introduces it."""
    tree = ast.parse(module_path.read_text())
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, kinds)]
    for node in nodes:
        doc = ast.get_docstring(node) or ""
        yield (node.name, doc.split("\n\n")[0], node.lineno) if node is not tree else ("", doc, 1)


def _mentions(notebook: Path, name: str, module: str) -> bool:
    """Whether the notebook names the function (code or markdown); for name "", the module."""
    text = "\n".join(source for _, source in _notebook_cells(notebook))
    if name:
        return re.search(rf"(?<!\w){re.escape(name)}\b", text) is not None
    dotted = module.replace("/", ".")
    last = dotted.rsplit(".", 1)[-1]
    imported = rf"nthr_book\.{re.escape(dotted)}\b|from nthr_book[\w.]* import [^\n]*\b{last}\b"
    return re.search(imported, text) is not None


def docstring_notebook_problems() -> list[str]:
    """A library function (or module) whose docstring points to notebook NN, while other notebooks
    use it by name, is used by name in notebook NN too: the pointer names where it is found."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = str(path.relative_to(PACKAGE).with_suffix("")).replace("/__init__", "")
        for name, doc, line in _docstrings(path):
            users = [nn for nn, nb in NOTEBOOKS.items() if _mentions(nb, name, module)]
            for m in NUMBERED.finditer(doc):
                for nn in _numbers(m.group(1)):
                    if users and nn in NOTEBOOKS and nn not in users:
                        what = f"{name}()" if name else f"module {module}"
                        out.append(
                            f"nthr_book/{module}.py:{line}: {what} points to notebook {nn}, "
                            f"which does not use it (notebook(s) {', '.join(users)} do)"
                        )
    return out


# ----------------------------------------------------------------------------------- tests


CHECKS = [
    notebook_pointer_problems,
    next_notebook_problems,
    library_name_problems,
    file_pointer_problems,
    docstring_notebook_problems,
]


@pytest.mark.parametrize("check", CHECKS, ids=lambda f: f.__name__)
def test_project_text_points_to_what_exists(check):
    problems = check()
    assert not problems, f"{len(problems)} wrong pointer(s):\n" + "\n".join(problems)


def _write_notebook(path: Path, markdown: str, code: str) -> Path:
    cells = [
        {"cell_type": "markdown", "metadata": {}, "source": markdown.splitlines(True)},
        {
            "cell_type": "code",
            "metadata": {},
            "source": code.splitlines(True),
            "outputs": [],
            "execution_count": None,
        },
    ]
    path.write_text(json.dumps({"cells": cells}))
    return path


def test_the_checks_catch_wrong_pointers(tmp_path, monkeypatch):
    # Each check on a made-up project with wrong pointers of its kind: none passes vacuously.
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "nthr_book").mkdir()
    folder = tmp_path / "notebooks"
    nb0 = _write_notebook(
        folder / "00_start.ipynb",
        "# 00 · Start here\nNext: **02 · Missing**",
        "from nthr_book.grpo import policy_loss",
    )
    nb1 = _write_notebook(
        folder / "01_more.ipynb",
        "# 01 · More\nBefore this: **00 · Start**",
        "from nthr_book.grpo import group_advantages",
    )
    (tmp_path / "nthr_book" / "grpo.py").write_text(
        '"""Losses (notebook 00)."""\n\n\n'
        'def group_advantages():\n    """Advantages (notebook 00)."""\n'
    )
    (tmp_path / "README.md").write_text(
        "See notebook 08, `grpo.no_such_function`, `grpo.policy_loss(agg=1, nonsense=2)` "
        "and scripts/none.py.\n"
    )
    module = sys.modules[__name__]
    for name, value in {
        "ROOT": tmp_path,
        "PACKAGE": tmp_path / "nthr_book",
        "NOTEBOOKS": {"00": nb0, "01": nb1},
    }.items():
        monkeypatch.setattr(module, name, value)
    found = {check.__name__: "\n".join(check()) for check in CHECKS}
    assert "notebook 08" in found["notebook_pointer_problems"]
    assert "02 · Missing" in found["notebook_pointer_problems"]
    assert "00 · Start" not in found["notebook_pointer_problems"]  # a prefix of the title is fine
    assert "'Next' names 02, the next notebook is 01" in found["next_notebook_problems"]
    assert "no_such_function" in found["library_name_problems"]
    assert "passes nonsense=" in found["library_name_problems"]
    assert "passes agg=" not in found["library_name_problems"]
    assert "scripts/none.py" in found["file_pointer_problems"]
    assert "group_advantages() points to notebook 00" in found["docstring_notebook_problems"]
    assert "module grpo" not in found["docstring_notebook_problems"]  # 00 imports nthr_book.grpo


# ----------------------------------------------------------------------------------- notebook lint


@pytest.mark.parametrize(
    "source,problem",
    [
        ("torch.testing.assert_close(a, b)", "default tolerance"),
        ("torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)", "rtol=0.0001 is a bare number"),
        ("np.testing.assert_allclose(a, b, rtol=tol)", "without atol"),
        ("assert abs(x - y) < 1e-12", "abs(...) compared with a bare number"),
        ("assert (table.a >= table.b - 1e-6).all()", "bare slack of 1e-06"),
        ("assert df.delta.median() > 0", "orders measured values"),
        ("assert s.median_delta.nthr > s.median_delta.grpo and ok", "orders measured values"),
    ],
)
def test_notebook_lint_flags_machine_dependent_checks(source, problem):
    import check_notebooks

    assert any(problem in p for p in check_notebooks.check_problems(source)), source


@pytest.mark.parametrize(
    "source",
    [
        "tol = 4 * torch.finfo(torch.float64).eps\ntorch.testing.assert_close(a, b, rtol=tol, "
        "atol=0)",
        "torch.testing.assert_close(a, b, rtol=0.0, atol=bound)",
        "assert frac == (wide.delta > 0).mean()",
        "assert df.delta.median() > 0  # margin: every question rose by 10x the noise",
        "assert (table.adv >= table.grpo - slack).all()",
        "assert math.isfinite(res.delta)",
        "%time x = 1",
    ],
)
def test_notebook_lint_accepts_derived_checks(source):
    import check_notebooks

    assert check_notebooks.check_problems(source) == []


def test_notebooks_pass_the_lint():
    import check_notebooks

    found = [p for path in NOTEBOOKS.values() for p in check_notebooks.problems(path)]
    assert not found, "\n".join(found)


def _cells(exercises: str, *solutions: tuple[str, dict]) -> list[dict]:
    cells = [{"cell_type": "markdown", "source": [exercises]}]
    for source, metadata in solutions:
        cells.append({"cell_type": "code", "source": [source], "metadata": metadata})
    return cells


HIDDEN = {"jupyter": {"source_hidden": True, "outputs_hidden": True}, "tags": ["solution"]}


def test_notebook_lint_wants_a_hint_and_a_hidden_solution_per_exercise():
    import check_notebooks

    text = (
        "## Summary\n\n- a point\n\n## Exercises\n\n1. Do this.\n   *Hint:* like that.\n"
        "2. Do that,\n   on two lines.\n   *Hint:* look again.\n\nThe solutions are below.\n"
    )
    good = _cells(
        text, ("# Solution to exercise 1\nx = 1", HIDDEN), ("# Solution to exercise 2", HIDDEN)
    )
    assert check_notebooks.exercise_problems(good, "nb") == []
    assert check_notebooks.exercise_items(text).keys() == {1, 2}
    # the older layout: a bold line inside the summary
    bold = _cells("**Exercises**\n1. One.\n   *Hint:* h.\n", ("# Solution to exercise 1", HIDDEN))
    assert check_notebooks.exercise_problems(bold, "nb") == []

    no_hint = [_cells(text.replace("   *Hint:* look again.\n", ""))[0], *good[1:]]
    assert check_notebooks.exercise_problems(no_hint, "nb") == ["nb: exercise 2 has no '*Hint:*'"]
    shown = {"tags": ["solution"]}
    found = check_notebooks.exercise_problems(
        _cells(text, ("# Solution to exercise 1", HIDDEN), ("# Solution to exercise 2", shown)),
        "nb",
    )
    assert len(found) == 1 and "exercise 2 (cell 2) is not hidden" in found[0]
    found = check_notebooks.exercise_problems(
        _cells(text, ("# Solution to exercise 1", HIDDEN)), "nb"
    )
    assert found == ["nb: exercise 2 has no solution cell"]
    found = check_notebooks.exercise_problems(
        _cells(text, ("print('answer')", HIDDEN), ("# Solution to exercise 3", HIDDEN)), "nb"
    )
    assert any("does not start with '# Solution to exercise" in p for p in found)
    assert any("solves exercise 3, which the list does not have" in p for p in found)
    before = [good[1], *good[:1], good[2]]  # a solution above the list
    assert any(
        "comes before the list" in p for p in check_notebooks.exercise_problems(before, "nb")
    )
    # a notebook without exercises and without solutions is left alone
    assert check_notebooks.exercise_problems(_cells("## Summary\n- done\n"), "nb") == []
