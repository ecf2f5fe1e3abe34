"""Determinism: the same backend, model and thread count give the same masks whichever way a
patient is run (`run --patient`, `run --patients` with overlapped stages, Ray workers).

The shipped INT8 model is used because quantized models are the sensitive case: a changed
batch composition or accumulation order could move a value across a quantization step.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from conftest import VAL_PATIENTS
from segengine.engine.cli import main
from segengine.engine.model.spec import shipped_model_path

MODEL = shipped_model_path()
BACKEND = "onnxruntime-int8"


def _results(folder: Path) -> dict[str, np.ndarray]:
    """Every mask tif and the NIfTI volume of one patient's results, decoded."""
    import nibabel as nib

    out = {p.name: tifffile.imread(p) for p in sorted(folder.glob("*_mask.tif"))}
    (nii,) = folder.glob("*_mask.nii.gz")
    out[nii.name] = np.asarray(nib.load(nii).dataobj)
    return out


def _run(args: list[str]) -> None:
    res = CliRunner().invoke(main, ["run", *args, "--model", str(MODEL), "--backend", BACKEND, "--threads", "1"])
    assert res.exit_code == 0, res.output


@pytest.fixture(scope="module")
def two_patients(kaggle_root, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("det") / "root"
    root.mkdir()
    for p in VAL_PATIENTS:
        (root / p).symlink_to(kaggle_root / p, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def runs(two_patients, tmp_path_factory) -> dict[str, Path]:
    """The two patients through a local --patients run, one --patient run each, and Ray."""
    from segengine.engine.job.ray_runner import run_patients_ray

    base = tmp_path_factory.mktemp("det-out")
    _run(["--patients", str(two_patients), "--out", str(base / "patients")])
    for p in VAL_PATIENTS:
        _run(["--patient", str(two_patients / p), "--out", str(base / "single")])
    summary = run_patients_ray(two_patients, base / "ray", BACKEND, MODEL, workers=2, threads=1,
                               echo=lambda *_: None)
    assert sorted(summary.done) == sorted(VAL_PATIENTS) and not summary.failed
    return {"patients": base / "patients", "single": base / "single", "ray": base / "ray"}


@pytest.mark.parametrize("other", ["single", "ray"])
@pytest.mark.parametrize("patient", VAL_PATIENTS)
def test_int8_masks_are_identical_across_run_modes(runs, patient, other):
    ours, theirs = _results(runs["patients"] / patient), _results(runs[other] / patient)
    assert list(ours) == list(theirs) and len(ours) > 1
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=f"{patient}/{name} ({other})")
    reports = [json.loads((runs[k] / patient / "report.json").read_text()) for k in ("patients", other)]
    assert reports[0]["tumor_volume_px"] == reports[1]["tumor_volume_px"] > 0
    assert reports[0]["backend"] == reports[1]["backend"] == BACKEND
