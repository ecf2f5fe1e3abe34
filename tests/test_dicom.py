"""DICOM studies in, DICOM SEG out, nnU-Net naming, physical units and probability maps.

The DICOM studies are written at test time from real Kaggle patients by tests/dicom_study.py
(no DICOM data is committed); their geometry is written from the dataset's own conventions,
and dcm2niix, a converter independent of segengine, checks the orientation a second way.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
from click.testing import CliRunner

from conftest import TRAIN_PATIENT, VAL_PATIENTS, running_in_ci, tree_hashes
from dicom_study import SPACING, make_study
from segengine.bench.nifti_agreement import write_three_files
from segengine.engine.cli import main
from segengine.engine.readers.dicom import plan_study
from segengine.engine.readers.registry import read_patient
from test_run import MODEL, _dice
from test_scale import ray_cluster  # noqa: F401 - the Ray fixture, for the options' trip to a worker

DCM2NIIX = Path(sys.executable).parent / "dcm2niix"


def _run(args):
    return CliRunner().invoke(main, ["run", "--model", str(MODEL), "--threads", "1", *args])


def _stack_masks(folder: Path, patient: str) -> np.ndarray:
    paths = sorted(folder.glob(f"{patient}_*_mask.tif"), key=lambda p: int(p.stem.split("_")[-2]))
    return np.stack([tifffile.imread(p) for p in paths]) > 0


# ------------------------------------------------------------------ reading: pure, no model
# (layout, frames stored as, tilt in degrees): every way must give back the Kaggle slices exactly.
# TRAIN_PATIENT's three sequences each span 0..255, so the per-series 8-bit rescale is exact.
READ_CASES = [("one-folder", "identity", 0.0), ("per-series", "flip", 0.0), ("one-folder", "transpose", 12.0),
              ("per-series", "identity", -25.0)]


@pytest.mark.parametrize("layout, in_plane, tilt", READ_CASES, ids=["-".join(map(str, c)) for c in READ_CASES])
def test_study_reads_back_the_kaggle_slices(kaggle_root, tmp_path, layout, in_plane, tilt):
    kaggle = read_patient(kaggle_root / TRAIN_PATIENT)
    make_study(kaggle_root / TRAIN_PATIENT, tmp_path / "study", layout, in_plane, tilt)
    got = read_patient(tmp_path / "study")
    assert got.patient_id == "study" and got.mask is None
    np.testing.assert_array_equal(got.image, kaggle.image)
    assert got.spacing_mm == pytest.approx(SPACING)
    assert got.source_grid.filled_with_flair == ()
    assert [s["description"] for s in got.source_grid.report()["ignored_series"]] == ["3-PLANE LOC"]


def _rle_compressed(study):
    for p in study.files["flair"]:
        ds = pydicom.dcmread(p)
        ds.compress(pydicom.uid.RLELossless)  # decoded by pydicom, not by the native little-endian path
        ds.save_as(p, enforce_file_format=True)


def _per_image_rescale(study):
    for k, p in enumerate(study.files["flair"]):
        if k % 2:  # stored values doubled, RescaleSlope 0.5: the same real values, another encoding per image
            ds = pydicom.dcmread(p)
            ds.PixelData = (ds.pixel_array.astype(np.uint16) * 2).tobytes()
            ds.RescaleSlope, ds.RescaleIntercept = 0.5, 0
            ds.save_as(p, enforce_file_format=True)


@pytest.mark.parametrize("encode", [_rle_compressed, _per_image_rescale], ids=lambda f: f.__name__[1:])
def test_encodings_read_back_the_same_slices(small_study, tmp_path, encode):
    src, study = small_study
    expected = read_patient(src).image
    folder = tmp_path / "study"
    shutil.copytree(src, folder)
    encode(type(study)(folder, study.in_plane, study.slice_numbers, study.sop_to_slice, study.series_uid,
                       _mine(study, folder)))
    np.testing.assert_array_equal(read_patient(folder).image, expected)


SERIES_NAMES = [("AX FLAIR", "flair"), ("AX T2 FLAIR", "flair"), ("SAG T1 FLAIR", "pre"), ("AX T1 SE", "pre"),
                ("AX T1 PRE CONTRAST", "pre"), ("AX T1 PRE-CONTRAST", "pre"), ("AX T1 NON-CONTRAST", "pre"),
                ("AX T1 W/O CONTRAST", "pre"), ("AX T1 W/O GAD", "pre"), ("T1 SE WITHOUT GD", "pre"), ("T1 PRE GD", "pre"),
                ("AX T1 POST", "post"), ("AX T1+C", "post"), ("AX T1 POST CONTRAST", "post"), ("T1 MPRAGE GAD", "post"),
                ("AX T1 W/ CONTRAST", "post"), ("3-PLANE LOC", None), ("AX T2", None)]


@pytest.mark.parametrize("description, role", SERIES_NAMES, ids=[d for d, _ in SERIES_NAMES])
def test_series_descriptions_map_to_roles(description, role):
    """A pre-contrast T1 described as "PRE CONTRAST" or "W/O GAD" must not be taken for the post-contrast series."""
    from pydicom.dataset import Dataset

    from segengine.engine.readers.dicom import Series, classify

    ds = Dataset()
    ds.SeriesDescription = description
    assert classify(Series("1.2.3", description, "MR", headers=[ds])) == role


def test_flair_only_study_fills_pre_and_post_with_flair(kaggle_root, tmp_path):
    kaggle = read_patient(kaggle_root / TRAIN_PATIENT)
    make_study(kaggle_root / TRAIN_PATIENT, tmp_path / "study", sequences=("flair",))
    got = read_patient(tmp_path / "study")
    for c in range(3):
        np.testing.assert_array_equal(got.image[..., c], kaggle.image[..., 1])
    assert got.source_grid.report()["filled_with_flair"] == ["pre", "post"]


# ------------------------------------------------------------------ one --patients run over every layout
@pytest.fixture(scope="module")
def mixed(kaggle_root, tmp_path_factory):
    """ROOT: a tif folder, two DICOM studies of it, dcm2niix's NIfTI of the oblique one, and the
    three-file and nnU-Net-named forms of another patient; one run with --spacing and --save-probabilities."""
    if not DCM2NIIX.exists():
        if running_in_ci():
            pytest.fail(f"dcm2niix not found at {DCM2NIIX}: pip install -e '.[dev]'")
        pytest.skip("dcm2niix not installed (pip install -e '.[dev]')")
    root = tmp_path_factory.mktemp("dicom-mixed")
    val, train = VAL_PATIENTS[0], TRAIN_PATIENT
    shutil.copytree(kaggle_root / val, root / val)
    studies = {"dcm_flat": make_study(kaggle_root / val, root / "dcm_flat", "one-folder", "flip", 0.0, seed=1),
               "dcm_oblique": make_study(kaggle_root / val, root / "dcm_oblique", "per-series", "transpose", 12.0, seed=2)}
    conv = tmp_path_factory.mktemp("dcm2niix")
    subprocess.run([str(DCM2NIIX), "-z", "y", "-f", "%s", "-o", str(conv), str(root / "dcm_oblique")], check=True,
                   capture_output=True)
    (root / "d2n").mkdir()
    for number, seq in ((2, "pre"), (3, "flair"), (4, "post")):  # dicom_study.py numbers the series from 2
        shutil.copy(conv / f"{number}.nii.gz", root / "d2n" / f"d2n_{seq}.nii.gz")
    image = read_patient(kaggle_root / train).image
    write_three_files(image, root / "nii3", "nii3")
    for case, channels in (("nnu_json", {"0": "FLAIR", "1": "T1", "2": "T1Gd"}), ("nnu_kaggle", None)):
        order = ["flair", "pre", "post"] if channels else ["pre", "flair", "post"]
        (root / case).mkdir()
        for i, seq in enumerate(order):
            shutil.copy(root / "nii3" / f"nii3_{seq}.nii.gz", root / case / f"{case}_{i:04d}.nii.gz")
        if channels:
            (root / case / "dataset.json").write_text(json.dumps({"channel_names": channels, "file_ending": ".nii.gz"}))
    for i, seq in enumerate(["pre", "flair", "post"]):  # a flat imagesTs-like case among the patients: one patient
        shutil.copy(root / "nii3" / f"nii3_{seq}.nii.gz", root / f"flat_{i:04d}.nii.gz")
    out = tmp_path_factory.mktemp("dicom-out") / "out"
    before = tree_hashes(root)
    res = _run(["--patients", str(root), "--out", str(out), "--spacing", ",".join(map(str, SPACING)),
                "--save-probabilities"])
    assert res.exit_code == 0, res.output
    assert tree_hashes(root) == before  # inputs never modified
    return root, out, studies


def _seg_volume(seg_path: Path, study, shape: tuple[int, int, int]) -> tuple[np.ndarray, object]:
    """The SEG as Kaggle-layout slices, placed through each frame's referenced FLAIR instance (the study's own map)."""
    import highdicom as hd

    return study.seg_on_kaggle_slices(seg_path, shape), hd.seg.segread(seg_path)


@pytest.mark.parametrize("case", ["dcm_flat", "dcm_oblique"])
def test_dicom_study_segments_like_its_tif_folder_through_the_seg(mixed, case):
    root, out, studies = mixed
    study, patient = studies[case], VAL_PATIENTS[0]
    tif = _stack_masks(out / patient, patient)
    assert tif.sum() > 1000  # a real tumor, not two empty masks
    seg_vol, seg = _seg_volume(out / case / f"{case}_seg.dcm", study, tif.shape)
    assert _dice(seg_vol, tif) >= 0.99
    # the SEG: binary, one coded segment, the study's frame of reference, only FLAIR instances referenced
    flair = [pydicom.dcmread(f, stop_before_pixels=True) for f in study.files["flair"]]
    assert seg.SegmentationType == "BINARY" and len(seg.SegmentSequence) == 1
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "FLAIR abnormality"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"  # SCT Neoplasm
    assert seg.StudyInstanceUID == flair[0].StudyInstanceUID and seg.FrameOfReferenceUID == flair[0].FrameOfReferenceUID
    referenced = seg.get_source_image_uids()
    assert {s for _, s, _ in referenced} == {study.series_uid["flair"]}
    assert {i for _, _, i in referenced} == {ds.SOPInstanceUID for ds in flair}
    # the per-slice tifs are in the Kaggle layout, as for tif input
    assert _dice(_stack_masks(out / case, case), tif) >= 0.99
    report = json.loads((out / case / "report.json").read_text())
    assert report["dicom"]["series"]["flair"]["uid"] == study.series_uid["flair"]
    assert report["dicom"]["filled_with_flair"] == [] and report["dicom"]["seg"]["file"] == f"{case}_seg.dcm"
    assert report["spacing_mm"] == pytest.approx(SPACING)
    # the SEG is this run's mask: the same voxels, on the spacing the study was written with
    assert report["tumor_volume_mm3"] == pytest.approx(seg_vol.sum() * np.prod(SPACING), rel=1e-5)
    page = (out / case / "review.html").read_text()
    assert f'href="{case}_seg.dcm">DICOM SEG' in page and f'href="{case}_prob.nii.gz">probability map' in page


def test_dicom_orientation_agrees_with_dcm2niix(mixed):
    """segengine on the study and on dcm2niix's NIfTI of it: the same masks, on the same world grid."""
    _, out, _ = mixed
    np.testing.assert_array_equal(_stack_masks(out / "dcm_oblique", "dcm_oblique"), _stack_masks(out / "d2n", "d2n"))
    ours = nib.as_closest_canonical(nib.load(str(out / "dcm_oblique" / "dcm_oblique_mask.nii.gz")))
    theirs = nib.as_closest_canonical(nib.load(str(out / "d2n" / "d2n_mask.nii.gz")))
    np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-3)
    assert np.asarray(ours.dataobj).sum() > 1000
    np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj))


