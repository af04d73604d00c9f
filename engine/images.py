"""Finding, decoding and preprocessing input images.

Three steps, each usable on its own:

``discover(inputs)``
    Turns command-line inputs (files, directories, globs) into a stable, deduplicated list
    of absolute paths plus one-line problems for inputs that yield nothing.

``read_image(path)``
    Reads the file's bytes once, checks them (empty file, decompression-bomb guard from a
    small pure-Python header reader, truncation of JPEG/PNG), decodes with
    ``cv2.imdecode`` and returns the original image as RGB ``uint8`` ``(H, W, 3)`` at its
    own size with the EXIF orientation applied.  Failures raise :class:`ImageError` whose
    ``str`` is a one-line reason suitable for ``results.jsonl``.

``preprocess(rgb, inp, pre)``
    Resizes (stretching, like Keras' ``load_img(target_size=...)``), converts colour and
    applies ``y = ((x * scale + offset) - mean) / std`` to give the model's float32 input.

OpenCV 5.0 behaviour this module relies on (checked by ``tests/test_images.py``):

* ``IMREAD_COLOR_RGB | IMREAD_ANYDEPTH`` returns 3-channel RGB directly (grayscale is
  replicated, alpha is dropped, palettes are expanded), keeps 16-bit and float depth and
  applies the EXIF orientation for JPEG, PNG (``eXIf``), WebP and TIFF exactly like
  ``PIL.ImageOps.exif_transpose``.  ``IMREAD_UNCHANGED`` would *not* apply the orientation.
* Truncated JPEG, PNG, WebP, TIFF, BMP and GIF data make ``imdecode`` return ``None``
  (OpenCV 4.x decoded truncated JPEGs partially); the JPEG end-of-image and PNG ``IEND``
  checks below make truncation an error whatever the OpenCV version and avoid libpng's
  message on stderr.
* OpenEXR is not compiled into the ``opencv-python-headless`` 5.0 wheels, so ``.exr`` is
  not in :data:`IMAGE_EXTENSIONS`.
"""

from __future__ import annotations

import glob
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .contract import InputSpec, Preprocess

#: Pillow's default decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS`` =
#: ``int(1024 * 1024 * 1024 // 4 // 3)`` = 178,956,970 pixels, about 179 Mpx, i.e. a
#: 0.5 GiB RGB buffer).  Images with more pixels are refused before decoding.
DEFAULT_MAX_PIXELS = 178_956_970

#: File extensions (lower case, with the dot) that discovery picks up when walking a
#: directory: everything the installed OpenCV decodes.  ``.exr`` is absent because the
#: ``opencv-python-headless`` 5.0 wheels are built without OpenEXR.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".bmp",
        ".dib",
        ".tif",
        ".tiff",
        ".webp",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".pam",
        ".pfm",
        ".pxm",
        ".sr",
        ".ras",
        ".hdr",
        ".pic",
        ".jp2",
        ".j2k",
        ".gif",
        ".avif",
    }
)

#: ``imdecode`` flags: RGB output (no BGR->RGB pass), 16-bit/float depth kept, EXIF
#: orientation applied by OpenCV.
_DECODE_FLAGS = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_ANYDEPTH

_GLOB_CHARS = frozenset("*?[")


# ---------------------------------------------------------------------------------------
# discovery
# ---------------------------------------------------------------------------------------


@dataclass
class Discovery:
    """The outcome of :func:`discover`.

    ``files``: absolute paths, deduplicated (the first occurrence wins), in a stable order.  ``problems``: ``(input, reason)`` for inputs that yielded no file.
    """

    files: list[Path] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)


