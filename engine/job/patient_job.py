"""One patient from its input to ``OUT/<patient id>/``: the unit of work of every run.

``run --patient`` and each Ray worker call :func:`process_patient`; ``run --patients`` runs the
same :class:`PatientJob` stage methods overlapped (``job.batch``); ``validate``, ``evaluate``,
``cv`` and the export checks call :func:`segment`, the same preprocess/infer/finish functions
without the files. A job owns what must hold for every patient:

- it is opened once (``readers.registry.open_patient``): id, input files and every header
  checked against the limits before a pixel is decoded, and never checked again;
- OUT/<id> never is, contains or lies inside an input (``outputs.results_dir.refuse_overlap``);
- a lock ``OUT/.<id>.segengine-lock``: two processes never write one patient; taking it
  repairs what a killed writer left (``outputs.results_dir``);
- one atomic write of every output (``outputs.writer``), a full disk reported as one line.
"""
from __future__ import annotations

import errno
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from segengine.engine.core.errors import DiskFullError, OutputError, ResourceError
from segengine.engine.inference.backends.base import Backend
from segengine.engine.inference.ensemble import describe_plan
from segengine.engine.inference.predict import predict_patient, views_agreement
from segengine.engine.outputs.report import report_dict
from segengine.engine.outputs.results_dir import PatientLock, recover_interrupted, refuse_existing, refuse_overlap
from segengine.engine.outputs.writer import write_patient
from segengine.engine.postprocessing.finish import Segmentation, finish_patient
from segengine.engine.postprocessing.postprocess import PostprocessConfig
from segengine.engine.postprocessing.quality import Review
from segengine.engine.preprocessing.preprocess import preprocess_patient
from segengine.engine.readers.registry import open_patient
from segengine.engine.readers.volume import DEFAULT_LIMITS, PatientVolume, SliceLimits

DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
DISK_FULL_BYTES = 16 * 2**20  # less free space than this after a failed write: the disk is full


@dataclass
class RunSetup:
    """What every patient of one run shares: the loaded backend and its plan, post-processing, output choices."""

    backend: Backend
    name: str
    spec: Any  # ModelSpec or InferencePlan
    post: PostprocessConfig = field(default_factory=PostprocessConfig)
    batch_size: int = 32
    overwrite: bool = False
    gif: bool = False
    limits: SliceLimits = DEFAULT_LIMITS
    review: Review = field(init=False)
    plan: dict | None = field(init=False)

    def __post_init__(self) -> None:
        self.review = Review.for_plan(self.spec)
        self.plan = describe_plan(self.spec)


