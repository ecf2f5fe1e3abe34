"""ONNX fp32 -> static INT8 (QDQ) for the ONNX Runtime CPU provider, calibrated on training slices.

Settings (ONNX Runtime's advice for x86 CPUs without VNNI, like this AVX2 machine):
QDQ format, activations QUInt8, weights QInt8 per channel with ``reduce_range=True``
(7-bit weights, so u8 x s8 products cannot saturate the 16-bit intermediate of the
AVX2 kernels), MinMax calibration over real training slices. Calibration slices come
from ``calibration_slices``, which refuses any patient of the reference validation split and
builds each patient's slices as the engine's model input (2.5D neighbours from that patient only).
The result is checked against the fp32 ONNX model: max abs diff is reported, and the
mask agreement (DSC of the two masks at threshold 0.5) must be >= 0.98.
"""
from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from segengine.engine.core.atomic import atomic_file, now_iso, temp_path_beside
from segengine.engine.core.errors import ExportError, ToleranceExceededError
from segengine.engine.inference.onnx_numerics import INPUT_NAME, ort_run, ort_session
from segengine.engine.model.spec import ModelSpec, sha256_file
from segengine.export.onnx_export import (check_images, compare_outputs, count_ops, set_metadata, sidecar_identity,
                                          tool_versions, write_sidecar)

# The 10 patients of the reference program's validation split (random.seed(42) sample of the
# 110 Kaggle patients; shared/data/lgg/splits/reference_validation.txt). Never calibrate on them:
# the validation DSC is reported on exactly these.
REFERENCE_VALIDATION_PATIENTS = frozenset({
    "TCGA_HT_7616_19940813", "TCGA_CS_6668_20011025", "TCGA_CS_4944_20010208", "TCGA_HT_7879_19981009",
    "TCGA_DU_7014_19860618", "TCGA_DU_6408_19860521", "TCGA_DU_6404_19850629", "TCGA_DU_5851_19950428",
    "TCGA_CS_6667_20011105", "TCGA_HT_7692_19960724",
})
MASK_DSC_MIN = 0.98
MEAN_ATOL = 0.01  # mean abs diff of probabilities vs fp32; the max is reported (single pixels may move more)
THRESHOLD = 0.5
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")


# --------------------------------------------------------------------------- calibration data
if TYPE_CHECKING:
    from segengine.engine.preprocessing.plan import PreprocessingPlan

def reference_validation_ids(train_list: str | os.PathLike | None = None) -> set[str]:
    """The reference validation patients: the built-in list, plus any list file found beside
    ``train_list`` or in ``../shared/data/lgg/splits`` of the repository."""
    from segengine.engine.readers.volume import read_patient_list

    ids = set(REFERENCE_VALIDATION_PATIENTS)
    candidates = [Path(__file__).resolve().parents[2] / "shared" / "data" / "lgg" / "splits" / "reference_validation.txt"]
    if train_list is not None:
        candidates.insert(0, Path(train_list).parent / "reference_validation.txt")
    for path in candidates:
        if path.is_file():
            ids.update(read_patient_list(path))
    return ids


def _resolve_root(data_root: Path, ids: Sequence[str]) -> Path:
    """Accept the dataset root or the folder holding ``kaggle_3m``."""
    if not any((data_root / p).is_dir() for p in ids) and (data_root / "kaggle_3m").is_dir():
        return data_root / "kaggle_3m"
    return data_root


