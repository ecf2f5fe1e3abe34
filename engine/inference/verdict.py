"""A backend's verdict: computed against PyTorch, recorded in its export's sidecar, trusted or not.

One owner for the life of a verdict. ``compute`` runs a backend and its reference on the same
preprocessed slices, patient by patient (native protocol), and decides PASS/FAIL with the
tolerances of the backend's precision; for FP16 backends it adds the FP16 range report over
the same slices. ``record`` stores a verdict in the export's sidecar, refusing one that was
not compared with torch or whose weights or export changed since. ``why_untrusted`` is what
``--backend auto`` asks: a recorded PASS is trusted only while it was against torch, for these
weights' SHA-256 and this export's SHA-256, at the current tolerances of its precision.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from segengine.engine.core.errors import ModelError, VerdictError
from segengine.engine.inference.backends import backend_class
from segengine.engine.model.spec import ModelSpec, check_export, sha256_file, sidecar_path

REFERENCE = "torch"


# Per precision: max |dDSC| against the ground truth, min DSC of one backend's mask vs the other's.
# fp16: README "FP16 tolerance" says why 0.002 / 0.995.
TOLERANCES = {
    "fp32": {"max_abs_delta_dsc": 0.001, "min_agreement": 0.999},
    "fp16": {"max_abs_delta_dsc": 0.002, "min_agreement": 0.995},
    "int8": {"max_abs_delta_dsc": 0.005, "min_agreement": 0.98},
}


RECORDED_KEYS = ("passed", "backend", "against", "precision", "export_kind", "export_sha256",
                 "tolerances", "patients_count", "means", "worst", "date", "runtime")


DEFAULT_VERDICT_KEY = "validation"  # the sidecar key; a backend running another runtime's file has its own (verdict_key)


def tolerances_for(precision: str) -> dict[str, float]:
    return dict(TOLERANCES[precision if precision in TOLERANCES else "fp32"])


def _export_sha256(spec: ModelSpec, kind: str | None) -> str | None:
    """SHA-256 of the current export of ``kind`` (refusing a stale or corrupt one), None without one."""
    if kind is None:
        return None
    path = check_export(spec, kind)
    return sha256_file(path)


def refuse_unrecordable(backend: str, against: str) -> None:
    """Raise VerdictError, before any work, for a comparison whose verdict may not be recorded."""

    _refuse(backend, against, getattr(backend_class(backend), "export_kind", None))


def _refuse(backend: str, against: str, export_kind: str | None) -> None:
    if against != REFERENCE:
        raise VerdictError(f"a verdict is recorded only against {REFERENCE} (this run compares {backend} with {against})")
    if backend == REFERENCE:
        raise VerdictError(f"{REFERENCE} is the reference; there is no verdict to record for it")
    if export_kind is None and not _device_verdict(backend):
        raise VerdictError(f"backend {backend} has no export file to record a verdict in")


def format_result(result: dict[str, Any]) -> str:
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
    if result.get("fp16_ranges"):
        from segengine.engine.inference.onnx_numerics import format_ranges

        lines.append("\n" + format_ranges(result["fp16_ranges"]))
    if result.get("numerics"):
        lines.append(f"numerics: {result['numerics']}")
    t = result["tolerances"]
    verdict = "PASS" if result["passed"] else "FAIL"
    lines.append(f"\n{verdict}: {a} ({result['precision']}) vs {b} on {result['patients_count']} patients, native protocol; "
                 f"needs every |dDSC| <= {t['max_abs_delta_dsc']} and agreement >= {t['min_agreement']} "
                 f"(worst {result['worst']['abs_delta_dsc']:.5f}, {result['worst']['agreement']:.5f})")
    if result.get("why_failed"):
        lines.append(result["why_failed"])
    return "\n".join(lines)


# --------------------------------------------------------------------------- record
def record(spec: ModelSpec, result: dict[str, Any]) -> Path:
    """Store ``result``'s verdict in its export's sidecar (atomically); returns the sidecar path.

    Refused (VerdictError) unless it was compared with torch, for these weights, on the export
    that is beside them now (its SHA-256 unchanged since ``compute``), at the current tolerances.
    """
    from segengine.engine.core.atomic import now_iso, write_json_atomic

    kind = result.get("export_kind")
    _refuse(result.get("backend", "?"), result.get("against", "?"), kind)
    if result.get("model_sha256") != spec.sha256:
        raise VerdictError(f"this verdict is for weights {str(result.get('model_sha256'))[:12]}..., "
                           f"not {spec.weights.name} ({spec.sha256[:12]}...)")
    if kind is None:  # a GPU runner of the weights themselves: one verdict per GPU model
        return _record_device(spec, result)
    current = _export_sha256(spec, kind)
    if result.get("export_sha256") != current:
        raise VerdictError(f"{spec.export_path(kind).name} changed since it was validated; validate it again")
    if result.get("tolerances") != tolerances_for(result.get("precision", "fp32")):
        raise VerdictError(f"this verdict used tolerances {result.get('tolerances')}, not those of "
                           f"{result.get('precision')} ({tolerances_for(result.get('precision', 'fp32'))})")
    side_p = sidecar_path(spec.export_path(kind))
    side = json.loads(side_p.read_text())
    side[verdict_key(result.get("backend", "?"))] = {**{k: result.get(k) for k in RECORDED_KEYS}, "passed": bool(result["passed"]),
                          "source_sha256": spec.sha256, "recorded": now_iso()}
    write_json_atomic(side_p, side)
    return side_p


# --------------------------------------------------------------------------- trust
def verdict_key(backend: str) -> str:
    """Where ``backend``'s verdict lives in its export's sidecar: ``validation``, or the backend's
    own key when it runs a file another runtime also runs (OpenVINO on the ONNX exports)."""

    return getattr(backend_class(backend), "verdict_key", DEFAULT_VERDICT_KEY)


def recorded_fail(spec: ModelSpec, backend: str) -> bool:
    """``backend`` holds a recorded FAIL verdict for these very weights (not merely none)."""
    kind = getattr(backend_class(backend), "export_kind", None)
    if kind is None:
        return False
    try:
        v = (spec.sidecar(kind) or {}).get(verdict_key(backend)) or {}
    except ModelError:
        return False
    return v.get("passed") is False and v.get("source_sha256") == spec.sha256


def why_untrusted(spec: ModelSpec, backend: str) -> str | None:
    """None when ``backend`` has a recorded PASS that still holds for ``spec``, else why not."""

    if backend == REFERENCE:
        return None
    cls = backend_class(backend)
    kind = getattr(cls, "export_kind", None)
    if kind is None and getattr(cls, "device_verdict", False):
        return _why_untrusted_on_device(spec, backend, cls)
    if kind is None:
        return f"{backend} has no export to hold a verdict"
    try:
        export_sha = _export_sha256(spec, kind)
    except ModelError as exc:
        return str(exc)
    v = (spec.sidecar(kind) or {}).get(verdict_key(backend)) or {}
    checks = [
        (bool(v), "no verdict recorded (segengine validate --record)"),
        (v.get("passed") is True, "its recorded verdict is FAIL"),
        (v.get("against") == REFERENCE, f"its verdict was not against {REFERENCE} ({v.get('against')})"),
        (v.get("source_sha256") == spec.sha256, "its verdict is for other weights"),
        (v.get("export_sha256") == export_sha, "its verdict is for another export file"),
        (v.get("tolerances") == tolerances_for(cls.precision), f"its verdict used other tolerances than {cls.precision}'s"),
    ]
    why = next((f"{backend}: {why}" for ok, why in checks if not ok), None)
    if why is None and hasattr(cls, "verdict_mismatch"):  # numerics that depend on this CPU (OpenVINO's bf16)
        mismatch = cls.verdict_mismatch(v)
        why = f"{backend}: {mismatch}" if mismatch else None
    return why


# --------------------------------------------------------------------------- verdicts per GPU model
# A backend that runs the weights themselves on a GPU (torch-cuda: ``device_verdict``) has no export
# file to hold its verdict, and its numerics depend on the GPU model. Its verdicts live beside the
# weights in ``<model>.gpu-verdicts.json``: {"schema", "verdicts": {backend: {GPU model: verdict}}},
# each with the GPU's identity (model, capability, driver, CUDA, torch; inference/gpu.py), and only
# the one for this GPU model is trusted.
DEVICE_VERDICTS_SUFFIX = ".gpu-verdicts.json"


DEVICE_VERDICTS_SCHEMA = "segengine-gpu-verdicts/1"


def _device_verdict(backend: str) -> bool:
    try:
        return bool(getattr(backend_class(backend), "device_verdict", False))
    except Exception:  # noqa: BLE001 - an unknown name is simply not such a backend
        return False


def device_verdicts_path(spec: ModelSpec) -> Path:
    return spec.weights.with_name(spec.name + DEVICE_VERDICTS_SUFFIX)


def read_device_verdicts(spec: ModelSpec) -> dict[str, dict[str, dict]]:
    """backend -> GPU model -> verdict; empty without a file. A malformed file is a ModelError."""
    from segengine.engine.model.spec import read_json

    path = device_verdicts_path(spec)
    if not path.exists():
        return {}
    data = read_json(path, "GPU verdicts")
    verdicts = data.get("verdicts") if isinstance(data, dict) else None
    if not isinstance(data, dict) or data.get("schema") != DEVICE_VERDICTS_SCHEMA or not isinstance(verdicts, dict) \
            or not all(isinstance(v, dict) and all(isinstance(x, dict) for x in v.values()) for v in verdicts.values()):
        raise ModelError(f"{path}: not a {DEVICE_VERDICTS_SCHEMA} file")
    return verdicts


def _record_device(spec: ModelSpec, result: dict[str, Any]) -> Path:
    from segengine.engine.core.atomic import now_iso, write_json_atomic

    device = result.get("device")
    if not isinstance(device, dict) or not isinstance(device.get("gpu"), str):
        raise VerdictError(f"a {result.get('backend')} verdict must name the GPU it ran on")
    if result.get("tolerances") != tolerances_for(result.get("precision", "fp32")):
        raise VerdictError(f"this verdict used tolerances {result.get('tolerances')}, not those of "
                           f"{result.get('precision')} ({tolerances_for(result.get('precision', 'fp32'))})")
    verdicts = read_device_verdicts(spec)
    entry = {**{k: result.get(k) for k in RECORDED_KEYS}, "passed": bool(result["passed"]), "device": device,
             "source_sha256": spec.sha256, "recorded": now_iso()}
    verdicts.setdefault(result["backend"], {})[device["gpu"]] = entry
    path = device_verdicts_path(spec)
    write_json_atomic(path, {"schema": DEVICE_VERDICTS_SCHEMA, "verdicts": verdicts})
    return path


def _why_untrusted_on_device(spec: ModelSpec, backend: str, cls) -> str | None:
    from segengine.engine.inference.gpu import same_gpu

    try:
        mine = read_device_verdicts(spec).get(backend, {})
    except ModelError as exc:
        return f"{backend}: {exc}"
    here = cls.device_identity()
    v = next((v for v in mine.values() if same_gpu(v.get("device"), here)), None)
    if v is None:
        others = ", ".join(sorted(mine)) or "none"
        return (f"{backend}: no verdict for this GPU model ({here.get('gpu')}; recorded for: {others}); "
                f"segengine validate --backend {backend} --record on it")
    checks = [
        (v.get("passed") is True, "its recorded verdict on this GPU is FAIL"),
        (v.get("against") == REFERENCE, f"its verdict was not against {REFERENCE} ({v.get('against')})"),
        (v.get("source_sha256") == spec.sha256, "its verdict is for other weights"),
        (v.get("tolerances") == tolerances_for(cls.precision), f"its verdict used other tolerances than {cls.precision}'s"),
    ]
    return next((f"{backend}: {why}" for ok, why in checks if not ok), None)
