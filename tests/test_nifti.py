"""NIfTI input and output: real patients converted to NIfTI segment like their tif folders.

The NIfTI cases are built at test time from the real Kaggle slices (no data is committed) by
bench/nifti_agreement.py's conversion: an oblique affine with non-unit spacing, axes permuted
and flipped, another dtype and intensity scale.
"""
from __future__ import annotations

import gzip
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from conftest import TRAIN_PATIENT, VAL_PATIENTS
from segengine.bench.nifti_agreement import SPACING, kaggle_to_input_grid, save_nifti, write_three_files
from segengine.engine.cli import main
from segengine.engine.readers.registry import read_patient
from segengine.engine.readers.nifti import read_nifti_case
from test_run import MODEL, _dice

_save = save_nifti


# ------------------------------------------------------------------ reading: pure, no model
@pytest.mark.parametrize("axcodes", [("S", "R", "A"), ("L", "P", "I"), ("R", "A", "S"), ("P", "I", "L")])
@pytest.mark.parametrize("dtype, scale, offset", [(np.int16, 13.7, 0.0), (np.float32, 0.0123, -4.5), (np.uint16, 200.0, 1000.0),
                                                  (np.float64, 1.0, 0.0), (np.uint8, 1.0, 0.0)])
def test_4d_case_reads_back_the_kaggle_slices(kaggle_root, tmp_path, axcodes, dtype, scale, offset):
    vol = read_patient(kaggle_root / VAL_PATIENTS[0])
    data, affine = kaggle_to_input_grid(vol.image, axcodes)
    _save(data, affine, tmp_path / "case.nii.gz", dtype, scale, offset)
    got = read_patient(tmp_path / "case.nii.gz")
    # the channels span 0..255 together here, so a linear rescale is undone exactly
    assert got.patient_id == "case" and got.slice_numbers == vol.slice_numbers
    np.testing.assert_array_equal(got.image, vol.image)
    assert got.spacing_mm == pytest.approx(SPACING)


def test_orientation_is_the_kaggle_display(tmp_path):
    """A marker at the patient's right, anterior, superior shows top left on a high slice.

    RAS+ world, identity affine: array index i grows towards the patient's Right, j towards
    Anterior, k towards Superior. Kaggle display: image left = patient's right, top = anterior.
    """
    data = np.ones((40, 50, 30, 3), np.float32)
    data[37, 45, 27, :] = 100.0  # right (high i), anterior (high j), superior (high k)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "marker.nii"))
    vol = read_nifti_case(tmp_path / "marker.nii")
    assert vol.image.shape == (30, 50, 40, 3)  # slices, rows (A->P), columns (R->L)
    s, r, c = np.unravel_index(np.argmax(vol.image[..., 1]), vol.image.shape[:3])
    assert (s, r, c) == (27, 50 - 1 - 45, 40 - 1 - 37)
    assert vol.spacing_mm == (1.0, 1.0, 1.0)


def test_flair_only_folder_fills_pre_and_post_with_flair(kaggle_root, tmp_path):
    vol = read_patient(kaggle_root / TRAIN_PATIENT)
    data, affine = kaggle_to_input_grid(vol.image[..., 1])
    (tmp_path / "case").mkdir()
    _save(data, affine, tmp_path / "case" / "case_flair.nii.gz", np.int16, 3.0)
    got = read_patient(tmp_path / "case")
    for c in range(3):
        np.testing.assert_array_equal(got.image[..., c], vol.image[..., 1])
    assert got.source_grid.filled_with_flair == ("pre", "post")


# ------------------------------------------------------------------ end to end: NIfTI vs tif, one mixed --patients run
def _stack_masks(folder, patient):
    paths = sorted(folder.glob(f"{patient}_*_mask.tif"), key=lambda p: int(p.stem.split("_")[-2]))
    return np.stack([tifffile.imread(p) for p in paths]) > 0