def calibration_slices(
    data_root: str | os.PathLike,
    train_list: str | os.PathLike | Iterable[str],
    n_slices: int = 300,
    seed: int = 0,
    size: "int | PreprocessingPlan" = 256,
    *,
    context_slices: int = 0,
    exclude: Iterable[str] | None = None,
    return_info: bool = False,
):
    """``n_slices`` training model inputs (n, C, size, size) float32, sampled deterministically.

    ``size`` is the model's preprocessing plan (a bare grid size: plan v1 at that size), so a
    plan v2 model is calibrated on the inputs it will see.

    ``train_list`` is a patient-list file (one id a line) or a sequence of ids. Patients are
    read with ``read_patient`` and preprocessed as the engine runs them (native protocol,
    every slice); with ``context_slices`` K > 0 each patient's slices are stacked with their
    K neighbours on each side (``preprocess.stack_context``, what ``inference.predict.model_input``
    feeds a 2.5D model: C = 3 * (2K + 1)) before slices are sampled, so no input mixes patients.
    Raises ExportError when the list contains a reference-validation patient (or one of
    ``exclude``), or when no listed patient is found. With ``return_info`` returns
    ``(images, info)`` (patients used, skipped, seed).
    """
    from segengine.engine.core.errors import DataError, EmptyVolumeError
    from segengine.engine.preprocessing.preprocess import preprocess_patient, stack_context
    from segengine.engine.readers.registry import read_patient
    from segengine.engine.readers.volume import read_patient_list

    if n_slices < 1:
        raise ExportError(f"need at least 1 calibration slice, got {n_slices}")
    list_path = None
    if isinstance(train_list, (str, os.PathLike)):
        list_path = Path(train_list)
        ids = read_patient_list(list_path)
    else:
        ids = [str(p) for p in train_list]
    if not ids:
        raise ExportError(f"{list_path or 'train list'}: no patients listed")
    forbidden = reference_validation_ids(list_path) | set(exclude or ())
    leaked = sorted(set(ids) & forbidden)
    if leaked:
        raise ExportError(f"{list_path or 'train list'}: lists {len(leaked)} reference-validation patient(s) "
                          f"({', '.join(leaked[:3])}{', ...' if len(leaked) > 3 else ''}); calibrate on training patients only")
    root = _resolve_root(Path(data_root), ids)
    present = sorted(p for p in set(ids) if (root / p).is_dir())
    missing = sorted(set(ids) - set(present))
    if not present:
        raise ExportError(f"{root}: none of the {len(ids)} listed training patients is there (expected {root / ids[0]})")

    rng = np.random.default_rng(seed)
    if n_slices < len(present):  # fewer slices than patients: one slice each from a sample of patients
        chosen = sorted(present[i] for i in rng.choice(len(present), n_slices, replace=False))
        quota = 1
    else:
        chosen = present
        quota = math.ceil(1.5 * n_slices / len(present))  # headroom for short volumes, trimmed below
    parts, used, skipped = [], [], {}
    for pid in chosen:
        try:
            vol = read_patient(root / pid, with_mask=False)
            pre = preprocess_patient(vol, "native", size)
        except (DataError, EmptyVolumeError) as exc:
            skipped[pid] = str(exc)
            continue
        k = min(quota, len(pre.images))
        idx = np.sort(rng.choice(len(pre.images), k, replace=False))
        parts.append(stack_context(pre.images, context_slices)[idx])
        used.append(pid)
    if not parts:
        raise ExportError(f"{root}: no listed training patient could be read ({next(iter(skipped.values()))})")
    images = np.concatenate(parts)
    if len(images) > n_slices:
        images = images[np.sort(rng.choice(len(images), n_slices, replace=False))]
    images = np.ascontiguousarray(images, dtype=np.float32)
    if not return_info:
        return images
    info = {"num_slices": int(len(images)), "requested": int(n_slices), "seed": int(seed), "patients": used,
            "num_patients": len(used), "missing": missing, "skipped": skipped, "protocol": "native (drop_ends=False)",
            "context_slices": int(context_slices)}
    return images, info


def _data_reader(images: np.ndarray, batch_size: int):
    from onnxruntime.quantization import CalibrationDataReader

    class SliceBatches(CalibrationDataReader):
        """Calibration batches of (b, C, S, S) model inputs for the ``images`` input."""

        def __init__(self):
            self.starts = list(range(0, len(images), batch_size))
            self.pos = 0

        def get_next(self):
            if self.pos >= len(self.starts):
                return None
            s = self.starts[self.pos]
            self.pos += 1
            return {INPUT_NAME: np.ascontiguousarray(images[s : s + batch_size], dtype=np.float32)}

        def rewind(self):
            self.pos = 0

        def __len__(self):
            return len(self.starts)

        def set_range(self, start_index: int, end_index: int):
            self.starts = list(range(0, len(images), batch_size))[start_index:end_index]
            self.pos = 0

    return SliceBatches()


@contextlib.contextmanager
def _calibration_threads(threads: int | None):
    """quantize_static builds its calibration session without thread settings; cap them."""
    if not threads:
        yield
        return
    import onnxruntime
    from onnxruntime.quantization import calibrate

    original = calibrate.CalibraterBase.create_inference_session

    def create_inference_session(self):
        opts = onnxruntime.SessionOptions()
        opts.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
        self.infer_session = onnxruntime.InferenceSession(self.augmented_model_path, sess_options=opts,
                                                          providers=self.execution_providers)

    calibrate.CalibraterBase.create_inference_session = create_inference_session
    try:
        yield
    finally:
        calibrate.CalibraterBase.create_inference_session = original


