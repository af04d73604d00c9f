"""The main job: an analysis ONNX over any number of images, streaming, batched, resumable.

Pipeline
    decode + preprocess in a pool of threads (OpenCV releases the GIL), a bounded
    window of pending images so memory stays flat  ->  fixed-size batches  ->
    onnxruntime (CUDA or CPU)  ->  CAM methods vectorised over the batch  ->
    records appended to results.jsonl, maps (``save_maps``), statistics shards, sinks.

Resume
    Records go to results.jsonl as each batch finishes; activation statistics are
    flushed as a shard every few batches, each shard naming the ids it covers.  On a
    new run, ok records that no complete shard covers are dropped and recomputed, and
    every input that has a record is skipped: killed at any point and run again, the
    run finishes with nothing lost and nothing counted twice.

Exit status (see :attr:`RunSummary.exit_code`): 0 every input succeeded, 1 at least
one input failed (the others were processed), 2 the run could not start.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import glob
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from . import contract as C
from .cams import METHODS, availability, normalize
from .graph import pruned, stat_names, with_stats
from .images import DEFAULT_MAX_PIXELS, ImageError, Preprocessor, discover, read_image
from .results import (
    ResultsLog,
    atomic_save_npz,
    atomic_write_json,
    image_id,
)
from .runtime import Session, open_session
from .sinks import ImageOutcome, ResultSink
from .stats import RunStats

SHARD_EVERY = 8  # batches per statistics shard


class RunError(Exception):
    """The run cannot start (bad model, bad options); ``str(e)`` is one line."""


@dataclass
class RunOptions:
    device: str = "auto"
    batch_size: int = 16
    workers: int | None = None  # decoding threads; None = number of CPUs
    cam_methods: list[str] | None = None  # None = every method the model supports
    top_k: int = 3
    classes: list[str] = field(default_factory=list)  # names (or indices) to map too
    labels_from_dirs: bool = False
    force: bool = False
    save_maps: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    threads: int | None = None  # onnxruntime intra-op threads; None = its default


@dataclass
class RunSummary:
    outdir: Path
    total: int  # records in results.jsonl (this run and earlier ones)
    ok: int
    failed: int
    processed: int  # inputs handled by this run
    skipped: int  # inputs already done by an earlier run
    seconds: float
    device: str
    notes: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        return 0 if self.failed == 0 else 1

    def line(self) -> str:
        return (
            f"{self.ok} ok, {self.failed} failed ({self.processed} processed, "
            f"{self.skipped} already done) in {self.seconds:.1f} s, "
            f"{self.images_per_second:.1f} img/s on {self.device}"
        )


class Progress:
    """A one-line progress bar on stderr (images, img/s, ETA), only on a terminal."""

    def __init__(self, total: int, enabled: bool):
        self.total = total
        self.enabled = enabled and sys.stderr.isatty()
        self.done = 0
        self.t0 = time.perf_counter()
        self._last = 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if not self.enabled or (now - self._last < 0.2 and self.done < self.total):
            return
        self._last = now
        rate = self.done / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        bar = "#" * filled + "-" * (width - filled)
        sys.stderr.write(
            f"\r[{bar}] {self.done}/{self.total} {rate:6.1f} img/s ETA {int(eta) // 60}:{int(eta) % 60:02d}"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


@dataclass
class _Decoded:
    index: int
    path: Path
    record: dict[str, Any]
    image: np.ndarray | None = None  # original RGB
    tensor: np.ndarray | None = None


DISPLAY_MAX = 1024  # longest side of the original kept in memory for sinks


def _display_copy(rgb: np.ndarray) -> np.ndarray:
    """The decoded image for sinks (thumbnails), shrunk so its longest side is at most
    DISPLAY_MAX: memory stays bounded whatever the photos' size."""
    h, w = rgb.shape[:2]
    longest = max(h, w)
    if longest <= DISPLAY_MAX:
        return rgb
    s = DISPLAY_MAX / longest
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def _roots(inputs: Sequence[str], files: list[Path]) -> list[Path]:
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


def _relpath(path: Path, roots: list[Path]) -> str:
    for r in roots:
        try:
            return str(path.relative_to(r))
        except ValueError:
            continue
    return path.name


