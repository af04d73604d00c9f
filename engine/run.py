"""The main job: an analysis ONNX over any number of images, streaming, batched, resumable.

Pipeline
    decode + preprocess in a pool of threads (OpenCV releases the GIL), a bounded
    window of pending images so memory stays flat  ->  fixed-size batches  ->
    onnxruntime (CUDA or CPU)  ->  CAM methods vectorised over the batch  ->
    records appended to results.jsonl, maps (``save_maps``), statistics shards, sinks.

Resume
    Records go to results.jsonl as each batch finishes; activation statistics are
    flushed as a shard every few batches, each shard naming the ids it covers.  On a
    new run, ok records that no complete shard covers, or whose per-image files (maps,
    a sink's files) are missing, are dropped and recomputed, and every input that has a
    record is skipped: killed at any point and run again, the run finishes with nothing
    lost and nothing counted twice.

Exit status (see :attr:`RunSummary.exit_code`): 0 every input succeeded, 1 at least
one input failed (the others were processed), 2 the run could not start.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import hashlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .decode import Decoded, DecodePool, input_roots
from .images import discover
from .infer import Forward, Inference
from .outdir import Record, ResultsLog, iter_results
from .plan import RunError, RunOptions, RunPlan
from .results import image_id
from .rundir import RunDir, file_sha1
from .sinks import ImageOutcome, ResultSink
from .stats import ClassCAMs, RunStats

__all__ = ["ProgressEvent", "RunError", "RunOptions", "RunSummary", "Runner", "run"]

SHARD_EVERY = 8  # batches per statistics shard


@dataclass(frozen=True)
class ProgressEvent:
    """Sent after every batch: images done by this run, of ``total`` to do."""

    done: int
    total: int
    elapsed: float

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0


ProgressCallback = Callable[[ProgressEvent], None]


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
    runtime: str = "onnxruntime"  # what ran the graph (Session.label: "openvino bf16")
    notes: list[str] = field(default_factory=list)
    #: --metrics: per CAM method, the mean of every score over the scored images
    metrics: dict[str, Any] = field(default_factory=dict)

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
            f"{self.images_per_second:.1f} img/s on {self.device} via {self.runtime}"
        )

    def to_json(self) -> dict[str, Any]:
        """run.json's summary."""
        return {
            "total": self.total,
            "ok": self.ok,
            "failed": self.failed,
            "processed": self.processed,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
            "device": self.device,
            "runtime": self.runtime,
            **({"metrics": self.metrics} if self.metrics else {}),
        }


class _Shard:
    """Statistics and class CAMs of the batches since the last flush, with their ids."""

    def __init__(self, seq: int):
        self.seq = seq
        self.stats = RunStats()
        self.cams = ClassCAMs()
        self.ids: list[str] = []
        self.batches = 0


