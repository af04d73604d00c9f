"""results.jsonl and the other files of a run directory, written so a killed run resumes.

- Records are appended one ``os.write`` per line (O_APPEND); a line cut by a kill is
  dropped (and truncated away) when the log is opened again.
- Every other file is written under a temporary name in the same directory, fsynced,
  then renamed over the final name (:func:`atomic_write_bytes`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = "results.jsonl"


class LinkInOutdir(OSError):
    """A path convlens writes or deletes inside OUTDIR is a symbolic link: following it
    could touch files outside OUTDIR.  ``str(e)`` is one line."""


def refuse_links(outdir: str | Path, names: tuple[str, ...]) -> None:
    """Refuse to work on OUTDIR when any of ``names`` (files and folders convlens makes
    there, relative to OUTDIR) is a symbolic link.  OUTDIR itself may be one."""
    root = Path(outdir)
    for name in names:
        if os.path.islink(root / name):
            raise LinkInOutdir(
                f"{root / name} is a symbolic link; convlens writes only inside OUTDIR: "
                "remove the link or use another -o"
            )


def image_id(path: str | Path) -> str:
    """Stable id of an input: first 16 hex digits of sha1 of its absolute path."""
    return hashlib.sha1(str(path).encode("utf-8", "surrogateescape")).hexdigest()[:16]


_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
_serial = itertools.count()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to a dot-prefixed temporary name next to ``path``, then
    ``os.replace`` it: readers see the old file or the new one, never a part.  The one
    atomic writer of the project (engine and report alike).

    ``durable`` fsyncs before the rename, so the file survives a power cut as well as a
    kill (results, shards, maps); the report's assets, which can be made again, skip it.
    Plain ``os`` calls on strings: a report writes ~16 small files per image.
    """
    head, name = os.path.split(os.fspath(path))
    if head:
        os.makedirs(head, exist_ok=True)
    tmp = os.path.join(head, f".{name}.{os.getpid()}.{next(_serial)}.tmp")
    try:
        fd = os.open(tmp, _WRITE_FLAGS, 0o666)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def atomic_save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    atomic_write_bytes(path, buf.getvalue())


def read_records(path: Path, repair: bool = False) -> list[dict[str, Any]]:
    """All complete records of a results.jsonl (a trailing partial line is ignored;
    with ``repair`` it is also truncated away so appends start on a fresh line)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if repair and end != len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    records = []
    for line in data[:end].splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            continue  # a line torn by a crash in an earlier version; recomputed
    return records


class ResultsLog:
    """Append-only results.jsonl."""

    def __init__(self, outdir: Path):
        self.path = outdir / RESULTS
        self._fd: int | None = None

    def load(self) -> list[dict[str, Any]]:
        return read_records(self.path, repair=True)

    def rewrite(self, records: list[dict[str, Any]]) -> None:
        data = b"".join(_line(r) for r in records)
        atomic_write_bytes(self.path, data)

    def append(self, records: list[dict[str, Any]]) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        for r in records:
            os.write(self._fd, _line(r))

    def sync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None


def _line(record: dict[str, Any]) -> bytes:
    # ASCII JSON: a file name that is not valid UTF-8 (surrogate-escaped by Python)
    # round-trips as \udcXX escapes instead of writing invalid UTF-8 bytes
    return (json.dumps(record, separators=(",", ":")) + "\n").encode("ascii")
