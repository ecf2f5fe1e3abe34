"""The GPU check in one command (issue 33, item 7): verdicts, bench and scaling table, one JSON.

    python3 bench/gpu_check.py PATIENTS --json gpu_check.json [--record-into DIR]

PATIENTS is a folder of a few patients with ground truth (the shared LGG folders, or Kaggle
``kaggle_3m`` ones) copied beside the repository, so that both travel to a GPU machine (keep the
two under 64 MiB: a patient is about 2 MB). It needs only a Python with torch and the engine's
light dependencies (numpy, scipy, scikit-image, tifffile, pillow, click, tqdm, nibabel); it does
not need segengine installed (the repository is put on the path). In order, within ``--budget-s``:

1. machine: GPU model, capability, driver, CUDA and torch versions; CPU and cores;
2. verdicts: each available GPU backend (torch-cuda, torch-cuda-bf16, torch-cuda-graphs) against
   torch fp32 on every patient, on run's path (``validate``: segment(), balanced batches, the card's
   post-processing); with ``--record-into DIR`` recorded into a copy of the model there (its
   ``<model>.gpu-verdicts.json`` is what a session copies into models/);
3. bench: model-only ms/slice per backend and batch size on real slices; cold start (a fresh
   process: start to the first patient's mask written);
4. scaling: amortized patients/s of ``run --patients`` over ``--copies`` x the patients (copied under
   new ids) split across 1..N processes (threads: cores / N), per backend (the GPU choice and a CPU one).

A step that does not fit the budget is recorded as skipped, never left half-measured. ``--device cpu``
(with ``--dry-run``: one patient, small sizes) runs the same steps on a machine without a GPU.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCHEMA = "segengine-gpu-check/1"
GPU_BACKENDS = ("torch-cuda", "torch-cuda-graphs", "torch-cuda-bf16")
CPU_SCALING_BACKEND = "onnxruntime-int8"
EXIT_BAD_INPUT = 2
SCALING_PATIENTS = 80  # the table: the ten validation patients copied to 80
RUN_PATH_MODULES = ("numpy", "scipy", "skimage", "tifffile", "PIL", "click", "tqdm", "nibabel")
NO_PEAKS = {"fp32": {"gflops": None}, "int8": {"gops": None}}  # a GPU's nominal peak is not modelled


def _importable() -> str | None:
    """Make ``segengine`` importable (the repository as a namespace package when not installed); returns
    the PYTHONPATH entry worker processes need (None: installed)."""
    try:
        import segengine.engine  # noqa: F401

        return None
    except ImportError:
        shim = Path(tempfile.mkdtemp(prefix="segengine-path-"))
        (shim / "segengine").symlink_to(REPO, target_is_directory=True)
        sys.path.insert(0, str(shim))
        return str(shim)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n")[0])
    p.add_argument("patients", type=Path, help="a folder of a few patients with ground truth")
    p.add_argument("--json", dest="json_path", type=Path, default=Path("gpu_check.json"), help="where the JSON goes")
    p.add_argument("--model", type=Path, default=None, help="model .pt (default: the shipped one)")
    p.add_argument("--record-into", type=Path, default=None, help="record the verdicts into a copy of the model here")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: check the script without a GPU")
    p.add_argument("--workers", default="1,2,4,8,16", help="process counts of the scaling table (comma list)")
    p.add_argument("--copies", type=int, default=None,
                   help="the patients are copied this many times for the scaling table (default: to about 80 patients)")
    p.add_argument("--batch-sizes", default="1,32,128", help="model-only batch sizes")
    p.add_argument("--budget-s", type=float, default=270.0, help="stop starting steps after this many seconds")
    p.add_argument("--dry-run", action="store_true", help="one patient, small sizes: checks the script, measures nothing")
    a = p.parse_args(argv)
    try:
        a.workers = sorted({int(v) for v in a.workers.split(",") if v.strip()})
        a.batch_sizes = sorted({int(v) for v in a.batch_sizes.split(",") if v.strip()})
    except ValueError:
        p.error("--workers and --batch-sizes are comma lists of whole numbers")
    if not a.workers or min(a.workers) < 1 or not a.batch_sizes or min(a.batch_sizes) < 1 or (a.copies is not None and a.copies < 1):
        p.error("--workers, --batch-sizes and --copies must be positive")
    if a.dry_run:
        a.workers, a.batch_sizes, a.copies = a.workers[:1], a.batch_sizes[:2], 1
    return a


class Budget:
    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def allows(self, need_s: float = 0.0) -> bool:
        return self.left() > need_s


def machine(device: str) -> dict:
    from segengine.bench.machine import machine_info
    from segengine.engine.inference import gpu

    info = {"cpu": {k: v for k, v in machine_info().items() if k != "flags"}, "device": device}
    why = gpu.why_no_cuda()
    info["cuda"] = gpu.identity() if why is None else {"unavailable": why}
    return info


def verdict_rows(spec, patients: Path, names, budget: Budget, record_spec=None, log=print) -> list[dict]:
    from segengine.engine.evaluation.validate import compute
    from segengine.engine.inference import registry, verdict

    rows = []
    for name in names:
        why = registry.why_unavailable(name, spec)
        if why:
            rows.append({"backend": name, "status": f"not available: {why}"})
            continue
        if not budget.allows(30):
            rows.append({"backend": name, "status": "skipped: time budget"})
            continue
        t = time.perf_counter()
        result = compute(spec, patients, None, name, "torch")
        row = {"backend": name, "status": "ok", "seconds": round(time.perf_counter() - t, 2),
               **{k: result.get(k) for k in ("passed", "precision", "worst", "means", "patients_count", "device", "path",
                                             "tolerances", "numerics")},
               "patients": result["patients"]}
        if record_spec is not None:
            row["recorded_in"] = str(verdict.record(record_spec, {**result, "model_sha256": record_spec.sha256}))
        log(f"verdict {name}: {'PASS' if result['passed'] else 'FAIL'} worst |dDSC| {result['worst']['abs_delta_dsc']:.5f}, "
            f"agreement {result['worst']['agreement']:.5f}")
        rows.append(row)
    return rows


def bench_rows(spec, folders, names, batch_sizes, budget: Budget, dry_run: bool, log=print) -> list[dict]:
    from segengine.bench.measure import input_slices, model_only_rows

    x, _ = input_slices(spec, folders, max(batch_sizes), log)
    rows = []
    for name in names:
        if not budget.allows(20):
            rows.append({"backend": name, "status": "skipped: time budget"})
            continue
        rows += model_only_rows(name, spec, x, batch_sizes, None, 1 if dry_run else 5, 2 if dry_run else 20,
                                0, NO_PEAKS, log)
    return rows


def _segengine(args: list[str], env: dict) -> list[str]:
    return [sys.executable, "-c", "import sys; from segengine.engine.cli import main; sys.argv[0] = 'segengine'; main()",
            *args]


def _env(pythonpath: str | None, threads: int | None = None) -> dict:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def cold_start(patient: Path, model: Path | None, backend: str, work: Path, pythonpath: str | None) -> dict:
    """A fresh process: start to the patient's mask written (``run --patient``), wall clock."""
    out = work / "cold"
    args = ["run", "--patient", str(patient), "--out", str(out), "--backend", backend, "--overwrite"]
    if model:
        args += ["--model", str(model)]
    t = time.perf_counter()
    res = subprocess.run(_segengine(args, {}), env=_env(pythonpath), capture_output=True, text=True)
    wall = time.perf_counter() - t
    row = {"backend": backend, "seconds": round(wall, 3), "exit": res.returncode}
    if res.returncode != 0:
        row["error"] = (res.stderr.strip().splitlines() or [""])[-1][:300]
    else:
        reports = list(out.glob("*/report.json"))
        if reports:
            rep = json.loads(reports[0].read_text())
            row.update({"resolved_backend": rep.get("backend"), "stages_s": rep.get("timings_s")})
    return row


