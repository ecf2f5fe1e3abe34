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

from segengine.engine.core.errors import ModelError
from segengine.engine.model.spec import check_export, load_model_spec, sha256_file, sidecar_path
from segengine.engine.core.errors import ExportError, ExportToolMissing, ShapeMismatchError, ToleranceExceededError

from conftest import TRAIN_PATIENT as CALIBRATION_PATIENT  # in splits/train.txt
from conftest import VAL_PATIENTS
from conftest import copy_model
from segengine.engine.evaluation.validate import compute
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

    from segengine.engine.model.spec import load_torch_model
    from segengine.engine.model.network import ProbabilityModel
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
    from segengine.engine.inference.onnx_numerics import ort_run, ort_session

    spec, _ = exported
    images, expected = torch_reference
    got = ort_run(ort_session(spec.export_path("onnx"), threads=1), images[:batch])
    assert got.shape == (batch, 1, SIZE, SIZE) and got.dtype == np.float32
    assert float(np.max(np.abs(got - expected[:batch]))) <= 1e-4


def test_onnx_sidecar_figures_are_recomputed(exported):
    """Every figure the sidecar claims is recomputed here from the files, not read back."""
    import torch

    from segengine.engine.model.spec import load_torch_model
    from segengine.engine.model.network import ProbabilityModel
    from segengine.engine.inference.onnx_numerics import ort_run, ort_session
    from segengine.export.onnx_export import repeat_to, synthetic_images

    spec, side = exported
    assert side["source_sha256"] == sha256_file(spec.weights) and side["sha256"] == sha256_file(spec.export_path("onnx"))
    assert (side["precision"], side["opset"], side["input_size"]) == ("fp32", 17, SIZE)
    # the export verified on synthetic_images(8) repeated to the largest batch: same inputs, same comparison
    images = repeat_to(synthetic_images(8, SIZE), 32)
    with torch.inference_mode():
        expected = ProbabilityModel(load_torch_model(spec)).eval()(torch.from_numpy(images)).numpy()
    got = ort_run(ort_session(spec.export_path("onnx"), threads=1), images)
    ver = side["verification"]
    assert ver["images"] == "synthetic" and ver["batch_sizes"] == [1, 7, 32]
    assert float(np.max(np.abs(got - expected))) == pytest.approx(ver["max_abs_diff"], abs=2e-6)
    assert ver["max_abs_diff"] <= 1e-4
    assert check_export(spec, "onnx") == spec.export_path("onnx")


def test_onnxruntime_backend_runs_the_export(exported, torch_reference):
    from segengine.engine.inference.backends.onnxruntime_backend import OnnxRuntimeBackend

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
    from segengine.engine.core.errors import BackendUnavailable
    from segengine.engine.inference.backends.onnxruntime_backend import OnnxRuntimeBackend

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
    # each is one of the training patient's preprocessed slices (native protocol), 16 different ones
    from segengine.engine.readers.registry import read_patient
    from segengine.engine.preprocessing.preprocess import preprocess_patient

    slices = preprocess_patient(read_patient(kaggle_root / CALIBRATION_PATIENT, with_mask=False), "native", SIZE).images
    found = [[i for i, s in enumerate(slices) if np.array_equal(s, c)] for c in calib]
    assert all(len(f) == 1 for f in found) and len({f[0] for f in found}) == 16, found
    assert side["quantization"]["calibration"]["patients"] == [CALIBRATION_PATIENT]


def test_int8_export_is_qdq_and_agrees_with_fp32(int8_export):
    import onnx

    from segengine.export.onnx_export import count_ops
    from segengine.engine.inference.onnx_numerics import ort_run, ort_session

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


def test_int8_floors_are_checked_against_the_measured_figures(int8_export, tmp_path):
    """The mask DSC and mean |dP| the export measures are recomputed here from the written file;
    a mean-diff tolerance just below the measured value must then make the same export fail."""
    from segengine.export.int8 import export_int8
    from segengine.engine.inference.onnx_numerics import ort_run, ort_session

    spec, _, calib, check = int8_export
    out = tmp_path / "floor.int8.onnx"
    side = export_int8(spec, spec.export_path("onnx"), out, calib[:4], verify_images=check[:4], threads=1)
    fp32 = ort_run(ort_session(spec.export_path("onnx"), threads=1), check[:4])
    int8 = ort_run(ort_session(out, threads=1), check[:4])
    a, b = fp32 > 0.5, int8 > 0.5
    dsc = 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b)) if (a.any() or b.any()) else 1.0
    mean = float(np.mean(np.abs(fp32.astype(np.float64) - int8)))
    ver = side["verification"]
    assert ver["mask_dsc"] == pytest.approx(dsc, abs=1e-9) and dsc >= ver["tolerance"]["mask_dsc_min"]
    assert ver["mean_abs_diff"] == pytest.approx(mean, rel=1e-6) and 0 < mean <= ver["tolerance"]["mean_abs_diff"]
    out.unlink()
    with pytest.raises(ToleranceExceededError, match=r"mean abs diff .* outside the tolerance \(mean abs diff <= "):
        export_int8(spec, spec.export_path("onnx"), out, calib[:4], verify_images=check[:4],
                    mean_atol=float(np.nextafter(mean, 0.0)) * 0.999, threads=1)
    assert not out.exists()


