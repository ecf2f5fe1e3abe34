"""`segengine run` and `segengine evaluate --model`: patients through the pipeline, in batches."""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from segengine.engine import backends as registry
from segengine.engine.io import DataError, NotAFolderError, check_patient, list_patients, patient_id_of, read_patient
from segengine.engine.metrics import volume_metrics
from segengine.engine.model import load_model_spec
from segengine.engine.outputs import OutputError, check_out_dir, report_dict, write_patient
from segengine.engine.pipeline import finish_patient, model_input, preprocess_patient, segment
from segengine.engine.postprocess import PostprocessConfig
from segengine.engine.preprocess import EmptyVolumeError

# Patients whose slices share inference batches in a --patients run: enough to fill
# batches of 32 across patient boundaries, few enough to keep memory small.
PATIENTS_PER_CHUNK = 4


@dataclass
class JobSummary:
    """What a --patients job did, local or on Ray: one record, one closing line."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)
    workers_lost: int = 0
    workers: int = 0  # Ray workers; 0 for a local run
    load_s: float | None = None  # model load of a local run
    elapsed_s: float = 0.0

    @property
    def patients_per_s(self) -> float:
        return len(self.done) / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def line(self) -> str:
        line = f"done {len(self.done)}, skipped {len(self.skipped)} (results exist), failed {len(self.failed)}"
        if self.workers:
            line += f", retried {len(self.retried)} (workers lost {self.workers_lost})"
        line += f" in {self.elapsed_s:.2f} s ({self.patients_per_s:.2f} patients/s"
        if self.workers:
            line += f", {self.workers} Ray workers"
        if self.load_s is not None:
            line += f", model load {self.load_s:.2f} s"
        return line + ")"

    def echo(self, echo: Callable[..., None]) -> None:
        echo(self.line())
        for patient, why in self.failed:
            echo(f"  failed: {patient}: {why}")


def _summary_line(report: dict, total_s: float) -> str:
    tumor = report["tumor_slices"]
    line = (f"{report['patient']}: {report['slices']} slices, tumor on {len(tumor)} "
            f"({report['tumor_volume_px']} px)")
    if "metrics" in report:
        line += f", DSC {report['metrics']['dsc']:.4f}"
    return line + f" [{report['backend']}, {total_s:.2f} s]"


def run_patients(patient_dir: Path | None, patients_root: Path | None, out: Path, backend_name: str, model: Path | None,
                 batch_size: int = 32, threads: int | None = None, postprocess: bool = True, fill_holes: bool = False,
                 gif: bool = False, overwrite: bool = False, echo: Callable[..., None] = print) -> int:
    """Segment and write; returns the exit code (0 ok, 1 some patients failed)."""
    source = patient_dir if patient_dir is not None else patients_root
    if not source.exists():
        raise NotAFolderError(f"{source}: no such folder")
    if patient_dir is None and not source.is_dir():
        raise NotAFolderError(f"{source}: not a folder")
    if patient_dir is not None:
        check_patient(patient_dir)  # fail on an empty/ill-named patient before loading anything
        if (out / patient_id_of(patient_dir)).exists() and not overwrite:
            raise OutputError(f"{out / patient_id_of(patient_dir)}: results exist (use --overwrite to replace them)")
    check_out_dir(out, [source])
    spec = load_model_spec(model)
    name = registry.resolve(backend_name, spec)
    post = PostprocessConfig(largest_component=postprocess, fill_holes_2d=fill_holes)
    t = time.perf_counter()
    backend = registry.create(name, spec, threads=threads).load()
    load_s = time.perf_counter() - t
    try:
        if patient_dir is not None:
            t0 = time.perf_counter()
            rep = process_patient(patient_dir, out, backend, name, spec, post, batch_size, overwrite, gif,
                                  extra_timings={"model_load": load_s})
            echo(_summary_line(rep, time.perf_counter() - t0))
            return 0
        return _run_many(patients_root, out, backend, name, spec, post, batch_size, overwrite, gif, load_s, echo)
    finally:
        backend.close()


def process_patient(folder: Path, out: Path, backend, name: str, spec, post: PostprocessConfig, batch_size: int = 32,
                    overwrite: bool = False, gif: bool = False, extra_timings: dict[str, float] | None = None) -> dict:
    """Read, segment and atomically write one patient; returns its report.

    The one-patient unit of work of `run --patient` and of each Ray worker.
    """
    t0 = time.perf_counter()
    vol = read_patient(folder)
    read_s = time.perf_counter() - t0
    seg = segment(vol, backend, "native", batch_size, post)
    timings = {**(extra_timings or {}), "read": read_s, **seg.timings}
    rep = report_dict(vol, seg, name, spec.sha256, spec.name, asdict(post), timings)
    write_patient(out, vol, seg, rep, overwrite=overwrite, gif=gif)
    return rep


def _run_many(root: Path, out: Path, backend, name: str, spec, post: PostprocessConfig, batch_size: int,
              overwrite: bool, gif: bool, load_s: float, echo) -> int:
    from tqdm import tqdm

    folders = list_patients(root)
    summary = JobSummary(load_s=load_s)
    t_start = time.perf_counter()
    bar = tqdm(total=len(folders), desc="patients", unit="patient", file=sys.stderr, disable=None)
    for c in range(0, len(folders), PATIENTS_PER_CHUNK):
        chunk = []
        for folder in folders[c : c + PATIENTS_PER_CHUNK]:
            if (out / patient_id_of(folder)).exists() and not overwrite:
                summary.skipped.append(patient_id_of(folder))
                bar.update(1)
                continue
            try:
                t0 = time.perf_counter()
                vol = read_patient(folder)
                t1 = time.perf_counter()
                pre = preprocess_patient(vol, "native", spec.input_size)
                timings = {"read": t1 - t0, "preprocess": time.perf_counter() - t1}
                chunk.append((vol, pre, timings))
            except (DataError, EmptyVolumeError, OSError) as exc:
                summary.failed.append((patient_id_of(folder), str(exc)))
                bar.write(f"segengine: skipped {patient_id_of(folder)}: {exc}")
                bar.update(1)
        if not chunk:
            continue
        # one inference stream over the slices of every patient in the chunk
        t = time.perf_counter()
        probs = backend.predict(np.concatenate([model_input(p, backend.spec) for _, p, _ in chunk]), batch_size=batch_size)
        infer_s = time.perf_counter() - t
        total_slices = sum(len(p.images) for _, p, _ in chunk)
        offset = 0
        for vol, pre, timings in chunk:
            n = len(pre.images)
            timings["infer"] = infer_s * n / total_slices
            try:
                seg = finish_patient(vol, pre, probs[offset : offset + n], "native", post, timings)
                rep = report_dict(vol, seg, name, spec.sha256, spec.name, asdict(post), timings)
                write_patient(out, vol, seg, rep, overwrite=overwrite, gif=gif)
                summary.done.append(vol.patient_id)
                bar.write(_summary_line(rep, sum(rep["timings_s"].values())))
            except (OutputError, OSError) as exc:
                summary.failed.append((vol.patient_id, str(exc)))
                bar.write(f"segengine: failed {vol.patient_id}: {exc}")
            offset += n
            bar.update(1)
    bar.close()
    summary.elapsed_s = time.perf_counter() - t_start
    summary.echo(echo)
    return 1 if summary.failed else 0


def evaluate_model(data_root: Path, model: str | None, protocol: str, backend_name: str = "torch",
                   patients_file: str | None = None, threads: int | None = None, post: PostprocessConfig = PostprocessConfig(),
                   progress=None) -> dict:
    """Per-patient metrics of a model in the reference or native protocol."""
    from segengine.engine.evaluate import select_patients, summarize_rows

    folders = select_patients(Path(data_root), patients_file)
    spec = load_model_spec(model)
    name = registry.resolve(backend_name, spec)
    rows = []
    with registry.create(name, spec, threads=threads) as backend:
        for folder in (progress(folders) if progress else folders):
            vol = read_patient(folder)
            if vol.mask is None:
                raise DataError(f"{folder}: no ground-truth masks to score against")
            seg = segment(vol, backend, protocol, post=post)
            rows.append({"patient": vol.patient_id, **volume_metrics(seg.mask, seg.truth)})
    return summarize_rows(rows, protocol=protocol, model=str(spec.weights), model_sha256=spec.sha256, backend=name,
                          postprocess=asdict(post))
