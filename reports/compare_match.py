"""Reading one run directory for ``convlens compare``, and matching two: their inputs,
classes (by name), layers (by name and shape) and mean CAMs; what does not match is
named (:func:`mismatches_of`).

Inputs are matched by the path each record stores relative to the input root its run
was given (``relpath``, OUTDIR.md): two runs over copies of one dataset in different
places (``/data/v1/cats/1.jpg``, ``/mnt/v1/cats/1.jpg``) match, as do two dataset
versions with the same layout.  What is left over is then matched by whole path
components when one relpath ends with the other and that match is unique both ways (a
run given ``photos/`` has ``cats/1.jpg`` where a run given ``photos/cats/`` has
``1.jpg``).  A relpath held by several inputs of one run (two input roots with the same
layout) is matched where the absolute paths are equal, and is otherwise counted
ambiguous and left out.
"""

from __future__ import annotations

import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import numpy as np

from convlens.engine.outdir import (
    CLASS_CAMS,
    MAPS,
    RESULTS,
    STATS_JSON,
    read_results,
    read_run_json,
)

from .compare_figures import LayerDelta, layer_delta, pearson_r, top_iou
from .data import (
    AssetIndex,
    ImageEntry,
    LayerStats,
    RunInfo,
    read_entries,
    read_json,
    read_run,
    read_stats,
)
from .layout import safe_id
from .pages import class_names

_NPZ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile)


class NotARunError(ValueError):
    """A path given as a run directory is not one (one line)."""


@dataclass
class Side:
    """One run directory, read once through the contract's and the report's readers."""

    outdir: Path
    run: RunInfo
    names: list[str]  # class names, by index
    entries: list[ImageEntry]  # ok images by relpath, then failed inputs
    maps: dict[str, Path]  # entry id -> its maps/<id>.npz (--save-maps)
    layers: list[LayerStats]
    stats: dict[str, Any]  # stats.json per layer (per-channel lists)
    assets: AssetIndex
    notes: list[str]
    bad_lines: int
    duplicates: int

    @property
    def model_sha1(self) -> str | None:
        fp = self.run.extra.get("fingerprint")
        sha = fp.get("model_sha1") if isinstance(fp, dict) else None
        return sha if isinstance(sha, str) else None

    @property
    def cam_layer(self) -> str | None:
        layer = (self.run.spec or {}).get("cam_layer")
        return None if layer is None else str(layer)

    def index_of(self, name: str) -> int | None:
        try:
            return self.names.index(name)
        except ValueError:
            return None


def _map_path(outdir: Path, rel: str | None) -> Path | None:
    """A record's ``maps`` field as a path inside ``outdir/maps`` (anything else: None)."""
    if not rel:
        return None
    parts = PurePath(rel).parts
    if len(parts) != 2 or parts[0] != MAPS or parts[1] in ("..", ".") or "\\" in rel:
        return None
    return outdir / MAPS / parts[1]


def read_side(outdir: str | Path) -> Side:
    """Read a run directory.  Raises :class:`NotARunError` when it has no results.jsonl
    and ``RunJsonError`` (both ValueError, one line) when its run.json is damaged: the
    comparison needs to know each run's model."""
    root = Path(outdir)
    if not root.is_dir() or not (root / RESULTS).is_file():
        raise NotARunError(f"{root}: not a convlens run directory (no {RESULTS})")
    read_run_json(root)  # a damaged run.json raises here
    notes: list[str] = []
    run = read_run(root, notes)
    results = read_entries(root, run.class_names)
    maps: dict[str, Path] = {}
    for rec in read_results(root).records:
        path = _map_path(root, rec.maps) if rec.ok else None
        if path is not None:
            maps.setdefault(safe_id(rec.id), path)  # the first record of an id, as entries
    layers = read_stats(root, run.spec, notes)
    raw = read_json(root / STATS_JSON, [])  # read_stats has noted a damaged file
    nested = raw.get("layers")
    stats = nested if isinstance(nested, dict) else raw
    return Side(
        outdir=root,
        run=run,
        names=class_names(run, results),
        entries=results.entries,
        maps=maps,
        layers=layers,
        stats=stats,
        assets=AssetIndex.scan(root),
        notes=notes,
        bad_lines=results.bad_lines,
        duplicates=results.duplicates,
    )