def test_int8_refuses_a_stale_fp32_export(int8_export, model_copy, tmp_path):
    from segengine.export.int8 import export_int8

    _, _, calib, _ = int8_export
    _stale_sidecar(model_copy)
    with pytest.raises(ExportError, match="stale export"):
        export_int8(model_copy, model_copy.export_path("onnx"), tmp_path / "x.int8.onnx", calib[:2], threads=1)


# --------------------------------------------------------------------------- API
def test_export_model_skips_what_it_cannot_do(model_copy):
    from segengine.engine.inference.backends.tensorrt_backend import tensorrt_missing_reason
    from segengine.export.api import export_model

    lines = []
    res = export_model(model_copy, kinds=("onnx-int8", "tensorrt-fp16"), log=lines.append, threads=1)
    assert "onnx" not in res  # the current fp32 export is reused, not redone
    assert "train-list" in res["onnx-int8"]["skipped"]
    if tensorrt_missing_reason() is not None:
        assert res["tensorrt-fp16"]["skipped"] == tensorrt_missing_reason()
    with pytest.raises(ExportError, match="unknown export kind"):
        export_model(model_copy, kinds=("onnx-fp8",), log=None)


# --------------------------------------------------------------------------- FP16
@pytest.fixture(scope="module")
def fp16_export(exported, int8_export):
    """The float16 export of the random model, ranges measured on real training slices."""
    from segengine.export.fp16 import export_fp16

    spec, _ = exported
    _, _, calib, check = int8_export
    side = export_fp16(spec, spec.export_path("onnx"), spec.export_path("onnx-fp16"), range_images=calib[:8],
                       verify_images=check[:4], threads=1)
    return load_model_spec(spec.weights), side


def test_fp16_export_is_float16_inside_with_float32_io(fp16_export):
    import onnx

    spec, side = fp16_export
    path = check_export(spec, "onnx-fp16")
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    f32 = onnx.TensorProto.FLOAT
    assert [t.type.tensor_type.elem_type for t in [*model.graph.input, *model.graph.output]] == [f32, f32]
    weight_type = {t.name: t.data_type for t in model.graph.initializer}
    kept = set(side["conversion"]["fp32_nodes"])
    convs = [n for n in model.graph.node if n.op_type in ("Conv", "ConvTranspose")]
    assert len(convs) == 32
    # random weights leave some tiny activations (subnormal share > 1e-3): those nodes, and only those, stay float32
    assert {n.name for n in convs if weight_type[n.input[1]] == f32} == {n.name for n in convs if n.name in kept}
    assert any(weight_type[n.input[1]] == onnx.TensorProto.FLOAT16 for n in convs)
    assert set(side["ranges"]["unsafe"]) == kept and side["ranges"]["unsafe_in_fp16"] == []
    assert side["sha256"] == sha256_file(path)
    assert side["source_onnx"]["sha256"] == sha256_file(spec.export_path("onnx"))


def test_fp16_storage_emulation_rounds_every_tensor_to_float16(fp16_export, int8_export):
    """On the CPU the backend must see FP16 rounding after every node, not ORT's silent fp32."""
    import onnx

    from segengine.engine.inference.onnx_numerics import _elem_types, _with_outputs, storage_emulation
    from segengine.engine.inference.onnx_numerics import ort_session

    spec, _ = fp16_export
    _, _, _, check = int8_export
    fp16 = onnx.load(str(spec.export_path("onnx-fp16")))
    produced = {o for n in fp16.graph.node for o in n.output}
    halves = sorted(n for n, t in _elem_types(fp16).items() if t == onnx.TensorProto.FLOAT16 and n in produced)
    assert len(halves) > 40
    session = ort_session(_with_outputs(storage_emulation(fp16), halves).SerializeToString(), threads=1, level="basic")
    for name, v in zip(halves, session.run(halves, {"images": check[:1]})):
        assert v.dtype == np.float32 and np.any(v != 0), name
        np.testing.assert_array_equal(v, v.astype(np.float16).astype(np.float32), err_msg=name)