@pytest.fixture(scope="module")
def mixed_run(kaggle_root, tmp_path_factory):
    """ROOT holding two tif folders, a 4D NIfTI of the first and a three-file folder of the second."""
    root = tmp_path_factory.mktemp("mixed")
    four_d, three = VAL_PATIENTS[0], TRAIN_PATIENT
    for p in (four_d, three):
        shutil.copytree(kaggle_root / p, root / p)
    vol = read_patient(kaggle_root / four_d)
    data, affine = kaggle_to_input_grid(vol.image, ("S", "R", "A"))
    _save(data, affine, root / "nii4d.nii.gz", np.int16, 13.7)
    vol = read_patient(kaggle_root / three)
    case = root / "nii3"
    # each file its own dtype and scale. Separate files are rescaled one by one, which gives
    # back the 8-bit slices exactly only where each sequence spans 0..255, as this patient's
    # do (on others the masks differ a little: bench/nifti_agreement.py, README)
    write_three_files(vol.image, case, "nii3", ("L", "P", "I"))
    data, affine = kaggle_to_input_grid(vol.mask, ("L", "P", "I"))
    _save(data > 0, affine, case / "nii3_mask.nii.gz", np.uint8, 1)
    out = tmp_path_factory.mktemp("mixed-out") / "out"
    res = CliRunner().invoke(main, ["run", "--model", str(MODEL), "--patients", str(root), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return root, out, {"nii4d": (four_d, root / "nii4d.nii.gz", ("S", "R", "A")),
                       "nii3": (three, case / "nii3_flair.nii.gz", ("L", "P", "I"))}


@pytest.mark.parametrize("case", ["nii4d", "nii3"])
def test_nifti_case_segments_like_its_tif_folder(mixed_run, case):
    root, out, cases = mixed_run
    patient, source, axcodes = cases[case]
    mask_img = nib.load(str(out / case / f"{case}_mask.nii.gz"))
    src = nib.load(str(source))
    np.testing.assert_array_equal(mask_img.affine, src.affine)
    for field in ("qform_code", "sform_code", "xyzt_units", "quatern_b", "quatern_c", "quatern_d", "srow_x"):
        np.testing.assert_array_equal(mask_img.header[field], src.header[field])  # the same frame for every viewer
    assert mask_img.shape == src.shape[:3]
    assert mask_img.header.get_data_dtype() == np.uint8
    # compared on the input's grid: the tif run's masks mapped there by the test's own conversion
    tif_masks = _stack_masks(out / patient, patient)
    tif_on_grid, _ = kaggle_to_input_grid(tif_masks, axcodes)
    nii_mask = np.asarray(mask_img.dataobj) > 0
    assert tif_masks.sum() > 1000  # a real tumor, not two empty masks
    assert _dice(nii_mask, tif_on_grid) >= 0.99
    # per-slice tifs as for tif input, in the Kaggle layout
    assert _dice(_stack_masks(out / case, case), tif_masks) >= 0.99
    report = json.loads((out / case / "report.json").read_text())
    assert report["spacing_mm"] == pytest.approx(SPACING)
    assert report["tumor_volume_mm3"] == pytest.approx(nii_mask.sum() * np.prod(SPACING), rel=1e-6)
    assert report["nifti"]["filled_with_flair"] == []


def test_three_file_case_with_ground_truth_scores_like_the_tif_folder(mixed_run):
    _, out, cases = mixed_run
    patient = cases["nii3"][0]
    nii = json.loads((out / "nii3" / "report.json").read_text())
    tif = json.loads((out / patient / "report.json").read_text())
    assert nii["metrics"]["dsc"] == pytest.approx(tif["metrics"]["dsc"], abs=0.01)


def test_tif_input_nifti_has_the_kaggle_axes(mixed_run):
    """Kaggle slices have no spacing: unit voxels, axes pointing where the slices' axes point."""
    _, out, cases = mixed_run
    patient = cases["nii4d"][0]
    img = nib.load(str(out / patient / f"{patient}_mask.nii.gz"))
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    report = json.loads((out / patient / "report.json").read_text())
    assert report["tumor_volume_mm3"] is None and "nifti" not in report


# ------------------------------------------------------------------ bad NIfTI: one line, exit 2
def _good_4d(tmp_path, shape=(40, 48, 6, 3)):
    rng = np.random.default_rng(0)
    return rng.integers(0, 1000, shape).astype(np.int16), np.diag([0.9, 0.9, 3.0, 1.0])


def _bad_truncated(tmp_path):
    data, aff = _good_4d(tmp_path)
    p = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(data, aff), str(p))
    raw = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    return p


def _bad_truncated_raw(tmp_path):
    data, aff = _good_4d(tmp_path)
    p = tmp_path / "case.nii"
    nib.save(nib.Nifti1Image(data, aff), str(p))
    p.write_bytes(p.read_bytes()[:2000])
    return p


def _bad_garbage(tmp_path):
    p = tmp_path / "case.nii.gz"
    p.write_bytes(b"not a nifti at all" * 100)
    return p


def _bad_2d(tmp_path):
    p = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((40, 48), np.int16), np.eye(4)), str(p))
    return p