@pytest.mark.parametrize("case", ["nnu_json", "nnu_kaggle", "flat"])
def test_nnunet_named_case_segments_like_the_three_file_form(mixed, case):
    _, out, _ = mixed
    assert not any(p.name.startswith("flat_000") for p in out.iterdir())  # flat_0001/_0002 are no patients
    three = _stack_masks(out / "nii3", "nii3")
    assert three.sum() > 1000
    np.testing.assert_array_equal(_stack_masks(out / case, case), three)
    report = json.loads((out / case / "report.json").read_text())
    assert report["nifti"]["files"]["flair"].endswith(f"{case}_{0 if case == 'nnu_json' else 1:04d}.nii.gz")
    assert report["nifti"]["files"]["pre"].endswith(f"{case}_{1 if case == 'nnu_json' else 0:04d}.nii.gz")


def test_hd95_is_in_mm_with_spacing(mixed, kaggle_root):
    """--spacing on tif slices: HD95 in mm, checked against medpy on the written masks."""
    from medpy.metric.binary import hd95 as medpy_hd95

    _, out, _ = mixed
    patient = VAL_PATIENTS[0]
    report = json.loads((out / patient / "report.json").read_text())
    truth = read_patient(kaggle_root / patient).mask > 0
    pred = _stack_masks(out / patient, patient)
    assert report["distance_unit"] == "mm" and "HD95 in mm" in report["metrics_note"]
    assert report["metrics"]["hd95"] == pytest.approx(medpy_hd95(pred, truth, voxelspacing=SPACING), rel=1e-6)
    assert report["metrics"]["hd95"] != pytest.approx(medpy_hd95(pred, truth), rel=1e-3)  # not the pixel figure
    assert report["tumor_volume_mm3"] == pytest.approx(pred.sum() * np.prod(SPACING), rel=1e-6)
    img = nib.load(str(out / patient / f"{patient}_mask.nii.gz"))
    assert img.header.get_zooms() == pytest.approx((SPACING[2], SPACING[1], SPACING[0]), rel=1e-5)


