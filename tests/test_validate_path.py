"""issue 33, item 5: `validate` judges a backend on `run`'s own path (the job's segment(), its
balanced batches, the card's post-processing), so the verdict auto trusts is about the masks run writes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from conftest import VAL_PATIENTS, copy_model
from segengine.engine.cli import main
from segengine.engine.model.spec import load_model_spec, shipped_model_path

BACKEND = "onnxruntime"
# a card rule other than the default "largest component": validate must apply it, as run does
RULE = {"rank_by": "mass", "keep_mass_ratio": 0.05, "keep_min_peak": 0.6}


@pytest.fixture(scope="module")
def ruled_model(tmp_path_factory):
    weights = copy_model(shipped_model_path(), tmp_path_factory.mktemp("ruled"), exports=True)
    if not weights.with_suffix(".onnx").exists():
        pytest.skip("the shipped model has no ONNX export here")
    card = json.loads(weights.with_suffix(".json").read_text())
    card["postprocess"] = RULE
    weights.with_suffix(".json").write_text(json.dumps(card))
    return weights


def test_validate_masks_equal_run_masks(kaggle_root, ruled_model, tmp_path, monkeypatch):
    from segengine.engine.evaluation.validate import compute
    from segengine.engine.job import patient_job

    patient = VAL_PATIENTS[1]
    batch = 8  # 20-odd slices: balanced batches of unequal sizes
    res = CliRunner().invoke(main, ["run", "--patient", str(kaggle_root / patient), "--out", str(tmp_path / "run"),
                                    "--backend", BACKEND, "--model", str(ruled_model), "--batch-size", str(batch),
                                    "--threads", "1"])
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "run" / patient
    files = sorted(run_dir.glob(f"{patient}_*_mask.tif"), key=lambda p: int(p.name.split("_")[-2]))
    run_mask = np.stack([tifffile.imread(f) > 0 for f in files])
    report = json.loads((run_dir / "report.json").read_text())

    seen = {}
    real = patient_job.segment

    def spy(volume, backend, *args, **kwargs):
        seg = real(volume, backend, *args, **kwargs)
        seen[backend.name] = seg
        return seg

    monkeypatch.setattr(patient_job, "segment", spy)
    plist = tmp_path / "one.txt"
    plist.write_text(patient + "\n")
    spec = load_model_spec(ruled_model)
    result = compute(spec, kaggle_root, str(plist), BACKEND, "torch", threads=1, batch_size=batch)
    assert set(seen) == {BACKEND, "torch"}
    assert run_mask.any() and np.array_equal(seen[BACKEND].mask, run_mask)
    assert result["path"]["batch_size"] == batch and "most probability mass" in result["path"]["postprocess"]
    assert {k: report["postprocess"][k] for k in RULE} == RULE  # run applied the same card rule
