"""``make demo``: execute the notebook series (two at a time on a CPU) and write executed copies
and a summary to build/.

Usage: ``python -m nthr_book.demo [--only 00,01] [--timeout 3600] [--force] [--jobs 2] [--nbmake]``.
Each notebook runs in ``notebooks/`` (as in JupyterLab and nbmake) at the run size of
``NTHR_BOOK_SIZE`` (``make demo`` sets ``laptop``), in a process of its own whose output goes to
``build/logs/<name>.log``; its executed copy goes to ``build/notebooks/<name>.ipynb`` and ``.html``;
the data each notebook saves lands in ``build/<name>/``.

Two notebooks run at a time on a CPU (``--jobs``; one with CUDA), each with half the cores: most of
the series is small matrix products and token-by-token generation, which two single-threaded
processes get through faster than one process with two threads. A notebook starts once those it
reads from have finished (``NEEDS``), the longest first (``PRIORITY``); what one needs built
once (09's warm-up reasoner, ``PREPARE``) is built by its worker just before it, beside the other
notebooks, and timed apart. ``--nbmake`` checks each
notebook with ``pytest --nbmake`` instead (``make notebooks``, CI): the same schedule, nothing
written to build/ but the logs.

While a notebook runs, the console (and the notebook's log) shows where it is: the section (its
last markdown heading), cell k of n, the minutes it has run and an estimate of the minutes left,
from the time the same notebook took last time at this size (``build/demo_state.json``, else the
table ``MEASURED_MINUTES``), and for the whole series. A line comes at every new section and at
least once a minute (``--progress-every``), also while one long cell runs. ``--nbmake`` shows the
minutes run and left of each notebook (pytest executes the cells).

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
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from nthr_book import config
from nthr_book.io import atomic_write_text, write_json
from nthr_book.report import HEADLINE_FILE, headline_markdown, load_headline

STATE_FILE = "demo_state.json"
# What a notebook reads from another one's run: it starts after that one has finished. 03 reads
# 02's Δ(x) table; 06 evaluates 05's trained models. (04 and 08 reuse the groups 02 samples; the
# lock in groups.load_or_sample_groups lets whichever comes first sample them and the others wait.)
NEEDS = {"03": ("02",), "06": ("05",)}
# What a notebook needs built once before it starts, run by the worker that runs the notebook (so
# it overlaps the other notebooks instead of holding up the series) and timed apart from it: 09's
# warm-up reasoner, fine-tuned into the model cache on first use (seconds once cached).
PREPARE = {
    "09": (
        "warm-up reasoner",
        "from nthr_book.models import reasoner_dir; print('reasoner cache:', reasoner_dir())",
    )
}
# The longest first, as measured at the laptop size (09 with its warm-up): a free worker takes the
# first ready one.
PRIORITY = ("09", "02", "05", "08", "06", "07", "01", "04", "03", "00")
RESULT_PREFIX = "nthr_book.demo result: "  # the last line a notebook's process prints
PROGRESS_PREFIX = "nthr_book.demo progress: "  # a notebook's process, before each code cell
# Minutes each notebook took when last measured, per run size (the fallback when
# build/demo_state.json has no time for it at this size), without 09's warm-up (``PREPARE``).
# laptop: a fresh clone's `make demo` on the reference machine (2 cores, two notebooks at a time,
# one core each), 2026-12-07, 02 from a second run after its cut, 05 from a run of its own after
# the shared prompt start (commit 7150fe5, another job on the other core). ci: a fresh
# clone's `make test` of 2026-12-07 (commit 7150fe5).
MEASURED_MINUTES = {
    "laptop": {
        "00": 3.4, "01": 4.1, "02": 24.8, "03": 2.8, "04": 2.1, "05": 18.2, "06": 2.0, "07": 5.3,
        "08": 9.8, "09": 14.6,
    },
    "ci": {
        "00": 1.0, "01": 1.7, "02": 7.4, "03": 0.9, "04": 1.1, "05": 3.6, "06": 0.9, "07": 2.5,
        "08": 4.4, "09": 3.2,
    },
}  # fmt: skip
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


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


def last_heading(markdown: str) -> str | None:
    """The text of the last heading of a markdown cell (``## 2. Curves`` -> ``2. Curves``)."""
    found = HEADING.findall(markdown)
    return found[-1] if found else None


def expected_seconds(stem: str, size: str, state: dict) -> float | None:
    """How long ``stem`` should take at ``size``: its last successful run at this size in the
    demo's state, else ``MEASURED_MINUTES``; None when neither knows."""
    entry = state.get(stem, {})
    if entry.get("ok") and entry.get("size") == size and entry.get("seconds"):
        return float(entry["seconds"])
    minutes = MEASURED_MINUTES.get(size, {}).get(stem[:2])
    return None if minutes is None else 60.0 * minutes


def execute_notebook(
    path: Path,
    out_dir: Path,
    timeout: int,
    progress: Callable[[dict], None] | None = None,
) -> tuple[bool, str]:
    """Execute one notebook in this process's kernel client; write the executed copy (.ipynb and
    .html). Returns (ok, error). ``progress({"cell", "cells", "section", "elapsed"})`` is called
    before each code cell runs: cell k of the notebook's n code cells, the last markdown heading
    above it and the seconds since the notebook started."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    from nbconvert import HTMLExporter

    nb = nbformat.read(path, as_version=4)
    n_code = sum(1 for c in nb.cells if c.cell_type == "code" and c.source.strip())
    where, t0 = {"section": "", "cell": 0}, time.perf_counter()

    def on_cell_start(cell, cell_index, **_):  # every cell, markdown included
        if cell.cell_type == "markdown":
            where["section"] = last_heading(cell.source) or where["section"]

    def on_cell_execute(cell, cell_index, **_):  # a code cell, just before it runs
        where["cell"] += 1
        if progress is not None:
            elapsed = round(time.perf_counter() - t0, 1)
            cell, section = where["cell"], where["section"]
            progress({"cell": cell, "cells": n_code, "section": section, "elapsed": elapsed})

    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        on_cell_start=on_cell_start,
        on_cell_execute=on_cell_execute,
    )
    error = ""
    try:
        client.execute()
    except CellExecutionError as exc:
        error = str(exc).strip().splitlines()[-1] if str(exc).strip() else repr(exc)
    out_dir.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, out_dir / path.name)
    html, _ = HTMLExporter().from_notebook_node(nb)
    atomic_write_text(out_dir / path.with_suffix(".html").name, html)
    return not error, error


def default_jobs() -> int:
    """Notebooks run at a time: 2 on a CPU with 2 or more cores, 1 with CUDA or a single core
    (two training runs would share one GPU's memory)."""
    return 1 if config.run_size() == "paper" or (os.cpu_count() or 1) < 2 else 2


class Progress:
    """What the console says while notebooks run: a line per notebook at each new section, and at
    least every ``every`` seconds (``watch`` runs the clock in a thread, so a cell that runs for
    20 minutes still gets its lines). ``expected``: stem -> the seconds it took last time (None:
    unknown); ``jobs``: notebooks at a time, for the series' estimate."""

    def __init__(
        self,
        expected: dict[str, float | None],
        jobs: int = 1,
        *,
        every: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        say: Callable[[str], None] = lambda line: print(line, flush=True),
    ):
        self.expected, self.jobs, self.every = dict(expected), max(1, jobs), every
        self.clock, self.say = clock, say
        self.running: dict[str, dict] = {}
        self.finished: set[str] = set()
        self._lock = threading.Lock()

    def start(self, stem: str) -> None:
        """``stem`` starts now: say so, with the time it took last time."""
        with self._lock:
            now = self.clock()
            self.running[stem] = {"t0": now, "said": now, "section": None, "cell": None}
            known = self.expected.get(stem)
            took = f"; it took {known / 60:.1f} min last time" if known else ""
            self.say(f"{stem}: running ...{took}")

    def finish(self, stem: str) -> None:
        with self._lock:
            self.running.pop(stem, None)
            self.finished.add(stem)

    def update(self, stem: str, info: dict) -> str:
        """A progress message of ``stem``'s process: remember it, say it when it enters a new
        section or after ``every`` seconds of silence; return the line (for the log)."""
        with self._lock:
            entry = self.running.setdefault(
                stem, {"t0": self.clock(), "said": self.clock(), "section": None, "cell": None}
            )
            new_section = info.get("section") != entry["section"]
            entry.update(section=info.get("section"), cell=(info.get("cell"), info.get("cells")))
            line = self._line(stem)
            if new_section or self.clock() - entry["said"] >= self.every:
                entry["said"] = self.clock()
                self.say(line)
            return line

    def tick(self) -> None:
        """Say the line of every notebook that has been silent for ``every`` seconds."""
        with self._lock:
            now = self.clock()
            for stem, entry in self.running.items():
                if now - entry["said"] >= self.every:
                    entry["said"] = now
                    self.say(self._line(stem))

    def series_left(self) -> float | None:
        """Seconds left for the notebooks not finished, spread over ``jobs`` (None when one of
        them has no measured time)."""
        now, left = self.clock(), 0.0
        for stem, seconds in self.expected.items():
            if stem in self.finished:
                continue
            if seconds is None:
                return None
            entry = self.running.get(stem)
            left += max(seconds - (now - entry["t0"]), 0.0) if entry else seconds
        return left / self.jobs

    def _line(self, stem: str) -> str:
        entry = self.running[stem]
        elapsed = self.clock() - entry["t0"]
        parts = []
        if entry["section"]:
            parts.append(f"§ {entry['section']}")
        if entry["cell"] and entry["cell"][0]:
            parts.append(f"cell {entry['cell'][0]} of {entry['cell'][1]}")
        parts.append(f"{elapsed / 60:.1f} min in")
        known = self.expected.get(stem)
        if known is None:
            parts.append("no measured time to estimate the rest")
        elif elapsed < known:
            parts.append(f"about {(known - elapsed) / 60:.1f} min left (it took {known / 60:.1f})")
        else:
            parts.append(f"past the {known / 60:.1f} min it took last time")
        series = self.series_left()
        if series is not None and len(self.expected) > 1:
            parts.append(f"the series about {series / 60:.0f} min left")
        return f"  {stem}: " + ", ".join(parts)

    def watch(self):
        """A context manager that calls ``tick`` every few seconds in a thread until it exits."""
        import contextlib

        @contextlib.contextmanager
        def running():
            stop = threading.Event()

            def loop():
                while not stop.wait(min(5.0, self.every)):
                    self.tick()

            thread = threading.Thread(target=loop, daemon=True)
            thread.start()
            try:
                yield self
            finally:
                stop.set()
                thread.join()

        return running()


def _run_logged(
    command: Sequence[str],
    log: Path,
    jobs: int,
    on_line: Callable[[str], str | None] | None = None,
) -> tuple[int, float, str]:
    """Run ``command`` with its output in ``log`` and ``cpu_count // jobs`` threads (unless the
    environment already says); (return code, seconds, the log's last line). Each output line goes
    through ``on_line`` first, which may return the text to log in its place."""
    env = dict(os.environ)
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(name, threads)
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
            errors="replace",
            bufsize=1,
        )
        assert proc.stdout is not None
        for line in proc.stdout:  # as the process writes them
            shown = on_line(line.rstrip("\n")) if on_line is not None else None
            out.write(line if shown is None else shown + "\n")
            out.flush()
        code = proc.wait()
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return code, time.perf_counter() - t0, lines[-1] if lines else ""


def prepare(path: Path, jobs: int = 1, progress: Progress | None = None) -> tuple[bool, str]:
    """Build what the notebook at ``path`` needs once (``PREPARE``) in a process of its own, its
    output in build/logs/<name>.prepare.log, and say how long it took; ``progress`` shows it as
    the notebook's first section, then starts the notebook's own clock. Returns (ok, error)."""
    if path.name[:2] not in PREPARE:
        return True, ""
    what, code = PREPARE[path.name[:2]]
    log = config.build_dir() / "logs" / f"{path.stem}.prepare.log"
    if progress is not None:
        progress.update(path.stem, {"section": f"building the {what} first (seconds once cached)"})
    status, seconds, last = _run_logged([sys.executable, "-c", code], log, jobs)
    print(f"{path.stem}: {what} ready in {seconds / 60:.1f} min ({log})", flush=True)
    if status != 0:
        return False, f"{what} failed, see {log}: {last[:300]}"
    if progress is not None:
        progress.start(path.stem)  # the estimate of the notebook counts from here
    return True, ""


def run_notebook(
    path: Path, out_dir: Path, timeout: int, jobs: int = 1, progress: Progress | None = None
) -> tuple[bool, float, str]:
    """Execute one notebook in a process of its own (``execute_notebook``), its output in
    build/logs/<name>.log, its progress through ``progress``, after ``prepare``. Returns (ok,
    seconds, error); the seconds are the notebook's own, without the preparation."""
    ready, error = prepare(path, jobs, progress)
    if not ready:
        return False, 0.0, error
    command = [sys.executable, "-m", "nthr_book.demo", "--execute", str(path)]
    command += ["--out", str(out_dir), "--timeout", str(timeout)]
    log = config.build_dir() / "logs" / f"{path.stem}.log"

    def on_line(line: str) -> str | None:
        if not line.startswith(PROGRESS_PREFIX):
            return None
        info = json.loads(line[len(PROGRESS_PREFIX) :])
        if progress is None:
            return None
        return progress.update(path.stem, info).strip()

    code, seconds, last = _run_logged(command, log, jobs, on_line)
    if last.startswith(RESULT_PREFIX):
        result = json.loads(last[len(RESULT_PREFIX) :])
        return result["ok"], seconds, result["error"]
    return False, seconds, f"exit status {code}, see {log}: {last[:300]}"


def check_with_nbmake(
    path: Path, timeout: int, jobs: int = 1, progress: Progress | None = None
) -> tuple[bool, float, str]:
    """Execute one notebook with ``pytest --nbmake`` (CI's check), its output in
    build/logs/<name>.log, after ``prepare``. Returns (ok, seconds, the last line of pytest's
    report)."""
    ready, error = prepare(path, jobs, progress)
    if not ready:
        return False, 0.0, error
    command = [sys.executable, "-m", "pytest", "--nbmake", f"--nbmake-timeout={timeout}", "-q"]
    command += ["-p", "no:cacheprovider", str(path)]
    log = config.build_dir() / "logs" / f"{path.stem}.log"
    code, seconds, last = _run_logged(command, log, jobs)
    if code:
        tail = log.read_text(errors="replace").splitlines()[-60:]
        print(f"--- {log} (last {len(tail)} lines)\n" + "\n".join(tail), flush=True)
    return code == 0, seconds, "" if code == 0 else last


def run_scheduled(
    paths: Sequence[Path],
    run_one: Callable[[Path], tuple[bool, float, str]],
    jobs: int,
    on_done: Callable[[Path, tuple[bool, float, str]], None],
    on_start: Callable[[Path], None] | None = None,
) -> None:
    """Run every path with ``run_one`` on ``jobs`` workers. A notebook starts once the notebooks it
    ``NEEDS`` among ``paths`` have finished (those not in ``paths`` count as finished), and is not
    run when one of them failed; of the ready ones, the first in ``PRIORITY`` starts first.
    ``on_done(path, (ok, seconds, error))`` after each, in the order they finish;
    ``on_start(path)`` as each starts (default: print that it runs)."""
    rank = {number: i for i, number in enumerate(PRIORITY)}
    pending = sorted(paths, key=lambda p: (rank.get(p.name[:2], len(rank)), p.name))
    in_series, finished = {p.name[:2] for p in paths}, {}  # number -> ok
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        running: dict = {}  # future -> path
        while pending or running:
            for path in list(pending):
                if len(running) >= jobs:
                    break
                needs = [n for n in NEEDS.get(path.name[:2], ()) if n in in_series]
                if any(n not in finished for n in needs):
                    continue  # waits for them
                pending.remove(path)
                failed = [n for n in needs if not finished[n]]
                if failed:
                    finished[path.name[:2]] = False
                    on_done(
                        path, (False, 0.0, f"not run: it reads notebook {failed[0]}, which failed")
                    )
                    continue
                if on_start is None:
                    print(f"{path.stem}: running ...", flush=True)
                else:
                    on_start(path)
                running[pool.submit(run_one, path)] = path
            if not running:
                continue  # only skipped notebooks were ready: look again
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                path = running.pop(future)
                result = future.result()
                finished[path.name[:2]] = result[0]
                on_done(path, result)


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
    parser.add_argument(
        "--jobs", type=int, default=None, help="notebooks at a time (default: 2 on a CPU)"
    )
    parser.add_argument("--nbmake", action="store_true", help="check with pytest --nbmake (CI)")
    parser.add_argument(
        "--progress-every", type=float, default=60.0, help="seconds between progress lines"
    )
    parser.add_argument("--execute", default=None, help=argparse.SUPPRESS)  # one notebook, here
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.execute:  # the process of one notebook (run_notebook)

        def report(info: dict) -> None:
            print(PROGRESS_PREFIX + json.dumps(info), flush=True)

        ok, error = execute_notebook(Path(args.execute), Path(args.out), args.timeout, report)
        print(RESULT_PREFIX + json.dumps({"ok": ok, "error": error}), flush=True)
        return 0 if ok else 1
    jobs = default_jobs() if args.jobs is None else args.jobs
    if jobs < 1:
        parser.error(f"--jobs must be >= 1, got {jobs}")
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    build, size = config.build_dir(), config.run_size()
    build.mkdir(parents=True, exist_ok=True)
    paths = notebooks(only)
    state = load_state(build)
    if args.nbmake:
        expected = {p.stem: expected_seconds(p.stem, size, state) for p in paths}
        return _check_series(
            paths, args.timeout, jobs, Progress(expected, jobs, every=args.progress_every)
        )
    print(
        f"run size {config.mode_name()}; {len(paths)} notebooks, {jobs} at a time; results in "
        f"{build}, each notebook's output in {build / 'logs'}",
        flush=True,
    )
    t_start, todo = time.perf_counter(), []
    for path in paths:
        if not args.force and is_finished(state, path, size):
            minutes = state[path.stem]["seconds"] / 60
            print(f"{path.stem}: finished earlier ({minutes:.1f} min), skipped", flush=True)
        else:
            todo.append(path)
    failed, finished = [], []
    expected = {p.stem: expected_seconds(p.stem, size, state) for p in todo}
    progress = Progress(expected, jobs, every=args.progress_every)

    def record(path: Path, result: tuple[bool, float, str]) -> None:
        ok, seconds, error = result
        progress.finish(path.stem)
        state[path.stem] = {
            "ok": ok,
            "seconds": round(seconds, 1),
            "size": size,
            "source": source_hash(path),
            "error": error,
        }
        write_json(build / STATE_FILE, state)  # after every notebook: a kill loses only the running
        finished.append(path.stem)
        failed.extend([] if ok else [path.stem])
        status = "ok" if ok else "FAILED: " + error[:200]
        print(
            f"[{len(finished)}/{len(todo)}] {path.stem}: {status} in {seconds / 60:.1f} min "
            f"({(time.perf_counter() - t_start) / 60:.1f} min so far)",
            flush=True,
        )

    with progress.watch():
        run_scheduled(
            todo,
            lambda p: run_notebook(p, build / "notebooks", args.timeout, jobs, progress=progress),
            jobs,
            record,
            on_start=lambda p: progress.start(p.stem),
        )
    atomic_write_text(build / "SUMMARY.md", summary_markdown(notebooks(only), state, build))
    elapsed = (time.perf_counter() - t_start) / 60
    series = sum(state[p.stem]["seconds"] for p in paths if p.stem in state) / 60
    print(
        f"total: {elapsed:.1f} min in this call ({jobs} at a time); the notebooks' own run times "
        f"add up to {series:.1f} min. Wrote {build / 'SUMMARY.md'} and executed notebooks in "
        f"{build / 'notebooks'}",
        flush=True,
    )
    return 1 if failed else 0


def _check_series(
    paths: list[Path], timeout: int, jobs: int, progress: Progress | None = None
) -> int:
    """``--nbmake``: every notebook through ``pytest --nbmake`` on the schedule; 1 if any failed.
    ``progress`` says how long each has run and has left."""
    t_start, results = time.perf_counter(), {}
    progress = progress or Progress({p.stem: None for p in paths}, jobs)

    def record(path: Path, result: tuple[bool, float, str]) -> None:
        progress.finish(path.stem)
        results[path.stem] = result
        ok, seconds, error = result
        print(
            f"[{len(results)}/{len(paths)}] {path.stem}: {'passed' if ok else 'FAILED: ' + error} "
            f"in {seconds / 60:.1f} min",
            flush=True,
        )

    print(
        f"nbmake at size {config.mode_name()}: {len(paths)} notebooks, {jobs} at a time", flush=True
    )
    with progress.watch():
        run_scheduled(
            paths,
            lambda p: check_with_nbmake(p, timeout, jobs, progress),
            jobs,
            record,
            on_start=lambda p: progress.start(p.stem),
        )
    failed = [stem for stem, (ok, _, _) in results.items() if not ok]
    listed = ": " + ", ".join(failed) if failed else ""
    print(
        f"{len(paths) - len(failed)} passed, {len(failed)} failed{listed} in "
        f"{(time.perf_counter() - t_start) / 60:.1f} min",
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
