"""Atomic writes: the temporary file reaches the disk before the rename, the folder after it."""

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
        assert "fsync_dir" in kinds[r + 1:], f"the folder was not fsynced after the rename: {log}"


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
