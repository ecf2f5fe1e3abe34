"""Masks and probabilities as NIfTI on the input's own grid (a NIfTI input's affine, or the Kaggle
display layout with unit spacing)."""
from __future__ import annotations

import numpy as np

from segengine.engine.readers.nifti import NiftiGrid
from segengine.engine.readers.volume import PatientVolume


# ---------------------------------------------------------------- writing
def mask_nifti(volume: PatientVolume, mask: np.ndarray):
    """The patient's (D, H, W) mask as a uint8 0/1 NIfTI image.

    A NIfTI input gets its own grid, affine and frame codes back (the mask overlays on it in
    3D Slicer or ITK-SNAP); Kaggle slices, whose spacing is unknown, get unit spacing with
    their axes' true directions: x = column (towards the patient's left), y = row (towards
    posterior), z = slice (towards superior).
    """
    import nibabel as nib

    if isinstance(volume.source_grid, NiftiGrid):
        return volume.source_grid.mask_image(mask)
    # the transposed (z, y, x) C array is the Fortran-ordered (x, y, z) array NIfTI stores: no copy
    data = np.asarray(mask, dtype=bool).view(np.uint8).transpose(2, 1, 0)
    return nib.Nifti1Image(data, kaggle_affine(volume))


def kaggle_affine(volume: PatientVolume) -> np.ndarray:
    """Kaggle slices' RAS affine: x = column (to the patient's left), y = row (to posterior), z = slice
    (to superior); unit spacing unless ``--spacing`` gave it (slice, row, column mm)."""
    sd, sr, sc = volume.spacing_mm or (1.0, 1.0, 1.0)
    return np.diag([-sc, -sr, sd, 1.0])


PROB_SCALE = 65535  # probabilities stored as uint16 * (1 / PROB_SCALE)


def prob_nifti(volume: PatientVolume, prob: np.ndarray):
    """The (D, H, W) probabilities on the input's grid (the mask NIfTI's affine and frame codes).

    NIfTI-1 has no float16 type (nibabel refuses it), so the map is stored in the same two
    bytes a voxel as uint16 with scl_slope 1/65535: a step of 1.5e-5 over [0, 1] (float16's
    is up to 4.9e-4 near 1); readers that apply the slope (nibabel, ITK, Slicer) get floats.
    """
    import nibabel as nib

    q = np.rint(np.clip(np.asarray(prob, dtype=np.float32), 0, 1) * PROB_SCALE).astype(np.uint16)
    if isinstance(volume.source_grid, NiftiGrid):
        grid = volume.source_grid
        data = np.ascontiguousarray(grid.from_kaggle(q))
        header = grid.header.copy()
        affine = grid.affine
    else:
        data, header, affine = q.transpose(2, 1, 0), nib.Nifti1Header(), kaggle_affine(volume)
    header.set_data_dtype(np.uint16)
    header.set_intent("none")
    header["descrip"] = b"segengine probability (slope 1/65535)"
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    img = image_class(data, affine, header)
    img.header.set_slope_inter(1.0 / PROB_SCALE, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0, 1
    return img
