"""``segengine bench``: model-only latency/throughput per backend and batch size, end-to-end
time per patient through the engine's own patient job, and the same for the course's
reference program, on this machine, in one run.

    result = run_bench(spec, data_root="kaggle_3m", patients=10)
    print(format_table(result)); plot(result, "bench.png"); json.dump(result, fh)

By concern: :mod:`~segengine.bench.machine` (CPU model, ISA, clock, nominal peaks),
:mod:`~segengine.bench.measure` (timing), :mod:`~segengine.bench.report` (table and plot),
:mod:`~segengine.bench.reference` (the reference pipeline); this module runs them in order.
"""
from __future__ import annotations

import datetime as _dt
import time
from typing import Callable, Iterable

from segengine.bench.machine import describe_cpu, machine_info, peak
from segengine.bench.measure import E2E_BATCH_SIZE, end_to_end_row, input_slices, model_only_rows, patient_folders
from segengine.bench.report import format_table, plot  # noqa: F401 - the bench's public API

DEFAULT_BACKENDS = ("torch", "onnxruntime", "onnxruntime-int8", "openvino", "openvino-int8", "tensorrt")
SCHEMA = "segengine-bench/2"


def _load_average() -> float | None:
    import os

    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def _loaded(load: dict) -> bool:
    """Another process was competing for the cores: more than a quarter core busy beside ours at start."""
    cores = load.get("cores") or 1
    return load.get("start") is not None and load["start"] > 0.25 * cores


def record_for_auto(spec, model_only: list[dict], threads: int | None) -> dict | None:
    """Each timed backend's ms/slice at its largest batch into auto's cache (inference/speed.py) for
    this CPU and model: ``auto`` then picks by this bench instead of its own short probe. Not for
    an ensemble/TTA plan (its rows time several models at once)."""
    from segengine.engine.inference import registry, speed
    from segengine.engine.inference.ensemble import InferencePlan

    if isinstance(spec, InferencePlan):
        return None
    best: dict[str, tuple[int, float]] = {}
    for row in model_only:
        if row.get("status") == "ok" and row["backend"] in registry.AUTO_CANDIDATES:
            if row["batch_size"] >= best.get(row["backend"], (0, 0.0))[0]:
                best[row["backend"]] = (row["batch_size"], row["per_slice_ms"])
    if not best:
        return None
    ms = {name: value for name, (_, value) in best.items()}
    where = speed.record_ms(speed.cpu_key(), spec.sha256, threads, ms, "bench")
    return {"cpu": speed.cpu_key(), "threads": threads, "ms_per_slice": ms, "cache": None if where is None else str(where)}


