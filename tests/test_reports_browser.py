"""The report in a real browser (Debian's chromium through Playwright), from file:// URLs.

``report_dir`` is the OUTDIR under test.  For now it is a fake run
(tests/report_fixtures.py); it is meant to be swapped for a real ``convlens run`` whose
OUTDIR satisfies the same assumptions: more than PAGE_SIZE ok images rendered with
``page_size=PAGE_SIZE``, labels known (some wrong), at least one failed input, and one
input named XSS_NAME.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from convlens.reports import render_report

from report_fixtures import XSS_NAME

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = Path(__file__).parent.parent / "artifacts" / "screenshots"
N_IMAGES = 130
PAGE_SIZE = 50

ALL_IMAGES_LOADED = """() => Array.from(document.images).every(i => i.complete)"""
BROKEN_IMAGES = """() => Array.from(document.images)
    .filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src'))"""


ODD_CLASS = "gravel <b>&\"' class"


def _real_inputs(root: Path) -> None:
    """Real photos for a real run: >PAGE_SIZE images per the demo model's classes, some
    filed under the wrong class, three broken files, and one named XSS_NAME."""
    import cv2

    from convlens.pipeline import demo_paths

    _, photos = demo_paths()
    folders = {"brick": "brick", "grass": "grass", "gravel": ODD_CLASS}
    n = 0
    for cls, folder in folders.items():
        d = root / folder
        d.mkdir(parents=True)
        for i, src in enumerate(sorted((photos / cls).glob("*.jpg"))):
            img = cv2.imread(str(src))
            variants = (
                img,
                img[:, ::-1],
                img[::-1],
                img[::-1, ::-1],
                img[20:, 10:],
                img[:-20, :-10],
                cv2.rotate(img, cv2.ROTATE_90_CLOCKWISE),
                cv2.rotate(img, cv2.ROTATE_90_COUNTERCLOCKWISE),
                img[30:-30, 30:-30],
            )
            for v, variant in enumerate(variants):
                cv2.imwrite(str(d / f"{cls}_{i}_{v}.jpg"), variant)
                n += 1
    wrong = root / "brick"
    for src in sorted((photos / "grass").glob("*.jpg"))[:3]:
        (wrong / f"filed_wrong_{src.name}").write_bytes(src.read_bytes())
    (root / "grass" / XSS_NAME).write_bytes(next((photos / "grass").glob("*.jpg")).read_bytes())
    (root / "broken").mkdir()
    (root / "broken" / "zero.jpg").write_bytes(b"")
    (root / "broken" / "text.jpg").write_text("not an image")
    good = next((photos / "brick").glob("*.jpg")).read_bytes()
    (root / "broken" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    assert n > 2 * PAGE_SIZE


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The OUTDIR of a real engine run of the bundled model (its last class renamed to a
    hostile string in the model's metadata), rendered with a small page size."""
    import onnx

    from convlens.engine import contract as C
    from convlens.engine.run import RunOptions, run
    from convlens.pipeline import demo_paths
    from convlens.reports import ReportAssetSink

    tmp = tmp_path_factory.mktemp("browser")
    model_path, _ = demo_paths()
    model = onnx.load(str(model_path))
    spec = C.read_spec(model_path)
    spec.class_names[-1] = ODD_CLASS
    for prop in model.metadata_props:
        if prop.key == C.METADATA_KEY:
            prop.value = spec.to_json()
    odd_model = tmp / "odd.onnx"
    onnx.save(model, str(odd_model))
    inputs = tmp / "photos"
    _real_inputs(inputs)
    out = tmp / "out"
    summary = run(
        odd_model,
        [str(inputs)],
        out,
        RunOptions(device="cpu", labels_from_dirs=True, batch_size=8),
        sinks=[ReportAssetSink(grids="sample", grid_sample=10)],
        progress=False,
        warn=lambda m: None,
    )
    assert summary.failed == 3 and summary.ok > PAGE_SIZE
    render_report(out, page_size=PAGE_SIZE)
    return out


def _gallery(outdir: Path) -> dict[str, Any]:
    js = (outdir / "static" / "gallery-data.js").read_text(encoding="ascii")
    doc: dict[str, Any] = json.loads(js[js.index("=") + 1 :].strip().rstrip(";"))
    return doc


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    required = os.environ.get("CONVLENS_REQUIRE_BROWSER") == "1"
    if not CHROMIUM.exists():
        if required:
            pytest.fail(f"{CHROMIUM} is missing and CONVLENS_REQUIRE_BROWSER=1")
        pytest.skip(f"{CHROMIUM} is missing (set CONVLENS_REQUIRE_BROWSER=1 to fail instead)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if required:
            raise
        pytest.skip("playwright is not installed")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@dataclass
class Watched:
    page: Any
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # every URL the pages asked for
    refused: list[str] = field(default_factory=list)  # those not on the file system

    def assert_clean(self) -> None:
        assert self.errors == [], self.errors
        assert self.dialogs == [], self.dialogs
        assert self.refused == [], self.refused

    def assert_images_loaded(self) -> None:
        # lazy images off-screen would never load: make every image load now
        self.page.evaluate(
            "() => document.querySelectorAll('img').forEach(i => { i.loading = 'eager'; })"
        )
        self.page.wait_for_function(ALL_IMAGES_LOADED, timeout=10_000)
        assert self.page.evaluate(BROKEN_IMAGES) == []
        assert self.page.evaluate("document.images.length") > 0


@pytest.fixture
def watched(browser: Any) -> Iterator[Watched]:
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    w = Watched(page)

    def on_console(msg: Any) -> None:
        if msg.type == "error":
            w.errors.append(f"console: {msg.text}")

    def on_dialog(dialog: Any) -> None:
        w.dialogs.append(dialog.message)
        dialog.dismiss()

    def offline(route: Any) -> None:
        """Nothing from the network: a request that is not file:// is refused."""
        url = route.request.url
        w.requests.append(url)
        if url.startswith("file:"):
            route.continue_()
        else:
            w.refused.append(url)
            route.abort()

    ctx.route("**/*", offline)
    page.on("console", on_console)
    page.on("pageerror", lambda exc: w.errors.append(f"pageerror: {exc}"))
    page.on("dialog", on_dialog)
    try:
        yield w
    finally:
        ctx.close()
    w.assert_clean()


def _url(path: Path) -> str:
    return path.resolve().as_uri()


def _cards(w: Watched) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = w.page.eval_on_selector_all(
        "#gallery .card",
        """cards => cards.map(c => ({
            id: c.getAttribute('data-id'),
            cls: c.className,
            pred: (c.querySelector('.card-top .cls') || {}).textContent || null,
            prob: (c.querySelector('.card-top .prob') || {}).textContent || null,
            path: (c.querySelector('.card-path') || {}).textContent || null,
        }))""",
    )
    return result


def test_index_gallery_filters_and_paging(watched: Watched, report_dir: Path) -> None:
    w, page = watched, watched.page
    data = _gallery(report_dir)
    items = data["items"]
    page.goto(_url(report_dir / "index.html"))
    page.wait_for_selector("#gallery .card")
    first = _cards(w)
    assert len(first) == PAGE_SIZE
    w.assert_images_loaded()
    assert page.text_content("#pg-info") == f"page 1 of {-(-len(items) // PAGE_SIZE)}"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "index.png"), full_page=True)
    # every photo fits its square card: as wide or as tall as it (small ones scaled up)
    fits = page.eval_on_selector_all(
        "#gallery .card a.thumb",
        """boxes => boxes.map(b => {
            const r = b.getBoundingClientRect(), p = b.querySelector('img.photo');
            const q = p.getBoundingClientRect();
            return [Math.max(q.width / r.width, q.height / r.height),
                    Math.abs(q.left + q.width / 2 - r.left - r.width / 2),
                    Math.abs(q.top + q.height / 2 - r.top - r.height / 2)];
        })""",
    )
    assert len(fits) == PAGE_SIZE
    assert all(abs(f[0] - 1) < 0.01 and f[1] < 1 and f[2] < 1 for f in fits), fits

    # paging
    page.click("#pg-next")
    second = _cards(w)
    assert page.get_attribute("#gallery", "data-page") == "2"
    assert len(second) == PAGE_SIZE and {c["id"] for c in second}.isdisjoint(c["id"] for c in first)
    w.assert_images_loaded()
    page.click("#pg-last")
    last = _cards(w)
    assert len(last) == len(items) - PAGE_SIZE * (-(-len(items) // PAGE_SIZE) - 1)
    assert any("failed" in c["cls"].split() for c in last)  # failed inputs come last
    page.click("#pg-first")
    assert [c["id"] for c in _cards(w)] == [c["id"] for c in first]

    # filter by predicted class
    cls_index = items[0][2]
    cls_name = data["classes"][cls_index]
    page.select_option("#f-pred", str(cls_index))
    cards = _cards(w)
    expected = [i for i in items if i[2] == cls_index]
    assert page.get_attribute("#gallery", "data-matches") == str(len(expected))
    assert 0 < len(cards) <= PAGE_SIZE and len(cards) == min(PAGE_SIZE, len(expected))
    assert all(c["pred"] == cls_name for c in cards)
    page.select_option("#f-pred", "")

    # correct / wrong / failed
    page.select_option("#f-outcome", "wrong")
    wrong = [i for i in items if i[7] == "" and i[4] >= 0 and i[4] != i[2]]
    cards = _cards(w)
    assert len(cards) == min(PAGE_SIZE, len(wrong)) > 0
    assert all("wrong" in c["cls"].split() for c in cards)
    page.select_option("#f-outcome", "failed")
    cards = _cards(w)
    assert len(cards) == sum(1 for i in items if i[7] != "") == 3
    page.select_option("#f-outcome", "correct")
    assert all("correct" in c["cls"].split() for c in _cards(w))

    # filter by true class
    page.select_option("#f-outcome", "")
    page.select_option("#f-true", str(cls_index))
    assert page.get_attribute("#gallery", "data-matches") == str(
        sum(1 for i in items if i[4] == cls_index)
    )
    page.select_option("#f-true", "")

    # sort by confidence
    page.select_option("#f-sort", "conf-asc")
    probs = [float(c["prob"].rstrip("%")) for c in _cards(w)]
    lowest = min(i[3] for i in items if i[7] == "")
    assert probs == sorted(probs) and abs(probs[0] - 100 * lowest) < 0.06
    page.select_option("#f-sort", "conf-desc")
    probs = [float(c["prob"].rstrip("%")) for c in _cards(w)]
    assert probs == sorted(probs, reverse=True)
    page.select_option("#f-sort", "")

    # CAM overlays: a heatmap layer over every photo, shown and hidden
    assert _heat_layers(w) == []  # off by default: no heatmap is even loaded
    page.check("#f-overlay")
    w.assert_images_loaded()
    page.locator("#gallery").screenshot(path=str(SCREENSHOTS / "index-overlays.png"))
    layers = _heat_layers(w)
    assert len(layers) == len(_cards(w)) == PAGE_SIZE
    for layer in layers:
        assert layer["visible"], layer
        assert layer["src"].startswith(f"assets/cams/{layer['id']}/")
        assert layer["src"].endswith(f"_{_item(data, layer['id'])[2]}.png")
        # a feature-resolution PNG, stretched over exactly the photo's box, half opaque
        assert layer["natural"][0] < 64 and layer["natural"][1] < 64, layer
        assert _same_box(layer["box"], layer["photo_box"]), layer
        assert layer["opacity"] == "0.5" and layer["rendering"] == "auto"
    assert page.text_content("#gallery .card .ov-toggle") == "photo"
    page.uncheck("#f-overlay")
    assert _heat_layers(w) == []  # the page is drawn again, photos only
    assert page.text_content("#gallery .card .ov-toggle") == "CAM"
    # the per-card toggle shows and hides that card's heatmap only
    page.click("#gallery .card .ov-toggle")
    layers = _heat_layers(w)
    assert [(la["id"], la["visible"]) for la in layers] == [(_cards(w)[0]["id"], True)]
    assert _same_box(layers[0]["box"], layers[0]["photo_box"])
    assert page.text_content("#gallery .card .ov-toggle") == "photo"
    w.assert_images_loaded()
    page.click("#gallery .card .ov-toggle")
    assert [la["visible"] for la in _heat_layers(w)] == [False]
    assert page.text_content("#gallery .card .ov-toggle") == "CAM"
    # the photo is never replaced: every card still shows its thumbnail
    srcs = page.eval_on_selector_all(
        "#gallery .card img.photo", "imgs => imgs.map(i => i.getAttribute('src'))"
    )
    assert len(srcs) == PAGE_SIZE and all(s.startswith("assets/thumbs/") for s in srcs)
    w.assert_clean()


HEAT_LAYERS = """cards => cards.map(c => {
    const heat = c.querySelector('img.heat');
    if (!heat) return null;
    const photo = c.querySelector('img.photo');
    const box = r => [r.left, r.top, r.width, r.height];
    const cs = getComputedStyle(heat);
    return {
        id: c.getAttribute('data-id'),
        src: heat.getAttribute('src'),
        visible: !heat.hidden && cs.display !== 'none' && heat.getBoundingClientRect().width > 0,
        box: box(heat.getBoundingClientRect()),
        photo_box: box(photo.getBoundingClientRect()),
        natural: [heat.naturalWidth, heat.naturalHeight],
        opacity: cs.opacity,
        rendering: cs.imageRendering,
    };
}).filter(x => x !== null)"""


def _heat_layers(w: Watched) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = w.page.eval_on_selector_all("#gallery .card", HEAT_LAYERS)
    return result


def _same_box(a: list[float], b: list[float]) -> bool:
    return all(abs(x - y) < 0.51 for x, y in zip(a, b, strict=True)) and a[2] > 20 < a[3]


def _item(data: dict[str, Any], image_id: str) -> list[Any]:
    return next(i for i in data["items"] if i[0] == image_id)


def test_hostile_file_name_is_text(watched: Watched, report_dir: Path) -> None:
    w, page = watched, watched.page
    page.goto(_url(report_dir / "index.html"))
    page.wait_for_selector("#gallery .card")
    page.fill("#f-search", "onerror")
    page.wait_for_function("() => document.querySelectorAll('#gallery .card').length === 1")
    card = _cards(w)[0]
    assert card["path"].endswith(XSS_NAME)
    assert page.evaluate("document.querySelectorAll('img[src=\"x\"]').length") == 0
    page.click("#gallery .card a.thumb")
    page.wait_for_selector("h1.path")
    assert page.text_content("h1.path") == card["path"]
    assert page.evaluate("document.querySelectorAll('img[src=\"x\"]').length") == 0
    w.assert_images_loaded()
    w.assert_clean()


def test_grids_shown_at_their_page_size(watched: Watched, report_dir: Path) -> None:
    """A grid file holds small maps at their own size; the page shows it as large as the
    upscaled file was (its box: grid_shape, the width/height attributes), crisp pixels,
    and scaled down proportionally in a narrow window."""
    from convlens.reports import imaging as I

    w, page = watched, watched.page
    order = [i[0] for i in _gallery(report_dir)["items"] if i[7] == ""]
    page.goto(_url(report_dir / "images" / f"{order[1]}.html"))
    page.wait_for_selector("img.grid")
    page.wait_for_function(ALL_IMAGES_LOADED)
    w.assert_images_loaded()
    measure = """gs => gs.map(g => {
        const r = g.getBoundingClientRect(), cs = getComputedStyle(g);
        const shape = g.closest('.layer').querySelector('.shape').textContent;
        return {src: g.getAttribute('src'), shape: shape.match(/\\d+/g).map(Number),
                attr: [Number(g.getAttribute('width')), Number(g.getAttribute('height'))],
                box: [r.width, r.height], natural: [g.naturalWidth, g.naturalHeight],
                border: parseFloat(cs.borderLeftWidth), rendering: cs.imageRendering};
    })"""
    grids = page.eval_on_selector_all("img.grid", measure)
    assert len(grids) == 3
    upscaled = 0
    for g in grids:
        h, wd, k = g["shape"]
        assert g["src"].endswith(".png")
        gh, gw = I.grid_shape(h, wd, k)
        assert g["attr"] == [gw, gh]
        fh, fw = I.grid_file_shape(h, wd, k)
        assert g["natural"] == [fw, fh]  # the file: the maps' own size
        upscaled += fw < gw
        assert g["rendering"] == "pixelated"
        # the box is grid_shape's (border-box: the 1 px border inside the width), the
        # content keeps grid_shape's ratio, not the file's (gaps are not scaled)
        b = g["border"]
        assert abs(g["box"][0] - gw) < 0.01, g
        assert abs(g["box"][1] - (2 * b + (gw - 2 * b) * gh / gw)) < 1 / 32, g
    assert upscaled == 2  # the demo's 32x32 and 16x16 layers
    page.set_viewport_size({"width": 520, "height": 900})
    for g in page.eval_on_selector_all("img.grid", measure):
        (cw, ch), b = g["box"], g["border"]
        gw, gh = g["attr"]
        assert cw < gw and abs((ch - 2 * b) - (cw - 2 * b) * gh / gw) < 1 / 32, (
            g
        )  # layout units: 1/64 px


def test_image_page_zoom_and_keyboard(watched: Watched, report_dir: Path) -> None:
    w, page = watched, watched.page
    order = [i[0] for i in _gallery(report_dir)["items"] if i[7] == ""]
    start = order[1]  # in the grid sample (the first images of the run) and has neighbours
    page.goto(_url(report_dir / "images" / f"{start}.html"))
    page.wait_for_selector("img.grid")
    w.assert_images_loaded()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "image.png"), full_page=True)

    # every CAM is a feature-resolution heatmap stretched over a copy of the photo
    stacks = page.eval_on_selector_all(
        ".cam-stack",
        """stacks => stacks.map(s => {
            const photo = s.querySelector('img.cam-photo'), heat = s.querySelector('img.cam-heat');
            const box = r => [r.left, r.top, r.width, r.height];
            return {photo: photo && photo.getAttribute('src'), heat: heat.getAttribute('src'),
                    pbox: box(photo.getBoundingClientRect()), hbox: box(heat.getBoundingClientRect()),
                    natural: [heat.naturalWidth, heat.naturalHeight],
                    opacity: getComputedStyle(heat).opacity};
        })""",
    )
    assert len(stacks) >= 3
    for st in stacks:
        assert st["photo"] == f"../assets/thumbs/{start}.jpg"
        assert st["heat"].startswith(f"../assets/cams/{start}/") and st["heat"].endswith(".png")
        assert st["natural"] == [48, 48]  # the demo model's CAM layer is 16x16: 3x
        assert _same_box(st["hbox"], st["pbox"]) and st["opacity"] == "0.5"

    # click the 3rd channel of the first grid: the zoom shows it
    grid = page.locator("img.grid").first
    box = grid.bounding_box()
    assert box is not None
    cols = int(grid.get_attribute("data-cols") or 16)
    tile = box["width"] / cols
    grid.click(position={"x": tile * 2.5, "y": min(tile, box["height"]) / 2})
    page.wait_for_selector("#zoom:not([hidden])")
    assert "channel 2 of" in (page.text_content("#zoom-caption") or "")
    page.screenshot(path=str(SCREENSHOTS / "image-zoom.png"))
    page.keyboard.press("ArrowRight")  # inside the zoom: next channel, not next image
    assert "channel 3 of" in (page.text_content("#zoom-caption") or "")
    page.keyboard.press("Escape")
    page.wait_for_selector("#zoom", state="hidden")

    # keyboard navigation between image pages, in the index's default order
    with page.expect_navigation():
        page.keyboard.press("ArrowRight")
    assert page.url.endswith(f"/images/{order[2]}.html")
    with page.expect_navigation():
        page.keyboard.press("ArrowLeft")
    assert page.url.endswith(f"/images/{start}.html")
    with page.expect_navigation():
        page.keyboard.press("ArrowLeft")
    assert page.url.endswith(f"/images/{order[0]}.html")
    w.assert_images_loaded()

    # an image outside the grid sample says how to get grids
    data = _gallery(report_dir)
    no_grid = next(
        i[0]
        for i in data["items"][20:]
        if i[7] == "" and i[4] >= 0 and i[4] == i[2] and i[3] >= 0.5
    )
    page.goto(_url(report_dir / "images" / f"{no_grid}.html"))
    assert page.locator("img.grid").count() == 0
    assert "--grids all" in (page.text_content(".grids .note") or "")
    w.assert_images_loaded()
    w.assert_clean()


def test_model_page(watched: Watched, report_dir: Path) -> None:
    w, page = watched, watched.page
    page.goto(_url(report_dir / "model.html"))
    page.wait_for_selector("table.layers")
    w.assert_images_loaded()
    assert page.locator(".class-cams img").count() >= 1
    text = page.text_content("main") or ""
    assert "Export parity" in text and "predictions_vs_keras" in text
    assert w.requests and all(u.startswith("file:") for u in w.requests)
    assert ODD_CLASS in text
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "model.png"), full_page=True)
    w.assert_clean()
