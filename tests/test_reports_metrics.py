"""The faithfulness metrics in the report (issue 11): the method comparison table on the
index and model page, the mean deletion/insertion curves as inline SVG, each image's
scores on its page.  Checked against the run's own files (run.json's
``summary.metrics``, results.jsonl's ``metrics`` and ``metric_curves``) of a real
``convlens run --metrics all`` of the bundled demo model, with the expectations
(directions, best values, geometry) worked out here, not by the report's code."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_reports_charts import Tree, text_of, tree

from convlens.engine.cams import METHODS
from convlens.engine.metrics import METRICS
from convlens.engine.outdir import CURVE_POINTS
from convlens.reports import render_report

from report_fixtures import METRIC_SAMPLE, make_fake_run, real_metric_run

#: the columns as the issue names them, with the direction the metric's paper gives
EXPECTED = {
    "deletion": ("Deletion AUC", False),
    "insertion": ("Insertion AUC", True),
    "avg_drop": ("Average Drop", False),
    "increase": ("Increase in Confidence", True),
    "road_morf": ("ROAD MoRF", False),
    "road_lerf": ("ROAD LeRF", True),
    "road": ("ROAD combined", True),
}


@pytest.fixture(scope="module")
def metric_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return real_metric_run(tmp_path_factory.getbasetemp())


def run_json(outdir: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((outdir / "run.json").read_text())
    return doc


def records(outdir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (outdir / "results.jsonl").read_text().splitlines()]


def table_of(t: Tree) -> dict[str, dict[str, dict[str, str]]]:
    """The method table: method -> score key -> {"value", "text", "class"}."""
    rows: dict[str, dict[str, dict[str, str]]] = {}
    inside = False
    method = ""
    for tag, a, buf in t.texts:
        if tag == "table":
            inside = a.get("id") == "methods-table"
        elif inside and tag == "tr" and "data-method" in a:
            method = a["data-method"]
            rows[method] = {}
        elif inside and tag == "td" and method:
            rows[method][a["data-score"]] = {
                "value": a.get("data-value", ""),
                "text": text_of(buf),
                "class": a.get("class", ""),
            }
    return rows


def head_of(t: Tree) -> dict[str, str]:
    return {
        a["data-score"]: text_of(buf)
        for tag, a, buf in t.texts
        if tag == "th" and "data-score" in a
    }


def expected_best(per: dict[str, dict[str, float]], key: str, higher: bool) -> set[str]:
    """Methods whose value, to 3 decimals as shown, is the best; none when all tie."""
    shown = {m: round(v[key], 3) for m, v in per.items() if key in v}
    if len(set(shown.values())) < 2:
        return set()
    top = max(shown.values()) if higher else min(shown.values())
    return {m for m, v in shown.items() if v == top}


def test_registry_declares_every_score_label_and_direction() -> None:
    declared = {
        k: (mt.score_labels[k], better)
        for mt in METRICS.values()
        for k, better in mt.higher_is_better.items()
    }
    assert declared == EXPECTED
    assert [m for m, mt in METRICS.items() if mt.curve_x] == ["deletion", "insertion"]


@pytest.mark.parametrize("page", ["index.html", "model.html"])
def test_method_table_equals_run_json(metric_run: Path, page: str) -> None:
    summary = run_json(metric_run)["summary"]["metrics"]
    t = tree(metric_run / page)
    table = table_of(t)
    # every method the run computed, in the registry's order
    methods = run_json(metric_run)["settings"]["cam_methods"]
    assert list(table) == [m for m in METHODS if m in methods]
    assert set(table) == set(summary)
    heads = head_of(t)
    for key, (label, higher) in EXPECTED.items():
        assert heads[key].startswith(label)
        assert ("higher is better" if higher else "lower is better") in heads[key]
    for m, row in table.items():
        assert row["n"]["text"] == str(summary[m]["n"]) == str(METRIC_SAMPLE)
        for key in EXPECTED:
            want = summary[m][key]
            assert float(row[key]["value"]) == want, (m, key)
            assert row[key]["text"].split()[0] == f"{want:.3f}"
    for key, (_, higher) in EXPECTED.items():
        best = {m for m, row in table.items() if "best" in row[key]["class"].split()}
        assert best == expected_best(summary, key, higher), key
        assert all(("★" in row[key]["text"]) == (m in best) for m, row in table.items())


def test_model_summary_section_leaves_the_metrics_to_the_table(metric_run: Path) -> None:
    html = (metric_run / "model.html").read_text(encoding="utf-8")
    assert "metrics.gradcam" not in html and "curves.deletion" not in html


def polyline_values(points: str, top: float, plot_h: float) -> list[float]:
    ys = [float(p.split(",")[1]) for p in points.split()]
    return [1 - (y - top) / plot_h for y in ys]


def test_mean_curves_as_svg(metric_run: Path) -> None:
    """One line per method in each of the deletion and insertion charts, its points the
    run's mean curve (read back from the SVG geometry), with axis labels and a legend."""
    summary = run_json(metric_run)["summary"]["metrics"]
    t = tree(metric_run / "model.html")
    html = (metric_run / "model.html").read_text(encoding="utf-8")
    for metric in ("deletion", "insertion"):
        fig = f"chart-curve-{metric}"
        assert f'id="{fig}"' in html
        svg = html[html.index(f'id="{fig}"') : html.index("</figure>", html.index(f'id="{fig}"'))]
        vb = re.search(r'viewBox="0 0 (\d+) (\d+)"', svg)
        assert vb is not None
        lines = re.findall(
            r'data-series="([^"]+)"><title>[^<]*</title><polyline[^>]*points="([^"]+)"', svg
        )
        assert [m for m, _ in lines] == [m for m in METHODS if m in summary]
        # the plot area: the y ticks 1 and 0 are drawn at its top and bottom
        ticks = dict(
            re.findall(
                r'<text class="tick" x="[\d.]+" y="([\d.]+)" text-anchor="end">([\d.]+)</text>', svg
            )
        )
        y_of = {v: float(y) - 4 for y, v in ticks.items()}
        top, bottom = y_of["1"], y_of["0"]
        for m, points in lines:
            got = polyline_values(points, top, bottom - top)
            want = summary[m]["curves"][metric]
            assert len(got) == len(want) == CURVE_POINTS
            np.testing.assert_allclose(got, np.clip(want, 0, 1), atol=0.01)
        assert METRICS[metric].curve_x in svg and "class probability" in svg
        keys = [
            text_of(b)
            for tag, a, b in t.texts
            if tag == "span" and a.get("class") == "key" and a.get("data-series")
        ]
        assert any(k.startswith("Grad-CAM (") for k in keys)
    assert "<script" not in html.split("</main>")[0]  # no script in the page body


