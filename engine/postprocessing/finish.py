"""From grid probabilities to a patient's result: map back onto the original slices, threshold,
keep components (the card's rule). Every path (run, --patients, evaluate, validate, cv) ends here."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from segengine.engine.postprocessing.postprocess import PostprocessConfig, postprocess_with_sizes
from segengine.engine.preprocessing.preprocess import Geometry, Preprocessed, to_original_grid
from segengine.engine.readers.volume import PatientVolume


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
    component_sizes: np.ndarray | None = None  # voxels per thresholded component (the quality features reuse them)


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
    mask, sizes = postprocess_with_sizes(prob, post)
    timings["postprocess"] = time.perf_counter() - t
    return Segmentation(volume.patient_id, protocol, prob, mask, truth, pre.geometry, timings, views_agreement, sizes)
