"""Writing inside a run directory so that a killed run resumes: the project's one atomic
writer (a temporary name in the same directory, fsynced, renamed over the final name),
the refusal of planted links, and input ids.  results.jsonl itself is
:mod:`convlens.engine.outdir`."""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np


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


def atomic_write_bytes(
    path: str | os.PathLike[str],
    data: bytes | Iterable[bytes | memoryview],
    *,
    durable: bool = True,
) -> None:
    """Write ``data`` (bytes, or chunks written one after another as an iterable gives
    them) to a dot-prefixed temporary name next to ``path``, then
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
            for chunk in [data] if isinstance(data, bytes) else data:
                view = memoryview(chunk)
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


def append_and_replace(
    src: str | os.PathLike[str], data: bytes, dst: str | os.PathLike[str]
) -> None:
    """Append ``data`` to ``src`` (a file this process wrote with
    :func:`atomic_write_bytes` under a name of its own), make it durable, and rename it
    to ``dst``: readers of ``dst`` see the old file or the whole new one."""
    fd = os.open(os.fspath(src), os.O_WRONLY | os.O_APPEND | getattr(os, "O_BINARY", 0))
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(src, dst)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def atomic_save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    atomic_write_bytes(path, buf.getvalue())
