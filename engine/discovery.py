"""Inputs to image paths: files, directories (walked) and globs, with a one-line
problem for every input that yields nothing."""

from __future__ import annotations

import glob
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .formats import IMAGE_EXTENSIONS
from .outdir import LOCK, RESULTS, RUN_JSON, SHARDS

_GLOB_CHARS = frozenset("*?[")


@dataclass
class Discovery:
    """The outcome of :func:`discover`.

    ``files``: absolute paths, deduplicated (the first occurrence wins), in a stable order.  ``problems``: ``(input, reason)`` for inputs that yielded no file.
    """

    files: list[Path] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)


def is_image_name(path: str | os.PathLike[str]) -> bool:
    """Whether the file name has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.path.splitext(os.fspath(path))[1].lower() in IMAGE_EXTENSIONS


def is_outdir(path: str) -> bool:
    """A convlens run directory (anyone's): the engine's lock beside its shards folder
    (a run that has just started), or a run.json beside a results.jsonl.  Discovery
    never walks into one: its thumbnails and heatmaps are not inputs.  (A ``.lock``
    alone is not enough: other tools, pytest among them, leave one too.)"""

    def has(name: str) -> bool:
        return os.path.exists(os.path.join(path, name))

    return (has(LOCK) and has(SHARDS)) or (has(RUN_JSON) and has(RESULTS))


def _inside_outdir(path: str, known: dict[str, bool]) -> bool:
    """``path`` is, or lies inside, a run directory; ``known`` caches the answers for
    one discovery (a folder may become a run directory between two calls)."""
    path = os.path.abspath(path)
    if path not in known:
        parent = os.path.dirname(path)
        known[path] = (os.path.isdir(path) and is_outdir(path)) or (
            parent != path and _inside_outdir(parent, known)
        )
    return known[path]


def _walk(root: str, problems: list[tuple[str, str]]) -> tuple[list[str], int]:
    """Image files under ``root`` (recursive, hidden entries skipped, symlinked
    directories followed once), sorted by relative path; plus the number of non-image
    files seen.  Entries with an image name that are not regular files (a dangling
    link, a FIFO, a device) are added to ``problems`` with the reason."""
    found: list[tuple[tuple[str, ...], str]] = []
    others = 0
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # symlink loop or a directory reached twice
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(  # deterministic; run directories are never inputs
            d for d in dirnames if not d.startswith(".") and not is_outdir(os.path.join(dirpath, d))
        )
        rel_dir = os.path.relpath(dirpath, root)
        rel_parts: tuple[str, ...] = () if rel_dir == "." else tuple(Path(rel_dir).parts)
        for name in filenames:
            if name.startswith("."):
                continue
            if not is_image_name(name):
                others += 1
                continue
            full = os.path.join(dirpath, name)
            if os.path.isfile(full):
                found.append(((*rel_parts, name), full))
            else:
                problems.append((full, _not_a_file(full)))
    found.sort(key=lambda item: item[0])
    return [full for _, full in found], others


def _not_a_file(path: str) -> str:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "broken symbolic link" if os.path.islink(path) else "cannot be read"
    return f"not a regular file ({file_kind(mode)})"


def file_kind(mode: int) -> str:
    """What a file that is not a regular one is, in words."""
    for test, word in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISDIR, "a directory"),
    ):
        if test(mode):
            return word
    return "not a plain file"


def discover(inputs: Sequence[str]) -> Discovery:
    """Expand files, directories and glob patterns into image paths.

    For each input, in the order given:

    * an existing **file** is taken whatever its extension (decoding decides later);
    * an existing **directory** is walked recursively; files whose extension is in
      :data:`IMAGE_EXTENSIONS` are taken, sorted by relative path (compared component by
      component); names starting with ``.`` (files and directories) are skipped;
    * otherwise, a string containing ``*``, ``?`` or ``[`` is a **glob**, expanded with
      ``glob.glob(recursive=True)`` (so ``**`` matches any depth) and sorted; matched
      directories are walked as above, matched files are kept when their extension is an
      image extension (a glob is a search, unlike a file named explicitly).

    ``~`` is expanded.  Paths are made absolute (``os.path.abspath``, symlinks not
    resolved); a path met again (same directory given twice, a file and its directory,
    overlapping globs) keeps its first position.  Symlinked directories are followed
    when walking, each real directory once (no loops).

    Problems (one per input that yields nothing): a path that does not exist, a glob that
    matches nothing (or no image files), a directory with no image files in it.
    """
    out = Discovery()
    seen: set[str] = set()
    known: dict[str, bool] = {}  # folder -> inside a run directory, for this call

    def add(path: str) -> None:
        key = os.path.abspath(path)
        if key not in seen:
            seen.add(key)
            out.files.append(Path(key))

    def add_dir(raw: str, path: str) -> None:
        if is_outdir(path):
            out.problems.append((raw, "a convlens run directory (OUTDIR), not an input"))
            return
        files, others = _walk(path, out.problems)
        if not files:
            extra = f" ({others} other file{'s' if others != 1 else ''})" if others else ""
            out.problems.append((raw, f"no image files in this directory{extra}"))
        for f in files:
            add(f)

    for raw in inputs:
        path = os.path.expanduser(raw)
        if os.path.isdir(path):
            add_dir(raw, path)
        elif os.path.exists(path):
            add(path)
        elif _GLOB_CHARS & set(path):
            matches = sorted(glob.glob(path, recursive=True))
            if not matches:
                out.problems.append((raw, "no match for this pattern"))
                continue
            n_images = 0
            walked: list[str] = []  # "dir/**" also matches every subdirectory: walk once
            for m in matches:
                if _inside_outdir(m, known):
                    continue
                if os.path.isdir(m):
                    if any(m.startswith(w) for w in walked):
                        continue
                    walked.append(os.path.join(m, ""))
                    files, _ = _walk(m, out.problems)
                    n_images += len(files)
                    for f in files:
                        add(f)
                elif is_image_name(m):
                    n_images += 1
                    add(m)
            if n_images == 0:
                out.problems.append(
                    (raw, f"pattern matched {len(matches)} path(s), none of them an image")
                )
        elif os.path.lexists(path):
            out.problems.append((raw, "broken symbolic link"))
        else:
            out.problems.append((raw, "no such file or directory"))
    return out
