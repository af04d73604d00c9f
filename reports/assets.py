"""Per-image report assets, written while the engine runs.

:class:`ReportAssetSink` implements :class:`convlens.engine.sinks.ResultSink`.  For every
input whose record has ``status == "ok"`` it writes, under ``OUTDIR/assets/``::

    thumbs/<id>.jpg                    the image, longest side ``thumb_size`` (never upscaled)
    cams/<id>/<method>_<class>.png     CAM heatmap, one per map (below)
    grids/<id>/<layer>.png             activation grid, one per exposed layer (policy below)

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
    map (black next to pale yellow) that is a straight blend instead of the map's
    purple-red-orange ramp, visible around every hot spot.  At 3x that is gone.

Activation grids
    Every channel of a layer, normalised on its own, tiled 16 a row with 1 px white gaps,
    each at its own size (maps larger than ``MAX_TILE`` reduced): a paletted PNG
    (:func:`encode_grid`).  The page shows small maps larger (``grid_shape``), scaled up
    by the browser with crisp pixels, so the encoder never sees the upscaled copies
    (before: JPEG of tiles upscaled to ``MIN_TILE``, 2.2x the CPU and 2.6x the bytes).

Grid policy (``grids=``)
    ``"all"``, ``"sample"`` or ``"none"``: see :mod:`convlens.reports.gridpolicy`.  With
    ``"sample"`` the first ``grid_sample`` ok images of the run's input order get grids,
    and the first ``grid_notable`` misclassified or low-confidence ones: at most
    ``grid_sample + grid_notable`` images whatever the run's size.

Resume
    :meth:`ReportAssetSink.missing` tells the engine which done images lack their
    thumbnail, a CAM heatmap, or the grids the policy certainly gives them: the engine
    recomputes those, and the sink writes their files again.

Off the critical path
    ``on_batch`` decides, shrinks the thumbnail and copies the maps (and a grid image's
    activations), and queues: each image's files are encoded and written on
    one of the report threads (:mod:`convlens.reports.background`), at most ``REPORT_PENDING``
    images and ``REPORT_PENDING_BYTES`` of arrays queued, so the engine decodes and
    runs the next batch meanwhile; ``close``
    waits for the queue.  A record the engine logs before its files are written is one
    :meth:`ReportAssetSink.missing` finds lacking on resume.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from convlens.engine.contract import ACT_PREFIX
from convlens.engine.outdir import Record
from convlens.engine.results import refuse_links

from .background import Background
from .gridpolicy import (
    GRID_NOTABLE,
    GRID_POLICIES,
    GRID_SAMPLE,
    LOW_CONFIDENCE,
    GridPolicy,
    is_low_confidence,
    is_misclassified,
    top1,
)
from .imaging import (
    CAM_COLORMAP_NAME,
    GRID_COLORMAP_NAME,
    GRID_COLS,
    GRID_GAP,
    HEATMAP_MIN_SIDE,
    MAX_TILE,
    MIN_TILE,
    OVERLAY_ALPHA,
    atomic_write_bytes,
    atomic_write_text,
    cam_levels_batch,
    encode_grid_levels,
    encode_indexed_png,
    normalise_channels,
    thumbnail,
    to_bgr,
    to_uint8,
    write_image,
)
from .layout import (
    ASSETS_DIR,
    ASSETS_JSON,
    CAMS_DIR,
    GRIDS_DIR,
    REPORT_PATHS,
    THUMBS_DIR,
    cam_file_name,
    clean_assets,
    clean_temporaries,
    grid_file_name,
    list_dir,
    safe_id,
)

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from convlens.engine.contract import ModelSpec
    from convlens.engine.sinks import ImageOutcome


__all__ = [
    "GRID_NOTABLE",
    "GRID_POLICIES",
    "GRID_SAMPLE",
    "LOW_CONFIDENCE",
    "ReportAssetSink",
    "is_low_confidence",
    "is_misclassified",
    "top1",
]

#: report threads, and images queued for them at most (each holds one image's arrays);
#: two, because a thread spends much of an image waiting in file-system calls (2 against
#: 1: 1.09x the default run's img/s, benchmarks/bench_pipeline.py, README Speed)
REPORT_WORKERS = 2
REPORT_PENDING = 32
REPORT_PENDING_BYTES = 64 << 20  # and at most this much of their arrays


# ---- the sink ----------------------------------------------------------------------
class ReportAssetSink:
    """Writes thumbnails, CAM overlays and activation grids while the engine runs."""

    def __init__(
        self,
        grids: str = "sample",
        grid_sample: int = GRID_SAMPLE,
        thumb_size: int = 256,
        grid_notable: int = GRID_NOTABLE,
    ):
        self.policy = GridPolicy(grids, grid_sample, grid_notable)  # validates them
        if thumb_size < 16:
            raise ValueError("thumb_size must be >= 16")
        self.grids = grids
        self.grid_sample = int(grid_sample)
        self.grid_notable = int(grid_notable)
        self.thumb_size = int(thumb_size)
        self._root: Path | None = None
        self._decided: dict[str, bool] = {}  # id -> grids, decided by wants_activations
        #: the files are made on report threads, at most REPORT_PENDING images queued
        self._work: Background[dict[str, float]] = Background(
            REPORT_WORKERS, REPORT_PENDING, self._collect, REPORT_PENDING_BYTES
        )
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
        refuse_links(outdir, REPORT_PATHS)
        clean_temporaries(Path(outdir))
        if settings.get("force"):  # --force: the report starts over, like the engine
            clean_assets(Path(outdir))
        root = Path(outdir) / ASSETS_DIR
        for sub in (THUMBS_DIR, CAMS_DIR, GRIDS_DIR):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self._root = root
        self._reset_counters()
        self._write_manifest(final=False)

    def expect(self, order: Sequence[str], done: Mapping[str, Record]) -> None:
        """The engine, before the first batch: the run's input order and the done ok
        records (the grid sample is the first ok images of that order)."""
        self.policy.expect(order, done)

    def missing(
        self, outdir: Path, spec: ModelSpec, order: Sequence[str], done: Mapping[str, Record]
    ) -> set[str]:
        """The engine, on resume: the done records whose thumbnail, CAM heatmaps or
        certain grids (:meth:`GridPolicy.certain`) are not on disk (``rm -rf assets``,
        a run with ``--no-report``): recomputed, their files are written again."""
        root = Path(outdir) / ASSETS_DIR
        thumbs = list_dir(root / THUMBS_DIR)
        cam_dirs, grid_dirs = list_dir(root / CAMS_DIR), list_dir(root / GRIDS_DIR)
        layers = {grid_file_name(o.name.removeprefix(ACT_PREFIX)) for o in spec.activation_outputs}
        gridded = self.policy.certain(order, done) if layers else set()
        lacking = set()
        for rid, rec in done.items():
            sid = safe_id(rid)
            cams = {cam_file_name(m, c) for m in rec.cam_methods for c in rec.cam_classes}
            if (
                f"{sid}.jpg" not in thumbs
                or (cams and not (sid in cam_dirs and cams <= list_dir(root / CAMS_DIR / sid)))
                or (
                    rid in gridded
                    and not (sid in grid_dirs and layers <= list_dir(root / GRIDS_DIR / sid))
                )
            ):
                lacking.add(rid)
        return lacking

    def on_batch(self, outcomes: list[ImageOutcome]) -> None:
        if self._root is None:
            raise RuntimeError("ReportAssetSink.on_batch called before open()")
        for outcome in outcomes:
            self._one(outcome)

    def close(self, summary: dict[str, Any]) -> None:
        self._work.drain()
        if self._root is not None:
            self._write_manifest(final=True)

    # -- on Ray (convlens.engine.distributed) ------------------------------------
    def for_worker(self, assets_only: bool) -> ReportAssetSink:
        """The copy a remote worker writes with (call after :meth:`expect`).  A worker
        sees part of the run, so with "sample" its copy gives grids only to the images
        among the first ``grid_sample`` places of the order (each is among the first
        ok images when it is ok).  The rest of the sample (beyond failed inputs) and
        the notable images (capped by their place among the notable ones) need the
        whole run: the driver's sink names them as ``missing`` at the end, and a
        worker makes them with the ``assets_only`` copy, which gives grids to every
        image it gets."""
        grids = "all" if assets_only and self.grids != "none" else self.grids
        copy = ReportAssetSink(grids, self.grid_sample, self.thumb_size, grid_notable=0)
        if grids == "sample":  # the first places of the order: as if every one were ok
            head = self.policy.head()
            copy.policy.expect_ids(head, head)
        return copy

    def flush(self) -> None:
        """Return once the files of every outcome handed so far are written (a worker
        writes its unit only then)."""
        self._work.drain()

    def attach(self, outdir: Path) -> None:
        """Write into ``outdir``'s assets, which another process ``open``-ed (no
        cleaning: other workers write there at the same time)."""
        self._root = Path(outdir) / ASSETS_DIR

    # -- policy -------------------------------------------------------------------
    def wants_activations(self, record: Record) -> bool:
        """The engine asks before ``on_batch``, once per ok record: the decision is
        kept for that record, so the engine fetches activations only for images that
        get grids."""
        decision = self.wants_grids(record)
        self._decided[record.id] = decision
        return decision

    def surely_wants_activations(self, record: Record) -> bool:
        """The engine asks before the predictions (on its forward thread): a yes means
        :meth:`wants_activations` will say yes if the record is ok, so the main pass
        hands out its activations (:meth:`GridPolicy.surely`)."""
        return self.policy.surely(record.id)

    def wants_grids(self, record: Record) -> bool:
        """Whether this ok record gets activation grids (the policy's decision)."""
        return self.policy.decide(record)

    # -- work ---------------------------------------------------------------------
    def _one(self, outcome: ImageOutcome) -> None:
        """Count the outcome and queue its files (see :mod:`convlens.reports.background`):
        the thumbnail, one heatmap per map, and the grids when the policy says so."""
        record = outcome.record
        self.counts["images"] += 1
        if not record.ok or outcome.image is None:
            self.counts["errors"] += 1
            return
        decided = self._decided.pop(record.id, None)
        grids = self.wants_grids(record) if decided is None else decided
        # the report thread gets its own arrays (the engine's are dropped on return): the
        # shrunk thumbnail, the small maps, and for a grid image its activations' levels
        t0 = time.perf_counter()
        thumb = to_bgr(thumbnail(to_uint8(outcome.image), self.thumb_size))
        # one copy per array: a class-agnostic map stands under each of its classes
        copies: dict[int, np.ndarray] = {}
        maps = {
            key: copies.setdefault(id(raw), np.array(raw, np.float32))
            for key, raw in outcome.maps.items()
        }
        t1 = time.perf_counter()
        self.timings["thumbs_overlays_s"] += t1 - t0
        # a grid's uint8 levels (a quarter of the floats), not a copy of the activations
        levels = {k: normalise_channels(a) for k, a in outcome.activations.items()} if grids else {}
        self.timings["grids_s"] += time.perf_counter() - t1
        held = thumb.nbytes + sum(a.nbytes for a in (*maps.values(), *levels.values()))
        self._work.submit(self._render, safe_id(record.id), thumb, maps, levels, weight=held)

    def _render(
        self,
        rid: str,
        thumb: np.ndarray,
        maps: dict[tuple[str, int], np.ndarray],
        levels_by_layer: dict[str, np.ndarray],
    ) -> dict[str, float]:
        """One image's files (on a report thread); what it did, for the counters."""
        assert self._root is not None
        t0 = time.perf_counter()
        write_image(self._root / THUMBS_DIR / f"{rid}.jpg", thumb)
        if maps:
            cam_dir = os.path.join(self._root, CAMS_DIR, rid)
            with contextlib.suppress(FileExistsError):
                os.mkdir(cam_dir)
            for (method, cls), levels in cam_levels_batch(maps).items():
                path = os.path.join(cam_dir, cam_file_name(method, cls))
                atomic_write_bytes(path, encode_indexed_png(levels))
        t1 = time.perf_counter()
        done = {"thumbnails": 1, "overlays": len(maps), "thumbs_overlays_s": t1 - t0}
        if levels_by_layer:
            grid_dir = os.path.join(self._root, GRIDS_DIR, rid)
            with contextlib.suppress(FileExistsError):
                os.mkdir(grid_dir)
            for layer, grid_levels in levels_by_layer.items():
                path = os.path.join(grid_dir, grid_file_name(layer))
                atomic_write_bytes(path, encode_grid_levels(grid_levels))
            done |= {"grid_images": 1, "grid_files": len(levels_by_layer)}
            done["grids_s"] = time.perf_counter() - t1
        return done

    def _collect(self, done: dict[str, float]) -> None:
        for key, value in done.items():
            if key.endswith("_s"):
                self.timings[key] += value
            else:
                self.counts[key] += int(value)

    def _write_manifest(self, *, final: bool) -> None:
        assert self._root is not None
        doc = {
            "format": 2,
            "complete": final,
            "grids": self.grids,
            "grid_sample": self.grid_sample,
            "grid_notable": self.grid_notable,
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
