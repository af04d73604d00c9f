"""Image formats as a table: signature, extensions and header reader, each once.

:func:`sniff` reads a file's format and the size its decoder will allocate from its
headers (read to their end), in pure Python, so decompression bombs are refused before
any decoder allocates (the guard in :func:`convlens.engine.images.decode_image`).  No
installed library reads every variant here (Pillow, a test dependency only, has no
36-byte or 16-byte DIB, no HDR, and takes AVIF's size from ``ispe``), hence these.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass

from .isobmff import avif_size, j2k_siz, jp2_size

#: Pillow's default decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS`` =
#: ``int(1024 * 1024 * 1024 // 4 // 3)`` = 178,956,970 pixels, about 179 Mpx, i.e. a
#: 0.5 GiB RGB buffer).  Images with more pixels are refused before decoding.
DEFAULT_MAX_PIXELS = 178_956_970


@dataclass(frozen=True)
class Header:
    """What :func:`sniff` learnt from a file's first bytes.

    ``width``/``height`` are ``None`` when the format was recognised but its size could
    not be read (e.g. a cut-off header).  ``jpeg_scan`` is the offset of the first
    start-of-scan marker of a JPEG (``None`` if there is none before the data ends).
    ``stated`` is the container's own ``(width, height)`` where it disagrees with the
    size of the data inside (a lie: the file is corrupt); ``width``/``height`` are then
    the data's, the size its decoder allocates.  ``sample_bytes`` is the size of one
    decoded sample where the header says it is more than a byte (16-bit PNG, TIFF,
    PNM/PAM: 2; Radiance HDR and PFM, decoded to float32: 4): decoding costs that many
    times the memory of an 8-bit image of the same size.  ``jpeg_stray``: the
    ``(start, end)`` spans of stray bytes between a JPEG's segments before its first
    scan (libjpeg skips them with a warning).
    """

    format: str
    width: int | None = None
    height: int | None = None
    jpeg_scan: int | None = None
    stated: tuple[int, int] | None = None
    sample_bytes: int = 1
    jpeg_stray: tuple[tuple[int, int], ...] = ()


_JPEG_SOF = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)


def _sniff_jpeg(d: bytes) -> Header:
    n = len(d)
    i = 2
    w: int | None = None
    h: int | None = None
    stray: list[tuple[int, int]] = []
    while i + 4 <= n:
        if d[i] != 0xFF:
            # stray bytes between segments: libjpeg skips them (with a warning), so resync
            # on the next marker rather than calling the file corrupt
            nxt = d.find(b"\xff", i)
            if nxt < 0:
                break
            stray.append((i, nxt))
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
            return Header("JPEG", w, h, jpeg_scan=i, jpeg_stray=tuple(stray))
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
            fmt = {3: "H", 4: "I", 16: "Q"}.get(typ)
            if tag in (256, 257) and fmt is not None:
                (dims[tag],) = struct.unpack_from(e + fmt, d, p + val_off)
            elif tag == 258 and typ == 3:  # BitsPerSample: inline, or at an offset
                n = struct.unpack_from(e + ("I" if entry == 12 else "Q"), d, p + 4)[0]
                at = p + val_off
                if n * 2 > entry - val_off:
                    (at,) = struct.unpack_from(e + ("I" if entry == 12 else "Q"), d, at)
                (dims[258],) = struct.unpack_from(e + "H", d, at)
            # tags should be sorted, but libtiff reads unsorted IFDs: scan them all
        depth = min(max(dims.get(258, 8) // 8, 1), 8)
        return Header("TIFF", dims.get(256), dims.get(257), sample_bytes=depth)
    except struct.error:
        return Header("TIFF")


#: whitespace and ``#`` comments, matched at C speed (a header may hold a gigabyte of
#: comments; nothing follows the star, so the match never backtracks)
_PNM_SKIP = re.compile(rb"(?:\s|#[^\n\r]*)*")
_PNM_TOKEN = re.compile(rb"\S+")
_PAM_FIELD = re.compile(rb"^(WIDTH|HEIGHT|MAXVAL)[ \t]+(\d+)[ \t\r]*$", re.MULTILINE)


def _pnm_tokens(d: bytes, count: int) -> list[int]:
    """The first ``count`` integers after the 2-byte magic of a PNM/PFM header, however
    many comments come before them."""
    out: list[int] = []
    i = 2
    while len(out) < count:
        skip = _PNM_SKIP.match(d, i)
        i = skip.end() if skip else i
        token = _PNM_TOKEN.match(d, i)
        if token is None or not token.group().isdigit():
            break
        out.append(int(token.group()))
        i = token.end()
    return out


def _sniff_pam(d: bytes) -> Header:
    end = d.find(b"ENDHDR")  # the header ends there, however long its comments
    fields = {k: int(v) for k, v in _PAM_FIELD.findall(d, 0, end if end >= 0 else len(d))}
    depth = 2 if fields.get(b"MAXVAL", 255) > 255 else 1
    return Header("PAM", fields.get(b"WIDTH"), fields.get(b"HEIGHT"), sample_bytes=depth)


_HDR_SIZE = re.compile(rb"\s*-Y\s*([+-]?\d+)\s*\+X\s*([+-]?\d+)")


def _sniff_hdr(d: bytes) -> Header:
    """OpenCV's reader (``RGBE_ReadHeader``) takes header lines up to the first blank
    one, however many, then ``-Y <height> +X <width>``: the header is scanned to its end."""
    end = d.find(b"\n\n")
    m = _HDR_SIZE.match(d, end + 2, end + 2 + 128) if end >= 0 else None
    if m is None:
        return Header("HDR")
    return Header("HDR", abs(int(m.group(2))), abs(int(m.group(1))), sample_bytes=4)


def _checked(fmt: str, stated: tuple[int, int] | None, data: tuple[int, int]) -> Header:
    """The data's size; the container's too when it claims a smaller image."""
    lie = stated is not None and stated[0] * stated[1] < data[0] * data[1]
    return Header(fmt, *data, stated=stated if lie else None)


def _sniff_jp2(d: bytes) -> Header:
    """The codestream's SIZ size is what OpenJPEG allocates (``ihdr`` if none)."""
    ihdr, siz = jp2_size(d)
    if siz is None:
        return Header("JPEG 2000", *(ihdr or (None, None)))
    return _checked("JPEG 2000", ihdr, siz)


