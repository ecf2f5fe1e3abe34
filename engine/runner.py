"""`segengine run` and `segengine evaluate --model`: patients through the pipeline, stages overlapped."""
from __future__ import annotations

import resource
import sys
import time
from contextlib import closing
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from segengine.engine import backends as registry
from segengine.engine.io import DEFAULT_LIMITS, DataError, NotAFolderError, SliceLimits, list_patients, read_patient
from segengine.engine.metrics import distance_unit, volume_metrics
from segengine.engine.ensemble import describe_plan, load_plan
from segengine.engine.outputs import (DiskFullError, OutputError, ResourceError, ResultsExistError, check_out_dir,
                                      report_dict)
from segengine.engine.patient_job import (PatientBusyError, PatientJob, has_result, process_patient,
                                          tidy_out, unique_patient_ids)
from segengine.engine.pipeline import finish_patient, predict_patient, preprocess_patient, segment, views_agreement
from segengine.engine.postprocess import PostprocessConfig
from segengine.engine.preprocess import EmptyVolumeError
from segengine.engine.quality import Review, summary_text
from segengine.engine.stages import run_stages


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, MiB (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


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
                 limits: SliceLimits = DEFAULT_LIMITS, ensemble: bool | Path | None = None, tta: bool = False) -> int:
    """Segment and write; returns the exit code (0 ok, 1 some patients failed).

    ``ensemble`` (True: the shipped one, or a manifest) and ``tta`` average several models
    and/or mirrored slices: the accurate mode (see engine/ensemble.py)."""
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
    spec = load_plan(model, ensemble, tta)
    name = registry.resolve(backend_name, spec, threads)
    post = PostprocessConfig.from_card(spec.card, largest_component=postprocess, fill_holes_2d=fill_holes)
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
    from tqdm import tqdm

    folders = list_patients(root)
    bar = tqdm(total=len(folders), desc="patients", unit="patient", file=sys.stderr, disable=None)
    summary = segment_patients(folders, out, backend, name, spec, post, batch_size, overwrite, gif,
                               JobSummary(load_s=load_s), log=bar.write, progress=bar.update, limits=limits)
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


def segment_patients(folders: list[Path], out: Path, backend, name: str, spec, post: PostprocessConfig,
                     batch_size: int = 32, overwrite: bool = False, gif: bool = False,
                     summary: JobSummary | None = None, log: Callable[[str], None] = print,
                     progress: Callable[[int], None] = lambda n: None,
                     limits: SliceLimits = DEFAULT_LIMITS) -> JobSummary:
    """The --patients loop: each patient is one PatientJob, run as overlapped stages
    (engine.stages): patient i+1 is locked, read and preprocessed and patient i-1 post-processed
    and written while patient i is inferred; at most one patient waits between stages.

    A bad patient is reported and the others go on; a full disk stops the job cleanly (what
    is complete is kept, nothing more is started).
    """
    summary = summary or JobSummary()
    t_start = time.perf_counter()
    review = Review.for_plan(spec)
    jobs: dict[Path, PatientJob] = {}  # locked patients not yet reported; their locks are released here

    def read(folder: Path):
        job = PatientJob(folder, out, overwrite, limits)
        jobs[folder] = job  # released whatever happens, even if start() is interrupted
        job.start()
        t0 = time.perf_counter()
        vol = job.read()
        t1 = time.perf_counter()
        try:
            pre = preprocess_patient(vol, "native", spec.input_size)
        except MemoryError:
            raise job.out_of_memory(vol) from None
        return job, vol, pre, {"read": t1 - t0, "preprocess": time.perf_counter() - t1}

    def infer(work):
        job, vol, pre, timings = work
        t = time.perf_counter()
        try:
            probs = predict_patient(backend, pre, batch_size)
        except MemoryError:
            raise job.out_of_memory(vol) from None
        timings["infer"] = time.perf_counter() - t
        # the write stage needs the geometry, not the model input (30-70 MB): free it while it waits
        pre = replace(pre, images=np.empty((0,) + pre.images.shape[1:], dtype=np.float32))
        return job, vol, pre, probs, timings, views_agreement(backend)

    def write(work) -> dict:
        job, vol, pre, probs, timings, agreement = work
        try:
            seg = finish_patient(vol, pre, probs, "native", post, timings, agreement)
            rep = report_dict(vol, seg, name, spec.sha256, spec.name, asdict(post), timings,
                              review=review, plan=describe_plan(spec))
        except MemoryError:
            raise job.out_of_memory(vol) from None
        job.write(vol, seg, rep, gif)
        return rep

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


def evaluate_model(data_root: Path, model: str | None, protocol: str, backend_name: str = "torch",
                   patients_file: str | None = None, threads: int | None = None, post: PostprocessConfig = PostprocessConfig(),
                   progress=None, ensemble: bool | Path | None = None, tta: bool = False,
                   limits: SliceLimits = DEFAULT_LIMITS) -> dict:
    """Per-patient metrics of a model (or an ensemble / TTA plan) in the reference or native protocol."""
    from segengine.engine.evaluate import select_patients, summarize_rows

    folders = select_patients(Path(data_root), patients_file)
    spec = load_plan(model, ensemble, tta)
    name = registry.resolve(backend_name, spec, threads)
    rows = []
    with registry.create(name, spec, threads=threads) as backend:
        for folder in (progress(folders) if progress else folders):
            vol = read_patient(folder, limits=limits)
            if vol.mask is None:
                raise DataError(f"{folder}: no ground-truth masks to score against")
            seg = segment(vol, backend, protocol, post=post)
            spacing = vol.spacing_mm if protocol == "native" else None  # the reference grid is resized: pixels
            rows.append({"patient": vol.patient_id, **volume_metrics(seg.mask, seg.truth, spacing=spacing),
                         "hd95_unit": distance_unit(spacing)})
    return summarize_rows(rows, protocol=protocol, model=str(spec.weights), model_sha256=spec.sha256, backend=name,
                          postprocess=asdict(post), **({"plan": describe_plan(spec)} if describe_plan(spec) else {}))