# --------------------------------------------------------------------------- agreement
def mask_agreement(reference: np.ndarray, other: np.ndarray, threshold: float = THRESHOLD) -> dict[str, float]:
    """DSC and pixel agreement of the two masks at ``threshold`` (pooled over all slices)."""
    a = np.asarray(reference) > threshold
    b = np.asarray(other) > threshold
    inter = int(np.logical_and(a, b).sum())
    total = int(a.sum()) + int(b.sum())
    dsc = 1.0 if total == 0 else 2.0 * inter / total
    return {"dsc": float(dsc), "pixel_agreement": float(np.mean(a == b)) if a.size else 1.0,
            "positive_pixels_reference": int(a.sum()), "positive_pixels_other": int(b.sum())}


def head_nodes(proto) -> list[str]:
    """Names of the output head kept in float: from the graph output back through
    Sigmoid / Resize to the first Conv (1 channel, a negligible share of the cost; keeping it
    float avoids rounding the logits and probabilities near the 0.5 threshold to 8 bits)."""
    producers = {out: node for node in proto.graph.node for out in node.output}
    names: list[str] = []
    node = producers.get(proto.graph.output[0].name)
    while node is not None and node.op_type in ("Sigmoid", "Resize", "Conv"):
        if node.name:
            names.append(node.name)
        if node.op_type == "Conv":
            break
        node = producers.get(node.input[0])
    return names


def _pick(images: np.ndarray, n: int) -> np.ndarray:
    if len(images) <= n:
        return images
    return images[np.linspace(0, len(images) - 1, n).round().astype(int)]


