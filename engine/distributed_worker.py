"""The worker side of a run on Ray (:mod:`convlens.engine.distributed`): one actor holds
one model session (onnxruntime or OpenVINO, as the run picks) and turns units of image
paths into unit files.

A unit is a run of consecutive inputs (in the run's input order).  Its name is
``u-`` + the first 16 hex digits of ``sha1("\\n".join(ids))`` over the ids of the inputs
it covers, so a task that Ray retries (its actor died) writes the same names again and
replaces, never adds.  The worker reads and decodes the images itself (only paths travel
through the driver), writes ``maps/<id>.npz`` (``--save-maps``) and the sinks' files
(the report's thumbnails, heatmaps, grids) where the images are decoded, and last the
unit, atomically, in the form of a statistics shard (OUTDIR.md)::

    shards/u-<key>.stats.npz   activation statistics of the unit's ok images
    shards/u-<key>.cams.npz    class CAM sums and counts
    shards/u-<key>.json        {"ids": ok ids, "fingerprint", "inputs": every id,
                                "lines": the unit's results.jsonl lines, "errors":
                                [path, reason] of its failed inputs, "worker": where}

so that the engine's resume treats a unit exactly as it treats a local run's shard, and
a unit whose records the driver had not yet appended to results.jsonl when it died is
adopted by the next run (:func:`adopt_units`).  Bad inputs are error records, never a
task failure.  This module imports no Ray: an actor is a plain callable class.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .decode import DecodePool
from .infer import Inference
from .outdir import Record, ResultsLog, read_results, record_lines
from .plan import RunOptions, RunPlan
from .results import atomic_save_npz, atomic_write_json
from .rundir import RunDir
from .sinks import ImageOutcome, ResultSink
from .stats import ClassCAMs, RunStats

UNIT_PREFIX = "u-"


def unit_key(ids: Sequence[str]) -> str:
    """A unit's name: ``u-`` + the first 16 hex digits of sha1 of its ids, one a line."""
    return UNIT_PREFIX + hashlib.sha1("\n".join(ids).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Unit:
    """One task: ``paths`` (absolute) in input order, with their ids and ``seq``, the
    unit's place in the run.  ``assets``: only (re)write the sinks' files of these
    images (no records, no unit file), e.g. the report's first-images grid sample."""

    seq: int
    key: str
    paths: tuple[str, ...]
    assets: bool = False

    def to_row(self) -> dict[str, str]:
        return {"unit": json.dumps([self.seq, self.key, list(self.paths), self.assets])}

    @classmethod
    def from_row(cls, raw: Any) -> Unit:
        seq, key, paths, assets = json.loads(str(raw))
        return cls(int(seq), str(key), tuple(paths), bool(assets))


@dataclass(frozen=True)
class WorkerSetup:
    """What every actor is built from (pickled once per actor by Ray)."""

    model_path: str
    options: RunOptions  # device, threads and decode workers already set for one actor
    outdir: str
    fingerprint: dict[str, Any]
    roots: tuple[str, ...]  # what relpaths are relative to (engine.decode.input_roots)
    sinks: tuple[ResultSink, ...] = ()  # copies for a worker (their for_worker())
    asset_sinks: tuple[ResultSink, ...] = ()  # for assets-only units
    metric_ids: frozenset[str] | None = None  # --metrics-sample: the ids scored


class UnitWorker:
    """The callable class of Ray Data's ``map_batches``: each row is one :class:`Unit`;
    returns one row per unit: ``seq``, ``key``, ``images``, ``ok``, ``seconds`` (busy
    time), and where it ran (``host``, ``ip``, ``pid``, ``device``)."""

    def __init__(self, setup: WorkerSetup):
        self.setup = setup
        self.outdir = Path(setup.outdir)
        self.plan = RunPlan.build(setup.model_path, setup.options)
        self.dir = RunDir(self.outdir, setup.fingerprint)
        for s in (*setup.sinks, *setup.asset_sinks):
            attach = getattr(s, "attach", None)
            if attach is not None:
                attach(self.outdir)
        self.inference = Inference(self.plan, self.outdir, setup.sinks)
        self.inference.metric_ids = None if setup.metric_ids is None else set(setup.metric_ids)
        keep = bool(setup.sinks or setup.asset_sinks)
        self.pool = DecodePool(self.plan, keep_images=keep, device=self.inference.device)
        self.roots = [Path(r) for r in setup.roots]
        self.where = where(self.inference.device, self.inference.session.label)
        self.where["note"] = self.inference.note or ""  # e.g. no CUDA there: on the CPU

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self.unit(Unit.from_row(raw)) for raw in batch["unit"]]
        return {k: np.asarray([r[k] for r in rows]) for k in rows[0]}

    def unit(self, unit: Unit) -> dict[str, Any]:
        """Process one unit; its files are written before this returns."""
        t0 = time.perf_counter()
        sinks = self.setup.asset_sinks if unit.assets else self.setup.sinks
        self.inference.sinks = list(sinks)
        stats, cams = RunStats(), ClassCAMs()
        records: list[Record] = []
        ok_ids: list[str] = []
        for batch in self.pool.batches([Path(p) for p in unit.paths], self.roots):
            good = [d for d in batch if d.tensor is not None]
            done = iter(self.inference.run(good, stats, cams) if good else [])
            outcomes = [
                next(done) if d.tensor is not None else ImageOutcome(d.record) for d in batch
            ]
            for s in sinks:
                s.on_batch(outcomes)
            records += [oc.record for oc in outcomes]
            ok_ids += [d.record.id for d in good]
        for s in sinks:  # their files are on disk before the unit says so
            flush = getattr(s, "flush", None)
            if flush is not None:
                flush()
        if not unit.assets:
            write_unit(self.dir, unit, stats, cams, ok_ids, records, self.where)
        seconds = time.perf_counter() - t0
        return {"seq": unit.seq, "key": unit.key, "images": len(records), "ok": len(ok_ids)} | {
            "seconds": seconds,
            **self.where,
        }