class Runner:
    """One run of the engine.  Use :func:`run` unless you need the pieces."""

    def __init__(
        self,
        model_path: str | Path,
        outdir: str | Path,
        options: RunOptions | None = None,
        sinks: Sequence[ResultSink] = (),
        warn: Callable[[str], None] | None = None,
        progress: ProgressCallback | None = None,
    ):
        self.plan = RunPlan.build(model_path, options)
        self.fingerprint = self.plan.fingerprint(file_sha1(self.plan.model_path))
        self.dir = RunDir(outdir, self.fingerprint)
        self.sinks = list(sinks)
        self.warn = warn or _stderr
        self.progress = progress

    @property
    def outdir(self) -> Path:
        return self.dir.path

    def run(self, inputs: Sequence[str]) -> RunSummary:
        t0 = time.perf_counter()
        if not inputs:
            raise RunError("no input given: name image files, directories or globs")
        inference = Inference(self.plan, self.outdir, self.sinks)  # fails before --force
        try:
            with self.dir.locked():
                return self._run_locked(inference, list(inputs), t0)
        finally:
            inference.close()

    def _run_locked(self, inference: Inference, inputs: list[str], t0: float) -> RunSummary:
        plan = self.plan
        run_json = self.dir.prepare(plan.force, plan.save_maps, self.fingerprint)
        found = discover(inputs)
        order = [image_id(f) for f in found.files]  # the stream's order
        inference.metric_ids = metric_sample(order, plan.metrics_sample)
        log = ResultsLog(self.outdir)
        done, repaired = self.dir.resume(log, lambda recs: self._lacking(order, recs), run_json)
        roots = input_roots(inputs, found.files)
        notes = [n for n in (inference.note, repaired) if n]
        for n in notes:
            self.warn(n)
        problems = []
        for raw, reason in found.problems:
            path = os.path.abspath(raw)
            problem = Record(id=image_id(path), path=path, relpath=raw)
            problem.fail(reason)
            problems.append(problem)
            self.warn(f"{raw}: {reason}")
        if problems:
            log.append(problems)
            done.update((p.id, p) for p in problems)

        todo = [f for f in found.files if image_id(f) not in done]
        settings = plan.settings(inputs)
        self._start(settings, order, done)
        shard = _Shard(self.dir.next_shard_seq())
        pool = DecodePool(plan, keep_images=bool(self.sinks), device=inference.device)
        processed = 0
        try:
            for batch, fwd in forward_ahead(pool.batches(todo, roots), inference):
                self._process(inference, batch, fwd, log, shard)
                processed += len(batch)
                if shard.batches >= SHARD_EVERY:
                    shard = self._flush(shard)
                if self.progress is not None:
                    self.progress(ProgressEvent(processed, len(todo), time.perf_counter() - t0))
            self._flush(shard)
        finally:
            log.close()
        total = ok = 0
        scored = []  # the records with faithfulness scores (--metrics), for their means
        for r in iter_results(self.outdir):  # streamed: flat memory at any size
            total += 1
            ok += r.ok
            if r.ok and r.metrics:
                scored.append(r)
        summary = RunSummary(
            outdir=self.outdir,
            total=total,
            ok=ok,
            failed=total - ok,
            processed=processed + len(problems),
            skipped=len(found.files) - len(todo),
            seconds=time.perf_counter() - t0,
            device=inference.device,
            runtime=inference.session.label,
            notes=notes,
            metrics=metric_summary(scored),
        )
        return self._finish(summary, settings)

    def _start(self, settings: dict[str, Any], order: list[str], done: dict[str, Record]) -> None:
        """run.json without a summary, and the sinks opened, each told the run's input
        order and the ok records already done (a local run's start, and a Ray run's)."""
        plan = self.plan
        self.dir.write_run_json(plan.model_path, plan.spec, settings, self.fingerprint, None)
        for s in self.sinks:
            s.open(self.outdir, plan.spec, settings)
            expect = getattr(s, "expect", None)
            if expect is not None:
                expect(order, {i: r for i, r in done.items() if r.ok})

    def _finish(self, summary: RunSummary, settings: dict[str, Any]) -> RunSummary:
        """stats.json and class_cams.npz from the shards, run.json with the summary,
        the sinks closed (a local run's end, and a run on Ray's)."""
        plan = self.plan
        self.dir.merge_shards(plan.spec.num_classes)
        self.dir.write_run_json(
            plan.model_path, plan.spec, settings, self.fingerprint, summary.to_json()
        )
        for s in self.sinks:
            s.close(asdict(summary) | {"outdir": str(self.outdir)})
        return summary

    def _lacking(self, order: list[str], records: dict[str, Record]) -> set[str]:
        """Ids of done records whose sink files are missing (see ResultSink)."""
        missing: set[str] = set()
        for s in self.sinks:
            ask = getattr(s, "missing", None)
            if ask is not None:
                missing |= ask(self.outdir, self.plan.spec, order, records)
        return missing

    def _process(
        self,
        inference: Inference,
        batch: list[Decoded],
        fwd: cf.Future[Forward] | None,
        log: ResultsLog,
        shard: _Shard,
    ) -> None:
        good = [d for d in batch if d.tensor is not None]
        outcomes: dict[int, ImageOutcome] = {}
        if fwd is not None:
            done = inference.finish(fwd.result(), shard.stats, shard.cams)
            for d, oc in zip(good, done, strict=True):
                outcomes[d.index] = oc
        ordered = []
        for d in batch:
            if d.tensor is None:
                self.warn(f"{d.path}: {d.record.error}")
                ordered.append(ImageOutcome(record=d.record))
            else:
                ordered.append(outcomes[d.index])
        for s in self.sinks:
            s.on_batch(ordered)
        log.append([oc.record for oc in ordered])
        log.sync()
        shard.ids.extend(d.record.id for d in good)
        shard.batches += 1

    def _flush(self, shard: _Shard) -> _Shard:
        if shard.ids:
            self.dir.write_shard(shard.seq, shard.stats, shard.cams, shard.ids)
            return _Shard(shard.seq + 1)
        return shard


