"""Colour maps and images for the report: CAM heatmaps, activation grids, thumbnails,
and their encoding (JPEG, PNG, paletted PNG), written with the project's one atomic
writer.  Pure functions of arrays; the sink and the page builders call them."""

from __future__ import annotations

import functools
import math
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.lib.stride_tricks import as_strided

from convlens.engine.results import atomic_write_bytes as write_atomically

_isal_zlib: Any
try:  # ISA-L's deflate, 3.6x zlib's fastest fit on grids (GRID_PNG_COMPRESSION)
    from isal import isal_zlib as _isal_zlib
except ImportError:  # a platform without isal's wheels: zlib, slower, the same pixels
    _isal_zlib = None


#: colour maps by the name assets.json records (OpenCV ids); the report draws the legend
#: of the map a run's files were made with (older runs: turbo)
COLORMAPS = {
    "inferno": cv2.COLORMAP_INFERNO,
    "magma": cv2.COLORMAP_MAGMA,
    "plasma": cv2.COLORMAP_PLASMA,
    "viridis": cv2.COLORMAP_VIRIDIS,
    "cividis": cv2.COLORMAP_CIVIDIS,
    "turbo": cv2.COLORMAP_TURBO,
    "jet": cv2.COLORMAP_JET,
}
#: CAM heatmaps: inferno, perceptually uniform (lightness rises steadily from black through
#: red to pale yellow, so "more yellow" always reads as "more"; turbo's bright cyan and
#: green middle read as hotter than its dark red top) and told apart from the grids
CAM_COLORMAP_NAME = "inferno"
CAM_COLORMAP = COLORMAPS[CAM_COLORMAP_NAME]
GRID_COLORMAP_NAME = "viridis"
GRID_COLORMAP = COLORMAPS[GRID_COLORMAP_NAME]
OVERLAY_ALPHA = 0.5

#: activation grid layout: ``GRID_COLS`` tiles a row, ``GRID_GAP`` px between tiles.
GRID_COLS = 16
JPEG_QUALITY = 85
GRID_GAP = 1
#: A grid file holds every channel at its own size (large maps reduced, area, to at most
#: ``MAX_TILE``); the page shows small ones larger, as if upscaled (nearest neighbour,
#: integer factor) until their longest side is at least ``MIN_TILE``: :func:`grid_shape`
#: is the size on the page, :func:`grid_file_shape` the file's.  The browser does the
#: upscaling (``image-rendering: pixelated``), so the encoder never sees f*f copies of
#: each pixel (VGG16 at 160 px: 7.4 -> 2.8 MB of grids an image, 2.2x less CPU).
MIN_TILE = 48
MAX_TILE = 128
GRID_GAP_BGR = (255, 255, 255)
#: zlib level 3 without PNG row filters: for grids (flat tiles) this is both the fastest
#: and the smallest of cv2's options (measured: ~3x faster than the default filters).
PNG_COMPRESSION = 3
#: CAM heatmap files: upsampled (integer factor, INTER_LINEAR) until the longest side is at
#: least this, so that the browser's bilinear scaling (of colours) stays close to
#: upsampling the map itself before colouring it.
HEATMAP_MIN_SIDE = 48
#: Grid files: paletted PNG, deflated by ISA-L (the ``isal`` package) at level 1: VGG16 at
#: 160 px, 13 layers an image (6 Mpx), 10.4 ms and 3.28 MB; zlib level 1 with the
#: run-length strategy (Z_RLE, the fallback where isal does not import): 37.8 ms and
#: 3.25 MB; zlib-ng RLE 25.8 ms; libdeflate 1: 33.5 ms; zlib level 1: 71.7 ms
#: (README, Speed).  Stored: 2x the bytes.
GRID_PNG_COMPRESSION = 1
GRID_PNG_STRATEGY = zlib.Z_RLE
#: Paletted PNG, zlib level 0 (stored): 3.1 KB for 48x48, of which 0.8 KB is the palette;
#: level 1 makes it 2.6 KB but costs ~20x the time (~60 us a map against ~3 us, measured).
HEATMAP_PNG_COMPRESSION = 0

