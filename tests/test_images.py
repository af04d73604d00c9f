"""Discovery, decoding and preprocessing on real photos (scikit-image's bundled data)."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps
from skimage import data as skdata

from convlens.engine import images
from convlens.engine.contract import InputSpec, Preprocess
from convlens.engine.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageError,
    Preprocessor,
    decode_image,
    discover,
    preprocess,
    preprocess_into,
    read_image,
    sniff,
)

CHELSEA = skdata.chelsea()  # (300, 451, 3) RGB uint8
COFFEE = skdata.coffee()  # (400, 600, 3)
ASTRONAUT = skdata.astronaut()  # (512, 512, 3)


def _pil_bytes(arr: np.ndarray, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def _pil_rgb(data: bytes, transpose: bool = False) -> np.ndarray:
    im: Image.Image = Image.open(io.BytesIO(data))
    if transpose:
        im = ImageOps.exif_transpose(im)
    return np.asarray(im.convert("RGB"))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def _check(img: np.ndarray, shape: tuple[int, ...]) -> None:
    assert img.dtype == np.uint8
    assert img.shape == shape
    assert img.flags["C_CONTIGUOUS"]


# ---------------------------------------------------------------------------------------
# decoding: formats
# ---------------------------------------------------------------------------------------


def test_exr_not_listed_because_opencv_cannot_read_it() -> None:
    assert ".exr" not in IMAGE_EXTENSIONS
    assert not cv2.haveImageWriter("x.exr")


@pytest.mark.parametrize("ext", sorted(IMAGE_EXTENSIONS))
def test_every_listed_extension_decodes(tmp_path: Path, ext: str) -> None:
    small = CHELSEA[::4, ::4].copy()  # (75, 113, 3)
    path = tmp_path / f"img{ext}"
    bgr = np.ascontiguousarray(small[:, :, ::-1])
    if ext in (".jfif",):
        path.write_bytes(_pil_bytes(small, "JPEG"))
    elif ext == ".j2k":
        Image.fromarray(small).save(path)  # raw JPEG 2000 codestream
    elif ext == ".pxm":
        ok, buf = cv2.imencode(".ppm", bgr)
        path.write_bytes(buf.tobytes())
    elif ext == ".pam":  # a standard RGB PAM (OpenCV's own writer stores BGR tuples)
        head = b"P7\nWIDTH 113\nHEIGHT 75\nDEPTH 3\nMAXVAL 255\nTUPLTYPE RGB\nENDHDR\n"
        path.write_bytes(head + small.tobytes())
    elif ext in (".hdr", ".pic", ".pfm"):
        assert cv2.imwrite(str(path), bgr.astype(np.float32) / 255.0)
    elif ext in (".pgm", ".pbm"):
        assert cv2.imwrite(str(path), cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    else:
        assert cv2.imwrite(str(path), bgr)
    img = read_image(path)
    _check(img, small.shape)
    header = sniff(path.read_bytes())
    assert header is not None
    assert (header.width, header.height) == (113, 75)
    lossless = {".png", ".bmp", ".dib", ".tif", ".tiff", ".ppm", ".pnm", ".pxm", ".pam"}
    lossless |= {".sr", ".ras"}
    if ext in lossless | {".pfm"}:
        assert _diff(img, small) == 0
    elif ext not in (".pgm", ".pbm", ".gif"):
        # lossy (JPEG, WebP, AVIF, JPEG 2000) or RGBE-quantised (HDR): close to the source
        assert np.abs(img.astype(np.float32) - small).mean() < 10.0


def test_jpeg_matches_pillow(tmp_path: Path) -> None:
    data = _pil_bytes(COFFEE, "JPEG", quality=90)
    img = read_image(_write(tmp_path / "coffee.jpg", data))
    _check(img, COFFEE.shape)
    ref = _pil_rgb(data)
    assert _diff(img, ref) <= 3
    assert np.abs(img.astype(np.float32) - ref).mean() < 0.5


@pytest.mark.parametrize(
    ("name", "kw"), [("png", {}), ("bmp", {}), ("tiff", {}), ("webp", {"lossless": True})]
)
def test_lossless_formats_are_exact(tmp_path: Path, name: str, kw: dict[str, object]) -> None:
    data = _pil_bytes(CHELSEA, name.upper(), **kw)
    img = read_image(_write(tmp_path / f"c.{name}", data))
    _check(img, CHELSEA.shape)
    assert _diff(img, CHELSEA) == 0


def test_lossy_webp(tmp_path: Path) -> None:
    data = _pil_bytes(ASTRONAUT, "WEBP", quality=90)
    img = read_image(_write(tmp_path / "a.webp", data))
    assert _diff(img, _pil_rgb(data)) <= 3


def test_16bit_png_is_divided_by_257_and_rounded(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x16 = (CHELSEA.astype(np.uint16) * 257 + rng.integers(-128, 129, CHELSEA.shape)).clip(0, 65535)
    x16 = x16.astype(np.uint16)
    path = tmp_path / "deep.png"
    assert cv2.imwrite(str(path), np.ascontiguousarray(x16[:, :, ::-1]))
    img = read_image(path)
    _check(img, CHELSEA.shape)
    assert np.array_equal(img, np.round(x16 / 257.0).astype(np.uint8))


def test_16bit_grayscale_png(tmp_path: Path) -> None:
    gray16 = np.arange(256 * 256, dtype=np.uint16).reshape(256, 256)
    path = tmp_path / "g16.png"
    assert cv2.imwrite(str(path), gray16)
    img = read_image(path)
    expected = np.round(gray16 / 257.0).astype(np.uint8)
    assert np.array_equal(img, np.repeat(expected[:, :, None], 3, axis=2))


def test_to_uint8_every_16bit_value() -> None:
    x = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    assert np.array_equal(images._to_uint8(x), np.round(x / 257.0).astype(np.uint8))


def test_to_uint8_float_clips() -> None:
    x = np.array([[-1.0, 0.0, 0.5, 1.0, 7.0, np.nan]], np.float32)
    assert images._to_uint8(x).tolist() == [[0, 0, 128, 255, 255, 0]]


def test_rgba_png_drops_alpha_like_pil_convert_rgb(tmp_path: Path) -> None:
    alpha = np.linspace(0, 255, CHELSEA.shape[1], dtype=np.uint8)[None, :].repeat(300, 0)
    data = _pil_bytes(np.dstack([CHELSEA, alpha]), "PNG")
    img = read_image(_write(tmp_path / "rgba.png", data))
    _check(img, CHELSEA.shape)
    assert _diff(img, CHELSEA) == 0
    assert _diff(img, _pil_rgb(data)) == 0


def test_palette_png_with_transparency(tmp_path: Path) -> None:
    pal = Image.fromarray(COFFEE).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=0)
    img = read_image(_write(tmp_path / "pal.png", buf.getvalue()))
    _check(img, COFFEE.shape)
    assert _diff(img, _pil_rgb(buf.getvalue())) == 0


def test_grayscale_png_is_replicated(tmp_path: Path) -> None:
    gray = np.asarray(Image.fromarray(ASTRONAUT).convert("L"))
    img = read_image(_write(tmp_path / "g.png", _pil_bytes(gray, "PNG")))
    _check(img, (512, 512, 3))
    for c in range(3):
        assert np.array_equal(img[:, :, c], gray)


def test_gif_matches_pillow(tmp_path: Path) -> None:
    data = _pil_bytes(CHELSEA, "GIF")
    img = read_image(_write(tmp_path / "c.gif", data))
    assert _diff(img, _pil_rgb(data)) == 0


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
def test_jpeg_exif_orientation_matches_pil_exif_transpose(tmp_path: Path, orientation: int) -> None:
    src = Image.fromarray(CHELSEA[:, :400])  # non-square, so rotations change the shape
    exif = src.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    src.save(buf, "JPEG", quality=95, exif=exif)
    img = read_image(_write(tmp_path / f"o{orientation}.jpg", buf.getvalue()))
    ref = _pil_rgb(buf.getvalue(), transpose=True)
    assert img.shape == ref.shape
    assert (img.shape[:2] == (400, 300)) == (orientation >= 5)
    assert _diff(img, ref) <= 3


@pytest.mark.parametrize("orientation", [3, 6])
def test_png_and_webp_exif_orientation(tmp_path: Path, orientation: int) -> None:
    src = Image.fromarray(CHELSEA[:, :400])
    exif = src.getexif()
    exif[0x0112] = orientation
    for fmt, kw in (("PNG", {}), ("WEBP", {"lossless": True})):
        buf = io.BytesIO()
        src.save(buf, fmt, exif=exif, **kw)
        img = read_image(_write(tmp_path / f"o.{fmt.lower()}", buf.getvalue()))
        assert _diff(img, _pil_rgb(buf.getvalue(), transpose=True)) == 0


# ---------------------------------------------------------------------------------------
# decoding: bad inputs
# ---------------------------------------------------------------------------------------


def _reason(path: Path, **kw: int) -> str:
    with pytest.raises(ImageError) as info:
        read_image(path, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_empty_file(tmp_path: Path) -> None:
    assert _reason(_write(tmp_path / "empty.jpg", b"")) == "empty file (0 bytes)"


def test_text_named_jpg(tmp_path: Path) -> None:
    path = _write(tmp_path / "notes.jpg", b"these are not the pixels you are looking for\n" * 5)
    assert _reason(path) == "not an image (unrecognised format)"


@pytest.mark.parametrize("keep", [0.5, 0.9, -2])
def test_truncated_jpeg(tmp_path: Path, keep: float) -> None:
    data = _pil_bytes(COFFEE, "JPEG", quality=90)
    cut = data[: int(len(data) * keep)] if keep > 0 else data[: int(keep)]
    msg = _reason(_write(tmp_path / "cut.jpg", cut))
    assert msg.startswith("truncated or corrupt image data")


def test_truncated_progressive_jpeg(tmp_path: Path) -> None:
    data = _pil_bytes(COFFEE, "JPEG", quality=90, progressive=True)
    msg = _reason(_write(tmp_path / "cut.jpg", data[: len(data) // 2]))
    assert msg.startswith("truncated or corrupt image data")


def test_truncated_png(tmp_path: Path) -> None:
    data = _pil_bytes(COFFEE, "PNG")
    msg = _reason(_write(tmp_path / "cut.png", data[: len(data) // 2]))
    assert msg.startswith("truncated or corrupt image data")


@pytest.mark.parametrize("fmt", ["WEBP", "GIF", "TIFF", "BMP"])
def test_truncated_other_formats(tmp_path: Path, fmt: str) -> None:
    data = _pil_bytes(CHELSEA, fmt)
    msg = _reason(_write(tmp_path / f"cut.{fmt.lower()}", data[: len(data) // 2]))
    assert msg == f"truncated or corrupt image data ({'WebP' if fmt == 'WEBP' else fmt})"


def test_header_only_png(tmp_path: Path) -> None:
    data = _pil_bytes(CHELSEA, "PNG")
    assert _reason(_write(tmp_path / "h.png", data[:30])).startswith("truncated or corrupt")


def test_jpeg_with_trailing_data_is_fine(tmp_path: Path) -> None:
    # e.g. "motion photos" append a video after the end-of-image marker
    data = _pil_bytes(CHELSEA, "JPEG") + os.urandom(5000)
    _check(read_image(_write(tmp_path / "trail.jpg", data)), CHELSEA.shape)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert _reason(tmp_path / "nope.jpg") == "no such file"
    assert _reason(tmp_path) == "is a directory, not a file"


def test_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path / "locked.jpg", _pil_bytes(CHELSEA, "JPEG"))
    if os.geteuid() != 0:
        path.chmod(0)
        try:
            assert _reason(path) == "permission denied"
        finally:
            path.chmod(0o644)

    # as root chmod does not block reads: simulate the OS refusing the open
    def refuse(*args: object, **kw: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(images, "open", refuse, raising=False)
    assert _reason(path) == "permission denied"


def _png_with_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR (with a correct CRC) claims ``width x height``."""
    ok, buf = cv2.imencode(".png", np.zeros((1, 1, 3), np.uint8))
    data = bytearray(buf.tobytes())
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_bomb_png_refused_from_header_without_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path / "bomb.png", _png_with_size(100000, 100000))

    def no_decode(*args: object) -> None:
        raise AssertionError("imdecode must not be reached")

    monkeypatch.setattr(images.cv2, "imdecode", no_decode)
    assert _reason(path) == (
        "image too large: 100000x100000 = 10000.0 Mpx exceeds the limit of 179.0 Mpx (--max-pixels)"
    )