@dataclass
class Matching:
    pairs: list[tuple[ImageEntry, ImageEntry]]  # in A's order
    only_a: list[ImageEntry]
    only_b: list[ImageEntry]
    ambiguous: int  # inputs (both runs) left out because their relpath is not unique
    by_suffix: int  # pairs matched by the common suffix rule


def _parts(e: ImageEntry) -> tuple[str, ...]:
    return PurePath(e.relpath).parts


def match_inputs(a: list[ImageEntry], b: list[ImageEntry]) -> Matching:
    """Pairs of inputs of two runs (module docstring)."""
    by_rel_a: dict[str, list[ImageEntry]] = defaultdict(list)
    by_rel_b: dict[str, list[ImageEntry]] = defaultdict(list)
    for e in a:
        by_rel_a[e.relpath].append(e)
    for e in b:
        by_rel_b[e.relpath].append(e)
    paired: dict[str, ImageEntry] = {}  # A's id -> B's entry
    used_b: set[str] = set()
    ambiguous = 0
    for rel, group_a in by_rel_a.items():
        group_b = by_rel_b.get(rel, [])
        if len(group_a) == 1 and len(group_b) == 1:
            paired[group_a[0].id] = group_b[0]
            used_b.add(group_b[0].id)
        elif group_b:
            by_path = {e.path: e for e in group_b}
            for ea in group_a:
                eb = by_path.get(ea.path)
                if eb is not None and eb.id not in used_b:
                    paired[ea.id] = eb
                    used_b.add(eb.id)
            ambiguous += sum(1 for e in group_a if e.id not in paired)
            ambiguous += sum(1 for e in group_b if e.id not in used_b)
    # inputs whose relpath the other run has too but that stayed unpaired: ambiguous
    left_a = [e for e in a if e.id not in paired and e.relpath not in by_rel_b]
    left_b = [e for e in b if e.id not in used_b and e.relpath not in by_rel_a]
    suffix = _suffix_pairs(left_a, left_b)
    for ea, eb in suffix:
        paired[ea.id] = eb
        used_b.add(eb.id)
    return Matching(
        pairs=[(e, paired[e.id]) for e in a if e.id in paired],
        only_a=[e for e in left_a if e.id not in paired],
        only_b=[e for e in left_b if e.id not in used_b],
        ambiguous=ambiguous,
        by_suffix=len(suffix),
    )


def _suffix_pairs(a: list[ImageEntry], b: list[ImageEntry]) -> list[tuple[ImageEntry, ImageEntry]]:
    """Pairs where one relpath's components end the other's, unique both ways."""

    def candidates(x: list[ImageEntry], y: list[ImageEntry]) -> dict[str, list[ImageEntry]]:
        full: dict[tuple[str, ...], list[ImageEntry]] = defaultdict(list)
        ends: dict[tuple[str, ...], list[ImageEntry]] = defaultdict(list)
        for e in y:
            p = _parts(e)
            full[p].append(e)
            for i in range(1, len(p)):
                ends[p[i:]].append(e)
        out: dict[str, list[ImageEntry]] = {}
        for e in x:
            p = _parts(e)
            found = {c.id: c for c in ends.get(p, [])}  # y ends with x
            for i in range(1, len(p)):  # x ends with y
                found.update((c.id, c) for c in full.get(p[i:], []))
            out[e.id] = list(found.values())
        return out

    if not a or not b:
        return []
    from_a, from_b = candidates(a, b), candidates(b, a)
    pairs = []
    for ea in a:
        cands = from_a[ea.id]
        if len(cands) == 1 and [c.id for c in from_b[cands[0].id]] == [ea.id]:
            pairs.append((ea, cands[0]))
    return pairs


@dataclass
class ClassCamDelta:
    """A class's mean CAMs (class_cams.npz) in both runs and how far they moved."""

    name: str
    index_a: int
    index_b: int
    count_a: int | None
    count_b: int | None
    r: float | None
    iou: float | None
    map_a: np.ndarray = field(repr=False, compare=False)
    map_b: np.ndarray = field(repr=False, compare=False)


