"""Segment whole patients: read -> preprocess -> infer -> map back -> post-process.

Used by ``run``, ``evaluate --model``, ``validate`` and ``bench`` alike, so every number
they print comes from the same code path.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from segengine.engine.backends.base import Backend
from segengine.engine.io import PatientVolume
from segengine.engine.postprocess import PostprocessConfig, postprocess
from segengine.engine.preprocess import Geometry, Preprocessed, preprocess_volume, stack_context, to_original_grid


@dataclass
class Segmentation:
    """A patient's result on its original grid (native) or on the reference grid."""

    patient_id: str
    protocol: str  # "native" | "reference"
    prob: np.ndarray  # (D, H, W) float32 probabilities (native) or (D', S, S) on the grid (reference)
    mask: np.ndarray  # bool, same shape as prob
    truth: np.ndarray | None  # bool ground truth on the same grid, when known
    geometry: Geometry
    timings: dict[str, float] = field(default_factory=dict)
    views_agreement: float | None = None  # accurate mode: mean Dice of each averaged view with the mean


def preprocess_patient(volume: PatientVolume, protocol: str, size: int) -> Preprocessed:
    """The model-grid slices; the ground truth is resized too only in the reference protocol,
    the one protocol that scores on the grid (native scores on the original slices)."""
    reference = protocol == "reference"
    return preprocess_volume(volume.image, volume.mask if reference else None, size=size, drop_ends=reference)


def model_input(pre: Preprocessed, spec) -> np.ndarray:
    """What the network sees for one patient: its slices, with neighbours as channels for 2.5D models."""
    return stack_context(pre.images, spec.context_slices)


def mirror(slices: np.ndarray) -> np.ndarray:
    """Left-right mirror of (N, C, S, S) inputs or (N, S, S) probabilities (the last axis is the
    image width: every context group of a 2.5D input is mirrored alike); its own inverse."""
    return np.ascontiguousarray(slices[..., ::-1])


def predict_flipped(backend: Backend, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Probabilities of the left-right mirrored slices, mirrored back (flip test-time augmentation)."""
    return mirror(backend.predict(mirror(images), batch_size=batch_size))


def balanced_batch_size(slices: int, batch_size: int) -> int:
    """The batch size that splits ``slices`` into as few batches as ``batch_size`` does, evenly
    (35 slices at 32: 18 + 17, not 32 + 3), so no batch is a small, inefficient remainder."""
    batches = max(1, math.ceil(slices / batch_size))
    return max(1, math.ceil(slices / batches))


def predict_patient(backend: Backend, pre: Preprocessed, batch_size: int = 32) -> np.ndarray:
    """Grid probabilities of one patient. `run --patient`, `--patients`, Ray workers and bench batch
    a patient's slices by this one rule, so the same backend and threads give the same masks."""
    return backend.predict(model_input(pre, backend.spec), batch_size=balanced_batch_size(len(pre.images), batch_size))


def views_agreement(backend: Backend) -> float | None:
    """The agreement of an averaging backend's views on its last patient (None for one model)."""
    return getattr(backend, "last_views_agreement", None)


def finish_patient(volume: PatientVolume, pre: Preprocessed, grid_prob: np.ndarray, protocol: str,
                   post: PostprocessConfig, timings: dict[str, float], views_agreement: float | None = None) -> Segmentation:
    """Post-process probabilities already predicted on the model grid."""
    t = time.perf_counter()
    if protocol == "reference":
        prob = grid_prob.astype(np.float32)
        truth = pre.mask.astype(bool) if pre.mask is not None else None
    else:
        prob = to_original_grid(grid_prob, pre.geometry)
        truth = volume.mask > 0 if volume.mask is not None else None
    mask = postprocess(prob, post)
    timings["postprocess"] = time.perf_counter() - t
    return Segmentation(volume.patient_id, protocol, prob, mask, truth, pre.geometry, timings, views_agreement)


def segment(volume: PatientVolume, backend: Backend, protocol: str = "native", batch_size: int = 32,
            post: PostprocessConfig = PostprocessConfig()) -> Segmentation:
    """Segment one patient; ``protocol`` is "native" (every slice) or "reference"."""
    if protocol not in ("native", "reference"):
        raise ValueError(f"unknown protocol {protocol!r}")
    timings: dict[str, float] = {}
    t = time.perf_counter()
    pre = preprocess_patient(volume, protocol, backend.spec.input_size)
    timings["preprocess"] = time.perf_counter() - t
    t = time.perf_counter()
    grid_prob = predict_patient(backend, pre, batch_size)
    timings["infer"] = time.perf_counter() - t
    return finish_patient(volume, pre, grid_prob, protocol, post, timings, views_agreement(backend))
