"""``make demo``: execute the notebook series in order and write executed copies and a summary to
build/.

Usage: ``python -m nthr_book.demo [--only 00,01] [--timeout 3600]``. Each notebook runs in
``notebooks/`` (as in JupyterLab and nbmake); its executed copy goes to
``build/notebooks/<name>.ipynb`` and ``.html``; the data each notebook saves lands in
``build/<name>/``. ``build/SUMMARY.md`` lists the status and time of every notebook and the small
result tables (CSV/JSON) the notebooks wrote.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from nthr_book import config
from nthr_book.io import atomic_write_text


def notebooks(only: list[str] | None = None) -> list[Path]:
    """The numbered notebooks in order (optionally only those whose number is in ``only``)."""
    paths = sorted((config.PROJECT_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    if only:
        paths = [p for p in paths if p.name[:2] in only]
    return paths


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


def _results_section(stem: str, max_rows: int = 12) -> str:
    """Markdown of the small CSV/JSON results a notebook saved under build/<stem>/."""
    import pandas as pd

    folder = config.build_dir() / stem
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
        data = json.loads(path.read_text())
        data.pop("versions", None)
        parts.append(f"**{path.name}**\n\n```json\n{json.dumps(data, indent=1)[:2000]}\n```")
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Run the series and write build/SUMMARY.md; exit status 1 if any notebook failed."""
    from nthr_book.env import versions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated notebook numbers, e.g. 00,01")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    build = config.build_dir()
    lines = [
        "# nthr_book demo: results",
        "",
        f"Mode: {config.mode_name()}",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        "",
        "| notebook | status | minutes |",
        "|---|---|---|",
    ]
    sections, failed = [], 0
    for path in notebooks(only):
        print(f"running {path.name} ...", flush=True)
        ok, seconds, error = run_notebook(path, build / "notebooks", args.timeout)
        failed += not ok
        status = "ok" if ok else f"FAILED: {error[:200]}"
        print(f"  {status} in {seconds / 60:.1f} min", flush=True)
        lines.append(
            f"| [{path.stem}](notebooks/{path.stem}.html) | {status} | {seconds / 60:.1f} |"
        )
        body = _results_section(path.stem)
        if body:
            sections.append(f"## {path.stem}\n\n{body}")
    atomic_write_text(build / "SUMMARY.md", "\n".join(lines + [""] + sections) + "\n")
    print(f"wrote {build / 'SUMMARY.md'} and executed notebooks in {build / 'notebooks'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
