"""nnU-Net in and out (issue 31): a dataset folder (imagesTs, labelsTs, dataset.json) built at test time
from real patients, segmented by `run` into nnUNetv2_predict's flat OUT/<case>.nii.gz, scored by
`evaluate --pred` into nnU-Net's summary.json, and checked against nnU-Net's own evaluator.

Also `run`'s grammar shared with evaluate/validate (--patients-file, --threshold), the hint
towards --patients, and the review page's path printed at the end.
"""
from __future__ import annotations

import json
import math
import shutil

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import TRAIN_PATIENT, VAL_PATIENTS, running_in_ci
from segengine.bench.nifti_agreement import kaggle_to_input_grid, save_nifti
from segengine.engine.cli import main
from segengine.engine.readers.registry import read_patient
from test_run import MODEL

CASES = {"lgg_001": VAL_PATIENTS[0], "lgg_002": VAL_PATIENTS[1]}  # nnU-Net case -> the real patient it is made of
CHANNELS = {"0": "T1 pre-contrast", "1": "FLAIR", "2": "T1 post-contrast"}
AXCODES = ("L", "P", "I")


def _invoke(args: list[str]):
    return CliRunner().invoke(main, args)


def _write_case(vol, images, labels, case: str) -> None:
    for c in range(3):
        data, affine = kaggle_to_input_grid(vol.image[..., c], AXCODES)
        save_nifti(data, affine, images / f"{case}_{c:04d}.nii.gz", np.int16, 3.0 + c)
    data, affine = kaggle_to_input_grid(vol.mask > 0, AXCODES)
    save_nifti(data, affine, labels / f"{case}.nii.gz", np.uint8, 1)


@pytest.fixture(scope="module")
def dataset(kaggle_root, tmp_path_factory):
    """Dataset501_LGG: two real patients as nnU-Net cases (oblique, permuted grid), labels in labelsTs."""
    root = tmp_path_factory.mktemp("nnunet") / "Dataset501_LGG"
    images, labels = root / "imagesTs", root / "labelsTs"
    images.mkdir(parents=True)
    labels.mkdir()
    for case, patient in CASES.items():
        _write_case(read_patient(kaggle_root / patient), images, labels, case)
    (root / "dataset.json").write_text(json.dumps({"channel_names": CHANNELS, "labels": {"background": 0, "tumor": 1},
                                                   "numTraining": 0, "file_ending": ".nii.gz"}))
    return root


@pytest.fixture(scope="module")
def predicted(dataset, tmp_path_factory):
    """`segengine run --patients Dataset501_LGG`: OUT as nnUNetv2_predict lays it out, plus our folders."""
    out = tmp_path_factory.mktemp("nnunet-out") / "out"
    res = _invoke(["run", "--model", str(MODEL), "--patients", str(dataset), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out, res.output


# ------------------------------------------------------------------ run: flat <case>.nii.gz
@pytest.mark.parametrize("case", sorted(CASES))
def test_run_writes_flat_case_nifti_on_the_input_grid(dataset, predicted, case):
    out, _ = predicted
    flat = nib.load(str(out / f"{case}.nii.gz"))
    source = nib.load(str(dataset / "imagesTs" / f"{case}_0001.nii.gz"))
    np.testing.assert_array_equal(flat.affine, source.affine)
    assert flat.shape == source.shape and flat.header.get_data_dtype() == np.uint8
    data = np.asarray(flat.dataobj)
    assert set(np.unique(data)) <= {0, 1} and data.sum() > 100
    # the same mask as the per-case folder's, which is kept beside it
    np.testing.assert_array_equal(data, np.asarray(nib.load(str(out / case / f"{case}_mask.nii.gz")).dataobj))
    report = json.loads((out / case / "report.json").read_text())
    assert report["nnunet_prediction"] == f"../{case}.nii.gz"
    # labelsTs/<case>.nii.gz is the ground truth: the report carries a DSC, and it is this file's
    truth = np.asarray(nib.load(str(dataset / "labelsTs" / f"{case}.nii.gz")).dataobj) > 0
    assert report["metrics"]["dsc"] == pytest.approx(2 * (truth & (data > 0)).sum() / (truth.sum() + (data > 0).sum()))
    assert report["metrics"]["dsc"] > 0.5


def test_run_lists_only_the_cases_and_prints_the_review_page(predicted):
    out, output = predicted
    assert sorted(p.name for p in out.iterdir()) == sorted([*CASES, *(f"{c}.nii.gz" for c in CASES), "index.html"])
    assert output.strip().splitlines()[-1] == f"review page: {out / 'index.html'}"


@pytest.mark.parametrize("form", ["imagesTs", "one case"])
def test_run_on_imagesTs_or_one_case_writes_the_flat_file_too(dataset, predicted, tmp_path, form):
    out, _ = predicted
    case = "lgg_002"
    arg = ["--patients", str(dataset / "imagesTs"), "--patients-file", str(tmp_path / "list.txt")] \
        if form == "imagesTs" else ["--patient", str(dataset / "imagesTs" / f"{case}_0000.nii.gz")]
    (tmp_path / "list.txt").write_text(case + "\n")
    res = _invoke(["run", "--model", str(MODEL), *arg, "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == sorted([case, f"{case}.nii.gz", "index.html"])
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "o" / f"{case}.nii.gz")).dataobj),
                                  np.asarray(nib.load(str(out / f"{case}.nii.gz")).dataobj))
    assert f"review page: {tmp_path / 'o' / 'index.html'}" in res.output