# channels per cv2.resize call for linear upsampling (OpenCV 5 refuses 255+)
_LINEAR_CHUNK = 128


# ---- colour ------------------------------------------------------------------------
def colormap_lut(colormap: int) -> np.ndarray:
    """(256, 3) uint8 BGR lookup table of an OpenCV colour map."""
    ramp = np.arange(256, dtype=np.uint8).reshape(256, 1)
    return np.ascontiguousarray(cv2.applyColorMap(ramp, colormap).reshape(256, 3))


_LUTS: dict[int, np.ndarray] = {}


def _lut(colormap: int) -> np.ndarray:
    lut = _LUTS.get(colormap)
    if lut is None:
        lut = _LUTS[colormap] = colormap_lut(colormap)
    return lut


def legend_bar(colormap: int, width: int = 256, height: int = 12) -> np.ndarray:
    """A horizontal BGR gradient bar of ``colormap`` from 0 (left) to 1 (right)."""
    ramp = np.linspace(0, 255, width).round().astype(np.uint8)
    return np.repeat(_lut(colormap)[ramp][None, :, :], height, axis=0)


# ---- images ------------------------------------------------------------------------
def to_bgr(image: np.ndarray) -> np.ndarray:
    """uint8 RGB/gray/RGBA -> contiguous uint8 BGR (H, W, 3)."""
    img = to_uint8(image)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.shape[2] == 1:
        return cv2.cvtColor(img[:, :, 0], cv2.COLOR_GRAY2BGR)
    if img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_RGBA2BGR)
    return cv2.cvtColor(img[:, :, :3], cv2.COLOR_RGB2BGR)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """The array as uint8 (other dtypes are clipped to 0..255)."""
    img = np.asarray(image)
    return img if img.dtype == np.uint8 else np.clip(img, 0, 255).astype(np.uint8)


def thumbnail(image: np.ndarray, size: int) -> np.ndarray:
    """Shrink so the longest side is ``size``; smaller images are kept.  Any channel order.

    Halves (2x2 box filter) while the image is at least twice ``size``, then resizes the
    rest of the way (a factor below 2) with INTER_LINEAR.  Within a grey level or two of
    a direct INTER_AREA resize (PSNR ~46 dB on 640x480 photos) and ~5x faster: OpenCV's
    INTER_AREA has a fast path for integer factors only, and a thumbnail's factor rarely
    is one (640 -> 256 is 2.5).
    """
    h, w = image.shape[:2]
    longest = max(h, w)
    if longest <= size:
        return image
    scale = size / longest
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    img = image
    while max(h, w) >= 2 * size:
        # even sides: INTER_AREA's integer fast path; odd: INTER_LINEAR (a near box)
        even = h % 2 == 0 and w % 2 == 0
        h, w = (h + 1) // 2, (w + 1) // 2
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if even else cv2.INTER_LINEAR)
    if (h, w) == (th, tw):
        return img
    return cv2.resize(img, (tw, th), interpolation=cv2.INTER_LINEAR)


def normalise_map(raw: np.ndarray) -> np.ndarray:
    """Min-max normalise one map to float32 0..1 (a constant map becomes all zeros)."""
    m = np.nan_to_num(np.asarray(raw, dtype=np.float32))
    lo, hi = float(m.min()), float(m.max())
    if not hi > lo:
        return np.zeros_like(m)
    return (m - lo) / (hi - lo)


def to_levels(norm: np.ndarray) -> np.ndarray:
    """0..1 floats -> uint8 colour-map indices (rounded)."""
    return np.clip(norm * 255.0 + 0.5, 0, 255).astype(np.uint8)


