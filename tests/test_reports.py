"""Fast tests of convlens.reports (no browser): assets, escaping, CSP, idempotence."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import weakref
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from convlens.engine.contract import ModelSpec
from convlens.engine.outdir import Record
from convlens.engine.sinks import ImageOutcome
from convlens.reports import ReportAssetSink, render_report
from convlens.reports import assets as A
from convlens.reports import imaging as I
from convlens.reports import layout as L
from convlens.reports.gridpolicy import GRID_NOTABLE

from report_fixtures import ODD_CLASS, XSS_NAME, FakeRun, make_fake_run

CSP = (
    "default-src 'none'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "base-uri 'none'; form-action 'none'"
)
PAGE_SIZE = 10


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> FakeRun:
    root = tmp_path_factory.mktemp("reports")
    run = make_fake_run(root / "out", 24, grid_sample=4, n_failed=3, batch_size=5)
    render_report(run.outdir, page_size=PAGE_SIZE)
    return run


def _text_files(outdir: Path) -> list[Path]:
    return sorted(p for p in outdir.rglob("*") if p.suffix in (".html", ".js", ".css"))


def _snapshot(outdir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(outdir)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(outdir.rglob("*"))
        if p.is_file()
    }


class _Audit(HTMLParser):
    """Collects what matters for escaping/CSP: tags, attributes, inline script bodies."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.in_script = False
        self.script_bodies: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self.in_script = True
            self.script_bodies.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self.in_script = False

    def handle_data(self, data: str) -> None:
        if self.in_script:
            self.script_bodies[-1] += data
        else:
            self.text.append(data)


def _audit(path: Path) -> _Audit:
    a = _Audit()
    a.feed(path.read_text(encoding="utf-8"))
    a.close()
    return a


def _gallery(outdir: Path) -> dict[str, Any]:
    js = (outdir / "static" / "gallery-data.js").read_text(encoding="ascii")
    prefix = "window.CONVLENS_GALLERY = "
    assert js.startswith(prefix) and js.endswith(";\n")
    doc: dict[str, Any] = json.loads(js[len(prefix) : -2])
    return doc


# ---- files ---------------------------------------------------------------------------
def test_outdir_layout(fake: FakeRun) -> None:
    out = fake.outdir
    for name in (
        "index.html",
        "model.html",
        "static/report.css",
        "static/report.js",
        "static/gallery-data.js",
        "static/cmap-inferno.png",
        "static/cmap-viridis.png",
        "assets/assets.json",
    ):
        assert (out / name).is_file(), name
    ok_ids = {r["id"] for r in fake.ok_records}
    assert {p.stem for p in (out / "images").glob("*.html")} == ok_ids
    assert {p.stem for p in (out / "assets" / "thumbs").glob("*.jpg")} == ok_ids
    for r in fake.ok_records:
        cams = {p.name for p in (out / "assets" / "cams" / r["id"]).iterdir()}
        assert cams == {f"{m}_{c}.png" for m in r["cam_methods"] for c in r["cam_classes"]}
    with np.load(out / "class_cams.npz") as z:
        predicted = {k for k in z.files if k.startswith("class_")}
    assert predicted and {p.name for p in (out / "assets" / "class_cams").iterdir()} == {
        f"{k}.png" for k in predicted
    }
    manifest = json.loads((out / "assets" / "assets.json").read_text())
    assert manifest["complete"] is True
    assert manifest["format"] == 2 and manifest["cam_files"] == "heatmap"
    assert manifest["counts"]["thumbnails"] == len(ok_ids)
    assert manifest["counts"]["errors"] == 3


def test_thumbnail_size(fake: FakeRun) -> None:
    r = fake.ok_records[0]
    thumb = cv2.imread(str(fake.outdir / "assets" / "thumbs" / f"{r['id']}.jpg"))
    assert thumb is not None
    h, w = thumb.shape[:2]
    longest = max(r["width"], r["height"])
    assert max(h, w) == min(256, longest)
    assert abs(w / h - r["width"] / r["height"]) < 0.02


def _fixture_maps(rec: dict[str, Any]) -> dict[tuple[str, int], np.ndarray]:
    """The raw maps the fixture handed the sink for ``rec`` (recomputed from the input)."""
    from report_fixtures import _maps

    bgr = cv2.imread(rec["path"], cv2.IMREAD_COLOR)
    assert bgr is not None
    return _maps(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), rec["cam_classes"])