def copy_patients(folders: list[Path], copies: int, dest: Path) -> list[Path]:
    """Each patient ``copies`` times under new ids (files renamed too: a patient's id is its files' prefix)."""
    made = []
    for k in range(copies):
        for folder in folders:
            new_id = f"{folder.name}c{k}"
            target = dest / new_id
            target.mkdir(parents=True)
            for f in folder.iterdir():
                if f.is_file():
                    shutil.copyfile(f, target / f.name.replace(folder.name, new_id, 1))
            made.append(target)
    return made


def scaling_row(patients: list[Path], workers: int, cores: int, backend: str, model: Path | None, work: Path,
                pythonpath: str | None) -> dict:
    """``workers`` processes of ``run --patients`` over disjoint shares; amortized patients/s over the whole wall."""
    threads = max(1, cores // workers)
    tag = f"{backend}_{workers}"
    procs = []
    t = time.perf_counter()
    for i in range(workers):
        share = patients[i::workers]
        if not share:
            continue
        listing = work / f"{tag}_{i}.txt"
        listing.write_text("\n".join(p.name for p in share) + "\n")
        args = ["run", "--patients", str(share[0].parent), "--patients-file", str(listing), "--out", str(work / tag / str(i)),
                "--backend", backend, "--threads", str(threads)]
        if model:
            args += ["--model", str(model)]
        procs.append(subprocess.Popen(_segengine(args, {}), env=_env(pythonpath), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    errors = [(p.wait(), p.stderr.read()) for p in procs]
    wall = time.perf_counter() - t
    done = len(list((work / tag).glob("*/*/report.json")))
    row = {"backend": backend, "workers": workers, "threads": threads, "patients": len(patients), "done": done,
           "seconds": round(wall, 3), "patients_per_s": round(done / wall, 3) if wall > 0 else None}
    bad = [(code, err) for code, err in errors if code != 0]
    if bad:
        row["error"] = (bad[0][1].strip().splitlines() or [""])[-1][:300]
    return row


def run_check(a: argparse.Namespace, pythonpath: str | None, log=print) -> dict:
    from segengine.engine.inference import registry
    from segengine.engine.model.spec import load_model_spec
    from segengine.engine.readers.registry import list_patients

    budget = Budget(a.budget_s)
    folders = list_patients(a.patients)
    if a.dry_run:
        folders = folders[:1]
    spec = load_model_spec(a.model)
    result = {"schema": SCHEMA, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "model": {"name": spec.name, "sha256": spec.sha256}, "patients": [f.name for f in folders],
              "dry_run": bool(a.dry_run), "machine": machine(a.device)}
    cores = result["machine"]["cpu"].get("usable_cpus") or os.cpu_count() or 1
    record_spec = None
    if a.record_into is not None:
        from segengine.engine.model.spec import card_path

        a.record_into.mkdir(parents=True, exist_ok=True)
        for f in (spec.weights, card_path(spec.weights)):
            shutil.copy(f, a.record_into / f.name)
        record_spec = load_model_spec(a.record_into / spec.weights.name)
    gpu_names = GPU_BACKENDS if a.device == "cuda" else ()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        data = work / "data"
        data.mkdir()
        for f in folders:  # validate reads a folder of patients: the selected ones
            shutil.copytree(f, data / f.name)
        result["verdicts"] = verdict_rows(spec, data, gpu_names, budget, record_spec, log)
        bench_names = ["torch", *gpu_names] if a.device == "cuda" else ["torch"]
        result["bench"] = bench_rows(spec, folders, bench_names, a.batch_sizes, budget, a.dry_run, log)
        # auto as this machine resolves it, with the verdicts just recorded (in the copy) when recorded
        auto_model = record_spec.weights if record_spec is not None else a.model
        auto = registry.resolve("auto", record_spec or spec)
        result["auto"] = auto
        result["cold_start"] = cold_start(folders[0], auto_model, "auto", work, pythonpath) if budget.allows(30) else \
            {"status": "skipped: time budget"}
        copies = copy_patients(folders, a.copies or -(-SCALING_PATIENTS // len(folders)), work / "copies")
        rows = []
        scaling_backends = [auto] + ([CPU_SCALING_BACKEND] if a.device == "cuda" and auto != CPU_SCALING_BACKEND
                                     and registry.why_unavailable(CPU_SCALING_BACKEND, spec) is None else [])
        for backend in scaling_backends:
            for n in a.workers:
                if n > cores:
                    continue
                if not budget.allows(20):
                    rows.append({"backend": backend, "workers": n, "status": "skipped: time budget"})
                    continue
                row = scaling_row(copies, n, cores, backend, auto_model if backend == auto else a.model, work, pythonpath)
                log(f"scaling {backend} x{n}: {row['patients_per_s']} patients/s ({row['done']}/{row['patients']})")
                rows.append(row)
        result["scaling"] = rows
    result["seconds"] = round(budget.seconds - budget.left(), 1)
    return result


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if not a.patients.is_dir():
        print(f"gpu_check: {a.patients}: no such folder of patients", file=sys.stderr)
        return EXIT_BAD_INPUT
    pythonpath = _importable()
    try:
        import importlib

        for module in RUN_PATH_MODULES:  # some load only when a patient is written (nibabel): check them now
            importlib.import_module(module)
        from segengine.engine.inference import gpu
        from segengine.engine.job import batch  # noqa: F401 - the run path's imports, all at once
        from segengine.engine.evaluation import validate  # noqa: F401
    except ImportError as exc:
        print(f"gpu_check: missing Python package {exc.name!r}: install it, or carry its wheel to a machine without an index",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    if a.device == "cuda" and gpu.why_no_cuda():
        print(f"gpu_check: --device cuda, but {gpu.why_no_cuda()} (--device cpu checks the script)", file=sys.stderr)
        return EXIT_BAD_INPUT
    from segengine.engine.core.errors import DataError, ModelError
    from segengine.engine.readers.registry import list_patients

    try:
        if not list_patients(a.patients):
            raise DataError(f"{a.patients}: no patients in it")
        result = run_check(a, pythonpath, log=lambda line: print(line, flush=True))
    except (DataError, ModelError) as exc:
        print(f"gpu_check: {(str(exc).splitlines() or [''])[0]}", file=sys.stderr)
        return EXIT_BAD_INPUT
    a.json_path.parent.mkdir(parents=True, exist_ok=True)
    a.json_path.write_text(json.dumps(result, indent=1, default=str))
    print(f"gpu_check: wrote {a.json_path} in {result['seconds']} s (auto: {result['auto']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