def is_image_name(path: str | os.PathLike[str]) -> bool:
    """Whether the file name has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def _walk(root: str) -> tuple[list[str], int]:
    """Image files under ``root`` (recursive, hidden entries skipped, symlinked
    directories followed once), sorted by relative path; plus the number of non-image
    files seen."""
    found: list[tuple[tuple[str, ...], str]] = []
    others = 0
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # symlink loop or a directory reached twice
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # deterministic
        rel_dir = os.path.relpath(dirpath, root)
        rel_parts: tuple[str, ...] = () if rel_dir == "." else tuple(Path(rel_dir).parts)
        for name in filenames:
            if name.startswith("."):
                continue
            if not is_image_name(name):
                others += 1
                continue
            full = os.path.join(dirpath, name)
            if os.path.isfile(full):
                found.append(((*rel_parts, name), full))
    found.sort(key=lambda item: item[0])
    return [full for _, full in found], others


def discover(inputs: Sequence[str]) -> Discovery:
    """Expand files, directories and glob patterns into image paths.

    For each input, in the order given:

    * an existing **file** is taken whatever its extension (decoding decides later);
    * an existing **directory** is walked recursively; files whose extension is in
      :data:`IMAGE_EXTENSIONS` are taken, sorted by relative path (compared component by
      component); names starting with ``.`` (files and directories) are skipped;
    * otherwise, a string containing ``*``, ``?`` or ``[`` is a **glob**, expanded with
      ``glob.glob(recursive=True)`` (so ``**`` matches any depth) and sorted; matched
      directories are walked as above, matched files are kept when their extension is an
      image extension (a glob is a search, unlike a file named explicitly).

    ``~`` is expanded.  Paths are made absolute (``os.path.abspath``, symlinks not
    resolved); a path met again (same directory given twice, a file and its directory,
    overlapping globs) keeps its first position.  Symlinked directories are followed
    when walking, each real directory once (no loops).

    Problems (one per input that yields nothing): a path that does not exist, a glob that
    matches nothing (or no image files), a directory with no image files in it.
    """
    out = Discovery()
    seen: set[str] = set()

    def add(path: str) -> None:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            out.files.append(Path(key))

    def add_dir(raw: str, path: str) -> None:
        files, others = _walk(path)
        if not files:
            extra = f" ({others} other file{'s' if others != 1 else ''})" if others else ""
            out.problems.append((raw, f"no image files in this directory{extra}"))
        for f in files:
            add(f)

    for raw in inputs:
        path = os.path.expanduser(raw)
        if os.path.isdir(path):
            add_dir(raw, path)
        elif os.path.exists(path):
            add(path)
        elif _GLOB_CHARS & set(path):
            matches = sorted(glob.glob(path, recursive=True))
            if not matches:
                out.problems.append((raw, "no match for this pattern"))
                continue
            n_images = 0
            walked: list[str] = []  # "dir/**" also matches every subdirectory: walk once
            for m in matches:
                if os.path.isdir(m):
                    if any(m.startswith(w) for w in walked):
                        continue
                    walked.append(os.path.join(m, ""))
                    files, _ = _walk(m)
                    n_images += len(files)
                    for f in files:
                        add(f)
                elif is_image_name(m):
                    n_images += 1
                    add(m)
            if n_images == 0:
                out.problems.append(
                    (raw, f"pattern matched {len(matches)} path(s), none of them an image")
                )
        elif os.path.lexists(path):
            out.problems.append((raw, "broken symbolic link"))
        else:
            out.problems.append((raw, "no such file or directory"))
    return out


# ---------------------------------------------------------------------------------------
# header sniffing (decompression-bomb guard)
# ---------------------------------------------------------------------------------------


class ImageError(Exception):
    """An input that cannot be used; ``str(e)`` is a one-line reason."""


@dataclass(frozen=True)
class Header:
    """What :func:`sniff` learnt from a file's first bytes.

    ``width``/``height`` are ``None`` when the format was recognised but its size could
    not be read (e.g. a cut-off header).  ``jpeg_scan`` is the offset of the first
    start-of-scan marker of a JPEG (``None`` if there is none before the data ends).
    """

    format: str
    width: int | None = None
    height: int | None = None
    jpeg_scan: int | None = None


_JPEG_SOF = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)


def _sniff_jpeg(d: bytes) -> Header:
    n = len(d)
    i = 2
    w: int | None = None
    h: int | None = None
    while i + 4 <= n:
        if d[i] != 0xFF:
            # stray bytes between segments: libjpeg skips them (with a warning), so resync
            # on the next marker rather than calling the file corrupt
            nxt = d.find(b"\xff", i)
            if nxt < 0:
                break
            i = nxt
            continue
        marker = d[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # standalone markers
            i += 2
            continue
        if marker == 0xD9:  # EOI before any scan
            break
        if marker == 0xDA:
            return Header("JPEG", w, h, jpeg_scan=i)
        seglen = (d[i + 2] << 8) | d[i + 3]
        if marker in _JPEG_SOF and i + 9 <= n and w is None:
            h = (d[i + 5] << 8) | d[i + 6]
            w = (d[i + 7] << 8) | d[i + 8]
            if h == 0:  # height defined later by a DNL marker
                h = None
        i += 2 + seglen
    return Header("JPEG", w, h)


def _sniff_tiff(d: bytes) -> Header:
    e = "<" if d[:2] == b"II" else ">"
    try:
        if d[2:4] in (b"*\x00", b"\x00*"):  # classic TIFF
            (ifd,) = struct.unpack_from(e + "I", d, 4)
            (count,) = struct.unpack_from(e + "H", d, ifd)
            entry, base, val_off = 12, ifd + 2, 8
        else:  # BigTIFF
            (ifd,) = struct.unpack_from(e + "Q", d, 8)
            (count,) = struct.unpack_from(e + "Q", d, ifd)
            entry, base, val_off = 20, ifd + 8, 12
        dims: dict[int, int] = {}
        for j in range(min(count, 4096)):
            p = base + j * entry
            tag, typ = struct.unpack_from(e + "HH", d, p)
            if tag in (256, 257):
                fmt = {3: "H", 4: "I", 16: "Q"}.get(typ)
                if fmt is not None:
                    (dims[tag],) = struct.unpack_from(e + fmt, d, p + val_off)
            # tags should be sorted, but libtiff reads unsorted IFDs: scan them all
        return Header("TIFF", dims.get(256), dims.get(257))
    except struct.error:
        return Header("TIFF")


def _pnm_tokens(d: bytes, count: int) -> list[int]:
    """The first ``count`` integers after the 2-byte magic of a PNM/PFM header."""
    out: list[int] = []
    i, n = 2, min(len(d), 4096)
    while len(out) < count and i < n:
        c = d[i]
        if c == 0x23:  # comment to end of line
            while i < n and d[i] not in (0x0A, 0x0D):
                i += 1
        elif chr(c).isspace():
            i += 1
        else:
            j = i
            while j < n and not chr(d[j]).isspace():
                j += 1
            token = d[i:j]
            if not token.isdigit():
                break
            out.append(int(token))
            i = j
    return out


def _sniff_pam(d: bytes) -> Header:
    w = h = None
    for line in d[:4096].split(b"\n")[1:]:
        parts = line.split()
        if parts[:1] == [b"ENDHDR"]:
            break
        if len(parts) == 2 and parts[0] == b"WIDTH":
            w = int(parts[1])
        elif len(parts) == 2 and parts[0] == b"HEIGHT":
            h = int(parts[1])
    return Header("PAM", w, h)


def _sniff_hdr(d: bytes) -> Header:
    end = d.find(b"\n\n", 0, 65536)
    if end < 0:
        return Header("HDR")
    line = d[end + 2 : d.find(b"\n", end + 2, end + 128)].split()
    if len(line) != 4:
        return Header("HDR")
    vals = {line[0][1:2]: int(line[1]), line[2][1:2]: int(line[3])}
    return Header("HDR", vals.get(b"X"), vals.get(b"Y"))


def _iter_boxes(d: bytes, start: int, end: int) -> list[tuple[bytes, int, int]]:
    """ISO-BMFF boxes ``(type, payload_start, box_end)`` between ``start`` and ``end``."""
    boxes = []
    i = start
    while i + 8 <= end:
        size, typ = struct.unpack_from(">I4s", d, i)
        head = 8
        if size == 1:
            if i + 16 > end:
                break
            (size,) = struct.unpack_from(">Q", d, i + 8)
            head = 16
        elif size == 0:
            size = end - i
        if size < head:
            break
        boxes.append((typ, i + head, min(i + size, end)))
        i += size
    return boxes


def _sniff_jp2(d: bytes) -> Header:
    for typ, p, e in _iter_boxes(d, 0, len(d)):
        if typ == b"jp2h":
            for t2, p2, _e2 in _iter_boxes(d, p, e):
                if t2 == b"ihdr" and p2 + 8 <= len(d):
                    h, w = struct.unpack_from(">II", d, p2)
                    return Header("JPEG 2000", w, h)
    return Header("JPEG 2000")


def _sniff_avif(d: bytes) -> Header:
    """Largest ``ispe`` (image spatial extent) property inside the ``meta`` box."""
    best: tuple[int, int] | None = None
    for typ, p, e in _iter_boxes(d, 0, len(d)):
        if typ != b"meta":
            continue
        j = d.find(b"ispe", p, e)
        while j >= 4:
            if j + 16 <= e and struct.unpack_from(">I", d, j - 4)[0] == 20:
                w, h = struct.unpack_from(">II", d, j + 8)
                if best is None or w * h > best[0] * best[1]:
                    best = (w, h)
            j = d.find(b"ispe", j + 4, e)
    return Header("AVIF", *(best if best else (None, None)))


def sniff(d: bytes) -> Header | None:
    """Recognise an image format from its first bytes and read its size.

    Formats and where the size is: PNG (IHDR), JPEG (first SOFn marker, walking the
    segments), GIF (logical screen), BMP (DIB header; negative height = top-down), WebP
    (``VP8 ``/``VP8L``/``VP8X`` chunk), TIFF/BigTIFF (first IFD, tags 256/257), PNM/PFM/PAM
    (text header), Sun raster, Radiance HDR (resolution line), JPEG 2000 (``ihdr`` box or
    codestream SIZ marker), AVIF (``ispe`` property).  Returns ``None`` for anything else.
    Never raises on malformed input.
    """
    try:
        return _sniff(d)
    except (struct.error, ValueError, IndexError, OverflowError):
        fmt = _magic(d)  # recognised, but the header is malformed
        return None if fmt is None else Header(fmt)


def _magic(d: bytes) -> str | None:
    """The format name from the signature alone (used when the header is malformed)."""
    if d[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if d[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if d[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if d[:2] == b"BM":
        return "BMP"
    if d[:4] == b"RIFF" and d[8:12] == b"WEBP":
        return "WebP"
    if d[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if d[:1] == b"P" and d[1:2] in b"1234567Ff" and len(d) > 2 and chr(d[2]).isspace():
        return "PNM"
    if d[:4] == b"\x59\xa6\x6a\x95":
        return "Sun raster"
    if d[:10] == b"#?RADIANCE" or d[:6] == b"#?RGBE":
        return "HDR"
    if d[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n" or d[:4] == b"\xff\x4f\xff\x51":
        return "JPEG 2000"
    if d[4:8] == b"ftyp" and (b"avif" in d[8:64] or b"avis" in d[8:64]):
        return "AVIF"
    return None


def _sniff(d: bytes) -> Header | None:
    if d[:8] == b"\x89PNG\r\n\x1a\n":
        if len(d) >= 24 and d[12:16] == b"IHDR":
            w, h = struct.unpack_from(">II", d, 16)
            return Header("PNG", w, h)
        return Header("PNG")
    if d[:3] == b"\xff\xd8\xff":
        return _sniff_jpeg(d)
    if d[:6] in (b"GIF87a", b"GIF89a"):
        if len(d) >= 10:
            w, h = struct.unpack_from("<HH", d, 6)
            return Header("GIF", w, h)
        return Header("GIF")
    if d[:2] == b"BM" and len(d) >= 18:
        (dib,) = struct.unpack_from("<I", d, 14)
        if dib == 12 and len(d) >= 22:
            w, h = struct.unpack_from("<HH", d, 18)
            return Header("BMP", w, h)
        if dib >= 40 and len(d) >= 26:
            w, h = struct.unpack_from("<ii", d, 18)
            return Header("BMP", abs(w), abs(h))
        return Header("BMP")
    if d[:4] == b"RIFF" and d[8:12] == b"WEBP":
        chunk = d[12:16]
        if chunk == b"VP8 " and len(d) >= 30 and d[23:26] == b"\x9d\x01\x2a":
            w, h = struct.unpack_from("<HH", d, 26)
            return Header("WebP", w & 0x3FFF, h & 0x3FFF)
        if chunk == b"VP8L" and len(d) >= 25 and d[20] == 0x2F:
            (bits,) = struct.unpack_from("<I", d, 21)
            return Header("WebP", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
        if chunk == b"VP8X" and len(d) >= 30:
            w = 1 + int.from_bytes(d[24:27], "little")
            h = 1 + int.from_bytes(d[27:30], "little")
            return Header("WebP", w, h)
        return Header("WebP")
    if d[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return _sniff_tiff(d)
    if d[:1] == b"P" and d[1:2] in (b"1", b"2", b"3", b"4", b"5", b"6", b"F", b"f"):
        if len(d) > 2 and chr(d[2]).isspace():
            wh = _pnm_tokens(d, 2)
            return Header("PNM", *wh) if len(wh) == 2 else Header("PNM")
        return None
    if d[:3] == b"P7\n":
        return _sniff_pam(d)
    if d[:4] == b"\x59\xa6\x6a\x95":
        if len(d) >= 12:
            w, h = struct.unpack_from(">II", d, 4)
            return Header("Sun raster", w, h)
        return Header("Sun raster")
    if d[:10] == b"#?RADIANCE" or d[:6] == b"#?RGBE":
        return _sniff_hdr(d)
    if d[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n":
        return _sniff_jp2(d)
    if d[:4] == b"\xff\x4f\xff\x51":
        if len(d) >= 24:
            xs, ys, xo, yo = struct.unpack_from(">IIII", d, 8)
            return Header("JPEG 2000", xs - xo, ys - yo)
        return Header("JPEG 2000")
    if d[4:8] == b"ftyp" and (b"avif" in d[8:64] or b"avis" in d[8:64]):
        return _sniff_avif(d)
    return None


# ---------------------------------------------------------------------------------------
# decoding
# ---------------------------------------------------------------------------------------


def _too_large(w: int, h: int, max_pixels: int) -> ImageError:
    return ImageError(
        f"image too large: {w}x{h} = {w * h / 1e6:.1f} Mpx exceeds the limit of "
        f"{max_pixels / 1e6:.1f} Mpx (--max-pixels)"
    )


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
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
        f = np.nan_to_num(img.astype(np.float32, copy=False), nan=0.0, posinf=1.0, neginf=0.0)
        return cv2.convertScaleAbs(np.clip(f, 0.0, 1.0), alpha=255.0)
    raise ImageError(f"unsupported pixel type ({img.dtype})")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an encoded image held in memory; see :func:`read_image`."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    header = sniff(data)
    if (
        header is not None
        and header.width is not None
        and header.height is not None
        and max_pixels > 0
        and header.width * header.height > max_pixels
    ):
        raise _too_large(header.width, header.height, max_pixels)
    if (
        header is not None
        and header.format == "TIFF"
        and (header.width is None or header.height is None)
    ):
        raise ImageError("not a readable TIFF (no image width/length in its first directory)")
    if header is not None and header.format == "JPEG":
        # entropy-coded data escapes 0xFF as FF00, so FFD9 after the first scan is the EOI
        if header.jpeg_scan is None or data.find(b"\xff\xd9", header.jpeg_scan) < 0:
            raise ImageError("truncated or corrupt image data (JPEG ends before its end marker)")
    elif header is not None and header.format == "PNG" and data.rfind(b"IEND") < 0:
        raise ImageError("truncated or corrupt image data (PNG has no IEND chunk)")

    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), _DECODE_FLAGS)
    except cv2.error:  # some codecs raise instead of returning None
        img = None
    if img is None:
        if header is None:
            raise ImageError("not an image (unrecognised format)")
        raise ImageError(f"truncated or corrupt image data ({header.format})")
    h, w = img.shape[:2]
    if max_pixels > 0 and h * w > max_pixels:  # formats whose header we cannot read
        raise _too_large(w, h, max_pixels)
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    elif img.shape[2] == 4:
        img = img[:, :, :3]
    elif img.shape[2] == 1:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    img = _to_uint8(img)
    return np.ascontiguousarray(img)


def read_image(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as RGB ``uint8`` ``(H, W, 3)`` at its own size, EXIF-oriented.

    Steps:

    1. read the bytes once (``permission denied``, ``is a directory``, ``no such file``);
    2. ``empty file (0 bytes)``;
    3. decompression-bomb guard *before decoding*: :func:`sniff` reads width and height
       from the header and ``width * height > max_pixels`` raises ``image too large``
       (``max_pixels <= 0`` disables the guard).  Default :data:`DEFAULT_MAX_PIXELS`,
       Pillow's limit.  (OpenCV refuses more than 2**30 pixels on its own unless
       ``OPENCV_IO_MAX_IMAGE_PIXELS`` is set.)
    4. truncation: a JPEG without an end-of-image marker (``FFD9``) after its first
       start-of-scan, or a PNG without an ``IEND`` chunk, is ``truncated or corrupt``;
    5. ``cv2.imdecode(IMREAD_COLOR_RGB | IMREAD_ANYDEPTH)``, which applies the EXIF
       orientation; if it fails: ``not an image (unrecognised format)`` when the header
       was not recognised, else ``truncated or corrupt image data (<format>)``;
    6. conversions, as Keras' ``load_img`` / PIL ``convert("RGB")`` would: grayscale is
       replicated to RGB, alpha is dropped (not composited), palettes are expanded;
       16-bit ``x`` becomes ``round(x / 257)``; float images (HDR, PFM, float TIFF) become
       ``round(clip(x, 0, 1) * 255)``.
    """
    return decode_image(_read_bytes(Path(path)), max_pixels)


def silence_opencv_logging() -> None:
    """Stop OpenCV's own warnings about bad files on stderr (process-wide setting).

    :func:`read_image` reports every failure through :class:`ImageError`, so the engine
    may call this once to keep a long run's stderr clean.  (Messages written directly by
    codec libraries, e.g. libpng, are not covered.)
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
