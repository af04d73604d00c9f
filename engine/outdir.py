"""The run directory's contract (OUTDIR.md): its file names, results.jsonl's typed
record with the file's one reader and writer, and run.json's typed document with its
one reader and writer.

One JSON object per line, appended as each batch finishes (one ``os.write`` per line,
O_APPEND).  A line cut by a kill is dropped, and truncated away when the log is opened
again for writing.  The engine writes records only through :class:`ResultsLog`; the
engine's resume and the report both read them only through :func:`read_results`.
The fields are documented in OUTDIR.md.

run.json is read only through :func:`read_run_json` (the engine's fingerprint check
and the report alike), which raises :class:`RunJsonError` (one line) for a file that is
there but is not a JSON object; each reader decides what that means for it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .results import atomic_write_bytes, atomic_write_json

RESULTS = "results.jsonl"
RUN_JSON = "run.json"
STATS_JSON = "stats.json"
CLASS_CAMS = "class_cams.npz"
SHARDS = "shards"
MAPS = "maps"
LOCK = ".lock"

OK, ERROR = "ok", "error"  # a record's status
CURVE_POINTS = 21  # deletion/insertion curves in a record: fractions 0, 0.05, ..., 1


@dataclass(slots=True)
class Prediction:
    """One of the top-k classes of an input."""

    index: int
    name: str
    prob: float

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "prob": self.prob}


@dataclass(slots=True)
class Record:
    """One input's line of results.jsonl.

    ``status`` is ``"ok"`` or ``"error"``; an error record has a one-line ``error`` and
    no predictions, size, maps or CAM fields.  ``label`` is the folder name when labels
    come from folders, else None; ``label_index`` its class (None: not a class name).
    ``maps`` is the relative path of the input's ``maps/<id>.npz`` (--save-maps).
    ``metrics`` (--metrics, for the images scored): per CAM method, the faithfulness
    scores of its map of ``cam_classes[0]`` (``{"gradcam": {"deletion": 0.12, ...}}``);
    ``metric_curves``: per method, the deletion and insertion curves resampled to
    :data:`CURVE_POINTS` evenly spaced fractions 0..1.  Both empty when not scored.
    """

    id: str
    path: str
    relpath: str
    status: str = OK
    error: str | None = None
    width: int | None = None
    height: int | None = None
    label: str | None = None
    label_index: int | None = None
    predictions: list[Prediction] = field(default_factory=list)
    cam_classes: list[int] = field(default_factory=list)
    cam_methods: list[str] = field(default_factory=list)
    maps: str | None = None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    metric_curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == OK

    def fail(self, reason: str) -> None:
        """Mark the input failed with a one-line ``reason``."""
        self.status, self.error = ERROR, reason

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "path": self.path, "relpath": self.relpath}
        d["status"], d["error"] = self.status, self.error
        d["label"], d["label_index"] = self.label, self.label_index
        if self.ok:
            d["width"], d["height"] = self.width, self.height
            d["predictions"] = [p.to_json() for p in self.predictions]
            d["cam_classes"] = list(self.cam_classes)
            d["cam_methods"] = list(self.cam_methods)
            d["maps"] = self.maps
            if self.metrics:
                d["metrics"] = {m: dict(v) for m, v in self.metrics.items()}
                d["metric_curves"] = {
                    m: {k: list(c) for k, c in v.items()} for m, v in self.metric_curves.items()
                }
        return d

    @classmethod
    def from_json(cls, d: Any) -> Record:
        """The record of one parsed line; ValueError when it is not a record."""
        if not isinstance(d, dict) or not isinstance(d.get("id"), str) or not d["id"]:
            raise ValueError("not a record (no id)")
        status = d.get("status")
        if status not in (OK, ERROR):
            raise ValueError(f"record {d['id']}: status {status!r}")
        preds = d.get("predictions") or []
        if not isinstance(preds, list):
            raise ValueError(f"record {d['id']}: predictions is not a list")
        return cls(
            id=d["id"],
            path=_str(d.get("path")),
            relpath=_str(d.get("relpath")) or _str(d.get("path")) or d["id"],
            status=status,
            error=None if d.get("error") is None else _str(d["error"]),
            width=_int(d.get("width")),
            height=_int(d.get("height")),
            label=None if d.get("label") is None else _str(d["label"]),
            label_index=_int(d.get("label_index")),
            predictions=[_prediction(d["id"], p) for p in preds],
            cam_classes=[c for c in map(_int, _list(d.get("cam_classes"))) if c is not None],
            cam_methods=[_str(m) for m in _list(d.get("cam_methods"))],
            maps=None if d.get("maps") is None else _str(d["maps"]),
            metrics=_nested(d.get("metrics"), _number),
            metric_curves=_nested(d.get("metric_curves"), _numbers),
        )


def _str(v: Any) -> str:
    return v if isinstance(v, str) else "" if v is None else str(v)


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else []


def _number(v: Any) -> float | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    return float(v) if ok else None


def _numbers(v: Any) -> list[float] | None:
    if not isinstance(v, list):
        return None
    out = [x for x in map(_number, v) if x is not None]
    return out if len(out) == len(v) else None


def _nested(v: Any, read: Any) -> dict[str, dict[str, Any]]:
    """``{str: {str: read(value)}}``, dropping what is not of that shape."""
    if not isinstance(v, dict):
        return {}
    out: dict[str, dict[str, Any]] = {}
    for k, inner in v.items():
        if isinstance(k, str) and isinstance(inner, dict):
            got = {n: read(x) for n, x in inner.items() if isinstance(n, str)}
            out[k] = {n: x for n, x in got.items() if x is not None}
    return out


def _prediction(rid: str, p: Any) -> Prediction:
    if not isinstance(p, dict):
        raise ValueError(f"record {rid}: a prediction is not an object")
    index, prob = _int(p.get("index")), p.get("prob")
    if index is None or not isinstance(prob, (int, float)) or isinstance(prob, bool):
        raise ValueError(f"record {rid}: a prediction without index or prob")
    return Prediction(index, _str(p.get("name")), float(prob))


@dataclass
class ResultsRead:
    """What :func:`read_results` found: every readable record in file order (an id may
    repeat), and how many lines were not records."""

    records: list[Record]
    bad_lines: int = 0


def read_results(outdir: Path, repair: bool = False) -> ResultsRead:
    """The records of ``outdir``'s results.jsonl.  A trailing line without its newline
    (a write a kill cut) is not read; with ``repair`` it is also truncated away, so that
    appends start on a fresh line.  Other unreadable lines are counted in ``bad_lines``."""
    path = outdir / RESULTS
    if not path.exists():
        return ResultsRead([])
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if repair and end != len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    found = ResultsRead([], int(bool(data[end:].strip())))
    for line in data[:end].splitlines():
        if not line.strip():
            continue
        rec = _record(line)
        if rec is None:
            found.bad_lines += 1
        else:
            found.records.append(rec)
    return found


def _record(line: bytes) -> Record | None:
    """One line of results.jsonl as a record; None when it is not one."""
    try:
        return Record.from_json(json.loads(line))
    except ValueError:  # JSONDecodeError, UnicodeDecodeError, not a record
        return None


def iter_results(outdir: Path) -> Iterator[Record]:
    """The records of ``outdir``'s results.jsonl one line at a time (what
    :func:`read_results` reads, without its repair: a trailing line without its newline
    and unreadable lines are skipped), so that a run's summary over 100,000 images does
    not hold them all."""
    path = outdir / RESULTS
    if not path.exists():
        return
    with open(path, "rb") as f:
        for line in f:
            rec = _record(line) if line.endswith(b"\n") and line.strip() else None
            if rec is not None:
                yield rec


class ResultsLog:
    """The append-only results.jsonl of a run directory (the engine's writer)."""

    def __init__(self, outdir: Path):
        self.outdir = outdir
        self.path = outdir / RESULTS
        self._fd: int | None = None

    def load(self) -> list[Record]:
        return read_results(self.outdir, repair=True).records

    def rewrite(self, records: list[Record]) -> None:
        atomic_write_bytes(self.path, b"".join(_line(r) for r in records))

    def append(self, records: list[Record]) -> None:
        if self._fd is None:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
            self._fd = os.open(self.path, flags, 0o666)  # the mode: what the umask leaves
        for r in records:
            os.write(self._fd, _line(r))

    def append_lines(self, data: bytes) -> None:
        """Append whole lines made by :func:`record_lines` in one write (a run on Ray:
        a worker makes a unit's lines, the driver appends them as they are)."""
        if not data.endswith(b"\n"):
            raise ValueError("append_lines takes whole lines")
        if self._fd is None:
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
            self._fd = os.open(self.path, flags, 0o666)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def sync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None


def record_lines(records: list[Record]) -> bytes:
    """The lines of results.jsonl that ``records`` are, as :class:`ResultsLog` writes
    them."""
    return b"".join(_line(r) for r in records)


def _line(record: Record) -> bytes:
    # ASCII JSON: a file name that is not valid UTF-8 (surrogate-escaped by Python)
    # round-trips as \udcXX escapes instead of writing invalid UTF-8 bytes
    return (json.dumps(record.to_json(), separators=(",", ":")) + "\n").encode("ascii")


# ---- run.json ------------------------------------------------------------------------
RUN_SCHEMA_VERSION = 1


class RunJsonError(ValueError):
    """run.json is there but is not a run's document: it cannot be read, is not JSON, or
    is not a JSON object.  ``str(e)`` is one line: the file's path and ``reason``."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path} {reason}")
        self.path = path
        self.reason = reason  # e.g. "is damaged (a JSON list, not an object)"


@dataclass
class RunDoc:
    """run.json, typed.  A field of the wrong type reads as absent (None or {});
    ``extra`` holds any other top-level keys."""

    schema_version: int | None = None
    model_path: str | None = None
    spec: dict[str, Any] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    fingerprint: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _KEYS = ("schema_version", "model_path", "spec", "settings", "fingerprint", "summary")

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.extra)
        d.update(
            schema_version=self.schema_version,
            model_path=self.model_path,
            spec=self.spec,
            settings=self.settings,
            fingerprint=self.fingerprint,
            summary=self.summary,
        )
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RunDoc:
        path = d.get("model_path")
        return cls(
            schema_version=_int(d.get("schema_version")),
            model_path=None if path is None else _str(path),
            spec=_dict(d.get("spec")),
            settings=_dict(d.get("settings")) or {},
            fingerprint=_dict(d.get("fingerprint")),
            summary=_dict(d.get("summary")),
            extra={k: v for k, v in d.items() if k not in cls._KEYS},
        )


def _dict(v: Any) -> dict[str, Any] | None:
    return v if isinstance(v, dict) else None


def read_run_json(outdir: Path) -> RunDoc | None:
    """``outdir``'s run.json; None when there is none (no run has started there).

    Raises :class:`RunJsonError` when the file cannot be read, is not JSON (a write cut
    short, another program's file) or is JSON but not an object (``[]``, ``42``)."""
    path = Path(outdir) / RUN_JSON
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_bytes())
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise RunJsonError(path, f"cannot be read ({reason})") from exc
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise RunJsonError(path, f"is damaged (not JSON: {type(exc).__name__})") from exc
    if not isinstance(doc, dict):
        raise RunJsonError(path, f"is damaged (a JSON {_kind(doc)}, not an object)")
    return RunDoc.from_json(doc)


def _kind(v: Any) -> str:
    if isinstance(v, list):
        return "list"
    if isinstance(v, str):
        return "string"
    if isinstance(v, bool) or v is None:
        return "constant"
    return "number"


def write_run_json(outdir: Path, doc: RunDoc) -> None:
    """run.json, atomically (the one writer)."""
    atomic_write_json(Path(outdir) / RUN_JSON, doc.to_json())
