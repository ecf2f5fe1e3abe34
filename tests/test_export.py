"""Exports: fp32 ONNX (checked, folded, verified vs PyTorch), static INT8 QDQ, TensorRT FP16 (GPU only).

Every test works on a temporary copy of a model with seeded random weights (conftest's
``random_model``): the mechanics of export do not depend on what the weights learned.
"""
from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from segengine.engine.model import ModelError, check_export, load_model_spec, sha256_file, sidecar_path
from segengine.export.errors import ExportError, ExportToolMissing, ShapeMismatchError, ToleranceExceededError

from conftest import TRAIN_PATIENT as CALIBRATION_PATIENT  # in splits/train.txt
from conftest import copy_model
SIZE = 256


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Keep the suite light: one intra-op thread for torch (ORT sessions get threads=1)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, random_model):
    """A dev-model copy with its fp32 ONNX export (made once): (spec, sidecar)."""
    from segengine.export.onnx_export import export_onnx

    weights = copy_model(random_model, tmp_path_factory.mktemp("model"))
    spec = load_model_spec(weights)
    side = export_onnx(spec, spec.export_path("onnx"), opset=17, threads=1)
    return load_model_spec(weights), side


@pytest.fixture()
def model_copy(exported, tmp_path):
    """A private copy of the exported model folder, free to damage."""
    spec, _ = exported
    dst = tmp_path / "m"
    shutil.copytree(spec.weights.parent, dst)
    return load_model_spec(dst / spec.weights.name)


@pytest.fixture(scope="module")
def torch_reference(exported):
    """PyTorch probabilities on a deterministic synthetic batch of 32 (the export's source of truth)."""
    import torch

    from segengine.engine.model import load_torch_model
    from segengine.engine.network import ProbabilityModel
    from segengine.export.onnx_export import repeat_to, synthetic_images

    spec, _ = exported
    images = repeat_to(synthetic_images(8, SIZE, seed=1), 32)
    with torch.inference_mode():
        probs = ProbabilityModel(load_torch_model(spec)).eval()(torch.from_numpy(images)).numpy()
    return images, probs


# --------------------------------------------------------------------------- fp32 ONNX
def test_onnx_passes_checker_has_dynamic_batch_and_no_batchnorm(exported):
    import onnx

    spec, _ = exported
    model = onnx.load(str(spec.export_path("onnx")))
    onnx.checker.check_model(model, full_check=True)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, out.name) == ("images", "probabilities")
    in_dims = inp.type.tensor_type.shape.dim
    out_dims = out.type.tensor_type.shape.dim
    assert in_dims[0].dim_param == "batch" and not in_dims[0].HasField("dim_value")
    assert out_dims[0].dim_param == "batch"
    assert [d.dim_value for d in in_dims[1:]] == [3, SIZE, SIZE]
    assert [d.dim_value for d in out_dims[1:]] == [1, SIZE, SIZE]
    ops = {n.op_type for n in model.graph.node}
    assert "BatchNormalization" not in ops and "Sigmoid" in ops
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 17)}


@pytest.mark.parametrize("batch", [1, 7, 32])
def test_onnx_matches_torch_at_batch_size(exported, torch_reference, batch):
    from segengine.export.onnx_export import ort_run, ort_session

    spec, _ = exported
    images, expected = torch_reference
    got = ort_run(ort_session(spec.export_path("onnx"), threads=1), images[:batch])
    assert got.shape == (batch, 1, SIZE, SIZE) and got.dtype == np.float32
    assert float(np.max(np.abs(got - expected[:batch]))) <= 1e-4


def test_onnx_sidecar_names_its_source_and_verification(exported):
    spec, side = exported
    assert side == spec.sidecar("onnx")
    assert side["source_sha256"] == spec.sha256 == spec.card["sha256"]
    assert side["sha256"] == sha256_file(spec.export_path("onnx"))
    assert (side["precision"], side["opset"], side["input_size"]) == ("fp32", 17, SIZE)
    assert "TorchScript" in side["exporter"]
    assert {"torch", "onnx", "onnxruntime"} <= set(side["versions"])
    ver = side["verification"]
    assert ver["batch_sizes"] == [1, 7, 32] and 0 <= ver["max_abs_diff"] <= ver["tolerance"] == 1e-4
    assert check_export(spec, "onnx") == spec.export_path("onnx")


