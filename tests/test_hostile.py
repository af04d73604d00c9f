"""The hostile corpus (tests/hostile.py) against the input path: decompression bombs
refused from the size and memory their decoder would really use (issue 14.6).  JPEG
damage and stderr (14.15, 14.18): tests/test_hostile_native.py."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import hostile as H
import numpy as np
import pytest
from PIL import Image

from convlens.engine.images import read_image, sniff

HERE = Path(__file__).parent
REPO = HERE.parent


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bombs")
    out = {}
    for name, data in H.bombs().items():
        (root / name).write_bytes(data)
        out[name] = root / name
    return out


# ---------------------------------------------------------------------------------------
# 14.6: the size the decoder will really use
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dib", H.DIB_SIZES)
def test_bmp_every_dib_header_size_is_read(tmp_path: Path, dib: int) -> None:
    """The sniffed size is the size OpenCV decodes, for every DIB header length (and
    Pillow's, for the lengths Pillow reads)."""
    data, ramp = H.bmp_small(dib)
    h = sniff(data)
    assert h is not None and (h.format, h.width, h.height) == ("BMP", 7, 5)
    raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    path = tmp_path / f"v{dib}.bmp"
    path.write_bytes(data)
    if dib == 16:  # OpenCV has no reader for the short OS/2 2.x header
        assert raw is None
        assert H.refusal(path) == "truncated or corrupt image data (BMP)"
    else:
        np.testing.assert_array_equal(raw, ramp)
        np.testing.assert_array_equal(read_image(path)[:, :, 0], ramp)
    if dib in (12, 40, 52, 56, 64, 108, 124):
        assert Image.open(io.BytesIO(data)).size == (7, 5)


@pytest.mark.parametrize(
    "name",
    ["bmp36_rle8.bmp", "hdr_long_header.hdr", "avif_lying_ispe.avif", "pnm_long_comment.ppm"]
    + ["pam_long_comment.pam", "jp2_lying_ihdr.jp2"]
    + [f"bmp{dib}.bmp" for dib in H.DIB_SIZES],
)
def test_bombs_refused_from_their_real_size_without_decoding(
    bombs: dict[str, Path], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = {"hdr": "16384x16384", "avif": "4096x4096", "ppm": "20000x20000"}
    sizes |= {"pam": "20000x20000", "jp2": "2048x2048"}
    ext = name.rsplit(".", 1)[1]
    want = sizes.get(ext, "65535x32767" if name == "bmp12.bmp" else "32768x32767")

    def no_decode(*args: object) -> None:
        raise AssertionError("imdecode must not be reached")

    monkeypatch.setattr(cv2, "imdecode", no_decode)
    msg = H.refusal(bombs[name], max_pixels=1_000_000)
    assert msg.startswith(f"image too large: {want} = "), msg


def test_long_headers_of_real_images_are_read_to_their_end(tmp_path: Path) -> None:
    """HDR, PNM and PAM headers longer than any fixed window: the sniffed size is the
    decoded one, and the image decodes."""
    for name, data in {
        "a.hdr": H.hdr(7, 5, header_bytes=70_000, pixels=True),
        "b.hdr": H.hdr_rle(9, 6, header_bytes=70_000),
        "c.ppm": H.pnm(7, 5, comment_bytes=10_000, pixels=True),
        "d.pam": H.pam(7, 5, comment_bytes=10_000, pixels=True),
    }.items():
        path = tmp_path / name
        path.write_bytes(data)
        raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        h = sniff(data)
        assert h is not None and (h.height, h.width) == raw.shape[:2], name
        assert read_image(path).shape == (*raw.shape[:2], 3)


def test_avif_size_is_the_av1_sequence_header_not_ispe(tmp_path: Path) -> None:
    if not cv2.haveImageWriter("x.avif"):
        pytest.skip("this OpenCV writes no AVIF")
    data = H.avif_lying_ispe(64, 48, ispe=(10, 10))
    raw = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert raw.shape[:2] == (10, 10)  # what OpenCV returns: ispe's size
    h = sniff(data)
    assert h is not None and (h.width, h.height) == (64, 48)  # what dav1d decoded
    path = tmp_path / "lie.avif"
    path.write_bytes(data)
    assert H.refusal(path, max_pixels=64 * 48 - 1).startswith("image too large: 64x48")
    honest = tmp_path / "honest.avif"
    honest.write_bytes(H.avif_lying_ispe(64, 48, ispe=(64, 48)))
    assert read_image(honest).shape == (48, 64, 3)
    # no AV1 sequence header to be found: the decoder's size is unknown, so refused
    broken = bytearray(data)
    mdat = bytes(broken).find(b"mdat") + 4
    broken[mdat:] = bytes([0x80]) * (len(broken) - mdat)
    path.write_bytes(bytes(broken))
    assert H.refusal(path).startswith("not a readable AVIF (no AV1 sequence header")


def _depth_cases() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    out = []
    for dtype in (np.uint8, np.uint16, np.float32):
        for channels in (1, 3):
            top = 1.0 if dtype == np.float32 else np.iinfo(dtype).max
            arr = (rng.random((5, 7, channels)) * top).astype(dtype)
            arr = arr[:, :, 0] if channels == 1 else arr
            pnm = ".ppm" if channels == 3 else ".pgm"
            ints = (".png", ".tiff", pnm) + ((".pam",) if dtype == np.uint8 else ())
            for ext in ints if dtype != np.float32 else (".tiff", ".pfm", ".hdr"):
                if ext == ".hdr" and channels == 1:
                    continue
                out.append((ext, arr))
    return out


@pytest.mark.parametrize(("ext", "arr"), _depth_cases(), ids=lambda v: getattr(v, "dtype", v))
def test_sample_size_is_the_decoded_one(ext: str, arr: np.ndarray) -> None:
    """The header's sample size is the one OpenCV decodes to: a 16-bit or float image
    costs 2 or 4 times the memory of an 8-bit one, and counts so against the limit."""
    data = H._encoded(ext, arr)
    _same_depth(data)


@pytest.mark.parametrize("bits", [8, 10, 12])
def test_avif_sample_size_follows_its_bit_depth(bits: int) -> None:
    if not cv2.haveImageWriter("x.avif"):
        pytest.skip("this OpenCV writes no AVIF")
    arr = (np.random.default_rng(bits).random((5, 7, 3)) * (2**bits - 1)).astype(
        np.uint8 if bits == 8 else np.uint16
    )
    _same_depth(H._encoded(".avif", arr, (cv2.IMWRITE_AVIF_DEPTH, bits)))


def _same_depth(data: bytes) -> None:
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    h = sniff(data)
    assert h is not None and (h.width, h.height) == (7, 5)
    assert h.sample_bytes == decoded.dtype.itemsize, (h, decoded.dtype)


def test_deep_images_count_their_depth_against_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.hdr"
    path.write_bytes(H.hdr_rle(300, 200))
    assert read_image(path, max_pixels=240_000).shape == (200, 300, 3)
    assert H.refusal(path, max_pixels=239_999) == (
        "image too large: 300x200 = 0.1 Mpx; decoding this 32-bit HDR takes the memory of "
        "0.2 Mpx at 8 bits, over the limit of 0.2 Mpx (--max-pixels)"
    )


def test_hostile_headers_are_read_in_linear_time() -> None:
    """A header that is all comments (PNM, PAM, HDR: 32 MB of them) or an AVIF ``iloc``
    listing 100,000 items of 65,535 empty extents each is read in well under a second,
    not character by character or extent by extent."""
    import struct
    import time

    comments = (b"# " + b"c" * 60 + b"\n") * (32 << 20 >> 6)
    ftyp = struct.pack(">I4s4sI4s", 20, b"ftyp", b"avif", 0, b"avif")
    items = struct.pack(">IHHH", 1, 0, 0, 65535) * 100_000
    iloc = b"\x02\x00\x00\x00" + b"\x00\x00" + struct.pack(">I", 2**32 - 1) + items
    meta = b"\x00" * 4 + struct.pack(">I4s", 8 + len(iloc), b"iloc") + iloc
    cases = {
        "PNM": b"P6\n" + comments + b"7 5\n255\n",
        "PAM": b"P7\n" + comments + b"WIDTH 7\nHEIGHT 5\nENDHDR\n",
        "HDR": b"#?RADIANCE\n" + comments + b"FORMAT=32-bit_rle_rgbe\n\n-Y 5 +X 7\n",
        "AVIF": ftyp + struct.pack(">I4s", 8 + len(meta), b"meta") + meta,
    }
    for fmt, data in cases.items():
        t0 = time.perf_counter()
        h = sniff(data)
        assert time.perf_counter() - t0 < 1.0, fmt
        assert h is not None and h.format == fmt
        assert (h.width, h.height) == ((7, 5) if fmt != "AVIF" else (None, None))


_CHILD = """
import json, sys
from pathlib import Path
import convlens.engine.images as images

def hwm():
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmHWM:")) // 1024

if sys.argv[1] == "blind":  # as for a format the sniffer does not know
    images.sniff = lambda data: None
base, out = hwm(), {}
for p in sys.argv[2:]:
    try:
        img = images.read_image(p)
        out[Path(p).name] = f"ok {img.shape[1]}x{img.shape[0]}"
    except images.ImageError as exc:
        out[Path(p).name] = str(exc)
print(json.dumps({"base": base, "peak": hwm(), "out": out}))
"""


def _child(mode: str, paths: list[Path]) -> dict:
    res = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, *map(str, paths)],
        capture_output=True,
        text=True,
        cwd=paths[0].parent,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_bombs_peak_memory_and_opencv_cap_for_unknown_formats(bombs: dict[str, Path]) -> None:
    """Every bomb in a fresh process: refused, and the process' peak resident memory
    barely moves (before the fix: 6.2 GB for the 36-byte-DIB BMP, 9.3 GB for the HDR).
    Then again with the sniffer blinded, as for a format it does not know: OpenCV's own
    cap (``OPENCV_IO_MAX_IMAGE_PIXELS``, set by convlens.engine before cv2 loads)
    refuses every header-stated size past the limit."""
    got = _child("sniff", list(bombs.values()))
    assert got["peak"] - got["base"] < 100, got
    assert all(not v.startswith("ok") for v in got["out"].values()), got["out"]
    stated = [bombs[n] for n in ("bmp36_rle8.bmp", "hdr_long_header.hdr", "bmp40.bmp")]
    blind = _child("blind", stated)
    assert blind["peak"] - blind["base"] < 100, blind
    for msg in blind["out"].values():
        assert msg == (
            "image too large for the decoder: its header states more than "
            "179.0 Mpx (OPENCV_IO_MAX_IMAGE_PIXELS)"
        )


def test_pixel_budget_lets_one_large_decode_at_a_time() -> None:
    """Decoding threads together hold at most the budget of pixels (issue 14.6: memory
    multiplied by the number of workers); one image larger than it runs alone."""
    from convlens.engine import codec

    budget = codec._PixelBudget(100)
    big_in = threading.Event()

    def big() -> None:
        with budget.hold(60):
            big_in.set()

    with budget.hold(80):
        with budget.hold(20):  # 80 + 20 fits
            pass
        t = threading.Thread(target=big)
        t.start()
        assert not big_in.wait(0.3)  # 80 + 60 does not: it waits
    assert big_in.wait(5)  # and goes once the 80 are given back
    t.join()
    with budget.hold(10**9):  # larger than the budget: alone, not never
        pass
