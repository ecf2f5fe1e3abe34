"""overlay.png and slices.gif: FLAIR with the prediction's outline (red) and the truth's (green)."""
from __future__ import annotations

import math

import numpy as np

from segengine.engine.postprocessing.postprocess import border
from segengine.engine.readers.volume import PatientVolume

TRUTH_COLOR, PRED_COLOR = (0, 220, 0), (255, 40, 40)  # outlines: ground truth green, prediction red


SHEET_GRAYS = 254  # overlay.png is a palette image: 254 gray levels, then the two outline colors


def _stretched_flair(images: np.ndarray) -> np.ndarray:
    """FLAIR channel (index 1) of (..., H, W, 3) uint8 slices, each stretched to [0, 1] (1st-99.5th percentile)."""
    f = images[..., 1].astype(np.float32)
    lo, hi = np.percentile(f, (1, 99.5), axis=(-2, -1), keepdims=True)
    return np.clip((f - lo) / np.maximum(hi - lo, np.float32(1e-6)), 0, 1)


def flair_rgb(images: np.ndarray) -> np.ndarray:
    """FLAIR channel (index 1) of (..., H, W, 3) uint8 slices, each contrast-stretched to gray RGB."""
    return np.repeat((_stretched_flair(images) * 255).astype(np.uint8)[..., None], 3, axis=-1)


def overlay_slices(images: np.ndarray, pred: np.ndarray, truth: np.ndarray | None) -> np.ndarray:
    """(N, H, W, 3) FLAIR tiles with the outline of each slice's prediction (red) and truth (green)."""
    rgb = flair_rgb(images)
    if truth is not None:
        rgb[border(truth, per_slice=True)] = TRUTH_COLOR
    rgb[border(pred, per_slice=True)] = PRED_COLOR
    return rgb


def overlay_slice(image_slice: np.ndarray, pred: np.ndarray, truth: np.ndarray | None) -> np.ndarray:
    """One HxWx3 tile of :func:`overlay_slices`."""
    return overlay_slices(image_slice[None], pred[None], None if truth is None else truth[None])[0]


def contact_sheet(volume: PatientVolume, pred: np.ndarray, truth: np.ndarray | None, max_tiles: int = 20,
                  columns: int = 5):
    """Slices with tumor (predicted or true): FLAIR, predicted outline red, ground truth green.

    A palette ("P") PIL image: one byte per pixel, so writing it as PNG is a third of the
    work of the RGB sheet (and a smaller file), at 254 gray levels instead of 256.
    """
    from PIL import Image

    has = pred.any(axis=(1, 2)) | (truth.any(axis=(1, 2)) if truth is not None else False)
    idx = np.flatnonzero(has)
    if idx.size == 0:
        idx = np.array([volume.num_slices // 2])
    if idx.size > max_tiles:
        idx = idx[np.linspace(0, idx.size - 1, max_tiles).round().astype(int)]
    tiles = (_stretched_flair(volume.image[idx]) * (SHEET_GRAYS - 1)).astype(np.uint8)
    if truth is not None:
        tiles[border(truth[idx], per_slice=True)] = SHEET_GRAYS
    tiles[border(pred[idx], per_slice=True)] = SHEET_GRAYS + 1
    n, h, w = tiles.shape
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * cols, h, w), dtype=np.uint8)
    grid[:n] = tiles
    sheet = Image.fromarray(grid.reshape(rows, cols, h, w).transpose(0, 2, 1, 3).reshape(rows * h, cols * w), "P")
    grays = np.linspace(0, 255, SHEET_GRAYS).round().astype(np.uint8)
    sheet.putpalette(np.concatenate([np.repeat(grays, 3), TRUTH_COLOR, PRED_COLOR]).astype(np.uint8).tobytes())
    return sheet