def test_onnxruntime_backend_runs_the_export(exported, torch_reference):
    from segengine.engine.backends.onnxruntime_backend import OnnxRuntimeBackend

    spec, _ = exported
    images, expected = torch_reference
    assert OnnxRuntimeBackend.availability(spec) is None
    with OnnxRuntimeBackend(spec, threads=1) as backend:
        probs = backend.predict(images[:5], batch_size=2)
    assert probs.shape == (5, SIZE, SIZE)
    np.testing.assert_allclose(probs, expected[:5, 0], atol=1e-4)


# --------------------------------------------------------------------------- stale / corrupt exports
def _stale_sidecar(spec):
    p = sidecar_path(spec.export_path("onnx"))
    side = json.loads(p.read_text())
    side["source_sha256"] = "0" * 64
    p.write_text(json.dumps(side))


def _tampered_export(spec):
    with open(spec.export_path("onnx"), "ab") as fh:
        fh.write(b"\0")


def _missing_sidecar(spec):
    sidecar_path(spec.export_path("onnx")).unlink()


def _missing_export(spec):
    spec.export_path("onnx").unlink()


ILL_EXPORTS = [
    (_stale_sidecar, "stale export"),
    (_tampered_export, "corrupt export"),
    (_missing_sidecar, "no sidecar"),
    (_missing_export, "no onnx export"),
]


@pytest.mark.parametrize("damage, words", ILL_EXPORTS, ids=[d.__name__.strip("_") for d, _ in ILL_EXPORTS])
def test_ill_exports_are_refused_in_one_line(model_copy, damage, words):
    from segengine.engine.backends.base import BackendUnavailable
    from segengine.engine.backends.onnxruntime_backend import OnnxRuntimeBackend

    check_export(model_copy, "onnx")
    damage(model_copy)
    with pytest.raises(ModelError) as info:
        check_export(model_copy, "onnx")
    assert words in str(info.value) and "\n" not in str(info.value)
    with pytest.raises((ModelError, BackendUnavailable)):
        OnnxRuntimeBackend(model_copy, threads=1).load()


# --------------------------------------------------------------------------- typed errors
def _shape(cmp):
    cmp(np.zeros((2, 1, 4, 4), np.float32), np.zeros((2, 1, 4, 5), np.float32), 1e-4, "ONNX vs PyTorch")


def _tolerance(cmp):
    cmp(np.zeros((2, 1, 4, 4), np.float32), np.full((2, 1, 4, 4), 1e-3, np.float32), 1e-4, "ONNX vs PyTorch")


def _zero_atol(cmp):
    a = np.linspace(0, 1, 32, dtype=np.float32)
    cmp(a, np.nextafter(a, np.float32(2)), 0.0, "ONNX vs PyTorch")


def _nan(cmp):
    cmp(np.zeros(3, np.float32), np.array([0, np.nan, 0], np.float32), 1.0, "ONNX vs PyTorch")


ILL_COMPARISONS = [
    (_shape, ShapeMismatchError, "expected (2, 1, 4, 4), got (2, 1, 4, 5)"),
    (_tolerance, ToleranceExceededError, "max abs diff 0.001 is outside the tolerance (max abs diff <= 0.0001)"),
    (_zero_atol, ToleranceExceededError, "(max abs diff <= 0)"),
    (_nan, ToleranceExceededError, "max abs diff inf"),
]


@pytest.mark.parametrize("case, error, words", ILL_COMPARISONS, ids=[c.__name__.strip("_") for c, _, _ in ILL_COMPARISONS])
def test_verification_raises_typed_one_line_errors(case, error, words):
    from segengine.export.onnx_export import compare_outputs

    with pytest.raises(error) as info:
        case(compare_outputs)
    msg = str(info.value)
    assert isinstance(info.value, ExportError) and words in msg and "\n" not in msg


def test_perturbed_export_raises_tolerance_error_and_writes_nothing(model_copy, monkeypatch):
    """Weights changed between export and verification (a broken exporter) must not pass."""
    import onnx
    from onnx import numpy_helper

    from segengine.export import onnx_export

    real_fold = onnx_export._ort_fold

    def fold_and_perturb(src, dst):
        real_fold(src, dst)
        model = onnx.load(str(dst))
        stem_weight = next(n for n in model.graph.node if n.op_type == "Conv").input[1]
        init = next(t for t in model.graph.initializer if t.name == stem_weight)
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
        onnx.save(model, str(dst))

    monkeypatch.setattr(onnx_export, "_ort_fold", fold_and_perturb)
    out = model_copy.weights.with_name("perturbed.onnx")
    with pytest.raises(ToleranceExceededError) as info:
        onnx_export.export_onnx(model_copy, out, batch_sizes=(1,), threads=1)
    assert "ONNX vs PyTorch at batch 1" in str(info.value)
    assert not out.exists() and not sidecar_path(out).exists()
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_verify_images_of_the_wrong_shape_are_refused(model_copy):
    from segengine.export.onnx_export import export_onnx

    with pytest.raises(ShapeMismatchError, match=r"expected \('N', 3, 256, 256\), got \(4, 3, 128, 128\)"):
        export_onnx(model_copy, model_copy.weights.with_name("x.onnx"), verify_images=np.zeros((4, 3, 128, 128), np.float32))


