"""Per-image report assets, written while the engine runs.

:class:`ReportAssetSink` implements :class:`convlens.engine.sinks.ResultSink`.  For every
input whose record has ``status == "ok"`` it writes, under ``OUTDIR/assets/``::

    thumbs/<id>.jpg                    the image, longest side ``thumb_size`` (never upscaled)
    cams/<id>/<method>_<class>.png     CAM heatmap, one per map (below)
    grids/<id>/<layer>.jpg             activation grid, one per exposed layer (policy below)

and ``assets.json`` (the sink's settings, counts and timings; rewritten in ``open`` and
``close``).  ``<id>``, ``<method>`` and ``<layer>`` go through :func:`safe_id` and
:func:`safe_name` so that no file name can escape its folder.  Every file is written
atomically: encoded in memory, written to a dot-prefixed temporary name in the same
folder, then ``os.replace``-d into place.  Records with ``status == "error"`` get nothing.

CAM heatmaps
    A small colour-mapped PNG, not blended with the photo: the raw map normalised to 0..1
    on its own (:func:`normalise_map`), upsampled by a small integer factor to a longest
    side of at least ``HEATMAP_MIN_SIDE`` (16x16 -> 48x48, INTER_LINEAR), coloured with
    ``CAM_COLORMAP``: a paletted PNG of :func:`cam_levels`, ~3 KB.  The pages lay it over
    the thumbnail: stretched to the photo's box, ``OVERLAY_ALPHA`` opacity, the browser's
    smooth scaling.  (Blending a thumbnail-sized overlay here and JPEG-encoding it cost
    ~0.9 ms a map; this costs ~0.02 ms.)  Why not the map's own 16x16: the browser
    interpolates colours, not map values, and between two far-apart values of the colour
    map (deep blue next to red) that is a muddy purple instead of the map's
    cyan-green-yellow ramp, visible around every hot spot.  At 3x that is gone.

Grid policy (``grids=``)
    ``"all"``     a grid for every ok image.
    ``"none"``    no grids.
    ``"sample"``  decided per image as it streams past, never revisited: an ok image gets
                  grids when ANY of

                  1. it is among the first ``grid_sample`` ok images this sink has seen
                     (in the order ``on_batch`` receives them; thumbnails already present in
                     ``assets/thumbs`` when ``open`` runs count as seen, so a resumed run
                     continues the count instead of starting a second sample);
                  2. its record has a ``label_index`` and the top-1 prediction differs
                     (misclassified);
                  3. its top-1 probability is below ``LOW_CONFIDENCE`` (0.5).

                  2 and 3 are not capped: a run where a third of the images is wrong gets
                  grids for that third.

The sink keeps no arrays between calls: everything an outcome holds is rendered and
dropped inside ``on_batch``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import struct
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from convlens.engine.results import atomic_write_bytes as write_atomically

if TYPE_CHECKING:
    from convlens.engine.contract import ModelSpec
    from convlens.engine.sinks import ImageOutcome

ASSETS_DIR = "assets"
THUMBS_DIR = "thumbs"
CAMS_DIR = "cams"
GRIDS_DIR = "grids"
CLASS_CAMS_DIR = "class_cams"
ASSETS_JSON = "assets.json"

GRID_POLICIES = ("all", "sample", "none")
LOW_CONFIDENCE = 0.5

#: colour maps (OpenCV ids) and their names, used for overlays, grids and the legends
CAM_COLORMAP = cv2.COLORMAP_TURBO
CAM_COLORMAP_NAME = "turbo"
GRID_COLORMAP = cv2.COLORMAP_VIRIDIS
GRID_COLORMAP_NAME = "viridis"
OVERLAY_ALPHA = 0.5

#: activation grid layout: ``GRID_COLS`` tiles a row, ``GRID_GAP`` px between tiles.
GRID_COLS = 16
GRID_GAP = 1
#: small maps are upscaled (nearest neighbour, integer factor) until their longest side
#: is at least ``MIN_TILE``; large ones are reduced (area) to at most ``MAX_TILE``.
MIN_TILE = 48
MAX_TILE = 128
GRID_GAP_BGR = (255, 255, 255)
JPEG_QUALITY = 85
GRID_SAMPLE = 50  # grids=sample: the first images of a run that get grids
GRID_JPEG_QUALITY = 92
#: zlib level 3 without PNG row filters: for grids (flat tiles) this is both the fastest
#: and the smallest of cv2's options (measured: ~3x faster than the default filters).
PNG_COMPRESSION = 3
#: CAM heatmap files: upsampled (integer factor, INTER_LINEAR) until the longest side is at
#: least this, so that the browser's bilinear scaling (of colours) stays close to
#: upsampling the map itself before colouring it.
HEATMAP_MIN_SIDE = 48
#: Paletted PNG, zlib level 0 (stored): 3.1 KB for 48x48, of which 0.8 KB is the palette;
#: level 1 makes it 2.6 KB but costs ~20x the time (~60 us a map against ~3 us, measured).
HEATMAP_PNG_COMPRESSION = 0

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HEX_ID = re.compile(r"[0-9a-f]{8,64}")
# channels per cv2.resize call: nearest handles many at once (OpenCV 5 refuses 255+),
# area at most 4.
_NEAREST_CHUNK = 128
_AREA_CHUNK = 4
_LINEAR_CHUNK = 128


# ---- names ---------------------------------------------------------------------------
def safe_name(text: str) -> str:
    """A file-name-safe, deterministic, collision-resistant stand-in for ``text``.

    Plain names (letters, digits, ``_.-``, not starting with a dot) are kept as they are;
    anything else becomes a slug plus 8 hex digits of its sha1.
    """
    if _SAFE_NAME.fullmatch(text):
        return text
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._-")[:40] or "x"
    return f"{slug}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:8]}"


def safe_id(record_id: str) -> str:
    """The file-name form of a record id (the engine's ids are hex and kept as they are)."""
    return record_id if _HEX_ID.fullmatch(record_id) else safe_name(record_id)


def cam_file_name(method: str, class_index: int) -> str:
    return f"{safe_name(method)}_{int(class_index)}.png"


def grid_file_name(layer: str) -> str:
    """Grids are JPEG (quality GRID_JPEG_QUALITY): about 15x faster to encode than PNG
    and smaller, at no visible cost for colour-mapped activations."""
    return f"{safe_name(layer)}.jpg"


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
    """Displayed (height, width) of one channel tile in an activation grid."""
    longest = max(h, w, 1)
    if longest < MIN_TILE:
        f = math.ceil(MIN_TILE / longest)
        return h * f, w * f
    if longest > MAX_TILE:
        s = MAX_TILE / longest
        return max(1, round(h * s)), max(1, round(w * s))
    return h, w


def grid_shape(h: int, w: int, k: int) -> tuple[int, int]:
    """(height, width) in pixels of the grid image for an (h, w, k) activation."""
    th, tw = tile_size(h, w)
    cols = min(GRID_COLS, max(k, 1))
    rows = math.ceil(max(k, 1) / cols)
    return rows * (th + GRID_GAP) - GRID_GAP, cols * (tw + GRID_GAP) - GRID_GAP


def normalise_channels(act: np.ndarray) -> np.ndarray:
    """(h, w, k) float -> (h, w, k) uint8, every channel on its own:
    ``(x - mean) / (std + 1e-5) * 64 + 128`` clipped to 0..255."""
    a = np.nan_to_num(np.asarray(act, dtype=np.float32))
    mean = a.mean(axis=(0, 1), keepdims=True)
    std = a.std(axis=(0, 1), keepdims=True)
    x = (a - mean) / (std + 1e-5)
    x *= 64.0
    x += 128.0
    np.clip(x, 0.0, 255.0, out=x)
    return x.astype(np.uint8)


def _resize_channels(u8: np.ndarray, th: int, tw: int) -> np.ndarray:
    h, w, k = u8.shape
    if (h, w) == (th, tw):
        return u8
    up = th >= h and tw >= w
    interp = cv2.INTER_NEAREST if up else cv2.INTER_AREA
    step = _NEAREST_CHUNK if up else _AREA_CHUNK
    out = np.empty((th, tw, k), dtype=np.uint8)
    for s in range(0, k, step):
        chunk = np.ascontiguousarray(u8[:, :, s : s + step])
        r = cv2.resize(chunk, (tw, th), interpolation=interp)
        out[:, :, s : s + step] = r.reshape(th, tw, -1)
    return out


def activation_grid(act: np.ndarray, colormap: int = GRID_COLORMAP) -> np.ndarray:
    """Tile every channel of an (h, w, k) activation into one BGR image.

    Channels go ``GRID_COLS`` to a row in channel order (row-major), separated by
    ``GRID_GAP`` px white gaps; unused cells of the last row stay white.  Each channel is
    normalised on its own (:func:`normalise_channels`), resized to :func:`tile_size`
    and coloured with ``colormap``.  See :func:`grid_shape` for the image size.
    """
    a = np.asarray(act)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise ValueError(f"activation must be (h, w, k), got shape {a.shape}")
    h, w, k = a.shape
    th, tw = tile_size(h, w)
    tiles = _resize_channels(normalise_channels(a), th, tw)  # (th, tw, k)
    cols = min(GRID_COLS, k)
    rows = math.ceil(k / cols)
    g = GRID_GAP
    # tile the 8-bit values first (1 byte a pixel), colour the whole mosaic once
    padded = np.zeros((rows * cols, th, tw), dtype=np.uint8)
    padded[:k] = tiles.transpose(2, 0, 1)
    mosaic = np.zeros((rows, th + g, cols, tw + g), dtype=np.uint8)
    mosaic[:, :th, :, :tw] = padded.reshape(rows, cols, th, tw).transpose(0, 2, 1, 3)
    height, width = rows * (th + g) - g, cols * (tw + g) - g
    flat = np.ascontiguousarray(mosaic.reshape(rows * (th + g), cols * (tw + g))[:height, :width])
    img = cv2.applyColorMap(flat, colormap)
    white = np.array(GRID_GAP_BGR, dtype=np.uint8)
    if g:
        img[th :: th + g, :] = white
        img[:, tw :: tw + g] = white
    used = k - (rows - 1) * cols
    if used < cols:  # blank the padding cells of the last row
        img[(rows - 1) * (th + g) :, used * (tw + g) :] = white
    return img


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
_PLTE: dict[int, bytes] = {}


def encode_indexed_png(
    levels: np.ndarray, colormap: int = CAM_COLORMAP, compression: int = HEATMAP_PNG_COMPRESSION
) -> bytes:
    """A paletted PNG (8-bit, colour type 3) of ``levels`` (h, w) uint8, the palette being
    ``colormap``: the image ``colormap_lut(colormap)[levels]`` in a third of the bytes of
    RGB.  Written here because cv2 writes no paletted PNGs; every decoder reads them."""
    lv = np.asarray(levels)
    if lv.dtype != np.uint8 or lv.ndim != 2 or 0 in lv.shape:
        raise ValueError(
            f"levels must be a non-empty (h, w) uint8 array, got {lv.dtype} {lv.shape}"
        )
    plte = _PLTE.get(colormap)
    if plte is None:
        plte = _PLTE[colormap] = _png_chunk(b"PLTE", _lut(colormap)[:, ::-1].tobytes())
    h, w = lv.shape
    rows = np.empty((h, w + 1), np.uint8)
    rows[:, 0] = 0  # filter type "none" for every scanline
    rows[:, 1:] = lv
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0)
    idat = zlib.compress(rows.tobytes(), compression)
    return b"".join(
        (_PNG_SIGNATURE, _png_chunk(b"IHDR", ihdr), plte, _png_chunk(b"IDAT", idat), _PNG_IEND)
    )


