"""Atomic writes and JSONL helpers: a killed run never leaves a half file that a later run
trusts."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def _tmp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _fsync_dir(directory: Path) -> None:
    """fsync a folder so that a rename in it survives a crash (POSIX only; best effort)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename is still atomic
    finally:
        os.close(fd)


def _replace(tmp: Path, path: Path) -> None:
    """Rename the (already fsynced) ``tmp`` over ``path``, then fsync the folder."""
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _atomic_write(path: str | Path, mode: str, write, **open_kwargs) -> Path:
    """Call ``write(fh)`` on a temporary file beside ``path``, fsync it, then rename it
    atomically."""
    path = Path(path)
    tmp = _tmp_beside(path)
    try:
        with open(tmp, mode, **open_kwargs) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        _replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file (fsynced) and an atomic rename."""
    return _atomic_write(path, "w", lambda fh: fh.write(text), encoding="utf-8")


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through a temporary file (fsynced) and an atomic rename."""
    import torch

    return _atomic_write(path, "wb", lambda fh: torch.save(obj, fh))


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_jsonl(path: str | Path, records: Iterable[dict]) -> Path:
    """Atomically write records, one JSON object a line."""
    return atomic_write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in records))


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one record and flush it to disk (for resumable per-item logs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, default=str) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def iter_jsonl_numbered(
    path: str | Path, *, skip_torn_tail: bool = False
) -> Iterator[tuple[int, dict]]:
    """(line number, record) of each non-blank line of a JSONL file, read line by line.

    A malformed line raises ``ValueError`` naming file and line (``path:lineno: ...``). With
    ``skip_torn_tail`` a malformed *last* line (a write cut by a kill) is dropped instead.
    """
    path = Path(path)
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                if skip_torn_tail and fh.read() == "":  # nothing after it: the last line
                    return
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}"
                )
            yield lineno, record


def iter_jsonl(path: str | Path, *, skip_torn_tail: bool = False) -> Iterator[dict]:
    """Yield the records of a JSONL file (see ``iter_jsonl_numbered``)."""
    for _, record in iter_jsonl_numbered(path, skip_torn_tail=skip_torn_tail):
        yield record


def read_jsonl(path: str | Path, *, skip_torn_tail: bool = False) -> list[dict]:
    """All records of a JSONL file (see ``iter_jsonl``)."""
    return list(iter_jsonl(path, skip_torn_tail=skip_torn_tail))
