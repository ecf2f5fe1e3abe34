"""The shipped model: card, checksum, accuracy on a real validation patient, validated exports."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from conftest import VAL_PATIENTS, copy_model, save_random_model, mask_agreement_with_torch
from segengine.engine.inference import registry
from segengine.engine.cli import main
from segengine.engine.model.spec import load_model_spec, sha256_file, shipped_model_path


@pytest.fixture(scope="module")
def spec():
    return load_model_spec()


def test_shipped_model_card_and_checksum(spec):
    """SHA-256, FLOPs and parameters recomputed from the weights and the network, not read back."""
    import hashlib

    from segengine.engine.model.spec import load_torch_model
    from segengine.engine.model.network import ReferenceUNet, count_flops

    card = spec.card
    assert spec.weights == shipped_model_path()
    assert hashlib.sha256(spec.weights.read_bytes()).hexdigest() == card["sha256"]
    model = load_torch_model(spec)
    flops = count_flops(model, card["input_size"])
    assert flops == card["flops_per_slice"]
    assert sum(p.numel() for p in model.parameters()) == card["params"]
    assert flops <= count_flops(ReferenceUNet(), 256) / 10  # at most 1/10 of the reference U-Net
    assert set(card["validation"]) == {"reference", "native"}
    assert spec.weights.stat().st_size < 20e6


@pytest.mark.parametrize("kind, backend, precision", [("onnx", "onnxruntime", "fp32"),
                                                      ("onnx-int8", "onnxruntime-int8", "int8"),
                                                      ("onnx-fp16", "onnxruntime-fp16", "fp16")])
def test_exports_are_current_and_agree_with_the_weights(spec, kaggle_root, kind, backend, precision):
    """Each shipped export's checksums recomputed, and its mask of a real validation patient
    compared here with the PyTorch weights' (their DSC, the verdict's "agreement", computed in
    this test) at its precision's tolerance: the sidecar's verdict is re-earned, not read back."""
    from segengine.engine.inference.verdict import tolerances_for, why_untrusted

    side = spec.sidecar(kind)
    assert side["source_sha256"] == sha256_file(spec.weights)
    assert side["sha256"] == sha256_file(spec.export_path(kind))
    assert why_untrusted(spec, backend) is None and side["validation"]["precision"] == precision
    tumor, agreement = mask_agreement_with_torch(spec, backend, kaggle_root / VAL_PATIENTS[1])
    assert tumor > 1000  # the weights find this patient's tumor
    assert agreement >= tolerances_for(precision)["min_agreement"], agreement


def test_auto_picks_a_measured_backend_and_models_fit_60_mb(spec):
    assert registry.resolve("auto", spec) in registry.AUTO_CANDIDATES  # the fastest measured here (engine/speed.py)
    all_models = [p for p in spec.weights.parent.iterdir() if p.name.startswith(spec.name)]
    assert sum(p.stat().st_size for p in all_models) < 60e6


def test_shipped_model_segments_a_validation_patient(kaggle_root, tmp_path):
    plist = tmp_path / "one.txt"
    plist.write_text(VAL_PATIENTS[1] + "\n")
    res = CliRunner().invoke(main, ["evaluate", "--model", "--data", str(kaggle_root), "--patients-file", str(plist),
                                    "--protocol", "reference", "--out", str(tmp_path / "e")])
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert result["protocol"] == "reference" and result["model_sha256"] == sha256_file(shipped_model_path())
    assert result["patients"][0]["dsc"] >= 0.8


SHIPPED = sorted(p.name for p in shipped_model_path().parent.glob("*.pt"))
ENSEMBLES = sorted(p.name for p in shipped_model_path().parent.glob("*.ensemble.json"))


@pytest.mark.parametrize("weights", SHIPPED + ENSEMBLES)
def test_every_shipped_model_verifies_and_segments(kaggle_root, tmp_path, weights):
    """Each model file in models/ (and each ensemble of them) loads with its checksum verified and
    segments a real validation patient with DSC >= 0.8 (reference protocol)."""
    from segengine.engine.inference.ensemble import load_plan, members_of

    path = shipped_model_path().parent / weights
    plan = load_plan(None, path) if weights in ENSEMBLES else load_model_spec(path)
    for member in members_of(plan):
        assert sha256_file(member.weights) == member.card["sha256"] == member.sha256
    plist = tmp_path / "one.txt"
    plist.write_text(VAL_PATIENTS[1] + "\n")
    which = ["--ensemble", str(path)] if weights in ENSEMBLES else ["--model", str(path)]
    res = CliRunner().invoke(main, ["evaluate", *which, "--data", str(kaggle_root), "--patients-file", str(plist),
                                    "--protocol", "reference", "--out", str(tmp_path / "e"), "--threads", "2"])
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert result["model_sha256"] == plan.sha256 and result["patients"][0]["dsc"] >= 0.8


def test_shipped_model_files_stay_under_60_mb():
    files = [p for p in shipped_model_path().parent.iterdir() if p.is_file() and p.suffix != ".py"]
    assert sum(p.stat().st_size for p in files) < 60e6


@pytest.mark.parametrize("backend", ["onnxruntime", "onnxruntime-int8", "onnxruntime-fp16"])
def test_validate_on_real_patients(kaggle_root, val_patients_file, tmp_path, backend):
    out = tmp_path / "v.json"
    res = CliRunner().invoke(main, ["validate", "--data", str(kaggle_root), "--patients-file", str(val_patients_file),
                                    "--backend", backend, "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "PASS" in res.output
    result = json.loads(out.read_text())
    assert [r["patient"] for r in result["patients"]] == VAL_PATIENTS
    assert result["passed"] and result["against"] == "torch"
    if backend == "onnxruntime-fp16":  # its range report covers every float node, none unsafe in fp16
        ranges = result["fp16_ranges"]
        from segengine.engine.readers.registry import read_patient
        from segengine.engine.preprocessing.preprocess import preprocess_patient

        # the slices inferred (preprocessing leaves out blank ones), as the backends saw them
        n_slices = sum(len(preprocess_patient(read_patient(kaggle_root / pid), "native", 256).images) for pid in VAL_PATIENTS)
        assert ranges["slices"] == n_slices and len(ranges["layers"]) > 60 and ranges["unsafe_in_fp16"] == []
        assert "emulated" in result["numerics"] and 0 < max(r["max_abs_delta_prob"] for r in result["patients"])


def test_validate_fails_on_a_mismatching_export(kaggle_root, val_patients_file, tmp_path):
    """An export of other weights (same architecture and input) put beside the shipped ones must FAIL (exit 1), not pass."""
    from segengine.export.onnx_export import export_onnx

    folder = copy_model(shipped_model_path(), tmp_path / "m", exports=True).parent
    shipped = load_model_spec(folder / "resunet16.pt")
    other = load_model_spec(save_random_model(tmp_path / "other", "random16", shipped.architecture,
                                              context_slices=shipped.context_slices))
    export_onnx(other, folder / "resunet16.onnx", threads=1)
    sidecar = json.loads((folder / "resunet16.onnx.json").read_text())
    sidecar["source_sha256"] = sha256_file(folder / "resunet16.pt")  # pretend it came from the shipped weights
    (folder / "resunet16.onnx.json").write_text(json.dumps(sidecar))
    plist = tmp_path / "one.txt"
    plist.write_text(VAL_PATIENTS[1] + "\n")
    res = CliRunner().invoke(main, ["validate", "--model", str(folder / "resunet16.pt"), "--data", str(kaggle_root),
                                    "--patients-file", str(plist), "--backend", "onnxruntime"])
    assert res.exit_code == 1 and "FAIL" in res.output