def test_bomb_jpeg_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = bytearray(_pil_bytes(CHELSEA, "JPEG"))
    h = sniff(bytes(data))
    assert h is not None and h.jpeg_scan is not None
    sof = bytes(data).find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, 60000, 60000)
    monkeypatch.setattr(images.cv2, "imdecode", None)  # would raise if called
    msg = _reason(_write(tmp_path / "bomb.jpg", bytes(data)))
    assert msg.startswith("image too large: 60000x60000 = 3600.0 Mpx")


def test_max_pixels_limit_and_off_switch(tmp_path: Path) -> None:
    path = _write(tmp_path / "c.jpg", _pil_bytes(CHELSEA, "JPEG"))
    msg = _reason(path, max_pixels=100_000)
    assert msg == "image too large: 451x300 = 0.1 Mpx exceeds the limit of 0.1 Mpx (--max-pixels)"
    _check(read_image(path, max_pixels=0), CHELSEA.shape)
    assert DEFAULT_MAX_PIXELS == 178_956_970


@pytest.mark.parametrize(
    ("fmt", "kw"),
    [
        ("PNG", {}),
        ("JPEG", {}),
        ("JPEG", {"progressive": True}),
        ("GIF", {}),
        ("BMP", {}),
        ("TIFF", {}),
        ("TIFF", {"big_tiff": True}),
        ("WEBP", {}),
        ("WEBP", {"lossless": True}),
        ("PPM", {}),
        ("JPEG2000", {}),
    ],
)
def test_sniff_sizes_and_robustness(fmt: str, kw: dict[str, object]) -> None:
    data = _pil_bytes(COFFEE, fmt, **kw)
    h = sniff(data)
    assert h is not None and (h.width, h.height) == (600, 400)
    alpha = _pil_bytes(np.dstack([CHELSEA, CHELSEA[:, :, :1]]), "WEBP") if fmt == "WEBP" else None
    if alpha is not None:  # VP8X
        ha = sniff(alpha)
        assert ha is not None and (ha.width, ha.height) == (451, 300)
    for cut in range(0, 80):  # never raises on a cut-off header
        sniff(data[:cut])
    assert sniff(b"hello") is None


