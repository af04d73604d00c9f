"""The hostile corpus against what codec libraries print: a JPEG's damage is known from
libjpeg's own warning, not a marker search (issue 14.15), and a run's stderr holds
convlens' own lines, one escaped line per bad input, and nothing else (14.18)."""

from __future__ import annotations

import concurrent.futures as cf
import io
import platform
import re
import subprocess
import sys
from pathlib import Path

import cv2
import hostile as H
import numpy as np
import pytest
from PIL import Image

from convlens.engine.images import ImageError, read_image

# libjpeg's warnings are read from C's stderr, which convlens redirects on glibc only
needs_capture = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"),
    reason="C's stderr is captured on Linux with glibc only",
)


# ---------------------------------------------------------------------------------------
# 14.15: a JPEG's damage is the decoder's word, not a marker search
# ---------------------------------------------------------------------------------------


@needs_capture
@pytest.mark.parametrize("progressive", [False, True])
@pytest.mark.parametrize("keep", [0.3, 0.6, 0.9])
def test_jpeg_cut_mid_scan_with_end_marker_after_the_cut(
    tmp_path: Path, keep: float, progressive: bool
) -> None:
    data = H.jpeg_cut_with_end_marker(H.jpeg(H.photo(), progressive), keep)
    raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert raw is not None  # OpenCV alone calls it a success (grey where data ran out)
    path = tmp_path / "cut.jpg"
    path.write_bytes(data)
    msg = H.refusal(path)
    assert msg.startswith("truncated or corrupt image data (JPEG decoder: "), msg
    assert "premature end" in msg.lower()


