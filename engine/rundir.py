"""The run directory's lifecycle: lock, --force, fingerprint, resume, shards, run.json.

OUTDIR.md is the contract; this module is the engine's one writer of the statistics
shards, stats.json and class_cams.npz, and checks run.json (read and written through
:mod:`convlens.engine.outdir`).  Resume: ok records that no complete shard covers, or
whose per-image files are missing, are dropped and recomputed, failed inputs are tried
again, and temporaries a kill left behind are removed (only names the engine makes).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import zipfile
from collections.abc import Callable, Iterator
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
    RUN_SCHEMA_VERSION,
    SHARDS,
    STATS_JSON,
    Record,
    ResultsLog,
    RunDoc,
    RunJsonError,
    read_results,
    read_run_json,
)
from .outdir import write_run_json as _write_run_json
from .plan import RunError
from .results import atomic_save_npz, atomic_write_json, refuse_links
from .stats import ClassCAMs, RunStats

SCHEMA_VERSION = RUN_SCHEMA_VERSION  # of run.json
# what --force removes: the engine's own files (sinks clean theirs: settings["force"])
RUN_FILES = (RESULTS, RUN_JSON, STATS_JSON, CLASS_CAMS)
RUN_DIRS = (MAPS, SHARDS)
TEMPORARIES = (f"{SHARDS}/.*.tmp", f"{MAPS}/.*.npz.*.tmp")
OWN = (*RUN_FILES, *RUN_DIRS, LOCK)  # never symbolic links (refuse_links)


SHARD_ARRAYS = (".stats.npz", ".cams.npz")  # beside each shard's <seq>.json
FORCE_HINT = "use --force to start this OUTDIR over, or another -o"

#: ids of done ok records whose per-image files are missing (a sink's, e.g. the report's)
Lacking = Callable[[dict[str, Record]], set[str]]


def file_sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class RunDir:
    """OUTDIR as one run uses it.  ``fingerprint``: the run's (model and the settings
    that shape a record); each shard carries it, so that a damaged run.json can be told
    apart from another model's."""

    def __init__(self, outdir: str | Path, fingerprint: dict[str, Any] | None = None):
        self.path = Path(outdir)
        self.shards = self.path / SHARDS
        self.fingerprint = fingerprint

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

    def prepare(self, force: bool, save_maps: bool, fingerprint: dict[str, Any]) -> str | None:
        """--force, or the check that OUTDIR holds this run's results.  Returns what was
        repaired of run.json (for resume's note), or None."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise RunError(f"{out}: exists and is not a directory")
        refuse_links(out, OWN)
        repaired = None
        if force and out.exists():
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
            for name in RUN_DIRS:
                shutil.rmtree(out / name, ignore_errors=True)
        else:
            repaired = self.check_same_run(fingerprint)
        self.shards.mkdir(parents=True, exist_ok=True)
        if save_maps:
            (out / MAPS).mkdir(exist_ok=True)
        return repaired

    def check_same_run(self, fingerprint: dict[str, Any]) -> str | None:
        """Refuse an OUTDIR of another model or other settings.  A run.json that is
        damaged (not a JSON object) or has no fingerprint is repaired when every
        readable shard carries this run's fingerprint (what resume keeps is exactly what
        the shards cover), and otherwise refused; returns the repair's words or None."""
        try:
            doc = read_run_json(self.path)
        except RunJsonError as exc:
            return self._rederive(str(exc), fingerprint)
        if doc is None:  # no run started here, or run.json deleted beside its shards
            if not any(self.shards.glob("*.json")):
                return None
            return self._rederive(f"{self.path / RUN_JSON} is missing", fingerprint)
        before = doc.fingerprint
        if before is None:
            path = self.path / RUN_JSON
            return self._rederive(f"{path} is not a convlens run's (no fingerprint)", fingerprint)
        if before != fingerprint:
            # both ways: an opt-in setting is in a fingerprint only when it is asked for
            changed = sorted(
                k for k in before.keys() | fingerprint.keys() if before.get(k) != fingerprint.get(k)
            )
            raise RunError(
                f"{self.path} holds results of another model or other settings "
                f"({', '.join(changed)} differ); use --force to recompute, or another -o"
            )
        return None

    def _rederive(self, problem: str, fingerprint: dict[str, Any]) -> str:
        """The repair of an unusable run.json, or a one-line refusal."""
        found = [self._shard_doc(meta) for meta in sorted(self.shards.glob("*.json"))]
        marks = [d.get("fingerprint") for d in found if d is not None]
        if marks and all(m == fingerprint for m in marks):
            return f"{problem}, rewritten: its shards are this model's and settings'"
        raise RunError(f"{problem}; {FORCE_HINT}")

    def resume(
        self, log: ResultsLog, lacking: Lacking | None = None, repaired: str | None = None
    ) -> tuple[dict[str, Record], str | None]:
        """Done records by id, with the shards and the records made to agree both ways:
        an ok record no complete shard covers is dropped (it is recomputed), and a shard
        that covers an id without a usable ok record (a damaged or deleted line, or a
        record whose files are missing) is dropped with every record it covered, so
        that no image is counted twice in the statistics.  A record's files are its
        ``maps/<id>.npz`` and what ``lacking`` (the sinks) says is missing.  Error
        records are dropped too: a failed input is tried again.  A shard is complete
        when its ids are a list of names, both its arrays load, and its fingerprint (if
        it has one) is this run's.  Also returns one line saying what damage was
        repaired (``repaired``: run.json's, from :meth:`prepare`), or None."""
        found = read_results(log.outdir, repair=True)
        records = found.records
        shards: dict[Path, set[str]] = {}
        dropped = 0
        for pattern in TEMPORARIES:  # atomic writes a kill interrupted
            for tmp in self.path.glob(pattern):
                tmp.unlink(missing_ok=True)
        for meta in sorted(self.shards.glob("*.json")):
            ids = self._shard_ids(meta)
            if ids is None:
                self._drop_shard(meta)
                dropped += 1
            else:
                shards[meta] = ids
        first: dict[str, Record] = {}  # the first ok record of each id
        for r in records:
            if r.ok:
                first.setdefault(r.id, r)
        ok = set(first)
        missing = self._maps_missing(list(first.values()))
        if lacking is not None:
            missing |= lacking({i: first[i] for i in ok if i not in missing}) & ok
        ok -= missing
        while True:
            covered = set().union(*shards.values())
            stale = [m for m, ids in shards.items() if not ids <= ok]
            if not stale:
                break
            for meta in stale:
                ok -= shards.pop(meta)  # its images are recomputed, all of them
                self._drop_shard(meta)
                dropped += 1
        keep = [r for i, r in first.items() if i in ok and i in covered]
        if len(keep) != len(records):
            log.rewrite(keep)
        pieces = [repaired] if repaired else []
        if dropped or found.bad_lines:
            pieces.append(
                f"{found.bad_lines} unreadable line(s) of {RESULTS} and {dropped} damaged "
                "or out-of-step shard(s) dropped"
            )
        if missing:
            pieces.append(f"{len(missing)} result(s) whose files were missing")
        note = None
        if pieces:
            redo = len(first) - len(keep)
            note = (
                f"{self.path}: repaired on resume: {'; '.join(pieces)}; "
                f"{redo} result(s) dropped with them, to be recomputed"
            )
        return {r.id: r for r in keep}, note

    def _maps_missing(self, records: list[Record]) -> set[str]:
        """Ids of records whose ``maps/<id>.npz`` (--save-maps) is not there."""
        want = [r for r in records if r.maps is not None]
        if not want:
            return set()
        try:
            present = set(os.listdir(self.path / MAPS))
        except (FileNotFoundError, NotADirectoryError):  # then none is there
            present = set()
        prefix = MAPS + "/"
        return {
            r.id
            for r in want
            if not (r.maps or "").startswith(prefix) or (r.maps or "")[len(prefix) :] not in present
        }

    def _shard_doc(self, meta: Path) -> dict[str, Any] | None:
        """A shard's <seq>.json; None when it cannot be read as an object."""
        try:
            doc = json.loads(meta.read_bytes())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def _shard_ids(self, meta: Path) -> set[str] | None:
        """The ids a shard covers; None when it is damaged, incomplete or another
        run's."""
        doc = self._shard_doc(meta)
        ids = None if doc is None else doc.get("ids")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            return None
        mark = doc.get("fingerprint") if doc is not None else None
        if mark is not None and self.fingerprint is not None and mark != self.fingerprint:
            return None
        stem = meta.name[: -len(".json")]
        if not self._arrays_load(meta.parent / stem):
            return None
        return set(ids)

    @staticmethod
    def _arrays_load(stem: Path) -> bool:
        """Whether both arrays of a shard are there and load (a kill cannot cut them:
        they are written atomically; a disk or a person can)."""
        import numpy as np

        stats, cams = (stem.parent / (stem.name + s) for s in SHARD_ARRAYS)
        try:
            RunStats.load_npz(stats)
            with np.load(cams, allow_pickle=False) as z:
                ClassCAMs.from_arrays(z)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return False
        return True

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
        doc: dict[str, Any] = {"ids": ids}
        if self.fingerprint is not None:
            doc["fingerprint"] = self.fingerprint
        atomic_write_json(self.shards / f"{stem}.json", doc)

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
        """run.json (through the contract's one writer): at the start (summary None, so
        a report rendered mid-run can use the spec and settings) and at the end."""
        _write_run_json(
            self.path,
            RunDoc(
                schema_version=SCHEMA_VERSION,
                model_path=str(model_path),
                spec=asdict(spec),
                settings=settings,
                fingerprint=fingerprint,
                summary=summary,
            ),
        )
