"""convlens on Ray against the single-process engine, on this machine's cores (issue 12).

    python benchmarks/bench_ray.py [--images 768] [--repeats 3] [--unit 64]

The benchmark's small model and 640x480 photos (bench_data: the model is exported once
and cached), ``report=False``, device cpu.  Rows, in one process, repeats interleaved
(medians):

  L2  the local engine, the default run (all cores)
  L1  the local engine on one core (``threads=1``, one decode thread): one actor's share
  R1  on Ray, 1 actor (1 CPU);  R2  on Ray, 2 actors (1 CPU each)

on one local Ray instance with this machine's CPUs, started once (its start is timed
apart).  Per row: wall img/s (model loading, Ray Data's start and the actors' included),
steady img/s (from the first merged unit to the last) and, on Ray, busy img/s (the
actors' own time in their units).  Then where a Ray run's time per image goes:

  actor in-process   the actor's code without Ray (UnitWorker called here): decoding in
                     one thread, the model, the unit's files
  unit files         write_unit alone, per unit (3 atomic, fsynced files)
  driver merge       reading a unit's lines and appending them to results.jsonl
  Ray dispatch       1/steady - 1/busy: what the actor waits between units

Writes benchmarks/RAY.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_data  # noqa: E402
import numpy as np  # noqa: E402

from convlens.engine.distributed import RayRunner, make_units  # noqa: E402
from convlens.engine.distributed_cluster import connect  # noqa: E402
from convlens.engine.distributed_worker import (  # noqa: E402
    UnitWorker,
    WorkerSetup,
    unit_lines,
    unit_records,
    write_unit,
)
from convlens.engine.outdir import ResultsLog  # noqa: E402
from convlens.engine.plan import RunOptions  # noqa: E402
from convlens.engine.run import Runner  # noqa: E402
from convlens.engine.rundir import RunDir, file_sha1  # noqa: E402
from convlens.engine.stats import ClassCAMs, RunStats  # noqa: E402

ROWS = {
    "L2": "local engine, all cores",
    "L1": "local engine, one core (threads=1, 1 decode thread)",
    "R1": "Ray, 1 actor x 1 CPU",
    "R2": "Ray, 2 actors x 1 CPU",
}


def one_run(row: str, model: Path, folder: Path, unit: int) -> dict[str, float]:
    """Seconds of one run over ``folder`` (a fresh OUTDIR) and the actors' busy img/s."""
    out = Path(tempfile.mkdtemp(prefix=f"bench_ray_{row}_"))
    opts = RunOptions(device="cpu", force=True)
    if row == "L1":
        opts = RunOptions(device="cpu", force=True, threads=1, workers=1)
    if row.startswith("R"):
        opts = RunOptions(
            device="cpu", force=True, ray="local", ray_workers=int(row[1]), ray_unit=unit
        )
    runner_cls = RayRunner if row.startswith("R") else Runner
    runner = runner_cls(model, out, opts, warn=lambda m: None)
    t0 = time.perf_counter()
    summary = runner.run([str(folder)])
    seconds = time.perf_counter() - t0
    busy = float("nan")
    lines = [n for n in summary.notes if n.startswith("worker ")]
    if lines:  # "worker 1: N images, X img/s busy, ..." -> the actors' summed rates
        busy = sum(float(n.split(", ")[1].split()[0]) for n in lines)
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": seconds, "busy": busy}


def marginal(
    small: dict[str, float], big: dict[str, float], n_small: int, n_big: int
) -> dict[str, float]:
    """img/s of the images beyond the small run's (fixed costs cancel) and those fixed
    seconds (model loading, Ray Data's and the actors' start)."""
    rate = (n_big - n_small) / (big["seconds"] - small["seconds"])
    return {
        "wall": n_big / big["seconds"],
        "marginal": rate,
        "fixed": big["seconds"] - n_big / rate,
        "busy": big["busy"],
    }


