"""The native-protocol preprocessing on a torch device: little data across the bus.

``preprocess.preprocess_volume`` builds (D, 3*(2K+1), S, S) float32 stacks on the CPU; copied to a
GPU every call, they cost several times what the model costs there. Here the CPU does only what
decides the geometry (plan v1: the crop box of the voxels above 10% of the maximum; plan v2: the
head mask, scipy's labelling), uploads the cropped slices at their own depth (uint8 for the Kaggle
slices: 1 byte a voxel instead of 4 x 3 x (2K+1)), and the device resizes, normalizes and builds the
2.5D stacks. Every step is the numpy path's, operation for operation (the same resize matrices,
percentiles by numpy's linear rule, float64 sums, float32 scaling), so the results agree with
``preprocess_volume`` to float32 rounding; tests/test_gpu.py compares them on the CPU.

    images, geometry = preprocess_on_device(volume.image, spec.preprocessing, "cuda")
    x = stack_context_t(images, spec.context_slices)   # (D', C', S, S) on the device
"""
from __future__ import annotations

import math

import numpy as np

from segengine.engine.core.errors import EmptyVolumeError
from segengine.engine.preprocessing.head import plan_head_mask
from segengine.engine.preprocessing.plan import PreprocessingPlan
from segengine.engine.preprocessing.preprocess import (Geometry, context_index, crop_box, resize_matrix,
                                                       square_padding)


def percentiles_t(values, qs: tuple[float, ...]) -> list[float]:
    """``np.percentile(values, qs)`` (linear method) of a torch tensor: the two order statistics by
    ``kthvalue``, their difference in the tensor's precision, the weighting in float64, as numpy's _lerp."""
    flat = values.reshape(-1)
    n = flat.numel()
    out = []
    for q in qs:
        virtual = (n - 1) * (q / 100)
        k = min(int(math.floor(virtual)), n - 1)
        k1 = min(k + 1, n - 1)
        gamma = virtual - k
        a = flat.kthvalue(k + 1).values
        b = flat.kthvalue(k1 + 1).values if k1 != k else a
        diff = float((b - a).item())
        a, b = float(a.item()), float(b.item())
        out.append(a + diff * gamma if gamma < 0.5 else b - diff * (1 - gamma))
    return out


def stack_context_t(images, context: int):
    """``preprocess.stack_context`` on a tensor: (D, C, S, S) -> (D, C * (2K+1), S, S), same order."""
    import torch

    if context <= 0:
        return images
    idx = torch.from_numpy(context_index(np.zeros(len(images), dtype=np.int64), context)).to(images.device)
    return images[idx].reshape(len(images), -1, *images.shape[2:])


def resize_slices_t(volume, size: int, order: int, pad_y: tuple[int, int] = (0, 0), pad_x: tuple[int, int] = (0, 0)):
    """``preprocess.resize_slices`` on a tensor (..., H, W): zero-pad, spline-resize to (size, size),
    float32; uint8 input scaled to [0, 1] as there (the scale folded into the x matrix)."""
    import torch

    h, w = volume.shape[-2:]
    hp, wp = h + sum(pad_y), w + sum(pad_x)
    is_uint8 = volume.dtype == torch.uint8
    src = volume.to(torch.float32)
    if (hp, wp) == (size, size):
        if is_uint8:
            src = src * np.float32(1 / 255.0)
        return torch.nn.functional.pad(src, (pad_x[0], pad_x[1], pad_y[0], pad_y[1])) if hp != h or wp != w else src
    ry = np.ascontiguousarray(resize_matrix(hp, size, order)[:, pad_y[0] : pad_y[0] + h])
    rx = resize_matrix(wp, size, order)[:, pad_x[0] : pad_x[0] + w] * (np.float32(1 / 255.0) if is_uint8 else np.float32(1))
    ry_t = torch.from_numpy(ry).to(src.device)
    rx_t = torch.from_numpy(np.ascontiguousarray(rx.T)).to(src.device)
    lead = src.shape[:-2]
    along_x = (src.reshape(-1, w) @ rx_t).reshape(-1, h, size)
    return torch.matmul(ry_t, along_x).reshape(*lead, size, size)


def normalize_volume_t(volume, clip_percentiles: tuple[float, float] = (10.0, 99.0)):
    """``preprocess.normalize_volume`` (plan v1) of a (D, C, S, S) float32 tensor, in place."""
    import torch

    p10, p99 = percentiles_t(volume, clip_percentiles)
    span = p99 - p10 if p99 > p10 else 1.0
    volume.clamp_(float(np.float32(p10)), float(np.float32(p10 + span)))
    n = volume.numel() // volume.shape[1]
    wide = volume.to(torch.float64)
    sums = wide.sum(dim=(0, 2, 3)).tolist()
    squares = (wide * wide).sum(dim=(0, 2, 3)).tolist()
    for c in range(volume.shape[1]):
        mean = sums[c] / n
        std = math.sqrt(max(squares[c] / n - mean * mean, 0.0))
        ch = volume[:, c]
        ch -= float(np.float32(mean))
        ch *= float(np.float32(1.0 / std if std > 0 else 1.0 / span))
    return volume


