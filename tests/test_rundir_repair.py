"""Issue 14.10-14.12: an OUTDIR with small damage resumes into what a clean run writes.

Each test makes a clean run of the bundled demo (15 photographs, batch size 1, so that
two statistics shards exist), copies it, damages the copy as a kill, a disk or a person
would, runs the same command again in-process, and compares with the clean run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from convlens.cli import main


def _demo(out: Path, *extra: str) -> tuple[int, str]:
    """``convlens demo -o OUT --batch-size 1 EXTRA`` in this process: (status, output)."""
    r = CliRunner().invoke(main, ["demo", "-o", str(out), "--batch-size", "1", *extra])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.output


def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _comparable(out: Path) -> dict[str, Any]:
    return {
        r["id"]: (r["status"], r.get("predictions"), r.get("cam_classes"), r.get("maps"))
        for r in _records(out)
    }


def _files(out: Path, *folders: str) -> set[str]:
    """Every file under ``folders`` of ``out``, relative to ``out``."""
    return {
        str(p.relative_to(out))
        for f in folders
        if (out / f).exists()
        for p in (out / f).rglob("*")
        if p.is_file()
    }


def _same_as_clean(out: Path, clean: Path, what: str) -> None:
    """Records, statistics and class CAMs equal to the clean run's; each image once."""
    assert len(_records(out)) == 15, what
    assert _comparable(out) == _comparable(clean), what
    got = json.loads((out / "stats.json").read_text())
    want = json.loads((clean / "stats.json").read_text())
    assert sorted(got) == sorted(want), what
    for layer, s in want.items():
        assert got[layer]["count"] == s["count"] == 15, (what, layer)
        np.testing.assert_allclose(got[layer]["mean"], s["mean"], rtol=1e-5, err_msg=what)
    with np.load(out / "class_cams.npz") as z, np.load(clean / "class_cams.npz") as c:
        np.testing.assert_array_equal(z["counts"], c["counts"], err_msg=what)


def _repaired_line(output: str) -> str:
    said = [line for line in output.splitlines() if "repaired on resume" in line]
    assert len(said) == 1, output
    return said[0]


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The clean run every damaged copy is compared with: maps, report, 5 grids."""
    out = tmp_path_factory.mktemp("clean") / "out"
    status, output = _demo(out, "--save-maps", "--grid-sample", "5")
    assert status == 0, output
    assert len(list((out / "shards").glob("*.json"))) == 2
    return out


def _copy(clean: Path, dest: Path) -> Path:
    shutil.copytree(clean, dest)
    return dest


ARGS = ("--save-maps", "--grid-sample", "5")


# ---------------------------------------------------------------- 14.10: run.json


@pytest.mark.parametrize(
    "name,text",
    [
        ("list", "[]"),
        ("number", "42"),
        ("string", '"run"'),
        ("cut", '{"schema_version": 1, "fingerprint": {"model_sha1"'),
        ("no fingerprint", '{"hello": 1}'),
        ("deleted", None),
    ],
)
def test_unusable_run_json_is_rebuilt_from_its_shards(
    clean_run: Path, tmp_path: Path, name: str, text: str | None
) -> None:
    """A run.json that is not a run's object, beside shards that all carry this model's
    and settings' fingerprint, is rewritten: one line says so, nothing is lost."""
    out = _copy(clean_run, tmp_path / "out")
    if text is None:
        (out / "run.json").unlink()
    else:
        (out / "run.json").write_text(text)
    status, output = _demo(out, *ARGS)
    assert status == 0, (name, output)
    line = _repaired_line(output)
    assert "run.json" in line and "rewritten" in line, line
    _same_as_clean(out, clean_run, name)
    doc = json.loads((out / "run.json").read_text())
    assert doc["fingerprint"] == json.loads((clean_run / "run.json").read_text())["fingerprint"]
    assert doc["summary"]["total"] == 15


