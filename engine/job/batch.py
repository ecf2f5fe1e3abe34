"""`segengine run`: one patient, or a folder of patients with the job's stages overlapped."""
from __future__ import annotations

import sys
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from segengine.engine.core.errors import (DataError, DiskFullError, EmptyVolumeError, NotAFolderError, OutputError,
                                          PatientBusyError, ResourceError, ResultsExistError)
from segengine.engine.core.fsguard import check_out_dir
from segengine.engine.core.runtime import peak_rss_mb
from segengine.engine.inference import registry
from segengine.engine.inference.ensemble import load_plan
from segengine.engine.job.patient_job import PatientJob, RunSetup, process_patient
from segengine.engine.job.stages import run_stages
from segengine.engine.outputs.results_dir import tidy_out
from segengine.engine.postprocessing.postprocess import PostprocessConfig
from segengine.engine.postprocessing.quality import summary_text
from segengine.engine.readers.registry import list_patients, unique_patient_ids
from segengine.engine.readers.volume import DEFAULT_LIMITS, SliceLimits


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
    peak_rss_mb: float | None = None  # of the driver process (a local run: the whole job)
    flagged: list[tuple[str, str]] = field(default_factory=list)  # review flag raised: (patient, estimate and reasons)

    def note_review(self, report: dict) -> None:
        review = report.get("review") or {}
        if review.get("flag"):
            self.flagged.append((report["patient"], summary_text(review)))

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
        if self.peak_rss_mb is not None:
            line += f", peak RSS {self.peak_rss_mb:.0f} MiB"
        return line + ")"

    def echo(self, echo: Callable[..., None]) -> None:
        echo(self.line())
        for patient, why in self.failed:
            echo(f"  failed: {patient}: {why}")
        if self.flagged:
            echo(f"flagged for review: {len(self.flagged)} of {len(self.done)} done")
            for patient, text in self.flagged:
                echo(f"  review: {patient}: {text}")


def _stage_total_s(report: dict) -> float:
    """Seconds of a patient's stages; ``review_page`` is part of ``write`` and not counted twice."""
    return sum(v for k, v in report["timings_s"].items() if k != "review_page")


def _summary_line(report: dict, total_s: float) -> str:
    tumor = report["tumor_slices"]
    line = (f"{report['patient']}: {report['slices']} slices, tumor on {len(tumor)} "
            f"({report['tumor_volume_px']} px)")
    if "metrics" in report:
        line += f", DSC {report['metrics']['dsc']:.4f}"
    line += f" [{report['backend']}, {total_s:.2f} s]"
    text = summary_text(report.get("review"))
    return line + (f" {text}" if text else "")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_patients(patient_dir: Path | None, patients_root: Path | None, out: Path, backend_name: str, model: Path | None,
                 batch_size: int = 32, threads: int | None = None, postprocess: bool = True, fill_holes: bool = False,
                 gif: bool = False, overwrite: bool = False, echo: Callable[..., None] = print,
                 limits: SliceLimits = DEFAULT_LIMITS, ensemble: bool | Path | None = None, tta: bool = False,
                 threshold: float = 0.5, patients_file: str | None = None) -> int:
    """Segment and write; returns the exit code (0 ok, 1 some patients failed).

    ``ensemble`` (True: the shipped one, or a manifest) and ``tta`` average several models
    and/or mirrored slices: the accurate mode (see inference/ensemble.py). ``threshold`` is the
    probability above which a voxel is tumor; ``patients_file`` selects patients of ``patients_root``."""
    source = patient_dir if patient_dir is not None else patients_root
    job, folders = None, None
    if patient_dir is not None:  # opened once: id, headers and OUT/<id> checked before loading anything
        job = PatientJob(patient_dir, out, overwrite, limits)
        job.refuse_existing()
    else:
        if not source.exists():
            raise NotAFolderError(f"{source}: no such folder")
        if not source.is_dir():
            raise NotAFolderError(f"{source}: not a folder")
        folders = select_batch(source, patients_file)
        unique_patient_ids(folders)  # two patients sharing OUT/<id>: refused before the model loads
    check_out_dir(out, [source])
    for note in tidy_out(out):
        _stderr(f"segengine: {note}")
    spec = load_plan(model, ensemble, tta)
    name = registry.resolve(backend_name, spec, threads)
    post = PostprocessConfig.from_card(spec.card, largest_component=postprocess, fill_holes_2d=fill_holes,
                                       threshold=threshold)
    t = time.perf_counter()
    backend = registry.create(name, spec, threads=threads).load()
    load_s = time.perf_counter() - t
    setup = RunSetup(backend, name, spec, post, batch_size, overwrite, gif, limits)
    try:
        if job is not None:
            t0 = time.perf_counter()
            rep = process_patient(job, out, setup, extra_timings={"model_load": load_s})
            echo(_summary_line(rep, time.perf_counter() - t0))
            return 0
        return _run_many(patients_root, out, setup, load_s, echo, folders)
    finally:
        backend.close()