def load_npz(path: Path, notes: list[str], what: str) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: np.asarray(npz[k]) for k in npz.files}
    except _NPZ_ERRORS as exc:
        notes.append(f"{what} could not be read ({type(exc).__name__}); left out")
        return None


def class_cams(a: Side, b: Side, notes: list[str]) -> list[ClassCamDelta]:
    docs = []
    for side, label in ((a, "A"), (b, "B")):
        path = side.outdir / CLASS_CAMS
        doc = load_npz(path, notes, f"run {label}'s {CLASS_CAMS}") if path.exists() else None
        docs.append(doc or {})
    da, db = docs
    out = []
    for ia, name in enumerate(a.names):
        ib = b.index_of(name)
        ka, kb = f"class_{ia}", f"class_{ib}"
        if ib is None or ka not in da or kb not in db:
            continue
        x, y = da[ka].astype(np.float32), db[kb].astype(np.float32)
        if x.ndim != 2 or y.ndim != 2 or 0 in x.shape or 0 in y.shape:
            continue

        def count(doc: dict[str, np.ndarray], i: int) -> int | None:
            c = doc.get("counts")
            return int(c.ravel()[i]) if c is not None and i < c.size else None

        r, iou = pearson_r(x, y), top_iou(x, y)
        out.append(ClassCamDelta(name, ia, ib, count(da, ia), count(db, ib), r, iou, x, y))
    return out


def layer_deltas(a: Side, b: Side, mismatches: list[str]) -> list[LayerDelta]:
    """Per layer both runs have statistics for, how they differ; the others named in
    ``mismatches`` (a layer one run took no statistics of is left out, not read as
    having no dead channel: :attr:`LayerStats.measured`)."""
    by_b = {st.name: st for st in b.layers}
    out = []
    for st in a.layers:
        other = by_b.get(st.name)
        if other is None:
            mismatches.append(f"layer {st.name} is only in run A: not compared")
        elif not (st.measured and other.measured):
            continue  # the run without statistics is named once (mismatches_of)
        elif st.shape != other.shape:
            sa, sb = "×".join(map(str, st.shape)), "×".join(map(str, other.shape))
            mismatches.append(f"layer {st.name} is {sa} in run A, {sb} in run B: not compared")
        else:
            sa_, sb_ = a.stats.get(st.name), b.stats.get(st.name)
            out.append(
                layer_delta(
                    st.name,
                    st.shape,
                    st.dead,
                    other.dead,
                    sa_ if isinstance(sa_, dict) else {},
                    sb_ if isinstance(sb_, dict) else {},
                )
            )
    names_a = {st.name for st in a.layers}
    for st in b.layers:
        if st.name not in names_a:
            mismatches.append(f"layer {st.name} is only in run B: not compared")
    return out


def mismatches_of(a: Side, b: Side, m: Matching) -> list[str]:
    out = []
    only_a = [n for n in a.names if n not in b.names]
    only_b = [n for n in b.names if n not in a.names]
    if only_a or only_b:
        out.append(
            "class names differ (matched by name): "
            + "; ".join(
                f"only in run {s}: {', '.join(ns[:20])}{' …' if len(ns) > 20 else ''}"
                for s, ns in (("A", only_a), ("B", only_b))
                if ns
            )
        )
    elif a.names != b.names:
        out.append("the classes are in another order in run B (matched by name)")
    if a.cam_layer != b.cam_layer:
        out.append(f"CAM layers differ: {a.cam_layer} in run A, {b.cam_layer} in run B")
    for side, label in ((a, "A"), (b, "B")):
        if not side.maps:
            out.append(
                f"run {label} has no saved maps (run it with --save-maps): "
                "per-image CAM similarity not computed"
            )
        if not any(st.measured for st in side.layers):
            out.append(
                f"run {label} has no activation statistics (stats.json; --stats-every 0 "
                "takes none): layers not compared"
            )
    if m.only_a or m.only_b:
        out.append(
            f"{len(m.only_a)} inputs only in run A and {len(m.only_b)} only in run B "
            "(matched by relative path)"
        )
    if m.ambiguous:
        out.append(f"{m.ambiguous} inputs share a relative path with another input: left out")
    return out