@pytest.mark.parametrize("shards", ["another model's", "without fingerprint", "none"])
def test_unusable_run_json_without_proof_is_refused(
    clean_run: Path, tmp_path: Path, shards: str
) -> None:
    """Without shards that prove the results are this model's (14.5), a run.json that
    is a list is refused in one line that says --force, and nothing is touched."""
    out = _copy(clean_run, tmp_path / "out")
    (out / "run.json").write_text("[1, 2]")
    metas = sorted((out / "shards").glob("*.json"))
    for meta in metas:
        doc = json.loads(meta.read_text())
        if shards == "another model's":
            doc["fingerprint"]["model_sha1"] = "0" * 40
        elif shards == "without fingerprint":  # as an older convlens wrote them
            del doc["fingerprint"]
        else:
            meta.unlink()
            continue
        meta.write_text(json.dumps(doc))
    before = (out / "results.jsonl").read_bytes()
    status, output = _demo(out, *ARGS)
    assert status == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and "run.json" in lines[0] and "--force" in lines[0], output
    assert "Traceback" not in output
    assert (out / "results.jsonl").read_bytes() == before
    assert (out / "run.json").read_text() == "[1, 2]"


def test_one_reader_of_run_json(clean_run: Path, tmp_path: Path) -> None:
    """The engine and the report read run.json through one reader: what it refuses the
    report names in a note (and renders without), what it reads the report shows."""
    from convlens.engine.outdir import RunJsonError, read_run_json
    from convlens.reports.data import read_run

    notes: list[str] = []
    info = read_run(clean_run, notes)
    doc = read_run_json(clean_run)
    assert doc is not None and notes == []
    assert info.spec == doc.spec and info.settings == doc.settings
    assert info.extra["fingerprint"] == doc.fingerprint and info.summary == doc.summary
    out = _copy(clean_run, tmp_path / "out")
    for text, kind in (("[]", "a JSON list"), ("7", "a JSON number"), ("{", "not JSON")):
        (out / "run.json").write_text(text)
        with pytest.raises(RunJsonError) as err:
            read_run_json(out)
        assert kind in str(err.value) and "\n" not in str(err.value)
        notes.clear()
        info = read_run(out, notes)
        assert info.spec is None and info.summary == {}
        assert notes == [f"run.json {err.value.reason}; shown without it"]
        r = CliRunner().invoke(main, ["report", str(out)])
        assert r.exit_code == 0, r.output
        for page in ("index.html", "model.html"):
            assert notes[0] in (out / page).read_text(), page


# ---------------------------------------------------------------- 14.10: shards


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[:100])


SHARD_DAMAGE = {
    "first cams.npz deleted": lambda s: (s / "000000.cams.npz").unlink(),
    "last stats.npz deleted": lambda s: (s / "000001.stats.npz").unlink(),
    "first stats.npz cut": lambda s: _truncate(s / "000000.stats.npz"),
    "last cams.npz emptied": lambda s: (s / "000001.cams.npz").write_bytes(b""),
    "ids not a list": lambda s: (s / "000000.json").write_text('{"ids": "abc"}'),
    "shard json a list": lambda s: (s / "000001.json").write_text("[]"),
}


@pytest.mark.parametrize("name", list(SHARD_DAMAGE))
def test_damaged_shard_is_dropped_and_recomputed(
    clean_run: Path, tmp_path: Path, name: str
) -> None:
    out = _copy(clean_run, tmp_path / "out")
    SHARD_DAMAGE[name](out / "shards")
    status, output = _demo(out, *ARGS)
    assert status == 0, (name, output)
    line = _repaired_line(output)
    assert "1 damaged or out-of-step shard(s) dropped" in line and "to be recomputed" in line
    _same_as_clean(out, clean_run, name)


# ---------------------------------------------------------------- 14.11: per-image files


REPORT_FILES = ("assets/thumbs", "assets/cams", "assets/grids")


def _first_id(out: Path) -> str:
    return str(_records(out)[0]["id"])


FILE_DAMAGE = {
    "rm -rf maps": lambda o: shutil.rmtree(o / "maps"),
    "rm -rf assets": lambda o: shutil.rmtree(o / "assets"),
    "one map": lambda o: (o / "maps" / f"{_first_id(o)}.npz").unlink(),
    "one thumbnail": lambda o: (o / "assets" / "thumbs" / f"{_first_id(o)}.jpg").unlink(),
    "one heatmap": lambda o: next((o / "assets" / "cams" / _first_id(o)).iterdir()).unlink(),
    "one grid folder": lambda o: shutil.rmtree(o / "assets" / "grids" / _first_id(o)),
}


