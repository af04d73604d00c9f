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
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from .decode import input_roots
from .distributed_worker import Unit, UnitWorker, WorkerSetup, adopt_units, unit_key, unit_records
from .images import discover
from .outdir import Record, ResultsLog
from .plan import RunError, RunOptions
from .results import image_id
from .run import ProgressCallback, ProgressEvent, Runner, RunSummary, metric_sample, metric_summary
from .sinks import ResultSink

LOCAL = "local"  # --ray with no address: start a Ray instance on this machine
BATCHES_PER_UNIT = 8  # --ray-unit's default, in batches
IN_FLIGHT = 2  # units queued on an actor: the next one is there when one ends


def import_ray() -> ModuleType:
    """Ray, imported only when asked for; a one-line error without the extra."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise RunError(
            f"--ray needs Ray ({exc.name or 'ray'} is not installed): pip install 'convlens[ray]'"
        ) from exc
    return ray


@dataclasses.dataclass(frozen=True)
class Placement:
    """Actors and what each one holds: from the cluster's resources unless set."""

    workers: int
    cpus: float
    gpus: float
    device: str  # onnxruntime's, in each actor: "cpu" or "cuda"
    unit: int  # images per unit

    @classmethod
    def of(cls, resources: dict[str, float], options: RunOptions) -> Placement:
        """GPU actors (one GPU, the CPUs per GPU for decoding) with ``--device cuda``,
        or ``auto`` on a cluster with GPUs; else one CPU per actor, one actor per CPU."""
        cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
        if options.device == "cuda" and not gpus:
            raise RunError("--device cuda: the Ray cluster has no GPU")
        unit = options.ray_unit or BATCHES_PER_UNIT * options.batch_size
        if gpus and options.device in ("cuda", "auto"):
            per = max(1, cpus // gpus)
            return cls(options.ray_workers or gpus, per, 1, "cuda", unit)
        return cls(options.ray_workers or max(1, cpus), 1, 0, "cpu", unit)

    def actor_options(self, options: RunOptions) -> RunOptions:
        """One actor's options: its device, and threads for its CPUs."""
        per = max(1, int(self.cpus))
        return dataclasses.replace(
            options,
            device=self.device,
            threads=options.threads or per,
            workers=options.workers or per,
            ray=None,
        )


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
        ray = import_ray()
        with self.dir.locked():
            started = connect(ray, self.options.ray or LOCAL)
            try:
                return self._run_ray(ray, list(inputs), t0)
            finally:
                if started:
                    ray.shutdown()

    def _run_ray(self, ray: ModuleType, inputs: list[str], t0: float) -> RunSummary:
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
        self.dir.write_run_json(plan.model_path, plan.spec, settings, self.fingerprint, None)
        for s in self.sinks:
            s.open(self.outdir, plan.spec, settings)
            expect = getattr(s, "expect", None)
            if expect is not None:
                expect(order, {i: r for i, r in done.items() if r.ok})
        place = Placement.of(ray.cluster_resources(), self.options)
        setup = WorkerSetup(
            model_path=str(plan.model_path),
            options=place.actor_options(self.options),
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
            units = make_units(todo, place.unit)
            for recs in self._merged(ray, setup, place, units, tallies):
                log.append(recs)
                log.sync()
                processed += len(recs)
                for r in recs:
                    if not r.ok:
                        self.warn(f"{r.path}: {r.error}")
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
            for _ in self._merged(ray, setup, place, extra, assets):
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
            device=f"Ray, {len(workers)} worker(s) on {nodes} node(s), {place.device}",
            runtime=", ".join(sorted({t.runtime for t in workers})) or "none",
            notes=notes + lines,
            metrics=metric_summary(records),
        )
        return self._finish(summary, settings)

    def _merged(
        self,
        ray: ModuleType,
        setup: WorkerSetup,
        place: Placement,
        units: list[Unit],
        tallies: dict[tuple[str, int], WorkerTally],
    ) -> Iterator[list[Record]]:
        """Run ``units`` on the actor pool; yield their records in input order (each
        unit once, however often Ray ran it), as soon as every earlier unit is in."""
        if not units:
            return
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
        by_seq = {u.seq: u for u in units}
        pending: dict[int, list[Record]] = {}
        expected = iter(u.seq for u in units)
        nxt = next(expected, None)
        for row in out.iter_rows():
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
            pending[seq] = [] if unit.assets else self._unit_records(unit)
            while nxt is not None and nxt in pending:
                yield pending.pop(nxt)
                nxt = next(expected, None)

    def _unit_records(self, unit: Unit) -> list[Record]:
        recs = unit_records(self.dir.shards / f"{unit.key}.json", self.fingerprint)
        if recs is None:
            raise RunError(f"{self.dir.shards / unit.key}.json: a worker's unit cannot be read")
        return recs


def connect(ray: ModuleType, address: str) -> bool:
    """Join the cluster at ``address`` (``auto``, HOST:PORT, ray://...) or start a local
    instance (``local``); True when this call started the connection (the caller shuts
    it down).  A process already connected (``ray.init`` by the user) is used as is."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if ray.is_initialized():
        return False
    for name in ("ray", "ray.data"):  # Ray's own notes are not the run's
        logging.getLogger(name).setLevel(logging.ERROR)
    kw: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
    try:
        if address == LOCAL:  # a new instance, even where one is running already
            ray.init(address="local", include_dashboard=False, **kw)
        else:
            ray.init(address=address, **kw)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise RunError(f"cannot start or join Ray at {address}: {first}") from exc
    return True


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