def where(device: str, runtime: str) -> dict[str, Any]:
    """Where this worker runs: host name, node IP, process id, device and runtime."""
    host = socket.gethostname()
    try:
        ip = socket.gethostbyname(host)
    except OSError:
        ip = "?"
    return {"host": host, "ip": ip, "pid": os.getpid(), "device": device, "runtime": runtime}


def write_unit(
    rundir: RunDir,
    unit: Unit,
    stats: RunStats,
    cams: ClassCAMs,
    ok_ids: list[str],
    records: list[Record],
    worker: dict[str, Any],
) -> None:
    """The unit's arrays first, then its json: a unit counts only once that is there."""
    shards = rundir.shards
    stats.save_npz(shards / f"{unit.key}.stats.npz")
    atomic_save_npz(shards / f"{unit.key}.cams.npz", cams.to_arrays())
    doc = {
        "ids": ok_ids,
        "fingerprint": rundir.fingerprint,
        "inputs": [r.id for r in records],
        "lines": record_lines(records).decode("ascii"),  # the driver appends them as is
        "errors": [[r.path, r.error] for r in records if not r.ok],
        "worker": worker,
    }
    atomic_write_json(shards / f"{unit.key}.json", doc)


@dataclass(frozen=True)
class UnitLines:
    """What the driver merges of a unit: its results.jsonl lines, how many, and the
    failed inputs' paths and reasons (said on the terminal)."""

    lines: bytes
    count: int
    errors: list[tuple[str, str]]


def unit_lines(path: Path, fingerprint: dict[str, Any] | None = None) -> UnitLines | None:
    """A unit file's lines; None when it is not a readable unit (or, given a
    ``fingerprint``, another run's)."""
    try:
        doc = json.loads(path.read_bytes())
        if fingerprint is not None and doc.get("fingerprint") != fingerprint:
            return None
        lines = doc["lines"].encode("ascii")
        errors = [(str(p), str(e)) for p, e in doc["errors"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if lines and not lines.endswith(b"\n"):
        return None
    return UnitLines(lines, lines.count(b"\n"), errors)


def unit_records(path: Path, fingerprint: dict[str, Any] | None = None) -> list[Record] | None:
    """The records a unit file holds; None when it is not a readable unit."""
    got = unit_lines(path, fingerprint)
    try:
        return (
            None
            if got is None
            else [Record.from_json(json.loads(x)) for x in got.lines.splitlines()]
        )
    except ValueError:
        return None


def adopt_units(rundir: RunDir, log: ResultsLog) -> int:
    """Append to results.jsonl the records of units that a driver killed before it
    merged them (their ids have no record); returns how many records.  Run before the
    engine's resume, which then keeps them: their unit covers them."""
    have = {r.id for r in read_results(rundir.path, repair=True).records}
    adopted = 0
    for meta in sorted(rundir.shards.glob(f"{UNIT_PREFIX}*.json")):
        records = unit_records(meta, rundir.fingerprint) or []  # else resume drops it
        new = [r for r in records if r.id not in have]
        if new:
            log.append(new)
            have.update(r.id for r in new)
            adopted += len(new)
    log.close()
    return adopted