# ---------------------------------------------------------------------------------------
# discovery
# ---------------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for rel in [
        "b/2.jpg",
        "b/10.png",
        "a/x.JPEG",
        "a/deep/y.webp",
        "top.bmp",
        "a/notes.txt",
        ".hidden/z.jpg",
        "a/.secret.jpg",
        "a-b/w.jpg",
    ]:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.md").write_text("hi")
    (tmp_path / "lonely.txt").write_text("not an image")
    return tmp_path


def test_discover_walks_sorted_filtered(tree: Path) -> None:
    out = discover([str(tree / "photos")])
    rel = [p.relative_to(tree / "photos").as_posix() for p in out.files]
    assert rel == ["a/deep/y.webp", "a/x.JPEG", "a-b/w.jpg", "b/10.png", "b/2.jpg", "top.bmp"]
    assert all(p.is_absolute() for p in out.files)
    assert out.problems == []


def test_discover_order_explicit_files_and_dedup(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tree)
    out = discover(["lonely.txt", "photos/b", "photos/b/2.jpg", "photos"])
    names = [p.relative_to(tree).as_posix() for p in out.files]
    assert names == [
        "lonely.txt",  # named explicitly: taken whatever its extension
        "photos/b/10.png",
        "photos/b/2.jpg",
        "photos/a/deep/y.webp",
        "photos/a/x.JPEG",
        "photos/a-b/w.jpg",
        "photos/top.bmp",
    ]
    assert out.files[0] == tree / "lonely.txt"


