"""``make demo``: execute the notebook series in order and write executed copies and a summary to
build/.

Usage: ``python -m nthr_book.demo [--only 00,01] [--timeout 3600] [--force]``. Each notebook runs in
``notebooks/`` (as in JupyterLab and nbmake) at the run size of ``NTHR_BOOK_SIZE`` (``make demo``
sets ``laptop``); its executed copy goes to ``build/notebooks/<name>.ipynb`` and ``.html``; the data
each notebook saves lands in ``build/<name>/``.

The demo is resumable: ``build/demo_state.json`` records every notebook that finished, with the
run size and a hash of the notebook's source, and a second ``make demo`` skips those (``--force``
runs them again); inside a notebook, training runs and sampled groups resume from ``runs/``.
``build/SUMMARY.md`` lists every notebook's status, run time, headline figure and numbers
(``nthr_book.report``) and the small result tables (CSV) it wrote.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

from nthr_book import config
from nthr_book.io import atomic_write_text, write_json
from nthr_book.report import HEADLINE_FILE, headline_markdown, load_headline

STATE_FILE = "demo_state.json"


def notebooks(only: list[str] | None = None) -> list[Path]:
    """The numbered notebooks in order (optionally only those whose number is in ``only``)."""
    paths = sorted((config.PROJECT_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if only:
        paths = [p for p in paths if p.name[:2] in only]
    return paths


def source_hash(path: Path) -> str:
    """A hash of a notebook's cell sources (outputs and metadata do not count)."""
    cells = json.loads(path.read_text())["cells"]
    text = "\n\x00".join("".join(cell["source"]) for cell in cells)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_state(build: Path) -> dict:
    """``{notebook stem: {"ok", "seconds", "size", "source"}}`` of the notebooks run so far."""
    path = build / STATE_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:  # a torn file only costs a rerun
        return {}


def is_finished(state: dict, path: Path, size: str) -> bool:
    """True when ``path`` finished at this run size with its current source."""
    entry = state.get(path.stem, {})
    return (
        bool(entry.get("ok"))
        and entry.get("size") == size
        and entry.get("source") == source_hash(path)
    )


def run_notebook(path: Path, out_dir: Path, timeout: int) -> tuple[bool, float, str]:
    """Execute one notebook; write the executed copy (.ipynb and .html). Returns (ok, seconds,
    error)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    from nbconvert import HTMLExporter

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    t0 = time.perf_counter()
    error = ""
    try:
        client.execute()
    except CellExecutionError as exc:
        error = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
    seconds = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out_dir / path.name)
    html, _ = HTMLExporter().from_notebook_node(nb)
    atomic_write_text(out_dir / path.with_suffix(".html").name, html)
    return not error, seconds, error


def _results_section(folder: Path, max_rows: int = 12) -> str:
    """Markdown of the small CSV/JSON results a notebook saved in ``folder`` (build/<stem>/)."""
    import pandas as pd

    parts = []
    for path in sorted(folder.glob("*.csv")) if folder.is_dir() else []:
        try:
            df = pd.read_csv(path)
        except Exception as exc:  # a malformed CSV should not hide the others
            parts.append(f"- `{path.name}`: unreadable ({exc})")
            continue
        parts.append(
            f"**{path.name}**\n\n```\n{df.head(max_rows).round(4).to_string(index=False)}\n```"
        )
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if path.name == HEADLINE_FILE:  # shown above the tables
            continue
        data = json.loads(path.read_text())
        data.pop("versions", None)
        parts.append(f"**{path.name}**\n\n```json\n{json.dumps(data, indent=1)[:2000]}\n```")
    if not parts:
        return ""
    body = "\n\n".join(parts)
    return f"<details><summary>result tables</summary>\n\n{body}\n\n</details>"


def summary_markdown(paths: list[Path], state: dict, build: Path) -> str:
    """build/SUMMARY.md: a table of every notebook (status, minutes), then each one's headline and
    result tables."""
    from nthr_book.env import versions

    lines = [
        "# nthr_book demo: results",
        "",
        f"Run size: {config.mode_name()}",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        "",
        "| notebook | status | minutes |",
        "|---|---|---|",
    ]
    sections, total = [], 0.0
    for path in paths:
        entry = state.get(path.stem)
        if entry is None:
            lines.append(f"| {path.stem} | not run | |")
            continue
        total += entry["seconds"]
        status = "ok" if entry["ok"] else f"FAILED: {entry.get('error', '')[:200]}"
        lines.append(
            f"| [{path.stem}](notebooks/{path.stem}.html) | {status} | "
            f"{entry['seconds'] / 60:.1f} |"
        )
        headline = load_headline(build / path.stem)
        body = "\n\n".join(
            part
            for part in (
                headline_markdown(path.stem, headline) if headline else "",
                _results_section(build / path.stem),
            )
            if part
        )
        if body:
            sections.append(f"## {path.stem}\n\n{body}")
    lines.append(f"| total | | {total / 60:.1f} |")
    return "\n".join(lines) + "\n\n" + "\n\n".join(sections) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the series (skipping finished notebooks) and write build/SUMMARY.md; exit status 1 if
    any notebook failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated notebook numbers, e.g. 00,01")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    parser.add_argument("--force", action="store_true", help="rerun notebooks that finished")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    build, size = config.build_dir(), config.run_size()
    build.mkdir(parents=True, exist_ok=True)
    state, paths = load_state(build), notebooks(only)
    print(f"run size {config.mode_name()}; {len(paths)} notebooks; results in {build}", flush=True)
    t_start, failed = time.perf_counter(), 0
    for i, path in enumerate(paths, 1):
        prefix = f"[{i}/{len(paths)}] {path.stem}"
        if not args.force and is_finished(state, path, size):
            minutes = state[path.stem]["seconds"] / 60
            print(f"{prefix}: finished earlier ({minutes:.1f} min), skipped", flush=True)
            continue
        print(f"{prefix}: running ...", flush=True)
        ok, seconds, error = run_notebook(path, build / "notebooks", args.timeout)
        failed += not ok
        state[path.stem] = {
            "ok": ok,
            "seconds": round(seconds, 1),
            "size": size,
            "source": source_hash(path),
            "error": error,
        }
        write_json(build / STATE_FILE, state)  # after every notebook: a kill loses only the one
        print(f"{prefix}: {'ok' if ok else 'FAILED: ' + error[:200]} in {seconds / 60:.1f} min")
    atomic_write_text(build / "SUMMARY.md", summary_markdown(notebooks(only), state, build))
    elapsed = (time.perf_counter() - t_start) / 60
    series = sum(state[p.stem]["seconds"] for p in paths if p.stem in state) / 60
    print(
        f"total: {elapsed:.1f} min in this call; the series' notebooks took {series:.1f} min in "
        f"all. Wrote {build / 'SUMMARY.md'} and executed notebooks in {build / 'notebooks'}",
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
