"""Data layer, the shared preprocessing path, post-processing and metrics."""
from __future__ import annotations

import importlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from conftest import VAL_PATIENTS
from reference_impl import reference_preprocess
from segengine.engine.readers import kaggle as io
from segengine.engine.cli import main
from segengine.engine.evaluation.metrics import dsc, hd95, precision, recall, volume_metrics
from segengine.engine.postprocessing.postprocess import (PostprocessConfig, fill_holes_2d, largest_component, postprocess)
from segengine.engine.core.errors import EmptyVolumeError
from segengine.engine.preprocessing.preprocess import preprocess_volume, to_original_grid
from segengine.engine.readers.registry import list_patients, read_patient
from segengine.engine.core.errors import SliceShapeError


@pytest.mark.parametrize("module", ["segengine.engine", "segengine.engine.cli", "segengine.engine.inference.backends", "segengine.engine.core",
                                    "segengine.engine.readers", "segengine.engine.job", "segengine.engine.outputs",
                                    "segengine.train", "segengine.export", "segengine.bench", "segengine.models"])
def test_every_stage_imports(module):
    """Each stage imports and comes from this checkout (not a stale installed copy)."""
    mod = importlib.import_module(module)
    assert mod.__name__ == module
    repo = Path(__file__).resolve().parents[1]
    assert Path(mod.__file__).resolve().is_relative_to(repo), mod.__file__


def test_help_does_not_import_heavy_runtimes():
    code = "import sys; from segengine.engine.cli import main; print(sorted(m for m in ('torch','onnxruntime','tensorrt') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("command", [[], ["evaluate"], ["run"], ["validate"], ["export"], ["bench"]])
def test_help_shows_an_example(command):
    res = CliRunner().invoke(main, command + ["--help"])
    assert res.exit_code == 0
    assert "segengine " in res.output and "Example" in res.output


@pytest.mark.parametrize("command, options", [
    (["train"], ["--context-slices", "--loss", "--flair-copy-p", "--amp", "--dark-channel-p", "--resume"]),
    (["cv"], ["--folds", "--only", "--score-only", "--ship-ensemble"]),
])
def test_training_help_lists_its_options(command, options):
    """`segengine train --help` is the training parser's own help (it listed nothing before)."""
    res = CliRunner().invoke(main, command + ["--help"])
    assert res.exit_code == 0
    missing = [o for o in options if o not in res.output]
    assert not missing, f"{' '.join(command)} --help lacks {missing}"


# ----------------------------------------------------------------- reading patient folders
def test_reads_real_patient_in_numeric_order(kaggle_root):
    vol = read_patient(kaggle_root / VAL_PATIENTS[0])
    assert vol.patient_id == VAL_PATIENTS[0]
    assert vol.slice_numbers == list(range(1, vol.num_slices + 1))
    assert [p.name for p in vol.image_paths[8:11]] == [f"{VAL_PATIENTS[0]}_{n}.tif" for n in (9, 10, 11)]
    assert vol.image.shape == (vol.num_slices, 256, 256, 3) and vol.image.dtype == np.uint8
    assert vol.mask.shape == (vol.num_slices, 256, 256) and set(np.unique(vol.mask)) <= {0, 255}
    direct = tifffile.imread(kaggle_root / VAL_PATIENTS[0] / f"{VAL_PATIENTS[0]}_10.tif")
    np.testing.assert_array_equal(vol.image[9], direct)


def test_dataset_root_ignores_files_beside_patients(kaggle_root):
    assert (kaggle_root / "data.csv").exists()
    names = [p.name for p in list_patients(kaggle_root)]
    assert set(VAL_PATIENTS) <= set(names) and "data.csv" not in names


def _write(folder, name, arr):
    folder.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / name, arr)


def _synthetic_patient(folder, n=3, size=(32, 40)):
    for i in range(1, n + 1):
        _write(folder, f"P_{i}.tif", np.full(size + (3,), 40 * i, np.uint8))
        _write(folder, f"P_{i}_mask.tif", np.zeros(size, np.uint8))
    return folder


