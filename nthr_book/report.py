"""The reader's report: each notebook's headline (one figure, a few numbers) and build/SUMMARY.md.

A notebook ends with one call, ``headline(OUT, title, numbers, figure=fig, seeds=SEEDS)``: it saves
the figure, formats the numbers (a ``(value, low, high)`` tuple becomes ``"0.641 [0.573, 0.708]"``),
writes ``build/<notebook>/headline.json`` and prints what the summary will show. ``save_headline``
is the lower-level call it makes (numbers already formatted, the figure already saved; notebooks
written before ``headline`` existed call it directly, and it keeps working). ``make demo``
(``nthr_book.demo``) gathers the headlines with each notebook's status and run time into
``build/SUMMARY.md``, so the whole result of a run reads on one page.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nthr_book import config
from nthr_book.io import write_json

HEADLINE_FILE = "headline.json"
HEADLINE_FIGURE = "headline.png"  # the name ``headline`` saves a figure object under


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


def interval(
    value: float, low: float, high: float, *, digits: int = 3, signed: bool = False
) -> str:
    """``"0.641 [0.573, 0.708]"``: a value with its interval; ``signed`` for differences
    (``"+0.020 [-0.010, +0.050]"``); NaN prints as ``nan``."""
    sign = "+" if signed else ""
    f = lambda v: f"{v:{sign}.{digits}f}" if math.isfinite(v) else "nan"  # noqa: E731
    return f"{f(value)} [{f(low)}, {f(high)}]"


def _format_number(value: Any, digits: int) -> str:
    """A headline number as text: a string as it is, a number with ``digits`` decimals, a
    ``(value, low, high)`` tuple as an interval, ``(value, low, high, note)`` with the note
    after."""
    if isinstance(value, str):
        return value
    if isinstance(value, tuple) and len(value) in (3, 4):
        text = interval(*(float(v) for v in value[:3]), digits=digits)
        return f"{text} {value[3]}" if len(value) == 4 else text
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    raise TypeError(
        f"headline: a number must be text, a number or (value, low, high[, note]), got {value!r}"
    )


def headline(
    out_dir: str | Path,
    title: str,
    numbers: Mapping[str, Any],
    *,
    figure: Any = None,
    seeds: tuple[int, ...] | list[int] = (),
    digits: int = 3,
) -> None:
    """The last cell of a notebook, in one call: save ``figure``, format ``numbers``, write the
    headline (``save_headline``) and print it as ``build/SUMMARY.md`` will show it.

    ``figure``: a matplotlib Figure or Axes (or an array of Axes), saved as ``headline.png`` in
    ``out_dir``, or the name of a file the notebook already saved there. ``numbers``: label ->
    text, a number (``digits`` decimals) or ``(value, low, high[, note])``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if figure is not None and not isinstance(figure, (str, Path)):
        fig = figure
        if hasattr(fig, "flat"):  # an array of Axes
            fig = fig.flat[0]
        elif isinstance(fig, (list, tuple)) and fig:  # a list of Axes
            fig = fig[0]
        if not hasattr(fig, "savefig"):  # an Axes: its figure
            fig = getattr(fig, "figure", None)
        if not hasattr(fig, "savefig"):
            raise TypeError(
                f"headline: figure must be a Figure, an Axes or a file name, got {figure!r}"
            )
        fig.savefig(out_dir / HEADLINE_FIGURE, dpi=120, bbox_inches="tight")
        figure = HEADLINE_FIGURE
    formatted = {str(k): _format_number(v, digits) for k, v in numbers.items()}
    save_headline(out_dir, title=title, numbers=formatted, figure=figure, seeds=seeds)
    print(f"headline for build/SUMMARY.md ({out_dir / HEADLINE_FILE}):\n")
    print(headline_markdown(out_dir.name, load_headline(out_dir)))
