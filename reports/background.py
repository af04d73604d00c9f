"""Work done beside the engine's loop: a few threads behind a bounded queue.

The report's files (thumbnails, CAM heatmaps, activation grids) are encoded and written
while the engine decodes and runs the next batch.  OpenCV's encoders, zlib and the
file-system calls release the GIL, so a writer thread overlaps with onnxruntime and the
decode threads instead of stalling the loop.  At most ``max_pending`` jobs are queued
or running: :meth:`Background.submit` waits for the oldest one beyond that, so memory
stays flat (a job holds one image's arrays) and a slow disk slows the run rather than
filling memory; jobs may also say how many bytes they hold (``weight``), and then at
most ``max_bytes`` of them wait (one job alone may hold more).

A job's exception is raised in the caller's thread, by the ``submit`` or ``drain`` that
collects the job (never dropped); each job's return value is handed to ``collect`` in
the caller's thread, in submission order, so counters need no lock.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
from collections.abc import Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Background(Generic[T]):
    """``submit(fn, *args)`` runs ``fn(*args)`` on one of ``workers`` threads; at most
    ``max_pending`` jobs in flight; ``collect(result)`` is called on the caller's
    thread for every finished job, oldest first.  ``workers=0``: each job runs inside
    ``submit`` (what the benchmark compares against)."""

    def __init__(
        self,
        workers: int,
        max_pending: int,
        collect: Callable[[T], None],
        max_bytes: int = 1 << 62,
    ):
        if workers < 0 or max_pending < 1:
            raise ValueError("workers must be at least 0 and max_pending at least 1")
        self.workers = workers
        self.max_pending = max_pending
        self.collect = collect
        self.max_bytes = max_bytes
        self._bytes = 0  # the weight of the jobs pending
        self._pool: cf.ThreadPoolExecutor | None = None
        self._pending: collections.deque[tuple[cf.Future[T], int]] = collections.deque()

    def submit(self, fn: Callable[..., T], *args: Any, weight: int = 0) -> None:
        if self.workers == 0:
            self.collect(fn(*args))
            return
        if self._pool is None:
            self._pool = cf.ThreadPoolExecutor(self.workers, thread_name_prefix="report")
        while self._pending and (
            len(self._pending) >= self.max_pending
            or self._bytes + weight > self.max_bytes
            or self._pending[0][0].done()
        ):
            fut, held = self._pending.popleft()
            self._bytes -= held
            self.collect(fut.result())
        self._pending.append((self._pool.submit(fn, *args), weight))
        self._bytes += weight

    def drain(self) -> None:
        """Wait for every job, collect them, and stop the threads (a later ``submit``
        starts new ones).  The first failed job's exception is raised after the others
        have finished, so no job still writes when the caller goes on."""
        error: BaseException | None = None
        while self._pending:
            fut, held = self._pending.popleft()
            self._bytes -= held
            try:
                result = fut.result()
            except BaseException as exc:  # re-raised below, once every job has ended
                error = error or exc
                continue
            if error is None:
                self.collect(result)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if error is not None:
            raise error

    def __len__(self) -> int:
        return len(self._pending)
