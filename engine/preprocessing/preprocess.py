"""The one preprocessing path shared by training, export checks, evaluation and the engine.

It reproduces the course's reference program step by step (threshold at 10% of the
volume max, crop to the nonzero box in z/y/x, pad to square, resize with a 2nd-order
spline, rescale between the 10th and 99th percentile, z-normalize per channel) and keeps
the crop/pad/resize geometry so predictions can be mapped back onto the original slices.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage as ndi

from segengine.engine.core.errors import EmptyVolumeError
from segengine.engine.preprocessing.head import normalize_in_head, plan_head_mask
from segengine.engine.preprocessing.stats import percentiles  # noqa: F401  (the one percentile rule; imported from here too)
from segengine.engine.preprocessing.plan import PreprocessingPlan
from segengine.engine.readers.volume import PatientVolume


def preprocess_patient(volume: PatientVolume, protocol: str, plan: PreprocessingPlan | int) -> Preprocessed:
    """The model-grid slices by the model's plan (``ModelSpec.preprocessing``; a bare size: the
    reference plan at that size); the ground truth is resized too only in the reference protocol,
    the one protocol that scores on the grid (native scores on the original slices)."""
    reference = protocol == "reference"
    plan = PreprocessingPlan.of(plan)
    image = volume.intensities if plan.robust and volume.intensities is not None else volume.image
    return preprocess_volume(image, volume.mask if reference else None, drop_ends=reference, plan=plan)


# Spline weights smaller than this are dropped from the resize matrices (see resize_matrix).
NEGLIGIBLE_WEIGHT = 1e-20


@dataclass(frozen=True)
class Geometry:
    """Where the model grid sits in the original volume (all indices into the original)."""

    num_slices: int  # D of the original volume
    height: int
    width: int
    z0: int  # kept slices z0:z1 (after dropping first/last and cropping)
    z1: int
    y0: int
    y1: int
    x0: int
    x1: int
    pad_y: tuple[int, int]
    pad_x: tuple[int, int]
    size: int  # model grid is size x size

    @property
    def side(self) -> int:
        return (self.y1 - self.y0) + sum(self.pad_y)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Preprocessed:
    images: np.ndarray  # (D', 3, S, S) float32, channels first, normalized
    mask: np.ndarray | None  # (D', S, S) uint8 {0,1} on the model grid (nearest), or None
    geometry: Geometry


@functools.lru_cache(maxsize=128)
def resize_matrix(n_in: int, n_out: int, order: int, mode: str = "grid-constant") -> np.ndarray:
    """The (n_out, n_in) linear map of a 1D spline resize (prefilter included), read-only.

    Spline resizing is separable and linear, so resizing a plane is ``Ry @ X @ Rx.T``:
    identical to ``scipy.ndimage.zoom(..., grid_mode=True)`` (to 1e-15) and runs as
    batched matrix products instead of per-pixel spline evaluation. The prefilter's
    weights decay geometrically away from the diagonal; those below
    :data:`NEGLIGIBLE_WEIGHT` are set to 0, since in float32 they are (or make) denormal
    numbers, which x86 multiplies about 20x slower, for a contribution far below float32
    resolution.
    """
    eye = np.eye(n_in)
    m = ndi.zoom(eye, (n_out / n_in, 1), order=order, mode=mode, cval=0.0, grid_mode=True)
    m[np.abs(m) < NEGLIGIBLE_WEIGHT] = 0.0
    m = np.ascontiguousarray(m, dtype=np.float32)
    m.flags.writeable = False  # cached and shared between threads
    return m


def resize_slices(volume: np.ndarray, size: int, order: int, pad_y: tuple[int, int] = (0, 0),
                  pad_x: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Zero-pad the last two axes of (..., H, W) by ``pad_y``/``pad_x``, then resize them to (size, size), float32.

    Equals ``skimage.transform.resize(..., order, mode="constant", anti_aliasing=False)``
    of the whole padded volume (the course's call: a spline along an axis of zoom 1
    reproduces it exactly). uint8 input is scaled to [0, 1] first, as skimage's
    ``img_as_float``. Padding and scaling are folded into the resize matrices (columns of
    zeros contribute nothing), so the only full-size intermediate is the input in float32.
    """
    h, w = volume.shape[-2:]
    hp, wp = h + sum(pad_y), w + sum(pad_x)
    scale = np.float32(1 / 255.0) if volume.dtype == np.uint8 else None
    src = np.ascontiguousarray(volume, dtype=np.float32)  # C order: the reshape below must not copy
    if (hp, wp) == (size, size):
        if scale is not None:
            src *= scale
        return np.pad(src, ((0, 0),) * (src.ndim - 2) + (pad_y, pad_x)) if hp != h or wp != w else src
    ry = np.ascontiguousarray(resize_matrix(hp, size, order)[:, pad_y[0] : pad_y[0] + h])
    rx = resize_matrix(wp, size, order)[:, pad_x[0] : pad_x[0] + w] * (scale if scale is not None else np.float32(1))
    lead = src.shape[:-2]
    # along x as large GEMMs over all rows of all planes, then along y plane by plane; each
    # block of output rows only multiplies the input band its spline weights reach
    along_x = np.empty((src.size // w, size), dtype=np.float32)
    rows = src.reshape(-1, w)
    for o0, o1, c0, c1 in _bands(rx):
        np.matmul(rows[:, c0:c1], rx[o0:o1, c0:c1].T, out=along_x[:, o0:o1])
    along_x = along_x.reshape(-1, h, size)
    out = np.empty((along_x.shape[0], size, size), dtype=np.float32)
    for o0, o1, c0, c1 in _bands(ry):
        np.matmul(ry[o0:o1, c0:c1], along_x[:, c0:c1], out=out[:, o0:o1])
    return out.reshape(lead + (size, size))


def _bands(matrix: np.ndarray, block: int = 64) -> list[tuple[int, int, int, int]]:
    """(o0, o1, c0, c1): output rows o0:o1 of a banded resize matrix use only input columns c0:c1."""
    bands = []
    for o0 in range(0, matrix.shape[0], block):
        o1 = min(o0 + block, matrix.shape[0])
        used = np.flatnonzero(matrix[o0:o1].any(axis=0))
        c0, c1 = (int(used[0]), int(used[-1]) + 1) if used.size else (0, 1)
        bands.append((o0, o1, c0, c1))
    return bands


def crop_box(nonzero: np.ndarray) -> tuple[int, int, int, int, int, int]:
    """Smallest (z0, z1, y0, y1, x0, x1) box holding the True voxels of a (D, H, W) boolean volume."""
    nz = nonzero
    zs = np.flatnonzero(nz.any(axis=(1, 2)))
    ys = np.flatnonzero(nz.any(axis=(0, 2)))
    xs = np.flatnonzero(nz.any(axis=(0, 1)))
    if zs.size == 0:
        raise EmptyVolumeError("volume is empty (no voxel above 10% of its maximum)")
    return int(zs[0]), int(zs[-1]) + 1, int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1


def normalize_volume(volume: np.ndarray, clip_percentiles: tuple[float, float] = (10.0, 99.0)) -> np.ndarray:
    """Rescale (D, C, H, W) between its 10th and 99th percentile, clip, z-normalize per channel (in place).

    The rescale to [0, 1] is affine, so it cancels in the z-normalization: clipping to
    [p10, p99] and z-normalizing with that channel's own mean and std gives the same
    values in two passes instead of five. Means and variances come from sums in float64.
    """
    p10, p99 = percentiles(volume, clip_percentiles)
    span = p99 - p10 if p99 > p10 else 1.0  # the reference divides only by a positive range
    np.clip(volume, p10, p10 + span, out=volume)
    n = volume.size // volume.shape[1]
    sums = volume.sum(axis=(0, 2, 3), dtype=np.float64)
    squares = np.einsum("dchw,dchw->c", volume, volume, dtype=np.float64)
    for c in range(volume.shape[1]):
        mean = sums[c] / n
        std = math.sqrt(max(squares[c] / n - mean * mean, 0.0))
        ch = volume[:, c]
        ch -= np.float32(mean)
        # a flat channel: the rescaled values minus their mean, as the reference's std of 1
        ch *= np.float32(1.0 / std if std > 0 else 1.0 / span)
    return volume


def preprocess_volume(
    image: np.ndarray,
    mask: np.ndarray | None = None,
    size: int | None = None,
    drop_ends: bool = True,
    plan: PreprocessingPlan | None = None,
) -> Preprocessed:
    """Map a (D, H, W, 3) uint8 volume onto the model grid (``image`` and ``mask`` are not modified).

    ``drop_ends=True`` is the reference protocol (first and last slice dropped);
    ``drop_ends=False`` is the native protocol (every slice kept, mapped back later).
    Only the cropped part is copied (once as uint8, once as float32); padding is folded
    into the resize. ``plan`` holds the constants (default: the reference program's); ``size``
    overrides its grid size.
    """
    plan = plan or PreprocessingPlan()
    size = size or plan.input_size
    if image.ndim != 4 or image.shape[-1] != 3:
        raise ValueError(f"expected a (D, H, W, 3) volume, got {image.shape}")
    d, h, w = image.shape[:3]
    lo, hi = (1, d - 1) if drop_ends else (0, d)
    if hi - lo < 1:
        raise EmptyVolumeError(f"volume has {d} slices, too few after dropping the first and last")
    slab = image[lo:hi]
    if plan.robust:
        return _preprocess_head_zscore(slab, mask, lo, hi, d, h, w, size, plan)
    brightest = np.maximum(np.maximum(slab[..., 0], slab[..., 1]), slab[..., 2])  # over channels, (D', H, W)
    top = brightest.max()
    if not top > 0:
        raise EmptyVolumeError("volume is empty (no voxel above 10% of its maximum)")
    threshold = top * plan.threshold_fraction  # the reference zeroes voxels below it, then crops to what is left
    if np.issubdtype(slab.dtype, np.integer):
        threshold = math.ceil(threshold)  # for integers, v < t <=> v < ceil(t)
    z0, z1, y0, y1, x0, x1 = crop_box(brightest >= threshold)
    box = (slice(z0, z1), slice(y0, y1), slice(x0, x1))
    volume = slab[box]
    volume = np.where(volume >= threshold, volume, np.zeros((), slab.dtype))
    pad_y, pad_x = square_padding(volume.shape[1], volume.shape[2])
    images = normalize_volume(resize_slices(volume.transpose(0, 3, 1, 2), size, plan.image_order, pad_y, pad_x),
                              plan.percentiles)  # channels first
    grid_mask = None
    if mask is not None:
        m = (mask[lo:hi][box] > 0).astype(np.float32)
        grid_mask = (resize_slices(m, size, 0, pad_y, pad_x) > 0.5).astype(np.uint8)
    geometry = Geometry(
        num_slices=d, height=h, width=w, z0=lo + z0, z1=lo + z1, y0=y0, y1=y1, x0=x0, x1=x1,
        pad_y=pad_y, pad_x=pad_x, size=size,
    )
    return Preprocessed(images=images, mask=grid_mask, geometry=geometry)


def square_padding(a: int, b: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """(pad_y, pad_x) that make an a x b plane square, split as the reference program does."""
    diff = abs(a - b) / 2.0
    half = (int(np.floor(diff)), int(np.ceil(diff)))
    return ((0, 0), half) if a > b else (half, (0, 0)) if b > a else ((0, 0), (0, 0))


def _preprocess_head_zscore(slab: np.ndarray, mask: np.ndarray | None, lo: int, hi: int, d: int, h: int, w: int,
                            size: int, plan: PreprocessingPlan) -> Preprocessed:
    """Plan v2 (``head.py``): crop to the head found by robust scales, zero only outside it, resize,
    then clip and z-score each sequence inside the head. Any numeric input; float32 throughout."""
    if not np.issubdtype(slab.dtype, np.number) or np.issubdtype(slab.dtype, np.complexfloating):
        raise ValueError(f"expected real intensities, got {slab.dtype}")
    if np.issubdtype(slab.dtype, np.floating) and not np.isfinite(slab).all():
        slab = np.nan_to_num(slab, nan=0.0, posinf=0.0, neginf=0.0)  # a NaN voxel is no signal
    head = plan_head_mask(slab, plan)
    z0, z1, y0, y1, x0, x1 = crop_box(head)
    box = (slice(z0, z1), slice(y0, y1), slice(x0, x1))
    inside = head[box]
    volume = slab[box].astype(np.float32)  # a copy: the input is never modified
    volume *= inside[..., None]
    pad_y, pad_x = square_padding(volume.shape[1], volume.shape[2])
    grid = resize_slices(volume.transpose(0, 3, 1, 2), size, plan.image_order, pad_y, pad_x)
    grid_head = resize_slices(inside.astype(np.float32), size, 1, pad_y, pad_x) > 0.5
    images = normalize_in_head(grid, grid_head, plan.clip_percentiles)
    grid_mask = None
    if mask is not None:
        m = (mask[lo:hi][box] > 0).astype(np.float32)
        grid_mask = (resize_slices(m, size, 0, pad_y, pad_x) > 0.5).astype(np.uint8)
    geometry = Geometry(num_slices=d, height=h, width=w, z0=lo + z0, z1=lo + z1, y0=y0, y1=y1, x0=x0, x1=x1,
                        pad_y=pad_y, pad_x=pad_x, size=size)
    return Preprocessed(images=images, mask=grid_mask, geometry=geometry)


def to_original_grid(prob: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Map (D', S, S) probabilities on the model grid back to (D, H, W) on the original slices.

    Undoes resize (bilinear), pad and crop; slices and pixels outside the crop are 0.
    """
    g = geometry
    if prob.shape != (g.z1 - g.z0, g.size, g.size):
        raise ValueError(f"probabilities of shape {prob.shape} do not fit geometry {(g.z1 - g.z0, g.size, g.size)}")
    side = g.side
    out = np.zeros((g.num_slices, g.height, g.width), dtype=np.float32)
    sq = prob.astype(np.float32, copy=False)
    if side != g.size:  # bilinear, edges clamped
        r = resize_matrix(g.size, side, 1, "nearest")
        sq = r @ sq @ r.T
    out[g.z0 : g.z1, g.y0 : g.y1, g.x0 : g.x1] = sq[:, g.pad_y[0] : side - g.pad_y[1], g.pad_x[0] : side - g.pad_x[1]]
    return out


def context_index(patient_index: np.ndarray, context: int) -> np.ndarray:
    """(N, 2K+1) indices of each slice's neighbours i-K..i+K within its own patient (patients
    are contiguous runs of ``patient_index``), the nearest slice repeated at a patient's ends.

    The one 2.5D neighbour rule: inference stacks one patient with it, training samples
    slices of many patients with it."""
    patient_index = np.asarray(patient_index)
    n = len(patient_index)
    new_patient = np.r_[True, patient_index[1:] != patient_index[:-1]] if n else np.zeros(0, bool)
    starts = np.flatnonzero(new_patient)
    run = np.cumsum(new_patient) - 1
    lo = starts[run]
    hi = np.r_[starts[1:], n][run] - 1
    idx = np.arange(n)[:, None] + np.arange(-context, context + 1)[None, :]
    return np.clip(idx, lo[:, None], hi[:, None])


def stack_context(images: np.ndarray, context: int) -> np.ndarray:
    """(D, C, S, S) slices of one patient -> (D, C * (2 * context + 1), S, S): each slice with its
    ``context`` neighbours on either side as extra channels (2.5D input, ``context_index``).

    Channel order is slice i-context, ..., i, ..., i+context, each with its C modalities.
    """
    if context <= 0:
        return images
    idx = context_index(np.zeros(len(images), dtype=np.int64), context)
    return images[idx].reshape(len(images), -1, *images.shape[2:])


def centre_slice(stacked: np.ndarray, context: int) -> np.ndarray:
    """The slice's own channels of a ``stack_context`` batch (what a 2D model takes), a view."""
    if context <= 0:
        return stacked
    per_slice = stacked.shape[1] // (2 * context + 1)
    return stacked[:, context * per_slice : (context + 1) * per_slice]