def test_dynamo_exporter_without_onnxscript_is_a_typed_error(model_copy):
    import importlib.util

    from segengine.export.onnx_export import export_onnx

    if importlib.util.find_spec("onnxscript") is not None:
        pytest.skip("onnxscript is installed here")
    out = model_copy.weights.with_name("dynamo.onnx")
    with pytest.raises(ExportToolMissing, match="needs onnxscript"):
        export_onnx(model_copy, out, exporter="dynamo", threads=1)
    assert not out.exists()


# --------------------------------------------------------------------------- INT8
def test_calibration_refuses_reference_validation_patients(tmp_path):
    from segengine.export.int8 import calibration_slices

    lst = tmp_path / "train.txt"
    lst.write_text(f"{CALIBRATION_PATIENT}\nTCGA_HT_7616_19940813\n")
    with pytest.raises(ExportError, match="reference-validation patient"):
        calibration_slices(tmp_path, lst, n_slices=4)
    with pytest.raises(ExportError, match="none of the 1 listed training patients"):
        calibration_slices(tmp_path, [CALIBRATION_PATIENT], n_slices=4)


@pytest.fixture(scope="module")
def int8_export(exported, kaggle_root):
    from segengine.export.int8 import calibration_slices, export_int8

    spec, _ = exported
    calib, info = calibration_slices(kaggle_root, [CALIBRATION_PATIENT], n_slices=16, seed=0, return_info=True)
    check = calibration_slices(kaggle_root, [CALIBRATION_PATIENT], n_slices=8, seed=1)
    side = export_int8(spec, spec.export_path("onnx"), spec.export_path("onnx-int8"), calib, verify_images=check,
                       calibration_info=info, threads=1)
    return load_model_spec(spec.weights), side, calib, check


def test_calibration_slices_are_deterministic_training_slices(kaggle_root, int8_export):
    from segengine.export.int8 import calibration_slices

    _, side, calib, _ = int8_export
    assert calib.shape == (16, 3, SIZE, SIZE) and calib.dtype == np.float32
    again = calibration_slices(kaggle_root, [CALIBRATION_PATIENT], n_slices=16, seed=0)
    np.testing.assert_array_equal(again, calib)
    assert side["quantization"]["calibration"]["patients"] == [CALIBRATION_PATIENT]


def test_int8_export_is_qdq_and_agrees_with_fp32(int8_export):
    import onnx

    from segengine.export.onnx_export import count_ops, ort_run, ort_session

    spec, side, _, check = int8_export
    path = check_export(spec, "onnx-int8")
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    ops = count_ops(model)
    assert ops.get("QuantizeLinear", 0) > 10 and ops.get("DequantizeLinear", 0) > 10
    q = side["quantization"]
    assert (q["format"], q["activation_type"], q["weight_type"], q["per_channel"], q["reduce_range"]) == \
        ("QDQ", "QUInt8", "QInt8", True, True)
    assert (side["precision"], side["source_sha256"], side["input_size"]) == ("int8", spec.sha256, SIZE)
    ver = side["verification"]
    assert ver["mask_dsc"] >= ver["tolerance"]["mask_dsc_min"] == 0.98
    fp32 = ort_run(ort_session(spec.export_path("onnx"), threads=1), check)
    int8 = ort_run(ort_session(path, threads=1), check)
    assert float(np.max(np.abs(int8 - fp32))) == pytest.approx(ver["max_abs_diff"], abs=1e-6)
    assert float(np.mean(np.abs(int8 - fp32))) <= 0.01 and ver["max_abs_diff"] < 0.1