def in_process(model: Path, folder: Path, unit: int) -> dict[str, float]:
    """The actor's code without Ray, and its unit files and the driver's merge alone:
    seconds per image."""
    out = Path(tempfile.mkdtemp(prefix="bench_ray_inproc_"))
    opts = RunOptions(device="cpu", threads=1, workers=1)
    runner = Runner(model, out, opts)
    fp = runner.plan.fingerprint(file_sha1(model))
    rundir = RunDir(out, fp)
    rundir.shards.mkdir(parents=True)
    files = sorted(str(p.resolve()) for p in folder.glob("*.jpg"))
    setup = WorkerSetup(str(model), opts, str(out), fp, (str(folder.resolve()),))
    worker = UnitWorker(setup)
    units = make_units(files, unit)
    worker.unit(units[0])  # warm: the first run of a session is slower
    t0 = time.perf_counter()
    for u in units[1:]:
        worker.unit(u)
    actor = (time.perf_counter() - t0) / sum(len(u.paths) for u in units[1:])
    # the unit files alone, and the driver's merge, over the same units
    t_write = t_merge = 0.0
    log = ResultsLog(out)
    for u in units:
        meta = rundir.shards / f"{u.key}.json"
        recs = unit_records(meta) or []
        stats = RunStats.load_npz(rundir.shards / f"{u.key}.stats.npz")
        with np.load(rundir.shards / f"{u.key}.cams.npz") as z:
            cams = ClassCAMs.from_arrays(z)
        ids = [r.id for r in recs if r.ok]
        t1 = time.perf_counter()
        write_unit(rundir, u, stats, cams, ids, recs, {"pid": os.getpid()})
        t2 = time.perf_counter()
        got = unit_lines(meta, fp)
        assert got is not None
        log.append_lines(got.lines)  # as the run does: no fsync per unit
        t_merge += time.perf_counter() - t2
        t_write += t2 - t1
    log.close()
    shutil.rmtree(out, ignore_errors=True)
    n = len(files)
    return {"actor": actor, "unit_files": t_write / n, "merge": t_merge / n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=768, help="and a quarter of it")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--unit", type=int, default=64, help="--ray-unit")
    opts = ap.parse_args(argv)
    model = bench_data.model_files("small").analysis
    if not model.exists():
        bench_data.ensure_model("small")
    n_small = opts.images // 4
    folder = bench_data.image_set(opts.images, 256)
    small = bench_data.image_set(n_small, 256)
    import ray

    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    connect(ray, "local")
    ray_start = time.perf_counter() - t0
    got: dict[str, list[dict[str, float]]] = {r: [] for r in ROWS}
    for rep in range(opts.repeats):
        for row in ROWS:
            a = one_run(row, model, small, opts.unit)
            b = one_run(row, model, folder, opts.unit)
            got[row].append(marginal(a, b, n_small, opts.images))
            print(f"repeat {rep + 1} {row}: {got[row][-1]}", file=sys.stderr)
    ray.shutdown()
    parts = [in_process(model, folder, opts.unit) for _ in range(opts.repeats)]

    def med(row: str, k: str) -> float:
        return statistics.median(g[k] for g in got[row])

    part = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
    lines = report(opts, med, part, ray_start, load0)
    (HERE / "RAY.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def report(
    opts: Any, med: Any, part: dict[str, float], ray_start: float, load0: float
) -> list[str]:
    f = "{:.1f}".format
    lines = [
        "# convlens on Ray against the single-process engine",
        "",
        f"- command: `python benchmarks/bench_ray.py --images {opts.images} "
        f"--repeats {opts.repeats} --unit {opts.unit}`",
        f"- date: {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}; load "
        f"average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end (shared machine)",
        f"- {os.cpu_count()} cores; the small model, 640x480 JPEGs; report=False; device cpu;"
        f" medians of {opts.repeats}; a local Ray instance started once in {ray_start:.1f} s",
        "",
        f"wall: {opts.images} images, everything included; marginal: the images beyond "
        f"a run of {opts.images // 4} (fixed costs cancel); fixed: the rest of the wall time.",
        "",
        "| row | run | wall img/s | marginal img/s | fixed s | busy img/s (actors) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row, label in ROWS.items():
        busy = med(row, "busy")
        lines.append(
            f"| {row} | {label} | {f(med(row, 'wall'))} | {f(med(row, 'marginal'))} | "
            f"{f(med(row, 'fixed'))} | {'' if busy != busy else f(busy)} |"
        )
    ms = 1000.0
    r1s, r1b, l1 = med("R1", "marginal"), med("R1", "busy"), med("L1", "marginal")
    lines += [
        "",
        "Where a Ray run's time per image goes (one actor on one core, ms per image):",
        "",
        "| part | ms/image |",
        "|---|---:|",
        f"| local engine, one core (L1, marginal) | {ms / l1:.2f} |",
        f"| actor in-process (UnitWorker without Ray) | {part['actor'] * ms:.2f} |",
        f"| of which the unit files (write_unit) | {part['unit_files'] * ms:.3f} |",
        f"| driver merge (read a unit's lines, append them) | {part['merge'] * ms:.3f} |",
        f"| R1 busy (inside the actor, on Ray) | {ms / r1b:.2f} |",
        f"| R1 marginal | {ms / r1s:.2f} |",
        f"| Ray dispatch and driver (1/marginal - 1/busy) | {ms / r1s - ms / r1b:.2f} |",
        f"| total overhead over L1 (1/R1 - 1/L1, marginal) | {ms / r1s - ms / l1:.2f} |",
    ]
    return lines


if __name__ == "__main__":
    sys.exit(main())