def test_grayscale_slices_are_refused_not_copied_into_three_channels(tmp_path):
    """The model needs pre-contrast, FLAIR and post-contrast: one channel copied thrice is a silent wrong answer."""
    for i in (1, 2, 10):
        _write(tmp_path, f"G_{i}.tif", np.full((32, 32), i, np.uint8))
    with pytest.raises(io.SliceNumberingError):
        read_patient(tmp_path)  # gap 3..9
    for i in range(3, 10):
        _write(tmp_path, f"G_{i}.tif", np.full((32, 32), i, np.uint8))
    with pytest.raises(io.SliceFormatError, match="grayscale.*pre-contrast, FLAIR, post-contrast"):
        read_patient(tmp_path)


def _rgba(f):
    _write(f, "P_2.tif", np.zeros((32, 40, 4), np.uint8))


def _sixteen_bit(f):
    _write(f, "P_2.tif", np.zeros((32, 40, 3), np.uint16))


def _mixed_sizes(f):
    _write(f, "P_2.tif", np.zeros((36, 40, 3), np.uint8))


def _gap(f):
    (f / "P_2.tif").unlink()
    (f / "P_2_mask.tif").unlink()


def _duplicate(f):
    _write(f, "P_02.tif", np.zeros((32, 40, 3), np.uint8))


def _orphan_mask(f):
    _write(f, "P_4_mask.tif", np.zeros((32, 40), np.uint8))