def test_fp16_range_report_is_recomputed_from_an_extracted_subgraph(exported, int8_export, tmp_path):
    import onnx.utils

    from segengine.engine.inference.onnx_numerics import FP16_MIN_NORMAL, RangeMeter
    from segengine.engine.inference.onnx_numerics import ort_session

    spec, _ = exported
    _, _, calib, _ = int8_export
    meter = RangeMeter(spec.export_path("onnx"), threads=1)
    meter.add(calib[:3])
    report = meter.report()
    for row in (report["layers"][0], report["layers"][-3]):
        node = row["node"]
        output = next(o for n, _, o in meter.nodes if n == node)
        sub = tmp_path / "sub.onnx"
        onnx.utils.extract_model(str(spec.export_path("onnx")), str(sub), ["images"], [output])
        a = np.abs(np.concatenate([ort_session(sub, threads=1).run(None, {"images": calib[i : i + 1]})[0] for i in range(3)]))
        nz = a[a > 0]
        assert row["max_abs"] == pytest.approx(float(a.max()), rel=1e-6)
        # values near 0 move with the conv algorithm (batch size, fusion): the share agrees to 1e-5, the rule is 1e-3
        assert row["subnormal_share"] == pytest.approx(float(np.mean(nz < FP16_MIN_NORMAL)), abs=1e-5)
        assert row["headroom"] == pytest.approx(65504.0 / float(a.max()), rel=1e-6)


@pytest.mark.parametrize("scale, why", [(3e4, "max"), (1e-9, "subnormal")], ids=["overflow-risk", "underflow-risk"])
def test_fp16_unsafe_node_is_found_and_kept_float32(exported, int8_export, tmp_path, scale, why):
    """A stem conv scaled to leave FP16's range is reported unsafe and stays float32 in the converted graph."""
    import onnx
    from onnx import numpy_helper

    from segengine.engine.inference.onnx_numerics import MAX_SUBNORMAL_SHARE, SAFE_MAX, RangeMeter
    from segengine.export.fp16 import convert_to_fp16

    spec, _ = exported
    _, _, calib, _ = int8_export
    model = onnx.load(str(spec.export_path("onnx")))
    stem = next(n for n in model.graph.node if n.op_type == "Conv")
    for init in model.graph.initializer:
        if init.name in stem.input[1:]:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(scale), init.name))
    path = tmp_path / "scaled.onnx"
    onnx.save(model, str(path))
    meter = RangeMeter(path, threads=1)
    meter.add(calib[:2])
    report = meter.report()
    row = next(r for r in report["layers"] if r["node"] == stem.name)
    assert not row["safe"] and stem.name in report["unsafe"]
    assert (row["max_abs"] >= SAFE_MAX) if why == "max" else (row["subnormal_share"] > MAX_SUBNORMAL_SHARE)
    assert report["unsafe_in_fp16"] == report["unsafe"]  # nothing kept yet
    converted = convert_to_fp16(model, report["unsafe"] + ["/Sigmoid"])  # also the node feeding the graph output
    weight = next(t for t in converted.graph.initializer if t.name == stem.input[1])
    assert weight.data_type == onnx.TensorProto.FLOAT
    assert [o.type.tensor_type.elem_type for o in converted.graph.output] == [onnx.TensorProto.FLOAT]
    assert meter.report(report["unsafe"])["unsafe_in_fp16"] == []


def test_onnxruntime_fp16_backend_runs_the_export_with_fp16_numerics(fp16_export, torch_reference):
    from segengine.engine.inference.backends import backend_class
    from segengine.export.fp16 import FP16_ATOL

    spec, _ = fp16_export
    images, expected = torch_reference
    cls = backend_class("onnxruntime-fp16")
    assert (cls.export_kind, cls.precision, cls.availability(spec)) == ("onnx-fp16", "fp16", None)
    with cls(spec, threads=1) as backend:
        probs = backend.predict(images[:3], batch_size=2)
        assert "emulated" in backend.numerics
    diff = np.abs(probs - expected[:3, 0])
    assert 0 < float(diff.max()) <= FP16_ATOL  # FP16 rounding moves probabilities, within the export's tolerance


# --------------------------------------------------------------------------- verdicts
@pytest.fixture(scope="module")
def onnx_verdict(exported, kaggle_root, tmp_path_factory):
    """A real verdict: ONNX Runtime fp32 vs torch on one real validation patient."""

    spec, _ = exported
    plist = tmp_path_factory.mktemp("v") / "one.txt"
    plist.write_text("TCGA_CS_6668_20011025\n")
    return compute(spec, kaggle_root, str(plist), "onnxruntime", "torch", threads=1)


def test_verdict_is_recorded_trusted_and_dropped_when_the_export_changes(model_copy, onnx_verdict):
    from segengine.engine.inference import registry
    from segengine.engine.inference.verdict import record, why_untrusted

    result = onnx_verdict
    assert result["passed"] and result["against"] == "torch" and result["export_sha256"] == sha256_file(model_copy.export_path("onnx"))
    assert "no verdict recorded" in why_untrusted(model_copy, "onnxruntime")
    record(model_copy, result)
    assert why_untrusted(model_copy, "onnxruntime") is None
    assert registry.resolve("auto", model_copy) == "onnxruntime"
    _tampered_export(model_copy)
    assert "corrupt export" in why_untrusted(model_copy, "onnxruntime")
    assert registry.resolve("auto", model_copy) == "torch"


