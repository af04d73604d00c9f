"""Golden pages, in coverage.py's manner: every page kind of a fixed fake run, rendered,
volatile parts scrubbed (the temporary folder, ids derived from it, versions, dates),
compared byte for byte with tests/golden/.  After an intended change of the pages:

    CONVLENS_UPDATE_GOLDEN=1 pytest tests/test_reports_golden.py

and review the diff of tests/golden/ like any other change.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from convlens import __version__
from convlens.reports import render_report

from report_fixtures import FakeRun, make_fake_run

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("CONVLENS_UPDATE_GOLDEN") == "1"


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory: pytest.TempPathFactory) -> FakeRun:
    run = make_fake_run(
        tmp_path_factory.mktemp("golden") / "out", 6, grid_sample=2, n_failed=2, metrics=True
    )
    render_report(run.outdir, page_size=4)
    return run


def scrub(text: str, run: FakeRun) -> str:
    """The page without what changes from one run of the tests to the next."""
    ids = {r["id"]: f"id{i:02d}" for i, r in enumerate(run.records)}
    for rid, stable in ids.items():
        text = text.replace(rid, stable)
    text = text.replace(str(run.outdir.parent), "<TMP>")
    text = text.replace(__version__, "<VERSION>")
    text = re.sub(r"(timings\.[a-z_]+</dt><dd>)[0-9.e+-]+", r"\1<SECONDS>", text)
    return re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ?", "<DATE>", text)


def pages(run: FakeRun) -> dict[str, Path]:
    first_ok = run.ok_records[0]["id"]
    return {
        "index.html": run.outdir / "index.html",
        "model.html": run.outdir / "model.html",
        "image.html": run.outdir / "images" / f"{first_ok}.html",
        "gallery-data.js": run.outdir / "static" / "gallery-data.js",
    }


@pytest.mark.parametrize("name", ["index.html", "model.html", "image.html", "gallery-data.js"])
def test_page_matches_golden(golden_run: FakeRun, name: str) -> None:
    got = scrub(pages(golden_run)[name].read_text(encoding="utf-8"), golden_run)
    path = GOLDEN / name
    if UPDATE or not path.exists():
        if not UPDATE and os.environ.get("CI"):
            pytest.fail(f"{path} is missing: run with CONVLENS_UPDATE_GOLDEN=1 and commit it")
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(got, encoding="utf-8")
    assert got == path.read_text(encoding="utf-8"), (
        f"{name} differs from tests/golden/{name}; if intended, regenerate with "
        "CONVLENS_UPDATE_GOLDEN=1"
    )