#: batches whose forward pass runs ahead of the one being finished (0: each batch's pass
#: runs when the runner reaches it, as before; benchmarks/bench_pipeline.py's lever)
FORWARD_AHEAD = 1


def forward_ahead(
    batches: Iterator[list[Decoded]], inference: Inference
) -> Iterator[tuple[list[Decoded], cf.Future[Forward] | None]]:
    """Each batch with its forward pass (:meth:`Inference.forward`, None: nothing
    decodable) started on a thread of its own one batch ahead: batch k+1's session
    runs while the caller finishes batch k (records, files, sinks) and the decode pool
    fills batch k+2.  At most two batches are in flight; on an exception or an early
    exit the pass under way is waited for, not abandoned, and the one queued dropped."""
    ex = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="infer")
    held: collections.deque[tuple[list[Decoded], cf.Future[Forward] | None]] = collections.deque()
    try:
        for batch in batches:
            good = [d for d in batch if d.tensor is not None]
            held.append((batch, ex.submit(inference.forward, good) if good else None))
            if len(held) > FORWARD_AHEAD:
                yield held.popleft()
        while held:
            yield held.popleft()
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


METRIC_SEED = 0


def metric_sample(order: list[str], n: int | None) -> set[str] | None:
    """The ids --metrics-sample N scores: the N inputs whose
    ``sha1(f"{METRIC_SEED}:{id}")`` is smallest, so the same images whatever the
    order, batches or resumes (None: every image)."""
    if n is None:
        return None

    def key(i: str) -> str:
        return hashlib.sha1(f"{METRIC_SEED}:{i}".encode()).hexdigest()

    return set(sorted(set(order), key=key)[:n])


def metric_summary(records: list[Record]) -> dict[str, Any]:
    """run.json's ``summary.metrics``: per method, ``n`` (images scored), the mean of
    every score, and ``curves`` (the mean deletion and insertion curves)."""
    scored: dict[str, list[Record]] = {}
    for r in records:
        for m in r.metrics if r.ok else ():
            scored.setdefault(m, []).append(r)
    out: dict[str, Any] = {}
    for m, recs in scored.items():
        names = dict.fromkeys(k for r in recs for k in r.metrics[m])
        means = {
            k: round(float(np.mean([r.metrics[m][k] for r in recs if k in r.metrics[m]])), 6)
            for k in names
        }
        curves: dict[str, list[float]] = {}
        for k in dict.fromkeys(k for r in recs for k in r.metric_curves.get(m, {})):
            rows = [r.metric_curves[m][k] for r in recs if k in r.metric_curves.get(m, {})]
            if len({len(c) for c in rows}) == 1:
                curves[k] = [round(float(v), 5) for v in np.mean(rows, axis=0)]
        out[m] = {"n": len(recs), **means, "curves": curves}
    return out


def _stderr(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr)


def run(
    model_path: str | Path,
    inputs: Sequence[str],
    outdir: str | Path,
    options: RunOptions | None = None,
    sinks: Sequence[ResultSink] = (),
    progress: ProgressCallback | bool | None = None,
    warn: Callable[[str], None] | None = None,
) -> RunSummary:
    """Run ``model_path`` over ``inputs`` into ``outdir``; see the module docstring.

    ``progress`` is called with a :class:`ProgressEvent` after every batch (the CLI
    draws its bar from them); ``None`` or ``False``: no events.
    """
    callback = progress if callable(progress) else None
    if options is not None and options.ray is not None:  # on a Ray cluster (the [ray] extra)
        from .distributed import run_ray

        return run_ray(model_path, inputs, outdir, options, sinks, callback, warn)
    runner = Runner(model_path, outdir, options, sinks, warn=warn, progress=callback)
    return runner.run(inputs)