def _against_itself(r, spec):
    r.update(against="onnxruntime")


def _for_torch(r, spec):
    r.update(backend="torch", export_kind=None)


def _other_weights(r, spec):
    r.update(model_sha256="0" * 64)


def _export_changed_since(r, spec):
    _tampered_export(spec)


def _looser_tolerance(r, spec):
    r.update(tolerances={"max_abs_delta_dsc": 0.5, "min_agreement": 0.0})


ILL_VERDICTS = [
    (_against_itself, "recorded only against torch"),
    (_for_torch, "torch is the reference"),
    (_other_weights, "not resunet16.pt"),
    (_export_changed_since, "corrupt export"),
    (_looser_tolerance, "not those of fp32"),
]


@pytest.mark.parametrize("forge, words", ILL_VERDICTS, ids=[f.__name__.strip("_") for f, _ in ILL_VERDICTS])
def test_verdicts_that_cannot_be_recorded(model_copy, onnx_verdict, forge, words):
    from segengine.engine.core.errors import VerdictError
    from segengine.engine.inference.verdict import record

    result = json.loads(json.dumps(onnx_verdict))
    forge(result, model_copy)
    before = sidecar_path(model_copy.export_path("onnx")).read_bytes()
    with pytest.raises(ModelError) as info:
        record(model_copy, result)
    assert words in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, (VerdictError, ModelError))
    assert sidecar_path(model_copy.export_path("onnx")).read_bytes() == before


@pytest.mark.parametrize("field, value, words", [
    ("against", "onnxruntime-int8", "not against torch"),  # the self-comparison, written by an old version
    ("passed", False, "FAIL"),
    ("export_sha256", "0" * 64, "another export file"),
    ("source_sha256", "0" * 64, "other weights"),
])
def test_auto_distrusts_a_forged_or_foreign_verdict(model_copy, onnx_verdict, field, value, words):
    from segengine.engine.inference import registry
    from segengine.engine.inference.verdict import record, why_untrusted
    from segengine.engine.core.atomic import write_json_atomic

    record(model_copy, onnx_verdict)
    p = sidecar_path(model_copy.export_path("onnx"))
    side = json.loads(p.read_text())
    side["validation"][field] = value
    write_json_atomic(p, side)
    assert words in why_untrusted(model_copy, "onnxruntime")
    assert registry.resolve("auto", model_copy) == "torch"


@pytest.mark.parametrize("backend, against, words", [
    ("onnxruntime", "onnxruntime", "recorded only against torch"),
    ("onnxruntime-int8", "onnxruntime", "recorded only against torch"),
    ("torch", "torch", "torch is the reference"),
    ("triton", "torch", "no export file"),
])
def test_validate_cli_refuses_an_unrecordable_comparison_before_running(model_copy, kaggle_root, val_patients_file,
                                                                       backend, against, words):
    from click.testing import CliRunner

    from segengine.engine.cli import main

    before = sidecar_path(model_copy.export_path("onnx")).read_bytes()
    res = CliRunner().invoke(main, ["validate", "--model", str(model_copy.weights), "--data", str(kaggle_root),
                                    "--patients-file", str(val_patients_file), "--backend", backend,
                                    "--against", against, "--record"])
    assert res.exit_code == 2 and words in res.output and "Traceback" not in res.output and "PASS" not in res.output
    assert sidecar_path(model_copy.export_path("onnx")).read_bytes() == before


# --------------------------------------------------------------------------- TensorRT
def test_tensorrt_absent_gives_reasons_not_import_errors(exported, tmp_path):
    from segengine.engine.inference.backends.tensorrt_backend import TensorRTBackend, tensorrt_missing_reason
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
    from segengine.engine.inference.backends.tensorrt_backend import TensorRTBackend, tensorrt_missing_reason
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


# --------------------------------------------------------------------------- TensorRT code on a fake tensorrt (CPU)
@pytest.fixture()
def fake_trt(monkeypatch):
    """A recording fake ``tensorrt`` 10 module, a pretend GPU, and host memory for the runner."""
    import fake_tensorrt

    from segengine.engine.inference.backends import tensorrt_backend

    trt = fake_tensorrt.make()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(tensorrt_backend, "cuda_missing_reason", lambda: None)
    monkeypatch.setattr(tensorrt_backend, "gpu_identity", lambda device=0: {"name": "Fake T4", "compute_capability": [7, 5]})
    monkeypatch.setattr(tensorrt_backend, "CudaBuffers", lambda device=0: fake_tensorrt.HostBuffers())
    return trt


