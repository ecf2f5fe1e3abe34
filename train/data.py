"""Training data: patients read and preprocessed once by the engine's own code path, cached."""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from segengine.engine.core.atomic import atomic_file
from segengine.engine.preprocessing.plan import PreprocessingPlan
from segengine.engine.preprocessing.preprocess import preprocess_volume
from segengine.engine.readers.registry import read_patient

CACHE_VERSION = 1


@dataclass
class VolumeSet:
    """Preprocessed slices of many patients, concatenated."""

    patients: list[str]
    images: np.ndarray  # (N, 3, S, S) float16
    masks: np.ndarray  # (N, S, S) uint8 {0,1}
    patient_index: np.ndarray  # (N,) int: index into ``patients``

    def volume(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        sel = self.patient_index == i
        return self.images[sel], self.masks[sel]


def _preprocess_one(args: tuple[str, PreprocessingPlan, bool]) -> tuple[str, np.ndarray, np.ndarray]:
    folder, plan, drop_ends = args
    vol = read_patient(folder)
    if vol.mask is None:
        raise ValueError(f"{folder}: no ground-truth masks; training needs them")
    image = vol.intensities if plan.robust and vol.intensities is not None else vol.image
    pre = preprocess_volume(image, vol.mask, drop_ends=drop_ends, plan=plan)
    return vol.patient_id, pre.images.astype(np.float16), pre.mask


def load_volume_set(root: str | os.PathLike, patients: list[str], size: int = 256, drop_ends: bool = True,
                    cache_dir: str | os.PathLike | None = ".cache", workers: int = 2,
                    plan: PreprocessingPlan | None = None) -> VolumeSet:
    """Preprocess ``patients`` under ``root`` (reference protocol by default) by ``plan`` (default:
    plan v1 at ``size``), with a disk cache keyed by everything that changes the result."""
    root = Path(root)
    plan = replace(plan or PreprocessingPlan(), input_size=size)
    key_parts = [str(root.resolve()), sorted(patients), size, drop_ends, CACHE_VERSION]
    if plan.robust:  # plan v1's key stays as it was, so its caches stay valid
        key_parts.append(plan.card_block())
    key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"volumes_{key}.npz" if cache_dir else None
    if cache is not None and cache.exists():
        z = np.load(cache)
        return VolumeSet(list(z["patients"]), z["images"], z["masks"], z["patient_index"])
    jobs = [(str(root / p), plan, drop_ends) for p in patients]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(_preprocess_one, jobs))
    images = np.concatenate([r[1] for r in results])
    masks = np.concatenate([r[2] for r in results])
    index = np.concatenate([np.full(len(r[1]), i) for i, r in enumerate(results)])
    vs = VolumeSet(list(patients), images, masks, index)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(cache) as tmp:
            with open(tmp, "wb") as fh:  # a file object: np.savez would add ".npz" to a bare name
                np.savez(fh, patients=np.array(patients), images=images, masks=masks, patient_index=index)
    return vs
