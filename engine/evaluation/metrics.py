"""Per-volume segmentation metrics with defined behaviour on empty masks.

Conventions (tested): DSC is 1.0 when both masks are empty and 0.0 when exactly one is;
precision is 1.0 when nothing is predicted (no false positives), recall is 1.0 when the
ground truth is empty (nothing to miss); HD95 (in voxels, medpy) is 0.0 when both are
empty and NaN (undefined) when exactly one is. HD95 is in voxels (pixels), or in mm when the
caller passes the voxel spacing (NIfTI and DICOM input, tifs with --spacing): ``distance_unit``.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from segengine.engine.postprocessing.postprocess import border


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
    """95th percentile of the border-to-border distances, both directions pooled.

    Same definition as ``medpy.metric.binary.hd95`` (face-connected borders, Euclidean
    distance transform; a test checks equality) computed on the bounding box of both
    masks plus a zero margin, which gives the same distances far faster and without
    medpy's scipy.stats import (1 s of a cold `segengine run`).
    """
    p = np.asarray(pred, dtype=bool)
    t = np.asarray(truth, dtype=bool)
    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return math.nan
    union = p | t
    box = tuple(slice(int(idx.min()), int(idx.max()) + 1) for idx in np.nonzero(union))
    p = np.pad(p[box], 1)
    t = np.pad(t[box], 1)
    bp, bt = border(p), border(t)
    d_pt = ndi.distance_transform_edt(~bt, sampling=spacing)[bp]
    d_tp = ndi.distance_transform_edt(~bp, sampling=spacing)[bt]
    return float(np.percentile(np.concatenate([d_pt, d_tp]), 95))


def distance_unit(spacing: tuple[float, ...] | None) -> str:
    """The unit of every distance (HD95) computed with ``spacing``: mm where it is known, else pixels."""
    return "px" if spacing is None else "mm"


def volume_metrics(pred: np.ndarray, truth: np.ndarray, with_hd95: bool = True,
                   spacing: tuple[float, ...] | None = None) -> dict[str, float]:
    """DSC, precision, recall and HD95 (in mm with ``spacing`` (slice, row, column), else in pixels)."""
    out = {"dsc": dsc(pred, truth), "precision": precision(pred, truth), "recall": recall(pred, truth)}
    if with_hd95:
        out["hd95"] = hd95(pred, truth, spacing)
    return out


def summarize(values: list[float]) -> dict[str, float]:
    """Mean and median over the defined (non-NaN) values, with their count."""
    arr = np.array([v for v in values if not (isinstance(v, float) and math.isnan(v))], dtype=float)
    if arr.size == 0:
        return {"mean": math.nan, "median": math.nan, "n": 0}
    return {"mean": float(arr.mean()), "median": float(np.median(arr)), "n": int(arr.size)}