def test_tensorrt_build_sets_fp16_profile_workspace_and_fp32_layers(exported, fake_trt, torch_reference, tmp_path):
    import onnx

    from segengine.export.tensorrt_build import build_tensorrt_engine

    spec, _ = exported
    first_conv = next(n.name for n in onnx.load(str(spec.export_path("onnx"))).graph.node if n.op_type == "Conv")
    out = tmp_path / "m.fp16.plan"
    images, _ = torch_reference
    side = build_tensorrt_engine(spec.export_path("onnx"), out, min_batch=1, opt_batch=4, max_batch=8, workspace_gb=0.5,
                                 fp32_layers=[first_conv], verify_images=images[:8])
    (network, config), = fake_trt.built
    assert network.flags == 0  # explicit batch, TensorRT 10's only mode
    assert config.flags == {"FP16", "OBEY_PRECISION_CONSTRAINTS"}
    assert config.pool_limits == {"WORKSPACE": 1 << 29}
    (profile,) = config.profiles
    assert profile.shapes == {"images": ((1, 3, SIZE, SIZE), (4, 3, SIZE, SIZE), (8, 3, SIZE, SIZE))}
    pinned = [l for l in network.layers if l.precision is not None]
    assert [(l.name, l.precision, l.output_types) for l in pinned] == [(first_conv, "DataType.FLOAT", {0: "DataType.FLOAT"})]
    assert sorted(fake_trt.executed) == [1, 4, 7]  # the plan was run at each verification batch size
    assert side["profile"] == {"input": "images", "min": [1, 3, SIZE, SIZE], "opt": [4, 3, SIZE, SIZE], "max": [8, 3, SIZE, SIZE]}
    assert side["builder"]["fp32_layers"] == [first_conv] and side["sha256"] == sha256_file(out)
    assert side["device"] == {"name": "Fake T4", "compute_capability": [7, 5]}


@pytest.mark.parametrize("fail_build, fp32_layers, error, words", [
    (True, [], ExportError, "build_serialized_network failed"),
    (False, ["/no/such/node"], ExportError, "no TensorRT layer is named after ONNX node(s) /no/such/node"),
], ids=["build-returns-none", "unknown-fp32-layer"])
def test_tensorrt_build_failures_are_typed_and_write_nothing(exported, fake_trt, tmp_path, fail_build, fp32_layers, error, words):
    from segengine.export.tensorrt_build import build_tensorrt_engine

    spec, _ = exported
    fake_trt.fail_build = fail_build
    out = tmp_path / "m.fp16.plan"
    with pytest.raises(error) as info:
        build_tensorrt_engine(spec.export_path("onnx"), out, min_batch=1, opt_batch=2, max_batch=4, fp32_layers=fp32_layers)
    assert words in str(info.value) and "\n" not in str(info.value)
    assert not out.exists() and not sidecar_path(out).exists()


@pytest.mark.parametrize("n, executed", [(19, [8, 8, 3]), (1, [2]), (8, [8])], ids=["split", "pad", "exact"])
def test_tensorrt_runner_splits_above_profile_max_and_pads_below_min(exported, fake_trt, torch_reference, n, executed):
    import json as _json

    from segengine.engine.inference.backends.tensorrt_backend import TrtPlanRunner

    spec, _ = exported
    images, expected = torch_reference
    plan = _json.dumps({"onnx": str(spec.export_path("onnx")), "input": "images", "output": "probabilities",
                        "profile": [[2, 3, SIZE, SIZE], [4, 3, SIZE, SIZE], [8, 3, SIZE, SIZE]]}).encode()
    runner = TrtPlanRunner(plan)
    probs = runner.infer(images[:n])
    assert fake_trt.executed == executed  # the fake engine refuses any batch outside 2..8
    assert probs.shape == (n, 1, SIZE, SIZE)
    np.testing.assert_allclose(probs, expected[:n], atol=1e-4)  # rows in order, padding dropped


@pytest.mark.parametrize("version, words", [("11.0.0.1", "TensorRT 11 removed BuilderFlag.FP16"),
                                            ("9.3.0", "too old"), ("10.13.3.9", None)])
def test_tensorrt_version_is_checked_at_availability_time(monkeypatch, version, words):
    import fake_tensorrt

    from segengine.engine.inference.backends import tensorrt_backend

    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt.make(version))
    monkeypatch.setattr(tensorrt_backend, "cuda_missing_reason", lambda: None)
    why = tensorrt_backend.TensorRTBackend.availability(None)
    assert (why is None) if words is None else (words in why and "\n" not in why)


# --------------------------------------------------------------------------- 2.5D: channels from the model card
CONTEXT_TRAIN = [CALIBRATION_PATIENT, "TCGA_CS_4942_19970222"]  # both in splits/train.txt
CONTEXT_KINDS = ("onnx", "onnx-int8", "onnx-fp16")