@pytest.mark.parametrize("case", [VAL_PATIENTS[0], "dcm_oblique", "nii3"])
def test_save_probabilities_on_the_input_grid(mixed, case):
    _, out, _ = mixed
    prob = nib.load(str(out / case / f"{case}_prob.nii.gz"))
    mask = nib.load(str(out / case / f"{case}_mask.nii.gz"))
    assert prob.shape == mask.shape and np.allclose(prob.affine, mask.affine)
    p = prob.get_fdata(dtype=np.float32)
    m = np.asarray(mask.dataobj) > 0
    assert 0 <= p.min() and p.max() <= 1 + 1e-6 and m.sum() > 0
    assert p[m].min() >= 0.5 - 1e-4  # every mask voxel passed the threshold (post-processing only removes)
    assert (p > 0.5).sum() >= m.sum() and np.unique(p).size > 100  # probabilities, not a second mask


# ------------------------------------------------------------------ refusals: one line, exit 2, nothing written
@pytest.fixture(scope="module")
def small_study(kaggle_root, tmp_path_factory) -> tuple[Path, object]:
    dest = tmp_path_factory.mktemp("small") / "study"
    return dest, make_study(kaggle_root / TRAIN_PATIENT, dest, "per-series", "identity", 0.0)


def _edit(paths, **tags):
    for p in paths:
        ds = pydicom.dcmread(p)
        for k, v in tags.items():
            setattr(ds, k, v)
        ds.save_as(p, enforce_file_format=True)