def heatmap_scale(h: int, w: int) -> int:
    """The integer factor a CAM heatmap file is upsampled by: its longest side becomes at
    least ``HEATMAP_MIN_SIDE`` (16x16 -> 48x48, 7x7 -> 49x49; 48 and up: as it is)."""
    return max(1, math.ceil(HEATMAP_MIN_SIDE / max(h, w, 1)))


def _upsample(norm: np.ndarray, f: int) -> np.ndarray:
    """(h, w) or (h, w, n) float32 -> f times the size, INTER_LINEAR (half-pixel centres, as
    the browser's bilinear scaling)."""
    if f == 1:
        return norm
    h, w = norm.shape[:2]
    if norm.ndim == 2 or norm.shape[2] <= _LINEAR_CHUNK:
        return cv2.resize(norm, (w * f, h * f), interpolation=cv2.INTER_LINEAR)
    parts = [
        _upsample(np.ascontiguousarray(norm[:, :, s : s + _LINEAR_CHUNK]), f)
        for s in range(0, norm.shape[2], _LINEAR_CHUNK)
    ]
    return np.concatenate([q.reshape(h * f, w * f, -1) for q in parts], axis=2)


def cam_levels(raw_map: np.ndarray) -> np.ndarray:
    """The colour-map indices of a CAM heatmap file: ``raw_map`` normalised to 0..1
    (:func:`normalise_map`), upsampled by :func:`heatmap_scale` (INTER_LINEAR), rounded
    to 0..255.  uint8 ``(h * f, w * f)``."""
    norm = normalise_map(raw_map)
    return to_levels(_upsample(norm, heatmap_scale(*norm.shape[:2])))


def cam_heatmap(raw_map: np.ndarray, colormap: int = CAM_COLORMAP) -> np.ndarray:
    """The pixels of a CAM heatmap file as BGR uint8: :func:`cam_levels` coloured with
    ``colormap``."""
    return _lut(colormap)[cam_levels(raw_map)]


def cam_levels_batch(maps: dict[Any, np.ndarray]) -> dict[Any, np.ndarray]:
    """:func:`cam_levels` of every map; maps of one shape are done at once (one resize of
    an (h, w, n) array: OpenCV may round its last float32 bit differently from n resizes,
    so a level here and there can differ by one)."""
    by_shape: dict[tuple[int, ...], list[Any]] = {}
    for key, raw in maps.items():
        by_shape.setdefault(np.shape(raw), []).append(key)
    out: dict[Any, np.ndarray] = {}
    for shape, keys in by_shape.items():
        if len(shape) != 2 or len(keys) == 1 or 0 in shape:
            for key in keys:
                out[key] = cam_levels(maps[key])
            continue
        # (h, w, n): one resize for all of them
        m = np.stack([np.asarray(maps[k], dtype=np.float32) for k in keys], axis=2)
        if not np.isfinite(m).all():
            m = np.nan_to_num(m)
        lo = m.min(axis=(0, 1))
        hi = m.max(axis=(0, 1))
        flat = ~(hi > lo)
        m -= lo
        m /= np.where(flat, np.float32(1), hi - lo)  # as normalise_map: (m - lo) / (hi - lo)
        m[:, :, flat] = 0.0  # a constant map becomes all zeros
        levels = to_levels(_upsample(m, heatmap_scale(*shape)))
        for i, key in enumerate(keys):
            out[key] = np.ascontiguousarray(levels[:, :, i])
    return {key: out[key] for key in maps}


def tile_size(h: int, w: int) -> tuple[int, int]:
    """Displayed (height, width) of one channel tile in an activation grid: small maps
    as if upscaled by an integer factor to a longest side of at least ``MIN_TILE``."""
    longest = max(h, w, 1)
    if longest < MIN_TILE:
        f = math.ceil(MIN_TILE / longest)
        return h * f, w * f
    return file_tile_size(h, w)