def normalize_in_head_t(volume, head, clip: tuple[float, float]):
    """``head.normalize_in_head`` (plan v2) of a (D, C, S, S) float32 tensor with a (D, S, S) bool head, in place."""
    import torch

    inside = head if bool(head.any()) else torch.ones_like(head)
    n_in = int(inside.sum().item())
    for c in range(volume.shape[1]):
        ch = volume[:, c]
        lo, hi = percentiles_t(ch[inside], clip)
        ch.clamp_(float(np.float32(lo)), float(np.float32(hi)))
        values = ch[inside]
        mean = float(values.to(torch.float64).sum().item()) / n_in
        centred = values - float(np.float32(mean))
        var = float((centred * centred).to(torch.float64).sum().item()) / n_in
        std = math.sqrt(max(var, 0.0))
        if not std > 1e-6 * max(abs(hi), abs(lo), 1e-30):
            ch.zero_()
            continue
        ch -= float(np.float32(mean))
        ch *= float(np.float32(1.0 / std))
        ch[~inside] = float(np.float32((lo - mean) / std))
    return volume


def preprocess_on_device(image: np.ndarray, plan: PreprocessingPlan, device="cpu"):
    """``preprocess_volume(image, drop_ends=False, plan=plan)`` (the native protocol) with the heavy steps
    on ``device``: returns ((D', 3, S, S) float32 tensor on the device, Geometry). Only the cropped
    slices cross the bus, at the input's own depth."""
    import torch

    if image.ndim != 4 or image.shape[-1] != 3:
        raise ValueError(f"expected a (D, H, W, 3) volume, got {image.shape}")
    d, h, w = image.shape[:3]
    size = plan.input_size
    if plan.robust:
        slab = image
        if not np.issubdtype(slab.dtype, np.number) or np.issubdtype(slab.dtype, np.complexfloating):
            raise ValueError(f"expected real intensities, got {slab.dtype}")
        if np.issubdtype(slab.dtype, np.floating) and not np.isfinite(slab).all():
            slab = np.nan_to_num(slab, nan=0.0, posinf=0.0, neginf=0.0)
        head = plan_head_mask(slab, plan)
        z0, z1, y0, y1, x0, x1 = crop_box(head)
        box = (slice(z0, z1), slice(y0, y1), slice(x0, x1))
        up = _upload(slab[box], device)
        inside = torch.from_numpy(np.ascontiguousarray(head[box])).to(device)
        volume = up.to(torch.float32) * inside[..., None]
        pad_y, pad_x = square_padding(volume.shape[1], volume.shape[2])
        grid = resize_slices_t(volume.permute(0, 3, 1, 2), size, plan.image_order, pad_y, pad_x)
        grid_head = resize_slices_t(inside.to(torch.float32), size, 1, pad_y, pad_x) > 0.5
        images = normalize_in_head_t(grid.contiguous(), grid_head, plan.clip_percentiles)
    else:
        brightest = np.maximum(np.maximum(image[..., 0], image[..., 1]), image[..., 2])
        top = brightest.max()
        if not top > 0:
            raise EmptyVolumeError("volume is empty (no voxel above 10% of its maximum)")
        threshold = top * plan.threshold_fraction
        if np.issubdtype(image.dtype, np.integer):
            threshold = math.ceil(threshold)
        z0, z1, y0, y1, x0, x1 = crop_box(brightest >= threshold)
        box = (slice(z0, z1), slice(y0, y1), slice(x0, x1))
        up = _upload(image[box], device)
        volume = torch.where(up >= threshold, up, torch.zeros((), dtype=up.dtype, device=up.device))
        pad_y, pad_x = square_padding(volume.shape[1], volume.shape[2])
        grid = resize_slices_t(volume.permute(0, 3, 1, 2), size, plan.image_order, pad_y, pad_x)
        images = normalize_volume_t(grid.contiguous(), plan.percentiles)
    geometry = Geometry(num_slices=d, height=h, width=w, z0=z0, z1=z1, y0=y0, y1=y1, x0=x0, x1=x1,
                        pad_y=pad_y, pad_x=pad_x, size=size)
    return images, geometry


def _upload(array: np.ndarray, device):
    """A numpy block onto the device (pinned first when the device is a GPU, so the copy is asynchronous)."""
    import torch

    if array.dtype == np.uint16:  # torch has no unsigned 16-bit arithmetic: widen exactly
        array = array.astype(np.int32)
    t = torch.from_numpy(np.ascontiguousarray(array))
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