def _mine(study, folder):
    """The study's files as copied into ``folder``, by sequence, in Kaggle slice order."""
    return {seq: [folder / p.relative_to(study.folder) for p in paths] for seq, paths in study.files.items()}


def _gap(study, f):
    os.unlink(_mine(study, f)["flair"][5])


def _two_at_one_position(study, f):
    src = _mine(study, f)["flair"][3]
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(src.parent / "extra", enforce_file_format=True)


def _compressed_without_decoder(study, f):
    path = _mine(study, f)["flair"][2]
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLosslessSV1  # no decoder installed for it here
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8 not really jpeg \xff\xd9"])
    ds.save_as(path, enforce_file_format=True)


def _unknown_transfer_syntax(study, f):  # a private or mistyped syntax: not one pydicom knows
    path = _mine(study, f)["flair"][2]
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.3.4"
    ds.save_as(path, enforce_file_format=True)


def _multi_frame(study, f):
    _edit(_mine(study, f)["flair"][:1], NumberOfFrames=2)


def _huge_header(study, f):  # pixels left as they are: only the header claims the size
    _edit(_mine(study, f)["flair"], Rows=4000, Columns=4000)


def _ct(study, f):
    _edit([p for ps in _mine(study, f).values() for p in ps] + sorted((f / "001").iterdir()), Modality="CT")


def _no_flair(study, f):
    shutil.rmtree(_mine(study, f)["flair"][0].parent)


def _two_flair_series(study, f):
    shutil.copytree(_mine(study, f)["flair"][0].parent, f / "copy")
    _edit(sorted((f / "copy").iterdir()), SeriesInstanceUID=pydicom.uid.generate_uid(), SeriesDescription="AX FLAIR 2")


def _post_on_another_grid(study, f):
    for p in _mine(study, f)["post"]:
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        _edit([p], ImagePositionPatient=[float(ds.ImagePositionPatient[0]) + 2.0, *ds.ImagePositionPatient[1:]])