def test_image_pages_give_each_images_scores(metric_run: Path) -> None:
    recs = [r for r in records(metric_run) if r["status"] == "ok"]
    scored = [r for r in recs if r.get("metrics")]
    assert len(scored) == METRIC_SAMPLE and len(recs) > METRIC_SAMPLE
    for r in recs:
        path = metric_run / "images" / f"{r['id']}.html"
        t = tree(path)
        table = table_of(t)
        if not r.get("metrics"):
            assert table == {} and 'id="faithfulness"' not in path.read_text()
            continue
        assert list(table) == [m for m in METHODS if m in r["metrics"]]
        for m, row in table.items():
            assert "n" not in row
            for key, (_, higher) in EXPECTED.items():
                assert float(row[key]["value"]) == r["metrics"][m][key]
                assert ("best" in row[key]["class"]) == (
                    m in expected_best(r["metrics"], key, higher)
                )
        html = path.read_text(encoding="utf-8")
        # beside the maps: in the same panel, after the CAM table
        cams = html.index('class="panel cams"')
        assert cams < html.index('id="faithfulness"') < html.index('class="panel grids"')
        assert html.count("<polyline") == 2 * len(r["metric_curves"])


def test_no_metrics_no_table(tmp_path: Path) -> None:
    run = make_fake_run(tmp_path / "out", 4, n_failed=0)
    render_report(run.outdir, page_size=4)
    pages = [run.outdir / "index.html", run.outdir / "model.html"]
    pages += [run.outdir / "images" / f"{r['id']}.html" for r in run.ok_records]
    for p in pages:
        html = p.read_text(encoding="utf-8")
        assert 'id="faithfulness"' not in html and "methods-table" not in html, p.name


def test_hostile_method_name_and_odd_values(tmp_path: Path) -> None:
    """A hand-edited run.json: a method name with markup is text, a value that is not a
    number is a dash, and a method only the record knows comes after the registry's."""
    run = make_fake_run(tmp_path / "out", 4, n_failed=0, metrics=True)
    doc = run_json(run.outdir)
    ms = doc["summary"]["metrics"]
    ms["<img src=x onerror=alert(1)>"] = {"n": 1, "deletion": 0.01, "insertion": "high"}
    (run.outdir / "run.json").write_text(json.dumps(doc))
    render_report(run.outdir, page_size=4)
    html = (run.outdir / "index.html").read_text(encoding="utf-8")
    assert "<img src=x onerror" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    table = table_of(tree(run.outdir / "index.html"))
    odd = table["<img src=x onerror=alert(1)>"]
    assert list(table)[-1] == "<img src=x onerror=alert(1)>"
    assert odd["insertion"]["text"] == "—" and odd["insertion"]["value"] == ""
    assert "best" in odd["deletion"]["class"]  # 0.01 is the lowest deletion AUC


def test_only_the_asked_metrics_are_columns() -> None:
    """--metrics deletion: one score column; no curve chart without curves; one method
    alone is not marked best; the registry's direction decides (lower deletion wins)."""
    from convlens.reports.faithfulness import method_table, run_faithfulness

    one = method_table({"gradcam": {"n": 3, "deletion": 0.2}}, counts=True)
    assert one is not None and [c.key for c in one.columns] == ["deletion"]
    assert not one.rows[0].cells[0].best and one.rows[0].n == 3
    two = method_table({"gradcam": {"deletion": 0.2}, "cam": {"deletion": 0.1}}, counts=False)
    assert two is not None and [r.method for r in two.rows] == ["cam", "gradcam"]
    assert [r.cells[0].best for r in two.rows] == [True, False] and two.rows[0].n is None
    f = run_faithfulness({"metrics": {"cam": {"n": 1, "avg_drop": 0.5, "curves": {}}}}, {})
    assert f is not None and f.curves == [] and [c.key for c in f.table.columns] == ["avg_drop"]
    assert f.references == [(METRICS["avgdrop"].label, METRICS["avgdrop"].reference)]
    assert run_faithfulness({}, {}) is None and run_faithfulness({"metrics": {}}, {}) is None
