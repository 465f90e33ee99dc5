"""Tests of the reader's report: notebook headlines (nthr_book.report) and the resumable
``make demo`` (nthr_book.demo), with the notebook execution replaced by a recorder."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from nthr_book import demo, report


def test_headline_round_trip_and_markdown(tmp_path, monkeypatch):
    monkeypatch.setenv("NTHR_BOOK_SIZE", "laptop")
    (tmp_path / "curve.png").write_bytes(b"png")
    report.save_headline(
        tmp_path,
        title="GRPO vs NTHR",
        numbers={"held-out, grpo": "0.641 [0.573, 0.708]"},
        figure=tmp_path / "curve.png",
        seeds=(0, 1, 2),
    )
    saved = report.load_headline(tmp_path)
    assert saved["numbers"] == {"held-out, grpo": "0.641 [0.573, 0.708]"}
    assert saved["figure"] == "curve.png" and saved["seeds"] == [0, 1, 2]
    assert saved["size"] == "laptop" and "torch" in saved["versions"]
    text = report.headline_markdown("05_training", saved)
    assert "**GRPO vs NTHR**" in text and "Seeds 0, 1, 2; run size laptop." in text
    assert "- held-out, grpo: 0.641 [0.573, 0.708]" in text
    assert "![05_training](05_training/curve.png)" in text
    assert report.load_headline(tmp_path / "nothing") is None


def test_headline_refuses_a_missing_figure_and_no_numbers(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        report.save_headline(tmp_path, title="t", numbers={"a": "1"}, figure="missing.png")
    with pytest.raises(ValueError, match="numbers is empty"):
        report.save_headline(tmp_path, title="t", numbers={})
    (tmp_path / report.HEADLINE_FILE).write_text("{torn")
    with pytest.raises(ValueError, match="headline.json"):
        report.load_headline(tmp_path)


def test_headline_in_one_call_saves_the_figure_and_formats_the_numbers(tmp_path, capsys):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    report.headline(
        tmp_path / "01_x",
        "One call",
        {
            "an interval": (0.6412, 0.5731, 0.7085),
            "with a note": (0.5, 0.25, 0.75, "(95% t over 3 seeds)"),
            "a number": 0.12345,
            "a count": 7,
            "text": "as it is",
        },
        figure=ax,  # an Axes: its figure is saved as headline.png
        seeds=[0, 1],
    )
    plt.close(fig)
    saved = report.load_headline(tmp_path / "01_x")
    assert saved["figure"] == report.HEADLINE_FIGURE
    assert (tmp_path / "01_x" / report.HEADLINE_FIGURE).stat().st_size > 0
    assert saved["numbers"] == {
        "an interval": "0.641 [0.573, 0.709]",
        "with a note": "0.500 [0.250, 0.750] (95% t over 3 seeds)",
        "a number": "0.123",
        "a count": "7",
        "text": "as it is",
    }
    printed = capsys.readouterr().out
    assert "**One call**" in printed and "- an interval: 0.641 [0.573, 0.709]" in printed
    assert report.interval(0.02, -0.01, float("nan"), signed=True) == "+0.020 [-0.010, nan]"
    # a figure saved earlier by name, as save_headline takes it
    (tmp_path / "01_x" / "curve.png").write_bytes(b"png")
    report.headline(tmp_path / "01_x", "By name", {"x": 1.0}, figure="curve.png", digits=1)
    assert report.load_headline(tmp_path / "01_x")["figure"] == "curve.png"
    assert report.load_headline(tmp_path / "01_x")["numbers"] == {"x": "1.0"}
    with pytest.raises(TypeError, match="a number must be"):
        report.headline(tmp_path, "bad", {"x": [1, 2]})
    with pytest.raises(TypeError, match="figure must be"):
        report.headline(tmp_path, "bad", {"x": 1}, figure=object())


def _fake_series(tmp_path: Path, names=("00_a", "01_b", "02_c")) -> list[Path]:
    folder = tmp_path / "notebooks"
    folder.mkdir()
    paths = []
    for name in names:
        cells = [{"cell_type": "code", "source": [f"print('{name}')"], "outputs": []}]
        path = folder / f"{name}.ipynb"
        path.write_text(json.dumps({"cells": cells}))
        paths.append(path)
    return paths


def test_demo_skips_finished_notebooks_and_reruns_changed_or_failed_ones(tmp_path, monkeypatch):
    paths = _fake_series(tmp_path)
    build = tmp_path / "build"
    monkeypatch.setenv("NTHR_BOOK_BUILD", str(build))
    monkeypatch.setenv("NTHR_BOOK_SIZE", "ci")
    monkeypatch.setattr(
        demo, "notebooks", lambda only=None: [p for p in paths if not only or p.name[:2] in only]
    )
    calls, fail = [], {"01_b"}

    def fake_run(path, out_dir, timeout, jobs=1, progress=None):
        calls.append(path.stem)
        if path.stem == "00_a":  # a notebook that saves a headline
            (build / path.stem).mkdir(parents=True, exist_ok=True)
            report.save_headline(build / path.stem, title="first", numbers={"x": "1.0 [0.9, 1.1]"})
        ok = path.stem not in fail
        return ok, 60.0, "" if ok else "ValueError: boom"

    monkeypatch.setattr(demo, "run_notebook", fake_run)
    assert demo.main(["--jobs", "1"]) == 1  # 01_b failed
    assert sorted(calls) == ["00_a", "01_b", "02_c"]
    summary = (build / "SUMMARY.md").read_text()
    assert "| total | | 3.0 |" in summary and "FAILED: ValueError: boom" in summary
    assert "**first**" in summary and "- x: 1.0 [0.9, 1.1]" in summary

    # killed and run again: the finished notebooks are skipped, the failed one runs again
    calls.clear()
    fail.clear()
    assert demo.main([]) == 0 and calls == ["01_b"]
    # an edited notebook and another run size both count as not finished
    calls.clear()
    cells = json.loads(paths[2].read_text())
    cells["cells"][0]["source"] = ["print('edited')"]
    paths[2].write_text(json.dumps(cells))
    assert demo.main([]) == 0 and calls == ["02_c"]
    calls.clear()
    monkeypatch.setenv("NTHR_BOOK_SIZE", "laptop")
    assert demo.main(["--only", "00"]) == 0 and calls == ["00_a"]
    calls.clear()
    assert demo.main(["--only", "00", "--force"]) == 0 and calls == ["00_a"]


def test_source_hash_ignores_outputs(tmp_path):
    path = _fake_series(tmp_path, names=("00_a",))[0]
    before = demo.source_hash(path)
    nb = json.loads(path.read_text())
    nb["cells"][0]["outputs"] = [{"output_type": "stream", "text": "00_a"}]
    path.write_text(json.dumps(nb))
    assert demo.source_hash(path) == before


def test_schedule_waits_for_needs_runs_the_longest_first_and_skips_after_a_failure(monkeypatch):
    names = ("00_a", "02_b", "03_c", "05_d", "06_e")
    paths = [Path(f"notebooks/{name}.ipynb") for name in names]
    monkeypatch.setattr(demo, "NEEDS", {"03": ("02",), "06": ("05",)})
    monkeypatch.setattr(demo, "PRIORITY", ("05", "02", "06", "03", "00"))
    events, lock = [], threading.Lock()

    def run_one(path):
        with lock:
            events.append(("start", path.name[:2]))
        time.sleep(0.05)
        with lock:
            events.append(("end", path.name[:2]))
        return path.name[:2] != "05", 0.05, "" if path.name[:2] != "05" else "boom"

    done = []
    demo.run_scheduled(paths, run_one, 2, lambda path, result: done.append((path.name[:2], result)))
    starts = [n for kind, n in events if kind == "start"]
    assert starts[:2] == ["05", "02"]  # the two longest first
    assert events.index(("start", "03")) > events.index(("end", "02"))  # 03 reads 02's results
    assert "06" not in starts  # 05 failed, so 06 did not run
    assert dict(done)["06"] == (False, 0.0, "not run: it reads notebook 05, which failed")
    assert sorted(n for n, _ in done) == ["00", "02", "03", "05", "06"]
    # one worker: strictly one at a time, in the order of PRIORITY where the needs allow
    events.clear()
    demo.run_scheduled(paths[:3], run_one, 1, lambda path, result: None)
    assert [n for kind, n in events if kind == "start"] == ["02", "03", "00"]
    assert all(events[2 * i][0] == "start" and events[2 * i + 1][0] == "end" for i in range(3))


def test_prepare_builds_first_and_a_failure_keeps_the_notebook_from_running(tmp_path, monkeypatch):
    monkeypatch.setenv("NTHR_BOOK_BUILD", str(tmp_path / "build"))
    marker = tmp_path / "built"
    paths = _fake_series(tmp_path, names=("09_a", "00_b"))
    started = []
    monkeypatch.setattr(demo, "_run_logged", _recording_run_logged(started))
    monkeypatch.setattr(demo, "PREPARE", {"09": ("a cache", f"open({str(marker)!r}, 'w')")})
    ok, seconds, error = demo.check_with_nbmake(paths[0], timeout=60)
    assert marker.exists() and ok and not error  # built by its own process, then the notebook
    assert [command[1] for command in started] == ["-c", "-m"]
    assert (tmp_path / "build" / "logs" / "09_a.prepare.log").exists()
    started.clear()
    assert demo.check_with_nbmake(paths[1], timeout=60)[0]  # nothing to prepare for 00
    assert [command[1] for command in started] == ["-m"]
    started.clear()
    said = []  # the console: the build shows as the first section, then the notebook starts
    board = demo.Progress({"09_a": 60.0}, say=said.append)
    board.start("09_a")
    assert demo.check_with_nbmake(paths[0], timeout=60, progress=board)[0]
    assert said[1].startswith("  09_a: § building the a cache first")
    assert said[2] == "09_a: running ...; it took 1.0 min last time"
    started.clear()
    monkeypatch.setattr(demo, "PREPARE", {"09": ("a cache", "raise SystemExit(3)")})
    for run in (
        lambda p: demo.check_with_nbmake(p, timeout=60),
        lambda p: demo.run_notebook(p, tmp_path / "out", timeout=60),
    ):
        ok, seconds, error = run(paths[0])
        assert not ok and seconds == 0.0 and error.startswith("a cache failed, see ")
    assert [command[1] for command in started] == ["-c", "-c"]  # no notebook ran


def _recording_run_logged(started):
    """demo._run_logged that runs ``python -c`` for real and only records the notebook runs."""
    real = demo._run_logged

    def run_logged(command, log, jobs, on_line=None):
        started.append(list(command))
        if command[1] == "-c":
            return real(command, log, jobs, on_line)
        return 0, 0.1, "1 passed"

    return run_logged


def test_progress_lines_say_section_cell_and_time_left():
    now, said = [0.0], []
    board = demo.Progress(
        {"05_long": 600.0, "00_short": 60.0, "09_new": None},
        jobs=2,
        every=60.0,
        clock=lambda: now[0],
        say=said.append,
    )
    board.start("05_long")
    assert said == ["05_long: running ...; it took 10.0 min last time"]
    assert board.series_left() is None  # 09_new has no measured time
    board.expected["09_new"] = 120.0
    now[0] = 90.0
    line = board.update("05_long", {"cell": 3, "cells": 20, "section": "1. Train", "elapsed": 90})
    assert line == (
        "  05_long: § 1. Train, cell 3 of 20, 1.5 min in, about 8.5 min left (it took 10.0), "
        "the series about 6 min left"  # (510 + 60 + 120) s / 2 jobs
    )
    assert said[-1] == line  # a new section is said at once
    now[0] = 100.0
    board.update("05_long", {"cell": 4, "cells": 20, "section": "1. Train", "elapsed": 100})
    assert len(said) == 2  # same section, 10 s later: only logged
    now[0] = 160.0
    board.tick()  # 70 s of silence: the clock speaks, also in the middle of a long cell
    assert said[-1].startswith(
        "  05_long: § 1. Train, cell 4 of 20, 2.7 min in, about 7.3 min left"
    )
    board.tick()
    assert len(said) == 3
    now[0] = 700.0
    board.tick()
    assert "past the 10.0 min it took last time" in said[-1]
    board.finish("05_long")
    assert board.series_left() == (60.0 + 120.0) / 2
    # nbmake: no cell information, only the time
    board.start("00_short")
    now[0] = 761.0
    board.tick()
    assert (
        said[-1]
        == "  00_short: 1.0 min in, past the 1.0 min it took last time, the series about 1 min left"
    )


def test_expected_seconds_prefers_the_last_run_at_this_size():
    state = {"05_x": {"ok": True, "size": "ci", "seconds": 123.0}}
    assert demo.expected_seconds("05_x", "ci", state) == 123.0
    assert (
        demo.expected_seconds("05_x", "laptop", state) == 60 * demo.MEASURED_MINUTES["laptop"]["05"]
    )
    state["05_x"]["ok"] = False  # a failed run's time says little
    assert demo.expected_seconds("05_x", "ci", state) == 60 * demo.MEASURED_MINUTES["ci"]["05"]
    assert demo.expected_seconds("05_x", "paper", state) is None
    assert (
        demo.last_heading("text\n## 2. Curves with bands\nmore\n### 2.1 A part ##") == "2.1 A part"
    )
    assert demo.last_heading("no heading, #hashtag") is None


@pytest.mark.slow
def test_demo_prints_progress_of_a_real_notebook(tmp_path, monkeypatch, capsys):
    """A tiny notebook executed by a kernel in a process of its own: the console and the log say
    the section and the cell it is in, and the next run estimates from this one's time."""
    folder = tmp_path / "notebooks"
    folder.mkdir()
    cells = [
        ("markdown", "# 00 · A fake notebook"),
        ("code", "x = 1"),
        ("markdown", "Some text.\n\n## 1. The first part"),
        ("code", "import time\ntime.sleep(0.2)"),
        ("markdown", "## 2. The second part"),
        ("code", "print('done', x)"),
    ]
    nb = {
        "cells": [
            {"cell_type": kind, "metadata": {}, "source": [text]}
            | ({"outputs": [], "execution_count": None} if kind == "code" else {})
            for kind, text in cells
        ],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path = folder / "00_fake.ipynb"
    path.write_text(json.dumps(nb))
    build = tmp_path / "build"
    monkeypatch.setenv("NTHR_BOOK_BUILD", str(build))
    monkeypatch.setenv("NTHR_BOOK_SIZE", "ci")
    monkeypatch.setattr(demo, "notebooks", lambda only=None: [path])
    assert demo.main(["--jobs", "1"]) == 0
    out = capsys.readouterr().out
    took = demo.MEASURED_MINUTES["ci"]["00"]
    assert f"00_fake: running ...; it took {took:.1f} min last time" in out
    for section, k in (
        ("00 · A fake notebook", 1),
        ("1. The first part", 2),
        ("2. The second part", 3),
    ):
        assert f"  00_fake: § {section}, cell {k} of 3, " in out, out
    log = (build / "logs" / "00_fake.log").read_text()
    assert "00_fake: § 2. The second part, cell 3 of 3" in log and demo.PROGRESS_PREFIX not in log
    executed = json.loads((build / "notebooks" / "00_fake.ipynb").read_text())
    assert executed["cells"][-1]["outputs"][0]["text"] == ["done 1\n"]
    seconds = demo.load_state(build)["00_fake"]["seconds"]
    assert demo.main(["--jobs", "1", "--force"]) == 0
    assert f"it took {seconds / 60:.1f} min last time" in capsys.readouterr().out
