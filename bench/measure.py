"""What ``segengine bench`` measures: model-only latency per backend and batch size, and
whole patients end to end through the engine's own patient job, writes included.

End-to-end timing takes a "process one patient" callable (``folder, out -> report``), so it
times exactly what `segengine run --patient` runs; the amortized figure runs the
`run --patients` loop itself (``job.batch.segment_patients``, stages overlapped).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from segengine.bench.machine import peak_for

E2E_BATCH_SIZE = 32
STAGES = ("read", "preprocess", "infer", "postprocess", "write")
ProcessPatient = Callable[[Path, Path], dict]  # (patient folder, output root) -> its report (with timings_s)


def stats_ms(times_s: list[float]) -> dict[str, float]:
    ms = np.asarray(times_s, dtype=np.float64) * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean()), "min": float(ms.min()),
            "max": float(ms.max())}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _availability(name: str, spec) -> str | None:
    """None if ``name`` can run here for ``spec``, else the reason (never raises)."""
    from segengine.engine.inference import registry

    try:
        return registry.why_unavailable(name, spec)
    except ImportError as exc:
        return f"backend module not importable ({_one_line(exc)})"
    except Exception as exc:  # noqa: BLE001 - unknown name, broken runtime: report, do not crash
        return _one_line(exc)


def _precision(name: str) -> str | None:
    from segengine.engine.inference import registry

    try:
        return registry.backend_class(name).precision
    except Exception:  # noqa: BLE001
        return None


def _create_and_load(name: str, spec, threads: int | None):
    """(backend, load seconds) or raise; BackendUnavailable/ModelError mean 'not available'."""
    from segengine.engine.inference import registry

    t = time.perf_counter()
    backend = registry.create(name, spec, threads=threads)
    backend.load()
    return backend, time.perf_counter() - t


def _failure_status(exc: BaseException) -> str:
    from segengine.engine.core.errors import BackendUnavailable, ModelError

    if isinstance(exc, (BackendUnavailable, ModelError, ImportError)):
        return f"not available: {_one_line(exc)}"
    return f"failed: {type(exc).__name__}: {_one_line(exc)}"


def patient_folders(data_root, n: int) -> list[Path]:
    from segengine.engine.readers.registry import list_patients

    root = Path(data_root)
    if (root / "kaggle_3m").is_dir():  # the unpacked dataset's parent folder
        root = root / "kaggle_3m"
    return list_patients(root)[:n]


def input_slices(spec, folders: list[Path], need: int, log) -> tuple[np.ndarray, dict]:
    """Real model inputs (native protocol, ``inference.predict.model_input``: 2.5D context stacked per
    patient) from the patients, enough for ``need``; else noise of the same shape."""
    from segengine.engine.inference.predict import model_input
    from segengine.engine.preprocessing.preprocess import preprocess_patient
    from segengine.engine.readers.registry import read_patient

    if not folders:
        x = np.random.default_rng(0).standard_normal((need, *spec.input_shape)).astype(np.float32)
        return x, {"source": "synthetic", "detail": "standard normal noise (no --data)", "slices": need}
    parts, used = [], []
    for folder in folders:
        vol = read_patient(folder, with_mask=False)
        parts.append(model_input(preprocess_patient(vol, "native", spec.preprocessing), spec))
        used.append(folder.name)
        if sum(len(p) for p in parts) >= need:
            break
    x = np.concatenate(parts).astype(np.float32)
    available = len(x)
    if available < need:
        x = np.resize(x, (need,) + x.shape[1:])  # repeat slices to fill the largest batch
    log(f"input: {available} real slices from {len(used)} patient(s), native protocol")
    return np.ascontiguousarray(x), {"source": "real", "detail": "preprocessing.preprocess_patient + inference.predict.model_input, protocol native",
                                     "patients": used, "slices": int(available), "repeated_to": int(len(x))}


def model_only_rows(name: str, spec, x: np.ndarray, batch_sizes, threads, warmup: int, iterations: int,
                    flops: int, peaks: dict, log) -> list[dict]:
    """Per batch size: warm-up calls, then timed ``Backend.infer`` calls on the same batch."""
    base = {"backend": name, "precision": _precision(name)}
    peak_value, peak_unit = peak_for(base["precision"], peaks)
    why = _availability(name, spec)
    if why:
        log(f"{name}: not available: {why}")
        return [{**base, "batch_size": None, "status": f"not available: {why}"}]
    try:
        backend, load_s = _create_and_load(name, spec, threads)
    except Exception as exc:  # noqa: BLE001
        status = _failure_status(exc)
        log(f"{name}: {status}")
        return [{**base, "batch_size": None, "status": status}]
    rows = []
    try:
        for bs in batch_sizes:
            row = {**base, "batch_size": int(bs), "load_s": load_s, "warmup": warmup, "iterations": iterations}
            batch = np.ascontiguousarray(x[:bs])
            try:
                for _ in range(warmup):
                    backend.infer(batch)
                times = []
                for _ in range(iterations):
                    t = time.perf_counter()
                    backend.infer(batch)
                    times.append(time.perf_counter() - t)
            except Exception as exc:  # noqa: BLE001 - one failing shape must not end the bench
                row["status"] = _failure_status(exc)
                log(f"{name} batch {bs}: {row['status']}")
                rows.append(row)
                continue
            lat = stats_ms(times)
            slices_s = bs / (lat["mean"] / 1e3)
            gflops = flops * slices_s / 1e9
            row.update({
                "status": "ok",
                "latency_ms": lat,
                "per_slice_ms": lat["p50"] / bs,
                "throughput_slices_s": slices_s,
                "gflops_achieved": gflops,
                "pct_of_peak": 100.0 * gflops / peak_value if peak_value else None,
                "peak_unit": peak_unit,
            })
            log(f"{name} batch {bs}: p50 {lat['p50']:.1f} ms, {slices_s:.1f} slices/s, {gflops:.1f} GFLOP/s")
            rows.append(row)
    finally:
        backend.close()
    return rows


def time_end_to_end(process_one: ProcessPatient, folders: list[Path], out_root: Path, log=print,
                    label: str = "") -> dict:
    """Wall time per patient of ``process_one`` (one warm-up patient first, not counted) and
    the mean of each stage from the reports' ``timings_s``."""
    outs = [out_root / name for name in ["warmup"] + [f"p{i}" for i in range(len(folders))]]
    for out in outs:
        out.mkdir(parents=True, exist_ok=True)
    process_one(folders[0], outs[0])
    totals, stages, slices = [], [], []
    for folder, out in zip(folders, outs[1:]):
        t = time.perf_counter()
        report = process_one(folder, out)
        totals.append(time.perf_counter() - t)
        stages.append(report["timings_s"])
        slices.append(report["slices"])
        log(f"{label}end to end: {folder.name}: {totals[-1]:.2f} s")
    return {
        "patients": [f.name for f in folders], "warmup_patients": 1,
        "per_patient_s": float(np.mean(totals)), "per_patient_s_each": [float(v) for v in totals],
        "slices_mean": float(np.mean(slices)),
        "stages_s": {k: float(np.mean([s.get(k, 0.0) for s in stages])) for k in STAGES},
    }