def test_discover_globs(tree: Path) -> None:
    out = discover([str(tree / "photos" / "**" / "*.jpg"), str(tree / "photos" / "*")])
    rel = [p.relative_to(tree / "photos").as_posix() for p in out.files]
    assert rel == [
        "a-b/w.jpg",
        "b/2.jpg",  # recursive glob, sorted; hidden entries not matched
        "a/deep/y.webp",  # "photos/*": directories walked, files filtered by extension
        "a/x.JPEG",
        "b/10.png",
        "top.bmp",
    ]
    assert out.problems == []


def test_discover_double_star_walks_once(tree: Path) -> None:
    out = discover([str(tree / "photos" / "**")])
    rel = [p.relative_to(tree / "photos").as_posix() for p in out.files]
    assert rel == ["a/deep/y.webp", "a/x.JPEG", "a-b/w.jpg", "b/10.png", "b/2.jpg", "top.bmp"]


def test_discover_follows_symlinked_dirs_without_looping(tmp_path: Path) -> None:
    root = tmp_path / "r"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "p.png").write_bytes(b"x")
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    (root / "alias").symlink_to(root / "sub", target_is_directory=True)
    out = discover([str(root)])
    rel = [p.relative_to(root).as_posix() for p in out.files]
    assert rel == ["alias/p.png"]  # directories visited in sorted order, each real one once


