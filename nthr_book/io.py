"""Atomic writes and JSONL helpers: a killed run never leaves a half file that a later run trusts."""

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


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    tmp = _tmp_beside(path)
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through a temporary file and an atomic rename."""
    import torch

    path = Path(path)
    tmp = _tmp_beside(path)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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


def iter_jsonl(path: str | Path, *, skip_torn_tail: bool = False) -> Iterator[dict]:
    """Yield the records of a JSONL file; a malformed line raises ``ValueError`` naming file and line.

    With ``skip_torn_tail`` a malformed *last* line (a write cut by a kill) is dropped instead.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if skip_torn_tail and lineno == len(lines):
                return
            raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        yield record


def read_jsonl(path: str | Path, *, skip_torn_tail: bool = False) -> list[dict]:
    """All records of a JSONL file (see ``iter_jsonl``)."""
    return list(iter_jsonl(path, skip_torn_tail=skip_torn_tail))
