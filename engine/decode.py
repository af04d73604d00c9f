"""The decode pool: images decoded and preprocessed in threads (OpenCV releases the GIL)
inside a bounded window of pending images, so memory stays flat, and handed on in
batches of ``batch_size`` decodable images (failed ones ride along as records)."""

from __future__ import annotations

import collections
import concurrent.futures as cf
import glob
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .images import ImageError, Preprocessor, read_image_shrunk, silence_opencv_logging
from .outdir import Record
from .plan import RunPlan
from .results import image_id

DISPLAY_MAX = 1024  # longest side of the original kept in memory for sinks
#: with sinks, a JPEG decoded scaled down keeps its longest side at least this (the
#: report's thumbnails are 256 px)
DISPLAY_MIN = 256


@dataclass
class Decoded:
    index: int
    path: Path
    record: Record
    image: np.ndarray | None = None  # original RGB, shrunk for sinks
    tensor: np.ndarray | None = None  # preprocessed model input; None if it failed


def display_copy(rgb: np.ndarray) -> np.ndarray:
    """The decoded image for sinks (thumbnails), shrunk so its longest side is at most
    DISPLAY_MAX: memory stays bounded whatever the photos' size."""
    h, w = rgb.shape[:2]
    longest = max(h, w)
    if longest <= DISPLAY_MAX:
        return rgb
    s = DISPLAY_MAX / longest
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def input_roots(inputs: Sequence[str], files: list[Path]) -> list[Path]:
    """What a file's relpath is relative to: the input directories (as given, after
    ``~`` and glob expansion), then the common parent of all inputs found, so that
    cats/1.jpg and dogs/1.jpg matched by a glob stay apart."""
    roots = []
    for raw in inputs:
        expanded = os.path.expanduser(raw)
        cands = glob.glob(expanded, recursive=True) if any(c in raw for c in "*?[") else [expanded]
        roots += [Path(os.path.abspath(c)) for c in cands if os.path.isdir(c)]
    roots = sorted(set(roots), key=lambda r: -len(r.parts))  # the deepest input dir first
    if files:
        roots.append(Path(os.path.commonpath([str(f.parent) for f in files])))
    return roots


def relpath(path: Path, roots: list[Path]) -> str:
    for r in roots:
        try:
            return str(path.relative_to(r))
        except ValueError:
            continue
    return path.name


def decode_workers(workers: int | None, device: str) -> int:
    """Decoding threads: ``--workers``, else every CPU when the model runs on CUDA, and
    half of them (at least one) on the CPU, where onnxruntime's threads and the report's
    share them (2 cores, ``bench_pipeline.py``: one decoding thread instead of two gave
    1.17x the default run's img/s on the small model and 15 % less CPU per image,
    1.03x on VGG16, the same for one method without the report)."""
    if workers:
        return workers
    cpus = os.cpu_count() or 1
    return cpus if device == "cuda" else max(1, cpus // 2)


class DecodePool:
    """``batches(files, roots)`` yields lists of :class:`Decoded` in input order."""

    def __init__(self, plan: RunPlan, keep_images: bool, device: str = "cpu"):
        self.plan = plan
        self.workers = decode_workers(plan.workers, device)
        self.keep_images = keep_images  # a sink wants the decoded photo
        self.pre = Preprocessor(plan.spec.input, plan.spec.preprocess)
        # every bad input becomes one record and one line: OpenCV's own warnings about
        # it would be a second (codec libraries' messages are captured by read_image)
        silence_opencv_logging()
        side = max(self.pre.height, self.pre.width)
        #: --fast-decode: a JPEG at least twice this is decoded scaled down (libjpeg's
        #: DCT-domain scaling, :func:`convlens.engine.images.decode_image`) keeping
        #: (shorter side, longer side) at least these; None: every image at full size
        self.shrink = (side, DISPLAY_MIN if keep_images else 0) if plan.fast_decode else None

    def decode(self, index: int, path: Path, roots: list[Path]) -> Decoded:
        plan = self.plan
        rec = Record(id=image_id(path), path=str(path), relpath=relpath(path, roots))
        if plan.labels_from_dirs:
            rec.label = path.parent.name
            names = plan.spec.class_names
            rec.label_index = names.index(rec.label) if rec.label in names else None
        try:
            rgb, (height, width) = read_image_shrunk(path, plan.max_pixels, self.shrink)
            tensor = self.pre(rgb)
        except ImageError as exc:
            rec.fail(str(exc))
            return Decoded(index, path, rec)
        except (MemoryError, ValueError, cv2.error) as exc:  # one input's failure, not the run's
            rec.fail(f"cannot process: {type(exc).__name__}: {exc}")
            return Decoded(index, path, rec)
        rec.height, rec.width = height, width  # the full image's, however it was decoded
        shown = display_copy(rgb) if self.keep_images else None
        return Decoded(index, path, rec, shown, tensor)

    def batches(self, files: list[Path], roots: list[Path]) -> Iterator[list[Decoded]]:
        workers = self.workers
        size = self.plan.batch_size
        window = max(size * 2, workers * 4)
        batch: list[Decoded] = []
        with cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
            try:
                pending: collections.deque[cf.Future[Decoded]] = collections.deque()
                it = iter(enumerate(files))
                for i, f in it:
                    pending.append(pool.submit(self.decode, i, f, roots))
                    if len(pending) >= window:
                        break
                while pending:
                    d = pending.popleft().result()
                    nxt = next(it, None)
                    if nxt is not None:
                        pending.append(pool.submit(self.decode, nxt[0], nxt[1], roots))
                    batch.append(d)
                    if sum(1 for b in batch if b.tensor is not None) >= size:
                        yield batch
                        batch = []
                if batch:
                    yield batch
            except BaseException:  # Ctrl-C, or the consumer stopped: pending decodes are
                pool.shutdown(wait=True, cancel_futures=True)  # dropped, not waited for
                raise