def file_tile_size(h: int, w: int) -> tuple[int, int]:
    """(height, width) of one channel tile in a grid file: the map's own size, large
    ones reduced to a longest side of ``MAX_TILE``; never upscaled."""
    longest = max(h, w, 1)
    if longest > MAX_TILE:
        s = MAX_TILE / longest
        return max(1, round(h * s)), max(1, round(w * s))
    return h, w


def _mosaic_shape(th: int, tw: int, k: int) -> tuple[int, int]:
    cols = min(GRID_COLS, max(k, 1))
    rows = math.ceil(max(k, 1) / cols)
    return rows * (th + GRID_GAP) - GRID_GAP, cols * (tw + GRID_GAP) - GRID_GAP


def grid_shape(h: int, w: int, k: int) -> tuple[int, int]:
    """(height, width) in CSS pixels of the grid of an (h, w, k) activation on the page
    (:func:`tile_size` tiles, 1 px gaps; the browser scales the file up to it)."""
    return _mosaic_shape(*tile_size(h, w), k)


def grid_file_shape(h: int, w: int, k: int) -> tuple[int, int]:
    """(height, width) in pixels of the grid file of an (h, w, k) activation
    (:func:`file_tile_size` tiles)."""
    return _mosaic_shape(*file_tile_size(h, w), k)


def normalise_channels(act: np.ndarray) -> np.ndarray:
    """(h, w, k) float -> (h, w, k) uint8, every channel on its own:
    ``(x - mean) / (std + 1e-5) * 64 + 128`` clipped to 0..255, evaluated as
    ``x * s + o`` with ``s = 64 / (std + 1e-5)`` and ``o = 128 - mean * s`` per channel
    (two passes over the activations instead of five; the same levels within one).
    An activation holding NaN or infinities goes through ``numpy.nan_to_num`` first
    (NaN 0, infinities the largest finite floats), as before."""
    a = np.asarray(act, dtype=np.float32)
    mean = a.mean(axis=(0, 1))
    std = a.std(axis=(0, 1))
    if not (np.isfinite(mean).all() and np.isfinite(std).all()):  # a NaN or inf inside
        a = np.nan_to_num(a)
        mean = a.mean(axis=(0, 1))
        std = a.std(axis=(0, 1))
    scale = (64.0 / (std + 1e-5)).astype(np.float32)
    offset = (128.0 - mean * scale).astype(np.float32)
    x = a * scale
    x += offset
    np.clip(x, 0.0, 255.0, out=x)
    return x.astype(np.uint8)


def _resize_channels(u8: np.ndarray, th: int, tw: int) -> np.ndarray:
    """(h, w, k) uint8 -> (th, tw, k) (a view, any strides), never larger: grid files keep
    maps at their own size or reduce them (:func:`file_tile_size`, :func:`_area_planes`)."""
    h, w, _ = u8.shape
    if th > h or tw > w:
        raise ValueError(f"grid tiles are never enlarged: ({h}, {w}) -> ({th}, {tw})")
    return u8 if (h, w) == (th, tw) else _area_planes(u8, th, tw)


def _area_planes(u8: np.ndarray, th: int, tw: int) -> np.ndarray:
    """Every channel of (h, w, k) uint8 reduced to (th, tw) by area averaging, one axis at
    a time over all channels at once: the channels side by side as one plane, widths
    first (k*h, w) -> (k*h, tw), then heights (h, k*tw) -> (th, k*tw).  OpenCV's area
    filter is separable, so this is its 2-D result but for the rounding of the pass in
    between (within one level; 1.8x faster than 4 channels a call on VGG16's 64 maps of
    160 px, for which OpenCV's area path takes at most 4 channels)."""
    h, w, k = u8.shape
    planes = np.ascontiguousarray(u8.transpose(2, 0, 1)).reshape(k * h, w)
    if tw != w:
        planes = cv2.resize(planes, (tw, k * h), interpolation=cv2.INTER_AREA)
    rows = np.ascontiguousarray(planes.reshape(k, h, tw).transpose(1, 0, 2)).reshape(h, k * tw)
    if th != h:
        rows = cv2.resize(rows, (k * tw, th), interpolation=cv2.INTER_AREA)
    return rows.reshape(th, k, tw).transpose(0, 2, 1)


