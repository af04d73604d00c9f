"""The faithfulness parts of the report in a real browser (Debian's chromium through
Playwright, file:// URLs, network refused): the method table and the deletion/insertion
curves drawn as inline SVG under the report's CSP, on the real ``--metrics`` run of the
bundled model (tests/report_fixtures.py ``real_metric_run``).

A CSP violation is caught by a ``securitypolicyviolation`` listener installed before any
page script runs; the listener is shown to work by a deliberate violation (an inline
style attribute) at the end of each page's check.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_reports_browser import SCREENSHOTS, Watched, _url, browser, watched

from convlens.engine.cams import METHODS

from report_fixtures import real_metric_run

pytestmark = pytest.mark.browser
__all__ = ["browser", "watched"]  # fixtures, used by name

CSP_LISTENER = """
window.__csp = [];
document.addEventListener('securitypolicyviolation',
    e => window.__csp.push(e.violatedDirective + ' ' + (e.blockedURI || 'inline')));
"""

CHARTS = """() => Array.from(document.querySelectorAll('figure.line-chart')).map(f => ({
    id: f.id,
    lines: Array.from(f.querySelectorAll('polyline')).map(l => {
        const b = l.getBBox(), s = getComputedStyle(l);
        return {series: l.parentElement.getAttribute('data-series'), w: b.width,
                h: b.height, stroke: s.stroke, fill: s.fill,
                points: l.points.numberOfItems};
    }),
    keys: Array.from(f.querySelectorAll('.line-key .key')).map(k => ({
        text: k.textContent, swatch: getComputedStyle(k.querySelector('.swatch'))
            .backgroundColor})),
    labels: Array.from(f.querySelectorAll('.axis-label')).map(t => t.textContent),
    box: f.querySelector('svg').getBoundingClientRect().width,
}))"""

TABLE = """() => Array.from(document.querySelectorAll('#methods-table tbody tr')).map(r => ({
    method: r.getAttribute('data-method'),
    best: Array.from(r.querySelectorAll('td.best')).map(td => ({
        score: td.getAttribute('data-score'),
        weight: getComputedStyle(td).fontWeight})),
    visible: r.getBoundingClientRect().height > 0,
}))"""


@pytest.fixture(scope="module")
def metric_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return real_metric_run(tmp_path_factory.getbasetemp())


def _open(w: Watched, path: Path) -> None:
    w.page.add_init_script(CSP_LISTENER)
    w.page.goto(_url(path))
    w.page.wait_for_load_state("load")


def _assert_no_csp_violation_then_catch_one(w: Watched) -> None:
    assert w.page.evaluate("window.__csp") == []
    # the listener works: an inline style attribute is refused and reported
    w.page.evaluate("document.body.setAttribute('style', 'color: red')")
    w.page.wait_for_function("window.__csp.length > 0", timeout=5_000)
    assert any("style-src" in v for v in w.page.evaluate("window.__csp"))
    w.errors[:] = [e for e in w.errors if "Content Security Policy" not in e]


def _methods(outdir: Path) -> list[str]:
    run = json.loads((outdir / "run.json").read_text())
    return [m for m in METHODS if m in run["summary"]["metrics"]]


def test_model_page_table_and_curves(watched: Watched, metric_run: Path) -> None:
    w, page = watched, watched.page
    _open(w, metric_run / "model.html")
    methods = _methods(metric_run)
    rows: list[dict[str, Any]] = page.evaluate(TABLE)
    assert [r["method"] for r in rows] == methods and all(r["visible"] for r in rows)
    bests = [b for r in rows for b in r["best"]]
    assert bests and all(int(b["weight"]) >= 700 for b in bests)
    charts: list[dict[str, Any]] = page.evaluate(CHARTS)
    assert [c["id"] for c in charts] == ["chart-curve-deletion", "chart-curve-insertion"]
    for c in charts:
        assert [ln["series"] for ln in c["lines"]] == methods
        for ln in c["lines"]:
            assert ln["points"] == 21 and ln["w"] > 100  # drawn across the plot
            assert ln["fill"] == "none" and ln["stroke"] not in ("none", "")
        # one colour a line, the legend's swatch in the line's colour
        assert len({ln["stroke"] for ln in c["lines"]}) == len(methods)
        assert [k["swatch"] for k in c["keys"]] == [ln["stroke"] for ln in c["lines"]]
        assert "class probability" in c["labels"]
        assert any(label.startswith("fraction of pixels") for label in c["labels"])
        assert 300 < c["box"] <= 420
    w.assert_images_loaded()
    _assert_no_csp_violation_then_catch_one(w)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.locator("#faithfulness").screenshot(path=str(SCREENSHOTS / "faithfulness.png"))
    w.assert_clean()


def test_index_table(watched: Watched, metric_run: Path) -> None:
    w, page = watched, watched.page
    _open(w, metric_run / "index.html")
    rows = page.evaluate(TABLE)
    assert [r["method"] for r in rows] == _methods(metric_run)
    assert page.locator("#faithfulness a[href='model.html#faithfulness']").count() == 1
    page.wait_for_selector("#gallery .card")  # the gallery still works beside it
    _assert_no_csp_violation_then_catch_one(w)
    w.assert_clean()


def test_image_page_scores_beside_maps(watched: Watched, metric_run: Path) -> None:
    w, page = watched, watched.page
    recs = [json.loads(line) for line in (metric_run / "results.jsonl").read_text().splitlines()]
    scored = next(r for r in recs if r.get("metrics"))
    _open(w, metric_run / "images" / f"{scored['id']}.html")
    rows = page.evaluate(TABLE)
    assert [r["method"] for r in rows] == [m for m in METHODS if m in scored["metrics"]]
    charts = page.evaluate(CHARTS)
    assert len(charts) == 2 and all(len(c["lines"]) == len(rows) for c in charts)
    # beside the maps: the scores start below the CAM table, above the activations
    cams = page.locator(".cam-table").bounding_box()
    table = page.locator("#methods-table").bounding_box()
    grids = page.locator(".panel.grids").bounding_box()
    assert cams and table and grids
    assert cams["y"] + cams["height"] <= table["y"] < grids["y"]
    w.assert_images_loaded()
    _assert_no_csp_violation_then_catch_one(w)
    w.assert_clean()
