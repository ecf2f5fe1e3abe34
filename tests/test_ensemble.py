"""Accurate mode: fold ensembles and flip TTA behind the one Backend interface (engine/ensemble.py)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import VAL_PATIENTS, copy_model, save_random_model
from segengine.engine.inference import registry
from segengine.engine.inference.ensemble import InferencePlan, load_ensemble, load_plan
from segengine.engine.readers.registry import read_patient
from segengine.engine.core.errors import ModelError
from segengine.engine.model.spec import load_model_spec, sha256_file, shipped_model_path
from segengine.engine.inference.predict import predict_flipped, model_input
from segengine.engine.preprocessing.preprocess import preprocess_patient


@pytest.fixture(scope="module")
def two_member_ensemble(tmp_path_factory) -> Path:
    """The shipped default model and seeded random weights of its own architecture and input,
    side by side with a manifest."""
    folder = tmp_path_factory.mktemp("ensemble")
    shipped = load_model_spec(copy_model(shipped_model_path(), folder))
    save_random_model(folder, "random16", shipped.architecture, context_slices=shipped.context_slices,
                      **({"preprocessing": shipped.card["preprocessing"]} if "preprocessing" in shipped.card else {}))
    manifest = folder / "pair.ensemble.json"
    manifest.write_text(json.dumps({"name": "pair", "kind": "ensemble", "members": ["resunet16.pt", "random16.pt"]}))
    return manifest


def _grid(spec, backend_name: str, images: np.ndarray, tta: bool = False) -> np.ndarray:
    with registry.create(backend_name, spec, threads=1) as backend:
        prob = backend.predict(images)
        return (prob + predict_flipped(backend, images)) / 2 if tta else prob


@pytest.mark.parametrize("tta", [False, True])
def test_ensemble_is_the_mean_of_its_members(kaggle_root, two_member_ensemble, tta):
    """The averaging runner against each member run on its own (and mirrored by the pipeline's TTA rule)."""
    plan = load_ensemble(two_member_ensemble, tta=tta)
    vol = read_patient(kaggle_root / VAL_PATIENTS[0])
    images = model_input(preprocess_patient(vol, "native", plan.preprocessing), plan)[:12]
    members = [_grid(m, "torch", images, tta) for m in plan.members]
    assert not np.allclose(members[0], members[1], atol=1e-2)  # the two members really differ
    got = _grid(plan, "torch", images)
    np.testing.assert_allclose(got, (members[0] + members[1]) / 2, atol=1e-5)


def test_tta_alone_averages_the_mirrored_slices(kaggle_root):
    spec = load_model_spec(None)
    plan = load_plan(None, None, tta=True)
    assert isinstance(plan, InferencePlan) and plan.members[0].sha256 == spec.sha256 and plan.sha256 != spec.sha256
    vol = read_patient(kaggle_root / VAL_PATIENTS[1])
    images = model_input(preprocess_patient(vol, "native", spec.preprocessing), spec)[:8]
    np.testing.assert_allclose(_grid(plan, "torch", images), _grid(spec, "torch", images, tta=True), atol=1e-5)


def _manifest(folder: Path, body) -> Path:
    p = folder / "bad.ensemble.json"
    p.write_text(body if isinstance(body, str) else json.dumps(body))
    return p


@pytest.mark.parametrize("body, message", [
    ("{not json", "unreadable ensemble manifest"),
    ({"kind": "model", "members": ["resunet16.pt"]}, "not an ensemble manifest"),
    ({"kind": "ensemble", "members": []}, "members must be a list"),
    ({"kind": "ensemble", "members": "resunet16.pt"}, "members must be a list"),
    ({"kind": "ensemble", "members": ["../resunet16.pt"]}, "must be a .pt file name beside the manifest"),
    ({"kind": "ensemble", "members": ["missing.pt"]}, "is not a model file beside the manifest"),
    ({"kind": "ensemble", "members": [".."]}, "must be a .pt file name"),
    ({"kind": "ensemble", "members": [""]}, "must be a .pt file name"),
    ({"kind": "ensemble", "members": ["x" * 300 + ".pt"]}, "must be a .pt file name"),
    ({"kind": "ensemble", "members": ["resunet16.json"]}, "must be a .pt file name"),
    ({"kind": "ensemble", "members": ["resunet16.pt", "resunet16.pt"]}, "listed twice"),
    ({"kind": "ensemble", "name": 5, "members": ["resunet16.pt"]}, "name must be"),
    ({"kind": "ensemble", "members": ["resunet16.pt"], "review": {"modes": {"ensemble": {"coef": "x"}}}},
     "review.modes.ensemble is not a quality calibration"),
    ("[" * 100000 + "]" * 100000, "unreadable ensemble manifest"),
    ("{" + " " * (1 << 20) + "}", "is not an ensemble manifest"),
])
def test_bad_manifests_are_refused(tmp_path, body, message):
    copy_model(shipped_model_path(), tmp_path)
    with pytest.raises(ModelError, match=message):
        load_ensemble(_manifest(tmp_path, body))


def test_a_member_linked_from_outside_the_folder_is_refused(tmp_path):
    outside = copy_model(shipped_model_path(), tmp_path / "elsewhere")
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "resunet16.pt").symlink_to(outside)
    (folder / "resunet16.json").symlink_to(outside.with_suffix(".json"))
    with pytest.raises(ModelError, match="not a model file beside the manifest"):
        load_ensemble(_manifest(folder, {"kind": "ensemble", "members": ["resunet16.pt"]}))