_GRID_PALETTES: dict[int, tuple[np.ndarray, np.ndarray, int] | None] = {}


def grid_palette(colormap: int) -> tuple[np.ndarray, np.ndarray, int] | None:
    """``(index_of_level, palette_bgr, gap_index)`` when ``colormap`` has two levels of the
    same colour (OpenCV's viridis: 254 colours for 256 levels): the levels' colours and
    white then fit a 256-entry palette, ``palette_bgr[index_of_level[v]] ==
    colormap_lut(colormap)[v]`` for every level ``v``; None when they do not."""
    if colormap in _GRID_PALETTES:
        return _GRID_PALETTES[colormap]
    lut = _lut(colormap)
    index: dict[bytes, int] = {}
    colours: list[np.ndarray] = []
    of_level = np.empty(256, np.uint8)
    for v in range(256):
        i = index.setdefault(lut[v].tobytes(), len(colours))
        if i == len(colours):
            colours.append(lut[v])
        of_level[v] = i
    found = None
    if len(colours) < 256:
        gap = len(colours)
        palette = np.vstack([*colours, np.array(GRID_GAP_BGR, np.uint8)])
        found = (of_level, np.ascontiguousarray(palette, dtype=np.uint8), gap)
    _GRID_PALETTES[colormap] = found
    return found


def _grid_mosaic(levels: np.ndarray, of_level: np.ndarray | None, gap: int) -> np.ndarray:
    """(H, W) uint8 of the grid file of (h, w, k) ``levels`` (:func:`normalise_channels`):
    every tile's levels (through ``of_level`` when given), ``gap`` in the gaps and the
    unused cells of the last row.  A view of :func:`_grid_scanlines`."""
    return _grid_scanlines(levels, of_level, gap)[:, 1:]


def _grid_scanlines(levels: np.ndarray, of_level: np.ndarray | None, gap: int) -> np.ndarray:
    """(H, W + 1) uint8: the PNG scanlines of the grid file, each a filter byte 0 then
    :func:`_grid_mosaic`'s row; the tiles are copied into place once."""
    a = np.asarray(levels)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.dtype != np.uint8:
        raise ValueError(f"levels must be (h, w, k) uint8, got {a.dtype} {a.shape}")
    h, w, k = a.shape
    th, tw = file_tile_size(h, w)
    body = _resize_channels(a, th, tw).transpose(2, 0, 1)  # (k, th, tw), any strides
    if of_level is not None:
        body = of_level[body]
    cols = min(GRID_COLS, k)
    rows = math.ceil(k / cols)
    g = GRID_GAP
    height, width = rows * (th + g) - g, cols * (tw + g) - g
    lines = np.full((height, width + 1), gap, dtype=np.uint8)
    lines[:, 0] = 0  # filter type "none" for every scanline
    step = lines.strides[0]
    full, rest = divmod(k, cols)
    if full:  # the full rows of tiles: (row, y, column, x) over the scanlines
        cells = as_strided(
            lines[:, 1:], (full, th, cols, tw), (step * (th + g), step, tw + g, 1), writeable=True
        )
        cells[...] = body[: full * cols].reshape(full, cols, th, tw).transpose(0, 2, 1, 3)
    if rest:
        cells = as_strided(
            lines[full * (th + g) :, 1:], (th, rest, tw), (step, tw + g, 1), writeable=True
        )
        cells[...] = body[full * cols :].transpose(1, 0, 2)
    return lines