# ------------------------------------------------------------------ evaluate --pred NIfTI: summary.json
def _ours(predicted, case):
    return json.loads((predicted[0] / case / "report.json").read_text())["metrics"]["dsc"]


@pytest.mark.parametrize("data", ["dataset", "imagesTs", "labelsTs"])
def test_evaluate_nifti_predictions_writes_nnunet_summary(dataset, predicted, tmp_path, data):
    out, _ = predicted
    root = dataset if data == "dataset" else dataset / data
    res = _invoke(["evaluate", "--data", str(root), "--pred", str(out), "--out", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    assert "summary.json" in res.output
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert set(summary) == {"metric_per_case", "mean", "foreground_mean"}
    assert [c["prediction_file"] for c in summary["metric_per_case"]] == [str(out / f"{c}.nii.gz") for c in sorted(CASES)]
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    for entry, row in zip(summary["metric_per_case"], metrics["patients"]):
        case = row["patient"]
        assert entry["reference_file"] == str(dataset / "labelsTs" / f"{case}.nii.gz")
        m = entry["metrics"]["1"]
        assert set(m) == {"Dice", "IoU", "FP", "FN", "TP", "TN", "n_pred", "n_ref"}
        # independent counts from the files themselves
        pred = np.asarray(nib.load(str(out / f"{case}.nii.gz")).dataobj) == 1
        ref = np.asarray(nib.load(entry["reference_file"]).dataobj) == 1
        assert (m["TP"], m["FP"], m["FN"], m["TN"]) == ((pred & ref).sum(), (pred & ~ref).sum(), (~pred & ref).sum(),
                                                        (~pred & ~ref).sum())
        assert m["n_pred"] == pred.sum() and m["n_ref"] == ref.sum()
        assert m["Dice"] == pytest.approx(_ours(predicted, case), abs=1e-12) == pytest.approx(row["dsc"], abs=1e-12)
        assert m["IoU"] == pytest.approx(m["TP"] / (m["TP"] + m["FP"] + m["FN"]))
    dices = [c["metrics"]["1"]["Dice"] for c in summary["metric_per_case"]]
    assert summary["mean"]["1"]["Dice"] == pytest.approx(np.mean(dices)) == summary["foreground_mean"]["Dice"]


def test_nnunet_summary_follows_nnunet_on_empty_masks():
    from segengine.engine.evaluation.evaluate import nnunet_case_metrics, nnunet_summary

    empty = np.zeros((2, 3, 3), bool)
    full = empty.copy()
    full[0, 1, 1] = True
    a, b = nnunet_case_metrics(empty, empty), nnunet_case_metrics(full, full)
    assert math.isnan(a["Dice"]) and math.isnan(a["IoU"]) and a["TN"] == 18 and b["Dice"] == b["IoU"] == 1.0
    s = nnunet_summary([{"metrics": a, "prediction_file": "a", "reference_file": "ra"},
                        {"metrics": b, "prediction_file": "b", "reference_file": "rb"}])
    assert s["mean"]["1"]["Dice"] == 1.0 and s["mean"]["1"]["TN"] == (18 + 17) / 2  # NaN skipped, as np.nanmean


def _damaged_pred(out, tmp_path, how):
    pred = tmp_path / "pred"
    pred.mkdir()
    for case in CASES:
        shutil.copy(out / f"{case}.nii.gz", pred / f"{case}.nii.gz")
    img = nib.load(str(pred / "lgg_001.nii.gz"))
    if how == "missing":
        (pred / "lgg_001.nii.gz").unlink()
    elif how == "shape":
        nib.save(nib.Nifti1Image(np.zeros((5, 6, 7), np.uint8), img.affine), str(pred / "lgg_001.nii.gz"))
    elif how == "affine":
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), np.eye(4)), str(pred / "lgg_001.nii.gz"))
    elif how == "twice":
        shutil.copy(pred / "lgg_001.nii.gz", pred / "lgg_001.nii")
    return pred


@pytest.mark.parametrize("how, words", [("missing", "no prediction for case lgg_001"), ("shape", "differs from the case's"),
                                        ("affine", "affine differs from the case's"),
                                        ("twice", "a second prediction for case lgg_001")])
