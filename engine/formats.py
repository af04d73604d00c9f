"""Image formats as a table: signature, extensions and header reader, each once.

:func:`sniff` reads a file's format and size from its first bytes, in pure Python, so
decompression bombs are refused before any decoder allocates (the guard in
:func:`convlens.engine.images.decode_image`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass


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


def _png(d: bytes) -> Header:
    if len(d) >= 24 and d[12:16] == b"IHDR":
        w, h = struct.unpack_from(">II", d, 16)
        return Header("PNG", w, h)
    return Header("PNG")


def _gif(d: bytes) -> Header:
    if len(d) >= 10:
        w, h = struct.unpack_from("<HH", d, 6)
        return Header("GIF", w, h)
    return Header("GIF")


def _bmp(d: bytes) -> Header:
    if len(d) >= 18:
        (dib,) = struct.unpack_from("<I", d, 14)
        if dib == 12 and len(d) >= 22:
            w, h = struct.unpack_from("<HH", d, 18)
            return Header("BMP", w, h)
        if dib >= 40 and len(d) >= 26:
            w, h = struct.unpack_from("<ii", d, 18)
            return Header("BMP", abs(w), abs(h))
    return Header("BMP")


def _webp(d: bytes) -> Header:
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


def _pnm(d: bytes) -> Header:
    wh = _pnm_tokens(d, 2)
    return Header("PNM", *wh) if len(wh) == 2 else Header("PNM")


def _sun(d: bytes) -> Header:
    if len(d) >= 12:
        w, h = struct.unpack_from(">II", d, 4)
        return Header("Sun raster", w, h)
    return Header("Sun raster")


def _j2k(d: bytes) -> Header:
    if len(d) >= 24:
        xs, ys, xo, yo = struct.unpack_from(">IIII", d, 8)
        return Header("JPEG 2000", xs - xo, ys - yo)
    return Header("JPEG 2000")


@dataclass(frozen=True)
class Format:
    """One image format: its name, the file extensions discovery picks up, its
    signature (written once, here) and the reader of its header's size."""

    name: str
    extensions: tuple[str, ...]
    signature: Callable[[bytes], bool]
    header: Callable[[bytes], Header]


#: Everything the installed OpenCV decodes, in the order signatures are tried.
FORMATS: tuple[Format, ...] = (
    Format("PNG", (".png",), lambda d: d[:8] == b"\x89PNG\r\n\x1a\n", _png),
    Format(
        "JPEG", (".jpg", ".jpeg", ".jpe", ".jfif"), lambda d: d[:3] == b"\xff\xd8\xff", _sniff_jpeg
    ),
    Format("GIF", (".gif",), lambda d: d[:6] in (b"GIF87a", b"GIF89a"), _gif),
    Format("BMP", (".bmp", ".dib"), lambda d: d[:2] == b"BM", _bmp),
    Format("WebP", (".webp",), lambda d: d[:4] == b"RIFF" and d[8:12] == b"WEBP", _webp),
    Format(
        "TIFF",
        (".tif", ".tiff"),
        lambda d: d[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"),
        _sniff_tiff,
    ),
    Format(
        "PNM",
        (".ppm", ".pgm", ".pbm", ".pnm", ".pfm", ".pxm"),
        lambda d: d[:1] == b"P" and d[1:2] in b"123456Ff" and len(d) > 2 and chr(d[2]).isspace(),
        _pnm,
    ),
    Format("PAM", (".pam",), lambda d: d[:3] == b"P7\n", _sniff_pam),
    Format("Sun raster", (".sr", ".ras"), lambda d: d[:4] == b"\x59\xa6\x6a\x95", _sun),
    Format(
        "HDR", (".hdr", ".pic"), lambda d: d[:10] == b"#?RADIANCE" or d[:6] == b"#?RGBE", _sniff_hdr
    ),
    Format(
        "JPEG 2000",
        (".jp2",),
        lambda d: d[:12] == b"\x00\x00\x00\x0cjP  \r\n\x87\n",
        _sniff_jp2,
    ),
    Format("JPEG 2000", (".j2k",), lambda d: d[:4] == b"\xff\x4f\xff\x51", _j2k),
    Format(
        "AVIF",
        (".avif",),
        lambda d: d[4:8] == b"ftyp" and (b"avif" in d[8:64] or b"avis" in d[8:64]),
        _sniff_avif,
    ),
)

#: File extensions (lower case, with the dot) that discovery picks up when walking a
#: directory.  ``.exr`` is absent: the ``opencv-python-headless`` 5.0 wheels are built
#: without OpenEXR.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(e for f in FORMATS for e in f.extensions)


def sniff(d: bytes) -> Header | None:
    """Recognise an image format from its first bytes and read its size.

    Formats and where the size is: PNG (IHDR), JPEG (first SOFn marker, walking the
    segments), GIF (logical screen), BMP (DIB header; negative height = top-down), WebP
    (``VP8 ``/``VP8L``/``VP8X`` chunk), TIFF/BigTIFF (first IFD, tags 256/257), PNM/PFM/PAM
    (text header), Sun raster, Radiance HDR (resolution line), JPEG 2000 (``ihdr`` box or
    codestream SIZ marker), AVIF (``ispe`` property).  Returns ``None`` for anything else;
    a recognised format whose header is malformed gives its name without a size.  Never
    raises on malformed input.
    """
    for fmt in FORMATS:
        if fmt.signature(d):
            try:
                return fmt.header(d)
            except (struct.error, ValueError, IndexError, OverflowError):
                return Header(fmt.name)
    return None