def activation_grid(act: np.ndarray, colormap: int = GRID_COLORMAP) -> np.ndarray:
    """Tile every channel of an (h, w, k) activation into one BGR image: the pixels of
    its grid file (:func:`encode_grid`).

    Channels go ``GRID_COLS`` to a row in channel order (row-major), separated by
    ``GRID_GAP`` px white gaps; unused cells of the last row stay white.  Each channel is
    normalised on its own (:func:`normalise_channels`), kept at its own size or reduced
    to :func:`file_tile_size`, and coloured with ``colormap``.  See
    :func:`grid_file_shape` for the image size (:func:`grid_shape`: on the page).
    """
    return grid_pixels(normalise_channels(act), colormap)


def grid_pixels(levels: np.ndarray, colormap: int = GRID_COLORMAP) -> np.ndarray:
    """The BGR pixels of the grid of (h, w, k) ``levels`` (:func:`activation_grid`)."""
    pal = grid_palette(colormap)
    if pal is not None:
        of_level, palette, gap = pal
        return palette[_grid_mosaic(levels, of_level, gap)]
    # every level its own colour: colour the levels, then paint the gaps white
    img = _lut(colormap)[_grid_mosaic(levels, None, 0)]
    a = np.asarray(levels)
    h, w = a.shape[:2]
    k = a.shape[2] if a.ndim == 3 else 1
    th, tw = file_tile_size(h, w)
    g = GRID_GAP
    cols = min(GRID_COLS, k)
    rows = math.ceil(k / cols)
    white = np.array(GRID_GAP_BGR, dtype=np.uint8)
    if g:
        img[th :: th + g, :] = white
        img[:, tw :: tw + g] = white
    used = k - (rows - 1) * cols
    if used < cols:  # blank the padding cells of the last row
        img[(rows - 1) * (th + g) :, used * (tw + g) :] = white
    return img


def encode_grid(act: np.ndarray, colormap: int = GRID_COLORMAP) -> bytes:
    """The PNG file of an activation grid (:func:`activation_grid`'s pixels, lossless):
    :func:`encode_grid_levels` of :func:`normalise_channels`."""
    return encode_grid_levels(normalise_channels(act), colormap)


def encode_grid_levels(levels: np.ndarray, colormap: int = GRID_COLORMAP) -> bytes:
    """The PNG file of the grid of (h, w, k) ``levels``, an activation already through
    :func:`normalise_channels` (the report's sink does that on the engine's thread: its
    writer threads get a quarter of the bytes, not a copy of the activations).

    A paletted PNG when the colour map's levels and white fit 256 entries (the default,
    viridis), deflated by :func:`deflate_grid`; an RGB PNG otherwise.  Measured on
    VGG16 (160 px), the small benchmark model and the demo: as fast as JPEG quality 92
    of the same native-size pixels and ~15 % larger, without its 8x8-block and chroma
    artifacts across the 1 px gaps of tiny tiles."""
    pal = grid_palette(colormap)
    if pal is None:
        return encode_image(grid_pixels(levels, colormap), ".png")
    of_level, _, gap = pal
    return _png(_grid_scanlines(levels, of_level, gap), _grid_plte(colormap), deflate_grid)


@functools.cache
def _grid_plte(colormap: int) -> bytes:
    """The PLTE chunk of :func:`grid_palette`'s palette (made once per colour map)."""
    pal = grid_palette(colormap)
    assert pal is not None
    return _plte(pal[1])


# ---- files -------------------------------------------------------------------------
def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """The project's atomic writer, without fsync: assets can be made again."""
    write_atomically(path, data, durable=False)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def encode_image(img_bgr: np.ndarray, ext: str, quality: int = 0) -> bytes:
    if ext == ".jpg":
        params = [cv2.IMWRITE_JPEG_QUALITY, quality or JPEG_QUALITY]
    elif ext == ".png":
        params = [
            cv2.IMWRITE_PNG_COMPRESSION,
            PNG_COMPRESSION,
            cv2.IMWRITE_PNG_FILTER,
            cv2.IMWRITE_PNG_FILTER_NONE,
        ]
    else:
        raise ValueError(ext)
    ok, buf = cv2.imencode(ext, img_bgr, params)
    if not ok:
        raise OSError(f"could not encode {ext} image")
    return buf.tobytes()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(data, zlib.crc32(tag))
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = _png_chunk(b"IEND", b"")


