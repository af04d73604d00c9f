"""Finding, decoding and preprocessing input images.

Three steps, each usable on its own:

``discover(inputs)``
    Turns command-line inputs (files, directories, globs) into a stable, deduplicated list
    of absolute paths plus one-line problems for inputs that yield nothing.

``read_image(path)``
    Reads the file's bytes once, checks them (empty file, decompression-bomb guard from a
    small pure-Python header reader of the size each decoder really allocates), decodes
    with ``cv2.imdecode`` (:mod:`convlens.engine.codec`: OpenCV's own pixel cap, what the
    codec libraries print kept off the terminal, libjpeg's damage warnings) and returns the original image as RGB ``uint8`` ``(H, W, 3)`` at its
    own size with the EXIF orientation applied.  Failures raise :class:`ImageError` whose
    ``str`` is a one-line reason suitable for ``results.jsonl``.

``preprocess(rgb, inp, pre)``
    Resizes (stretching, like Keras' ``load_img(target_size=...)``), converts colour and
    applies ``y = ((x * scale + offset) - mean) / std`` to give the model's float32 input.

OpenCV 5.0 behaviour this module relies on (checked by ``tests/test_images.py``):

* ``IMREAD_COLOR_RGB | IMREAD_ANYDEPTH`` returns 3-channel RGB directly (except for
  16-bit RGB TIFF, where it returns stale memory: deeper-than-8-bit colour TIFFs are
  decoded again through the BGR path) (grayscale is
  replicated, alpha is dropped, palettes are expanded), keeps 16-bit and float depth and
  applies the EXIF orientation for JPEG, PNG (``eXIf``), WebP and TIFF exactly like
  ``PIL.ImageOps.exif_transpose``.  ``IMREAD_UNCHANGED`` would *not* apply the orientation.
* Truncated JPEG, PNG, WebP, TIFF, BMP and GIF data make ``imdecode`` return ``None``
  (OpenCV 4.x decoded truncated JPEGs partially).  A JPEG cut mid-scan and followed by
  an end-of-image marker (or with garbage in its scan) decodes "successfully" with the
  rest grey: only libjpeg's warning on C's ``stderr`` tells, and it is what counts
  (``truncated or corrupt image data (JPEG decoder: ...)``).  A PNG without ``IEND``
  is refused before decoding, which also spares libpng's message.
* ``OPENCV_IO_MAX_IMAGE_PIXELS``, read when cv2 loads, caps every decode at the
  header-stated size (``convlens.engine`` sets it to :data:`DEFAULT_MAX_PIXELS` before
  any of its modules imports cv2): the guard for formats and header variants the
  sniffer does not read.
* OpenEXR is not compiled into the ``opencv-python-headless`` 5.0 wheels, so ``.exr`` is
  not in :data:`IMAGE_EXTENSIONS`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import cv2
import numpy as np

from .codec import (
    BUDGET,
    DECODE_CAP_PIXELS,
    ImageError,
    captures_native,
    decode_guarded,
    without_stray_bytes,
)
from .contract import InputSpec, Preprocess
from .discovery import Discovery, discover, file_kind, is_image_name
from .formats import (
    DEFAULT_MAX_PIXELS,
    FORMATS,
    IMAGE_EXTENSIONS,
    Header,
    decode_cost,
    jpeg_reduction,
    sniff,
)

# discovery and formats live in their own modules; their names are re-exported here
__all__ = [
    "DEFAULT_MAX_PIXELS",
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "Discovery",
    "Header",
    "ImageError",
    "Preprocessor",
    "decode_image",
    "discover",
    "is_image_name",
    "preprocess",
    "preprocess_into",
    "jpeg_reduction",
    "read_image",
    "read_image_shrunk",
    "sniff",
]


def _too_large(w: int, h: int, max_pixels: int, header: Header | None = None) -> ImageError:
    cost = decode_cost(header) if header is not None else 1
    if cost > 1 and header is not None:
        what = header.format
        if header.sample_bytes > 1:
            what = f"{8 * header.sample_bytes}-bit {what}"
        return ImageError(
            f"image too large: {w}x{h} = {w * h / 1e6:.1f} Mpx; decoding this {what} takes "
            f"the memory of {w * h * cost / 1e6:.1f} Mpx at 8 bits, over the limit of "
            f"{max_pixels / 1e6:.1f} Mpx (--max-pixels)"
        )
    return ImageError(
        f"image too large: {w}x{h} = {w * h / 1e6:.1f} Mpx exceeds the limit of "
        f"{max_pixels / 1e6:.1f} Mpx (--max-pixels)"
    )


#: the largest file read: an uncompressed image of the pixel limit at 16-bit RGBA, plus
#: room for metadata.  A larger file (a sparse 3 GB ".jpg") is refused before reading.
SLACK_BYTES = 64 << 20


def max_file_bytes(max_pixels: int) -> int | None:
    return None if max_pixels <= 0 else max_pixels * 8 + SLACK_BYTES


def _read_bytes(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """The file's bytes, once it is known to be a regular file of a size an allowed
    image can have.  Opened non-blocking, so a FIFO cannot hang the run; a FIFO, a
    device (``/dev/zero``) or a socket is refused before anything is read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with open(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ImageError(f"not a regular file ({file_kind(st.st_mode)})")
            limit = max_file_bytes(max_pixels)
            if limit is not None and st.st_size > limit:
                raise ImageError(
                    f"file too large ({st.st_size / 2**20:.0f} MB; an image within the "
                    f"pixel limit is at most {limit / 2**20:.0f} MB)"
                )
            return f.read()
    except FileNotFoundError:
        raise ImageError("no such file") from None
    except IsADirectoryError:
        raise ImageError("is a directory, not a file") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc.strerror or exc}") from None