def _bad_3d_single_file(tmp_path):
    p = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((40, 48, 6), np.int16), np.eye(4)), str(p))
    return p


def _bad_channels(tmp_path):
    data, aff = _good_4d(tmp_path, (40, 48, 6, 4))
    p = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(data, aff), str(p))
    return p


def _bad_nan(tmp_path):
    data, aff = _good_4d(tmp_path)
    data = data.astype(np.float32)
    data[3, 4, 2, 1] = np.nan
    p = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(data, aff), str(p))
    return p


def _bad_degenerate_affine(tmp_path):
    data, _ = _good_4d(tmp_path)
    header = nib.Nifti1Header()
    header.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)  # a voxel axis of length 0
    p = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(data, None, header), str(p))
    return p


def _folder(tmp_path, shapes: dict, affines: dict | None = None):
    case = tmp_path / "case"
    case.mkdir()
    for seq, shape in shapes.items():
        aff = (affines or {}).get(seq, np.diag([0.9, 0.9, 3.0, 1.0]))
        nib.save(nib.Nifti1Image(np.ones(shape, np.int16), aff), str(case / f"case_{seq}.nii.gz"))
    return case


def _bad_shape_mismatch(tmp_path):
    return _folder(tmp_path, {"flair": (40, 48, 6), "pre": (40, 48, 7)})


def _bad_affine_mismatch(tmp_path):
    shifted = np.diag([0.9, 0.9, 3.0, 1.0])
    shifted[0, 3] = 5.0
    return _folder(tmp_path, {"flair": (40, 48, 6), "post": (40, 48, 6)}, {"post": shifted})


def _bad_no_flair(tmp_path):
    return _folder(tmp_path, {"pre": (40, 48, 6), "post": (40, 48, 6)})


def _bad_4d_sequence_file(tmp_path):
    return _folder(tmp_path, {"flair": (40, 48, 6, 3)})


BAD_NIFTI = [
    (_bad_truncated, "truncated or corrupt"), (_bad_truncated_raw, "truncated or corrupt"), (_bad_garbage, "not a readable NIfTI"),
    (_bad_2d, "2D volume"), (_bad_3d_single_file, "3D volume"), (_bad_channels, "4 volumes on the last axis"),
    (_bad_nan, "non-finite"), (_bad_degenerate_affine, "degenerate affine"), (_bad_shape_mismatch, "differs from the FLAIR"),
    (_bad_affine_mismatch, "affine differs"), (_bad_no_flair, "no *_flair"), (_bad_4d_sequence_file, "expected a 3D flair"),
]


