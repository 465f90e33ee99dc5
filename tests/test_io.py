"""Atomic writes: the temporary file reaches the disk before the rename, the folder after it; the
JSONL reader."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from nthr_book import io


@pytest.fixture
def events(monkeypatch):
    """Record os.fsync (of a file: its inode; of a folder) and os.replace calls, in order."""
    log = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        log.append(("fsync_dir",) if stat.S_ISDIR(st.st_mode) else ("fsync_file", st.st_ino))
        real_fsync(fd)

    def replace(src, dst):
        log.append(("replace", os.stat(src).st_ino))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return log


def _check_order(log, path):
    kinds = [e[0] for e in log]
    assert kinds.count("replace") == 1, log
    r = kinds.index("replace")
    inode = log[r][1]
    assert ("fsync_file", inode) in log[:r], f"renamed file not fsynced before the rename: {log}"
    assert os.stat(path).st_ino == inode
    if os.name == "posix":
        assert "fsync_dir" in kinds[r + 1 :], f"the folder was not fsynced after the rename: {log}"


def test_atomic_write_text_fsyncs_file_then_folder(tmp_path, events):
    path = io.atomic_write_text(tmp_path / "sub" / "a.txt", "hello\n")
    assert path.read_text() == "hello\n"
    _check_order(events, path)


def test_atomic_torch_save_fsyncs_file_then_folder(tmp_path, events):
    obj = {"x": torch.arange(5)}
    path = io.atomic_torch_save(obj, tmp_path / "a.pt")
    assert torch.equal(torch.load(path, weights_only=True)["x"], obj["x"])
    _check_order(events, path)
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temporary file left


def test_folder_fsync_is_best_effort(tmp_path, monkeypatch):
    real_open = os.open

    def no_folders(p, flags, *a, **k):
        if os.path.isdir(p):
            raise PermissionError(f"cannot open {p}")
        return real_open(p, flags, *a, **k)

    monkeypatch.setattr(os, "open", no_folders)
    assert io.write_json(tmp_path / "b.json", {"a": 1}).read_text() == '{\n  "a": 1\n}\n'


def test_jsonl_reader_numbers_lines_and_names_file_and_line(tmp_path):
    path = tmp_path / "r.jsonl"
    # a blank line is skipped but counted; U+2028 inside a string does not end a line
    path.write_text('{"a": 1}\n\n{"a": "x\u2028y"}\n', encoding="utf-8")
    assert list(io.iter_jsonl_numbered(path)) == [(1, {"a": 1}), (3, {"a": "x\u2028y"})]
    assert io.read_jsonl(path) == [{"a": 1}, {"a": "x\u2028y"}]
    path.write_text('{"a": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"r\.jsonl:2: expected a JSON object, got list"):
        io.read_jsonl(path)


def test_jsonl_reader_drops_only_a_torn_last_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": ', encoding="utf-8")  # a write cut by a kill
    with pytest.raises(ValueError, match=r"r\.jsonl:3: not valid JSON"):
        io.read_jsonl(path)
    assert io.read_jsonl(path, skip_torn_tail=True) == [{"a": 1}, {"a": 2}]
    path.write_text('{"a": 1}\n{"a": \n{"a": 3}\n', encoding="utf-8")  # not the last line: an error
    with pytest.raises(ValueError, match=r"r\.jsonl:2: not valid JSON"):
        io.read_jsonl(path, skip_torn_tail=True)