def _to_uint8(img: np.ndarray) -> np.ndarray:
    """8-bit conversion: ``uint16 -> round(x / 257)``; float -> ``round(clip(x, 0, 1) * 255)``."""
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        # x / 257 is never exactly k + 0.5 for integer x, so the rounding is unambiguous
        return cv2.convertScaleAbs(img, alpha=1.0 / 257.0)
    if img.dtype in (np.float32, np.float64):
        # in place: a decoded float image is ours, and a second float copy of a 179 Mpx
        # HDR would be 2 GB more
        f = img.astype(np.float32, copy=False)
        np.nan_to_num(f, copy=False, nan=0.0, posinf=1.0, neginf=0.0)
        return cv2.convertScaleAbs(np.clip(f, 0.0, 1.0, out=f), alpha=255.0)
    raise ImageError(f"unsupported pixel type ({img.dtype})")


def _check_header(data: bytes, header: Header | None, max_pixels: int) -> int:
    """Refuse what the header alone condemns; the pixels the decode will hold."""
    if header is None:
        return DECODE_CAP_PIXELS
    w, h, cost = header.width, header.height, decode_cost(header)
    if w is not None and h is not None and max_pixels > 0 and w * h * cost > max_pixels:
        raise _too_large(w, h, max_pixels, header)
    if header.stated is not None:
        (sw, sh), fmt = header.stated, header.format
        raise ImageError(
            f"truncated or corrupt image data ({fmt} states {sw}x{sh} but holds {w}x{h})"
        )
    if header.format in ("TIFF", "AVIF") and (w is None or h is None):
        what = "no image width/length in its first directory"
        if header.format == "AVIF":
            what = "no AV1 sequence header, so the size its decoder would use is unknown"
        raise ImageError(f"not a readable {header.format} ({what})")
    if (
        header.format == "JPEG"
        and not captures_native()
        and (header.jpeg_scan is None or data.find(b"\xff\xd9", header.jpeg_scan) < 0)
    ):  # without the decoder's own signal: no end-of-image marker after the first scan
        raise ImageError("truncated or corrupt image data (JPEG ends before its end marker)")
    if header.format == "PNG" and data.rfind(b"IEND") < 0:
        raise ImageError("truncated or corrupt image data (PNG has no IEND chunk)")
    return w * h * cost if w is not None and h is not None else DECODE_CAP_PIXELS


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, shrink: tuple[int, int] | None = None
) -> np.ndarray:
    """Decode an encoded image held in memory; see :func:`read_image`.

    ``shrink=(min_short, min_long)``: a JPEG at least twice that is decoded scaled down
    in the DCT domain by :func:`jpeg_reduction`'s factor (libjpeg-turbo's
    ``IMREAD_REDUCED_*``: less to decode, and less to resize afterwards); other formats
    and smaller JPEGs are decoded at full size."""
    return _decode(data, max_pixels, shrink)[0]