def _sniff_avif(d: bytes) -> Header:
    """The AV1 sequence header's frame size is what dav1d allocates; ``ispe`` counts
    where it is larger (libavif's output; a grid of tiles).  No size when no sequence
    header was found: the size the decoder would use is unknown."""
    ispe, seq, deep = avif_size(d)
    if seq is None:
        return Header("AVIF")
    if ispe is not None and ispe[0] * ispe[1] >= seq[0] * seq[1]:
        return Header("AVIF", *ispe, sample_bytes=2 if deep else 1)
    return _checked("AVIF", ispe, seq)


def _png(d: bytes) -> Header:
    if len(d) >= 25 and d[12:16] == b"IHDR":
        w, h = struct.unpack_from(">II", d, 16)
        return Header("PNG", w, h, sample_bytes=2 if d[24] == 16 else 1)
    return Header("PNG")


def _gif(d: bytes) -> Header:
    if len(d) >= 10:
        w, h = struct.unpack_from("<HH", d, 6)
        return Header("GIF", w, h)
    return Header("GIF")


def _bmp(d: bytes) -> Header:
    """Every DIB header variant: the 12-byte OS/2 1.x core header stores 16-bit sizes;
    all others (16 and 64-byte OS/2 2.x, 36-byte, 40/52/56/108/124-byte Windows, and any
    other length OpenCV accepts) store signed 32-bit ones (negative height: top-down)."""
    if len(d) >= 18:
        (dib,) = struct.unpack_from("<I", d, 14)
        if dib == 12 and len(d) >= 22:
            w, h = struct.unpack_from("<HH", d, 18)
            return Header("BMP", w, h)
        if dib >= 16 and len(d) >= 26:
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
    if d[1:2] in b"Ff":  # PFM: float32 samples
        wh = _pnm_tokens(d, 2)
        return Header("PNM", wh[0], wh[1], sample_bytes=4) if len(wh) == 2 else Header("PNM")
    whm = _pnm_tokens(d, 2 if d[1:2] in b"14" else 3)  # bitmaps have no maxval
    if len(whm) < 2:
        return Header("PNM")
    return Header("PNM", whm[0], whm[1], sample_bytes=2 if whm[2:] and whm[2] > 255 else 1)