@needs_capture
def test_jpeg_damage_after_stray_header_bytes_is_still_seen(tmp_path: Path) -> None:
    """libjpeg prints only an image's first warning: the one about stray bytes between
    header segments must not hide the premature end that follows."""
    data = H.jpeg_stray_bytes(H.jpeg(H.photo()))
    sos = data.find(b"\xff\xda")
    path = tmp_path / "stray_then_cut.jpg"
    path.write_bytes(data[: sos + (len(data) - sos) // 2] + b"\xff\xd9")
    assert "premature end" in H.refusal(path)


@needs_capture
def test_jpeg_garbage_in_the_scan_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "garbage.jpg"
    path.write_bytes(H.jpeg_garbage_in_scan(H.jpeg(H.photo())))
    assert H.refusal(path).startswith("truncated or corrupt image data (JPEG decoder: ")


def test_jpeg_warnings_that_leave_the_image_whole_are_fine(tmp_path: Path) -> None:
    clean = H.jpeg(H.photo())
    path = tmp_path / "stray.jpg"
    path.write_bytes(H.jpeg_stray_bytes(clean))
    ref = np.asarray(Image.open(io.BytesIO(clean)).convert("RGB"))
    assert np.abs(read_image(path).astype(int) - ref).max() <= 3


@needs_capture
def test_native_stream_parser_keeps_stray_nuls_as_text() -> None:
    from convlens.engine import nativelog

    ch = nativelog._Channel()
    cap = nativelog.Capture()
    ch._pending[7] = cap
    rest = ch._parse(b"before\0CL:S7\0bad\0nul\0CL:E7\0after\0CL:S")
    assert cap.text == "badnul" and cap.done.is_set() and cap.alone
    assert rest == b"\0CL:S"  # an incomplete marker waits for the next read


@needs_capture
def test_damage_is_told_apart_between_parallel_decodes(tmp_path: Path) -> None:
    """Decodes run in threads and libjpeg's warnings share one stream: each warning is
    pinned on the image that caused it, whatever else was decoding then."""
    clean = H.jpeg(H.photo(2, (240, 320)))
    kinds = {
        "ok": clean,
        "stray": H.jpeg_stray_bytes(clean),
        "cut": H.jpeg_cut_with_end_marker(clean, 0.5),
        "garbage": H.jpeg_garbage_in_scan(clean),
    }
    paths = []
    for i in range(64):
        kind = list(kinds)[i % 4 if i % 3 else 0]
        paths.append(tmp_path / f"{i:02d}_{kind}.jpg")
        paths[-1].write_bytes(kinds[kind])

    def outcome(p: Path) -> bool:
        try:
            read_image(p)
            return True
        except ImageError:
            return False

    with cf.ThreadPoolExecutor(8) as pool:
        ok = dict(zip(paths, pool.map(outcome, paths), strict=True))
    for p, good in ok.items():
        assert good == (p.stem.split("_")[1] in ("ok", "stray")), p.name


# ---------------------------------------------------------------------------------------
# 14.18: stderr holds convlens' own lines, one per bad input, and nothing else
# ---------------------------------------------------------------------------------------


@needs_capture
def test_run_stderr_is_one_escaped_line_per_bad_input(
    tmp_path: Path, demo_model: tuple[Path, Path]
) -> None:
    model, photos = demo_model
    inputs = tmp_path / "in"
    inputs.mkdir()
    photo = H.photo()
    clean = H.jpeg(photo)
    good = {
        "stray_bytes.jpg": H.jpeg_stray_bytes(clean),  # libjpeg warns
        "bad_text_crc.png": H.png_bad_ancillary_crc(photo),  # libpng warns
        "unknown_tag.tif": H.tiff_unknown_tag(photo),  # libtiff warns
        **{name: clean for name in H.HOSTILE_NAMES},
    }
    bad = {
        "cut.jpg": H.jpeg_cut_with_end_marker(clean, 0.5),
        "cut_progressive.jpg": H.jpeg_cut_with_end_marker(H.jpeg(photo, True), 0.5),
        "garbage.jpg": H.jpeg_garbage_in_scan(clean),
        "lying.jp2": H.jp2_lying_ihdr(64, 48),  # OpenJPEG logs two errors
        "dib36.bmp": H.bmp(32768, 32767, dib=36),
        "truncated.png": H.png_bad_ancillary_crc(photo)[:200],
        **{"cut_" + name: H.jpeg_cut_with_end_marker(clean, 0.4) for name in H.HOSTILE_NAMES},
    }
    for name, data in {**good, **bad}.items():
        (inputs / name).write_bytes(data)
    res = subprocess.run(
        [sys.executable, "-c", "from convlens.cli import main; main()", "run", str(model)]
        + [str(inputs), "-o", str(tmp_path / "out")],  # --device auto: onnxruntime may talk
        capture_output=True,
        cwd=tmp_path,
        timeout=300,
    )
    err = res.stderr.decode("utf-8", "replace")
    lines = err.splitlines()
    assert res.returncode == 1, err  # some inputs failed
    assert "\x1b" not in err and "\x07" not in err
    per_input = [ln for ln in lines if ln.startswith(str(inputs) + "/")]
    named = sorted(ln[len(str(inputs)) + 1 :].split(": ", 1)[0] for ln in per_input)
    shown = {"\n": "\\n", "\x1b": "\\x1b", "\x07": "\\x07", "\udce9": "\ufffd"}
    want = []
    for name in bad:
        for raw, escaped in shown.items():
            name = name.replace(raw, escaped)
        want.append(name)
    assert named == sorted(want), err
    summary = [ln for ln in lines if re.match(r"\d+ ok, \d+ failed \(", ln)]
    assert len(summary) == 1 and summary[0].startswith(f"{len(good)} ok, {len(bad)} failed")
    assert lines[-1] == f"report: {tmp_path / 'out' / 'index.html'}", err
    notes = [ln for ln in lines if ln.startswith("CUDA not available (") and ln.endswith("CPU")]
    assert len(notes) <= 1, err  # convlens' own line where CUDA does not load
    assert len(lines) == len(per_input) + len(notes) + 2, err  # nothing else at all