# --------------------------------------------------------------------------- the export
def export_int8(
    spec: ModelSpec,
    onnx_fp32_path: str | os.PathLike,
    out_path: str | os.PathLike | None,
    calibration_images: np.ndarray,
    *,
    batch_size: int = 8,
    calibrate_method: str = "minmax",
    per_channel: bool = True,
    reduce_range: bool = True,
    preprocess: bool = False,
    float_head: bool = True,
    verify_images: np.ndarray | None = None,
    n_verify: int = 32,
    dsc_min: float = MASK_DSC_MIN,
    mean_atol: float = MEAN_ATOL,
    atol: float | None = None,
    calibration_info: dict[str, Any] | None = None,
    threads: int | None = None,
    log=None,
) -> dict[str, Any]:
    """Quantize the fp32 ONNX model statically to INT8 (QDQ); returns the sidecar.

    ``calibration_images``: (n, C, S, S) float32 training model inputs (``calibration_slices``),
    fed in batches of ``batch_size``. ``verify_images`` (default: ``n_verify`` of the
    calibration slices) are run through both models: the mean abs diff must be <= ``mean_atol``
    and the mask DSC at 0.5 >= ``dsc_min``, else ToleranceExceededError; the max abs diff is
    reported (and enforced only when ``atol`` is given). ``quant_pre_process`` (``preprocess``)
    is off by default: the fp32 export is already folded and fully shape-annotated, and it
    made no difference to the quantized graph or its error on this network. The output head
    (last Conv, Resize, Sigmoid) stays float (``float_head``): 1 channel, negligible cost.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    say = log or (lambda *_: None)
    fp32_path = Path(onnx_fp32_path)
    out_path = Path(out_path) if out_path is not None else spec.export_path("onnx-int8")
    if not fp32_path.exists():
        raise ExportError(f"{fp32_path}: no fp32 ONNX model to quantize")
    method_key = calibrate_method.lower()
    if method_key not in CALIBRATION_METHODS:
        raise ExportError(f"unknown calibration method {calibrate_method!r} (expected one of {', '.join(CALIBRATION_METHODS)})")
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[method_key]
    size = spec.input_size
    calibration_images = check_images(calibration_images, spec.input_shape, "calibration images")
    if verify_images is not None:
        verify_images = check_images(verify_images, spec.input_shape)
    if fp32_path.resolve() == spec.export_path("onnx").resolve():
        from segengine.engine.core.errors import ModelError
        from segengine.engine.model.spec import check_export

        try:
            check_export(spec, "onnx")  # refuse a stale or corrupt fp32 export
        except ModelError as exc:
            raise ExportError(str(exc)) from None
    fp32_sha = sha256_file(fp32_path)
    fp32_proto = onnx.load(str(fp32_path))
    fp32_meta = {p.key: p.value for p in fp32_proto.metadata_props}
    if fp32_meta.get("segengine.source_sha256", spec.sha256) != spec.sha256:
        raise ExportError(f"{fp32_path}: exported from other weights ({fp32_meta['segengine.source_sha256'][:12]}...), "
                          f"model is {spec.sha256[:12]}...; re-export ONNX first")
    opset = next((o.version for o in fp32_proto.opset_import if o.domain in ("", "ai.onnx")), None)
    del fp32_proto

    pre = temp_path_beside(out_path, "pre")
    try:
        with atomic_file(out_path, "quant") as tmp:  # put in place only once it verifies
            source = fp32_path
            if preprocess:
                from onnxruntime.quantization.shape_inference import quant_pre_process

                # Symbolic + ONNX shape inference (ranks everywhere, so every tensor can get a QDQ pair).
                quant_pre_process(str(fp32_path), str(pre), skip_optimization=False)
                source = pre
            excluded = head_nodes(onnx.load(str(source))) if float_head else []
            with _calibration_threads(threads):
                quantize_static(
                    str(source),
                    str(tmp),
                    _data_reader(calibration_images, batch_size),
                    quant_format=QuantFormat.QDQ,
                    per_channel=per_channel,
                    reduce_range=reduce_range,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=method,
                    nodes_to_exclude=excluded,
                    extra_options={"CalibMovingAverage": False},
                )
            proto = onnx.load(str(tmp))
            set_metadata(proto, {"segengine.model": spec.name, "segengine.source_sha256": spec.sha256,
                                 "segengine.precision": "int8"})
            try:
                onnx.checker.check_model(proto)
            except onnx.checker.ValidationError as exc:
                raise ExportError(f"quantized ONNX fails onnx.checker: {str(exc).splitlines()[0][:200]}") from None
            ops = count_ops(proto)
            if not ops.get("QuantizeLinear") or not ops.get("DequantizeLinear"):
                raise ExportError("quantized model has no QuantizeLinear/DequantizeLinear nodes; nothing was quantized")
            onnx.save(proto, str(tmp))
            del proto

            # ---- verify against the fp32 ONNX model
            check = verify_images if verify_images is not None else _pick(calibration_images, n_verify)
            fp32_sess = ort_session(fp32_path, threads=threads)
            int8_sess = ort_session(tmp, threads=threads)
            ref, got = [], []
            for s in range(0, len(check), batch_size):
                ref.append(ort_run(fp32_sess, check[s : s + batch_size]))
                got.append(ort_run(int8_sess, check[s : s + batch_size]))
            del fp32_sess, int8_sess
            ref, got = np.concatenate(ref), np.concatenate(got)
            max_diff = compare_outputs(ref, got, float("inf") if atol is None else atol, "INT8 vs fp32 ONNX")
            mean_diff = float(np.mean(np.abs(ref.astype(np.float64) - got)))
            agree = mask_agreement(ref, got)
            say(f"onnx-int8: vs fp32 on {len(check)} slices: max abs diff {max_diff:.3g}, mean {mean_diff:.2g}, "
                f"mask DSC {agree['dsc']:.4f} (>= {dsc_min}), pixel agreement {agree['pixel_agreement']:.5f}")
            if not mean_diff <= mean_atol:
                raise ToleranceExceededError("INT8 vs fp32 ONNX", mean_diff, mean_atol, metric="mean abs diff")
            if not agree["dsc"] >= dsc_min:
                raise ToleranceExceededError("INT8 vs fp32 ONNX", agree["dsc"], dsc_min, metric="mask DSC at 0.5", cmp=">=")
    finally:
        pre.unlink(missing_ok=True)

    sidecar = {
        **sidecar_identity("onnx-int8", "int8", out_path, spec),
        "opset": opset,
        "input_size": int(size),
        "source_onnx": {"file": fp32_path.name, "sha256": fp32_sha},
        "quantization": {
            "tool": "onnxruntime.quantization.quantize_static",
            "format": "QDQ",
            "activation_type": "QUInt8",
            "weight_type": "QInt8",
            "per_channel": bool(per_channel),
            "reduce_range": bool(reduce_range),
            "calibrate_method": method_key,
            "quant_pre_process": bool(preprocess),
            "float_nodes": excluded,
            "calibration_batch_size": int(batch_size),
            "calibration": dict(calibration_info or {"num_slices": int(len(calibration_images))}),
        },
        "ops": ops,
        "versions": tool_versions("onnx", "onnxruntime"),
        "verification": {
            "against": "onnx fp32",
            "num_images": int(len(check)),
            "images": "given" if verify_images is not None else "calibration subset",
            "max_abs_diff": max_diff,
            "mean_abs_diff": mean_diff,
            "threshold": THRESHOLD,
            "mask_dsc": agree["dsc"],
            "pixel_agreement": agree["pixel_agreement"],
            "tolerance": {"mask_dsc_min": float(dsc_min), "mean_abs_diff": float(mean_atol),
                          "max_abs_diff": None if atol is None else float(atol)},
        },
        "created": now_iso(),
    }
    write_sidecar(out_path, sidecar)
    return sidecar
