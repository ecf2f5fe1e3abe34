"""Per-volume segmentation metrics with defined behaviour on empty masks.

Conventions (tested): DSC is 1.0 when both masks are empty and 0.0 when exactly one is;
precision is 1.0 when nothing is predicted (no false positives), recall is 1.0 when the
ground truth is empty (nothing to miss); HD95 (in voxels, medpy) is 0.0 when both are
empty and NaN (undefined) when exactly one is.
"""
from __future__ import annotations

import math

import numpy as np


def dsc(pred: np.ndarray, truth: np.ndarray) -> float:
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    denom = int(p.sum()) + int(t.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, t).sum()) / denom


def precision(pred: np.ndarray, truth: np.ndarray) -> float:
    p = np.asarray(pred, dtype=bool)
    n = int(p.sum())
    return 1.0 if n == 0 else int(np.logical_and(p, np.asarray(truth, dtype=bool)).sum()) / n


def recall(pred: np.ndarray, truth: np.ndarray) -> float:
    t = np.asarray(truth, dtype=bool)
    n = int(t.sum())
    return 1.0 if n == 0 else int(np.logical_and(np.asarray(pred, dtype=bool), t).sum()) / n


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...] | None = None) -> float:
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return math.nan
    from medpy.metric.binary import hd95 as medpy_hd95

    return float(medpy_hd95(p, t, voxelspacing=spacing))


def volume_metrics(pred: np.ndarray, truth: np.ndarray, with_hd95: bool = True) -> dict[str, float]:
    out = {"dsc": dsc(pred, truth), "precision": precision(pred, truth), "recall": recall(pred, truth)}
    if with_hd95:
        out["hd95"] = hd95(pred, truth)
    return out


def summarize(values: list[float]) -> dict[str, float]:
    """Mean and median over the defined (non-NaN) values, with their count."""
    arr = np.array([v for v in values if not (isinstance(v, float) and math.isnan(v))], dtype=float)
    if arr.size == 0:
        return {"mean": math.nan, "median": math.nan, "n": 0}
    return {"mean": float(arr.mean()), "median": float(np.median(arr)), "n": int(arr.size)}