def _second_post_series(study, f, shift_mm: float = 0.0, name: str = "copy"):
    """A copy of the post-contrast series as another series, moved by ``shift_mm`` (another grid)."""
    shutil.copytree(_mine(study, f)["post"][0].parent, f / name)
    uid = pydicom.uid.generate_uid()
    for p in sorted((f / name).iterdir()):
        ds = pydicom.dcmread(p)
        ds.SeriesInstanceUID, ds.SeriesDescription, ds.SOPInstanceUID = uid, "T1 POST GD 2", pydicom.uid.generate_uid()
        ds.ImagePositionPatient = [float(ds.ImagePositionPatient[0]) + shift_mm, *ds.ImagePositionPatient[1:]]
        ds.save_as(p, enforce_file_format=True)


def _two_post_series_on_the_grid(study, f):
    _second_post_series(study, f)


def _mixed_orientations(study, f):
    _edit(_mine(study, f)["flair"][4:5], ImageOrientationPatient=[1, 0, 0, 0, 0, -1])


def _truncated_pixels(study, f):
    path = _mine(study, f)["flair"][7]
    path.write_bytes(path.read_bytes()[:-5000])


def _raw(paths, tag: int, vr: str, text: bytes):
    """Write a header value as raw bytes, as a broken exporter would (pydicom validates what it is given)."""
    from pydicom.dataelem import RawDataElement

    for p in paths:
        ds = pydicom.dcmread(p)
        ds[tag] = RawDataElement(pydicom.tag.Tag(tag), vr, len(text), text, 0, False, True)
        ds.save_as(p, enforce_file_format=True)


def _rescale_slope_zero(study, f):  # every stored value would map to the intercept: no image at all
    _edit(_mine(study, f)["flair"][3:4], RescaleSlope=0, RescaleIntercept=0)


def _rescale_slope_nan(study, f):  # would turn the whole series into NaN, then into a black volume
    _raw(_mine(study, f)["flair"][3:4], 0x00281053, "DS", b"NaN ")


def _frames_not_a_number(study, f):
    _raw(_mine(study, f)["flair"][3:4], 0x00280008, "IS", b"xx")


def _rows_of_three_bytes(study, f):  # a US value of odd length: pydicom raises when it is read
    _raw(_mine(study, f)["flair"][3:4], 0x00280010, "US", b"1\\2")


def _frames_overflowing(study, f):  # IS that parses to infinity
    _raw(_mine(study, f)["flair"][3:4], 0x00280008, "IS", b"1e999 ")


def _bits_stored_above_bits_allocated(study, f):  # an inconsistent header: which bits are the value?
    _edit(_mine(study, f)["flair"][3:4], BitsStored=20, HighBit=19)


def _post_in_another_frame_of_reference(study, f):  # same numbers, another patient coordinate system
    _edit(_mine(study, f)["post"], FrameOfReferenceUID=pydicom.uid.generate_uid())


def _flair_mixes_frames_of_reference(study, f):
    _edit(_mine(study, f)["flair"][:5], FrameOfReferenceUID=pydicom.uid.generate_uid())


def _escape_sequence_in_modality(study, f):  # a crafted header must not drive the user's terminal
    _edit([p for ps in _mine(study, f).values() for p in ps] + sorted((f / "001").iterdir()), Modality="\x1b[2J")


def _only_a_readme(study, f):
    shutil.rmtree(f)
    f.mkdir()
    (f / "README.txt").write_text("not a patient")


BAD_STUDIES = [
    (_gap, [], "is missing slices: a gap of 6.60 mm"),
    (_two_at_one_position, [], "two images at one position"),
    (_compressed_without_decoder, [], "compressed as JPEG Lossless"),
    (_unknown_transfer_syntax, [], "unknown transfer syntax 1.2.3.4"),
    (_multi_frame, [], "multi-frame image (2 frames) is not supported"),
    (_huge_header, [], "4000x4000 pixels a slice, larger than the limit of 1024"),
    (_ct, [], "no MR series (modality CT)"),
    (_no_flair, [], "no FLAIR series found"),
    (_two_flair_series, [], "several flair series"),
    (_two_post_series_on_the_grid, [], "several post series ('AX T1 POST GAD'"),
    (_post_on_another_grid, [], "does not share the FLAIR series' grid (other slice positions)"),
    (_mixed_orientations, [], "mixes image orientations"),
    (_truncated_pixels, [], "truncated"),
    (lambda s, f: None, ["--series", "flair=NOPE"], "--series flair=NOPE: no series with that UID or description"),
    (lambda s, f: None, ["--series", "flair=none"], "FLAIR is required"),
    (lambda s, f: None, ["--max-slices", "10"], "axial slices, more than the limit of 10"),
    (_only_a_readme, [], "accepted: Kaggle slices"),
    (_rescale_slope_zero, [], "RescaleSlope 0"),
    (_rescale_slope_nan, [], "RescaleSlope nan"),
    (_frames_not_a_number, [], "NumberOfFrames 'xx' is not a number"),
    (_rows_of_three_bytes, [], "Rows is unreadable"),
    (_frames_overflowing, [], "NumberOfFrames is unreadable"),
    (_bits_stored_above_bits_allocated, [], "BitsStored 20 of BitsAllocated 16"),
    (_post_in_another_frame_of_reference, [], "does not share the FLAIR series' grid (another frame of reference"),
    (_flair_mixes_frames_of_reference, [], "mixes frames of reference"),
    (_escape_sequence_in_modality, [], "no MR series (modality \\x1b[2J)"),
]