@pytest.mark.parametrize("name", list(FILE_DAMAGE))
def test_missing_per_image_files_are_recreated(clean_run: Path, tmp_path: Path, name: str) -> None:
    """Resume checks the files a record points at (maps/) and the report's per-image
    files: what is missing is recomputed, and the run ends as the clean one."""
    out = _copy(clean_run, tmp_path / "out")
    FILE_DAMAGE[name](out)
    status, output = _demo(out, *ARGS)
    assert status == 0, (name, output)
    line = _repaired_line(output)
    assert "whose files were missing" in line and "to be recomputed" in line, line
    _same_as_clean(out, clean_run, name)
    assert _files(out, "maps", *REPORT_FILES) == _files(clean_run, "maps", *REPORT_FILES)
    for r in _records(out):
        with np.load(out / r["maps"]) as z:
            assert sorted(z.files) == sorted(
                f"{m}/{c}" for m in r["cam_methods"] for c in r["cam_classes"]
            )
    # and once more: nothing is missing now, nothing is recomputed
    status, output = _demo(out, *ARGS)
    assert status == 0 and "repaired" not in output and "(0 processed, 15 already" in output


def test_a_report_after_a_run_without_one_has_every_file(clean_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert _demo(out, "--save-maps", "--no-report")[0] == 0
    assert not (out / "assets").exists()
    status, output = _demo(out, *ARGS)
    assert status == 0, output
    assert _files(out, *REPORT_FILES) == _files(clean_run, *REPORT_FILES)


# ---------------------------------------------------------------- 14.12: grid sample


def test_grid_sample_after_a_kill_is_the_clean_runs(tmp_path: Path) -> None:
    """The state a SIGKILL leaves: the report's files written for 12 images, their 12
    records appended, but only the first shard (8 images) flushed.  Resume recomputes
    images 8..11; the grids are still exactly those of a clean run (the first 14 of the
    15), and so are the image pages."""
    clean = tmp_path / "clean"
    assert _demo(clean, "--grid-sample", "14")[0] == 0
    grids = _files(clean, "assets/grids")
    assert len({Path(g).parts[2] for g in grids}) == 14
    killed = _copy(clean, tmp_path / "killed")
    lines = (killed / "results.jsonl").read_bytes().splitlines(keepends=True)
    (killed / "results.jsonl").write_bytes(b"".join(lines[:12]))
    for p in (killed / "shards").glob("000001.*"):
        p.unlink()
    for rec in [json.loads(line) for line in lines[12:]]:  # the kill came before these
        (killed / "assets" / "thumbs" / f"{rec['id']}.jpg").unlink()
        shutil.rmtree(killed / "assets" / "cams" / rec["id"])
        shutil.rmtree(killed / "assets" / "grids" / rec["id"], ignore_errors=True)
        (killed / "images" / f"{rec['id']}.html").unlink()
    status, output = _demo(killed, "--grid-sample", "14")
    assert status == 0, output
    assert "(7 processed, 8 already done)" in output, output
    assert _files(killed, "assets/grids") == grids
    assert _files(killed, "assets", "images") == _files(clean, "assets", "images")
    for page in sorted((clean / "images").iterdir()):
        assert (killed / "images" / page.name).read_bytes() == page.read_bytes(), page.name


def test_grid_policy_is_a_function_of_place_not_of_arrival() -> None:
    """The sample is the first ok images of the input order (the engine streams the
    images still to do in that order), asked once or twice; a resume expects grids only
    where they are certain."""
    from convlens.engine.outdir import Prediction, Record
    from convlens.reports.gridpolicy import GridPolicy

    def rec(i: str, prob: float = 0.9) -> Record:
        return Record(i, i, i, predictions=[Prediction(0, "a", prob)])

    order = ["a", "b", "c", "d", "e"]
    policy = GridPolicy("sample", 2)
    policy.expect(order, {})
    assert [policy.decide(rec(i)) for i in ("a", "a", "b", "c", "b", "d")] == [
        True,
        True,
        True,
        False,
        True,
        False,
    ]
    # in order, then as a resume sees it: a and c done (b, d, e still to run)
    policy = GridPolicy("sample", 2)
    policy.expect(order, {"a": rec("a"), "c": rec("c")})
    assert [policy.decide(rec(i)) for i in ("b", "d", "e")] == [True, False, False]
    done = {"a": rec("a"), "c": rec("c"), "d": rec("d"), "e": rec("e", prob=0.2)}
    # b may fail (then c is among the first two ok) or not: only a is certain, and e
    # (low confidence) whatever its place
    assert policy.certain(order, done) == {"a", "e"}
    assert GridPolicy("all", 0).certain(order, done) == set(done)
    assert GridPolicy("none", 9).certain(order, done) == set()
