"""Sizes inside ISO base media files (JPEG 2000's JP2, AVIF): the size each decoder
really allocates, not only the one the container states.

A JP2 file states its size twice: the ``ihdr`` box and the codestream's ``SIZ`` marker,
which is what OpenJPEG allocates.  An AVIF states it in ``ispe`` properties, but libavif
hands the AV1 data to dav1d/aom, which allocate the frame size of the AV1 *sequence
header*; libavif then returns an image of the ``ispe`` size (a 10x10 ``ispe`` over a
16384x16384 sequence decodes the whole frame).  So both are read here and the larger
counts.
"""

from __future__ import annotations

import struct

Size = tuple[int, int]


def iter_boxes(d: bytes, start: int, end: int) -> list[tuple[bytes, int, int]]:
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


def _largest(sizes: list[Size]) -> Size | None:
    return max(sizes, key=lambda s: s[0] * s[1]) if sizes else None


def j2k_siz(d: bytes, at: int = 0) -> Size | None:
    """The image size in a JPEG 2000 codestream's SIZ marker (``FF4F FF51``) at ``at``."""
    if d[at : at + 4] != b"\xff\x4f\xff\x51" or at + 24 > len(d):
        return None
    xs, ys, xo, yo = struct.unpack_from(">IIII", d, at + 8)
    return max(xs - xo, 0), max(ys - yo, 0)


def jp2_size(d: bytes) -> tuple[Size | None, Size | None]:
    """``(ihdr, codestream)``: the ``ihdr`` box's size and the ``jp2c`` codestream's SIZ
    size (``None`` where absent)."""
    ihdr = siz = None
    for typ, p, e in iter_boxes(d, 0, len(d)):
        if typ == b"jp2h":
            for t2, p2, _ in iter_boxes(d, p, e):
                if t2 == b"ihdr" and p2 + 8 <= len(d):
                    h, w = struct.unpack_from(">II", d, p2)
                    ihdr = (w, h)
        elif typ == b"jp2c":
            siz = j2k_siz(d, p)
    return ihdr, siz


class _Bits:
    """An MSB-first bit reader over ``d[pos:end]`` (raises IndexError past the end)."""

    def __init__(self, d: bytes, pos: int, end: int):
        self.d, self.bit, self.end = d, pos * 8, end * 8

    def f(self, n: int) -> int:
        if self.bit + n > self.end:
            raise IndexError("AV1 sequence header cut short")
        v = 0
        for _ in range(n):
            v = (v << 1) | ((self.d[self.bit >> 3] >> (7 - (self.bit & 7))) & 1)
            self.bit += 1
        return v

    def uvlc(self) -> int:
        zeros = 0
        while not self.f(1):
            zeros += 1
            if zeros >= 32:
                return (1 << 32) - 1
        return self.f(zeros) + (1 << zeros) - 1


def _av1_sequence_size(d: bytes, pos: int, end: int) -> Size:
    """``max_frame_width/height`` of an AV1 sequence header OBU payload (AV1 spec 5.5.1)."""
    b = _Bits(d, pos, end)
    b.f(3)  # seq_profile
    b.f(1)  # still_picture
    if b.f(1):  # reduced_still_picture_header
        b.f(5)
    else:
        buffer_delay_bits = 0
        decoder_model = False
        if b.f(1):  # timing_info_present_flag
            b.f(32), b.f(32)
            if b.f(1):  # equal_picture_interval
                b.uvlc()
            decoder_model = bool(b.f(1))
            if decoder_model:
                buffer_delay_bits = b.f(5) + 1
                b.f(32), b.f(5), b.f(5)
        initial_display_delay = b.f(1)
        for _ in range(b.f(5) + 1):  # operating points
            b.f(12)
            if b.f(5) > 7:  # seq_level_idx
                b.f(1)
            if decoder_model and b.f(1):
                b.f(buffer_delay_bits), b.f(buffer_delay_bits), b.f(1)
            if initial_display_delay and b.f(1):
                b.f(4)
    wbits, hbits = b.f(4) + 1, b.f(4) + 1
    return b.f(wbits) + 1, b.f(hbits) + 1


def _leb128(d: bytes, i: int) -> tuple[int, int]:
    value = 0
    for k in range(8):
        byte = d[i + k]
        value |= (byte & 0x7F) << (7 * k)
        if not byte & 0x80:
            return value, i + k + 1
    raise ValueError("leb128 longer than 8 bytes")