def test_discover_problems(tree: Path) -> None:
    inputs = [
        str(tree / "missing.jpg"),
        str(tree / "empty"),
        str(tree / "docs"),
        str(tree / "nothing*.png"),
        str(tree / "docs" / "*"),
    ]
    out = discover(inputs)
    assert out.files == []
    assert out.problems == [
        (inputs[0], "no such file or directory"),
        (inputs[1], "no image files in this directory"),
        (inputs[2], "no image files in this directory (1 other file)"),
        (inputs[3], "no match for this pattern"),
        (inputs[4], "pattern matched 1 path(s), none of them an image"),
    ]


# ---------------------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------------------


def _spec(h: int, w: int, color_mode: str = "rgb") -> InputSpec:
    return InputSpec("image", h, w, 1 if color_mode == "grayscale" else 3, color_mode=color_mode)


def test_unit_is_keras_x_over_255() -> None:
    rgb = CHELSEA[:150, :150]
    y = preprocess(rgb, _spec(150, 150), Preprocess.parse("unit"))
    assert y.dtype == np.float32 and y.shape == (150, 150, 3)
    np.testing.assert_allclose(y, rgb.astype(np.float64) / 255.0, rtol=1e-6, atol=0)


def test_symmetric_caffe_imagenet_mean_std_by_hand() -> None:
    rgb = COFFEE[100:164, 200:264]
    x = rgb.astype(np.float64)
    spec = _spec(64, 64)
    np.testing.assert_allclose(
        preprocess(rgb, spec, Preprocess.parse("symmetric")), x / 127.5 - 1.0, atol=1e-6
    )
    bgr = x[:, :, ::-1]
    np.testing.assert_allclose(
        preprocess(rgb, spec, Preprocess.parse("caffe")),
        bgr - np.array([103.939, 116.779, 123.68]),
        rtol=1e-6,
        atol=1e-4,
    )
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(
        preprocess(rgb, spec, Preprocess.parse("imagenet")),
        (x / 255.0 - mean) / std,
        rtol=1e-5,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        preprocess(rgb, spec, Preprocess.parse("mean_std:0.5,0.5,0.5/0.25,0.25,0.25")),
        (x / 255.0 - 0.5) / 0.25,
        atol=1e-5,
    )
    assert np.array_equal(preprocess(rgb, spec, Preprocess.parse("none")), x.astype(np.float32))


def test_grayscale_is_itu601_luma_like_pil_convert_l() -> None:
    rgb = ASTRONAUT[:96, :128]
    y = preprocess(rgb, _spec(96, 128, "grayscale"), Preprocess.parse("none"))
    assert y.shape == (96, 128, 1)
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(y[:, :, 0] - luma).max() <= 0.5 + 1e-6
    pil_l = np.asarray(Image.fromarray(rgb).convert("L"), np.float32)
    assert np.abs(y[:, :, 0] - pil_l).max() <= 1.0