@pytest.fixture(scope="module")
def context_exports(context_model, lgg_root, tmp_path_factory):
    """The tiny 2.5D model exported as `segengine export` does: real training slices of two
    patients for verification, INT8 calibration and FP16 ranges. (spec, {kind: sidecar})."""
    from segengine.export.api import export_model

    weights = copy_model(context_model, tmp_path_factory.mktemp("ctx"))
    train_list = weights.parent / "train.txt"
    train_list.write_text("\n".join(CONTEXT_TRAIN) + "\n")
    results = export_model(load_model_spec(weights), kinds=CONTEXT_KINDS, data_root=lgg_root, train_list=train_list,
                           calibration_slices_n=24, log=None, threads=1)
    return load_model_spec(weights), results


@pytest.fixture()
def context_copy(context_exports, tmp_path):
    """A private copy of the exported 2.5D model folder, free to damage."""
    spec, _ = context_exports
    shutil.copytree(spec.weights.parent, tmp_path / "m")
    return load_model_spec(tmp_path / "m" / spec.weights.name)


def _input_dims(path: Path) -> list:
    import onnx

    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_param if d.dim_param else d.dim_value for d in dims]


def test_model_card_gives_the_channel_count(context_model, random_model):
    ctx, plain = load_model_spec(context_model), load_model_spec(random_model)
    assert (ctx.context_slices, ctx.in_channels, ctx.input_shape) == (1, 9, (9, 64, 64))
    assert ctx.in_channels == ctx.architecture["in_channels"]
    assert (plain.context_slices, plain.in_channels, plain.input_shape) == (0, 3, (3, SIZE, SIZE))


@pytest.mark.parametrize("kind", CONTEXT_KINDS)
def test_context_exports_take_the_cards_channel_count(context_exports, kind):
    from segengine.engine.inference.onnx_numerics import ort_session

    spec, results = context_exports
    path = check_export(spec, kind)
    assert _input_dims(path) == ["batch", 9, 64, 64]
    assert ort_session(path, threads=1).get_inputs()[0].shape == ["batch", 9, 64, 64]
    assert results[kind]["sha256"] == sha256_file(path) and results[kind]["input_size"] == 64


def test_context_exports_verified_and_calibrated_on_real_training_slices(context_exports):
    spec, results = context_exports
    assert results["onnx"]["input"]["shape"] == ["batch", 9, 64, 64]
    assert results["onnx"]["verification"]["images"] == "real"
    calib = results["onnx-int8"]["quantization"]["calibration"]
    assert sorted(calib["patients"]) == sorted(CONTEXT_TRAIN) and calib["context_slices"] == 1
    assert calib["num_slices"] == 24 and calib["held_out_for_verification"] > 0
    assert results["onnx-fp16"]["ranges"]["patients"] == calib["patients"]


def test_calibration_inputs_are_stacked_within_each_patient(lgg_root):
    """Every calibration input is the engine's model input of one patient (neighbours from that
    patient only, nearest slice repeated at its ends), never slices of two patients."""
    from segengine.engine.readers.registry import read_patient
    from segengine.engine.preprocessing.preprocess import preprocess_patient
    from segengine.engine.preprocessing.preprocess import stack_context
    from segengine.export.int8 import calibration_slices

    per_patient = [preprocess_patient(read_patient(lgg_root / p, with_mask=False), "native", 64).images
                   for p in sorted(CONTEXT_TRAIN)]
    total = sum(len(x) for x in per_patient)
    got, info = calibration_slices(lgg_root, CONTEXT_TRAIN, n_slices=total, size=64, context_slices=1, return_info=True)
    assert got.shape == (total, 9, 64, 64) and info["patients"] == sorted(CONTEXT_TRAIN)
    np.testing.assert_array_equal(got, np.concatenate([stack_context(x, 1) for x in per_patient]))
    seam = len(per_patient[0])  # stacking the patients' concatenation would mix them here
    assert not np.array_equal(got[seam - 1 : seam + 1], stack_context(np.concatenate(per_patient), 1)[seam - 1 : seam + 1])
    np.testing.assert_array_equal(got[:, 3:6], np.concatenate(per_patient))  # the slice itself in the middle


def _fp32_agrees(ref, got):
    assert float(np.max(np.abs(got.prob - ref.prob))) <= 1e-4


def _int8_agrees(ref, got):
    from segengine.export.int8 import MASK_DSC_MIN, MEAN_ATOL, mask_agreement

    assert float(np.mean(np.abs(got.prob - ref.prob))) <= MEAN_ATOL
    assert mask_agreement(ref.mask, got.mask)["dsc"] >= MASK_DSC_MIN


def _fp16_agrees(ref, got):
    from segengine.export.fp16 import FP16_ATOL

    assert float(np.max(np.abs(got.prob - ref.prob))) <= FP16_ATOL


