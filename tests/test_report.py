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

    def fake_run(path, out_dir, timeout, jobs=1):
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
