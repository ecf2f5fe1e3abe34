"""A patient's grid probabilities from a runner: 2.5D stacking, balanced batches, mirroring for TTA.

`run --patient`, `--patients`, Ray workers, validate and bench batch a patient's slices by this
one rule, so the same backend and threads give the same masks."""
from __future__ import annotations

import math

import numpy as np

from segengine.engine.inference.backends.base import Backend
from segengine.engine.preprocessing.preprocess import Preprocessed, stack_context


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