@pytest.mark.parametrize("make, words", BAD_NIFTI, ids=[m.__name__[5:] for m, _ in BAD_NIFTI])
def test_bad_nifti_is_one_line_and_exit_2(tmp_path, make, words):
    path = make(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["run", "--model", str(MODEL), "--patient", str(path), "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert res.output.count("\n") == 1 and res.output.startswith("segengine: error: ") and words in res.output, res.output
    assert not out.exists() or list(out.iterdir()) == []  # nothing partial written
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and out not in p.parents} == before


def test_bad_nifti_in_a_batch_is_skipped(kaggle_root, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(kaggle_root / VAL_PATIENTS[0], root / VAL_PATIENTS[0])
    _bad_nan(root)  # root/case.nii.gz
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["run", "--model", str(MODEL), "--patients", str(root), "--out", str(out)])
    assert res.exit_code == 1, res.output
    assert "failed 1" in res.output and "case.nii.gz: 1 non-finite" in res.output
    assert sorted(p.name for p in out.iterdir()) == [VAL_PATIENTS[0], "index.html"]


def _case_file_and_case_folder(kaggle_root, root):
    _folder(root, {"flair": (40, 48, 6)})  # root/case/case_flair.nii.gz
    _bad_nan(root)  # root/case.nii.gz


def _two_folders_with_one_slice_prefix(kaggle_root, root):
    for name in ("a", "b"):  # the id is the slices' prefix, not the folder's name
        shutil.copytree(kaggle_root / VAL_PATIENTS[0], root / name)


@pytest.mark.parametrize("make", [_case_file_and_case_folder, _two_folders_with_one_slice_prefix],
                         ids=lambda f: f.__name__[1:])
def test_same_patient_id_twice_in_a_root_is_refused(kaggle_root, tmp_path, make):
    root = tmp_path / "root"
    root.mkdir()
    make(kaggle_root, root)
    res = CliRunner().invoke(main, ["run", "--model", str(MODEL), "--patients", str(root), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "same patient id" in res.output, res.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ------------------------------------------------------------------ NIfTI through the one patient job
# (array shape, affine, --limit flags, words): the limits apply to the reoriented axes (axial
# slices, in-plane columns x rows); the data is truncated, so passing means "refused from the header"
SLICES_FIRST = np.array([[0, 0, 0.9, 0], [0, 0.9, 0, 0], [3.0, 0, 0, 0], [0, 0, 0, 1]])  # axis 0 = S, 1 = A, 2 = R
OVER_LIMITS = [
    ((40, 48, 9, 3), np.diag([0.9, 0.9, 3.0, 1.0]), ["--max-slices", "8"], "9 axial slices, more than the limit of 8"),
    ((9, 40, 48, 3), SLICES_FIRST, ["--max-slices", "8"], "9 axial slices, more than the limit of 8"),
    ((9, 40, 48, 3), SLICES_FIRST, ["--max-side", "45"], "48x40 pixels a slice, larger than the limit of 45"),
    ((9, 40, 48, 3), SLICES_FIRST, ["--min-side", "44"], "48x40 pixels a slice, smaller than the limit of 44"),
]


@pytest.mark.parametrize("shape, affine, flags, words", OVER_LIMITS, ids=["slices", "slices-reoriented", "max-side", "min-side"])
def test_nifti_limits_are_checked_from_the_header_on_the_reoriented_axes(tmp_path, shape, affine, flags, words):
    p = tmp_path / "case.nii"
    nib.save(nib.Nifti1Image(np.ones(shape, np.int16), affine), str(p))
    p.write_bytes(p.read_bytes()[:1000])  # header intact, voxels cut: decoding would say "truncated"
    res = CliRunner().invoke(main, ["run", "--model", str(MODEL), "--patient", str(p), "--out", str(tmp_path / "out")] + flags)
    assert res.exit_code == 2 and res.output.count("\n") == 1 and words in res.output, res.output


def test_nifti_case_folder_limits_and_id_rule(tmp_path):
    case = _folder(tmp_path, {"flair": (40, 48, 6)})
    res = CliRunner().invoke(main, ["run", "--model", str(MODEL), "--patient", str(case), "--out", str(tmp_path / "out"),
                                    "--max-slices", "5"])
    assert res.exit_code == 2 and "case_flair.nii.gz: 6 axial slices, more than the limit of 5" in res.output, res.output
    hidden = tmp_path / ".case.nii.gz"
    shutil.copy(case / "case_flair.nii.gz", hidden)
    res = CliRunner().invoke(main, ["run", "--model", str(MODEL), "--patient", str(hidden), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    assert "patient id '.case' (the NIfTI case's file name" in res.output and "starts with '.'" in res.output, res.output
    res = CliRunner().invoke(main, ["run", "--model", str(MODEL), "--patient", str(tmp_path / "nope.nii.gz"),
                                    "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "nope.nii.gz: no such file" in res.output, res.output


def _case_file_in_its_result_folder(tmp_path):
    """--patient OUT/case/case.nii.gz: OUT/case would contain the input."""
    inner = tmp_path / "case"
    inner.mkdir()
    data, aff = _good_4d(tmp_path)
    nib.save(nib.Nifti1Image(data, aff), str(inner / "case.nii.gz"))
    return inner / "case.nii.gz", tmp_path, "contains the input"


def _case_folder_is_its_result_folder(tmp_path):
    """--patient OUT/case (a folder of sequences): OUT/case would be the input."""
    return _folder(tmp_path, {"flair": (40, 48, 6)}), tmp_path, "is the input"


def _case_file_behind_a_symlinked_result_folder(tmp_path):
    """OUT/case is a symbolic link to the folder holding the case file."""
    (tmp_path / "data").mkdir()
    data, aff = _good_4d(tmp_path)
    nib.save(nib.Nifti1Image(data, aff), str(tmp_path / "data" / "case.nii.gz"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "case").symlink_to(tmp_path / "data")
    return tmp_path / "data" / "case.nii.gz", tmp_path / "out", "contains the input"


@pytest.mark.parametrize("make", [_case_file_in_its_result_folder, _case_folder_is_its_result_folder,
                                  _case_file_behind_a_symlinked_result_folder], ids=lambda f: f.__name__[1:])
def test_result_folder_never_overlaps_a_nifti_input(tmp_path, make):
    source, out, words = make(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    res = CliRunner().invoke(main, ["run", "--model", str(MODEL), "--patient", str(source), "--out", str(out),
                                    "--overwrite"])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and words in res.output, res.output
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
