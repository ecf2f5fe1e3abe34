"""Post-processing of probability volumes into masks: threshold, components, holes."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

# 6-connectivity in 3D: what medpy's largest_connected_component (the reference) uses.
FACE_CONNECTIVITY_3D = ndi.generate_binary_structure(3, 1)


@dataclass(frozen=True)
class PostprocessConfig:
    threshold: float = 0.5
    largest_component: bool = True
    fill_holes_2d: bool = False
    fill_holes_3d: bool = False
    min_component_size: int = 0  # voxels; components smaller than this are dropped

    @classmethod
    def none(cls) -> "PostprocessConfig":
        return cls(largest_component=False)


def border(mask: np.ndarray, per_slice: bool = False) -> np.ndarray:
    """Voxels of ``mask`` with a face-neighbour outside it (voxels on the array edge included).

    ``per_slice=True``: the outline of each 2D slice of a (..., H, W) stack, neighbours in
    the slice plane only (what overlays draw), in one erosion instead of one per slice.
    """
    mask = np.asarray(mask, dtype=bool)
    if per_slice and mask.ndim > 2:
        plane = ndi.generate_binary_structure(2, 1)
        structure = np.zeros((3,) * mask.ndim, dtype=bool)
        structure[(1,) * (mask.ndim - 2)] = plane
    else:
        structure = ndi.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndi.binary_erosion(mask, structure=structure)


def largest_component(mask: np.ndarray, structure: np.ndarray = FACE_CONNECTIVITY_3D) -> np.ndarray:
    """Keep the largest connected component (an empty mask stays empty)."""
    labels, n = ndi.label(mask, structure=structure)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def remove_small_components(mask: np.ndarray, min_size: int, structure: np.ndarray = FACE_CONNECTIVITY_3D) -> np.ndarray:
    if min_size <= 1:
        return mask.astype(bool)
    labels, n = ndi.label(mask, structure=structure)
    if n == 0:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


def fill_holes_2d(mask: np.ndarray) -> np.ndarray:
    """Fill holes slice by slice (enclosed background within a slice)."""
    return np.stack([ndi.binary_fill_holes(s) for s in mask]) if mask.size else mask.astype(bool)


def fill_holes_3d(mask: np.ndarray) -> np.ndarray:
    return ndi.binary_fill_holes(mask)


def postprocess(prob: np.ndarray, config: PostprocessConfig = PostprocessConfig()) -> np.ndarray:
    """Turn a (D, H, W) probability volume into a boolean mask."""
    mask = prob > config.threshold
    if config.min_component_size > 1:
        mask = remove_small_components(mask, config.min_component_size)
    if config.largest_component:
        mask = largest_component(mask)
    if config.fill_holes_3d:
        mask = fill_holes_3d(mask)
    if config.fill_holes_2d:
        mask = fill_holes_2d(mask)
    return mask
