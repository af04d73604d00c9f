"""Where the report's files go in OUTDIR: folder and file names, the names a record id,
a CAM method or a layer becomes on disk (never escaping their folder), and the cleaners
that remove only what the report side makes."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

from convlens.engine.results import refuse_links

ASSETS_DIR = "assets"
THUMBS_DIR = "thumbs"
CAMS_DIR = "cams"
GRIDS_DIR = "grids"
CLASS_CAMS_DIR = "class_cams"
ASSETS_JSON = "assets.json"
#: the extension of grid files (runs before the PNG grids wrote ".jpg")
GRID_EXT = ".png"

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HEX_ID = re.compile(r"[0-9a-f]{8,64}")


# ---- names ---------------------------------------------------------------------------
def safe_name(text: str) -> str:
    """A file-name-safe, deterministic, collision-resistant stand-in for ``text``.

    Plain names (letters, digits, ``_.-``, not starting with a dot) are kept as they are;
    anything else becomes a slug plus 8 hex digits of its sha1.
    """
    if _SAFE_NAME.fullmatch(text):
        return text
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._-")[:40] or "x"
    return f"{slug}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:8]}"


def safe_id(record_id: str) -> str:
    """The file-name form of a record id (the engine's ids are hex and kept as they are)."""
    return record_id if _HEX_ID.fullmatch(record_id) else safe_name(record_id)


def cam_file_name(method: str, class_index: int) -> str:
    return f"{safe_name(method)}_{int(class_index)}.png"


def grid_file_name(layer: str) -> str:
    """Grids are paletted PNG at the maps' own size (``imaging.encode_grid``): lossless,
    as fast to make as JPEG and about as small (before: JPEG of upscaled tiles)."""
    return f"{safe_name(layer)}{GRID_EXT}"


def list_dir(path: Path) -> set[str]:
    """The names in a folder, temporaries (dot names) left out; none when it is not
    there or cannot be read (a reader of assets shows what it finds)."""
    try:
        with os.scandir(path) as it:
            return {e.name for e in it if not e.name.startswith(".")}
    except OSError:
        return set()


#: what the report side writes in OUTDIR: never followed if it is a symbolic link
REPORT_PATHS = (
    "index.html",
    "model.html",
    "images",
    "static",
    ASSETS_DIR,
    *(f"{ASSETS_DIR}/{d}" for d in (THUMBS_DIR, CAMS_DIR, GRIDS_DIR, CLASS_CAMS_DIR)),
    f"{ASSETS_DIR}/{ASSETS_JSON}",
)


def clean_temporaries(outdir: Path) -> int:
    """Remove the temporaries of atomic writes a killed run left in the report's own
    folders (``.<name>.<pid>.<n>.tmp``, the only temporary names the project makes);
    returns how many."""
    refuse_links(outdir, REPORT_PATHS)
    root = Path(outdir)
    n = 0
    patterns: tuple[str, ...] = ("images/.*.tmp", "static/.*.tmp", f"{ASSETS_DIR}/.*.tmp")
    patterns += tuple(f"{ASSETS_DIR}/{d}/.*.tmp" for d in (THUMBS_DIR, CLASS_CAMS_DIR))
    patterns += tuple(f"{ASSETS_DIR}/{d}/*/.*.tmp" for d in (CAMS_DIR, GRIDS_DIR))
    for pattern in patterns:
        for tmp in root.glob(pattern):
            if tmp.is_file() and not tmp.is_symlink():
                tmp.unlink(missing_ok=True)
                n += 1
    return n


def clean_assets(outdir: Path) -> None:
    """Remove what the sink wrote (only the names it makes): assets/{thumbs,cams,grids,
    class_cams} and assets.json."""
    refuse_links(outdir, REPORT_PATHS)
    root = Path(outdir) / ASSETS_DIR
    for sub in (THUMBS_DIR, CAMS_DIR, GRIDS_DIR, CLASS_CAMS_DIR):
        shutil.rmtree(root / sub, ignore_errors=True)
    (root / ASSETS_JSON).unlink(missing_ok=True)
