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
    orange = (rgb == PRED_COLOR).all(axis=-1).sum()
    blue = (rgb == TRUTH_COLOR).all(axis=-1).sum()
    # outlines two pixels thick inside each mask (written here with plain numpy shifts), the prediction over the truth
    pred_band, truth_band = _band(pred[tiled]), _band(truth[tiled])
    swatch = 12 * 10  # each colour's legend swatch
    assert orange == pred_band.sum() + swatch and pred_band.sum() > 2 * border(pred[tiled], per_slice=True).sum() * 0.9
    assert blue == (truth_band & ~pred_band).sum() + swatch > swatch


def _band(masks: np.ndarray, width: int = 2) -> np.ndarray:
    """Pixels of each slice's mask within ``width`` face steps of its outside (the image edge counts as outside)."""
    inner = masks.copy()
    for _ in range(width):
        m = np.pad(inner, ((0, 0), (1, 1), (1, 1)))
        inner = m[:, 1:-1, 1:-1] & m[:, :-2, 1:-1] & m[:, 2:, 1:-1] & m[:, 1:-1, :-2] & m[:, 1:-1, 2:]
    return masks & ~inner


def test_overlay_sheet_numbers_its_slices_and_has_a_legend(tmp_path):
    """Slice numbers on the tiles and a legend under them, in the colour-blind-safe pair (no red, no green)."""
    from segengine.engine.outputs.pictures import LEGEND_HEIGHT, contact_sheet
    from segengine.engine.readers.volume import PatientVolume

    image = np.full((6, 64, 64, 3), 90, np.uint8)
    pred = np.zeros((6, 64, 64), bool)
    pred[2, 20:40, 20:40] = True
    with_truth, without = (contact_sheet(PatientVolume("p", tmp_path, [11, 12, 13, 14, 15, 16], image), pred, t)
                           for t in (pred.copy(), None))
    for sheet in (with_truth, without):
        rgb = np.asarray(sheet.convert("RGB"))
        tile, legend = rgb[:64, :64], rgb[-LEGEND_HEIGHT:]
        assert rgb.shape[0] == 64 + LEGEND_HEIGHT  # one tile (slice 13), then the legend strip
        assert (tile[:12, :16] == 255).all(axis=-1).any()  # the white slice number in the top-left corner
        assert (tile[20:40, 20:40] == PRED_COLOR).all(axis=-1).sum() == 20 * 20 - 16 * 16
        assert (legend == PRED_COLOR).all(axis=-1).any() and (legend == 255).all(axis=-1).sum() > 50  # swatch, text
        assert not ((rgb == (255, 40, 40)).all(axis=-1).any() or (rgb == (0, 220, 0)).all(axis=-1).any())
    assert (np.asarray(with_truth.convert("RGB"))[-LEGEND_HEIGHT:] == TRUTH_COLOR).all(axis=-1).any()
    assert not (np.asarray(without.convert("RGB")) == TRUTH_COLOR).all(axis=-1).any()
