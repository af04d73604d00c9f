"""The run directory's lifecycle: lock, --force, fingerprint, resume, shards, run.json.

OUTDIR.md is the contract; this module is the engine's one reader and writer of
run.json (with a ``schema_version``), of the statistics shards, and of stats.json and
class_cams.npz.  Resume: ok records that no complete shard covers are dropped and
recomputed, failed inputs are tried again, and temporaries a kill left behind are
removed (only names the engine makes).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import contract as C
from .outdir import (
    CLASS_CAMS,
    LOCK,
    MAPS,
    RESULTS,
    RUN_JSON,
    SHARDS,
    STATS_JSON,
    Record,
    ResultsLog,
    read_results,
)
from .plan import RunError
from .results import atomic_save_npz, atomic_write_json, refuse_links
from .stats import ClassCAMs, RunStats

SCHEMA_VERSION = 1  # of run.json
# what --force removes: the engine's own files (sinks clean theirs: settings["force"])
RUN_FILES = (RESULTS, RUN_JSON, STATS_JSON, CLASS_CAMS)
RUN_DIRS = (MAPS, SHARDS)
TEMPORARIES = (f"{SHARDS}/.*.tmp", f"{MAPS}/.*.npz.*.tmp")
OWN = (*RUN_FILES, *RUN_DIRS, LOCK)  # never symbolic links (refuse_links)


SHARD_ARRAYS = (".stats.npz", ".cams.npz")  # beside each shard's <seq>.json


def file_sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class RunDir:
    """OUTDIR as one run uses it."""

    def __init__(self, outdir: str | Path):
        self.path = Path(outdir)
        self.shards = self.path / SHARDS

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One run at a time per OUTDIR: two would count the same images twice."""
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        refuse_links(self.path, OWN)
        with open(self.path / LOCK, "a") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                raise RunError(f"{self.path}: another convlens run is writing to it") from exc
            yield  # closing the file releases the lock

    def prepare(self, force: bool, save_maps: bool, fingerprint: dict[str, Any]) -> None:
        out = self.path
        if out.exists() and not out.is_dir():
            raise RunError(f"{out}: exists and is not a directory")
        refuse_links(out, OWN)
        if force and out.exists():
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
            for name in RUN_DIRS:
                shutil.rmtree(out / name, ignore_errors=True)
        else:
            self.check_same_run(fingerprint)
        self.shards.mkdir(parents=True, exist_ok=True)
        if save_maps:
            (out / MAPS).mkdir(exist_ok=True)

    def check_same_run(self, fingerprint: dict[str, Any]) -> None:
        """Refuse an OUTDIR of another model or other settings, and a run.json that is
        damaged or not convlens'."""
        path = self.path / RUN_JSON
        if not path.exists():
            return
        try:
            before = json.loads(path.read_text()).get("fingerprint")
        except (OSError, ValueError, AttributeError) as exc:
            raise RunError(
                f"{path} is damaged ({type(exc).__name__}); use --force to start this "
                "OUTDIR over, or another -o"
            ) from exc
        if not isinstance(before, dict):
            raise RunError(
                f"{path} is not a convlens run's (no fingerprint); use --force to start "
                "this OUTDIR over, or another -o"
            )
        if before != fingerprint:
            changed = [k for k, v in fingerprint.items() if before.get(k) != v]
            raise RunError(
                f"{self.path} holds results of another model or other settings "
                f"({', '.join(changed)} differ); use --force to recompute, or another -o"
            )

    def resume(self, log: ResultsLog) -> tuple[dict[str, Record], str | None]:
        """Done records by id, with the shards and the records made to agree both ways:
        an ok record no complete shard covers is dropped (it is recomputed), and a shard
        that covers an id without an ok record (a damaged or deleted line) is dropped
        with every record it covered, so that no image is counted twice in the
        statistics.  Error records are dropped too: a failed input is tried again.  A
        shard is complete when its ids are a list of names and both its arrays exist.
        Also returns one line saying what damage was repaired, or None."""
        found = read_results(log.outdir, repair=True)
        records = found.records
        shards: dict[Path, set[str]] = {}
        dropped = 0
        for meta in sorted(self.shards.glob("*.json")):
            ids = self._shard_ids(meta)
            if ids is None:
                self._drop_shard(meta)
                dropped += 1
            else:
                shards[meta] = ids
        for pattern in TEMPORARIES:  # atomic writes a kill interrupted
            for tmp in self.path.glob(pattern):
                tmp.unlink(missing_ok=True)
        ok = {r.id for r in records if r.ok}
        while True:
            covered = set().union(*shards.values())
            stale = [m for m, ids in shards.items() if not ids <= ok]
            if not stale:
                break
            for meta in stale:
                ok -= shards.pop(meta)  # its images are recomputed, all of them
                self._drop_shard(meta)
                dropped += 1
        keep, seen = [], set()
        for r in records:
            if r.id in seen or not r.ok or r.id not in covered:
                continue
            seen.add(r.id)
            keep.append(r)
        if len(keep) != len(records):
            log.rewrite(keep)
        note = None
        if dropped or found.bad_lines:
            redo = len({r.id for r in records if r.ok}) - len(keep)
            note = (
                f"{self.path}: repaired on resume: {found.bad_lines} unreadable line(s) of "
                f"{RESULTS} and {dropped} damaged or out-of-step shard(s) dropped; "
                f"{redo} result(s) dropped with them, to be recomputed"
            )
        return {r.id: r for r in keep}, note

    def _shard_ids(self, meta: Path) -> set[str] | None:
        """The ids a shard covers; None when it is damaged or incomplete."""
        stem = meta.name[: -len(".json")]
        if not all((meta.parent / (stem + s)).is_file() for s in SHARD_ARRAYS):
            return None
        try:
            ids = json.loads(meta.read_text())["ids"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            return None
        return set(ids)

    def _drop_shard(self, meta: Path) -> None:
        stem = meta.name[: -len(".json")]
        for suffix in (".json", *SHARD_ARRAYS):
            (meta.parent / (stem + suffix)).unlink(missing_ok=True)

    def next_shard_seq(self) -> int:
        seqs = [
            int(p.name.split(".")[0])
            for p in self.shards.glob("*.json")
            if p.name.split(".")[0].isdigit()
        ]
        return max(seqs, default=-1) + 1

    def write_shard(self, seq: int, stats: RunStats, cams: ClassCAMs, ids: list[str]) -> None:
        """Statistics and class CAMs first, then the shard's id list: a shard counts
        only once its ids are written."""
        stem = f"{seq:06d}"
        stats.save_npz(self.shards / f"{stem}.stats.npz")
        atomic_save_npz(self.shards / f"{stem}.cams.npz", cams.to_arrays())
        atomic_write_json(self.shards / f"{stem}.json", {"ids": ids})

    def merge_shards(self, num_classes: int) -> None:
        """stats.json and class_cams.npz from every complete shard."""
        import numpy as np

        stats = RunStats()
        cams = ClassCAMs()
        for meta in sorted(self.shards.glob("*.json")):
            stem = meta.name[: -len(".json")]
            stats.merge(RunStats.load_npz(self.shards / f"{stem}.stats.npz"))
            with np.load(self.shards / f"{stem}.cams.npz") as z:
                cams.merge(ClassCAMs.from_arrays(z))
        atomic_write_json(self.path / STATS_JSON, stats.to_json_dict())
        atomic_save_npz(self.path / CLASS_CAMS, cams.means(num_classes))

    def write_run_json(
        self,
        model_path: Path,
        spec: C.ModelSpec,
        settings: dict[str, Any],
        fingerprint: dict[str, Any],
        summary: dict[str, Any] | None,
    ) -> None:
        """run.json, the one writer: at the start (summary None, so a report rendered
        mid-run can use the spec and settings) and at the end."""
        atomic_write_json(
            self.path / RUN_JSON,
            {
                "schema_version": SCHEMA_VERSION,
                "model_path": str(model_path),
                "spec": asdict(spec),
                "settings": settings,
                "fingerprint": fingerprint,
                "summary": summary,
            },
        )
