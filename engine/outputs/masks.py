"""The Kaggle-named mask slices: ``<patient>_<n>_mask.tif``, uint8 0/255, one per input slice."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def write_mask_slices(folder: Path, patient_id: str, slice_numbers: list[int], mask: np.ndarray) -> list[Path]:
    """Write ``<patient>_<n>_mask.tif`` (uint8 0/255) for every slice, the Kaggle naming.

    Every slice has the same shape, so every file has the same bytes around its pixels:
    tifffile writes the first one, and the others reuse its header with their own pixels
    (the same files, without re-packing the same TIFF tags 20-60 times per patient).
    """
    import io

    import tifffile

    mask_u8 = np.where(np.asarray(mask) > 0, np.uint8(255), np.uint8(0))
    paths = [folder / f"{patient_id}_{n}_mask.tif" for n in slice_numbers]
    if not paths:
        return paths
    first = io.BytesIO()
    tifffile.imwrite(first, mask_u8[0])
    data = first.getvalue()
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        (start,), (count,) = tif.pages[0].dataoffsets, tif.pages[0].databytecounts
    if count != mask_u8[0].nbytes:  # not one plain strip: let tifffile write each file
        for p, sl in zip(paths, mask_u8):
            tifffile.imwrite(p, sl)
        return paths
    head, tail = data[:start], data[start + count :]
    for p, sl in zip(paths, mask_u8):
        with open(p, "wb") as fh:
            fh.write(head)
            fh.write(np.ascontiguousarray(sl).data)
            fh.write(tail)
    return paths