def select_batch(root: Path, patients_file: str | None = None) -> list[Path]:
    """The patients of ``root`` (an nnU-Net dataset folder: its imagesTs cases), only those of ``patients_file``
    when given (by patient id, as OUT/<id> names them)."""
    if not patients_file:
        return list_patients(root)
    from segengine.engine.evaluation.evaluate import select_patients

    return select_patients(root, patients_file)


def _run_many(root: Path, out: Path, setup: RunSetup, load_s: float, echo, folders: list[Path] | None = None) -> int:
    from tqdm import tqdm

    folders = list_patients(root) if folders is None else folders
    bar = tqdm(total=len(folders), desc="patients", unit="patient", file=sys.stderr, disable=None)
    summary = segment_patients(folders, out, setup, JobSummary(load_s=load_s), log=bar.write, progress=bar.update)
    bar.close()
    summary.echo(echo)
    return 1 if summary.failed or summary.not_started else 0


KNOWN_ERRORS = (DataError, EmptyVolumeError, OutputError, OSError, ResourceError)


def patient_error(err: BaseException) -> str:
    """One line for a patient's failure; an unforeseen error type is named, so it is not mistaken for bad input."""
    text = (str(err).strip().splitlines() or [""])[0][:500]
    if isinstance(err, KNOWN_ERRORS):
        return text
    return f"unexpected {type(err).__name__}: {text}"


def segment_patients(folders: list[Path], out: Path, setup: RunSetup, summary: JobSummary | None = None,
                     log: Callable[[str], None] = print, progress: Callable[[int], None] = lambda n: None) -> JobSummary:
    """The --patients loop: each patient is one PatientJob whose stage methods run overlapped
    (job.stages): patient i+1 is locked, read and preprocessed and patient i-1 post-processed
    and written while patient i is inferred; at most one patient waits between stages.

    A bad patient is reported and the others go on; a full disk stops the job cleanly (what
    is complete is kept, nothing more is started).
    """
    summary = summary or JobSummary()
    t_start = time.perf_counter()
    jobs: dict[Path, PatientJob] = {}  # locked patients not yet reported; their locks are released here

    def read(folder: Path) -> PatientJob:
        job = PatientJob(folder, out, setup.overwrite, setup.limits)
        jobs[folder] = job  # released whatever happens, even if start() is interrupted
        job.start()
        job.read()
        job.preprocess(setup)
        return job

    def infer(job: PatientJob) -> PatientJob:
        job.infer(setup)
        return job

    def write(job: PatientJob) -> dict:
        return job.finish(setup)

    stages = [("read", read), ("infer", infer), ("write", write)]
    reported = 0
    try:
        # every failure of one patient is that patient's line (an unforeseen one names its type): the batch goes on
        with closing(run_stages(folders, stages, queue_size=1, halt_on=(DiskFullError,),
                                catch=(Exception,))) as outcomes:
            for outcome in outcomes:
                reported += 1
                job = jobs.pop(outcome.item, None)
                if job is not None:
                    job.close()
                err = outcome.error
                if outcome.ok:
                    summary.done.append(outcome.value["patient"])
                    summary.note_review(outcome.value)
                    log(_summary_line(outcome.value, _stage_total_s(outcome.value)))
                elif isinstance(err, ResultsExistError):  # the job's id: the input may be gone by now
                    summary.skipped.append(job.patient_id if job is not None else outcome.item.name)
                elif isinstance(err, PatientBusyError):
                    summary.busy.append(job.patient_id if job is not None else outcome.item.name)
                    log(f"segengine: {err}")
                else:
                    who = job.patient_id if job is not None else outcome.item.name
                    why = patient_error(err)
                    summary.failed.append((who, why))
                    log(f"segengine: {'skipped' if outcome.stage == 'read' else 'failed'} {who}: {why}")
                progress(1)
        if reported < len(folders):  # halted by a full disk: what is complete is kept, nothing more started
            summary.not_started = [f.name for f in folders[reported:]]
            progress(len(summary.not_started))
    finally:
        for job in jobs.values():  # started but not finished: interrupted or stopped by a full disk
            job.close()
    summary.elapsed_s = time.perf_counter() - t_start
    summary.peak_rss_mb = peak_rss_mb()
    return summary
