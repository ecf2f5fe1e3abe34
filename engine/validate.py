"""`segengine validate`: does an exported backend segment each patient like its source?"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np

from segengine.engine import backends as registry
from segengine.engine.evaluate import select_patients
from segengine.engine.io import DataError, read_patient
from segengine.engine.metrics import dsc
from segengine.engine.pipeline import finish_patient, model_input, preprocess_patient
from segengine.engine.postprocess import PostprocessConfig

# Per precision: max |dDSC| against the ground truth, min DSC of one backend's mask vs the other's.
TOLERANCES = {
    "fp32": {"max_abs_delta_dsc": 0.001, "min_agreement": 0.999},
    "fp16": {"max_abs_delta_dsc": 0.001, "min_agreement": 0.995},
    "int8": {"max_abs_delta_dsc": 0.005, "min_agreement": 0.98},
}


def validate_backends(spec, data_root: Path, patients_file: str | None, backend: str, against: str = "torch",
                      threads: int | None = None, post: PostprocessConfig = PostprocessConfig()) -> dict:
    """Run both backends on the same preprocessed slices; compare per patient (native protocol)."""
    folders = select_patients(Path(data_root), patients_file)
    a = registry.create(registry.resolve(backend, spec), spec, threads=threads).load()
    b = registry.create(registry.resolve(against, spec), spec, threads=threads).load()
    tol = TOLERANCES[a.precision if a.precision in TOLERANCES else "fp32"]
    rows = []
    try:
        for folder in folders:
            vol = read_patient(folder)
            if vol.mask is None:
                raise DataError(f"{folder}: no ground-truth masks; validate needs them")
            pre = preprocess_patient(vol, "native", spec.input_size)
            x = model_input(pre, a.spec)
            pa, pb = a.predict(x), b.predict(x)
            sa = finish_patient(vol, pre, pa, "native", post, {})
            sb = finish_patient(vol, pre, pb, "native", post, {})
            da, db = dsc(sa.mask, sa.truth), dsc(sb.mask, sb.truth)
            rows.append({"patient": vol.patient_id, "dsc_backend": da, "dsc_against": db, "abs_delta_dsc": abs(da - db),
                         "agreement": dsc(sa.mask, sb.mask), "max_abs_delta_prob": float(np.abs(pa - pb).max())})
    finally:
        a.close()
        b.close()
    means = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "patient"}
    worst_delta = max(r["abs_delta_dsc"] for r in rows)
    worst_agree = min(r["agreement"] for r in rows)
    passed = worst_delta <= tol["max_abs_delta_dsc"] and worst_agree >= tol["min_agreement"]
    return {
        "backend": a.name, "against": b.name, "precision": a.precision,
        "export_kind": getattr(type(a), "export_kind", None),
        "model_sha256": spec.sha256, "protocol": "native", "tolerances": tol,
        "criteria": "every patient: |dDSC| <= max_abs_delta_dsc and agreement >= min_agreement",
        "patients": rows, "patients_count": len(rows), "means": means,
        "worst": {"abs_delta_dsc": worst_delta, "agreement": worst_agree},
        "passed": bool(passed), "date": _dt.date.today().isoformat(),
    }


def format_validation(result: dict) -> str:
    a, b = result["backend"], result["against"]
    head = f"{'patient':<26}{'DSC ' + a:>22}{'DSC ' + b:>14}{'|dDSC|':>10}{'agreement':>11}{'max|dP|':>10}"
    lines = [head, "-" * len(head)]
    for r in result["patients"]:
        lines.append(f"{r['patient']:<26}{r['dsc_backend']:>22.4f}{r['dsc_against']:>14.4f}{r['abs_delta_dsc']:>10.5f}"
                     f"{r['agreement']:>11.5f}{r['max_abs_delta_prob']:>10.5f}")
    m = result["means"]
    lines.append("-" * len(head))
    lines.append(f"{'mean':<26}{m['dsc_backend']:>22.4f}{m['dsc_against']:>14.4f}{m['abs_delta_dsc']:>10.5f}"
                 f"{m['agreement']:>11.5f}{m['max_abs_delta_prob']:>10.5f}")
    t = result["tolerances"]
    verdict = "PASS" if result["passed"] else "FAIL"
    lines.append(f"\n{verdict}: {a} ({result['precision']}) vs {b} on {result['patients_count']} patients, native protocol; "
                 f"needs every |dDSC| <= {t['max_abs_delta_dsc']} and agreement >= {t['min_agreement']} "
                 f"(worst {result['worst']['abs_delta_dsc']:.5f}, {result['worst']['agreement']:.5f})")
    return "\n".join(lines)
