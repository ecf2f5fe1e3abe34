"""`segengine run` and `segengine evaluate --model`: patients through the pipeline, in batches."""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from segengine.engine import backends as registry
from segengine.engine.io import DEFAULT_LIMITS, DataError, NotAFolderError, SliceLimits, list_patients, read_patient
from segengine.engine.metrics import volume_metrics
from segengine.engine.model import load_model_spec
from segengine.engine.outputs import (DiskFullError, OutputError, ResourceError, ResultsExistError, check_out_dir,
                                      report_dict)
from segengine.engine.patient_job import (PatientBusyError, PatientJob, has_result, patient_id_of, process_patient,
                                          tidy_out, unique_patient_ids)
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
    busy: list[str] = field(default_factory=list)  # another process held the patient's lock
    failed: list[tuple[str, str]] = field(default_factory=list)
    not_started: list[str] = field(default_factory=list)  # after a full disk stopped the job
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
        if self.busy:
            line += f", skipped {len(self.busy)} (another process is writing them)"
        if self.not_started:
            line += f", not started {len(self.not_started)} (stopped: disk full)"
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


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_patients(patient_dir: Path | None, patients_root: Path | None, out: Path, backend_name: str, model: Path | None,
                 batch_size: int = 32, threads: int | None = None, postprocess: bool = True, fill_holes: bool = False,
                 gif: bool = False, overwrite: bool = False, echo: Callable[..., None] = print,
                 limits: SliceLimits = DEFAULT_LIMITS) -> int:
    """Segment and write; returns the exit code (0 ok, 1 some patients failed)."""
    source = patient_dir if patient_dir is not None else patients_root
    if patient_dir is not None:  # a slice folder or a NIfTI case (file or folder): the job tells which
        job = PatientJob(patient_dir, out, overwrite, limits)  # id, headers and OUT/<id> checked before loading anything
        if has_result(out, job.patient_id) and not overwrite:
            raise ResultsExistError(f"{job.target}: results exist (use --overwrite to replace them)")
    else:
        if not source.exists():
            raise NotAFolderError(f"{source}: no such folder")
        if not source.is_dir():
            raise NotAFolderError(f"{source}: not a folder")
        unique_patient_ids(list_patients(source))  # two patients sharing OUT/<id>: refused before the model loads
    check_out_dir(out, [source])
    for note in tidy_out(out):
        _stderr(f"segengine: {note}")
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
                                  extra_timings={"model_load": load_s}, limits=limits)
            echo(_summary_line(rep, time.perf_counter() - t0))
            return 0
        return _run_many(patients_root, out, backend, name, spec, post, batch_size, overwrite, gif, load_s, echo, limits)
    finally:
        backend.close()


def _run_many(root: Path, out: Path, backend, name: str, spec, post: PostprocessConfig, batch_size: int,
              overwrite: bool, gif: bool, load_s: float, echo, limits: SliceLimits = DEFAULT_LIMITS) -> int:
    """Patients in chunks whose slices share inference batches; each patient is one PatientJob."""
    from tqdm import tqdm

    folders = list_patients(root)
    summary = JobSummary(load_s=load_s)
    t_start = time.perf_counter()
    bar = tqdm(total=len(folders), desc="patients", unit="patient", file=sys.stderr, disable=None)

    def failed(patient: str, exc: BaseException) -> None:
        summary.failed.append((patient, str(exc)))
        bar.write(f"segengine: failed {patient}: {exc}")
        bar.update(1)

    disk_full = False
    for c in range(0, len(folders), PATIENTS_PER_CHUNK):
        chunk, held = [], []  # held: every started job, released whatever happens
        try:
            for folder in folders[c : c + PATIENTS_PER_CHUNK]:
                try:
                    job = PatientJob(folder, out, overwrite, limits)
                    held.append(job)
                    job.start()
                except ResultsExistError:
                    summary.skipped.append(patient_id_of(folder))
                    bar.update(1)
                    continue
                except PatientBusyError as exc:
                    summary.busy.append(patient_id_of(folder))
                    bar.write(f"segengine: {exc}")
                    bar.update(1)
                    continue
                except DiskFullError as exc:
                    failed(folder.name, exc)
                    disk_full = True
                    break
                except (DataError, OutputError) as exc:
                    failed(folder.name, exc)
                    continue
                try:
                    t0 = time.perf_counter()
                    vol = job.read()
                    t1 = time.perf_counter()
                    try:
                        pre = preprocess_patient(vol, "native", spec.input_size)
                    except MemoryError:
                        raise job.out_of_memory(vol) from None
                    chunk.append((job, vol, pre, {"read": t1 - t0, "preprocess": time.perf_counter() - t1}))
                except (DataError, EmptyVolumeError, OSError, ResourceError) as exc:
                    job.close()
                    failed(job.patient_id, exc)
            if not chunk or disk_full:
                continue
            # one inference stream over the slices of every patient in the chunk
            t = time.perf_counter()
            try:
                probs = backend.predict(np.concatenate([model_input(p, backend.spec) for _, _, p, _ in chunk]),
                                        batch_size=batch_size)
            except MemoryError:
                for job, vol, _, _ in chunk:
                    failed(job.patient_id, job.out_of_memory(vol))
                continue
            infer_s = time.perf_counter() - t
            total_slices = sum(len(p.images) for _, _, p, _ in chunk)
            offset = 0
            for k, (job, vol, pre, timings) in enumerate(chunk):
                n = len(pre.images)
                timings["infer"] = infer_s * n / total_slices
                try:
                    seg = finish_patient(vol, pre, probs[offset : offset + n], "native", post, timings)
                    rep = report_dict(vol, seg, name, spec.sha256, spec.name, asdict(post), timings)
                    job.write(vol, seg, rep, gif)
                    summary.done.append(vol.patient_id)
                    bar.write(_summary_line(rep, sum(rep["timings_s"].values())))
                    bar.update(1)
                except DiskFullError as exc:  # stop cleanly: keep what is complete, start nothing more
                    failed(vol.patient_id, exc)
                    summary.not_started = [j.patient_id for j, *_ in chunk[k + 1 :]]
                    disk_full = True
                    break
                except MemoryError:
                    failed(vol.patient_id, job.out_of_memory(vol))
                except (OutputError, OSError, ResourceError) as exc:
                    failed(vol.patient_id, exc)
                finally:
                    job.close()
                offset += n
        finally:
            for job in held:
                job.close()
        if disk_full:
            summary.not_started += [f.name for f in folders[c + PATIENTS_PER_CHUNK :]]
            bar.update(len(summary.not_started))
            break
    bar.close()
    summary.elapsed_s = time.perf_counter() - t_start
    summary.echo(echo)
    return 1 if summary.failed or summary.not_started else 0


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
