"""Typed export errors; ``str(err)`` is always one line (expected vs got, or diff vs tolerance)."""
from __future__ import annotations


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class ExportError(RuntimeError):
    """An export could not be produced or did not verify; one-line message."""

    def __init__(self, message: str):
        super().__init__(_one_line(message))


class ShapeMismatchError(ExportError):
    """An output (or input) shape differs from what the source model gives (or takes)."""

    def __init__(self, what: str, expected, got, kind: str = "output"):
        self.expected = tuple(expected)
        self.got = tuple(got)
        super().__init__(f"{what}: {kind} shape mismatch: expected {self.expected}, got {self.got}")


class ToleranceExceededError(ExportError):
    """The exported model's outputs differ from its source's by more than the tolerance."""

    def __init__(self, what: str, value: float, tolerance: float, metric: str = "max abs diff", cmp: str = "<="):
        self.value = float(value)
        self.tolerance = float(tolerance)
        self.metric = metric
        super().__init__(f"{what}: {metric} {self.value:.3g} is outside the tolerance ({metric} {cmp} {self.tolerance:.3g})")


class ExportToolMissing(ExportError):
    """A tool the export needs (TensorRT, a CUDA GPU, an exporter backend) is not available here."""