def test_bad_nifti_predictions_are_one_line_and_exit_2(dataset, predicted, tmp_path, how, words):
    pred = _damaged_pred(predicted[0], tmp_path, how)
    res = _invoke(["evaluate", "--data", str(dataset), "--pred", str(pred)])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and words in res.output, res.output


# ------------------------------------------------------------------ nnU-Net's own evaluator
def test_nnunet_evaluator_agrees_with_our_dice(dataset, predicted, tmp_path):
    """nnU-Net's compute_metrics_on_folder on our flat output: the Dice our reports and summary.json give."""
    try:
        from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
        from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    except ImportError as exc:
        if running_in_ci():  # CI installs the nnunet extra (.ci/setup): the comparison must run there
            pytest.fail(f"nnunetv2 not importable under CI ({exc}); install segengine[nnunet]")
        pytest.skip(f"nnunetv2 not installed ({exc}); pip install -e '.[nnunet]'")
    out, _ = predicted
    theirs = compute_metrics_on_folder(str(dataset / "labelsTs"), str(out), str(tmp_path / "theirs.json"), SimpleITKIO(),
                                       ".nii.gz", [1], num_processes=1, chill=False)
    assert _invoke(["evaluate", "--data", str(dataset), "--pred", str(out), "--out", str(tmp_path / "ev")]).exit_code == 0
    ours = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert len(theirs["metric_per_case"]) == len(CASES)
    for t, o in zip(sorted(theirs["metric_per_case"], key=lambda c: c["prediction_file"]), ours["metric_per_case"]):
        case = o["prediction_file"].rsplit("/", 1)[-1][: -len(".nii.gz")]
        assert t["prediction_file"].endswith(f"/{case}.nii.gz")
        assert float(t["metrics"][1]["Dice"]) == pytest.approx(_ours(predicted, case), abs=1e-12)
        assert {k: float(v) for k, v in t["metrics"][1].items()} == pytest.approx(o["metrics"]["1"], abs=1e-12)
    assert float(theirs["foreground_mean"]["Dice"]) == pytest.approx(ours["foreground_mean"]["Dice"], abs=1e-12)


# ------------------------------------------------------------------ run's grammar
@pytest.mark.parametrize("command", ["run", "evaluate", "validate"])
def test_patients_file_is_one_option_everywhere(command):
    from segengine.engine.cli import PATIENTS_FILE_HELP

    res = _invoke([command, "--help"])
    assert res.exit_code == 0 and "--patients-file FILE" in res.output
    if command != "validate":
        assert "--threshold" in res.output and "0.5" in res.output
    if command == "evaluate":
        assert " ".join(res.output.split()).count(" ".join(PATIENTS_FILE_HELP.split()[:4])) == 1


@pytest.mark.parametrize("args, words", [
    (["--patient", "P", "--patients-file", "L"], "use it with --patients ROOT"),
    (["--patients", "P", "--threshold", "nan-ish"], "--threshold"),
    (["--patients", "P", "--threshold", "1.5"], "--threshold"),
], ids=["patients-file-without-patients", "threshold-not-a-number", "threshold-out-of-range"])
def test_run_grammar_errors_exit_2(tmp_path, args, words):
    args = [str(tmp_path / a) if a in ("P", "L") else a for a in args]
    res = _invoke(["run", *args, "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and words in res.output, res.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("which", ["kaggle root", "nnU-Net dataset"])
def test_run_patient_given_a_folder_of_patients_suggests_patients(kaggle_root, dataset, tmp_path, which):
    folder = kaggle_root if which == "kaggle root" else dataset
    res = _invoke(["run", "--model", str(MODEL), "--patient", str(folder), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    assert f"use --patients {folder}" in res.output.replace("segment them all with ", "use ")
    assert not (tmp_path / "out").exists()


def test_run_patients_file_selects_and_threshold_reaches_the_masks(kaggle_root, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# one patient\n{TRAIN_PATIENT}\n")
    out = tmp_path / "out"
    res = _invoke(["run", "--model", str(MODEL), "--patients", str(kaggle_root), "--patients-file", str(listing),
                   "--threshold", "0.7", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == [TRAIN_PATIENT, "index.html"]
    report = json.loads((out / TRAIN_PATIENT / "report.json").read_text())
    assert report["postprocess"]["threshold"] == 0.7
    assert res.output.strip().splitlines()[-1] == f"review page: {out / 'index.html'}"


def test_run_patients_file_naming_an_absent_patient_is_one_line(kaggle_root, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("TCGA_XX_0000_20000101\n")
    res = _invoke(["run", "--model", str(MODEL), "--patients", str(kaggle_root), "--patients-file", str(listing),
                   "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "not found under" in res.output, res.output