def test_the_same_weights_twice_are_refused(tmp_path):
    copy_model(shipped_model_path(), tmp_path)
    shutil.copy(tmp_path / "resunet16.pt", tmp_path / "again.pt")
    shutil.copy(tmp_path / "resunet16.json", tmp_path / "again.json")
    with pytest.raises(ModelError, match="same weights"):
        load_ensemble(_manifest(tmp_path, {"kind": "ensemble", "members": ["resunet16.pt", "again.pt"]}))


def test_a_corrupt_member_is_refused(tmp_path):
    weights = copy_model(shipped_model_path(), tmp_path)
    with open(weights, "r+b") as fh:
        fh.seek(-8, 2)
        fh.write(b"\x00" * 8)
    with pytest.raises(ModelError, match="does not match its card"):
        load_ensemble(_manifest(tmp_path, {"kind": "ensemble", "members": [weights.name]}))


def test_members_must_see_the_same_input(tmp_path):
    shipped = load_model_spec(copy_model(shipped_model_path(), tmp_path))
    other = shipped.context_slices + 1  # the shipped model's architecture, one more neighbour each side
    save_random_model(tmp_path, "ctx", shipped.architecture | {"in_channels": 3 * (2 * other + 1)}, context_slices=other)
    with pytest.raises(ModelError, match="members differ in their preprocessing plan"):
        load_ensemble(_manifest(tmp_path, {"kind": "ensemble", "members": ["resunet16.pt", "ctx.pt"]}))


def _segengine(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "segengine.engine.cli", *args], capture_output=True, text=True)


def test_run_ensemble_tta_writes_what_produced_the_mask(kaggle_root, two_member_ensemble, tmp_path):
    out = tmp_path / "out"
    r = _segengine("run", "--patient", str(kaggle_root / VAL_PATIENTS[1]), "--out", str(out),
                   "--ensemble", str(two_member_ensemble), "--tta", "--threads", "1")
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / VAL_PATIENTS[1] / "report.json").read_text())
    folder = two_member_ensemble.parent
    assert rep["model"] == "pair+tta" and rep["plan"]["flip_tta"] is True and rep["backend"] == "torch"
    assert [m["sha256"] for m in rep["plan"]["members"]] == [sha256_file(folder / f) for f in ("resunet16.pt", "random16.pt")]
    # the written mask is the averaged prediction, post-processed as usual
    from segengine.engine.readers.registry import read_patient as read
    from segengine.engine.job.patient_job import segment

    plan = load_ensemble(two_member_ensemble, tta=True)
    with registry.create("torch", plan, threads=1) as backend:
        expected = segment(read(kaggle_root / VAL_PATIENTS[1]), backend).mask
    import tifffile

    written = np.stack([tifffile.imread(out / VAL_PATIENTS[1] / f"{VAL_PATIENTS[1]}_{n}_mask.tif") > 0
                        for n in rep["slice_numbers"]])
    assert np.array_equal(written, expected) and rep["tumor_volume_px"] == int(expected.sum())
    # a manifest without an ensemble calibration: no estimate, no flag, said in words
    assert rep["review"]["expected_dsc"] is None and rep["review"]["flag"] is None
    assert rep["review"]["note"].startswith("uncalibrated")


@pytest.mark.parametrize("command", ["run", "evaluate"])
def test_model_and_ensemble_together_are_refused(kaggle_root, two_member_ensemble, tmp_path, command):
    where = (["--patient", str(kaggle_root / VAL_PATIENTS[1]), "--out", str(tmp_path / "o")] if command == "run"
             else ["--data", str(kaggle_root), "--out", str(tmp_path / "o")])
    model = ["--model", str(shipped_model_path())] if command == "run" else ["--model"]  # evaluate: bare --model too
    r = _segengine(command, *where, *model, "--ensemble", str(two_member_ensemble))
    assert r.returncode == 2 and "not both" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_bench_counts_every_member_and_view(two_member_ensemble):
    """An accurate-mode plan costs the sum of its members' FLOPs on every view it averages."""
    from segengine.bench.bench import run_bench
    from segengine.engine.model.spec import load_torch_model
    from segengine.engine.model.network import count_flops

    plan = load_ensemble(two_member_ensemble, tta=True)
    each = [count_flops(load_torch_model(m), m.input_size) for m in plan.members]
    result = run_bench(plan, backends=("torch",), batch_sizes=(1,), threads=1, warmup=0, iterations=1,
                       reference=False, log=lambda *_: None)
    assert result["model"]["flops_per_slice"] == 2 * sum(each)  # two views (plain, mirrored) of every member
    assert [m["sha256"] for m in result["model"]["plan"]["members"]] == [m.sha256 for m in plan.members]
    assert [r["status"] for r in result["model_only"]] == ["ok"]


def test_evaluate_ensemble_scores_the_plan(kaggle_root, two_member_ensemble, val_patients_file, tmp_path):
    r = _segengine("evaluate", "--data", str(kaggle_root), "--patients-file", str(val_patients_file),
                   "--ensemble", str(two_member_ensemble), "--out", str(tmp_path / "ev"), "--threads", "1")
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["model_sha256"] == load_ensemble(two_member_ensemble).sha256
    assert [m["name"] for m in metrics["plan"]["members"]] == ["resunet16", "random16"] and not metrics["plan"]["flip_tta"]
    assert len(metrics["patients"]) == len(VAL_PATIENTS)
    r = _segengine("evaluate", "--data", str(kaggle_root), "--pred", str(tmp_path), "--tta")
    assert r.returncode == 2 and "--tta" in r.stderr and "Traceback" not in r.stderr
