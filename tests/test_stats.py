"""Run statistics against numpy over the concatenated activations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from convlens.engine.stats import LayerStats, RunStats


def _batches(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for n in (3, 1, 4, 2):
        a = np.maximum(rng.standard_normal((n, 4, 5, 6)), 0).astype(np.float32)
        a[..., 2] = 0.0  # dead: never fires
        a[..., 4] = -1.5  # dead: always negative (pre-activation layer)
        out.append(a)
    return out


def _expected(whole: np.ndarray) -> dict[str, Any]:
    flat = whole.reshape(-1, whole.shape[-1]).astype(np.float64)
    return {
        "mean": flat.mean(axis=0),
        "max": flat.max(axis=0),
        "zero_fraction": (flat == 0).mean(axis=0),
        "dead": [int(i) for i in np.flatnonzero(flat.max(axis=0) <= 0)],
    }


def _assert_matches(st: LayerStats, whole: np.ndarray) -> None:
    exp = _expected(whole)
    assert st.shape == whole.shape[1:]
    assert st.count == whole.shape[0]
    assert st.positions == whole.shape[0] * whole.shape[1] * whole.shape[2]
    np.testing.assert_allclose(st.mean, exp["mean"], rtol=1e-12)
    np.testing.assert_array_equal(st.max, exp["max"])
    np.testing.assert_allclose(st.zero_fraction, exp["zero_fraction"], rtol=1e-12)
    assert st.dead == exp["dead"] == [2, 4]


def test_update_equals_whole() -> None:
    batches = _batches()
    rs = RunStats()
    for b in batches:
        rs.update("conv1", b)
        rs.update("conv2", b[:, :2, :3, :3] * 2)
    _assert_matches(rs["conv1"], np.concatenate(batches))
    whole2 = np.concatenate([b[:, :2, :3, :3] * 2 for b in batches])
    assert rs["conv2"].shape == (2, 3, 3)
    np.testing.assert_allclose(rs["conv2"].mean, _expected(whole2)["mean"], rtol=1e-12)
    assert list(rs.layers) == ["conv1", "conv2"]


def test_merge_of_two_halves_equals_whole() -> None:
    batches = _batches(1)
    first, second = RunStats(), RunStats()
    for b in batches[:2]:
        first.update("c", b)
    for b in batches[2:]:
        second.update("c", b)
    second.update("only_in_second", batches[0][:, :1, :1])
    first.merge(second)
    _assert_matches(first["c"], np.concatenate(batches))
    assert "only_in_second" in first
    assert first["only_in_second"].count == batches[0].shape[0]


def test_shape_mismatch() -> None:
    rs = RunStats()
    rs.update("c", np.zeros((1, 2, 2, 3), np.float32))
    with pytest.raises(ValueError):
        rs.update("c", np.zeros((1, 2, 2, 4), np.float32))
    other = RunStats()
    other.update("c", np.zeros((1, 3, 3, 3), np.float32))
    with pytest.raises(ValueError):
        rs.merge(other)


def test_empty_batch_is_ignored() -> None:
    rs = RunStats()
    rs.update("c", np.zeros((0, 2, 2, 3), np.float32))
    st = rs["c"]
    assert st.count == 0 and st.dead == []
    d = rs.to_json_dict()["c"]
    assert d["max"] == [None, None, None] and d["mean"] == [0.0, 0.0, 0.0]


def test_save_load_roundtrip_atomic(tmp_path: Path) -> None:
    rs = RunStats()
    for b in _batches(2):
        rs.update("block/conv 1", b)  # names with '/' and spaces survive
    rs.update("head", _batches(3)[0][:, :1, :1, :2])
    path = tmp_path / "shard_0001.npz"
    rs.save_npz(path)
    rs.save_npz(path)  # replaces the existing file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard_0001.npz"]  # no temp left
    back = RunStats.load_npz(path)
    assert list(back.layers) == ["block/conv 1", "head"]
    for name in rs.layers:
        a, b = rs[name], back[name]
        assert (a.shape, a.count, a.positions) == (b.shape, b.count, b.positions)
        np.testing.assert_array_equal(a.sum, b.sum)
        np.testing.assert_array_equal(a.max, b.max)
        np.testing.assert_array_equal(a.zeros, b.zeros)
    assert back.to_json_dict() == rs.to_json_dict()


def test_save_failure_leaves_no_temp(tmp_path: Path) -> None:
    rs = RunStats()
    rs.update("c", np.ones((1, 1, 1, 2), np.float32))
    target = tmp_path / "dir_in_the_way"
    target.mkdir()
    (target / "x").write_text("occupied")
    with pytest.raises(OSError):
        rs.save_npz(target)  # os.replace cannot replace a non-empty directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir_in_the_way"]


def test_to_json_dict() -> None:
    batches = _batches(4)
    rs = RunStats()
    for b in batches:
        rs.update("c", b)
    d = rs.to_json_dict()
    json.dumps(d, allow_nan=False)  # strict JSON
    c = d["c"]
    assert c["shape"] == [4, 5, 6]
    assert c["count"] == sum(b.shape[0] for b in batches)
    assert c["dead"] == [2, 4]
    exp = _expected(np.concatenate(batches))
    for key in ("mean", "max", "zero_fraction"):
        assert len(c[key]) == 6
        for got, want in zip(c[key], exp[key], strict=True):
            assert got == float(f"{want:.6g}")
            assert len(f"{got:.15g}".lstrip("-").replace(".", "").lstrip("0")) <= 6