def _expected_heatmap(raw: np.ndarray, f: int) -> np.ndarray:
    """BGR: the raw map normalised to 0..1 on its own, upsampled f times (INTER_LINEAR, as
    the overlays always were), colour-mapped with OpenCV."""
    m = raw.astype(np.float32)
    lo, hi = float(m.min()), float(m.max())
    norm = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    h, w = m.shape
    up = cv2.resize(norm, (w * f, h * f), interpolation=cv2.INTER_LINEAR)
    levels = np.clip(np.round(up.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    return cv2.applyColorMap(levels, cv2.COLORMAP_INFERNO)


def test_cam_heatmap_files_are_colour_mapped_maps(fake: FakeRun) -> None:
    """Every CAM file is a small colour PNG of the map's own shape (upsampled by a small
    integer factor, 7x7 -> 49x49) whose pixels are the inferno colours of the normalised
    raw map: not thumbnail-sized, not blended with the photo."""
    assert I.heatmap_scale(7, 7) == 7 and I.heatmap_scale(16, 16) == 3
    assert I.heatmap_scale(48, 20) == 1 and I.heatmap_scale(64, 64) == 1
    lut = I.colormap_lut(I.CAM_COLORMAP)
    for r in fake.ok_records[:3]:
        maps = _fixture_maps(r)
        assert len(maps) == len(r["cam_methods"]) * len(r["cam_classes"])
        for (method, cls), raw in maps.items():
            path = fake.outdir / "assets" / "cams" / r["id"] / f"{method}_{cls}.png"
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert path.stat().st_size < 4000
            heat = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            assert heat is not None
            assert raw.shape == (7, 7)
            assert heat.shape == (49, 49, 3)  # colour, no alpha
            expected = _expected_heatmap(raw, 7)
            # the same colours, give or take one colour-map step (rounding at .5)
            assert np.abs(heat.astype(int) - expected.astype(int)).max() <= 8
            assert (heat == expected).all(axis=2).mean() > 0.98
            # the hottest cell's centre is the top of the colour map, the coldest its bottom
            (hy, hx), (cy, cx) = (
                np.unravel_index(f(raw), raw.shape) for f in (np.argmax, np.argmin)
            )
            assert (heat[hy * 7 + 3, hx * 7 + 3] == lut[255]).all()
            assert (heat[cy * 7 + 3, cx * 7 + 3] == lut[0]).all()


def test_grid_files_match_geometry(fake: FakeRun) -> None:
    rid = fake.grid_ids[0]
    for name, s, k in [("conv1", 56, 16), ("conv4", 7, 128)]:
        path = fake.outdir / "assets" / "grids" / rid / f"{name}.png"
        assert path.read_bytes()[25] == 3  # IHDR colour type: paletted
        img = cv2.imread(str(path))
        assert img is not None
        assert img.shape[:2] == I.grid_file_shape(s, s, k)  # the maps' own size
    page = (fake.outdir / "images" / f"{rid}.html").read_text()
    h, w = I.grid_shape(7, 7, 128)  # on the page: as large as the upscaled grid was
    assert f'src="../assets/grids/{rid}/conv4.png"' in page and f'width="{w}" height="{h}"' in page
    assert (w, h) == (16 * 50 - 1, 8 * 50 - 1)


# ---- escaping, CSP, no network ------------------------------------------------------
def test_hostile_names_are_text_everywhere(fake: FakeRun) -> None:
    raw_markup = ["<img src=x onerror", "<svg onload", "<b>", "<i>CNN"]
    for path in _text_files(fake.outdir):
        text = path.read_text(encoding="utf-8")
        for bad in raw_markup:
            assert bad not in text, f"{bad!r} unescaped in {path}"
    # the gallery data has no markup characters at all, but the name survives as data
    js = (fake.outdir / "static" / "gallery-data.js").read_text(encoding="ascii")
    assert "<" not in js and ">" not in js
    gallery = _gallery(fake.outdir)
    assert any(item[1].endswith(XSS_NAME) for item in gallery["items"])
    assert ODD_CLASS in gallery["classes"]
    # the image page of the XSS-named file shows its name as text
    rec = fake.record_named(XSS_NAME)
    page = fake.outdir / "images" / f"{rec['id']}.html"
    assert "&lt;img src=x onerror=alert(1)&gt;.jpg" in page.read_text(encoding="utf-8")
    audit = _audit(page)
    assert any(XSS_NAME in t for t in audit.text)
    assert not any(tag == "img" and attrs.get("src") == "x" for tag, attrs in audit.tags)
    # failed inputs' names and reasons appear escaped on the index
    index = (fake.outdir / "index.html").read_text(encoding="utf-8")
    assert "&lt;svg onload=alert(2)&gt;.png" in index
    model = (fake.outdir / "model.html").read_text(encoding="utf-8")
    assert "odd &lt;b&gt;&amp;&#34;&#39; class" in model


def test_csp_and_no_inline_script_or_handlers(fake: FakeRun) -> None:
    pages = sorted(fake.outdir.rglob("*.html"))
    assert len(pages) == len(fake.ok_records) + 2
    for page in pages:
        audit = _audit(page)
        metas = [
            a
            for t, a in audit.tags
            if t == "meta" and a.get("http-equiv") == "Content-Security-Policy"
        ]
        assert [m.get("content") for m in metas] == [CSP], page
        for tag, attrs in audit.tags:
            handlers = [k for k in attrs if k.startswith("on")]
            assert not handlers, (page, tag, handlers)
            assert "style" not in attrs, (page, tag)
            if tag == "script":
                assert attrs.get("src"), page
            for key in ("href", "src"):
                v = attrs.get(key)
                if v is not None:
                    assert not re.match(r"^[a-z][a-z0-9+.-]*:|^//|^/", v, re.I), (page, v)
        assert all(not b.strip() for b in audit.script_bodies), page
        assert "<style" not in page.read_text(encoding="utf-8")


def test_no_network_urls(fake: FakeRun) -> None:
    for path in _text_files(fake.outdir):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"https?://", text), path
        assert "@import" not in text and "url(" not in text, path


# ---- render ------------------------------------------------------------------------
def test_render_is_idempotent(fake: FakeRun, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(fake.outdir, out)
    render_report(out, page_size=PAGE_SIZE)
    first = _snapshot(out)
    render_report(out, page_size=PAGE_SIZE)
    assert _snapshot(out) == first
    # and a fresh render from the run's own files gives the same report
    for p in ("index.html", "model.html", "images", "static", "assets/class_cams"):
        target = out / p
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
    render_report(out, page_size=PAGE_SIZE)
    assert _snapshot(out) == first


def test_stale_image_pages_are_removed(fake: FakeRun, tmp_path: Path) -> None:
    out = tmp_path / "stale"
    shutil.copytree(fake.outdir, out)
    stale = out / "images" / "deadbeefdeadbeef.html"
    stale.write_text("old")
    render_report(out, page_size=PAGE_SIZE)
    assert not stale.exists()
    assert len(list((out / "images").iterdir())) == len(fake.ok_records)


def test_gallery_data(fake: FakeRun) -> None:
    g = _gallery(fake.outdir)
    assert g["pageSize"] == PAGE_SIZE
    assert g["fields"] == ["id", "relpath", "pred", "prob", "label", "thumb", "overlay", "error"]
    items = g["items"]
    assert len(items) == len(fake.records)
    ok = [i for i in items if i[7] == ""]
    failed = [i for i in items if i[7] != ""]
    assert len(failed) == 3 and all(i[2] == -1 for i in failed)
    assert [i[1] for i in ok] == sorted(i[1] for i in ok)  # default order: relpath
    assert all(i[5] == 1 and i[6] == 0 for i in ok)  # thumbnail and overlay present
    assert g["overlays"] == ["cam"]


def test_image_pages_navigation_and_content(fake: FakeRun) -> None:
    g = _gallery(fake.outdir)
    order = [i[0] for i in g["items"] if i[7] == ""]
    by_id = {r["id"]: r for r in fake.ok_records}
    for pos, rid in enumerate(order):
        audit = _audit(fake.outdir / "images" / f"{rid}.html")
        rels = {a.get("rel"): a.get("href") for t, a in audit.tags if t == "a" and a.get("rel")}
        assert rels.get("prev") == (f"{order[pos - 1]}.html" if pos else None)
        assert rels.get("next") == (f"{order[pos + 1]}.html" if pos + 1 < len(order) else None)
        srcs = [str(a["src"]) for t, a in audit.tags if t == "img" and a.get("src")]
        rec = by_id[rid]
        assert f"../assets/thumbs/{rid}.jpg" in srcs
        heats = [
            str(a["src"]) for t, a in audit.tags if t == "img" and a.get("class") == "cam-heat"
        ]
        photos = [a["src"] for t, a in audit.tags if t == "img" and a.get("class") == "cam-photo"]
        # a map per class and method; Eigen-CAM (class-agnostic) once, not per class
        assert sorted(heats) == sorted(
            f"../assets/cams/{rid}/{m}_{c}.png"
            for m in rec["cam_methods"]
            for c in (rec["cam_classes"][:1] if m == "eigencam" else rec["cam_classes"])
        )
        # every heatmap is laid over the photo: one thumbnail under each
        assert photos == [f"../assets/thumbs/{rid}.jpg"] * len(heats)
        stacks = [a for t, a in audit.tags if t == "div" and "cam-stack" in str(a.get("class"))]
        assert len(stacks) == len(heats)
        text = " ".join(audit.text)
        for p in rec["predictions"]:
            assert p["name"] in text
        grids = [s for s in srcs if "/grids/" in s]
        if rid in fake.grid_ids:
            assert len(grids) == 4
            assert "left out" not in text
        else:
            assert grids == []
            assert "--grids all" in text
            assert f"the first 4 images, then at most {GRID_NOTABLE} more" in text
        for layer in ("conv1", "conv2", "conv3", "conv4"):
            assert layer in text
        assert "dead channel" in text


def test_index_structure_golden(fake: FakeRun) -> None:
    """The index's skeleton (headings, summary figures, controls), volatile parts scrubbed."""
    audit = _audit(fake.outdir / "index.html")
    skeleton = []
    for tag, attrs in audit.tags:
        if tag in ("h1", "h2", "section", "select", "input", "button", "script", "table"):
            keep = {k: v for k, v in attrs.items() if k in ("id", "class", "type", "src")}
            skeleton.append((tag, tuple(sorted(keep.items()))))
    text = re.sub(r"\s+", " ", " ".join(audit.text)).strip()
    text = text.replace(str(fake.outdir.parent), "<TMP>")
    assert skeleton == [
        ("h1", ()),
        ("section", (("class", "summary"),)),
        ("section", (("class", "panel"),)),
        ("h2", ()),
        ("section", (("class", "panel"),)),
        ("h2", ()),
        ("section", (("class", "panel"),)),
        ("h2", ()),
        ("table", (("class", "confusion"),)),
        ("section", (("class", "panel"), ("id", "gallery-section"))),
        ("h2", ()),
        ("select", (("id", "f-pred"),)),
        ("select", (("id", "f-true"),)),
        ("select", (("id", "f-outcome"),)),
        ("select", (("id", "f-sort"),)),
        ("input", (("id", "f-search"), ("type", "search"))),
        ("input", (("id", "f-overlay"), ("type", "checkbox"))),
        ("button", (("id", "pg-first"), ("type", "button"))),
        ("button", (("id", "pg-prev"), ("type", "button"))),
        ("button", (("id", "pg-next"), ("type", "button"))),
        ("button", (("id", "pg-last"), ("type", "button"))),
        ("section", (("class", "panel"), ("id", "failed"))),
        ("h2", ()),
        ("table", (("class", "data failed-table"),)),
        ("section", (("class", "panel facts"),)),
        ("h2", ()),
        ("script", (("src", "static/gallery-data.js"),)),
        ("script", (("src", "static/report.js"),)),
    ]
    assert text.startswith(
        "convlens report: fake_cnn.onnx convlens Images Model fake_cnn.onnx "
        "convlens report: fake_cnn.onnx 27 images 24 analysed 3 failed 6 classes"
    ), text
    assert "Failed inputs (3)" in text
    assert "Model <TMP>/fake_cnn.onnx Grid policy sample" in text
    assert "top-1 accuracy (" in text and "Confusion matrix" in text


def test_heatmaps_without_thumbnail(fake: FakeRun, tmp_path: Path) -> None:
    out = tmp_path / "nothumb"
    shutil.copytree(fake.outdir, out)
    rid = fake.ok_records[0]["id"]
    (out / "assets" / "thumbs" / f"{rid}.jpg").unlink()
    render_report(out, page_size=PAGE_SIZE)
    audit = _audit(out / "images" / f"{rid}.html")
    classes = [str(a.get("class")) for t, a in audit.tags]
    assert "cam-photo" not in classes
    assert classes.count("cam-stack no-photo") == classes.count("cam-heat") > 0
    item = next(i for i in _gallery(out)["items"] if i[0] == rid)
    assert item[5] == 0  # no thumbnail: the gallery shows neither photo nor heatmap


def test_partial_last_line_and_missing_optional_files(fake: FakeRun, tmp_path: Path) -> None:
    out = tmp_path / "partial"
    shutil.copytree(fake.outdir, out)
    with open(out / "results.jsonl", "a", encoding="utf-8") as f:
        f.write('{"id": "ffffffffffffffff", "path": "/x/half.jp')
    (out / "class_cams.npz").unlink()
    (out / "stats.json").unlink()
    shutil.rmtree(out / "assets" / "grids")
    index = render_report(out)
    text = index.read_text(encoding="utf-8")
    assert "1 unreadable line in results.jsonl" in text
    assert len(_gallery(out)["items"]) == len(fake.records)
    model = (out / "model.html").read_text(encoding="utf-8")
    assert "Mean CAM per predicted class" not in model
    # layer names still come from the spec
    page = (out / "images" / f"{fake.ok_records[0]['id']}.html").read_text(encoding="utf-8")
    assert "conv4" in page and "--grids all" in page


def test_render_without_assets_or_spec(tmp_path: Path) -> None:
    out = tmp_path / "bare"
    out.mkdir()
    recs = [
        {
            "id": "00000000000000aa",
            "path": "/a.jpg",
            "relpath": "a.jpg",
            "status": "ok",
            "error": None,
            "width": 10,
            "height": 10,
            "predictions": [{"index": 0, "name": "x", "prob": 0.9}],
            "label": None,
            "label_index": None,
            "maps": None,
            "cam_classes": [0],
            "cam_methods": ["cam"],
        },
        {
            "id": "../../evil",
            "path": "/b.jpg",
            "relpath": "b.jpg",
            "status": "error",
            "error": "boom",
        },
    ]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    index = render_report(out)
    assert index.exists()
    assert (out / "images" / "00000000000000aa.html").exists()
    assert not (tmp_path / "evil").exists()
    assert "accuracy (no labels)" in index.read_text(encoding="utf-8")
    with pytest.raises(FileNotFoundError):
        render_report(tmp_path / "nothing")


# ---- the sink ----------------------------------------------------------------------
def _spec() -> ModelSpec:
    from report_fixtures import _spec as spec

    return spec(6)


def _record(
    i: int, *, label: int | None, top: int, prob: float, status: str = "ok"
) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "id": f"{i:016x}",
        "path": f"/in/{i}.jpg",
        "relpath": f"{i}.jpg",
        "status": status,
    }
    if status == "ok":
        rec.update(
            predictions=[
                {"index": top, "name": str(top), "prob": prob},
                {"index": (top + 1) % 6, "name": "o", "prob": (1 - prob) / 2},
            ],
            label=None if label is None else str(label),
            label_index=label,
        )
    else:
        rec["error"] = "bad"
    return rec


def _outcome(rec: dict[str, Any], rng: np.random.Generator) -> ImageOutcome:
    if rec["status"] != "ok":
        return ImageOutcome(record=Record.from_json(rec))
    return ImageOutcome(
        record=Record.from_json(rec),
        image=rng.integers(0, 255, (40, 60, 3), dtype=np.uint8),
        maps={("cam", 0): rng.random((5, 5), dtype=np.float32)},
        activations={
            "l1": rng.random((6, 6, 5), dtype=np.float32),
            "weird/name": rng.random((3, 3, 3), dtype=np.float32),
        },
    )


def _drive(
    tmp: Path,
    grids: str,
    grid_sample: int,
    recs: list[dict[str, Any]],
    order: list[dict[str, Any]] | None = None,
) -> set[str]:
    """The sink over ``recs`` in batches of 3; ``order``: the run's inputs as the engine
    gives them (``expect``), those not in ``recs`` done already."""
    sink = ReportAssetSink(grids=grids, grid_sample=grid_sample, thumb_size=32)
    sink.open(tmp, _spec(), {})
    if order is not None:
        todo = {r["id"] for r in recs}
        done = [r for r in order if r["id"] not in todo and r["status"] == "ok"]
        sink.expect([r["id"] for r in order], {r["id"]: Record.from_json(r) for r in done})
    rng = np.random.default_rng(0)
    for s in range(0, len(recs), 3):  # batches of 3
        sink.on_batch([_outcome(r, rng) for r in recs[s : s + 3]])
    sink.close({})
    gdir = tmp / "assets" / "grids"
    return {p.name for p in gdir.iterdir() if any(p.iterdir())}


def _policy_records() -> list[dict[str, Any]]:
    return [
        _record(0, label=None, top=1, prob=0.9),
        _record(1, label=1, top=1, prob=0.9, status="error"),  # errors do not count
        _record(2, label=1, top=1, prob=0.9),
        _record(3, label=1, top=1, prob=0.9),  # 3rd ok image: outside grid_sample=2
        _record(4, label=2, top=1, prob=0.95),  # misclassified
        _record(5, label=None, top=3, prob=0.45),  # low confidence, unlabelled
        _record(6, label=3, top=3, prob=0.49),  # low confidence, correct
        _record(7, label=3, top=3, prob=0.5),  # exactly 0.5 is not low
        _record(8, label=None, top=0, prob=0.99),
    ]


def test_grid_policy_sample(tmp_path: Path) -> None:
    got = _drive(tmp_path, "sample", 2, _policy_records())
    assert got == {f"{i:016x}" for i in (0, 2, 4, 5, 6)}
    layer_files = sorted(p.name for p in (tmp_path / "assets" / "grids" / f"{0:016x}").iterdir())
    assert layer_files == sorted([L.grid_file_name("l1"), L.grid_file_name("weird/name")])
    assert "/" not in L.grid_file_name("weird/name")


def test_grid_policy_all_and_none(tmp_path: Path) -> None:
    ok_ids = {r["id"] for r in _policy_records() if r["status"] == "ok"}
    assert _drive(tmp_path / "all", "all", 0, _policy_records()) == ok_ids
    assert _drive(tmp_path / "none", "none", 100, _policy_records()) == set()
    with pytest.raises(ValueError):
        ReportAssetSink(grids="some")


def test_fixture_grid_policy_matches_sink(fake: FakeRun) -> None:
    written = {p.name for p in (fake.outdir / "assets" / "grids").iterdir()}
    assert written == set(fake.grid_ids)
    assert len(written) < len(fake.ok_records)


def test_sample_count_continues_on_resume(tmp_path: Path) -> None:
    recs = [_record(i, label=None, top=0, prob=0.9) for i in range(4)]
    assert _drive(tmp_path, "sample", 3, recs[:2]) == {f"{i:016x}" for i in (0, 1)}
    # a resumed run: two images are done, so only one more image is in the sample
    assert _drive(tmp_path, "sample", 3, recs[2:], recs) == {f"{i:016x}" for i in (0, 1, 2)}


def test_errors_write_nothing_and_no_temp_files(tmp_path: Path) -> None:
    recs = [_record(i, label=None, top=0, prob=0.9, status="error") for i in range(3)]
    _drive(tmp_path, "all", 0, recs)
    files = [p for p in (tmp_path / "assets").rglob("*") if p.is_file()]
    assert [p.name for p in files] == ["assets.json"]
    _drive(tmp_path / "b", "all", 0, _policy_records())
    leftovers = [
        p for p in (tmp_path / "b").rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"
    ]
    assert leftovers == []


def test_fixture_left_no_temp_files(fake: FakeRun) -> None:
    leftovers = [
        p for p in fake.outdir.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")
    ]
    assert leftovers == []


def test_atomic_write_failure_keeps_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "x.jpg"
    target.write_bytes(b"old")

    def boom(src: Any, dst: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        I.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.jpg"]


def test_sink_keeps_no_arrays(tmp_path: Path) -> None:
    sink = ReportAssetSink(grids="all", thumb_size=32)
    sink.open(tmp_path, _spec(), {})
    rng = np.random.default_rng(1)
    outcome = _outcome(_record(1, label=0, top=0, prob=0.9), rng)
    refs = [weakref.ref(outcome.image)] if outcome.image is not None else []
    refs += [weakref.ref(a) for a in outcome.maps.values()]
    refs += [weakref.ref(a) for a in outcome.activations.values()]
    sink.on_batch([outcome])
    del outcome
    assert all(r() is None for r in refs)
    sink.close({})


# ---- asset functions ---------------------------------------------------------------
def test_activation_grid_layout_and_normalisation() -> None:
    k = 20
    act = np.zeros((7, 7, k), np.float32)
    act[:, :, 1] = np.arange(49, dtype=np.float32).reshape(7, 7)  # a ramp
    img = I.activation_grid(act)
    assert I.tile_size(7, 7) == (49, 49)  # on the page
    assert I.file_tile_size(7, 7) == (7, 7)  # in the file
    assert I.grid_shape(7, 7, k) == (2 * 49 + 1, 16 * 50 - 1)
    assert img.shape[:2] == I.grid_file_shape(7, 7, k) == (2 * 7 + 1, 16 * 8 - 1)
    white = np.array(I.GRID_GAP_BGR, np.uint8)
    assert (img[:, 7] == white).all() and (img[7, :] == white).all()
    assert (img[8:, 4 * 8 :] == white).all()  # padding cells of the last row
    lut = I.colormap_lut(I.GRID_COLORMAP)
    # a constant channel maps to 128; a ramp's first/last pixels to low/high values
    assert (img[0, 0] == lut[128]).all()
    ramp = img[:7, 8:15]
    u8 = I.normalise_channels(act)[:, :, 1]
    assert (ramp == lut[u8]).all()
    assert u8[0, 0] < 30 and u8[-1, -1] > 225


def _old_upscaled_grid(act: np.ndarray, colormap: int) -> np.ndarray:
    """The grid as it was before the files held native sizes: every tile upscaled by
    nearest neighbour to ``tile_size``, coloured, then gaps and padding painted white."""
    h, w, k = act.shape
    th, tw = I.tile_size(h, w)
    u8 = I.normalise_channels(act)
    tiles = [cv2.resize(u8[:, :, i], (tw, th), interpolation=cv2.INTER_NEAREST) for i in range(k)]
    rows, cols = -(-k // I.GRID_COLS), min(I.GRID_COLS, k)
    out = np.full((*I.grid_shape(h, w, k), 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        y, x = r * (th + 1), c * (tw + 1)
        out[y : y + th, x : x + tw] = I.colormap_lut(colormap)[t]
    assert rows * (th + 1) - 1 == out.shape[0]
    return out


@pytest.mark.parametrize(
    ("shape", "colormap"),
    [
        ((5, 5, 40), "viridis"),  # VGG16's last pool: 10x upscaled before
        ((10, 10, 33), "viridis"),
        ((13, 9, 17), "viridis"),  # not square; factor from the longest side
        ((48, 48, 3), "viridis"),  # large enough: never scaled
        ((7, 7, 20), "turbo"),  # 256 colours: no room for white in a palette -> RGB PNG
        ((140, 140, 2), "viridis"),  # reduced to MAX_TILE as before
        ((160, 100, 37), "viridis"),  # reduced, not square, full rows and a last one
    ],
)
def test_grid_file_is_the_upscaled_grid_downsampled(
    shape: tuple[int, int, int], colormap: str
) -> None:
    """A grid file's pixels are the old (upscaled) grid taken back to the maps' size:
    each tile is the normalised, colour-mapped channel; decoded, the PNG is exactly that."""
    cmap = I.COLORMAPS[colormap]
    act = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32) * 3 + 1
    act[:, :, 0] = 2.0  # a constant channel
    h, w, k = shape
    png = I.encode_grid(act, cmap)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert png[25] == (3 if colormap == "viridis" else 2)  # paletted / RGB
    native = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert (native == I.activation_grid(act, cmap)).all()
    assert native.shape[:2] == I.grid_file_shape(h, w, k)
    with pytest.MonkeyPatch.context() as mp:  # where isal does not import: zlib, same pixels
        mp.setattr(I, "_isal_zlib", None)
        fallback = I.encode_grid(act, cmap)
    assert (cv2.imdecode(np.frombuffer(fallback, np.uint8), cv2.IMREAD_COLOR) == native).all()
    if I._isal_zlib is not None:  # isal deflates the paletted ones
        assert (fallback == png) == (colormap != "viridis")
    fh, fw = I.file_tile_size(h, w)
    th, tw = I.tile_size(h, w)
    if max(h, w) > I.MAX_TILE:
        assert max(fh, fw) == max(th, tw) == I.MAX_TILE and (fh, fw) == (th, tw)
        # each tile: the channel's levels reduced by OpenCV's area filter, to one level
        # (imaging._area_planes does it one axis at a time, rounding in between)
        u8 = I.normalise_channels(act)
        mosaic = I._grid_mosaic(u8, None, 7).astype(int)
        cols = min(I.GRID_COLS, k)
        in_tile = np.zeros(mosaic.shape, bool)
        for i in range(k):
            r, c = divmod(i, cols)
            at = np.s_[r * (fh + 1) : r * (fh + 1) + fh, c * (fw + 1) : c * (fw + 1) + fw]
            ref = cv2.resize(u8[:, :, i], (fw, fh), interpolation=cv2.INTER_AREA).astype(int)
            assert np.abs(mosaic[at] - ref).max() <= 1, i
            in_tile[at] = True
        assert (mosaic[~in_tile] == 7).all()  # the gaps and the last row's empty cells
        return
    assert (fh, fw) == (h, w)
    old = _old_upscaled_grid(act, cmap)
    f = th // h
    assert (th, tw) == (h * f, w * f)
    cols = min(I.GRID_COLS, k)
    rows = -(-k // cols)
    # the old grid's tile pixels, one of each f x f block, and the new file's tile pixels
    ys_old = np.concatenate([r * (th + 1) + np.arange(h) * f for r in range(rows)])
    xs_old = np.concatenate([c * (tw + 1) + np.arange(w) * f for c in range(cols)])
    ys_new = np.concatenate([r * (h + 1) + np.arange(h) for r in range(rows)])
    xs_new = np.concatenate([c * (w + 1) + np.arange(w) for c in range(cols)])
    assert (old[np.ix_(ys_old, xs_old)] == native[np.ix_(ys_new, xs_new)]).all()
    lut = I.colormap_lut(cmap)
    u8 = I.normalise_channels(act)
    for i in range(k):
        r, c = divmod(i, cols)
        tile = native[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w]
        assert (tile == lut[u8[:, :, i]]).all()
    # everything else is white: gaps and the padding cells of the last row
    mask = np.ones(native.shape[:2], bool)
    mask[np.ix_(ys_new, xs_new)] = False
    for i in range(k, rows * cols):
        r, c = divmod(i, cols)
        mask[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = True
    assert (native[mask] == np.array(I.GRID_GAP_BGR, np.uint8)).all()


def test_grid_palette_holds_every_level_and_white() -> None:
    of_level, palette, gap = I.grid_palette(I.COLORMAPS["viridis"]) or (None, None, 0)
    assert of_level is not None and palette is not None
    assert (palette[of_level] == I.colormap_lut(I.COLORMAPS["viridis"])).all()
    assert (palette[gap] == np.array(I.GRID_GAP_BGR, np.uint8)).all()
    assert gap not in set(of_level.tolist()) and len(palette) <= 256
    assert I.grid_palette(I.COLORMAPS["turbo"]) is None  # 256 distinct colours


def test_tile_sizes() -> None:
    assert I.tile_size(7, 7) == (49, 49)
    assert I.tile_size(14, 14) == (56, 56)
    assert I.tile_size(75, 75) == (75, 75)
    assert I.tile_size(224, 224) == (128, 128)
    assert I.file_tile_size(7, 7) == (7, 7) and I.file_tile_size(224, 224) == (128, 128)
    big = I.activation_grid(np.random.default_rng(0).random((224, 224, 3), dtype=np.float32))
    assert big.shape[:2] == (128, 3 * 129 - 1)


def test_cam_heatmap_colours() -> None:
    rng = np.random.default_rng(3)
    raw = rng.random((16, 16), dtype=np.float32) * 7.0
    heat = I.cam_heatmap(raw)
    assert heat.shape == (48, 48, 3) and heat.dtype == np.uint8
    norm = I.normalise_map(raw)
    up = cv2.resize(norm, (48, 48), interpolation=cv2.INTER_LINEAR)
    assert (heat == cv2.applyColorMap(I.to_levels(up), I.CAM_COLORMAP)).all()
    lut = I.colormap_lut(I.CAM_COLORMAP)
    assert (I.cam_heatmap(np.zeros((5, 5), np.float32)) == lut[0]).all()  # constant map
    nan = np.full((4, 4), np.nan, np.float32)
    nan[0, 0] = 2.0
    assert (I.cam_heatmap(nan)[0, 0] == lut[255]).all()
    big = rng.random((60, 50), dtype=np.float32)
    assert (I.cam_levels(big) == I.to_levels(I.normalise_map(big))).all()  # not upsampled


def test_cam_levels_batched_equals_one_by_one() -> None:
    rng = np.random.default_rng(4)
    maps: dict[Any, np.ndarray] = {
        ("cam", c): rng.random((16, 16), dtype=np.float32) * (c + 1) for c in range(5)
    }
    maps[("flat", 0)] = np.full((16, 16), 3.0, np.float32)
    maps[("nan", 0)] = np.where(rng.random((16, 16)) > 0.5, np.nan, 1.0).astype(np.float32)
    maps[("small", 0)] = rng.random((7, 7), dtype=np.float32)
    maps[("wide", 0)] = rng.random((4, 9)).astype(np.float64)
    many = {("m", c): rng.random((6, 6), dtype=np.float32) for c in range(300)}  # > 1 chunk
    maps.update(many)
    got = I.cam_levels_batch(maps)
    assert list(got) == list(maps)
    for key, raw in maps.items():
        f = I.heatmap_scale(*raw.shape)
        assert got[key].shape == (raw.shape[0] * f, raw.shape[1] * f), key
        one = I.cam_levels(raw)
        # OpenCV's multi-channel resize may differ from its one-channel resize in the last
        # bit of a float32, which can flip a rounding at .5: one level, rarely
        assert np.abs(got[key].astype(int) - one.astype(int)).max() <= 1, key
        assert (got[key] == one).mean() > 0.99, key


def test_indexed_png_decodes_to_colour_mapped_levels() -> None:
    rng = np.random.default_rng(5)
    for shape in [(48, 48), (1, 1), (49, 35), (3, 200)]:
        levels = rng.integers(0, 256, shape, dtype=np.uint8)
        data = I.encode_indexed_png(levels)
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert img is not None and img.shape == (*shape, 3)
        assert (img == I.colormap_lut(I.CAM_COLORMAP)[levels]).all()
    with pytest.raises(ValueError):
        I.encode_indexed_png(np.zeros((4, 4), np.float32))


def _photo(h: int, w: int) -> np.ndarray:
    from skimage import data as skdata

    return cv2.resize(skdata.chelsea(), (w, h), interpolation=cv2.INTER_AREA)


@pytest.mark.parametrize(
    "shape",
    [(480, 640), (640, 480), (479, 641), (3000, 4000), (257, 100), (200, 120), (1, 900)],
)
def test_thumbnail_fast_resize_matches_inter_area(shape: tuple[int, int]) -> None:
    h, w = shape
    img = _photo(max(h, 2), w)[:h]
    out = I.thumbnail(img, 256)
    s = min(1.0, 256 / max(h, w))
    assert out.shape == (max(1, round(h * s)), max(1, round(w * s)), 3)
    if s == 1.0:
        assert out is img
        return
    ref = cv2.resize(img, out.shape[1::-1], interpolation=cv2.INTER_AREA)
    err = (out.astype(float) - ref.astype(float)) ** 2
    psnr = 10 * np.log10(255**2 / max(err.mean(), 1e-9))
    assert psnr > 38, psnr


def test_thumbnail_of_other_layouts() -> None:
    gray = _photo(480, 640)[:, :, 0]
    assert I.to_bgr(I.thumbnail(gray, 256)).shape == (192, 256, 3)
    rgba = np.dstack([_photo(480, 640), np.full((480, 640), 255, np.uint8)])
    assert I.to_bgr(I.thumbnail(rgba, 256)).shape == (192, 256, 3)
    floats = _photo(480, 640).astype(np.float32) * 2.0  # clipped to 0..255
    assert I.to_bgr(I.thumbnail(I.to_uint8(floats), 256)).max() == 255


def test_css_overlay_opacity_matches_overlay_alpha() -> None:
    css = (Path(A.__file__).parent / "static" / "report.css").read_text(encoding="utf-8")
    rule = css[css.index(".heat, .cam-heat {") :]
    rule = rule[: rule.index("}")]
    assert f"opacity: {I.OVERLAY_ALPHA};" in rule
    assert "image-rendering: auto;" in rule


def test_safe_names() -> None:
    assert L.safe_id("3f2a0011deadbeef") == "3f2a0011deadbeef"
    for hostile in ("../../etc/passwd", "a/b", ".hidden", "<img>", "", "x" * 300):
        s = L.safe_name(hostile)
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", s), s
        assert len(s) <= 64
    assert L.safe_name("a/b") != L.safe_name("a_b")
    assert L.safe_name("block1_conv1") == "block1_conv1"


def test_damaged_files_are_named_on_every_page(fake: FakeRun, tmp_path: Path) -> None:
    """A damaged stats.json or class_cams.npz: the report still renders, and every page
    says which file it could not read instead of silently showing less."""
    out = tmp_path / "damaged"
    shutil.copytree(fake.outdir, out)
    (out / "stats.json").write_text('{"conv1": {"shape"')
    (out / "class_cams.npz").write_bytes(b"PK\x03\x04 not really a zip")
    render_report(out, page_size=PAGE_SIZE)
    rid = fake.ok_records[0]["id"]
    for page in (out / "index.html", out / "model.html", out / "images" / f"{rid}.html"):
        text = " ".join(_audit(page).text)
        assert "stats.json could not be read (JSONDecodeError)" in text, page
        assert "class_cams.npz could not be read" in text, page
    clean = " ".join(_audit(fake.outdir / "index.html").text)
    assert "could not be read" not in clean


def test_temporaries_of_a_killed_run_are_removed(fake: FakeRun, tmp_path: Path) -> None:
    """Temporaries an interrupted report left (only the names the project's atomic writer
    makes) are removed on the next rendering; other files stay (issue 14.13)."""
    out = tmp_path / "killed"
    shutil.copytree(fake.outdir, out)
    rid = fake.ok_records[0]["id"]
    planted = [
        out / "images" / f".{rid}.html.123.4.tmp",
        out / "assets" / "thumbs" / f".{rid}.jpg.123.5.tmp",
        out / "assets" / "cams" / rid / ".gradcam_0.png.123.6.tmp",
        out / "static" / ".report.css.123.7.tmp",
    ]
    for p in planted:
        p.write_bytes(b"partial")
    mine = out / "assets" / "thumbs" / "notes.tmp"
    mine.write_text("not ours")
    render_report(out, page_size=PAGE_SIZE)
    assert not any(p.exists() for p in planted)
    assert mine.read_text() == "not ours"


def test_grid_views_show_older_runs_jpeg_grids() -> None:
    """An OUTDIR from before the PNG grids (upscaled JPEG files) still shows its grids at
    the same size; a PNG of the same layer wins."""
    from types import SimpleNamespace

    from convlens.reports.data import LayerStats
    from convlens.reports.imagepage import grid_views

    entry: Any = SimpleNamespace(id="id00")
    st = LayerStats("conv4", [7, 7, 128], 128, 0.0, 1.0, 0.0, [], 1)
    (v,) = grid_views(entry, {"conv4.jpg"}, [st])
    assert v.src == "assets/grids/id00/conv4.jpg" and (v.height, v.width) == I.grid_shape(7, 7, 128)
    (v,) = grid_views(entry, {"conv4.jpg", "conv4.png"}, [st])
    assert v.src == "assets/grids/id00/conv4.png"
    views = grid_views(entry, {"extra.jpg", "extra.png", "other.jpg", "notes.txt"}, [st])
    assert [(g.name, g.src) for g in views[1:]] == [
        ("extra", "assets/grids/id00/extra.png"),
        ("other", "assets/grids/id00/other.jpg"),
    ]


def test_a_run_from_before_the_notable_cap_was_recorded(tmp_path: Path) -> None:
    """An assets.json without grid_notable (runs before it was recorded, made with
    another cap) reads "at most N more", not today's default."""
    run = make_fake_run(tmp_path / "out", 8, grid_sample=1, n_failed=0, batch_size=4)
    path = run.outdir / "assets" / "assets.json"
    doc = json.loads(path.read_text())
    assert doc.pop("grid_notable") == GRID_NOTABLE
    path.write_text(json.dumps(doc))
    render_report(run.outdir)
    pages = [p.read_text() for p in (run.outdir / "images").glob("*.html")]
    left_out = [p for p in pages if "Activation grids were left out" in p]
    assert left_out and all("the first 1 images, then at most N more" in p for p in left_out)


def test_the_model_page_says_why_no_layer_has_statistics() -> None:
    """No layer measured: --stats-every 0 says the run took none; otherwise stats.json
    is said to hold none (a run not finished, or a sample without an image); one
    measured layer: no note."""
    from convlens.reports.data import LayerStats
    from convlens.reports.modelpage import stats_note

    empty = LayerStats("conv1", [8, 8, 4], 4, None, None, None, [], None)
    full = LayerStats("conv2", [4, 4, 8], 8, 0.5, 2.0, 0.1, [3], 12)
    assert "took no activation statistics (--stats-every 0)" in str(
        stats_note([empty], {"stats_every": 0})
    )
    assert "has not finished" in str(stats_note([empty], {"stats_every": 8}))
    assert stats_note([empty, full], {"stats_every": 0}) is None and stats_note([], {}) is None
    assert not empty.measured and full.measured