@pytest.mark.parametrize("backend, agrees", [("onnxruntime", _fp32_agrees), ("onnxruntime-int8", _int8_agrees),
                                             ("onnxruntime-fp16", _fp16_agrees)], ids=["fp32", "int8", "fp16"])
def test_context_backends_agree_with_torch_on_a_real_patient(context_exports, kaggle_root, backend, agrees):
    """The whole pipeline (preprocess, 2.5D stacking, infer, map back) on a validation patient,
    each export against torch with the floors its export was verified with."""
    from segengine.engine.inference.registry import create
    from segengine.engine.readers.registry import read_patient
    from segengine.engine.job.patient_job import segment

    spec, _ = context_exports
    volume = read_patient(kaggle_root / VAL_PATIENTS[0])
    with create("torch", spec, threads=1) as reference:
        ref = segment(volume, reference, batch_size=8)
    with create(backend, spec, threads=1) as runner:
        got = segment(volume, runner, batch_size=8)
    assert got.prob.shape == ref.prob.shape == volume.mask.shape and ref.mask.any()
    agrees(ref, got)


def test_segengine_run_with_int8_on_a_context_model(context_exports, kaggle_root, tmp_path):
    import tifffile
    from click.testing import CliRunner

    from segengine.engine.inference.registry import create
    from segengine.engine.cli import main
    from segengine.engine.readers.registry import read_patient
    from segengine.engine.job.patient_job import segment
    from segengine.export.int8 import MASK_DSC_MIN, mask_agreement

    spec, _ = context_exports
    patient = kaggle_root / VAL_PATIENTS[0]
    res = CliRunner().invoke(main, ["run", "--model", str(spec.weights), "--patient", str(patient), "--out", str(tmp_path),
                                    "--backend", "onnxruntime-int8", "--threads", "1"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / VAL_PATIENTS[0] / "report.json").read_text())
    assert (report["backend"], report["model_sha256"]) == ("onnxruntime-int8", spec.sha256)
    volume = read_patient(patient)
    written = np.stack([tifffile.imread(tmp_path / VAL_PATIENTS[0] / f"{VAL_PATIENTS[0]}_{n}_mask.tif") > 0
                        for n in volume.slice_numbers])
    with create("torch", spec, threads=1) as reference:
        ref = segment(volume, reference)
    assert written.any() and mask_agreement(ref.mask, written)["dsc"] >= MASK_DSC_MIN


@pytest.mark.parametrize("backend", ["onnxruntime", "onnxruntime-int8"])
def test_segengine_validate_passes_a_context_models_exports(context_exports, kaggle_root, tmp_path, backend):
    """`segengine validate` (per-patient DSC and agreement vs torch) ships a 2.5D export as it ships today's."""
    from click.testing import CliRunner

    from segengine.engine.cli import main

    spec, _ = context_exports
    plist = tmp_path / "one.txt"
    plist.write_text(VAL_PATIENTS[0] + "\n")
    res = CliRunner().invoke(main, ["validate", "--model", str(spec.weights), "--data", str(kaggle_root), "--patients-file",
                                    str(plist), "--backend", backend, "--threads", "1", "--json", str(tmp_path / "v.json")])
    assert res.exit_code == 0 and f"PASS: {backend}" in res.output, res.output
    verdict = json.loads((tmp_path / "v.json").read_text())
    assert verdict["passed"] and verdict["export_sha256"] == sha256_file(spec.export_path(BACKEND_KINDS[backend]))


BACKEND_KINDS = {"onnxruntime": "onnx", "onnxruntime-int8": "onnx-int8"}


def _three_channel_verify(spec, out):
    from segengine.export.onnx_export import export_onnx

    export_onnx(spec, out / "x.onnx", verify_images=np.zeros((2, 3, 64, 64), np.float32), threads=1)


def _three_channel_calibration(spec, out):
    from segengine.export.int8 import export_int8

    export_int8(spec, spec.export_path("onnx"), out / "x.int8.onnx", np.zeros((2, 3, 64, 64), np.float32), threads=1)


def _three_channel_int8_verify(spec, out):
    from segengine.export.int8 import export_int8

    export_int8(spec, spec.export_path("onnx"), out / "x.int8.onnx", np.zeros((2, 9, 64, 64), np.float32),
                verify_images=np.zeros((2, 3, 64, 64), np.float32), threads=1)


def _three_channel_fp16(spec, out):
    from segengine.export.fp16 import export_fp16

    export_fp16(spec, spec.export_path("onnx"), out / "x.fp16.onnx", range_images=np.zeros((2, 3, 64, 64), np.float32),
                threads=1)


