"""The same run on Ray (``convlens run ... --ray [ADDRESS]``, ``RunOptions(ray=...)``):
the same OUTDIR as a local run over the same inputs, exactly once.

Driver (this module)
    discovers the inputs, resumes OUTDIR as a local run does, cuts the inputs still to do
    into units of consecutive inputs (``--ray-unit``) and hands only their paths to a Ray
    Data pipeline: ``map_batches`` over an actor pool of
    :class:`~convlens.engine.distributed_worker.UnitWorker` (one model session
    each, CPU or one GPU).  As units finish it appends their records to results.jsonl in
    input order, draws progress (images, img/s, ETA), and at the end merges the units
    with the shards (stats.json, class_cams.npz), writes run.json and closes the sinks;
    ``convlens run`` then renders the report as after a local run.
Workers
    read and decode the images, run the model, write maps and the sinks' files (the
    report's assets) there, and last their unit (see the worker module).
Exactly once
    a unit's files are named by the ids it covers, so a retried task (Ray restarts a
    dead actor and retries its tasks) replaces them; the driver merges a unit once
    (by its place); a unit the driver had not merged when it died is adopted by the
    next run, and the engine's resume (units are shards to it) does the rest.
Report assets
    a worker's sink decides per record only (``for_worker()``); what needs the whole
    run (the report's first-images grid sample) is what the driver's sink says is
    ``missing`` at the end, made by a short second pass of assets-only units.

Cost per image, beyond the local engine's: one row per unit through Ray Data (a task:
~ms), the unit's files (3 small writes per unit), the driver's JSON read of each unit.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .decode import input_roots
from .distributed_cluster import Pool, import_ray
from .distributed_worker import (
    Unit,
    UnitLines,
    UnitWorker,
    WorkerSetup,
    adopt_units,
    unit_key,
    unit_lines,
)
from .images import discover
from .outdir import Record, ResultsLog
from .plan import RunError, RunOptions
from .results import image_id
from .run import ProgressCallback, ProgressEvent, Runner, RunSummary, metric_sample, metric_summary
from .sinks import ResultSink

BATCHES_PER_UNIT = 8  # --ray-unit's default, in batches
IN_FLIGHT = 2  # units queued on an actor: the next one is there when one ends


def unit_size(options: RunOptions) -> int:
    """Images per unit: ``--ray-unit``, or :data:`BATCHES_PER_UNIT` batches."""
    return options.ray_unit or BATCHES_PER_UNIT * options.batch_size


@dataclasses.dataclass
class WorkerTally:
    """What one worker process did: images, busy seconds, where it ran."""

    host: str
    ip: str
    pid: int
    device: str
    runtime: str
    images: int = 0
    seconds: float = 0.0

    def line(self, name: str) -> str:
        rate = self.images / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{name}: {self.images} images, {rate:.1f} img/s busy, "
            f"pid {self.pid} on {self.host} ({self.ip}), {self.device} via {self.runtime}"
        )


class RayRunner(Runner):
    """A :class:`Runner` whose images are processed by a Ray actor pool."""

    def __init__(
        self,
        model_path: str | Path,
        outdir: str | Path,
        options: RunOptions,
        sinks: Sequence[ResultSink] = (),
        warn: Callable[[str], None] | None = None,
        progress: ProgressCallback | None = None,
    ):
        super().__init__(model_path, outdir, options, sinks, warn=warn, progress=progress)
        self.options = options
        self.seen_notes: set[str] = set()

    def run(self, inputs: Sequence[str]) -> RunSummary:
        t0 = time.perf_counter()
        if not inputs:
            raise RunError("no input given: name image files, directories or globs")
        pool = Pool(import_ray(), self.options)
        with self.dir.locked():
            try:
                return self._run_ray(pool, list(inputs), t0)
            finally:
                pool.close()

    def _run_ray(self, pool: Pool, inputs: list[str], t0: float) -> RunSummary:
        plan = self.plan
        run_json = self.dir.prepare(plan.force, plan.save_maps, self.fingerprint)
        log = ResultsLog(self.outdir)
        adopted = adopt_units(self.dir, log)
        found = discover(inputs)
        order = [image_id(f) for f in found.files]
        done, repaired = self.dir.resume(log, lambda recs: self._lacking(order, recs), run_json)
        notes = [n for n in (repaired,) if n]
        if adopted:
            notes.append(f"{self.outdir}: {adopted} result(s) of an interrupted run merged")
        for note in notes:
            self.warn(note)
        problems = problem_records(found.problems, self.warn)
        log.append(problems)
        done.update((p.id, p) for p in problems)
        todo = [str(f) for f in found.files if image_id(f) not in done]
        settings = plan.settings(inputs)
        self._start(settings, order, done)
        pool.setup = WorkerSetup(
            model_path=str(plan.model_path),
            options=self.options,  # made one actor's by the pool
            outdir=str(self.outdir.resolve()),
            fingerprint=self.fingerprint,
            roots=tuple(str(r) for r in input_roots(inputs, found.files)),
            sinks=tuple(worker_sink(s, assets_only=False) for s in self.sinks),
            asset_sinks=tuple(worker_sink(s, assets_only=True) for s in self.sinks),
            metric_ids=_frozen(metric_sample(order, plan.metrics_sample)),
        )
        tallies: dict[tuple[str, int], WorkerTally] = {}
        assets: dict[tuple[str, int], WorkerTally] = {}  # the second pass, if any
        processed = 0
        try:
            units = make_units(todo, unit_size(self.options))
            for got in self._merged(pool, units, tallies):
                # no fsync per unit: the units are durable, and a next run adopts any
                # whose lines a crash took from results.jsonl (fsynced at the end)
                log.append_lines(got.lines)
                processed += got.count
                for path, error in got.errors:
                    self.warn(f"{path}: {error}")
                if self.progress is not None:
                    elapsed = time.perf_counter() - t0
                    self.progress(ProgressEvent(processed, len(todo), elapsed))
        finally:
            log.close()
        records = ResultsLog(self.outdir).load()
        ok = {r.id: r for r in records if r.ok}
        # what the sinks still lack, now that every input is known to be ok or not (the
        # report's grid sample: the first ok images, beyond the places a worker knew)
        lacking = self._lacking([i for i in order if i in ok], ok)
        if lacking:
            redo = [i for i in dict.fromkeys(order) if i in lacking]
            paths = [ok[i].path for i in redo]
            extra = [Unit(-1, unit_key(redo), tuple(paths), assets=True)]
            for _ in self._merged(pool, extra, assets):
                pass
        workers = sorted(tallies.values(), key=lambda t: (t.host, t.pid))
        lines = [t.line(f"worker {n}") for n, t in enumerate(workers, 1)]
        lines += [t.line("report assets") for t in assets.values()]
        for line in lines:
            self.warn(line)
        nodes = len({t.ip for t in workers})
        summary = RunSummary(
            outdir=self.outdir,
            total=len(records),
            ok=len(ok),
            failed=len(records) - len(ok),
            processed=processed + len(problems),
            skipped=len(found.files) - len(todo),
            seconds=time.perf_counter() - t0,
            device=f"Ray, {len(workers)} worker(s) on {nodes} node(s)"
            if workers
            else "Ray (nothing left to run: not started)",
            runtime=", ".join(sorted({f"{t.device} {t.runtime}" for t in workers})) or "-",
            notes=notes + lines,
            metrics=metric_summary(records),
        )
        return self._finish(summary, settings)

    def _merged(
        self,
        pool: Pool,
        units: list[Unit],
        tallies: dict[tuple[str, int], WorkerTally],
    ) -> Iterator[UnitLines]:
        """Run ``units`` on the actor pool; yield their lines in input order (each
        unit once, however often Ray ran it), as soon as every earlier unit is in."""
        if not units:
            return
        ray, place, setup = pool.ready()
        ds = ray.data.from_items([u.to_row() for u in units], override_num_blocks=len(units))
        out = ds.map_batches(
            UnitWorker,
            fn_constructor_args=(setup,),
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(
                size=min(place.workers, len(units)), max_tasks_in_flight_per_actor=IN_FLIGHT
            ),
            num_cpus=place.cpus,
            num_gpus=place.gpus or None,
        )
        try:
            yield from self._in_order(out.iter_rows(), units, tallies)
        except ray.exceptions.RayError as exc:  # a worker's bug, or the cluster gone
            lines = [ln for ln in str(exc).splitlines() if ln.strip()]
            last = lines[-1].strip() if lines else type(exc).__name__
            raise RunError(f"the Ray run failed ({type(exc).__name__}): {last[:300]}") from exc

    def _in_order(
        self,
        rows: Iterator[dict[str, Any]],
        units: list[Unit],
        tallies: dict[tuple[str, int], WorkerTally],
    ) -> Iterator[UnitLines]:
        """The lines of each unit once, in input order, as the rows come."""
        by_seq = {u.seq: u for u in units}
        pending: dict[int, UnitLines] = {}
        expected = iter(u.seq for u in units)
        nxt = next(expected, None)
        for row in rows:
            seq = int(row["seq"])
            if seq in pending or seq not in by_seq:
                continue
            note = str(row["note"])
            if note and note not in self.seen_notes:  # a worker's, once per run
                self.seen_notes.add(note)
                self.warn(f"{row['host']}: {note}")
            tally = tallies.setdefault(
                (str(row["ip"]), int(row["pid"])),
                WorkerTally(
                    str(row["host"]),
                    str(row["ip"]),
                    int(row["pid"]),
                    str(row["device"]),
                    str(row["runtime"]),
                ),
            )
            tally.images += int(row["images"])
            tally.seconds += float(row["seconds"])
            unit = by_seq.pop(seq)
            pending[seq] = UnitLines(b"", 0, []) if unit.assets else self._unit_lines(unit)
            while nxt is not None and nxt in pending:
                yield pending.pop(nxt)
                nxt = next(expected, None)

    def _unit_lines(self, unit: Unit) -> UnitLines:
        got = unit_lines(self.dir.shards / f"{unit.key}.json", self.fingerprint)
        if got is None:
            raise RunError(f"{self.dir.shards / unit.key}.json: a worker's unit cannot be read")
        return got


def make_units(paths: list[str], size: int) -> list[Unit]:
    """Consecutive runs of ``size`` inputs, in input order, named by their ids."""
    units = []
    for seq, start in enumerate(range(0, len(paths), size)):
        chunk = paths[start : start + size]
        units.append(Unit(seq, unit_key([image_id(p) for p in chunk]), tuple(chunk)))
    return units


def worker_sink(sink: ResultSink, assets_only: bool) -> ResultSink:
    """The copy of ``sink`` a worker writes with: its ``for_worker(assets_only)`` where
    it has one (the report's: see ReportAssetSink.for_worker), else the sink itself."""
    make = getattr(sink, "for_worker", None)
    return sink if make is None else make(assets_only)  # type: ignore[no-any-return]


def problem_records(
    problems: Sequence[tuple[str, str]], warn: Callable[[str], None]
) -> list[Record]:
    """Error records of the inputs discovery refused (as a local run writes them)."""
    out = []
    for raw, reason in problems:
        path = os.path.abspath(raw)
        rec = Record(id=image_id(path), path=path, relpath=raw)
        rec.fail(reason)
        out.append(rec)
        warn(f"{raw}: {reason}")
    return out


def _frozen(ids: set[str] | None) -> frozenset[str] | None:
    return None if ids is None else frozenset(ids)


def run_ray(
    model_path: str | Path,
    inputs: Sequence[str],
    outdir: str | Path,
    options: RunOptions,
    sinks: Sequence[ResultSink] = (),
    progress: ProgressCallback | None = None,
    warn: Callable[[str], None] | None = None,
) -> RunSummary:
    """:func:`convlens.engine.run.run` on Ray: ``options.ray`` is ``"local"`` (start a
    Ray instance here), ``"auto"`` or ``HOST:PORT`` (join a cluster)."""
    runner = RayRunner(model_path, outdir, options, sinks, warn=warn, progress=progress)
    return runner.run(inputs)
