"""The shipped model on scanner-like intensities (issue 29): one real patient written as int16
NIfTI files, each perturbation class of bench/robustness.py at its stronger strength, DSC against
the ground truth within the issue's target (0.02) of the clean case's. The whole benchmark over
the validation ten and the CV patients is ``python -m segengine.bench.robustness``."""
from __future__ import annotations

import pytest

from segengine.bench.robustness import PERTURBATIONS, perturbed_intensities, write_case
from segengine.engine.evaluation.metrics import dsc
from segengine.engine.inference import registry
from segengine.engine.job.patient_job import segment
from segengine.engine.model.spec import load_model_spec
from segengine.engine.readers.registry import read_patient

from conftest import VAL_PATIENTS

TARGET = 0.02  # the issue's: every class within 0.02 mean DSC of the clean case


@pytest.fixture(scope="module")
def scored(lgg_root, tmp_path_factory):
    vol = read_patient(lgg_root / VAL_PATIENTS[0])
    spec = load_model_spec(None)
    tmp = tmp_path_factory.mktemp("robust")
    out = {}
    with registry.create("torch", spec, threads=2) as backend:
        for name in [None, *PERTURBATIONS]:
            strength = None if name is None else PERTURBATIONS[name][1][1]
            case = write_case(perturbed_intensities(vol.image, name, strength), tmp, name or "clean")
            out[name or "clean"] = float(dsc(segment(read_patient(case), backend).mask > 0, vol.mask > 0))
    return out


def test_shipped_model_reads_plan_v2():
    assert load_model_spec(None).preprocessing.robust


@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_each_perturbation_class_stays_within_target(scored, name):
    assert scored["clean"] > 0.8
    assert scored[name] >= scored["clean"] - TARGET, scored


def test_cases_keep_their_precision(lgg_root, tmp_path):
    """write_case stores whole numbers as they are and fractions with a header slope: FLAIR at a
    sixteenth of its scale reads back at that scale, not rounded to 16 grey levels."""
    import numpy as np

    image = read_patient(lgg_root / VAL_PATIENTS[0]).image
    clean = read_patient(write_case(perturbed_intensities(image, None, None), tmp_path, "clean")).intensities
    np.testing.assert_array_equal(np.sort(clean[..., 1].ravel()), np.sort(image[..., 1].ravel().astype(np.float32)))
    scaled = perturbed_intensities(image, "sequence_scale", 16.0)
    back = read_patient(write_case(scaled, tmp_path, "scaled")).intensities
    flair = np.sort(back[..., 1].ravel())
    assert np.unique(flair).size > 100  # 8-bit levels survive; rounding would leave 17
    np.testing.assert_allclose(flair, np.sort(scaled[..., 1].ravel()), atol=255 / 16 / 32767)
