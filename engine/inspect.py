"""Describe an analysis ONNX: outputs, shapes, roles, metadata and parity (no TensorFlow)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import contract as C
from . import onnxproto


def dims(value_info: Any) -> list[int | str]:
    """A graph input's or output's shape: fixed sizes, or the dynamic dim's name."""
    return [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
        for d in value_info.type.tensor_type.shape.dim
    ]


def describe(path: str | Path) -> dict[str, Any]:
    """Everything ``convlens inspect`` shows, as plain data."""
    spec = C.read_spec(path)
    model = onnxproto.load(path, load_external_data=False)
    graph_outputs = {o.name: dims(o) for o in model.graph.output}
    inputs = {i.name: dims(i) for i in model.graph.input}
    return {
        "path": str(path),
        "size_bytes": Path(path).stat().st_size,
        "opset": max(
            (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None
        ),
        "inputs": inputs,
        "outputs": [asdict(o) | {"graph_shape": graph_outputs.get(o.name)} for o in spec.outputs],
        "spec": asdict(spec),
    }


def format_text(info: dict[str, Any]) -> str:
    spec = info["spec"]
    lines = [
        f"{info['path']}  ({info['size_bytes'] / 1e6:.2f} MB, opset {info['opset']}, "
        f"convlens format {spec['format_version']})",
        "",
        "inputs:",
    ]
    for name, shape in info["inputs"].items():
        lines.append(f"  {name:<28} {shape}")
    lines += ["", "outputs:"]
    for o in info["outputs"]:
        layer = f"  layer={o['layer']}" if o.get("layer") else ""
        lines.append(f"  {o['name']:<28} {o['role']:<15} {o['graph_shape']}{layer}")
    inp, pre, head = spec["input"], spec["preprocess"], spec["head"]
    names = spec["class_names"]
    lines += [
        "",
        "metadata:",
        f"  classes ({len(names)}): {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}",
        f"  input: {inp['height']}x{inp['width']}x{inp['channels']} {inp['layout']} "
        f"{inp['color_mode']}",
        f"  preprocess: {pre['kind']} (x*{pre['scale']:.6g}+{pre['offset']:g}, mean={pre['mean']}, "
        f"std={pre['std']}, {pre['channel_order']}, resize={pre['resize']})",
        f"  CAM layer: {spec['cam_layer']}",
        f"  head: {head['kind']} ending in {head['activation']}; CAM "
        f"{'yes' if head['cam_available'] else 'no'}, gradients "
        f"{'yes' if head['gradients_available'] else 'no'}",
    ]
    src = spec.get("source", {})
    if src:
        lines.append(
            f"  exported from {src.get('model')} (Keras {src.get('keras')}, TF "
            f"{src.get('tensorflow')}) by convlens {src.get('convlens')} at {src.get('created')}"
        )
        if src.get("gradient_problems"):
            lines.append(f"  no gradients because: {'; '.join(src['gradient_problems'])}")
    par = spec.get("parity") or {}
    if par:
        lines += [
            "",
            f"parity ({par.get('source')}, tolerance {par.get('tolerance')}): "
            f"{'PASSED' if par.get('passed') else 'FAILED'}",
        ]
        for name, d in sorted(par.get("outputs", {}).items()):
            l2 = f"  rel L2 {d['rel_l2']:.3g}" if "rel_l2" in d else ""
            lines.append(
                f"  {name:<28} max abs {d['max_abs']:.3g}  max rel {d['max_rel']:.3g}{l2}"
                f"  score {d['score']:.3g}"
            )
    return "\n".join(lines)