def engine_patient_job(backend, spec, batch_size: int = E2E_BATCH_SIZE) -> ProcessPatient:
    """The engine's one-patient unit of work (what `run --patient` and each Ray worker run)."""
    from segengine.engine.job.patient_job import RunSetup, process_patient

    setup = RunSetup(backend, backend.name, spec, batch_size=batch_size)
    return lambda folder, out: process_patient(folder, out, setup)


def time_amortized(folders: list[Path], backend, spec, out_root: Path, batch_size: int = E2E_BATCH_SIZE) -> dict:
    """The `run --patients` loop on ``folders`` (stages overlapped): total wall / N."""
    from segengine.engine.job.batch import segment_patients
    from segengine.engine.job.patient_job import RunSetup

    out_root.mkdir(parents=True, exist_ok=True)
    summary = segment_patients(folders, out_root, RunSetup(backend, backend.name, spec, batch_size=batch_size),
                               log=lambda *_: None)
    if summary.failed:
        raise RuntimeError(f"--patients loop failed on {summary.failed[0][0]}: {summary.failed[0][1]}")
    return {"total_s": summary.elapsed_s, "per_patient_s": summary.elapsed_s / len(folders), "patients": len(folders),
            "overlapped_stages": True}


def time_infer_alone(folders: list[Path], backend, spec, batch_size: int = E2E_BATCH_SIZE) -> dict:
    """Inference alone: ``predict_patient`` per patient with nothing else running (inputs read and
    preprocessed first, one warm-up call): the floor the end-to-end figures are compared with."""
    from segengine.engine.inference.predict import predict_patient
    from segengine.engine.preprocessing.preprocess import preprocess_patient
    from segengine.engine.readers.registry import read_patient

    inputs = [preprocess_patient(read_patient(f, with_mask=False), "native", spec.preprocessing) for f in folders]
    predict_patient(backend, inputs[0], batch_size)
    times = []
    for pre in inputs:
        t = time.perf_counter()
        predict_patient(backend, pre, batch_size)
        times.append(time.perf_counter() - t)
    return {"per_patient_s": float(np.mean(times)), "slices_mean": float(np.mean([len(p.images) for p in inputs]))}


def end_to_end_row(name: str, spec, folders: list[Path], threads, log) -> dict:
    """One backend through the engine's patient job on every folder, then the --patients loop."""
    row = {"backend": name, "precision": _precision(name), "batch_size": E2E_BATCH_SIZE, "protocol": "native",
           "writes": "every output of `segengine run` (mask tifs, NIfTI, overlay.png, report.json)"}
    why = _availability(name, spec)
    if why:
        return {**row, "status": f"not available: {why}"}
    try:
        backend, load_s = _create_and_load(name, spec, threads)
    except Exception as exc:  # noqa: BLE001
        return {**row, "status": _failure_status(exc)}
    try:
        with tempfile.TemporaryDirectory(prefix="segengine-bench-") as tmp:
            tmp = Path(tmp)
            per = time_end_to_end(engine_patient_job(backend, spec), folders, tmp / "single", log, f"{name} ")
            amortized = time_amortized(folders, backend, spec, tmp / "amortized")
        infer_alone = time_infer_alone(folders, backend, spec)
        amortized["vs_infer_alone"] = amortized["per_patient_s"] / infer_alone["per_patient_s"]
    except Exception as exc:  # noqa: BLE001
        return {**row, "status": _failure_status(exc), "load_s": load_s}
    finally:
        backend.close()
    return {**row, "status": "ok", "load_s": load_s, **per, "amortized": amortized, "infer_alone": infer_alone}
