"""Small formatting helpers shared by the page data and the templates."""

from __future__ import annotations

import json
import math
from typing import Any


def compress_ranges(values: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0–2, 5, 7–8"."""
    out: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else f"{values[i]}–{values[j]}")
        i = j + 1
    return ", ".join(out)


def fmt_num(v: Any) -> str:
    """Short human form of a number (or pass other values through as JSON)."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v == 0:
            return "0"
        if abs(v) >= 1e5 or abs(v) < 1e-3:
            return f"{v:.3e}"
        return f"{v:.4g}"
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    return json.dumps(v, sort_keys=True, ensure_ascii=False)


def flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Nested dict -> [("a.b", "value")], values formatted with :func:`fmt_num`."""
    rows: list[tuple[str, str]] = []
    for k in sorted(d, key=str):
        v = d[k]
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            rows.extend(flatten(v, key + "."))
        elif isinstance(v, list) and len(v) > 12:
            rows.append((key, f"[{len(v)} values] " + fmt_num(v[:12])[:-1] + ", …]"))
        else:
            rows.append((key, fmt_num(v)))
    return rows