def _sun(d: bytes) -> Header:
    if len(d) >= 12:
        w, h = struct.unpack_from(">II", d, 4)
        return Header("Sun raster", w, h)
    return Header("Sun raster")


def _j2k(d: bytes) -> Header:
    return Header("JPEG 2000", *(j2k_siz(d) or (None, None)))


@dataclass(frozen=True)
class Format:
    """One image format: its name, the file extensions discovery picks up, its
    signature (written once, here) and the reader of its header's size.

    ``decode_cost``: the peak memory of decoding it, in multiples of what an 8-bit RGB
    image of the same size and sample depth costs (measured on files at the pixel
    limit: OpenJPEG holds every sample as int32, libavif a YUV and an RGB copy, both
    about 2.6 times the 1.07 GB of a BMP or JPEG of 179 Mpx).
    """

    name: str
    extensions: tuple[str, ...]
    signature: Callable[[bytes], bool]
    header: Callable[[bytes], Header]
    decode_cost: int = 1


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
        decode_cost=3,
    ),
    Format("JPEG 2000", (".j2k",), lambda d: d[:4] == b"\xff\x4f\xff\x51", _j2k, 3),
    Format(
        "AVIF",
        (".avif",),
        lambda d: d[4:8] == b"ftyp" and (b"avif" in d[8:64] or b"avis" in d[8:64]),
        _sniff_avif,
        decode_cost=3,
    ),
)

_COST = {f.name: f.decode_cost for f in FORMATS}


def jpeg_reduction(width: int, height: int, min_short: int, min_long: int = 0) -> int:
    """The largest of 8, 4, 2 by which libjpeg may scale a ``width`` x ``height`` JPEG
    down while decoding (each side becomes ``ceil(side / r)``): the shorter side at
    least ``r * min_short``, the longer one at least ``r * min_long``; 1 when the photo
    is less than twice that.  The shorter side against the model input's longer one: the scaled
    photo is then at least the input size whichever way the EXIF orientation turns it,
    and the resize to the input is still a shrink."""
    for r in (8, 4, 2):
        short, long = sorted((width // r, height // r))
        if short >= min_short and long >= min_long:
            return r
    return 1


def decode_cost(header: Header) -> int:
    """The memory of decoding ``header``'s image in multiples of an 8-bit RGB image of
    its size: the format's decoder cost times its sample size in bytes."""
    return _COST.get(header.format, 1) * header.sample_bytes


#: File extensions (lower case, with the dot) that discovery picks up when walking a
#: directory.  ``.exr`` is absent: the ``opencv-python-headless`` 5.0 wheels are built
#: without OpenEXR.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(e for f in FORMATS for e in f.extensions)


def sniff(d: bytes) -> Header | None:
    """Recognise an image format from its first bytes and read its size.

    Formats and where the size is: PNG (IHDR), JPEG (first SOFn marker, walking the
    segments), GIF (logical screen), BMP (DIB header; negative height = top-down), WebP
    (``VP8 ``/``VP8L``/``VP8X`` chunk), TIFF/BigTIFF (first IFD, tags 256/257), PNM/PFM/PAM
    (text header, read to its end), Sun raster, Radiance HDR (resolution line after the
    header, however long), JPEG 2000 (codestream SIZ marker; ``ihdr`` box too), AVIF
    (AV1 sequence header; ``ispe`` too).  Returns ``None`` for anything else;
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