def _decode(
    data: bytes, max_pixels: int, shrink: tuple[int, int] | None
) -> tuple[np.ndarray, int, Header | None]:
    """The image, the factor it was decoded down by, and the header."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    header = sniff(data)
    pixels = _check_header(data, header, max_pixels)
    buf = np.frombuffer(without_stray_bytes(data, header), np.uint8)
    reduce = 1
    w, h = (header.width, header.height) if header is not None else (None, None)
    if shrink is not None and header is not None and header.format == "JPEG" and w and h:
        reduce = jpeg_reduction(w, h, *shrink)
    with BUDGET.hold(pixels):  # up to the 8-bit RGB result: the conversions count too
        img = decode_guarded(buf, header, reduce)
        if img is None:
            if header is None:
                raise ImageError("not an image (unrecognised format)")
            raise ImageError(f"truncated or corrupt image data ({header.format})")
        h, w = img.shape[:2]
        if max_pixels > 0 and h * w > max_pixels:  # formats whose header we cannot read
            raise _too_large(w, h, max_pixels)
        if img.ndim == 2 or img.shape[2] == 1:
            img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
        elif img.shape[2] == 4:
            img = img[:, :, :3]
        return np.ascontiguousarray(_to_uint8(img)), reduce, header


def read_image(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as RGB ``uint8`` ``(H, W, 3)`` at its own size, EXIF-oriented.

    Steps:

    1. read the bytes once, and only from a regular file no larger than an image within
       the pixel limit can be (``not a regular file (a FIFO)``, ``file too large``,
       ``permission denied``, ``is a directory``, ``no such file``);
    2. ``empty file (0 bytes)``;
    3. decompression-bomb guard *before decoding*: :func:`sniff` reads width and height
       from the header and ``width * height > max_pixels`` raises ``image too large``
       (``max_pixels <= 0`` disables the guard).  Default :data:`DEFAULT_MAX_PIXELS`,
       Pillow's limit.  The size is the one the decoder allocates: every BMP DIB header
       variant, HDR/PNM/PAM headers scanned to their end however long, an AVIF's AV1
       sequence header (not only its ``ispe``), a JP2's codestream SIZ (not only its
       ``ihdr``); a container that understates its data is ``truncated or corrupt``, a
       TIFF or AVIF whose size cannot be read is ``not a readable ...``.  Beyond this,
       OpenCV refuses any header-stated size over ``OPENCV_IO_MAX_IMAGE_PIXELS``
       (``image too large for the decoder``), and decoding threads together hold at
       most that many pixels at once;
    4. a PNG without an ``IEND`` chunk is ``truncated or corrupt``;
    5. ``cv2.imdecode(IMREAD_COLOR_RGB | IMREAD_ANYDEPTH)``, which applies the EXIF
       orientation; if it fails: ``not an image (unrecognised format)`` when the header
       was not recognised, else ``truncated or corrupt image data (<format>)``; a JPEG
       on which libjpeg warned of a premature end or corrupt data is ``truncated or
       corrupt image data (JPEG decoder: <its warning>)``;
    6. conversions, as Keras' ``load_img`` / PIL ``convert("RGB")`` would: grayscale is
       replicated to RGB, alpha is dropped (not composited), palettes are expanded;
       16-bit ``x`` becomes ``round(x / 257)``; float images (HDR, PFM, float TIFF) become
       ``round(clip(x, 0, 1) * 255)``.
    """
    return decode_image(_read_bytes(Path(path), max_pixels), max_pixels)