@pytest.mark.parametrize("make, flags, words", BAD_STUDIES,
                         ids=[getattr(m, "__name__", "x")[1:] if not flags else flags[-1].split("=")[0].lstrip("-")
                              for m, flags, _ in BAD_STUDIES])
def test_bad_study_is_one_line_and_exit_2(small_study, tmp_path, make, flags, words):
    src, study = small_study
    folder = tmp_path / "study"
    shutil.copytree(src, folder)
    make(study, folder)
    before = tree_hashes(folder)
    out = tmp_path / "out"
    res = _run(["--patient", str(folder), "--out", str(out), *flags])
    assert res.exit_code == 2, res.output
    assert res.output.count("\n") == 1 and res.output.startswith("segengine: error: ") and words in res.output, res.output
    assert res.output.isascii() and "\x1b" not in res.output  # header text is escaped, never sent to the terminal raw
    assert not out.exists() or [p.name for p in out.iterdir()] in ([], ["index.html"])  # nothing partial
    assert tree_hashes(folder) == before


def test_refusal_of_a_malformed_header_is_one_line_on_a_real_stderr(small_study, tmp_path):
    """pydicom warns (to stderr, two lines) about a value it cannot validate; the user sees only our line.
    A subprocess, because pytest captures warnings that CliRunner would otherwise show."""
    src, study = small_study
    folder = tmp_path / "study"
    shutil.copytree(src, folder)
    _frames_not_a_number(study, folder)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    res = subprocess.run([sys.executable, "-m", "segengine.engine.cli", "run", "--patient", str(folder), "--out",
                          str(tmp_path / "out"), "--model", str(MODEL), "--threads", "1"],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 2 and res.stdout == "", res
    assert res.stderr.count("\n") == 1 and "NumberOfFrames 'xx' is not a number" in res.stderr, res.stderr


def test_of_several_post_series_the_one_on_the_flair_grid_is_taken(small_study, tmp_path):
    src, study = small_study
    folder = tmp_path / "study"
    shutil.copytree(src, folder)
    _second_post_series(study, folder, shift_mm=30.0)  # e.g. a second acquisition on another grid
    plan = plan_study(folder)
    assert plan.grids["post"].series.uid == study.series_uid["post"]
    assert "T1 POST GD 2" in {s.description for s in plan.ignored}


def test_large_private_values_are_not_kept_with_the_headers(small_study, tmp_path):
    """The plan keeps every image's header (up to 20000 files): a 32 MiB private value in one of them
    must be skipped on reading, not held in memory; the study still reads the same."""
    import tracemalloc

    src, study = small_study
    folder = tmp_path / "study"
    shutil.copytree(src, folder)
    path = _mine(study, folder)["flair"][4]
    ds = pydicom.dcmread(path)
    ds.add_new(0x00291010, "OB", bytes(32 * 2**20))  # e.g. a vendor's private blob before the pixels
    ds.save_as(path, enforce_file_format=True)
    del ds
    tracemalloc.start()
    try:
        plan_study(folder)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20, f"{peak / 2**20:.1f} MiB held while planning"
    np.testing.assert_array_equal(read_patient(folder).image, read_patient(src).image)


@pytest.mark.parametrize("given", [".", "./", "../study/."])
def test_study_given_as_dot_is_named_after_its_folder(small_study, monkeypatch, given):
    """`--patient .` inside a study: the id is the folder's name, never "" (OUT/"" is OUT itself)."""
    from segengine.engine.readers.registry import patient_id_of

    src, _ = small_study
    monkeypatch.chdir(src)
    assert patient_id_of(Path(given)) == "study"
    assert read_patient(Path(given)).patient_id == "study"


def test_empty_mask_gives_a_valid_seg_of_empty_frames(small_study, tmp_path, capfd):
    import highdicom as hd

    from segengine.engine.outputs.dicom_seg import write_seg

    src, study = small_study
    vol = read_patient(src)
    info = write_seg(tmp_path / "seg.dcm", vol.source_grid, np.zeros(vol.image.shape[:3], bool))
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    assert info["frames"] == seg.NumberOfFrames == len(study.files["flair"])
    assert seg.get_pixels_by_source_instance([ds.SOPInstanceUID for ds in vol.source_grid.flair_headers]).sum() == 0
    assert capfd.readouterr().err == ""  # nothing for a run's stderr


def test_series_override_picks_among_two_flairs_and_fills_pre(small_study, tmp_path):
    src, study = small_study
    folder = tmp_path / "study"
    shutil.copytree(src, folder)
    _two_flair_series(study, folder)
    os.mkfifo(folder / "IM_FIFO")  # not a regular file: never opened for reading (the run would hang)
    res = _run(["--patient", str(folder), "--out", str(tmp_path / "out"), "--series", "flair=ax flair",
                "--series", "pre=none"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "study" / "report.json").read_text())
    assert report["dicom"]["series"]["flair"]["uid"] == study.series_uid["flair"]
    assert report["dicom"]["filled_with_flair"] == ["pre"] and "pre" not in report["dicom"]["series"]
    assert {s["description"] for s in report["dicom"]["ignored_series"]} == {"AX FLAIR 2", "AX T1 PRE", "3-PLANE LOC"}


def test_study_without_frame_of_reference_keeps_its_results_and_says_why_there_is_no_seg(small_study, tmp_path):
    """highdicom needs a frame of reference for the SEG; the masks and report do not."""
    src, study = small_study
    folder = tmp_path / "study"
    shutil.copytree(src, folder)
    for p in [p for ps in _mine(study, folder).values() for p in ps]:
        ds = pydicom.dcmread(p)
        del ds.FrameOfReferenceUID
        ds.save_as(p, enforce_file_format=True)
    res = _run(["--patient", str(folder), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "warning: study: no DICOM SEG written: Source images have no Frame Of Reference UID" in res.output
    result = tmp_path / "out" / "study"
    report = json.loads((result / "report.json").read_text())
    assert report["dicom"]["seg"]["error"].startswith("no DICOM SEG written")
    assert not (result / "study_seg.dcm").exists() and (result / "study_mask.nii.gz").exists()


def test_disk_full_while_writing_the_seg_fails_the_patient_not_only_its_seg(small_study, tmp_path, monkeypatch):
    """A SEG that highdicom refuses is a warning; a full disk is not: nothing of the patient is kept."""
    import errno

    import highdicom as hd

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hd.seg.Segmentation, "save_as", full)
    src, _ = small_study
    res = _run(["--patient", str(src), "--out", str(tmp_path / "out")])
    assert res.exit_code == 1 and "no space left on device" in res.output and "warning" not in res.output, res.output
    assert not (tmp_path / "out" / "study").exists()


def test_ray_workers_get_the_series_choice_and_write_the_seg_and_probabilities(small_study, ray_cluster, tmp_path):
    """--series, --spacing and --save-probabilities travel to Ray workers with the limits (options.RunOptions)."""
    src, study = small_study
    root = tmp_path / "root"
    shutil.copytree(src, root / "study")
    _two_flair_series(study, root / "study")  # refused without --series
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["run", "--patients", str(root), "--out", str(out), "--model", str(MODEL),
                                    "--backend", "onnxruntime", "--workers", "1", "--ray", "--series", "flair=AX FLAIR 2",
                                    "--save-probabilities"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "study" / "report.json").read_text())
    assert report["dicom"]["series"]["flair"]["description"] == "AX FLAIR 2"
    assert (out / "study" / "study_seg.dcm").is_file() and (out / "study" / "study_prob.nii.gz").is_file()


def test_distance_unit_from_a_report_is_escaped_in_the_review_pages(tmp_path):
    """Pages are re-rendered from report.json, which may have been edited by hand: the HD95 unit is text, not HTML."""
    from segengine.engine.outputs.review_page import index_html, patient_html

    report = {"slices": 3, "metrics": {"dsc": 0.5, "hd95": 2.0}, "distance_unit": "<script>alert(1)</script>"}
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "report.json").write_text(json.dumps(report))
    for page in (index_html(tmp_path, refresh_patients=False)[0], patient_html("p", report)):
        assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page


