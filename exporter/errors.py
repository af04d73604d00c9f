"""Errors the exporter raises: each carries one line meant for the user."""

from __future__ import annotations


class ExportError(Exception):
    """A problem with the user's model or options; ``str(e)`` is one clear line."""


class UnsupportedHead(ExportError):
    """The layers after the CAM layer have no backward rule (Grad-CAM unavailable).

    ``problems`` lists every offending layer at once, tf2onnx-style, rather than
    stopping at the first.
    """

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("no gradient rule for: " + "; ".join(problems))