def _truncated(f):
    data = (f / "P_2.tif").read_bytes()
    (f / "P_2.tif").write_bytes(data[: len(data) // 3])


def _not_an_image(f):
    (f / "P_2.tif").write_text("hello")


def _empty(f):
    for p in f.iterdir():
        p.unlink()


def _missing_mask(f):
    (f / "P_3_mask.tif").unlink()


ILL_FOLDERS = [
    (_rgba, io.SliceFormatError, "RGBA"),
    (_sixteen_bit, io.SliceFormatError, "uint16"),
    (_mixed_sizes, SliceShapeError, "P_2.tif"),
    (_gap, io.SliceNumberingError, "slice 2 is missing"),
    (_duplicate, io.SliceNumberingError, "duplicate"),
    (_orphan_mask, io.OrphanMaskError, "P_4_mask.tif"),
    (_truncated, io.UnreadableSliceError, "P_2.tif"),
    (_not_an_image, io.UnreadableSliceError, "P_2.tif"),
    (_empty, io.NoSlicesError, "no image slices"),
    (_missing_mask, io.OrphanMaskError, "P_3.tif"),
]


@pytest.mark.parametrize("damage, error, words", ILL_FOLDERS, ids=[d.__name__.strip("_") for d, _, _ in ILL_FOLDERS])
def test_ill_patient_folders_raise_typed_one_line_errors(tmp_path, damage, error, words):
    folder = _synthetic_patient(tmp_path / "P")
    damage(folder)
    with pytest.raises(error) as info:
        read_patient(folder)
    msg = str(info.value)
    assert "\n" not in msg and words in msg


@pytest.mark.parametrize("is_file", [False, True], ids=["missing", "a-file"])
def test_patient_path_that_is_not_a_folder(tmp_path, is_file):
    path = tmp_path / "nothing"
    if is_file:
        path.write_text("x")
    with pytest.raises(io.NotAFolderError):
        read_patient(path)


# ----------------------------------------------------------------- preprocessing
def test_reference_protocol_matches_the_course_program(kaggle_root):
    vol = read_patient(kaggle_root / VAL_PATIENTS[0])
    pre = preprocess_volume(vol.image, vol.mask)
    ref_images, ref_mask = reference_preprocess(vol.image, vol.mask)
    # the course program keeps slices 2..D-1, cropped to those with a pixel >= 10% of the maximum
    inner = vol.image[1:-1]
    bright = np.flatnonzero((inner >= inner.max() * 0.1).any(axis=(1, 2, 3)))
    expected_slices = int(bright[-1] - bright[0] + 1)
    assert 0 < expected_slices <= vol.num_slices - 2
    assert pre.images.shape == ref_images.shape == (expected_slices, 3, 256, 256)
    assert pre.images.dtype == np.float32
    np.testing.assert_allclose(pre.images, ref_images, atol=1e-5)
    np.testing.assert_array_equal(pre.mask, ref_mask)
    # z-normalized per channel, and the mask keeps its tumor
    np.testing.assert_allclose(pre.images.mean(axis=(0, 2, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(pre.images.std(axis=(0, 2, 3)), 1, atol=1e-3)
    assert pre.mask.sum() > 0 and set(np.unique(pre.mask)) <= {0, 1}


@pytest.mark.parametrize("size", [256, 128, 160])
def test_resolution_is_a_parameter(kaggle_root, size):
    vol = read_patient(kaggle_root / VAL_PATIENTS[1])
    pre = preprocess_volume(vol.image, vol.mask, size=size, drop_ends=False)
    assert pre.images.shape[1:] == (3, size, size) and pre.mask.shape[1:] == (size, size)
    assert pre.geometry.size == size


@pytest.mark.parametrize("patient", VAL_PATIENTS)
def test_inverse_mapping_round_trip_keeps_the_mask(kaggle_root, patient):
    vol = read_patient(kaggle_root / patient)
    pre = preprocess_volume(vol.image, vol.mask, drop_ends=False)
    back = to_original_grid(pre.mask.astype(np.float32), pre.geometry) > 0.5
    assert back.shape == vol.mask.shape
    assert dsc(back, vol.mask > 0) >= 0.98


def test_inverse_mapping_places_crop_and_drops(kaggle_root):
    vol = read_patient(kaggle_root / VAL_PATIENTS[1])
    pre = preprocess_volume(vol.image, vol.mask, drop_ends=True)
    g = pre.geometry
    back = to_original_grid(np.ones((g.z1 - g.z0, g.size, g.size), np.float32), g)
    assert back[0].sum() == 0 and back[-1].sum() == 0  # dropped first/last slice
    assert back[g.z0, g.y0:g.y1, g.x0:g.x1].min() == 1.0
    assert back[g.z0].sum() == (g.y1 - g.y0) * (g.x1 - g.x0)
    with pytest.raises(ValueError):
        to_original_grid(np.ones((1, g.size, g.size), np.float32), g)


_RNG = np.random.default_rng(0)


@pytest.mark.parametrize("values", [
    _RNG.standard_normal(60_000).astype(np.float32),  # sampled path, float32 as the volumes
    _RNG.integers(0, 4, 60_000).astype(np.float32),  # heavy ties
    np.zeros(60_000, np.float32),  # all equal
    np.tile(np.r_[0, np.ones(59)], 1000).astype(np.float32),  # the strided sample sees only the 0s: fallback
    _RNG.random(60_000),  # float64
    _RNG.random(999).astype(np.float32),  # too small to sample: np.percentile itself
], ids=["normal", "ties", "constant", "periodic", "float64", "small"])
def test_percentiles_equal_numpy_to_the_bit(values):
    from segengine.engine.preprocessing.preprocess import percentiles

    assert percentiles(values, (10, 99), sample_size=1000) == [float(v) for v in np.percentile(values, (10, 99))]


def test_empty_volume_is_refused():
    with pytest.raises(EmptyVolumeError):
        preprocess_volume(np.zeros((5, 16, 16, 3), np.uint8))


# ----------------------------------------------------------------- post-processing
def test_largest_component_uses_face_connectivity():
    m = np.zeros((3, 8, 8), bool)
    m[1, 1:4, 1:4] = True  # 9 voxels
    m[1, 6, 6] = True
    m[0, 5, 5] = m[1, 4, 4] = False
    m[2, 4, 4] = True  # touches the big blob only diagonally in 3D: separate with 6-connectivity
    out = largest_component(m)
    assert out.sum() == 9 and not out[1, 6, 6] and not out[2, 4, 4]
    assert largest_component(np.zeros((2, 4, 4), bool)).sum() == 0


def test_hole_filling_is_per_slice():
    enclosed = np.zeros((5, 7, 7), bool)
    enclosed[1:4, 1:6, 1:6] = True
    enclosed[2, 3, 3] = False  # a cavity closed within its slice
    assert fill_holes_2d(enclosed)[2, 3, 3] and fill_holes_2d(enclosed).sum() == enclosed.sum() + 1
    tunnel = np.zeros((5, 7, 7), bool)
    tunnel[:, 1:6, 1:6] = True
    tunnel[:, 3, 3] = False  # a channel through every slice: a hole in each slice (--fill-holes fills it)
    assert fill_holes_2d(tunnel)[:, 3, 3].all()


def test_threshold_and_largest_component_pipeline():
    m = np.zeros((2, 10, 10), np.float32)
    m[0, :4, :4] = 0.9
    m[1, 8:, 8:] = 0.8  # 4 voxels
    assert postprocess(m, PostprocessConfig()).sum() == 16
    assert postprocess(m, PostprocessConfig.none()).sum() == 20
    assert postprocess(m, PostprocessConfig(threshold=0.85, largest_component=False)).sum() == 16


# ----------------------------------------------------------------- metrics
def test_metrics_on_known_masks():
    a = np.zeros((1, 10, 10), bool)
    b = np.zeros((1, 10, 10), bool)
    a[0, :4] = True  # 40
    b[0, 2:6] = True  # 40, overlap 20
    assert dsc(a, b) == pytest.approx(0.5)
    assert precision(a, b) == pytest.approx(0.5) and recall(a, b) == pytest.approx(0.5)
    assert hd95(a, a) == 0.0 and hd95(a, b) > 0


@pytest.mark.parametrize("pred_empty, truth_empty, expected", [
    (True, True, {"dsc": 1.0, "precision": 1.0, "recall": 1.0, "hd95": 0.0}),
    (True, False, {"dsc": 0.0, "precision": 1.0, "recall": 0.0, "hd95": math.nan}),
    (False, True, {"dsc": 0.0, "precision": 0.0, "recall": 1.0, "hd95": math.nan}),
])
def test_metrics_on_empty_masks(pred_empty, truth_empty, expected):
    full = np.zeros((2, 6, 6), bool)
    full[0, 1:3, 1:3] = True
    empty = np.zeros_like(full)
    got = volume_metrics(empty if pred_empty else full, empty if truth_empty else full)
    for k, v in expected.items():
        assert (math.isnan(got[k]) and math.isnan(v)) or got[k] == v, k


@pytest.mark.parametrize("shift", [(0, 0, 0), (0, 3, -2), (1, 5, 7)])
def test_hd95_equals_medpy_on_real_masks(kaggle_root, shift):
    from medpy.metric.binary import hd95 as medpy_hd95

    truth = read_patient(kaggle_root / VAL_PATIENTS[1]).mask > 0
    pred = np.roll(truth, shift, axis=(0, 1, 2))
    pred[:, :2] = True  # a blob touching the array edge
    assert hd95(pred, truth) == pytest.approx(medpy_hd95(pred, truth), abs=1e-9)
    assert hd95(pred, truth, (2.0, 1.0, 1.0)) == pytest.approx(medpy_hd95(pred, truth, voxelspacing=(2.0, 1.0, 1.0)), abs=1e-9)


def test_dsc_of_a_real_mask_and_one_of_its_slices_by_hand(kaggle_root):
    """A prediction that keeps only the truth's largest slice (area a of T voxels): DSC = 2a / (T + a)."""
    truth = read_patient(kaggle_root / VAL_PATIENTS[0]).mask > 0
    areas = truth.sum(axis=(1, 2))
    pred = np.zeros_like(truth)
    k = int(np.argmax(areas))
    pred[k] = truth[k]
    a, t = int(areas[k]), int(areas.sum())
    assert 0 < a < t
    assert dsc(pred, truth) == pytest.approx(2 * a / (t + a), abs=1e-12)
    assert dsc(truth, truth) == 1.0


# ----------------------------------------------------------------- evaluate --pred
def test_evaluate_scores_given_masks_as_computed_by_hand(kaggle_root, val_patients_file, tmp_path):
    """The ground truth as the prediction for one patient (DSC 1, HD95 0); for the other the truth
    with its largest slice blanked (a of T voxels missed): DSC = 2 (T - a) / (2T - a)."""
    pred = tmp_path / "pred"
    for p in VAL_PATIENTS:
        (pred / p).mkdir(parents=True)
        for f in (kaggle_root / p).glob("*_mask.tif"):
            shutil.copy(f, pred / p / f.name)
    changed = VAL_PATIENTS[0]
    files = sorted((pred / changed).glob("*_mask.tif"))
    masks = [tifffile.imread(f) > 0 for f in files]
    areas = [int(m.sum()) for m in masks]
    k = int(np.argmax(areas))
    tifffile.imwrite(files[k], np.zeros_like(tifffile.imread(files[k])))
    a, t = areas[k], sum(areas)
    expected = 2 * (t - a) / (2 * t - a)
    out = tmp_path / "eval"
    res = CliRunner().invoke(main, ["evaluate", "--data", str(kaggle_root), "--pred", str(pred),
                                    "--patients-file", str(val_patients_file), "--out", str(out)])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    rows = {r["patient"]: r for r in metrics["patients"]}
    assert [r["patient"] for r in metrics["patients"]] == VAL_PATIENTS
    assert rows[changed]["dsc"] == pytest.approx(expected, abs=1e-9) and rows[changed]["hd95"] > 0
    assert rows[VAL_PATIENTS[1]]["dsc"] == 1.0 and rows[VAL_PATIENTS[1]]["hd95"] == 0.0
    assert metrics["summary"]["dsc"]["mean"] == pytest.approx((1 + expected) / 2, abs=1e-9)
    assert (out / "dsc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_reports_a_missing_prediction_in_one_line(kaggle_root, val_patients_file, tmp_path):
    (tmp_path / "pred" / VAL_PATIENTS[0]).mkdir(parents=True)
    res = CliRunner().invoke(main, ["evaluate", "--data", str(kaggle_root), "--pred", str(tmp_path / "pred"),
                                    "--patients-file", str(val_patients_file)])
    assert res.exit_code == 2
    assert "predicted mask missing" in res.output and "Traceback" not in res.output


def test_the_model_card_carries_the_preprocessing_plan(kaggle_root):
    """The plan comes from the card (size, context, constants); a stricter threshold crops a smaller box."""
    from segengine.engine.preprocessing.plan import PreprocessingPlan

    assert PreprocessingPlan.from_card({"input_size": 128, "context_slices": 1}) == PreprocessingPlan(128, 1)
    plan = PreprocessingPlan.from_card({"input_size": 64, "preprocessing": {"threshold_fraction": 0.5,
                                                                          "percentiles": [5, 95], "unknown": 1}})
    assert (plan.input_size, plan.threshold_fraction, plan.percentiles) == (64, 0.5, (5, 95))
    vol = read_patient(kaggle_root / VAL_PATIENTS[0])
    loose = preprocess_volume(vol.image, drop_ends=False, plan=PreprocessingPlan(64)).geometry
    strict = preprocess_volume(vol.image, drop_ends=False, plan=PreprocessingPlan(64, threshold_fraction=0.5)).geometry
    assert (strict.y1 - strict.y0) * (strict.x1 - strict.x0) < (loose.y1 - loose.y0) * (loose.x1 - loose.x0)
    bright = np.maximum.reduce([vol.image[..., c] for c in range(3)])
    assert strict.y0 == int(np.flatnonzero((bright >= np.ceil(bright.max() * 0.5)).any(axis=(0, 2)))[0])


@pytest.mark.parametrize("patient_index, context, expected", [
    ([0, 0, 0], 1, [[0, 0, 1], [0, 1, 2], [1, 2, 2]]),
    ([0, 0, 1, 1, 1], 1, [[0, 0, 1], [0, 1, 1], [2, 2, 3], [2, 3, 4], [3, 4, 4]]),
    ([5, 7, 7], 2, [[0, 0, 0, 0, 0], [1, 1, 1, 2, 2], [1, 1, 2, 2, 2]]),
])
def test_context_index_never_crosses_a_patient(patient_index, context, expected):
    from segengine.engine.preprocessing.preprocess import context_index

    np.testing.assert_array_equal(context_index(np.array(patient_index), context), expected)
