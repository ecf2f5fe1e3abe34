"""`segengine validate`: run a backend and torch on every listed patient and judge the export.

The comparison runs ``run``'s own path on both (native protocol): the job's ``segment()``, with
its balanced batches of ``--batch-size`` slices and the model card's post-processing, so the
verdict that ``auto`` trusts describes the path it guards (a backend whose numerics depend on the
batch shape, as CUDA graphs, is judged on the shapes ``run`` gives it); the tolerances and
recording rules are ``inference.verdict``'s."""
from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

import numpy as np

from segengine.engine.core.errors import ModelError, VerdictError
from segengine.engine.inference import registry
from segengine.engine.inference.verdict import REFERENCE, _export_sha256, tolerances_for
from segengine.engine.model.spec import ModelSpec, check_export


# --------------------------------------------------------------------------- compute
def compute(spec: ModelSpec, data_root: Path, patients_file: str | None, backend: str, against: str = REFERENCE,
            threads: int | None = None, post=None, limits=None, batch_size: int = 32) -> dict[str, Any]:
    """Run ``backend`` and ``against`` on every listed patient; the verdict with every figure.
    ``post`` defaults to the card's post-processing, as ``run`` applies it."""
    from segengine.engine.core.errors import DataError
    from segengine.engine.evaluation.evaluate import select_patients
    from segengine.engine.evaluation.metrics import dsc
    from segengine.engine.inference.predict import model_input
    from segengine.engine.job.patient_job import segment
    from segengine.engine.postprocessing.postprocess import PostprocessConfig
    from segengine.engine.preprocessing.preprocess import preprocess_patient
    from segengine.engine.readers.registry import read_patient
    from segengine.engine.readers.volume import DEFAULT_LIMITS

    post = post or PostprocessConfig.from_card(spec.card)
    folders = select_patients(Path(data_root), patients_file)
    a_name, b_name = registry.resolve(backend, spec, threads), registry.resolve(against, spec, threads)
    a_cls = registry.backend_class(a_name)
    export_kind = getattr(a_cls, "export_kind", None)
    export_sha = _export_sha256(spec, export_kind)
    ranges = _range_meter(spec, a_cls, threads)
    a = registry.create(a_name, spec, threads=threads).load()
    b = registry.create(b_name, spec, threads=threads).load()
    tol = tolerances_for(a.precision)
    rows = []
    try:
        for folder in folders:
            vol = read_patient(folder, limits=limits or DEFAULT_LIMITS)
            if vol.mask is None:
                raise DataError(f"{folder}: no ground-truth masks; validate needs them")
            pre = preprocess_patient(vol, "native", spec.preprocessing)  # once: both backends see the same input
            sa = segment(vol, a, "native", batch_size, post, pre=pre)  # run's path: balanced batches, card's rule
            sb = segment(vol, b, "native", batch_size, post, pre=pre)
            if ranges is not None:
                ranges.add(model_input(pre, spec))  # with neighbouring slices as channels for 2.5D models
            da, db = dsc(sa.mask, sa.truth), dsc(sb.mask, sb.truth)
            rows.append({"patient": vol.patient_id, "dsc_backend": da, "dsc_against": db, "abs_delta_dsc": abs(da - db),
                         "agreement": dsc(sa.mask, sb.mask), "max_abs_delta_prob": float(np.abs(sa.prob - sb.prob).max()),
                         "mask_pixels_differing": int(np.count_nonzero(sa.mask != sb.mask))})
    finally:
        a.close()
        b.close()
    means = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "patient"}
    worst = {"abs_delta_dsc": max(r["abs_delta_dsc"] for r in rows), "agreement": min(r["agreement"] for r in rows)}
    within = worst["abs_delta_dsc"] <= tol["max_abs_delta_dsc"] and worst["agreement"] >= tol["min_agreement"]
    result = {
        "backend": a.name, "against": b.name, "precision": a.precision, "export_kind": export_kind,
        "model_sha256": spec.sha256, "export_sha256": export_sha, "protocol": "native", "tolerances": tol,
        "criteria": "every patient: |dDSC| <= max_abs_delta_dsc and agreement >= min_agreement",
        "numerics": getattr(a, "numerics", None), "runtime": getattr(a, "runtime", None),
        "patients": rows, "patients_count": len(rows), "means": means, "worst": worst,
        "passed": bool(within), "date": _dt.date.today().isoformat(),
        "path": {"batch_size": batch_size, "batches": "balanced (inference/predict.py)", "postprocess": post.rule_name,
                 "threshold": post.threshold},
    }
    if getattr(a_cls, "device_verdict", False):  # a GPU runner: the verdict holds for this GPU model only
        result["device"] = getattr(a, "device_info", None)
    if ranges is not None:
        side = spec.sidecar(export_kind) or {}
        kept = side.get("conversion", {}).get("fp32_nodes") or side.get("builder", {}).get("fp32_layers") or []
        result["fp16_ranges"] = ranges.report(kept)
        if result["fp16_ranges"]["unsafe_in_fp16"]:
            result["passed"] = False
            result["why_failed"] = ("FP16-unsafe nodes run in fp16: " + ", ".join(result["fp16_ranges"]["unsafe_in_fp16"])
                                    + "; re-export with training slices (--data/--train-list) so they stay float32")
    return result


def _range_meter(spec: ModelSpec, backend_cls, threads: int | None):
    """A RangeMeter over the fp32 ONNX export for FP16 backends (their verdict includes it), else None."""
    if getattr(backend_cls, "precision", None) != "fp16" or getattr(backend_cls, "export_kind", None) is None:
        return None  # a runner of the weights themselves (torch-cuda) has no converted graph to report on
    from segengine.engine.inference.onnx_numerics import RangeMeter

    try:
        path = check_export(spec, "onnx")
    except ModelError as exc:
        raise VerdictError(f"the FP16 range report runs the fp32 ONNX export: {exc}") from None
    return RangeMeter(path, threads=threads)
