"""The reader's report: each notebook's headline (one figure, a few numbers) and build/SUMMARY.md.

A notebook ends with ``save_headline(OUT, ...)``: its headline figure and numbers, already formatted
with their intervals and seeds, go to ``build/<notebook>/headline.json``. ``make demo``
(``nthr_book.demo``) gathers them with each notebook's status and run time into
``build/SUMMARY.md``, so the whole result of a run reads on one page.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from nthr_book import config
from nthr_book.io import write_json

HEADLINE_FILE = "headline.json"


def save_headline(
    out_dir: str | Path,
    *,
    title: str,
    numbers: Mapping[str, str],
    figure: str | Path | None = None,
    seeds: tuple[int, ...] | list[int] = (),
) -> Path:
    """Write a notebook's headline: ``title`` (one sentence), ``numbers`` (label -> the number as
    printed, with its interval), the ``figure`` file saved under ``out_dir`` and the seeds."""
    out_dir = Path(out_dir)
    if not numbers:
        raise ValueError("save_headline: numbers is empty; a headline needs at least one number")
    if figure is not None and not (out_dir / Path(figure).name).is_file():
        raise FileNotFoundError(
            f"save_headline: figure {Path(figure).name!r} is not in {out_dir}; save it there first"
        )
    from nthr_book.env import versions

    record = {
        "title": title,
        "numbers": {str(k): str(v) for k, v in numbers.items()},
        "figure": Path(figure).name if figure is not None else None,
        "seeds": [int(s) for s in seeds],
        "size": config.run_size(),
        "versions": versions(),
    }
    return write_json(out_dir / HEADLINE_FILE, record)


def load_headline(out_dir: str | Path) -> dict | None:
    """The headline a notebook saved in ``out_dir``, or None when it saved none."""
    path = Path(out_dir) / HEADLINE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def headline_markdown(stem: str, headline: Mapping) -> str:
    """Markdown of one notebook's headline, with the figure linked relative to build/."""
    lines = [f"**{headline['title']}**", ""]
    seeds = headline.get("seeds") or []
    if seeds:
        lines += [f"Seeds {', '.join(map(str, seeds))}; run size {headline.get('size', '?')}.", ""]
    lines += [f"- {label}: {value}" for label, value in headline["numbers"].items()]
    if headline.get("figure"):
        lines += ["", f"![{stem}]({stem}/{headline['figure']})"]
    return "\n".join(lines)