def test_int8_mask_agreement_below_the_floor_raises(int8_export, tmp_path):
    from segengine.export.int8 import export_int8

    spec, _, calib, check = int8_export
    out = tmp_path / "strict.int8.onnx"
    with pytest.raises(ToleranceExceededError, match=r"mask DSC at 0.5 .* outside the tolerance \(mask DSC at 0.5 >= 1.01\)"):
        export_int8(spec, spec.export_path("onnx"), out, calib[:4], verify_images=check[:2], dsc_min=1.01, threads=1)
    assert not out.exists()


def test_int8_refuses_a_stale_fp32_export(int8_export, model_copy, tmp_path):
    from segengine.export.int8 import export_int8

    _, _, calib, _ = int8_export
    _stale_sidecar(model_copy)
    with pytest.raises(ExportError, match="stale export"):
        export_int8(model_copy, model_copy.export_path("onnx"), tmp_path / "x.int8.onnx", calib[:2], threads=1)


# --------------------------------------------------------------------------- API
def test_export_model_skips_what_it_cannot_do_and_records_validation(model_copy):
    from segengine.engine.backends import validated
    from segengine.engine.backends.tensorrt_backend import tensorrt_missing_reason
    from segengine.export.api import export_model, update_validation

    lines = []
    res = export_model(model_copy, kinds=("onnx-int8", "tensorrt-fp16"), log=lines.append, threads=1)
    assert "onnx" not in res  # the current fp32 export is reused, not redone
    assert "train-list" in res["onnx-int8"]["skipped"]
    if tensorrt_missing_reason() is not None:
        assert res["tensorrt-fp16"]["skipped"]
    with pytest.raises(ExportError, match="unknown export kind"):
        export_model(model_copy, kinds=("onnx-fp8",), log=None)

    assert not validated(model_copy, "onnxruntime")
    side = update_validation(model_copy, "onnx", {"passed": True, "patients_count": 2, "means": {"dsc": 0.9}})
    assert side["validation"]["passed"] is True and model_copy.sidecar("onnx")["validation"]["source_sha256"] == model_copy.sha256
    assert validated(model_copy, "onnxruntime")
    _tampered_export(model_copy)
    with pytest.raises(ModelError):
        update_validation(model_copy, "onnx", {"passed": True})


# --------------------------------------------------------------------------- TensorRT
def test_tensorrt_absent_gives_reasons_not_import_errors(exported, tmp_path):
    from segengine.engine.backends.tensorrt_backend import TensorRTBackend, tensorrt_missing_reason
    from segengine.export.tensorrt_build import build_tensorrt_engine

    if tensorrt_missing_reason() is None:
        pytest.skip("TensorRT and a CUDA GPU are present here")
    spec, _ = exported
    why = TensorRTBackend.availability(spec)
    assert isinstance(why, str) and why and "\n" not in why
    assert (TensorRTBackend.name, TensorRTBackend.export_kind, TensorRTBackend.precision) == ("tensorrt", "tensorrt-fp16", "fp16")
    with pytest.raises(ExportToolMissing) as info:
        build_tensorrt_engine(spec.export_path("onnx"), tmp_path / "x.fp16.plan")
    assert "\n" not in str(info.value) and not (tmp_path / "x.fp16.plan").exists()


def test_tensorrt_11_is_refused_with_the_reason(monkeypatch):
    from segengine.export.tensorrt_build import _import_tensorrt

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="11.0.0.1"))
    with pytest.raises(ExportToolMissing, match="TensorRT 11 removed BuilderFlag.FP16"):
        _import_tensorrt()


@pytest.mark.gpu
def test_tensorrt_fp16_engine_matches_onnx(model_copy, torch_reference):
    from segengine.engine.backends.tensorrt_backend import TensorRTBackend, tensorrt_missing_reason
    from segengine.export.tensorrt_build import build_tensorrt_engine

    why = tensorrt_missing_reason()
    if why:
        pytest.skip(why)
    images, expected = torch_reference
    side = build_tensorrt_engine(model_copy.export_path("onnx"), model_copy.export_path("tensorrt-fp16"),
                                 min_batch=1, opt_batch=4, max_batch=8, workspace_gb=1, verify_images=images[:8])
    assert (side["precision"], side["source_sha256"]) == ("fp16", model_copy.sha256)
    spec = load_model_spec(model_copy.weights)
    assert TensorRTBackend.availability(spec) is None
    with TensorRTBackend(spec) as backend:
        probs = backend.infer(images[:19])  # above the profile max: split into 8 + 8 + 3
    assert probs.shape == (19, SIZE, SIZE)
    assert float(np.max(np.abs(probs - expected[:19, 0]))) <= 2e-2