def encode_indexed_png(
    levels: np.ndarray, colormap: int = CAM_COLORMAP, compression: int = HEATMAP_PNG_COMPRESSION
) -> bytes:
    """A paletted PNG (8-bit, colour type 3) of ``levels`` (h, w) uint8, the palette being
    ``colormap``: the image ``colormap_lut(colormap)[levels]`` in a third of the bytes of
    RGB.  Written here because cv2 writes no paletted PNGs; every decoder reads them."""
    plte = _cam_plte(colormap)
    return _paletted_png(levels, plte, functools.partial(zlib.compress, level=compression))


@functools.cache
def _cam_plte(colormap: int) -> bytes:
    """The PLTE chunk of ``colormap``'s 256 levels (made once per colour map)."""
    return _plte(_lut(colormap))


def deflate_grid(data: memoryview) -> bytes:
    """The zlib stream of a grid's PNG scanlines: ISA-L level 1 where ``isal`` imports,
    else zlib level 1 with the run-length strategy (see :data:`GRID_PNG_COMPRESSION`)."""
    if _isal_zlib is not None:
        return bytes(_isal_zlib.compress(data, GRID_PNG_COMPRESSION))
    z = zlib.compressobj(GRID_PNG_COMPRESSION, zlib.DEFLATED, zlib.MAX_WBITS, 8, GRID_PNG_STRATEGY)
    return z.compress(data) + z.flush()


def _plte(palette_bgr: np.ndarray) -> bytes:
    """The PLTE chunk of ``palette_bgr`` (n <= 256, 3) uint8."""
    pal = np.asarray(palette_bgr, dtype=np.uint8)
    if pal.ndim != 2 or pal.shape[1] != 3 or not 0 < len(pal) <= 256:
        raise ValueError(f"palette must be (n <= 256, 3), got {pal.shape}")
    return _png_chunk(b"PLTE", np.ascontiguousarray(pal[:, ::-1]).tobytes())


def _paletted_png(levels: np.ndarray, plte: bytes, deflate: Callable[[memoryview], bytes]) -> bytes:
    lv = np.asarray(levels)
    if lv.dtype != np.uint8 or lv.ndim != 2 or 0 in lv.shape:
        raise ValueError(
            f"levels must be a non-empty (h, w) uint8 array, got {lv.dtype} {lv.shape}"
        )
    h, w = lv.shape
    lines = np.empty((h, w + 1), np.uint8)
    lines[:, 0] = 0  # filter type "none" for every scanline
    lines[:, 1:] = lv
    return _png(lines, plte, deflate)


def _png(lines: np.ndarray, plte: bytes, deflate: Callable[[memoryview], bytes]) -> bytes:
    """The paletted PNG of C-contiguous (h, w + 1) uint8 scanlines (filter byte first)."""
    h, w = lines.shape[0], lines.shape[1] - 1
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0)
    idat = deflate(lines.data)
    return b"".join(
        (_PNG_SIGNATURE, _png_chunk(b"IHDR", ihdr), plte, _png_chunk(b"IDAT", idat), _PNG_IEND)
    )


def write_image(path: str | os.PathLike[str], img_bgr: np.ndarray, quality: int = 0) -> None:
    ext = os.path.splitext(os.fspath(path))[1].lower()
    atomic_write_bytes(path, encode_image(img_bgr, ext, quality))


def write_if_changed(path: Path, data: bytes) -> None:
    """Atomically write ``data`` unless the file already holds exactly that (re-rendering
    an unchanged report touches nothing)."""
    try:
        if path.read_bytes() == data:
            return
    except OSError:
        pass
    atomic_write_bytes(path, data)