# ------------------------------------------------------------------ nnU-Net naming refused with one line
def _nnunet_folder(tmp_path, names, dataset=None):
    case = tmp_path / "case"
    case.mkdir()
    for name in names:
        nib.save(nib.Nifti1Image(np.ones((40, 48, 6), np.int16), np.diag([0.9, 0.9, 3.0, 1.0])), str(case / name))
    if dataset is not None:
        (case / "dataset.json").write_text(json.dumps(dataset) if isinstance(dataset, dict) else dataset)
    return case


BAD_NNUNET = [
    (["a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz"], None, "several nnU-Net cases (a, b)"),
    (["a_0000.nii.gz", "a_0001.nii.gz", "a_0003.nii.gz"], None, "channel 0003 has no role in the Kaggle order"),
    (["a_0000.nii.gz", "a_0001.nii.gz"], {"channel_names": {"0": "T1", "1": "T2"}}, "no FLAIR channel"),
    (["a_0000.nii.gz", "a_0001.nii.gz"], "{not json", "not a dataset.json with channel_names"),
    (["a_0000.nii.gz", "a_0002.nii.gz"], None, "no *_flair.nii[.gz] volume or nnU-Net FLAIR channel"),
]


@pytest.mark.parametrize("names, dataset, words", BAD_NNUNET, ids=["two-cases", "extra-channel", "json-no-flair",
                                                                   "json-broken", "no-flair"])
