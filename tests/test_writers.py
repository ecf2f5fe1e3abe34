"""The fast writers write what the plain ones would: mask tifs byte for byte as tifffile,
the NIfTI volume, the overlay's outlines exactly where the masks' borders are."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile

from conftest import VAL_PATIENTS
from segengine.engine.outputs import writer as outputs
from segengine.engine.postprocessing.postprocess import border
from segengine.engine.outputs.masks import write_mask_slices
from segengine.engine.readers.registry import read_patient
from segengine.engine.outputs.pictures import PRED_COLOR, TRUTH_COLOR


@pytest.mark.parametrize("shape", [(5, 256, 256), (3, 240, 200), (1, 17, 33), (0, 8, 8)])
def test_mask_tifs_are_the_bytes_tifffile_writes(tmp_path, shape):
    mask = np.random.default_rng(0).random(shape) > 0.7
    numbers = list(range(7, 7 + shape[0]))
    paths = write_mask_slices(tmp_path, "TCGA_XX_0000_20000101", numbers, mask)
    assert [p.name for p in paths] == [f"TCGA_XX_0000_20000101_{n}_mask.tif" for n in numbers]
    for p, sl in zip(paths, mask):
        tifffile.imwrite(tmp_path / "plain.tif", np.where(sl, np.uint8(255), np.uint8(0)))
        assert p.read_bytes() == (tmp_path / "plain.tif").read_bytes()
        np.testing.assert_array_equal(tifffile.imread(p) > 0, sl)


@pytest.mark.parametrize("shape", [(4, 32, 40), (1, 16, 16)])
def test_per_slice_border_is_each_slice_outline(shape):
    mask = np.random.default_rng(1).random(shape) > 0.4
    np.testing.assert_array_equal(border(mask, per_slice=True), np.stack([border(s) for s in mask]))


@pytest.fixture(scope="module")
def written(kaggle_root, tmp_path_factory):
    """One real patient, a synthetic prediction (its truth shifted), written by write_patient."""
    from segengine.engine.postprocessing.finish import Segmentation

    vol = read_patient(kaggle_root / VAL_PATIENTS[0])
    truth = vol.mask > 0
    pred = np.roll(truth, 3, axis=2)
    seg = Segmentation(vol.patient_id, "native", pred.astype(np.float32), pred, truth, None)
    out = tmp_path_factory.mktemp("written")
    outputs.write_patient(out, vol, seg, {"patient": vol.patient_id, "timings_s": {}})
    return out / vol.patient_id, vol, pred, truth


def test_nifti_holds_the_mask_in_xyz_order(written):
    import nibabel as nib

    folder, vol, pred, _ = written
    nii = nib.load(folder / f"{vol.patient_id}_mask.nii.gz")
    data = np.asarray(nii.dataobj)
    assert data.dtype == np.uint8 and data.shape == (vol.image.shape[2], vol.image.shape[1], vol.num_slices)
    np.testing.assert_array_equal(data.transpose(2, 1, 0), pred.astype(np.uint8))


def test_overlay_outlines_are_the_mask_borders(written):
    from PIL import Image

    folder, vol, pred, truth = written
    with Image.open(folder / "overlay.png") as im:
        assert im.mode == "P"
        rgb = np.asarray(im.convert("RGB"))
    tiled = np.flatnonzero(pred.any(axis=(1, 2)) | truth.any(axis=(1, 2)))
    assert 0 < tiled.size <= 20  # every slice with tumor is a tile
    red = (rgb == PRED_COLOR).all(axis=-1).sum()
    green = (rgb == TRUTH_COLOR).all(axis=-1).sum()
    pred_border, truth_border = border(pred[tiled], per_slice=True), border(truth[tiled], per_slice=True)
    assert red == pred_border.sum() > 0
    assert green == (truth_border & ~pred_border).sum() > 0  # the prediction is drawn over the truth
