"""``segengine bench``: model-only latency/throughput per backend and batch size, end-to-end
time per patient, and the same for the course's reference program, on this machine.

    result = run_bench(spec, data_root="kaggle_3m", patients=10)
    print(format_table(result)); plot(result, "bench.png"); json.dump(result, fh)

Every number comes from the engine's own code path (``engine.pipeline.segment`` and the
backend registry); the reference is timed by :mod:`segengine.bench.reference`.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

DEFAULT_BACKENDS = ("torch", "onnxruntime", "onnxruntime-int8", "tensorrt")
E2E_BATCH_SIZE = 32
STAGES = ("read", "preprocess", "infer", "postprocess", "write")
FLOPS_PER_CYCLE_PER_CORE = 32  # AVX2 FMA fp32: 2 FMA units x 8 lanes x 2 flops
PEAK_FORMULA = "peak GFLOP/s = cores x GHz x 32 (AVX2 FMA, fp32: 2 FMA units x 8 lanes x 2 flops per FMA)"
SCHEMA = "segengine-bench/1"


# ===================================================================== machine
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpu_facts() -> dict:
    text = _cpuinfo()
    model = None
    mhz: list[float] = []
    cores_per_socket: dict[str, int] = {}
    flags: set[str] = set()
    phys = "0"
    for line in text.splitlines():
        key, _, val = line.partition(":")
        key, val = key.strip(), val.strip()
        if key == "model name" and model is None:
            model = val
        elif key == "cpu MHz":
            try:
                mhz.append(float(val))
            except ValueError:
                pass
        elif key == "physical id":
            phys = val
        elif key == "cpu cores":
            try:
                cores_per_socket[phys] = int(val)
            except ValueError:
                pass
        elif key == "flags" and not flags:
            flags = set(val.split())
    physical = sum(cores_per_socket.values()) or None
    return {
        "model": model or platform.processor() or platform.machine(),
        "physical_cores": physical,
        "cpu_mhz": max(mhz) if mhz else None,
        "simd": [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile") if f in flags],
    }


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _gpu_name() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - no torch / broken CUDA: fall through
        pass
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=10)
            names = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
            return ", ".join(names) or None
        except (OSError, subprocess.SubprocessError):
            return None
    return None


def machine_info() -> dict:
    """CPU model, cores, Python and library versions, GPU (or None): the context of every number."""
    cpu = _cpu_facts()
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count()
    versions = {}
    for key, dists in (("numpy", ["numpy"]), ("torch", ["torch"]), ("onnxruntime", ["onnxruntime", "onnxruntime-gpu"]),
                       ("openvino", ["openvino"]), ("tensorrt", ["tensorrt", "tensorrt-cu12"]), ("scipy", ["scipy"]),
                       ("scikit-image", ["scikit-image"])):
        versions[key] = next((v for v in map(_version, dists) if v), None)
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    return {
        "cpu_model": cpu["model"],
        "cores": cpu["physical_cores"] or os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": affinity,
        "cpu_mhz": cpu["cpu_mhz"],
        "simd": cpu["simd"],
        "gpu": _gpu_name(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "loadavg_at_start": load,
    }


def peak_flops(machine: dict) -> dict:
    """This CPU's nominal fp32 peak (AVX2 FMA) from /proc/cpuinfo's clock; None fields if unknown."""
    cores = min(machine.get("cores") or 1, machine.get("usable_cpus") or machine.get("cores") or 1)
    mhz = machine.get("cpu_mhz")
    ghz = mhz / 1000.0 if mhz else None
    gflops = cores * ghz * FLOPS_PER_CYCLE_PER_CORE if ghz else None
    return {"formula": PEAK_FORMULA, "cores": cores, "ghz": ghz, "flops_per_cycle_per_core": FLOPS_PER_CYCLE_PER_CORE,
            "gflops": gflops, "gflops_per_core": ghz * FLOPS_PER_CYCLE_PER_CORE if ghz else None,
            "caveat": "nominal clock from /proc/cpuinfo 'cpu MHz' (turbo and AVX clock changes not included)"}


# ===================================================================== helpers
def _stats_ms(times_s: list[float]) -> dict[str, float]:
    ms = np.asarray(times_s, dtype=np.float64) * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean()), "min": float(ms.min()),
            "max": float(ms.max())}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def _availability(name: str, spec) -> str | None:
    """None if ``name`` can run here for ``spec``, else the reason (never raises)."""
    from segengine.engine import backends as registry

    try:
        return registry.backend_class(name).availability(spec)
    except ImportError as exc:
        return f"backend module not importable ({_one_line(exc)})"
    except Exception as exc:  # noqa: BLE001 - unknown name, broken runtime: report, do not crash
        return _one_line(exc)


def _precision(name: str) -> str | None:
    from segengine.engine import backends as registry

    try:
        return registry.backend_class(name).precision
    except Exception:  # noqa: BLE001
        return None


def _create_and_load(name: str, spec, threads: int | None):
    """(backend, load seconds) or raise; BackendUnavailable/ModelError mean 'not available'."""
    from segengine.engine import backends as registry

    t = time.perf_counter()
    backend = registry.create(name, spec, threads=threads)
    backend.load()
    return backend, time.perf_counter() - t


def _failure_status(exc: BaseException) -> str:
    from segengine.engine.backends.base import BackendUnavailable
    from segengine.engine.model import ModelError

    if isinstance(exc, (BackendUnavailable, ModelError, ImportError)):
        return f"not available: {_one_line(exc)}"
    return f"failed: {type(exc).__name__}: {_one_line(exc)}"


def _patient_folders(data_root, n: int) -> list[Path]:
    from segengine.engine.io import list_patients

    root = Path(data_root)
    if (root / "kaggle_3m").is_dir():  # the unpacked dataset's parent folder
        root = root / "kaggle_3m"
    return list_patients(root)[:n]


def _input_slices(spec, folders: list[Path], need: int, log) -> tuple[np.ndarray, dict]:
    """Real preprocessed slices (native protocol) from the patients, enough for ``need``; else noise."""
    from segengine.engine.io import read_patient
    from segengine.engine.pipeline import preprocess_patient

    size = spec.input_size
    if not folders:
        x = np.random.default_rng(0).standard_normal((need, 3, size, size)).astype(np.float32)
        return x, {"source": "synthetic", "detail": "standard normal noise (no --data)", "slices": need}
    parts, used = [], []
    for folder in folders:
        vol = read_patient(folder, with_mask=False)
        parts.append(preprocess_patient(vol, "native", size).images)
        used.append(folder.name)
        if sum(len(p) for p in parts) >= need:
            break
    x = np.concatenate(parts).astype(np.float32)
    available = len(x)
    if available < need:
        x = np.resize(x, (need,) + x.shape[1:])  # repeat slices to fill the largest batch
    log(f"input: {available} real slices from {len(used)} patient(s), native protocol")
    return np.ascontiguousarray(x), {"source": "real", "detail": "engine.pipeline.preprocess_patient, protocol native",
                                     "patients": used, "slices": int(available), "repeated_to": int(len(x))}


# ===================================================================== model only
def _model_only_rows(name: str, spec, x: np.ndarray, batch_sizes, threads, warmup: int, iterations: int,
                     flops: int, peak: dict, log) -> list[dict]:
    base = {"backend": name, "precision": _precision(name)}
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
            lat = _stats_ms(times)
            slices_s = bs / (lat["mean"] / 1e3)
            gflops = flops * slices_s / 1e9
            row.update({
                "status": "ok",
                "latency_ms": lat,
                "per_slice_ms": lat["p50"] / bs,
                "throughput_slices_s": slices_s,
                "gflops_achieved": gflops,
                "pct_of_peak": 100.0 * gflops / peak["gflops"] if peak.get("gflops") else None,
            })
            log(f"{name} batch {bs}: p50 {lat['p50']:.1f} ms, {slices_s:.1f} slices/s, {gflops:.1f} GFLOP/s")
            rows.append(row)
    finally:
        backend.close()
    return rows


# ===================================================================== end to end
def _time_patient(folder: Path, backend, out_dir: Path, batch_size: int) -> dict[str, float]:
    """One patient through the same job as `run --patient` (lock, read, segment, atomic write of every output)."""
    from segengine.engine.patient_job import process_patient

    t0 = time.perf_counter()
    rep = process_patient(folder, out_dir, backend, batch_size=batch_size, overwrite=True)
    total = time.perf_counter() - t0
    return {**{k: rep["timings_s"].get(k, 0.0) for k in STAGES}, "total": total, "slices": float(rep["slices"])}


def _time_amortized(folders: list[Path], backend, out_root: Path, batch_size: int, spec) -> dict:
    """The ``run --patients`` way: slices of a few patients share inference batches; total / N."""
    from segengine.engine.io import read_patient, write_mask_slices
    from segengine.engine.pipeline import finish_patient, model_input, preprocess_patient
    from segengine.engine.postprocess import PostprocessConfig
    from segengine.engine.runner import PATIENTS_PER_CHUNK

    post = PostprocessConfig()
    t0 = time.perf_counter()
    for c in range(0, len(folders), PATIENTS_PER_CHUNK):
        chunk = []
        for folder in folders[c : c + PATIENTS_PER_CHUNK]:
            vol = read_patient(folder)
            chunk.append((vol, preprocess_patient(vol, "native", spec.input_size)))
        probs = backend.predict(np.concatenate([model_input(p, backend.spec) for _, p in chunk]), batch_size=batch_size)
        offset = 0
        for vol, pre in chunk:
            n = len(pre.images)
            seg = finish_patient(vol, pre, probs[offset : offset + n], "native", post, {})
            offset += n
            out = out_root / vol.patient_id
            out.mkdir(parents=True, exist_ok=True)
            write_mask_slices(out, vol.patient_id, vol.slice_numbers, seg.mask)
    total = time.perf_counter() - t0
    return {"total_s": total, "per_patient_s": total / len(folders), "patients": len(folders),
            "patients_per_chunk": PATIENTS_PER_CHUNK}


def _end_to_end_row(name: str, spec, folders: list[Path], threads, log) -> dict:
    row = {"backend": name, "precision": _precision(name), "batch_size": E2E_BATCH_SIZE, "protocol": "native"}
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
            _time_patient(folders[0], backend, tmp / "warmup", E2E_BATCH_SIZE)  # warm-up patient, not counted
            per = []
            for i, folder in enumerate(folders):
                per.append(_time_patient(folder, backend, tmp / f"p{i}", E2E_BATCH_SIZE))
                log(f"{name} end to end: {folder.name}: {per[-1]['total']:.2f} s")
            amortized = _time_amortized(folders, backend, tmp / "amortized", E2E_BATCH_SIZE, spec)
    except Exception as exc:  # noqa: BLE001
        return {**row, "status": _failure_status(exc), "load_s": load_s}
    finally:
        backend.close()
    totals = [p["total"] for p in per]
    return {
        **row,
        "status": "ok",
        "load_s": load_s,
        "patients": [f.name for f in folders],
        "warmup_patients": 1,
        "per_patient_s": float(np.mean(totals)),
        "per_patient_s_each": [float(v) for v in totals],
        "slices_mean": float(np.mean([p["slices"] for p in per])),
        "stages_s": {k: float(np.mean([p[k] for p in per])) for k in STAGES},
        "amortized": amortized,
    }


# ===================================================================== run
def run_bench(spec, data_root=None, patients: int = 3, backends: Iterable[str] = DEFAULT_BACKENDS,
              batch_sizes: Iterable[int] = (1, 8, 32), threads: int | None = None, warmup: int = 3,
              iterations: int = 20, end_to_end: bool = True, reference: bool | str = True,
              reference_batch_size: int = 32, reference_warmup: int | None = None,
              reference_iterations: int | None = None, log: Callable[[str], None] = print) -> dict:
    """Time every backend x batch size (model only), each backend end to end, and the reference.

    ``spec`` is a :class:`~segengine.engine.model.ModelSpec` (or a path to a weights file).
    ``reference``: True = model-only and end-to-end, "model" = model-only only, False = skip.
    ``reference_warmup`` / ``reference_iterations`` default to ``warmup`` / ``iterations``.
    Returns a JSON-serializable dict (see ``format_table`` for a human view).
    """
    import torch

    from segengine.engine.model import ModelSpec, load_model_spec, load_torch_model
    from segengine.engine.network import count_flops

    if not isinstance(spec, ModelSpec):
        spec = load_model_spec(spec)
    backends = [b for b in backends]
    batch_sizes = [int(b) for b in batch_sizes]
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch sizes must be positive integers, got {batch_sizes}")
    if iterations < 1 or warmup < 0 or patients < 1:
        raise ValueError("need iterations >= 1, warmup >= 0, patients >= 1")
    if reference not in (True, False, "model", "full"):
        raise ValueError(f"reference must be True, False or 'model', got {reference!r}")
    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    machine = machine_info()
    peak = peak_flops(machine)
    notes: list[str] = []

    folders = _patient_folders(data_root, patients) if data_root is not None else []
    if data_root is not None and len(folders) < patients:
        notes.append(f"only {len(folders)} patient folder(s) under {data_root} (asked for {patients})")
    log(f"model {spec.name} ({spec.weights}); {len(folders)} patient(s); backends {', '.join(backends)}")

    model = load_torch_model(spec)
    flops = int(count_flops(model, spec.input_size))
    del model

    x, input_info = _input_slices(spec, folders, max(batch_sizes + [reference_batch_size]), log)

    model_only: list[dict] = []
    for name in backends:
        model_only.extend(_model_only_rows(name, spec, x, batch_sizes, threads, warmup, iterations, flops, peak, log))

    e2e: list[dict] = []
    if end_to_end and folders:
        for name in backends:
            log(f"{name}: end to end on {len(folders)} patient(s) after 1 warm-up patient")
            row = _end_to_end_row(name, spec, folders, threads, log)
            if row["status"] != "ok":
                log(f"{name} end to end: {row['status']}")
            e2e.append(row)
    elif end_to_end:
        notes.append("end to end skipped: no --data patients (model-only timings use synthetic noise)")

    ref = None
    if reference:
        from segengine.bench.reference import time_reference

        ref = time_reference(x, folders, threads=threads,
                             warmup=warmup if reference_warmup is None else reference_warmup,
                             iterations=iterations if reference_iterations is None else reference_iterations,
                             batch_size=reference_batch_size,
                             end_to_end=(reference != "model") and end_to_end and bool(folders), log=log)
        if ref["model_only"]["batch_size"] != 32:
            notes.append(f"reference model-only timed at batch {reference_batch_size}, not the reference's 32")
        if peak.get("gflops"):
            ref["model_only"]["pct_of_peak"] = 100.0 * ref["model_only"]["gflops_achieved"] / peak["gflops"]
        notes.append(ref["weights_note"])
        ref_slice = ref["model_only"]["per_slice_ms"]
        for row in model_only:
            if row.get("status") == "ok":
                row["speedup_vs_reference"] = ref_slice / row["per_slice_ms"]
        ref_e2e = ref.get("end_to_end")
        if ref_e2e:
            for row in e2e:
                if row.get("status") == "ok":
                    row["speedup_vs_reference"] = ref_e2e["per_patient_s"] / row["per_patient_s"]
                    row["amortized"]["speedup_vs_reference"] = ref_e2e["per_patient_s"] / row["amortized"]["per_patient_s"]
            notes.append("end-to-end speedups compare per-patient wall times; the reference predicts D-2 slices "
                         "on its 256x256 grid, the engine every slice mapped back to the original grid")

    notes += [
        "model-only: per batch size, warm-up calls then timed Backend.infer calls on the same batch; "
        "per-slice ms = p50 batch latency / batch size; throughput = batch size / mean latency",
        f"FLOPs per slice counted by torch.utils.flop_counter on the PyTorch model (2 x MACs); "
        "int8 rows use the same nominal count",
        "speedup_vs_reference: model-only = reference per-slice ms / ours; end to end = reference s per patient / ours",
        PEAK_FORMULA + "; pct_of_peak relative to all cores even when fewer threads are used",
    ]
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine,
        "settings": {
            "model": str(spec.weights), "model_name": spec.name, "model_sha256": spec.sha256,
            "data_root": None if data_root is None else str(data_root), "patients_requested": patients,
            "patients": [f.name for f in folders], "backends": backends, "batch_sizes": batch_sizes,
            "threads": threads, "torch_threads": torch.get_num_threads(), "warmup": warmup,
            "iterations": iterations, "end_to_end": bool(end_to_end), "end_to_end_batch_size": E2E_BATCH_SIZE,
            "reference": reference if isinstance(reference, str) else bool(reference), "input": input_info,
        },
        "model": {"name": spec.name, "architecture": spec.architecture, "input_size": spec.input_size,
                  "flops_per_slice": flops, "gflop_per_slice": flops / 1e9},
        "peak": peak,
        "model_only": model_only,
        "end_to_end": e2e,
        "reference": ref,
        "notes": notes,
        "elapsed_s": time.perf_counter() - started,
    }


# ===================================================================== output
def _fmt(v, spec: str = ".1f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def format_table(result: dict) -> str:
    """A plain-text report of ``run_bench``'s result."""
    m, s, peak = result["machine"], result["settings"], result["peak"]
    out = [
        f"machine: {m['cpu_model']}, {m['cores']} cores ({m['cpu_count']} logical), "
        f"{_fmt(m.get('cpu_mhz'), '.0f')} MHz, GPU: {m.get('gpu') or 'none'}; python {m['python']}, "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v),
        f"peak: {_fmt(peak.get('gflops'))} GFLOP/s ({peak['formula']})",
        f"model: {result['model']['name']}, {result['model']['gflop_per_slice']:.2f} GFLOP/slice; "
        f"threads {s['threads'] or 'default'} (torch {s['torch_threads']}); warm-up {s['warmup']}, "
        f"{s['iterations']} timed iterations; input: {s['input']['source']}",
        "",
        "model only (latency per batch, ms)",
    ]
    rows = []
    for r in result["model_only"]:
        if r.get("status") != "ok":
            rows.append([r["backend"], _fmt(r.get("batch_size"), "d")] + ["-"] * 9 + [r["status"]])
            continue
        lat = r["latency_ms"]
        sp = r.get("speedup_vs_reference")
        rows.append([r["backend"], str(r["batch_size"]), _fmt(lat["p50"]), _fmt(lat["p95"]), _fmt(lat["p99"]),
                     _fmt(lat["mean"]), _fmt(r["per_slice_ms"], ".2f"), _fmt(r["throughput_slices_s"]),
                     _fmt(r["gflops_achieved"]), _fmt(r.get("pct_of_peak"), ".0f"),
                     (_fmt(sp, ".1f") + "x") if sp else "-", f"ok ({r['iterations']} it)"])
    ref = result.get("reference")
    if ref:
        mo = ref["model_only"]
        lat = mo["latency_ms"]
        rows.append(["reference", str(mo["batch_size"]), _fmt(lat["p50"]), _fmt(lat["p95"]), _fmt(lat["p99"]),
                     _fmt(lat["mean"]), _fmt(mo["per_slice_ms"], ".2f"), _fmt(mo["throughput_slices_s"]),
                     _fmt(mo["gflops_achieved"]), _fmt(mo.get("pct_of_peak"), ".0f"), "1.0x",
                     f"ok ({mo['iterations']} it)"])
    out.append(_table(["backend", "batch", "p50", "p95", "p99", "mean", "ms/slice", "slices/s", "GFLOP/s", "%peak",
                       "vs ref", "status"], rows))
    if ref:
        out.append(f"reference: {ref['gflop_per_slice']:.2f} GFLOP/slice, {ref['weights_note']}")

    if result["end_to_end"] or (ref and ref.get("end_to_end")):
        out += ["", f"end to end per patient (s; read -> segment(native, batch {E2E_BATCH_SIZE}) -> write results; "
                    "mean after 1 warm-up patient)"]
        rows = []
        for r in result["end_to_end"]:
            if r.get("status") != "ok":
                rows.append([r["backend"]] + ["-"] * 10 + [r["status"]])
                continue
            st = r["stages_s"]
            sp = r.get("speedup_vs_reference")
            am = r["amortized"]
            rows.append([r["backend"], _fmt(r["per_patient_s"], ".2f")] + [_fmt(st[k], ".3f") for k in STAGES]
                        + [_fmt(am["per_patient_s"], ".2f"), _fmt(r["load_s"], ".2f"),
                           (_fmt(sp, ".1f") + "x") if sp else "-",
                           (_fmt(am.get("speedup_vs_reference"), ".1f") + "x") if am.get("speedup_vs_reference") else "-",
                           "ok"])
        re2e = ref.get("end_to_end") if ref else None
        if re2e:
            st = re2e["stages_s"]
            rows.append(["reference", _fmt(re2e["per_patient_s"], ".2f")] + [_fmt(st[k], ".3f") for k in STAGES]
                        + ["-", _fmt(ref["load_s"], ".2f"), "1.0x", "-", "ok"])
        out.append(_table(["backend", "per patient", *STAGES, "amortized", "load", "vs ref", "amort. vs ref",
                           "status"], rows))
        if result["end_to_end"]:
            pts = next((r["patients"] for r in result["end_to_end"] if r.get("status") == "ok"), s["patients"])
            out.append(f"patients: {', '.join(pts)}; amortized = total wall / N with slices of "
                       f"{next((r['amortized']['patients_per_chunk'] for r in result['end_to_end'] if r.get('status') == 'ok'), '-')}"
                       " patients sharing batches (run --patients)")
    if result.get("notes"):
        out += ["", "notes:"] + [f"  - {n}" for n in result["notes"]]
    return "\n".join(out)