def run_bench(spec, data_root=None, patients: int = 3, backends: Iterable[str] = DEFAULT_BACKENDS,
              batch_sizes: Iterable[int] = (1, 8, 32), threads: int | None = None, warmup: int = 3,
              iterations: int = 20, end_to_end: bool = True, reference: bool | str = True,
              reference_batch_size: int = 32, reference_warmup: int | None = None,
              reference_iterations: int | None = None, log: Callable[[str], None] = print) -> dict:
    """Time every backend x batch size (model only), each backend end to end, and the reference.

    ``spec`` is a :class:`~segengine.engine.model.ModelSpec`, an ensemble/TTA
    :class:`~segengine.engine.ensemble.InferencePlan`, or a path to a weights file.
    ``reference``: True = model-only and end-to-end, "model" = model-only only, False = skip.
    ``reference_warmup`` / ``reference_iterations`` default to ``warmup`` / ``iterations``.
    Returns a JSON-serializable dict (see ``format_table`` for a human view).
    """
    import torch

    from segengine.engine.inference.ensemble import InferencePlan, members_of
    from segengine.engine.model.network import count_flops
    from segengine.engine.model.spec import ModelSpec, load_model_spec, load_torch_model

    if not isinstance(spec, (ModelSpec, InferencePlan)):
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
    peaks = peak(machine)
    notes: list[str] = []
    log(describe_cpu(machine))

    folders = patient_folders(data_root, patients) if data_root is not None else []
    if data_root is not None and len(folders) < patients:
        notes.append(f"only {len(folders)} patient folder(s) under {data_root} (asked for {patients})")
    log(f"model {spec.name} ({spec.weights}); {len(folders)} patient(s); backends {', '.join(backends)}")

    # an ensemble / TTA plan runs every member on every view: its cost per slice is their sum
    views = (2 if getattr(spec, "tta", False) else 1)
    flops = 0
    for member in members_of(spec):
        model = load_torch_model(member)
        flops += views * int(count_flops(model, member.input_size))
        del model

    x, input_info = input_slices(spec, folders, max(batch_sizes + [reference_batch_size]), log)

    model_only: list[dict] = []
    for name in backends:
        model_only.extend(model_only_rows(name, spec, x, batch_sizes, threads, warmup, iterations, flops, peaks, log))
    recorded_for_auto = record_for_auto(spec, model_only, threads)

    e2e: list[dict] = []
    if end_to_end and folders:
        for name in backends:
            log(f"{name}: end to end on {len(folders)} patient(s) after 1 warm-up patient")
            row = end_to_end_row(name, spec, folders, threads, log)
            if row["status"] != "ok":
                log(f"{name} end to end: {row['status']}")
            e2e.append(row)
    elif end_to_end:
        notes.append("end to end skipped: no --data patients (model-only timings use synthetic noise)")

    ref = None
    if reference:
        from segengine.bench.reference import time_reference
        from segengine.engine.preprocessing.preprocess import centre_slice

        ref = time_reference(centre_slice(x, spec.context_slices), folders, threads=threads,
                             warmup=warmup if reference_warmup is None else reference_warmup,
                             iterations=iterations if reference_iterations is None else reference_iterations,
                             batch_size=reference_batch_size,
                             end_to_end=(reference != "model") and end_to_end and bool(folders), log=log)
        if ref["model_only"]["batch_size"] != 32:
            notes.append(f"reference model-only timed at batch {reference_batch_size}, not the reference's 32")
        if peaks["fp32"]["gflops"]:
            ref["model_only"]["pct_of_peak"] = 100.0 * ref["model_only"]["gflops_achieved"] / peaks["fp32"]["gflops"]
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

    load = {"start": (machine.get("loadavg_at_start") or [None])[0], "end": _load_average(), "cores": machine.get("usable_cpus")}
    if _loaded(load):
        notes.append(f"LOADED machine (1-min load average {load['start']} at start, {load['end']} at end, on "
                     f"{load['cores']} cores): figures for decisions only, not for README")
    notes += [
        "model-only: per batch size, warm-up calls then timed Backend.infer calls on the same batch; "
        "per-slice ms = p50 batch latency / batch size; throughput = batch size / mean latency",
        f"FLOPs per slice counted by torch.utils.flop_counter on the PyTorch model (2 x MACs); "
        "int8 rows use the same nominal count",
        "speedup_vs_reference: model-only = reference per-slice ms / ours; end to end = reference s per patient / ours; "
        "both measured in this run, on this machine",
        f"fp32 peak: {peaks['fp32']['formula']}; int8 peak: {peaks['int8']['formula']}; pct_of_peak compares fp32 "
        "rows with the fp32 peak and int8 rows with the int8 peak, relative to all usable cores even when fewer "
        f"threads are used; {peaks['caveat']}",
        "end to end: the engine's patient job (job.patient_job.process_patient: read, preprocess, infer, map back, "
        "post-process, write every output) per patient; amortized: the run --patients loop (stages overlapped)",
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
        "model": {"name": spec.name, "architecture": members_of(spec)[0].architecture, "input_size": spec.input_size,
                  "flops_per_slice": flops, "gflop_per_slice": flops / 1e9,
                  **({"plan": spec.describe()} if isinstance(spec, InferencePlan) else {})},
        "peak": peaks,
        "load_average": load,
        "recorded_for_auto": recorded_for_auto,
        "model_only": model_only,
        "end_to_end": e2e,
        "reference": ref,
        "notes": notes,
        "elapsed_s": time.perf_counter() - started,
    }
