"""The report of a real run, used as a person would in real Chromium: the gallery by
keyboard alone, an image page printed, the charts drawn (and what they say checked
against the run's own results.jsonl and stats.json).  Fixtures: test_reports_browser.py
(every page is watched: no console error, no dialog, nothing from the network)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import test_reports_browser as shared
from test_reports_browser import ODD_CLASS, PAGE_SIZE, Watched, _gallery, _url

# the real run and the watched browser page, shared with test_reports_browser.py
browser, report_dir, watched = shared.browser, shared.report_dir, shared.watched

pytestmark = pytest.mark.browser

FOCUSED_CARD = """() => {
    const a = document.activeElement, c = a && a.closest('#gallery .card');
    return c ? {id: c.getAttribute('data-id'), tag: a.tagName, cls: a.className,
                outline: getComputedStyle(a).outlineStyle} : null;
}"""
CARD_IDS = "() => Array.from(document.querySelectorAll('#gallery .card')).map(c => c.dataset.id)"
ROW_LENGTH = """() => {
    const cards = Array.from(document.querySelectorAll('#gallery .card'));
    const top = cards[0].getBoundingClientRect().top;
    return cards.filter(c => Math.abs(c.getBoundingClientRect().top - top) < 2).length;
}"""


def test_gallery_by_keyboard(watched: Watched, report_dir: Path) -> None:
    w, page = watched, watched.page
    page.goto(_url(report_dir / "index.html"))
    page.wait_for_selector("#gallery .card")
    ids = page.evaluate(CARD_IDS)
    # Tab from the top of the page reaches the first card (through the filters)
    for _ in range(30):
        page.keyboard.press("Tab")
        if page.evaluate(FOCUSED_CARD):
            break
    focused = page.evaluate(FOCUSED_CARD)
    assert focused is not None, "Tab never reached the gallery"
    assert focused["id"] == ids[0] and focused["tag"] == "A" and "thumb" in focused["cls"]
    assert focused["outline"] != "none"  # a visible focus ring
    # one tab stop a card, plus its CAM toggle: the path link is not a second stop
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "ov-toggle"
    page.keyboard.press("Tab")
    assert page.evaluate(FOCUSED_CARD)["id"] == ids[1]
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Shift+Tab")
    assert page.evaluate(FOCUSED_CARD)["id"] == ids[0]
    # arrow keys move between cards, a row at a time up and down
    cols = page.evaluate(ROW_LENGTH)
    assert 1 < cols < PAGE_SIZE
    page.keyboard.press("ArrowRight")
    assert page.evaluate(FOCUSED_CARD)["id"] == ids[1]
    page.keyboard.press("ArrowDown")
    assert page.evaluate(FOCUSED_CARD)["id"] == ids[1 + cols]
    page.keyboard.press("ArrowUp")
    page.keyboard.press("ArrowLeft")
    assert page.evaluate(FOCUSED_CARD)["id"] == ids[0]
    page.keyboard.press("End")
    assert page.evaluate(FOCUSED_CARD)["id"] == ids[-1]
    # past the end of the page: the next page, its first card
    page.keyboard.press("ArrowRight")
    assert page.get_attribute("#gallery", "data-page") == "2"
    second = page.evaluate(CARD_IDS)
    assert page.evaluate(FOCUSED_CARD)["id"] == second[0] not in ids
    page.keyboard.press("ArrowLeft")
    assert page.get_attribute("#gallery", "data-page") == "1"
    assert page.evaluate(FOCUSED_CARD)["id"] == ids[-1]
    page.keyboard.press("Home")
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    # Enter opens the focused image's page
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert page.url.endswith(f"/images/{ids[2]}.html")
    page.wait_for_selector("h1.path")
    w.assert_clean()


def test_image_page_grids_by_keyboard(watched: Watched, report_dir: Path) -> None:
    w, page = watched, watched.page
    order = [i[0] for i in _gallery(report_dir)["items"] if i[7] == ""]
    page.goto(_url(report_dir / "images" / f"{order[1]}.html"))  # in the grid sample
    page.wait_for_selector("img.grid")
    w.assert_images_loaded()
    first = page.locator("img.grid").first
    layer = first.get_attribute("data-layer")
    for _ in range(40):  # Tab reaches the first grid
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.classList.contains('grid')"):
            break
    assert page.evaluate("document.activeElement.getAttribute('data-layer')") == layer
    page.keyboard.press("Enter")
    page.wait_for_selector("#zoom:not([hidden])")
    assert f"{layer} · channel 0 of" in (page.text_content("#zoom-caption") or "")
    page.keyboard.press("ArrowRight")
    assert "channel 1 of" in (page.text_content("#zoom-caption") or "")
    page.keyboard.press("Escape")
    page.wait_for_selector("#zoom", state="hidden")
    assert page.evaluate("document.activeElement.getAttribute('data-layer')") == layer
    w.assert_clean()


VISIBLE = """sel => Array.from(document.querySelectorAll(sel)).map(e => {
    const r = e.getBoundingClientRect(), cs = getComputedStyle(e);
    return {display: cs.display, w: r.width, h: r.height, right: r.right,
            page: document.documentElement.clientWidth};
})"""


def test_image_page_prints(watched: Watched, report_dir: Path) -> None:
    w, page = watched, watched.page
    order = [i[0] for i in _gallery(report_dir)["items"] if i[7] == ""]
    page.goto(_url(report_dir / "images" / f"{order[1]}.html"))  # in the grid sample
    page.wait_for_selector("img.grid")
    w.assert_images_loaded()
    chrome = (".topbar", ".pagenav")  # the footer (what made the page) is kept
    for sel in chrome:  # on screen: there
        assert page.evaluate(VISIBLE, sel)[0]["display"] != "none", sel
    page.emulate_media(media="print")
    for sel in chrome:  # on paper: gone
        assert [e["display"] for e in page.evaluate(VISIBLE, sel)] == ["none"], sel
    for sel in ("img.cam-heat", "img.cam-photo", "img.grid", ".predictions", ".original img"):
        boxes = page.evaluate(VISIBLE, sel)
        assert boxes, sel
        for b in boxes:  # drawn, and inside the sheet's width (nothing cut off on the right)
            assert b["display"] != "none" and b["w"] > 20 and b["h"] > 5, (sel, b)
            assert b["right"] <= b["page"] + 0.5, (sel, b)
    pdf = page.pdf(format="A4")
    assert pdf[:5] == b"%PDF-" and pdf.count(b"/Type /Page\n") + pdf.count(b"/Type /Page ") >= 1
    page.emulate_media(media="screen")
    w.assert_clean()


def _jsonl(outdir: Path) -> list[dict[str, Any]]:
    lines = (outdir / "results.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(x) for x in lines]


BARS = """sel => Array.from(document.querySelectorAll(sel)).map(g => {
    const r = g.getBoundingClientRect();
    return {data: Object.assign({}, g.dataset), w: r.width, h: r.height};
})"""


def test_charts_drawn_from_the_run(watched: Watched, report_dir: Path) -> None:
    w, page = watched, watched.page
    ok = [r for r in _jsonl(report_dir) if r["status"] == "ok"]
    top = [max(r["predictions"], key=lambda p: p["prob"]) for r in ok]
    page.goto(_url(report_dir / "index.html"))
    page.wait_for_selector("#chart-confidence svg")
    bins = page.evaluate(BARS, "#chart-confidence g.bin")
    want = np.histogram([p["prob"] for p in top], bins=10, range=(0, 1))[0]
    assert [int(b["data"]["count"]) for b in bins] == want.tolist()
    assert all(b["w"] > 10 and b["h"] > 50 for b in bins)  # drawn, not collapsed
    per_class: dict[str, list[int]] = {}
    for r, t in zip(ok, top, strict=True):
        if r["label_index"] is not None:
            n_k = per_class.setdefault(r["label"], [0, 0])
            n_k[0] += 1
            n_k[1] += t["index"] == r["label_index"]
    bars = page.evaluate(BARS, "#chart-accuracy g.hbar")
    assert {b["data"]["label"]: [int(b["data"]["den"]), int(b["data"]["num"])] for b in bars} == (
        per_class
    )
    assert any(k < n for n, k in per_class.values())  # some filed under the wrong class
    # the hostile class name is drawn as text, never as markup
    labels = page.eval_on_selector_all(
        "#chart-accuracy text.bar-label", "ts => ts.map(t => t.textContent)"
    )
    assert ODD_CLASS in labels
    assert page.evaluate("document.querySelectorAll('b').length") == 0
    page.goto(_url(report_dir / "model.html"))
    page.wait_for_selector("#chart-dead svg")
    stats = json.loads((report_dir / "stats.json").read_text())
    layers = stats.get("layers", stats)
    bars = page.evaluate(BARS, "#chart-dead g.hbar")
    got = {b["data"]["label"]: (int(b["data"]["num"]), int(b["data"]["den"])) for b in bars}
    assert page.evaluate("document.querySelectorAll('b').length") == 0
    assert got == {k: (len(v["dead"]), v["shape"][-1]) for k, v in layers.items()}
    # the parity table of the real export's metadata
    spec = json.loads((report_dir / "run.json").read_text())["spec"]
    rows = page.eval_on_selector_all(
        "table.parity tbody tr", "rs => rs.map(r => Array.from(r.cells).map(c => c.textContent))"
    )
    assert sorted(r[0] for r in rows) == sorted(spec["parity"]["outputs"])
    for r in rows:
        v = spec["parity"]["outputs"][r[0]]
        assert float(r[3]) == pytest.approx(v["score"], rel=1e-3, abs=1e-12)
        assert r[4].strip().startswith("pass")
    w.assert_images_loaded()
    w.assert_clean()