def write_image(path: str | os.PathLike[str], img_bgr: np.ndarray, quality: int = 0) -> None:
    ext = os.path.splitext(os.fspath(path))[1].lower()
    atomic_write_bytes(path, encode_image(img_bgr, ext, quality))


# ---- the sink ----------------------------------------------------------------------
def top1(record: dict[str, Any]) -> tuple[int | None, float | None]:
    """(index, probability) of the record's most probable prediction."""
    preds = record.get("predictions") or []
    best: dict[str, Any] | None = None
    for p in preds:
        if best is None or float(p.get("prob", 0.0)) > float(best.get("prob", 0.0)):
            best = p
    if best is None:
        return None, None
    return int(best["index"]), float(best.get("prob", 0.0))


def is_misclassified(record: dict[str, Any]) -> bool:
    label = record.get("label_index")
    idx, _ = top1(record)
    return label is not None and idx is not None and int(label) != idx


def is_low_confidence(record: dict[str, Any]) -> bool:
    _, prob = top1(record)
    return prob is not None and prob < LOW_CONFIDENCE


class ReportAssetSink:
    """Writes thumbnails, CAM overlays and activation grids while the engine runs."""

    def __init__(
        self, grids: str = "sample", grid_sample: int = GRID_SAMPLE, thumb_size: int = 256
    ):
        if grids not in GRID_POLICIES:
            raise ValueError(f"grids must be one of {', '.join(GRID_POLICIES)}, got {grids!r}")
        if grid_sample < 0:
            raise ValueError("grid_sample must be >= 0")
        if thumb_size < 16:
            raise ValueError("thumb_size must be >= 16")
        self.grids = grids
        self.grid_sample = int(grid_sample)
        self.thumb_size = int(thumb_size)
        self._root: Path | None = None
        self._seen_ok = 0
        self._decided: dict[str, bool] = {}  # id -> grids, decided by wants_activations
        #: small counters (no arrays): images, thumbnails, overlays, grid_images, grid_files
        self.counts: dict[str, int] = {}
        #: seconds spent: "thumbs_overlays" and "grids"
        self.timings: dict[str, float] = {}
        self._reset_counters()

    def _reset_counters(self) -> None:
        self.counts = {
            "images": 0,
            "errors": 0,
            "thumbnails": 0,
            "overlays": 0,
            "grid_images": 0,
            "grid_files": 0,
        }
        self.timings = {"thumbs_overlays_s": 0.0, "grids_s": 0.0}

    # -- ResultSink --------------------------------------------------------------
    def open(self, outdir: Path, spec: ModelSpec, settings: dict[str, Any]) -> None:
        root = Path(outdir) / ASSETS_DIR
        for sub in (THUMBS_DIR, CAMS_DIR, GRIDS_DIR):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self._root = root
        self._reset_counters()
        with os.scandir(root / THUMBS_DIR) as it:
            self._seen_ok = sum(1 for e in it if e.name.endswith(".jpg"))
        self._write_manifest(final=False)

    def on_batch(self, outcomes: list[ImageOutcome]) -> None:
        if self._root is None:
            raise RuntimeError("ReportAssetSink.on_batch called before open()")
        for outcome in outcomes:
            self._one(outcome)

    def close(self, summary: dict[str, Any]) -> None:
        if self._root is not None:
            self._write_manifest(final=True)

    # -- policy -------------------------------------------------------------------
    def wants_activations(self, record: dict[str, Any]) -> bool:
        """The engine asks before ``on_batch``, once per ok record: the decision is
        kept for that record, so the engine fetches activations only for images that
        get grids."""
        decision = self.wants_grids(record)
        self._decided[str(record["id"])] = decision
        return decision

    def wants_grids(self, record: dict[str, Any]) -> bool:
        """Decide (and count) whether this ok record gets activation grids.

        Must be called exactly once per ok image, in stream order.
        """
        first_n = self._seen_ok < self.grid_sample
        self._seen_ok += 1
        if self.grids == "all":
            return True
        if self.grids == "none":
            return False
        return first_n or is_misclassified(record) or is_low_confidence(record)

    # -- work ---------------------------------------------------------------------
    def _one(self, outcome: ImageOutcome) -> None:
        assert self._root is not None
        record = outcome.record
        self.counts["images"] += 1
        if record.get("status") != "ok" or outcome.image is None:
            self.counts["errors"] += 1
            return
        rid = safe_id(str(record["id"]))
        decided = self._decided.pop(str(record["id"]), None)
        grids = self.wants_grids(record) if decided is None else decided

        t0 = time.perf_counter()
        # shrink first: the colour conversion then runs on the small image
        thumb = to_bgr(thumbnail(to_uint8(outcome.image), self.thumb_size))
        write_image(self._root / THUMBS_DIR / f"{rid}.jpg", thumb)
        self.counts["thumbnails"] += 1
        if outcome.maps:
            cam_dir = os.path.join(self._root, CAMS_DIR, rid)
            with contextlib.suppress(FileExistsError):
                os.mkdir(cam_dir)
            for (method, cls), levels in cam_levels_batch(outcome.maps).items():
                path = os.path.join(cam_dir, cam_file_name(method, cls))
                atomic_write_bytes(path, encode_indexed_png(levels))
                self.counts["overlays"] += 1
        t1 = time.perf_counter()
        self.timings["thumbs_overlays_s"] += t1 - t0

        if grids and outcome.activations:
            grid_dir = self._root / GRIDS_DIR / rid
            grid_dir.mkdir(exist_ok=True)
            for layer, act in outcome.activations.items():
                write_image(
                    grid_dir / grid_file_name(layer), activation_grid(act), GRID_JPEG_QUALITY
                )
                self.counts["grid_files"] += 1
            self.counts["grid_images"] += 1
            self.timings["grids_s"] += time.perf_counter() - t1

    def _write_manifest(self, *, final: bool) -> None:
        assert self._root is not None
        doc = {
            "format": 2,
            "complete": final,
            "grids": self.grids,
            "grid_sample": self.grid_sample,
            "low_confidence": LOW_CONFIDENCE,
            "thumb_size": self.thumb_size,
            "cam_colormap": CAM_COLORMAP_NAME,
            "cam_files": "heatmap",
            "heatmap_min_side": HEATMAP_MIN_SIDE,
            "overlay_alpha": OVERLAY_ALPHA,
            "grid_colormap": GRID_COLORMAP_NAME,
            "grid_layout": {
                "cols": GRID_COLS,
                "gap": GRID_GAP,
                "min_tile": MIN_TILE,
                "max_tile": MAX_TILE,
            },
            "counts": dict(self.counts),
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }
        atomic_write_text(self._root / ASSETS_JSON, json.dumps(doc, indent=1, sort_keys=True))
