"""What codec libraries print, kept off the terminal and read as the decoder's signal.

libjpeg, libpng, dav1d and libtiff report through C's ``stderr`` stream
(``fprintf(stderr, ...)``), not through OpenCV: libjpeg's "Premature end of JPEG file"
and "Corrupt JPEG data: premature end of data segment" are warnings, after which the
decoder fills the rest of the image with grey and OpenCV returns it as a success.  So
while images are decoded, C's ``stderr`` *stream* (the ``FILE *`` that C code writes
through) is pointed at a pipe; file descriptor 2 is untouched, so Python's
``sys.stderr`` (convlens' own one-line messages, the progress bar) still reaches the
terminal.  A drain thread reads the pipe; every decode that wants its messages writes a
start and an end marker around the native call, so a message is known to come from one
of the decodes open at that moment.  When more than one was open, ``window(alone=True)``
lets the caller decode again with no other window open, to know whose it was.

Where C's ``stderr`` cannot be redirected (other than Linux with glibc),
:data:`AVAILABLE` is false, nothing is captured, the libraries' messages go where they
always did, and a JPEG's truncation is judged by its end-of-image marker instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import platform
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

_MARKER = re.compile(rb"CL:([SE])(\d+)")
_KEEP = 1 << 16  # characters of one decode's messages kept


@dataclass
class Capture:
    """What native code printed while one decode's window was open."""

    text: str = ""
    alone: bool = True  # no other window was open when any of it arrived
    done: threading.Event = field(default_factory=threading.Event)


class _Channel:
    def __init__(self) -> None:
        libc = ctypes.CDLL(None)  # the global scope: the stderr every library uses
        self._var = ctypes.c_void_p.in_dll(libc, "stderr")
        self._original = self._var.value
        read_fd, self._write_fd = os.pipe()
        fdopen = libc.fdopen
        fdopen.restype, fdopen.argtypes = ctypes.c_void_p, [ctypes.c_int, ctypes.c_char_p]
        self._file = fdopen(self._write_fd, b"w")
        if not self._file:
            raise OSError("fdopen failed")
        setvbuf = libc.setvbuf
        setvbuf.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
        setvbuf(self._file, None, 2, 0)  # _IONBF: each message is written at once
        self._lock = threading.Lock()
        self._users = 0
        self._open: dict[int, Capture] = {}
        self._pending: dict[int, Capture] = {}
        self._ids = itertools.count()
        self._rw = _SharedExclusive()
        threading.Thread(target=self._drain, args=(read_fd,), daemon=True).start()

    @contextlib.contextmanager
    def redirected(self) -> Iterator[None]:
        """C's ``stderr`` goes to the pipe while at least one caller is inside."""
        with self._lock:
            self._users += 1
            if self._users == 1:
                self._var.value = self._file
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0:
                    self._var.value = self._original

    @contextlib.contextmanager
    def window(self, alone: bool) -> Iterator[Capture]:
        token = next(self._ids)
        cap = Capture()
        with self._lock:
            self._pending[token] = cap
        with self.redirected(), self._rw.exclusive() if alone else self._rw.shared():
            os.write(self._write_fd, b"\0CL:S%d\0" % token)
            try:
                yield cap
            finally:
                os.write(self._write_fd, b"\0CL:E%d\0" % token)
                cap.done.wait(10.0)  # the drain thread has read up to our end marker

    def _drain(self, fd: int) -> None:
        buf = b""
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            try:
                buf = self._parse(buf + chunk)
            except Exception:  # never let the reader die: writers would block on the pipe
                buf = b""

    def _parse(self, buf: bytes) -> bytes:
        """Hand out the noise and markers in ``buf``; the incomplete rest is returned."""
        while buf:
            i = buf.find(b"\0")
            if i < 0:
                self._noise(buf)
                return b""
            self._noise(buf[:i])
            j = buf.find(b"\0", i + 1)
            if j < 0:
                return buf[i:]
            m = _MARKER.fullmatch(buf[i + 1 : j])
            if m is None:  # a NUL of native code's own: noise, up to the next NUL
                self._noise(buf[i + 1 : j])
                buf = buf[j:]
                continue
            self._marker(m.group(1), int(m.group(2)))
            buf = buf[j + 1 :]
        return b""

    def _noise(self, data: bytes) -> None:
        if not data:
            return
        text = data.decode("utf-8", "replace")
        with self._lock:
            alone = len(self._open) == 1
            for cap in self._open.values():
                cap.text += text
                if len(cap.text) > _KEEP:  # a decode may warn thousands of times: its
                    half = _KEEP // 2  # first and latest messages are kept
                    cap.text = cap.text[:half] + "\n" + cap.text[-half:]
                cap.alone = cap.alone and alone

    def _marker(self, kind: bytes, token: int) -> None:
        with self._lock:
            if kind == b"S":
                self._open[token] = self._pending.pop(token, Capture())
            else:
                cap = self._open.pop(token, None)
                if cap is not None:
                    cap.done.set()


class _SharedExclusive:
    """A readers-writer lock: many shared holders, or one exclusive (who waits first)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and not self._waiting)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._exclusive and not self._shared)
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


_CHANNEL: _Channel | None = None
_CHANNEL_LOCK = threading.Lock()


def _channel() -> _Channel | None:
    global _CHANNEL, AVAILABLE
    with _CHANNEL_LOCK:
        if _CHANNEL is None and AVAILABLE:
            try:
                _CHANNEL = _Channel()
            except (OSError, ValueError, AttributeError):
                AVAILABLE = False
        return _CHANNEL


#: whether C's ``stderr`` can be redirected here: glibc, where ``stderr`` is a writable
#: ``FILE *`` (musl's is ``const``; others are untested), and known after the first window
AVAILABLE = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def available() -> bool:
    """Whether C's ``stderr`` can be captured here (set up on the first call)."""
    return _channel() is not None


@contextlib.contextmanager
def window(alone: bool = False) -> Iterator[Capture | None]:
    """What native code prints inside the ``with`` block, kept off the terminal and
    returned (``None`` where it cannot be captured).  ``alone=True`` waits until no
    other window is open and keeps others out, so all of it is this block's."""
    ch = _channel()
    if ch is None:
        yield None
        return
    with ch.window(alone) as cap:
        yield cap