def test_bad_nnunet_case_is_one_line_and_exit_2(tmp_path, names, dataset, words):
    case = _nnunet_folder(tmp_path, names, dataset)
    res = _run(["--patient", str(case), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and words in res.output, res.output


ROLE_NAMES = [("FLAIR", "flair"), ("T2-FLAIR", "flair"), ("t2f", "flair"), ("T2", None), ("T1", "pre"), ("t1n", "pre"),
              ("T1 pre-contrast", "pre"), ("T1_precontrast", "pre"), ("T1 non-contrast", "pre"), ("T1 native", "pre"),
              ("T1_SPACE", "pre"), ("MPRAGE", "pre"), ("T1 FLAIR", "pre"), ("T1Gd", "post"), ("T1ce", "post"),
              ("T1_ce", "post"), ("T1w_ce", "post"), ("t1c", "post"), ("T1+C", "post"), ("T1 post-contrast", "post"), ("T1 contrast", "post")]


@pytest.mark.parametrize("name, role", ROLE_NAMES, ids=[n for n, _ in ROLE_NAMES])
def test_dataset_json_channel_names_map_to_roles(name, role):
    """A pre-contrast T1 named "pre-contrast" must not become the post-contrast channel (the word "contrast")."""
    from segengine.engine.readers.nnunet import role_of

    assert role_of(name) == role


def test_flat_nnunet_folder_lists_one_patient_per_case_and_a_lone_channel_name_stays_a_4d_case(tmp_path):
    from segengine.engine.readers.registry import list_patients
    from segengine.engine.readers.registry import patient_id_of

    _nnunet_folder(tmp_path, ["a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz", "b_0002.nii.gz"])
    case = tmp_path / "case"
    nib.save(nib.Nifti1Image(np.ones((40, 48, 6, 3), np.int16), np.eye(4)), str(case / "solo_0000.nii.gz"))
    listed = list_patients(case)
    assert [p.name for p in listed] == ["a_0000.nii.gz", "b_0000.nii.gz", "solo_0000.nii.gz"]
    assert [patient_id_of(p) for p in listed] == ["a", "b", "solo_0000"]
    got = read_patient(case / "b_0000.nii.gz")
    assert got.patient_id == "b" and got.source_grid.files["post"].endswith("b_0002.nii.gz")
    assert read_patient(case / "solo_0000.nii.gz").source_grid.files["flair"].endswith("solo_0000.nii.gz")


def test_bad_study_in_a_batch_is_skipped(small_study, tmp_path):
    src, study = small_study
    root = tmp_path / "root"
    shutil.copytree(src, root / "good")
    shutil.copytree(src, root / "gappy")
    _gap(study, root / "gappy")
    out = tmp_path / "out"
    res = _run(["--patients", str(root), "--out", str(out)])
    assert res.exit_code == 1, res.output
    assert "failed 1" in res.output and "gappy" in res.output and "is missing slices" in res.output, res.output
    assert sorted(p.name for p in out.iterdir()) == ["good", "index.html"]
    assert (out / "good" / "good_seg.dcm").is_file()
