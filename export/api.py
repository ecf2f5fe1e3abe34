"""`segengine export`: every export beside the weights, verified.

``export_model`` writes ``<name>.onnx`` (fp32), ``<name>.int8.onnx`` (static QDQ, calibrated on
training patients), ``<name>.fp16.onnx`` (float16, unsafe nodes by the FP16 range rule kept
float32) and ``<name>.fp16.plan`` (TensorRT, where a GPU and TensorRT 10 exist), each with a
sidecar ``<file>.json``. Verdicts of `segengine validate` are engine/inference/verdict.py's business.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from segengine.engine.core.errors import ExportError, ExportToolMissing, ModelError
from segengine.engine.model.spec import ModelSpec, check_export

KINDS = ("onnx", "onnx-int8", "onnx-fp16", "tensorrt-fp16")
# Each export kind under the name of the backend that runs it (`segengine export --kinds` takes either;
# the files, sidecars and verdicts keep the kind names)
KIND_BACKENDS = {"onnx": "onnxruntime", "onnx-int8": "onnxruntime-int8", "onnx-fp16": "onnxruntime-fp16",
                 "tensorrt-fp16": "tensorrt"}


def export_kind(name: str) -> str:
    """The export kind a ``--kinds`` name means: a backend name (onnxruntime-int8) or a kind (onnx-int8)."""
    by_backend = {backend: kind for kind, backend in KIND_BACKENDS.items()}
    if name in KINDS or name in by_backend:
        return by_backend.get(name, name)
    raise ExportError(f"unknown export kind {name!r} (known: {', '.join(KIND_BACKENDS.values())}; "
                      f"or the older {', '.join(KINDS)})")
N_VERIFY_INT8 = 32  # held-out slices (not used for calibration) to check INT8 against fp32
N_VERIFY_ONNX = 8


def _pick(images: np.ndarray, n: int) -> np.ndarray:
    if len(images) <= n:
        return images
    return images[np.linspace(0, len(images) - 1, n).round().astype(int)]


def _real_slices(spec: ModelSpec, data_root, train_list, n: int, log) -> tuple[np.ndarray | None, dict | None]:
    """(model inputs, info) from the training patients, shaped as ``spec`` takes them (its input
    size, 2.5D context stacked per patient); without a train list, from any non-validation
    patients under ``data_root`` (fine for fp32/fp16 checks, never used to calibrate)."""
    from segengine.engine.readers.registry import list_patients
    from segengine.export.int8 import _resolve_root, calibration_slices, reference_validation_ids

    as_model_input = {"size": spec.preprocessing, "context_slices": spec.context_slices, "return_info": True}
    if train_list is not None:
        return calibration_slices(data_root, train_list, n_slices=n, **as_model_input)
    root = Path(data_root)
    forbidden = reference_validation_ids()
    try:
        folders = list_patients(root if not (root / "kaggle_3m").is_dir() else root / "kaggle_3m")
    except Exception as exc:  # noqa: BLE001 - a DataError: no real slices, synthetic ones then
        log(f"no real slices for verification ({exc}); using synthetic ones")
        return None, None
    ids = [f.name for f in folders if f.name not in forbidden][:2]
    if not ids:
        return None, None
    return calibration_slices(_resolve_root(root, ids), ids, n_slices=n, **as_model_input)


def export_model(
    spec: ModelSpec,
    kinds: Iterable[str] = KINDS,
    data_root: str | os.PathLike | None = None,
    train_list: str | os.PathLike | None = None,
    calibration_slices_n: int = 300,
    opset: int = 17,
    log: Callable[[str], Any] | None = print,
    *,
    threads: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Export ``spec`` to each of ``kinds``; returns ``{kind: sidecar or {"skipped": reason}}``.

    The fp32 ONNX file is made first (also when only INT8/TensorRT are asked for and no
    current one exists: both are built from it). INT8 needs ``data_root`` and ``train_list``
    (training patients; the reference validation patients are refused); TensorRT is skipped
    with the reason where TensorRT 10 or a CUDA GPU is missing. Raises ExportError when an
    export fails or does not verify.
    """
    say = log or (lambda *_: None)
    kinds = tuple(dict.fromkeys(export_kind(k) for k in kinds))  # backend names too; unknown ones refused
    folder = spec.weights.parent
    if not os.access(folder, os.W_OK):
        raise ExportError(f"{folder}: not writable; copy {spec.weights.name} and its card elsewhere and export there")
    results: dict[str, dict[str, Any]] = {}

    calib = calib_info = verify = None
    if data_root is not None:
        # training slices: INT8 calibration and the FP16 range measurement (never validation patients)
        want_train = train_list is not None and ("onnx-int8" in kinds or "onnx-fp16" in kinds)
        n = calibration_slices_n + N_VERIFY_INT8 if want_train else N_VERIFY_ONNX
        slices, info = _real_slices(spec, data_root, train_list if want_train else None, n, say)
        if slices is not None:
            if want_train:
                held = np.zeros(len(slices), bool)
                n_held = min(N_VERIFY_INT8, max(len(slices) - calibration_slices_n, len(slices) // 4))
                held[np.linspace(0, len(slices) - 1, n_held).round().astype(int)] = True
                calib, verify = slices[~held], (slices[held] if held.any() else None)
                calib_info = dict(info, num_slices=int(len(calib)), requested=int(calibration_slices_n),
                                  held_out_for_verification=int(held.sum()))
                say(f"training slices: {len(calib)} of {info['num_patients']} patients for calibration/ranges "
                    f"(+{int(held.sum())} held out for verification)")
            else:
                verify = slices
    onnx_verify = _pick(verify, N_VERIFY_ONNX) if verify is not None else None

    # ---- fp32 ONNX: always first (the others are built from it)
    from segengine.export.onnx_export import export_onnx

    onnx_path = spec.export_path("onnx")
    need_onnx = "onnx" in kinds
    if not need_onnx:
        try:
            check_export(spec, "onnx")
        except ModelError as exc:
            say(f"onnx: no current fp32 ONNX to build from ({exc}); exporting it first")
            need_onnx = True
    if need_onnx:
        results["onnx"] = export_onnx(spec, onnx_path, opset=opset, verify_images=onnx_verify, threads=threads, log=say)
        say(f"onnx: wrote {onnx_path}")

    # ---- INT8 (static QDQ) for the ONNX Runtime CPU provider
    if "onnx-int8" in kinds:
        if data_root is None or train_list is None:
            results["onnx-int8"] = {"skipped": "INT8 calibration needs training patients: pass --data and --train-list"}
        elif calib is None or len(calib) == 0:
            results["onnx-int8"] = {"skipped": f"no calibration slices could be read under {data_root}"}
        else:
            from segengine.export.int8 import export_int8

            out = spec.export_path("onnx-int8")
            results["onnx-int8"] = export_int8(spec, onnx_path, out, calib, verify_images=verify,
                                               calibration_info=calib_info, threads=threads, log=say)
            say(f"onnx-int8: wrote {out}")

    # ---- float16 ONNX (ranges from the training slices decide which nodes stay float32)
    if "onnx-fp16" in kinds:
        from segengine.export.fp16 import export_fp16

        out = spec.export_path("onnx-fp16")
        results["onnx-fp16"] = export_fp16(spec, onnx_path, out, range_images=calib, verify_images=onnx_verify,
                                           range_info={"patients": (calib_info or {}).get("patients")} if calib is not None else None,
                                           threads=threads, log=say)
        say(f"onnx-fp16: wrote {out}")

    # ---- TensorRT FP16 (GPU only); the fp16 export's float32 nodes stay float32 here too
    if "tensorrt-fp16" in kinds:
        from segengine.export.tensorrt_build import build_tensorrt_engine

        out = spec.export_path("tensorrt-fp16")
        fp16_side = results.get("onnx-fp16") or spec.sidecar("onnx-fp16") or {}
        keep = fp16_side.get("conversion", {}).get("fp32_nodes", []) if fp16_side.get("source_sha256") == spec.sha256 else []
        if not fp16_side.get("conversion"):
            say("tensorrt-fp16: no current onnx-fp16 export, so no range-derived float32 layers (export onnx-fp16 first)")
        try:
            results["tensorrt-fp16"] = build_tensorrt_engine(onnx_path, out, verify_images=onnx_verify, fp32_layers=keep,
                                                             log=say)
            say(f"tensorrt-fp16: wrote {out}")
        except ExportToolMissing as exc:
            results["tensorrt-fp16"] = {"skipped": str(exc)}
            say(f"tensorrt-fp16: skipped ({exc})")

    for kind, res in results.items():
        if "skipped" in res and spec.export_path(kind).exists():
            try:
                check_export(spec, kind)
            except ModelError:
                say(f"{kind}: note: {spec.export_path(kind).name} beside the weights is stale and will be refused")
    return results
