"""One guarded ``cv2.imdecode``: OpenCV's own pixel cap reported as such, what codec
libraries print kept off the terminal and read (libjpeg's damage warnings), and a
budget of pixels decoded at once shared by all decoding threads."""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections.abc import Iterator

import cv2
import numpy as np

from . import nativelog
from .formats import Header


class ImageError(Exception):
    """An input that cannot be used; ``str(e)`` is a one-line reason."""


#: ``imdecode`` flags: RGB output (no BGR->RGB pass), 16-bit/float depth kept, EXIF
#: orientation applied by OpenCV.
_DECODE_FLAGS = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_ANYDEPTH
#: JPEG only: libjpeg's DCT-domain downscaling by 2, 4 or 8 (``IMREAD_REDUCED_*``
#: without its BGR bit, so that the output stays RGB)
REDUCE_FLAGS = {1: 0, 2: 16, 4: 32, 8: 64}


def captures_native() -> bool:
    """Whether libjpeg's warnings are seen (C's stderr can be redirected here)."""
    return nativelog.available()


#: libjpeg's warnings that mean the image was filled in, not decoded: the data ended
#: (or hit a marker) before the last block, or the entropy-coded data is garbage.  Its
#: other warnings (extraneous bytes between segments, ...) leave the image intact.
_JPEG_DAMAGE = re.compile(
    r"Premature end of JPEG file|Corrupt JPEG data: (?!\d+ extraneous bytes)[^\n]*"
)


class _PixelBudget:
    """Decodes in flight together hold at most ``limit`` pixels (one alone may hold
    more), so a folder of large images does not multiply the peak by the workers."""

    def __init__(self, limit: int):
        self.limit = limit
        self._held = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        pixels = min(pixels, self.limit)
        with self._cond:
            self._cond.wait_for(lambda: self._held == 0 or self._held + pixels <= self.limit)
            self._held += pixels
        try:
            yield
        finally:
            with self._cond:
                self._held -= pixels
                self._cond.notify_all()


#: OpenCV's own cap (``OPENCV_IO_MAX_IMAGE_PIXELS``, set by ``convlens.engine`` before
#: cv2 loads unless the user set it) is also the budget of pixels decoded at once.
_CAP = os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS", "")
DECODE_CAP_PIXELS = int(_CAP) if _CAP.isdigit() and int(_CAP) > 0 else 2**30
BUDGET = _PixelBudget(DECODE_CAP_PIXELS)


def _imdecode(buf: np.ndarray, header: Header | None, reduce: int = 1) -> np.ndarray | None:
    try:
        img = cv2.imdecode(buf, _DECODE_FLAGS | REDUCE_FLAGS[reduce])
        tiff = header is not None and header.format == "TIFF"
        if tiff and img is not None and img.dtype != np.uint8 and img.ndim == 3:
            # OpenCV 5: IMREAD_COLOR_RGB | IMREAD_ANYDEPTH returns stale memory (another
            # image's pixels) for 16-bit RGB TIFF; the BGR path decodes it correctly
            del img  # one full-depth copy at a time
            img = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
            if img is not None:
                cv2.cvtColor(img, cv2.COLOR_BGR2RGB, dst=img)
    except cv2.error as exc:  # some codecs raise instead of returning None
        if "CV_IO_MAX_IMAGE" in str(exc):
            raise ImageError(
                "image too large for the decoder: its header states more than "
                f"{DECODE_CAP_PIXELS / 1e6:.1f} Mpx (OPENCV_IO_MAX_IMAGE_PIXELS)"
            ) from None
        img = None
    return img


def without_stray_bytes(data: bytes, header: Header | None) -> bytes:
    """A JPEG without the stray bytes between its header segments.  libjpeg prints only
    the first warning of an image (later ones are counted, not printed): the warning
    about those bytes would hide a premature end further on.  The pixels are the same:
    libjpeg skips them anyway."""
    if header is None or not header.jpeg_stray:
        return data
    parts, at = [], 0
    for start, end in header.jpeg_stray:
        parts.append(data[at:start])
        at = end
    parts.append(data[at:])
    return b"".join(parts)


def decode_guarded(buf: np.ndarray, header: Header | None, reduce: int = 1) -> np.ndarray | None:
    """``imdecode`` with what the codec libraries print kept off the terminal; for a
    JPEG, libjpeg's own damage warning makes the image corrupt (decoded again alone
    when another decode printed at the same time, to know whose the warning was).
    libjpeg prints the first warning only: a JPEG is passed here without the stray
    bytes of its header (:func:`without_stray_bytes`), whose warning would come first;
    one whose first warning is another harmless one (an unknown JFIF revision, a bad
    ICC chunk, stray bytes between progressive scans) can still hide damage after it.
    ``reduce`` (2, 4, 8; JPEG only): libjpeg scales the image down by that factor while
    decoding, each side rounded up."""
    with nativelog.window() as cap:
        img = _imdecode(buf, header, reduce)
    if img is None or cap is None or header is None or header.format != "JPEG":
        return img
    damage = _JPEG_DAMAGE.search(cap.text)
    if damage is not None and not cap.alone:
        with nativelog.window(alone=True) as cap:
            img = _imdecode(buf, header, reduce)
        damage = _JPEG_DAMAGE.search(cap.text) if cap is not None else None
    if damage is not None:
        raise ImageError(f"truncated or corrupt image data (JPEG decoder: {damage.group(0)})")
    return img