def plot(result: dict, path) -> Path:
    """PNG: latency per slice and throughput per backend x batch size, end to end per patient;
    dashed lines mark the reference."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    ok = [r for r in result["model_only"] if r.get("status") == "ok"]
    names = list(dict.fromkeys(r["backend"] for r in result["model_only"]))
    sizes = sorted({r["batch_size"] for r in ok}) or result["settings"]["batch_sizes"]
    ref = result.get("reference")
    e2e = [r for r in result.get("end_to_end", []) if r.get("status") == "ok"]
    ref_e2e = ref.get("end_to_end") if ref else None
    panels = 3 if (e2e or ref_e2e) else 2
    fig = Figure(figsize=(5.2 * panels, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, panels, i + 1) for i in range(panels)]
    width = 0.8 / max(len(names), 1)
    xs = np.arange(len(sizes))
    for j, name in enumerate(names):
        rows = {r["batch_size"]: r for r in ok if r["backend"] == name}
        lat = [rows[b]["per_slice_ms"] if b in rows else np.nan for b in sizes]
        thr = [rows[b]["throughput_slices_s"] if b in rows else np.nan for b in sizes]
        label = name if rows else f"{name} (not available)"
        axes[0].bar(xs + (j - (len(names) - 1) / 2) * width, lat, width, label=label)
        axes[1].bar(xs + (j - (len(names) - 1) / 2) * width, thr, width, label=label)
    if ref:
        mo = ref["model_only"]
        axes[0].axhline(mo["per_slice_ms"], color="k", ls="--", lw=1, label=f"reference (batch {mo['batch_size']})")
        axes[1].axhline(mo["throughput_slices_s"], color="k", ls="--", lw=1, label=f"reference (batch {mo['batch_size']})")
    for ax, title, ylabel, key in ((axes[0], "model-only latency per slice (p50)", "ms per slice", "per_slice_ms"),
                                   (axes[1], "model-only throughput", "slices / s", "throughput_slices_s")):
        vals = [r[key] for r in ok] + ([ref["model_only"][key]] if ref else [])
        vals = [v for v in vals if v and v > 0]
        if vals:
            ax.set_ylim(min(vals) / 2, max(vals) * 2)
        ax.set_xlim(-0.5, len(sizes) - 0.5)
        ax.set_xticks(xs, [str(b) for b in sizes])
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    if panels == 3:
        ax = axes[2]
        labels, bottoms = [], None
        bars = [(r["backend"], r["stages_s"]) for r in e2e]
        if ref_e2e:
            bars.append(("reference", ref_e2e["stages_s"]))
        labels = [b[0] for b in bars]
        bottoms = np.zeros(len(bars))
        for stage in STAGES:
            vals = np.array([b[1][stage] for b in bars])
            ax.bar(labels, vals, bottom=bottoms, label=stage)
            bottoms += vals
        for r in e2e:
            ax.plot([r["backend"]], [r["amortized"]["per_patient_s"]], "k_", ms=18)
        ax.set_ylabel("seconds per patient")
        ax.set_title("end to end per patient (- : amortized, --patients)")
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.legend(fontsize=7)
    m = result["machine"]
    fig.suptitle(f"segengine bench: {result['model']['name']} on {m['cpu_model']} "
                 f"({result['settings']['threads'] or 'default'} threads)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
