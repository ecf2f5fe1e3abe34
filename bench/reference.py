"""The course reference program's pipeline, written the way it ran, so ``bench`` can time it.

Everything here is deliberately standalone and in the reference's style: ``skimage.io.imread``
of every tif, the whole (D, H, W, 3) volume resized by ``skimage.transform.resize`` with a
2nd-order spline in float64 (one 4D interpolation, not plane by plane: that is what made the
reference slow), ``rescale_intensity``, z-normalization, the 32-channel :class:`ReferenceUNet`
in PyTorch eager at batch 32, then sigmoid > 0.5 and the largest connected component
(``scipy.ndimage.label``). It must not use the engine's fast preprocessing, inference or
post-processing code; only the network definition is shared.

The weights are random: the cost of a forward pass does not depend on the weight values
(dense convolutions, no data-dependent control flow), so timings are those of the trained
reference model.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np

BATCH_SIZE = 32
SIZE = 256
WEIGHTS_NOTE = ("reference U-Net with random weights: dense convolutions with no data-dependent control flow, "
                "so its cost does not depend on the weight values")


# ------------------------------------------------------------------ the reference's stages
def reference_read(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None, list[int]]:
    """Read a patient folder with ``skimage.io.imread``, one tif at a time, in slice order."""
    from skimage.io import imread

    folder = str(folder)
    names = [f for f in os.listdir(folder) if f.endswith(".tif") and not f.endswith("_mask.tif")]
    numbers = sorted(int(re.search(r"_(\d+)\.tif$", f).group(1)) for f in names)
    prefix = os.path.basename(os.path.normpath(folder))
    images, masks = [], []
    for n in numbers:
        images.append(imread(os.path.join(folder, f"{prefix}_{n}.tif")))
        mask_file = os.path.join(folder, f"{prefix}_{n}_mask.tif")
        if os.path.exists(mask_file):
            masks.append(imread(mask_file))
    volume = np.array(images)
    mask = np.array(masks) if len(masks) == len(images) else None
    return volume, mask, numbers


def reference_preprocess(volume: np.ndarray, mask: np.ndarray | None = None, size: int = SIZE):
    """First/last slice dropped, 10% threshold, crop, pad square, 4D resize (order 2), rescale, z-norm.

    Returns (D', 3, size, size) float64 and the mask resized with order 0 (or None).
    """
    from skimage.exposure import rescale_intensity
    from skimage.transform import resize

    volume = volume[1:-1].copy()
    mask = mask[1:-1].copy() if mask is not None else None
    volume[volume < np.max(volume) * 0.1] = 0
    z = np.nonzero(np.max(np.max(np.max(volume, axis=-1), axis=-1), axis=-1))
    y = np.nonzero(np.max(np.max(np.max(volume, axis=0), axis=-1), axis=-1))
    x = np.nonzero(np.max(np.max(np.max(volume, axis=0), axis=0), axis=-1))
    crop = (slice(np.min(z), np.max(z) + 1), slice(np.min(y), np.max(y) + 1), slice(np.min(x), np.max(x) + 1))
    volume = volume[crop]
    if mask is not None:
        mask = mask[crop]
    a, b = volume.shape[1], volume.shape[2]
    if a != b:
        diff = (max(a, b) - min(a, b)) / 2.0
        pad = (int(np.floor(diff)), int(np.ceil(diff)))
        padding = ((0, 0), (0, 0), pad) if a > b else ((0, 0), pad, (0, 0))
        volume = np.pad(volume, padding + ((0, 0),))
        if mask is not None:
            mask = np.pad(mask, padding)
    # the whole 4D volume in one resize, as the reference did
    volume = resize(volume, (volume.shape[0], size, size, 3), order=2, mode="constant", cval=0, anti_aliasing=False)
    if mask is not None:
        mask = resize(mask, (mask.shape[0], size, size), order=0, mode="constant", cval=0, anti_aliasing=False)
        mask = (mask > 0).astype(np.uint8)
    p10, p99 = np.percentile(volume, 10), np.percentile(volume, 99)
    volume = rescale_intensity(volume, in_range=(p10, p99))
    volume = (volume - np.mean(volume, axis=(0, 1, 2))) / np.std(volume, axis=(0, 1, 2))
    return volume.transpose(0, 3, 1, 2), mask


def reference_model(threads: int | None = None):
    """The reference U-Net (32 base channels), random weights, eval mode, CPU."""
    import torch

    from segengine.engine.model.network import ReferenceUNet

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    return ReferenceUNet(in_channels=3, base_channels=32).eval()


def reference_infer(model, batch: np.ndarray) -> np.ndarray:
    """One eager forward: (N, 3, S, S) -> (N, S, S) probabilities."""
    import torch

    with torch.no_grad():
        x = torch.tensor(batch, dtype=torch.float)
        return torch.sigmoid(model(x))[:, 0].numpy()


def reference_predict(model, volume: np.ndarray, batch_size: int = BATCH_SIZE) -> np.ndarray:
    preds = [reference_infer(model, volume[i : i + batch_size]) for i in range(0, len(volume), batch_size)]
    return np.concatenate(preds) if preds else np.zeros((0,) + volume.shape[2:], dtype=np.float32)


def reference_postprocess(prob: np.ndarray) -> np.ndarray:
    """Threshold at 0.5 and keep the largest connected component (ndimage.label, 6-connectivity)."""
    from scipy import ndimage

    mask = prob > 0.5
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == np.argmax(sizes)
    return mask


def reference_write(out_dir: str | os.PathLike, patient_id: str, slice_numbers: list[int], mask: np.ndarray) -> None:
    """One ``<patient>_<n>_mask.tif`` per predicted slice (the reference wrote on its 256 grid)."""
    from skimage.io import imsave

    os.makedirs(out_dir, exist_ok=True)
    for n, sl in zip(slice_numbers, mask):
        imsave(os.path.join(out_dir, f"{patient_id}_{n}_mask.tif"), (sl * 255).astype(np.uint8), check_contrast=False)


def reference_patient(folder: str | os.PathLike, model, out_dir: str | os.PathLike,
                      batch_size: int = BATCH_SIZE) -> dict[str, float]:
    """Run the whole reference pipeline on one patient; returns its stage times in seconds."""
    timings: dict[str, float] = {}
    t0 = t = time.perf_counter()
    volume, mask, numbers = reference_read(folder)
    timings["read"] = time.perf_counter() - t
    t = time.perf_counter()
    images, _ = reference_preprocess(volume, mask)
    timings["preprocess"] = time.perf_counter() - t
    t = time.perf_counter()
    prob = reference_predict(model, images, batch_size)
    timings["infer"] = time.perf_counter() - t
    t = time.perf_counter()
    pred = reference_postprocess(prob)
    timings["postprocess"] = time.perf_counter() - t
    t = time.perf_counter()
    reference_write(out_dir, Path(folder).name, numbers[1:-1], pred)
    timings["write"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    timings["slices"] = float(len(images))
    return timings


# ------------------------------------------------------------------ timing, as bench times ours
def time_reference(batch: np.ndarray | None, folders: list[Path], threads: int | None = None, warmup: int = 3,
                   iterations: int = 20, batch_size: int = BATCH_SIZE, end_to_end: bool = True,
                   log=print) -> dict:
    """Model-only latency at ``batch_size`` and end-to-end time per patient of the reference.

    ``batch`` is (N, 3, S, S) input slices for the model-only timing (tiled up to
    ``batch_size``; synthetic noise if None). End to end: one warm-up patient (the first),
    then each folder timed; mean per patient and its stage breakdown.
    """
    import tempfile

    import torch

    from segengine.bench.measure import stats_ms, time_end_to_end
    from segengine.engine.model.network import count_flops

    t = time.perf_counter()
    model = reference_model(threads)
    load_s = time.perf_counter() - t
    flops = int(count_flops(model, SIZE))
    if batch is None:
        batch = np.random.default_rng(0).standard_normal((batch_size, 3, SIZE, SIZE)).astype(np.float32)
    x = np.resize(batch, (batch_size,) + batch.shape[1:]).astype(np.float32)
    log(f"reference: model-only, batch {batch_size}, {warmup} warm-up + {iterations} timed")
    for _ in range(warmup):
        reference_infer(model, x)
    times = []
    for _ in range(iterations):
        t = time.perf_counter()
        reference_infer(model, x)
        times.append(time.perf_counter() - t)
    lat = stats_ms(times)
    per_slice_ms = lat["p50"] / batch_size
    slices_s = batch_size / (lat["mean"] / 1e3)
    result = {
        "name": "reference (course U-Net, PyTorch eager)",
        "architecture": {"name": "reference_unet", "base_channels": 32},
        "weights": "random",
        "weights_note": WEIGHTS_NOTE,
        "flops_per_slice": flops,
        "gflop_per_slice": flops / 1e9,
        "torch_threads": torch.get_num_threads(),
        "load_s": load_s,
        "model_only": {
            "batch_size": batch_size, "warmup": warmup, "iterations": iterations,
            "latency_ms": lat, "per_slice_ms": per_slice_ms,
            "throughput_slices_s": slices_s, "gflops_achieved": flops * slices_s / 1e9,
        },
        "end_to_end": None,
    }
    if end_to_end and folders:
        log(f"reference: end to end on {len(folders)} patient(s) after 1 warm-up patient")

        def process_one(folder: Path, out: Path) -> dict:
            timings = reference_patient(folder, model, out, batch_size=BATCH_SIZE)
            return {"timings_s": timings, "slices": timings["slices"]}

        with tempfile.TemporaryDirectory(prefix="segengine-bench-ref-") as tmp:
            per = time_end_to_end(process_one, folders, Path(tmp), log, "reference ")
        result["end_to_end"] = {
            "batch_size": BATCH_SIZE, "protocol": "reference (first and last slice dropped, 256x256 grid)", **per,
        }
    return result