class Runner:
    """One run of the engine.  Use :func:`run` unless you need the pieces."""

    def __init__(
        self,
        model_path: str | Path,
        outdir: str | Path,
        options: RunOptions | None = None,
        sinks: Sequence[ResultSink] = (),
        warn: Callable[[str], None] | None = None,
        progress: bool = True,
    ):
        self.opts = options or RunOptions()
        self.model_path = Path(model_path)
        self.outdir = Path(outdir)
        self.sinks = list(sinks)
        self.warn = warn or (lambda msg: print(msg, file=sys.stderr))
        self.show_progress = progress
        self._fp: dict[str, Any] | None = None
        try:
            self.spec = C.read_spec(self.model_path)
        except C.ContractError as exc:
            raise RunError(str(exc)) from exc
        self._check_options()

    # -- setup -----------------------------------------------------------------------
    def _check_options(self) -> None:
        o, spec = self.opts, self.spec
        if o.batch_size < 1:
            raise RunError("--batch-size must be at least 1")
        if o.top_k < 1:
            raise RunError("--top-k must be at least 1")
        o.top_k = min(o.top_k, spec.num_classes)
        why_not = availability(spec)
        avail = [m for m, why in why_not.items() if why is None]
        if o.cam_methods is None:
            self.methods = avail
        else:
            unknown = [m for m in o.cam_methods if m not in METHODS]
            if unknown:
                raise RunError(
                    f"unknown CAM method {', '.join(unknown)}: choose from {', '.join(METHODS)}"
                )
            missing = [m for m in o.cam_methods if m not in avail]
            if missing:
                raise RunError(
                    f"CAM method {', '.join(missing)} is not available for this model "
                    f"({why_not[missing[0]]}); available: {', '.join(avail)}"
                )
            self.methods = list(dict.fromkeys(o.cam_methods))
        self.extra_classes: list[int] = []
        for c in o.classes:
            if c in spec.class_names:
                self.extra_classes.append(spec.class_names.index(c))
            elif c.isdigit() and int(c) < spec.num_classes:
                self.extra_classes.append(int(c))
            else:
                raise RunError(
                    f"--class {c!r}: not a class of this model ({', '.join(spec.class_names[:20])}"
                    f"{', ...' if spec.num_classes > 20 else ''})"
                )
        self.extra_classes = list(dict.fromkeys(self.extra_classes))
        self.needs_grads = any(METHODS[m].needs_gradients for m in self.methods)

    # files of a run directory that --force removes (OUTDIR.md)
    RUN_FILES = (
        "results.jsonl",
        "run.json",
        "stats.json",
        "class_cams.npz",
        "index.html",
        "model.html",
    )
    RUN_DIRS = ("maps", "shards", "assets", "images", "static")

    def _prepare_outdir(self) -> None:
        out = self.outdir
        if out.exists() and not out.is_dir():
            raise RunError(f"{out}: exists and is not a directory")
        if self.opts.force and out.exists():
            for name in self.RUN_FILES:
                (out / name).unlink(missing_ok=True)
            for name in self.RUN_DIRS:
                shutil.rmtree(out / name, ignore_errors=True)
        else:
            self._check_same_run()
        (out / "shards").mkdir(parents=True, exist_ok=True)
        if self.opts.save_maps:
            (out / "maps").mkdir(exist_ok=True)

    def _lock_outdir(self) -> Any:
        """One run at a time per OUTDIR: two would count the same images twice."""
        import fcntl

        self.outdir.mkdir(parents=True, exist_ok=True)
        f = open(self.outdir / ".lock", "a")  # noqa: SIM115 - held for the whole run
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            f.close()
            raise RunError(f"{self.outdir}: another convlens run is writing to it") from exc
        return f

    def _fingerprint(self) -> dict[str, Any]:
        """What makes earlier results in OUTDIR reusable: the model file and the
        settings that change a record."""
        if self._fp is not None:
            return self._fp
        h = hashlib.sha1()
        with open(self.model_path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        o = self.opts
        self._fp = {
            "model_sha1": h.hexdigest(),
            "cam_methods": self.methods,
            "top_k": o.top_k,
            "classes": sorted(set(self.extra_classes)),
            "labels_from_dirs": o.labels_from_dirs,
            "save_maps": o.save_maps,
        }
        return self._fp

    def _check_same_run(self) -> None:
        run_json = self.outdir / "run.json"
        if not run_json.exists():
            return
        try:
            before = json.loads(run_json.read_text()).get("fingerprint")
        except (OSError, ValueError):
            before = None
        if before is not None and before != self._fingerprint():
            changed = [k for k, v in self._fingerprint().items() if before.get(k) != v]
            raise RunError(
                f"{self.outdir} holds results of another model or other settings "
                f"({', '.join(changed)} differ); use --force to recompute, or another -o"
            )

    def _resume(self, log: ResultsLog) -> dict[str, dict[str, Any]]:
        """Done records by id.  Ok records no complete shard covers are dropped (they are
        recomputed), and so are error records: a failed input is tried again."""
        records = log.load()
        covered: set[str] = set()
        for meta in sorted((self.outdir / "shards").glob("*.json")):
            try:
                covered.update(json.loads(meta.read_text())["ids"])
            except (OSError, ValueError, KeyError):
                self._drop_shard(meta)
        # temporaries of atomic writes a kill interrupted (only names the engine makes)
        for pattern in ("shards/.*.tmp", "maps/.*.npz.*.tmp"):
            for tmp in self.outdir.glob(pattern):
                tmp.unlink(missing_ok=True)
        keep, seen = [], set()
        for r in records:
            rid = r.get("id")
            if rid in seen:
                continue
            if r.get("status") != "ok" or rid not in covered:
                continue
            seen.add(rid)
            keep.append(r)
        if len(keep) != len(records):
            log.rewrite(keep)
        return {r["id"]: r for r in keep}

    def _drop_shard(self, meta: Path) -> None:
        stem = meta.name[: -len(".json")]
        for suffix in (".json", ".stats.npz", ".cams.npz"):
            (meta.parent / (stem + suffix)).unlink(missing_ok=True)

    # -- the run -------------------------------------------------------------------------
    def run(self, inputs: Sequence[str]) -> RunSummary:
        t0 = time.perf_counter()
        if not inputs:
            raise RunError("no input given: name image files, directories or globs")
        sess = self._open_session()  # fails (one line) before --force removes anything
        lock = self._lock_outdir()
        try:
            return self._run_locked(sess, inputs, t0)
        finally:
            lock.close()  # closing the file releases the lock

    def _run_locked(self, sess: Session, inputs: Sequence[str], t0: float) -> RunSummary:
        self._prepare_outdir()
        log = ResultsLog(self.outdir)
        done = self._resume(log)
        found = discover(list(inputs))
        roots = _roots(inputs, found.files)
        notes = [sess.note] if sess.note else []
        for n in notes:
            self.warn(n)

        problems = []
        for raw, reason in found.problems:
            rid = image_id(os.path.abspath(raw))
            rec = {
                "id": rid,
                "path": os.path.abspath(raw),
                "relpath": raw,
                "status": "error",
                "error": reason,
            }
            problems.append(rec)
            self.warn(f"{raw}: {reason}")
        if problems:
            log.append(problems)
            for p in problems:
                done[p["id"]] = p

        todo = [f for f in found.files if image_id(f) not in done]
        skipped = len(found.files) - len(todo)
        settings = self._settings(inputs)
        # the spec and settings are known now: a report rendered mid-run can use them
        atomic_write_json(
            self.outdir / "run.json",
            {
                "model_path": str(self.model_path),
                "spec": asdict(self.spec),
                "settings": settings,
                "fingerprint": self._fingerprint(),
                "summary": None,
            },
        )
        for s in self.sinks:
            s.open(self.outdir, self.spec, settings)

        self._weights = self._fetch_constants()
        self._seq = self._next_shard_seq()
        self._pending_stats = RunStats()
        self._pending_cams: dict[str, np.ndarray] = {}
        self._pending_ids: list[str] = []
        self._batches_since_flush = 0
        self._acts_sess: Session | None = None
        progress = Progress(len(todo), self.show_progress)
        processed = 0
        try:
            for batch in self._batches(todo, roots):
                self._process(sess, batch, log)
                processed += len(batch)
                progress.update(len(batch))
            self._flush_shard()
        finally:
            progress.close()
            log.close()
        elapsed = time.perf_counter() - t0
        summary = self._finish(processed + len(problems), skipped, elapsed, sess, notes, settings)
        for s in self.sinks:
            s.close(asdict(summary) | {"outdir": str(self.outdir)})
        return summary

    def _main_outputs(self) -> list[str]:
        """What every batch needs: predictions, the CAM layer, statistics, gradients."""
        spec = self.spec
        names = [C.OUT_PREDICTIONS]
        if spec.cam_output and self.methods:
            names.append(spec.cam_output)
        for o in spec.activation_outputs:
            names += stat_names(o.layer or "")
        if spec.head.gradients_available:
            names.append(C.OUT_TARGET_INDICES)
            if self.needs_grads:
                names.append(C.OUT_GRADIENTS)
        return names

    def _open_session(self) -> Session:
        try:
            import onnx

            self._proto = onnx.load(str(self.model_path))  # loaded once, pruned per session
            self._main_names = self._main_outputs()
            model = with_stats(self._proto, self.spec, keep=self._main_names)
            sess = open_session(model, self.opts.device, self.opts.threads)
            self._takes_targets = any(i.name == C.IN_TARGETS for i in sess.session.get_inputs())
            return sess
        except Exception as exc:  # DeviceError or onnxruntime's own load failure
            raise RunError(str(exc).splitlines()[0]) from exc

    def _activation_session(self, device: str) -> Session:
        """A second session, pruned to the activations, for the images sinks want them
        for (opened on first use)."""
        if self._acts_sess is None:
            names = [o.name for o in self.spec.activation_outputs]
            model = pruned(self._proto, names)
            self._acts_sess = open_session(model, device, self.opts.threads)
        return self._acts_sess

    def _settings(self, inputs: Sequence[str]) -> dict[str, Any]:
        return {
            "model": str(self.model_path),
            "inputs": list(inputs),
            "cam_methods": self.methods,
            "top_k": self.opts.top_k,
            "classes": [self.spec.class_names[i] for i in self.extra_classes],
            "labels_from_dirs": self.opts.labels_from_dirs,
            "batch_size": self.opts.batch_size,
            "save_maps": self.opts.save_maps,
            "max_pixels": self.opts.max_pixels,
        }

    def _fetch_constants(self) -> dict[str, np.ndarray]:
        if not self.spec.has_output(C.OUT_CAM_WEIGHTS):
            return {}
        names = [C.OUT_CAM_WEIGHTS, C.OUT_CAM_BIAS]
        consts = open_session(pruned(self._proto, names), "cpu")  # constants: no input
        w, b = consts.session.run(names, {})
        return {"weights": w, "bias": b}

    def _next_shard_seq(self) -> int:
        seqs = [
            int(p.name.split(".")[0])
            for p in (self.outdir / "shards").glob("*.json")
            if p.name.split(".")[0].isdigit()
        ]
        return max(seqs, default=-1) + 1

    # -- decoding ----------------------------------------------------------------------
    def _decode_one(self, index: int, path: Path, roots: list[Path], pre: Preprocessor) -> _Decoded:
        rid = image_id(path)
        rec: dict[str, Any] = {"id": rid, "path": str(path), "relpath": _relpath(path, roots)}
        if self.opts.labels_from_dirs:
            label = path.parent.name
            rec["label"] = label
            rec["label_index"] = (
                self.spec.class_names.index(label) if label in self.spec.class_names else None
            )
        try:
            rgb = read_image(path, self.opts.max_pixels)
            tensor = pre(rgb)
        except ImageError as exc:
            rec.update(status="error", error=str(exc))
            return _Decoded(index, path, rec)
        except (MemoryError, ValueError, cv2.error) as exc:  # one input's failure, not the run's
            rec.update(status="error", error=f"cannot process: {type(exc).__name__}: {exc}")
            return _Decoded(index, path, rec)
        rec.update(status="ok", error=None, height=int(rgb.shape[0]), width=int(rgb.shape[1]))
        shown = _display_copy(rgb) if self.sinks else None
        return _Decoded(index, path, rec, shown, tensor)

    def _batches(self, files: list[Path], roots: list[Path]) -> Iterator[list[_Decoded]]:
        pre = Preprocessor(self.spec.input, self.spec.preprocess)
        workers = self.opts.workers or os.cpu_count() or 1
        window = max(self.opts.batch_size * 2, workers * 4)
        batch: list[_Decoded] = []
        with cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
            pending: collections.deque[cf.Future[_Decoded]] = collections.deque()
            it = iter(enumerate(files))
            for i, f in it:
                pending.append(pool.submit(self._decode_one, i, f, roots, pre))
                if len(pending) >= window:
                    break
            while pending:
                d = pending.popleft().result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(pool.submit(self._decode_one, nxt[0], nxt[1], roots, pre))
                batch.append(d)
                n_ok = sum(1 for b in batch if b.tensor is not None)
                if n_ok >= self.opts.batch_size:
                    yield batch
                    batch = []
            if batch:
                yield batch

    # -- inference and maps ------------------------------------------------------------
    def _process(self, sess: Session, batch: list[_Decoded], log: ResultsLog) -> None:
        good = [d for d in batch if d.tensor is not None]
        outcomes: dict[int, ImageOutcome] = {}
        if good:
            x = np.stack([d.tensor for d in good])  # type: ignore[misc]
            for d, oc in zip(good, self._infer(sess, x, good), strict=True):
                outcomes[d.index] = oc
        records = []
        ordered = []
        for d in batch:
            if d.tensor is None:
                self.warn(f"{d.path}: {d.record['error']}")
                oc = ImageOutcome(record=d.record)
            else:
                oc = outcomes[d.index]
            records.append(oc.record)
            ordered.append(oc)
        for s in self.sinks:
            s.on_batch(ordered)
        log.append(records)
        log.sync()
        self._pending_ids.extend(d.record["id"] for d in good)
        self._batches_since_flush += 1
        if self._batches_since_flush >= SHARD_EVERY:
            self._flush_shard()

    def _targets(self, n: int) -> np.ndarray:
        row = [-(r + 1) for r in range(self.opts.top_k)] + self.extra_classes
        return np.tile(np.asarray(row, np.int64), (n, 1))

    def _infer(self, sess: Session, x: np.ndarray, good: list[_Decoded]) -> list[ImageOutcome]:
        spec = self.spec
        layers = [
            (o.name, o.layer or "", tuple(int(v) for v in o.shape[1:]))
            for o in spec.activation_outputs
        ]
        acts_names = [n for n, _, _ in layers]
        names = self._main_names
        targets = self._targets(len(x))
        feeds: dict[str, np.ndarray] = {C.IN_IMAGE: x}
        if self._takes_targets:
            feeds[C.IN_TARGETS] = targets
        out = dict(zip(names, sess.session.run(names, feeds), strict=True))
        probs = out[C.OUT_PREDICTIONS]
        if spec.head.activation == "linear" and probs.shape[1] > 1:
            # a classifier trained from logits: report softmax probabilities
            e = np.exp(probs - probs.max(axis=1, keepdims=True))
            probs = e / e.sum(axis=1, keepdims=True)
        order = np.argsort(-probs, axis=1, kind="stable")
        if C.OUT_TARGET_INDICES in out:
            classes = out[C.OUT_TARGET_INDICES]
        else:
            classes = targets.copy()
            k = self.opts.top_k
            classes[:, :k] = order[:, :k]
        cam_name = spec.cam_output
        acts = out[cam_name] if cam_name else None
        maps: dict[str, np.ndarray] = {}
        for m in self.methods:
            method = METHODS[m]
            maps[m] = method.compute(
                acts,  # type: ignore[arg-type]
                weights=self._weights.get("weights"),
                grads=out.get(C.OUT_GRADIENTS),
                classes=classes,
            )
        for _, layer, shape in layers:
            s_sum, s_max, s_zero = (out[n] for n in stat_names(layer))
            self._pending_stats.update_reduced(layer, shape, s_sum, s_max, s_zero)  # type: ignore[arg-type]
        if self.methods:
            first = normalize(maps[self.methods[0]][:, 0])  # (N, h, w) top-1 class
            for i in range(len(x)):
                key = f"class_{int(classes[i, 0])}"
                if key in self._pending_cams:
                    self._pending_cams[key] += first[i]
                    self._pending_cams["count_" + key] += 1
                else:
                    self._pending_cams[key] = first[i].astype(np.float64)
                    self._pending_cams["count_" + key] = np.ones((), np.float64)

        results = []
        k = self.opts.top_k
        names_ = spec.class_names
        for i, d in enumerate(good):
            rec = d.record
            rec["predictions"] = [
                {"index": int(c), "name": names_[int(c)], "prob": round(float(probs[i, c]), 6)}
                for c in order[i, :k]
            ]
            cls = list(dict.fromkeys(int(c) for c in classes[i]))  # top-k may hold a --class
            rec["cam_classes"] = cls
            rec["cam_methods"] = self.methods
            per_image: dict[tuple[str, int], np.ndarray] = {}
            for m, arr in maps.items():
                if arr.shape[1] == 1 and METHODS[m].class_agnostic:
                    for c in dict.fromkeys(cls):
                        per_image[(m, c)] = arr[i, 0]
                else:
                    for t, c in enumerate(classes[i].tolist()):
                        per_image.setdefault((m, int(c)), arr[i, t])
            if self.opts.save_maps:
                rel = f"maps/{rec['id']}.npz"
                atomic_save_npz(
                    self.outdir / rel, {f"{m}/{c}": v for (m, c), v in per_image.items()}
                )
                rec["maps"] = rel
            else:
                rec["maps"] = None
            results.append(ImageOutcome(record=rec, image=d.image, maps=per_image))
        self._attach_activations(sess, x, acts_names, results)
        return results

    def _attach_activations(
        self,
        sess: Session,
        x: np.ndarray,
        acts_names: list[str],
        results: list[ImageOutcome],
    ) -> None:
        """Give each outcome its activations if a sink wants them for that image.

        A sink may say per image (``wants_activations(record)``, called once per ok
        record, in order); without that method it gets them for every image.  They come
        from a second pass, over just those images, on a session pruned to the
        activations: the main pass never pays for copying them out.
        """
        want = np.zeros(len(results), bool)
        for s in self.sinks:
            ask = getattr(s, "wants_activations", None)
            for i, oc in enumerate(results):
                if ask is None or ask(oc.record):
                    want[i] = True
        if not want.any():
            return
        rows = np.flatnonzero(want)
        acts_sess = self._activation_session(sess.device)
        got = acts_sess.session.run(acts_names, {C.IN_IMAGE: x[rows]})
        acts = dict(zip(acts_names, got, strict=True))
        for j, row in enumerate(rows.tolist()):
            results[row].activations = {n[len(C.ACT_PREFIX) :]: a[j] for n, a in acts.items()}

    # -- statistics shards -------------------------------------------------------------
    def _flush_shard(self) -> None:
        if not self._pending_ids:
            return
        stem = f"{self._seq:06d}"
        shards = self.outdir / "shards"
        self._pending_stats.save_npz(shards / f"{stem}.stats.npz")
        atomic_save_npz(shards / f"{stem}.cams.npz", self._pending_cams)
        atomic_write_json(shards / f"{stem}.json", {"ids": self._pending_ids})
        self._seq += 1
        self._pending_stats = RunStats()
        self._pending_cams = {}
        self._pending_ids = []
        self._batches_since_flush = 0

    def _finish(
        self,
        processed: int,
        skipped: int,
        elapsed: float,
        sess: Session,
        notes: list[str],
        settings: dict[str, Any],
    ) -> RunSummary:
        records = ResultsLog(self.outdir).load()
        ok = sum(1 for r in records if r.get("status") == "ok")
        failed = len(records) - ok
        total_stats = RunStats()
        cams: dict[str, np.ndarray] = {}
        for meta in sorted((self.outdir / "shards").glob("*.json")):
            stem = meta.name[: -len(".json")]
            total_stats.merge(RunStats.load_npz(meta.parent / f"{stem}.stats.npz"))
            with np.load(meta.parent / f"{stem}.cams.npz") as z:
                for key in z.files:
                    cams[key] = cams[key] + z[key] if key in cams else z[key].astype(np.float64)
        atomic_write_json(self.outdir / "stats.json", total_stats.to_json_dict())
        mean_cams = {
            k: (v / cams["count_" + k]).astype(np.float32)
            for k, v in cams.items()
            if k.startswith("class_")
        }
        counts = np.zeros(self.spec.num_classes, np.int64)
        for k in mean_cams:
            counts[int(k[len("class_") :])] = int(cams["count_" + k])
        atomic_save_npz(self.outdir / "class_cams.npz", mean_cams | {"counts": counts})
        summary = RunSummary(
            outdir=self.outdir,
            total=len(records),
            ok=ok,
            failed=failed,
            processed=processed,
            skipped=skipped,
            seconds=elapsed,
            device=sess.device,
            notes=notes,
        )
        atomic_write_json(
            self.outdir / "run.json",
            {
                "model_path": str(self.model_path),
                "spec": asdict(self.spec),
                "settings": settings,
                "fingerprint": self._fingerprint(),
                "summary": {
                    "total": summary.total,
                    "ok": ok,
                    "failed": failed,
                    "processed": processed,
                    "skipped": skipped,
                    "seconds": round(elapsed, 3),
                    "images_per_second": round(summary.images_per_second, 2),
                    "device": sess.device,
                },
            },
        )
        return summary


def run(
    model_path: str | Path,
    inputs: Sequence[str],
    outdir: str | Path,
    options: RunOptions | None = None,
    sinks: Sequence[ResultSink] = (),
    progress: bool = True,
    warn: Callable[[str], None] | None = None,
) -> RunSummary:
    """Run ``model_path`` over ``inputs`` into ``outdir``; see the module docstring."""
    runner = Runner(model_path, outdir, options, sinks, warn=warn, progress=progress)
    return runner.run(inputs)