def av1_sizes(d: bytes, start: int, end: int, limit: int = 16) -> list[Size]:
    """Frame sizes of the sequence header OBUs among the first ``limit`` OBUs of
    ``d[start:end]`` (an AV1 sample, or an ``av1C`` box's configOBUs)."""
    out: list[Size] = []
    i = start
    try:
        for _ in range(limit):
            if i >= end or d[i] & 0x80:  # the end, or the forbidden bit: not an OBU
                break
            obu_type, has_ext, has_size = (d[i] >> 3) & 0xF, d[i] & 4, d[i] & 2
            i += 2 if has_ext else 1
            size, i = _leb128(d, i) if has_size else (end - i, i)
            if obu_type == 1:
                out.append(_av1_sequence_size(d, i, min(i + size, end)))
            i += size
    except (IndexError, ValueError):  # cut short: what was read so far
        pass
    return out


def _item_extents(d: bytes, meta_start: int, meta_end: int) -> list[tuple[int, int]]:
    """``(offset, end)`` in ``d`` of the first extent of every ``av01`` item."""
    children = iter_boxes(d, meta_start, meta_end)
    av01: set[int] = set()
    idat = 0
    for typ, p, e in children:
        if typ == b"iinf":
            version = d[p]
            skip = 6 if version == 0 else 8
            for t2, p2, _ in iter_boxes(d, p + skip, e)[:65536]:
                if t2 == b"infe" and d[p2] >= 2:
                    wide = d[p2] >= 3
                    item = struct.unpack_from(">I" if wide else ">H", d, p2 + 4)[0]
                    kind_at = p2 + 4 + (4 if wide else 2) + 2
                    if d[kind_at : kind_at + 4] == b"av01":
                        av01.add(item)
        elif typ == b"idat":
            idat = p
    out: list[tuple[int, int]] = []
    for typ, p, e in children:
        if typ == b"iloc":
            out += _iloc(d, p, e, av01, idat)
    return out


def _uint(d: bytes, at: int, n: int) -> int:
    return int.from_bytes(d[at : at + n], "big") if n else 0


def _iloc(d: bytes, p: int, end: int, items: set[int], idat: int) -> list[tuple[int, int]]:
    """First extents of ``items`` in the ``iloc`` box ``d[p:end]``; at most 65536
    entries are read (a hostile count with zero-width fields costs no bytes each)."""
    version = d[p]
    off_size, len_size = d[p + 4] >> 4, d[p + 4] & 0xF
    base_size, index_size = d[p + 5] >> 4, (d[p + 5] & 0xF) if version in (1, 2) else 0
    i = p + 6
    wide = version == 2
    count = _uint(d, i, 4 if wide else 2)
    i += 4 if wide else 2
    out = []
    budget = 65536
    for _ in range(count):
        item = _uint(d, i, 4 if wide else 2)
        i += 4 if wide else 2
        method = 0
        if version in (1, 2):
            method = d[i + 1] & 0xF
            i += 2
        i += 2  # data_reference_index
        base = _uint(d, i, base_size)
        i += base_size
        extents = _uint(d, i, 2)
        i += 2
        budget -= 1 + extents
        if budget < 0 or i > end:
            break
        for k in range(extents):
            i += index_size
            offset, length = _uint(d, i, off_size), _uint(d, i + off_size, len_size)
            i += off_size + len_size
            if k == 0 and item in items and method in (0, 1):
                start = base + offset + (idat if method == 1 else 0)
                out.append((start, min(start + length, len(d)) if length else len(d)))
    return out


def avif_size(d: bytes) -> tuple[Size | None, Size | None, bool]:
    """``(ispe, sequence, deep)``: the largest ``ispe`` property, the largest frame size
    of the AV1 sequence headers found in ``av01`` items and ``av1C`` configOBUs (for an
    image sequence without items: at the start of ``mdat``), ``None`` where none was
    found; and whether an ``av1C`` says more than 8 bits (decoded to 16-bit samples)."""
    deep = False
    ispe: list[Size] = []
    seq: list[Size] = []
    boxes = iter_boxes(d, 0, len(d))
    for typ, p, e in boxes:
        if typ == b"meta":
            for start, end in _item_extents(d, p + 4, e):
                seq += av1_sizes(d, start, end)
    if not seq:  # an image sequence: its first sample opens the media data
        for typ, p, e in boxes:
            if typ == b"mdat":
                seq += av1_sizes(d, p, e)
    for tag, found in ((b"ispe", ispe), (b"av1C", seq)):
        j = d.find(tag, 4)
        for _ in range(4096):  # a real file has a handful; a hostile one, no more read
            if j < 4:
                break
            (box,) = struct.unpack_from(">I", d, j - 4)
            if tag == b"ispe" and box == 20 and j + 16 <= len(d):
                found.append(struct.unpack_from(">II", d, j + 8))
            elif tag == b"av1C" and 12 <= box <= len(d) - j + 4:
                deep = deep or bool(d[j + 6] & 0x40)  # high_bitdepth
                found += av1_sizes(d, j + 8, j - 4 + box)
            j = d.find(tag, j + 4)
    return _largest(ispe), _largest(seq), deep