def test_shrink_uses_area_averaging() -> None:
    rgb = ASTRONAUT  # 512 -> 256: INTER_AREA = mean of each 2x2 block (rounded to uint8)
    y = preprocess(rgb, _spec(256, 256), Preprocess.parse("none"))
    blocks = rgb.astype(np.float64).reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))
    assert np.abs(y - blocks).max() <= 0.5 + 1e-6
    area = cv2.resize(rgb, (256, 256), interpolation=cv2.INTER_AREA)
    assert np.array_equal(y, area.astype(np.float32))


def test_stretch_ignores_aspect_and_enlarging_uses_linear() -> None:
    rgb = CHELSEA[:100, :50]  # enlarge width, shrink height -> INTER_LINEAR, stretched
    y = preprocess(rgb, _spec(80, 120), Preprocess.parse("none"))
    assert y.shape == (80, 120, 3)
    lin = cv2.resize(rgb, (120, 80), interpolation=cv2.INTER_LINEAR)
    assert np.array_equal(y, lin.astype(np.float32))


def test_preprocess_into_batch_row() -> None:
    spec, pre = _spec(64, 48), Preprocess.parse("imagenet")
    batch = np.zeros((3, 64, 48, 3), np.float32)
    ret = preprocess_into(COFFEE, spec, pre, batch[1])
    assert ret is not None and np.shares_memory(ret, batch)
    assert np.array_equal(batch[1], preprocess(COFFEE, spec, pre))
    assert not batch[0].any() and not batch[2].any()
    pp = Preprocessor(spec, pre)
    pp.into(CHELSEA, batch[2])
    assert np.array_equal(batch[2], pp(CHELSEA))
    wide = np.zeros((64, 48, 5), np.float32)  # a strided (non-contiguous) destination
    pp.into(CHELSEA, wide[:, :, 1:4])
    assert np.array_equal(wide[:, :, 1:4], batch[2]) and not wide[:, :, [0, 4]].any()
    gray = Preprocessor(_spec(64, 48, "grayscale"), Preprocess.parse("unit"))
    gwide = np.zeros((64, 48, 2), np.float32)
    gray.into(CHELSEA, gwide[:, :, :1])
    assert np.array_equal(gwide[:, :, :1], gray(CHELSEA))
    bgr = Preprocessor(spec, Preprocess.parse("caffe"))
    bwide = np.zeros((64, 48, 4), np.float32)
    bgr.into(COFFEE, bwide[:, :, :3])
    assert np.array_equal(bwide[:, :, :3], bgr(COFFEE))
    with pytest.raises(ValueError):
        pp.into(CHELSEA, np.zeros((64, 48, 3), np.float64))
    with pytest.raises(ValueError):
        pp.into(CHELSEA.astype(np.float32), batch[0])


def test_preprocess_spec_errors() -> None:
    with pytest.raises(ValueError, match="channels"):
        Preprocessor(InputSpec("image", 8, 8, 1), Preprocess.parse("unit"))
    with pytest.raises(ValueError, match="3 values for a 1-channel"):
        Preprocessor(_spec(8, 8, "grayscale"), Preprocess.parse("imagenet"))