class PatientJob:
    """Open, lock, read, preprocess, infer, finish and write one patient.

    Use as a context manager (it releases the lock). The stages run in this order, by
    :func:`process_patient` one after the other or by ``job.batch`` overlapped across patients.
    """

    def __init__(self, folder: Path, out: Path, overwrite: bool = False, limits: SliceLimits = DEFAULT_LIMITS):
        self.folder, self.out, self.overwrite, self.limits = Path(folder), Path(out), overwrite, limits
        self.opened = open_patient(self.folder, limits)
        self.patient_id = self.opened.patient_id
        self.target = self.out / self.patient_id
        refuse_overlap(self.target, [self.folder, *self.opened.files])
        self.lock = PatientLock(self.out, self.patient_id)
        self.timings: dict[str, float] = {}
        self.volume: PatientVolume | None = None
        self.pre = None
        self.probs: np.ndarray | None = None
        self.agreement: float | None = None

    def refuse_existing(self) -> None:
        refuse_existing(self.out, self.patient_id, self.overwrite)

    def start(self) -> "PatientJob":
        """Take the lock (PatientBusyError if held), repair a killed writer's leftovers, check for results."""
        self.refuse_existing()
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
            recover_interrupted(self.out, self.patient_id)
            self.refuse_existing()  # finished meanwhile by another process
        except BaseException as exc:
            self.lock.release()
            if isinstance(exc, OSError) and not isinstance(exc, OutputError):
                raise self._output_error(exc, "taking the patient lock or repairing an interrupted write") from None
            raise
        return self

    @contextmanager
    def _stage(self, name: str | None, doing: str) -> Iterator[None]:
        """Time a stage; running out of memory is one line naming the patient."""
        t = time.perf_counter()
        try:
            yield
        except MemoryError:
            if self.volume is None:
                raise ResourceError(f"{self.folder}: out of memory {doing}; nothing written to {self.out}") from None
            raise self.out_of_memory(self.volume) from None
        if name:
            self.timings[name] = time.perf_counter() - t

    def read(self) -> PatientVolume:
        with self._stage("read", "reading the slices"):
            self.volume = self.opened.read()
        return self.volume

    def preprocess(self, setup: RunSetup) -> None:
        with self._stage("preprocess", "preprocessing"):
            self.pre = preprocess_patient(self.volume, "native", setup.spec.preprocessing)

    def infer(self, setup: RunSetup) -> None:
        with self._stage("infer", "segmenting"):
            self.probs = predict_patient(setup.backend, self.pre, setup.batch_size)
        self.agreement = views_agreement(setup.backend)
        # the finish stage needs the geometry, not the model input (30-70 MB): free it while it waits
        self.pre = replace(self.pre, images=np.empty((0,) + self.pre.images.shape[1:], dtype=np.float32))

    def finish(self, setup: RunSetup) -> dict:
        """Post-process, estimate the quality, write every output; returns the report."""
        with self._stage(None, "post-processing"):
            seg = finish_patient(self.volume, self.pre, self.probs, "native", setup.post, self.timings, self.agreement)
            rep = report_dict(self.volume, seg, setup.name, setup.spec.sha256, setup.spec.name, asdict(setup.post),
                              self.timings, review=setup.review, plan=setup.plan)
        self.write(self.volume, seg, rep, setup.gif)
        return rep

    def write(self, volume: PatientVolume, seg: Segmentation, report: dict, gif: bool = False) -> Path:
        """All outputs into OUT/<id> at once; a full disk leaves nothing partial and says so."""
        if volume.patient_id != self.patient_id:
            raise OutputError(f"{self.folder}: read patient {volume.patient_id!r}, expected {self.patient_id!r}")
        try:
            return write_patient(self.out, volume, seg, report, overwrite=self.overwrite, gif=gif,
                                 probabilities=getattr(self.limits, "save_probabilities", False))
        except OutputError:
            raise
        except OSError as exc:
            raise self._output_error(exc, "writing the results") from None
        except MemoryError:
            raise ResourceError(f"{self.out}: out of memory writing {self.patient_id}; nothing partial kept") from None

    def _disk_full(self, exc: OSError) -> bool:
        """ENOSPC, or a short write without errno (numpy: "65536 requested and 28416 written") on a full disk."""
        if exc.errno in DISK_FULL_ERRNOS:
            return True
        try:
            st = os.statvfs(self.out)
        except OSError:
            return False
        return st.f_bavail * st.f_frsize < DISK_FULL_BYTES

    def _output_error(self, exc: OSError, doing: str) -> Exception:
        if self._disk_full(exc):
            return DiskFullError(f"{self.out}: no space left on device while {doing} of {self.patient_id} "
                                 "(nothing partial kept; free space and re-run to resume)")
        return OutputError(f"{self.target}: cannot write ({exc.strerror or exc}) while {doing}")

    def out_of_memory(self, volume: PatientVolume) -> ResourceError:
        return ResourceError(f"{self.folder}: out of memory segmenting {volume.num_slices} slices of "
                             f"{volume.image.shape[2]}x{volume.image.shape[1]}; nothing written to {self.out}")

    def close(self) -> None:
        self.lock.release()

    def __enter__(self) -> "PatientJob":
        try:
            return self.start()
        except BaseException:  # a signal raised after start() took the lock, before `with` owns it
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()


def process_patient(job: PatientJob | Path, out: Path, setup: RunSetup,
                    extra_timings: dict[str, float] | None = None) -> dict:
    """Lock, read, preprocess, infer, finish and atomically write one patient; returns its report.

    ``job`` is an opened PatientJob (``run --patient`` opens it before loading the model) or a
    patient's path. Raises ResultsExistError or PatientBusyError (skip), DataError (bad input),
    OutputError, ResourceError.
    """
    if not isinstance(job, PatientJob):
        job = PatientJob(job, out, setup.overwrite, setup.limits)
    job.timings.update(extra_timings or {})
    with job:
        job.read()
        job.preprocess(setup)
        job.infer(setup)
        return job.finish(setup)


def segment(volume: PatientVolume, backend: Backend, protocol: str = "native", batch_size: int = 32,
            post: PostprocessConfig = PostprocessConfig(), pre=None) -> Segmentation:
    """Segment a patient already in memory with the job's own stage functions; ``protocol`` is
    "native" (every slice, original grid) or "reference" (the course's grid, for its scores).
    ``pre``: the patient already preprocessed for this protocol (validate runs two backends on one)."""
    if protocol not in ("native", "reference"):
        raise ValueError(f"unknown protocol {protocol!r}")
    timings: dict[str, float] = {}
    t = time.perf_counter()
    if pre is None:
        pre = preprocess_patient(volume, protocol, backend.spec.preprocessing)
    timings["preprocess"] = time.perf_counter() - t
    t = time.perf_counter()
    grid_prob = predict_patient(backend, pre, batch_size)
    timings["infer"] = time.perf_counter() - t
    return finish_patient(volume, pre, grid_prob, protocol, post, timings, views_agreement(backend))