ILL_CHANNELS = [
    (_three_channel_verify, "verify_images: input shape mismatch: expected ('N', 9, 64, 64), got (2, 3, 64, 64)"),
    (_three_channel_calibration, "calibration images: input shape mismatch: expected ('N', 9, 64, 64), got (2, 3, 64, 64)"),
    (_three_channel_int8_verify, "verify_images: input shape mismatch: expected ('N', 9, 64, 64), got (2, 3, 64, 64)"),
    (_three_channel_fp16, "range images: input shape mismatch: expected ('N', 9, 64, 64), got (2, 3, 64, 64)"),
]


@pytest.mark.parametrize("export, words", ILL_CHANNELS, ids=[e.__name__.strip("_") for e, _ in ILL_CHANNELS])
def test_exports_refuse_inputs_of_another_channel_count(context_copy, tmp_path, export, words):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ShapeMismatchError) as info:
        export(context_copy, out)
    assert str(info.value) == words and "\n" not in str(info.value)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("backend, words", [
    ("onnxruntime", "ctx.onnx takes input (N, 9, 64, 64) but ctx.pt's card says (N, 3, 64, 64) (context_slices 0)"),
    ("onnxruntime-int8", "ctx.int8.onnx takes input (N, 9, 64, 64) but ctx.pt's card says (N, 3, 64, 64)"),
    ("torch", "weights do not fit architecture"),
])
def test_run_refuses_a_card_whose_context_does_not_fit_the_model(context_copy, kaggle_root, tmp_path, backend, words):
    """A card edited to another context keeps the weights' SHA-256 (exports stay 'current'):
    every backend must refuse it in one line before any patient is written."""
    from click.testing import CliRunner

    from segengine.engine.cli import main

    card_file = context_copy.weights.with_suffix(".json")
    card = json.loads(card_file.read_text())
    card["context_slices"], card["architecture"]["in_channels"] = 0, 3
    card_file.write_text(json.dumps(card))
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["run", "--model", str(context_copy.weights), "--patient",
                                    str(kaggle_root / VAL_PATIENTS[0]), "--out", str(out), "--backend", backend,
                                    "--threads", "1"])
    assert res.exit_code == 2 and words in res.output, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
    assert not out.exists() or not any(out.rglob("*_mask.tif"))


def test_triton_config_declares_the_cards_channels(context_copy, tmp_path):
    from segengine.engine.core.errors import TritonRepositoryError
    from segengine.export.triton import _onnx_io_matches, check_model_dir, write_repository

    (folder,) = write_repository(context_copy, tmp_path / "repo", kinds=("onnx",), log=None)
    cfg = check_model_dir(folder)
    assert list(cfg.input[0].dims) == [9, 64, 64] and list(cfg.output[0].dims) == [1, 64, 64]
    with pytest.raises(TritonRepositoryError, match=r"differ from the Triton config"):
        _onnx_io_matches(context_copy.export_path("onnx"), 3, 64)


def test_tensorrt_build_and_backend_take_the_channels_of_the_onnx_input(context_copy, fake_trt, tmp_path):
    from segengine.engine.inference.backends.tensorrt_backend import TensorRTBackend
    from segengine.engine.inference.onnx_numerics import ort_run, ort_session
    from segengine.export.onnx_export import synthetic_images
    from segengine.export.tensorrt_build import build_tensorrt_engine

    spec = context_copy
    images = synthetic_images(3, 64, seed=2, channels=9)
    side = build_tensorrt_engine(spec.export_path("onnx"), spec.export_path("tensorrt-fp16"), min_batch=1, opt_batch=2,
                                 max_batch=4, verify_images=images)
    (network, config), = fake_trt.built
    assert config.profiles[0].shapes == {"images": ((1, 9, 64, 64), (2, 9, 64, 64), (4, 9, 64, 64))}
    assert side["profile"]["max"] == [4, 9, 64, 64]
    with TensorRTBackend(load_model_spec(spec.weights)) as backend:
        probs = backend.predict(images, batch_size=3)
    np.testing.assert_allclose(probs, ort_run(ort_session(spec.export_path("onnx"), threads=1), images)[:, 0], atol=1e-5)
    with pytest.raises(ShapeMismatchError, match=r"expected \('N', 9, 64, 64\), got \(3, 3, 64, 64\)"):
        build_tensorrt_engine(spec.export_path("onnx"), tmp_path / "x.plan", verify_images=images[:, :3])
    onnx_side = sidecar_path(spec.export_path("onnx"))
    forged = json.loads(onnx_side.read_text())
    forged["input"]["shape"] = ["batch", 3, 64, 64]
    onnx_side.write_text(json.dumps(forged))
    with pytest.raises(ExportError, match=r"input dims \[9, 64, 64\] differ from its sidecar's \[3, 64, 64\]"):
        build_tensorrt_engine(spec.export_path("onnx"), tmp_path / "x.plan")
    assert not (tmp_path / "x.plan").exists()