def read_image_shrunk(
    path: str | os.PathLike[str], max_pixels: int, shrink: tuple[int, int] | None
) -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`read_image`, a large JPEG scaled down while decoding (see
    :func:`decode_image`'s ``shrink``), and the (height, width) of the full image,
    EXIF-oriented, as :func:`read_image` would return it."""
    img, r, header = _decode(_read_bytes(Path(path), max_pixels), max_pixels, shrink)
    h, w = img.shape[:2]
    if r == 1 or header is None or header.width is None or header.height is None:
        return img, (h, w)
    fw, fh = header.width, header.height
    if (h, w) != (-(-fh // r), -(-fw // r)):  # turned by the EXIF orientation
        fw, fh = fh, fw
    return img, (fh, fw)


def silence_opencv_logging() -> None:
    """Stop OpenCV's own warnings about bad files on stderr (process-wide setting).

    :func:`read_image` reports every failure through :class:`ImageError`, so the engine
    calls this once to keep a run's stderr to its own lines.  (What codec libraries
    write to C's ``stderr``, libjpeg, libpng, libtiff, dav1d, is captured around each
    decode by :mod:`convlens.engine.nativelog` instead.)
    """
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


# ---------------------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------------------


class Preprocessor:
    """``preprocess`` with its per-channel coefficients computed once.

    ``y = ((x * scale + offset) - mean) / std`` is evaluated as the equivalent
    ``y = x * a + b`` with ``a = scale / std`` and ``b = (offset - mean) / std`` (float32):
    the resized ``uint8`` pixels are copied into the float32 output, then multiplied and
    shifted in place (each step skipped when it is the identity).
    """

    def __init__(self, inp: InputSpec, pre: Preprocess) -> None:
        if inp.color_mode not in ("rgb", "grayscale"):
            raise ValueError(f"unknown color_mode {inp.color_mode!r}")
        self.height = int(inp.height)
        self.width = int(inp.width)
        self.grayscale = inp.color_mode == "grayscale"
        self.channels = 1 if self.grayscale else 3
        if inp.channels != self.channels:
            raise ValueError(
                f"input has {inp.channels} channels but color_mode {inp.color_mode!r} "
                f"gives {self.channels}"
            )
        order = pre.channel_order.upper()
        if order not in ("RGB", "BGR"):
            raise ValueError(f"unknown channel_order {pre.channel_order!r}")
        self.bgr = order == "BGR" and not self.grayscale
        mean = self._per_channel(pre.mean, 0.0, "mean")
        std = self._per_channel(pre.std, 1.0, "std")
        if np.any(std == 0):
            raise ValueError("preprocess std must not be zero")
        self.a = (pre.scale / std).astype(np.float32)
        self.b = ((pre.offset - mean) / std).astype(np.float32)
        self._mul = bool(np.any(self.a != 1))
        self._add = bool(np.any(self.b != 0))
        # coefficients tiled along a row of (W * C) values: the multiply-add then runs over
        # long contiguous rows instead of broadcasting a length-C vector (about 6x faster)
        self._a_row = np.tile(self.a, self.width)
        self._b_row = np.tile(self.b, self.width)

    def _per_channel(self, values: list[float] | None, default: float, what: str) -> np.ndarray:
        if values is None:
            return np.full(self.channels, default, np.float64)
        arr = np.asarray(values, np.float64).reshape(-1)
        if arr.size == 1:
            return np.full(self.channels, arr[0], np.float64)
        if arr.size != self.channels:
            raise ValueError(
                f"preprocess {what} has {arr.size} values for a {self.channels}-channel input"
            )
        return arr

    def resize(self, rgb: np.ndarray) -> np.ndarray:
        """Stretch to ``(height, width)``: ``INTER_AREA`` when no dimension grows,
        ``INTER_LINEAR`` otherwise; unchanged when already the right size."""
        h, w = rgb.shape[:2]
        if (h, w) == (self.height, self.width):
            return rgb
        interp = cv2.INTER_AREA if (h >= self.height and w >= self.width) else cv2.INTER_LINEAR
        return cv2.resize(rgb, (self.width, self.height), interpolation=interp)

    def into(self, rgb: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Write the model input for ``rgb`` into ``out`` (float32 ``(H, W, C)``, e.g. one
        row of a preallocated batch) and return ``out``."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected RGB uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
        expected = (self.height, self.width, self.channels)
        if out.shape != expected or out.dtype != np.float32:
            raise ValueError(f"out must be float32 {expected}, got {out.dtype} {out.shape}")
        x = self.resize(rgb)
        if self.grayscale:
            x = cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)
        elif self.bgr:
            x = cv2.cvtColor(x, cv2.COLOR_RGB2BGR)
        row_len = self.width * self.channels
        rows = out.reshape(self.height, row_len) if out.flags.c_contiguous else None
        if rows is None:  # a strided view: broadcast per channel (slower, same result)
            np.copyto(out, x.reshape(expected))
            if self._mul:
                np.multiply(out, self.a, out=out)
            if self._add:
                np.add(out, self.b, out=out)
            return out
        np.copyto(rows, x.reshape(self.height, row_len))
        if self._mul:
            np.multiply(rows, self._a_row, out=rows)
        if self._add:
            np.add(rows, self._b_row, out=rows)
        return out

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """The model input for ``rgb``: a new float32 ``(H, W, C)`` array."""
        out = np.empty((self.height, self.width, self.channels), np.float32)
        return self.into(rgb, out)


def preprocess(rgb: np.ndarray, inp: InputSpec, pre: Preprocess) -> np.ndarray:
    """The model input for one decoded image: float32 ``(inp.height, inp.width, C)``.

    1. **Resize** to ``(inp.height, inp.width)`` ignoring the aspect ratio (the image is
       stretched, like Keras' ``load_img(target_size=...)``) with ``cv2.INTER_AREA`` when
       no dimension grows and ``cv2.INTER_LINEAR`` otherwise.  Keras' default is PIL
       ``nearest`` interpolation, so pixel values differ slightly from Keras'
       (area averaging is the better-behaved choice for shrinking).
    2. **Colour**: ``color_mode == "grayscale"`` -> ``cv2.COLOR_RGB2GRAY``, the ITU-R 601
       luma ``L = 0.299 R + 0.587 G + 0.114 B`` that PIL's ``convert("L")`` uses, as
       ``(H, W, 1)``; otherwise channels are put in ``pre.channel_order`` (``RGB``/``BGR``).
    3. **Scale**: ``y = ((x * pre.scale + pre.offset) - mean) / std`` per channel, with
       ``mean = 0`` and ``std = 1`` when ``None``.  E.g. ``unit``: ``y = x / 255``;
       ``caffe``: BGR, ``y = x - [103.939, 116.779, 123.68]``.
    """
    return Preprocessor(inp, pre)(rgb)


def preprocess_into(
    rgb: np.ndarray, inp: InputSpec, pre: Preprocess, out: np.ndarray
) -> np.ndarray:
    """:func:`preprocess` writing into ``out`` (a float32 batch row) to avoid a copy.

    For many images build one :class:`Preprocessor` and call its ``into`` instead.
    """
    return Preprocessor(inp, pre).into(rgb, out)
