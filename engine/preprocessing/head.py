"""Plan v2's head mask and per-sequence normalization: robust statistics, never the maximum.

Why: the reference plan zeroes every voxel below 10% of the volume's brightest voxel. A few
bright voxels outside the head (vessel, fat, artifact) then zero the whole brain, and a dark
FLAIR loses its tumor (TCGA_HT_A61A: 90% of it). Here each sequence is judged on its own scale,
which six voxels out of a million cannot move; the head is filled so that nothing inside it is
zeroed, and specks far from it are dropped so they cannot widen the crop. v4 was trained with a
fixed share of each sequence's 99th percentile ("fraction"); a gamma curve or noise lifts a noisy
background over that share, so v4's card now names "log_otsu" (Otsu in log space, most sequences).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from segengine.engine.core.errors import EmptyVolumeError
from segengine.engine.preprocessing.plan import HEAD_THRESHOLDS, PreprocessingPlan
from segengine.engine.preprocessing.stats import percentiles

# connected pieces smaller than this share of the largest are specks (outlier voxels, noise)
MIN_PIECE_SHARE = 0.05


def robust_top(channel: np.ndarray, q: float) -> float:
    """The ``q``-th percentile of a sequence's positive voxels; 0 for an all-zero (absent) sequence.

    Positive voxels only: the zero background of a skull-stripped or windowed volume would
    otherwise decide the percentile."""
    positive = channel[channel > 0]
    if positive.size == 0:
        return 0.0
    top = percentiles(positive, (q,))[0]
    return float(top) if top > 0 else float(positive.max())


def head_mask(slab: np.ndarray, fraction: float, q: float, threshold: str = "fraction",
              smooth: float = 1.5) -> np.ndarray:
    """(D, H, W) bool: the head in a (D, H, W, C) volume of any numeric type.

    ``threshold="fraction"``: a voxel is head where any sequence reaches ``fraction`` of its own
    robust top. ``"log_otsu"``: each sequence is smoothed in-plane (``smooth`` pixels' sigma) and cut
    at Otsu's threshold of its log intensities, and a voxel is head where most sequences pass.
    Holes are filled slice by slice (dark ventricles, a dark tumor) and pieces under
    MIN_PIECE_SHARE of the largest 3D piece are dropped. Raises EmptyVolumeError when no sequence
    has signal.
    """
    if threshold not in HEAD_THRESHOLDS:
        raise ValueError(f"unknown head threshold {threshold!r}")
    votes = np.zeros(slab.shape[:3], dtype=np.uint8)
    n_signal = 0
    for c in range(slab.shape[-1]):
        ch = slab[..., c]
        top = robust_top(ch, q)
        if not top > 0 or not math.isfinite(top):
            continue
        n_signal += 1
        if threshold == "fraction":
            votes |= ch >= top * fraction
        else:
            smoothed = ndi.gaussian_filter(np.asarray(ch, dtype=np.float32), sigma=(0.0, smooth, smooth))
            votes += smoothed >= log_otsu(smoothed, top)
    need = 1 if threshold == "fraction" else (n_signal + 1) // 2
    found = votes >= need
    if not n_signal or not found.any():
        raise EmptyVolumeError("no head found: every sequence is empty (no voxel above zero)")
    labels, n = ndi.label(found)
    if n > 1:
        sizes = np.bincount(labels.ravel())[1:]
        keep = np.flatnonzero(sizes >= MIN_PIECE_SHARE * sizes.max()) + 1
        found = np.isin(labels, keep)
    return fill_holes_per_slice(found)


def plan_head_mask(slab: np.ndarray, plan: PreprocessingPlan) -> np.ndarray:
    """``head_mask`` with the plan's constants: the head every plan v2 path (numpy, device) crops to."""
    return head_mask(slab, plan.head_fraction, plan.head_percentile, plan.head_threshold, plan.head_smooth)


LOG_OTSU_FLOOR = 1e-3  # below this share of the robust top a voxel is background for certain
LOG_OTSU_CEIL = 2.0  # above this multiple of the robust top a voxel is an outlier, not a histogram bin
LOG_OTSU_BINS = 256  # over ln(CEIL / FLOOR): bins about 3% apart
LOG_OTSU_SAMPLE = 400_000  # Otsu needs a histogram, not every voxel: a strided sample of about this many


def log_otsu(smoothed: np.ndarray, top: float) -> float:
    """Otsu's threshold of log(``smoothed``) over its voxels between LOG_OTSU_FLOOR and LOG_OTSU_CEIL
    times the robust ``top``.

    In log space a gamma curve or a scale is an affine map, which moves Otsu's threshold with the
    histogram: the head/background cut stays where it was, unlike a fixed share of the top. The bins
    hang on ``top`` (a percentile), so a few extreme voxels add a few counts but move no bin edge."""
    flat = smoothed.reshape(-1)
    sample = flat[:: max(1, flat.size // LOG_OTSU_SAMPLE)]
    lo, hi = math.log(top * LOG_OTSU_FLOOR), math.log(top * LOG_OTSU_CEIL)
    sample = sample[(sample > top * LOG_OTSU_FLOOR) & (sample < top * LOG_OTSU_CEIL)]
    if sample.size == 0:
        return float(top)
    counts, edges = np.histogram(np.log(sample.astype(np.float64)), bins=LOG_OTSU_BINS, range=(lo, hi))
    weighted = counts * ((edges[:-1] + edges[1:]) / 2)  # each bin's count times its center
    mass = np.cumsum(weighted)[:-1]
    w0 = np.cumsum(counts)[:-1].astype(np.float64)  # below each cut between bins i and i+1
    w1 = counts.sum() - w0
    m0 = mass / np.maximum(w0, 1)
    m1 = (weighted.sum() - mass) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(np.exp(edges[1:-1][int(np.argmax(between))]))


# 4-connectivity within a slice, none across slices: scipy's 2D binary_fill_holes, for every slice at once
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndi.generate_binary_structure(2, 1)


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes`` of each (H, W) slice of a (D, H, W) mask, in one labelling:
    background pieces that do not touch their slice's border are holes."""
    labels, _ = ndi.label(~mask, structure=_IN_PLANE)
    edge = np.concatenate([labels[:, 0].ravel(), labels[:, -1].ravel(), labels[:, :, 0].ravel(), labels[:, :, -1].ravel()])
    outside = np.zeros(int(labels.max()) + 1, dtype=bool)
    outside[edge] = True
    outside[0] = False  # label 0 is the mask itself
    return ~outside[labels]


def normalize_in_head(volume: np.ndarray, head: np.ndarray, clip: tuple[float, float]) -> np.ndarray:
    """Clip each channel of (D, C, S, S) to its ``clip`` percentiles inside ``head`` (D, S, S),
    z-score it with the head's mean and std, and set the outside to the clipped low value (in place).

    The outside takes the darkest head value, not 0 (nnU-Net's choice), so the background stays
    darker than any tissue, as in the plan the v3 weights started from. A flat channel is 0."""
    inside = head if head.any() else np.ones(head.shape, dtype=bool)
    n_in = int(np.count_nonzero(inside))
    for c in range(volume.shape[1]):
        ch = volume[:, c]  # a view: boolean indexing below reads and writes through it
        lo, hi = percentiles(ch[inside], clip)
        np.clip(ch, lo, hi, out=ch)
        values = ch[inside]
        mean = float(values.sum(dtype=np.float64)) / n_in
        var = float(np.square(values - np.float32(mean)).sum(dtype=np.float64)) / n_in
        std = math.sqrt(max(var, 0.0))
        if not std > 1e-6 * max(abs(hi), abs(lo), 1e-30):
            ch[...] = 0.0
            continue
        ch -= np.float32(mean)
        ch *= np.float32(1.0 / std)
        ch[~inside] = np.float32((lo - mean) / std)
    return volume