def test_decode_then_preprocess_end_to_end(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.jpg", _pil_bytes(cv2.resize(ASTRONAUT, (640, 480)), "JPEG"))
    rgb = read_image(path)
    y = preprocess(rgb, _spec(150, 150), Preprocess.parse("unit"))
    assert y.shape == (150, 150, 3) and y.min() >= 0.0 and y.max() <= 1.0
    assert decode_image(path.read_bytes()).shape == (480, 640, 3)


def test_jpeg_with_stray_bytes_between_segments(tmp_path: Path) -> None:
    """libjpeg skips extraneous bytes before a marker; so must the truncation check."""
    import cv2 as _cv2

    ok, buf = _cv2.imencode(".jpg", np.full((16, 16, 3), 128, np.uint8))
    data = buf.tobytes()
    app0_end = 4 + ((data[4] << 8) | data[5])  # SOI (2) + APP0 marker (2) + length
    p = tmp_path / "stray.jpg"
    p.write_bytes(data[:app0_end] + b"\x00\x00" + data[app0_end:])
    assert read_image(p).shape == (16, 16, 3)


def test_tiff_bomb_with_unsorted_tags_is_refused(tmp_path: Path) -> None:
    import struct

    # a minimal little-endian TIFF header whose IFD lists ImageLength before ImageWidth
    entries = [(257, 4, 1, 100000), (256, 4, 1, 100000)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries)
    data = b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x00\x00\x00\x00"
    p = tmp_path / "bomb.tif"
    p.write_bytes(data)
    with pytest.raises(ImageError, match="too large"):
        read_image(p)


@pytest.mark.parametrize("ext", [".png", ".tiff"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_every_depth_and_channel_count_decodes_its_own_pixels(
    ext: str, dtype: type, channels: int
) -> None:
    """Each container x bit depth x channel count against the very array encoded, with a
    different image decoded just before (OpenCV 5 returned the previous image's pixels
    for 16-bit RGB TIFF: issue 14.2)."""
    rng = np.random.default_rng(channels * 7 + (dtype == np.uint16))
    top = 255 if dtype == np.uint8 else 65535
    shape = (37, 53) if channels == 1 else (37, 53, channels)
    src = rng.integers(0, top + 1, size=shape).astype(dtype)
    other = np.full_like(src, top // 3)
    ok1, enc = cv2.imencode(ext, src)
    ok2, enc_other = cv2.imencode(ext, other)
    assert ok1 and ok2
    decode_image(enc_other.tobytes())  # leaves its pixels in the decoder's memory
    got = decode_image(enc.tobytes())
    if dtype == np.uint16:
        src8 = np.round(src.astype(np.float64) / 257.0).astype(np.uint8)
    else:
        src8 = src
    if channels == 1:
        want = np.repeat(src8[:, :, None], 3, axis=2)
    else:
        want = src8[:, :, 2::-1]  # OpenCV stores BGR(A); the engine gives RGB, alpha dropped
    np.testing.assert_array_equal(got, want)


def _within(seconds: float, fn: Any) -> Any:
    """``fn()``'s result, failing (not hanging) when it takes longer than ``seconds``."""
    import threading

    box: list[Any] = []
    t = threading.Thread(target=lambda: box.append(_outcome(fn)), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s (a blocking read)"
    return box[0]


def _outcome(fn: Any) -> Any:
    try:
        return fn()
    except Exception as exc:  # handed back to the test thread, which asserts on it
        return exc


def test_fifo_device_and_sparse_giant_are_refused_before_reading(tmp_path: Path) -> None:
    """Issue 14.7 and 14.8: a FIFO named like a photo never blocks, /dev/zero is not
    read forever, and a 3 GB sparse .jpg is refused by its size, not read into memory."""
    import resource

    from convlens.engine.contract import ContractError, read_spec

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    got = _within(10, lambda: read_image(fifo))
    assert isinstance(got, ImageError) and str(got) == "not a regular file (a FIFO)"
    got = _within(10, lambda: read_image("/dev/zero"))
    assert isinstance(got, ImageError) and "character device" in str(got)
    sparse = tmp_path / "huge.jpg"
    with open(sparse, "wb") as f:
        f.write(b"\xff\xd8\xff")
        f.truncate(3 << 30)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    got = _within(10, lambda: read_image(sparse))
    assert isinstance(got, ImageError) and str(got).startswith("file too large (3072 MB")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100 * 1024  # KB
    model = tmp_path / "model.onnx"
    os.mkfifo(model)
    got = _within(10, lambda: read_spec(model))
    assert isinstance(got, ContractError) and "not a regular file" in str(got)


def test_walked_entries_that_are_not_files_are_recorded(tmp_path: Path) -> None:
    """Issue 14.17: a dangling link and a FIFO inside a walked folder are problems with
    their reason, like explicit paths, not silently skipped."""
    d = tmp_path / "photos"
    d.mkdir()
    cv2.imwrite(str(d / "real.png"), np.zeros((4, 4, 3), np.uint8))
    os.symlink(d / "gone.png", d / "dangling.png")
    os.mkfifo(d / "pipe.jpg")
    found = images.discover([str(d)])
    assert [f.name for f in found.files] == ["real.png"]
    assert sorted((Path(p).name, why) for p, why in found.problems) == [
        ("dangling.png", "broken symbolic link"),
        ("pipe.jpg", "not a regular file (a FIFO)"),
    ]
