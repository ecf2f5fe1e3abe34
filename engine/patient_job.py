"""One patient from its folder to ``OUT/<patient id>/``: the unit of work of every run.

``run --patient``, ``run --patients``, each Ray worker and bench's end-to-end timing go
through :class:`PatientJob`, which owns what must hold for every one of them:

- the patient id: the slices' name prefix, or for a NIfTI case (``case.nii[.gz]`` or a folder
  of ``*_flair.nii[.gz]``) ``nifti_io.case_id``, both checked by ``io.check_patient_id``;
  skip/resume, the results folder and the report all use it;
- the limits (``io.SliceLimits``), checked from the slice or NIfTI headers before decoding;
- OUT/<id> never is, contains or lies inside an input (resolved, symlinks included);
- a lock file ``OUT/.<id>.segengine-lock`` (``flock``): two processes never write one
  patient; the second is told who holds it and skips;
- on taking the lock, a replace that a killed writer left half done is finished or undone and
  its temp folders are removed (``outputs.recover_interrupted``);
- the atomic write (``outputs.write_patient``), with a full disk reported as one line.
"""
from __future__ import annotations

import errno
import fcntl
import os
import time
from dataclasses import asdict
from pathlib import Path

from segengine.engine.fsguard import ForeignEntryError, check_result_entry, open_lock_file
from segengine.engine.io import (DEFAULT_LIMITS, DataError, NotAFolderError, PatientVolume, SliceLimits, check_headers,
                                 check_patient_id, list_slices, read_patient)
from segengine.engine.nifti_io import CASE_ID_SOURCE, case_id, check_nifti_case, is_nifti_case, is_nifti_file
from segengine.engine.dicom_io import STUDY_ID_SOURCE, check_dicom_study, is_dicom_study, study_id
from segengine.engine.outputs import (DiskFullError, OutputError, ResourceError, ResultsExistError, deferred_signals,
                                      recover_interrupted, report_dict, temp_entries, write_patient)
from segengine.engine.ensemble import describe_plan
from segengine.engine.quality import Review
from segengine.engine.pipeline import Segmentation, segment
from segengine.engine.postprocess import PostprocessConfig

LOCK_SUFFIX = ".segengine-lock"
DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
DISK_FULL_BYTES = 16 * 2**20  # less free space than this after a failed write: the disk is full


class PatientBusyError(OutputError):
    """Another process holds the patient's lock in OUT."""


def _lock_path(out: Path, patient_id: str) -> Path:
    return out / f".{patient_id}{LOCK_SUFFIX}"


def _overlap(target: Path, src: Path) -> str | None:
    if target == src:
        return "is"
    if src in target.parents:
        return "lies inside"
    if target in src.parents:
        return "contains"
    return None


def refuse_overlap(target: Path, inputs: list[Path]) -> None:
    """Refuse a results folder that is, contains or lies inside any input (both spellings resolved)."""
    targets = {Path(os.path.abspath(target)), target.resolve()}
    for src in inputs:
        for s in {Path(os.path.abspath(src)), src.resolve()}:
            for t in targets:
                relation = _overlap(t, s)
                if relation:
                    raise OutputError(f"{target}: results folder {relation} the input {src}; inputs are never "
                                      "written to (choose another --out)")


class PatientLock:
    """``flock`` on OUT/.<id>.segengine-lock, removed on release (safely: a waiter re-checks the inode)."""

    def __init__(self, out: Path, patient_id: str):
        self.path = _lock_path(out, patient_id)
        self.target = out / patient_id
        self.fd: int | None = None

    def acquire(self) -> "PatientLock":
        with deferred_signals():  # a lock file is never created without being recorded for release
            return self._acquire()

    def _acquire(self) -> "PatientLock":
        while True:
            fd = open_lock_file(self.path)  # never through a link planted in OUT (fsguard)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise PatientBusyError(f"{self.target}: another segengine process (pid {holder}) is writing this "
                                       "patient; skipped here") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the previous holder removed the file between our open and flock: retry
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self.fd = fd
                return self
            os.close(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        with deferred_signals():
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "PatientLock":
        try:
            return self.acquire()
        except BaseException:  # a signal raised after the lock was taken, before `with` owns it
            self.release()
            raise

    def __exit__(self, *exc) -> None:
        self.release()


def _missing_nifti(path: Path) -> bool:
    """A path named like a NIfTI file that is no file (a 4D case is given by its file)."""
    return is_nifti_file(path) and not path.is_file() and not is_nifti_case(path)


def patient_id_of(folder: Path) -> str:
    """The patient id of a patient: its slices' prefix, or a NIfTI case's name; raises DataError for ill ones."""
    folder = Path(folder)
    if _missing_nifti(folder):
        raise NotAFolderError(f"{folder}: no such file" if not folder.exists() else f"{folder}: not a NIfTI file")
    if is_nifti_case(folder):
        return check_patient_id(case_id(folder), folder, CASE_ID_SOURCE)
    if is_dicom_study(folder):  # engine/dicom_io.py
        return check_patient_id(study_id(folder), folder, STUDY_ID_SOURCE)
    return list_slices(folder)[0]


def _index(folder: Path, limits: SliceLimits) -> tuple[str, list[Path]]:
    """(patient id, input files) with every header checked against ``limits``; no pixels decoded."""
    if _missing_nifti(folder) or is_nifti_case(folder):
        return patient_id_of(folder), check_nifti_case(folder, limits)
    if is_dicom_study(folder):
        return patient_id_of(folder), check_dicom_study(folder, limits)
    patient_id, images, masks = list_slices(folder)
    check_headers(folder, images, masks, limits)  # bad sizes refused before a model is even loaded
    return patient_id, [*images.values(), *masks.values()]


def unique_patient_ids(folders: list[Path]) -> dict[Path, str | None]:
    """``{folder: id}`` of a batch (None for an ill patient, which its job reports); DataError when
    two patients share an id, since their results would share OUT/<id>."""
    ids: dict[Path, str | None] = {}
    seen: dict[str, Path] = {}
    for f in folders:
        try:
            ids[f] = patient_id_of(f)
        except (DataError, OSError):  # ill, or gone since listed: its job reports it
            ids[f] = None
            continue
        if ids[f] in seen:
            raise DataError(f"{f}: same patient id as {seen[ids[f]].name} (results would share OUT/{ids[f]})")
        seen[ids[f]] = f
    return ids


def has_result(out: Path, patient_id: str) -> bool:
    """OUT/<id> is a result folder; ForeignEntryError when a link or file sits there (fsguard)."""
    return check_result_entry(out / patient_id)


class PatientJob:
    """Lock, recover, read, write one patient; use as a context manager (releases the lock)."""

    def __init__(self, folder: Path, out: Path, overwrite: bool = False, limits: SliceLimits = DEFAULT_LIMITS):
        self.folder, self.out, self.overwrite, self.limits = Path(folder), Path(out), overwrite, limits
        self.patient_id, inputs = _index(self.folder, limits)
        self.target = self.out / self.patient_id
        refuse_overlap(self.target, [self.folder, *inputs])
        self.lock = PatientLock(self.out, self.patient_id)

    def start(self) -> "PatientJob":
        """Take the lock (PatientBusyError if held), repair a killed writer's leftovers, check for results."""
        if has_result(self.out, self.patient_id) and not self.overwrite:
            raise ResultsExistError(f"{self.target}: results exist (use --overwrite to replace them)")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
            recover_interrupted(self.out, self.patient_id)
            if has_result(self.out, self.patient_id) and not self.overwrite:  # finished meanwhile by another process
                raise ResultsExistError(f"{self.target}: results exist (use --overwrite to replace them)")
        except BaseException as exc:
            self.lock.release()
            if isinstance(exc, OSError) and not isinstance(exc, OutputError):
                raise self._output_error(exc, "taking the patient lock or repairing an interrupted write") from None
            raise
        return self

    def read(self) -> PatientVolume:
        try:
            return read_patient(self.folder, limits=self.limits)
        except MemoryError:
            raise ResourceError(f"{self.folder}: out of memory reading the slices; "
                                f"nothing written to {self.out}") from None

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


def tidy_out(out: Path) -> list[str]:
    """Repair what dead writers left in OUT (temp folders, half-done replaces, lock files).

    Patients whose lock is held by a live process are left alone. Returns one note per repair.
    """
    notes = []
    names = {name for name, _, _ in temp_entries(out)}
    try:
        names |= {e.name[1:-len(LOCK_SUFFIX)] for e in os.scandir(out)
                  if e.name.startswith(".") and e.name.endswith(LOCK_SUFFIX) and len(e.name) > len(LOCK_SUFFIX) + 1}
    except FileNotFoundError:
        return notes
    for name in sorted(names):
        try:
            with PatientLock(out, name):
                did = recover_interrupted(out, name)
        except PatientBusyError:
            continue
        except ForeignEntryError as exc:  # a planted lock: left alone, said once
            notes.append(str(exc))
            continue
        if did:
            notes.append(f"{out / name}: {did} (left by an interrupted run)")
    return notes


def process_patient(folder: Path, out: Path, backend, name: str | None = None, spec=None,
                    post: PostprocessConfig = PostprocessConfig(), batch_size: int = 32, overwrite: bool = False,
                    gif: bool = False, extra_timings: dict[str, float] | None = None,
                    limits: SliceLimits = DEFAULT_LIMITS) -> dict:
    """Lock, read, segment and atomically write one patient; returns its report.

    ``name``/``spec`` default to the backend's own. Raises ResultsExistError or
    PatientBusyError (skip), DataError (bad input), OutputError, ResourceError.
    """
    name = name or backend.name
    spec = spec or backend.spec
    with PatientJob(folder, out, overwrite, limits) as job:
        t0 = time.perf_counter()
        vol = job.read()
        timings = {**(extra_timings or {}), "read": time.perf_counter() - t0}
        try:
            seg = segment(vol, backend, "native", batch_size, post)
        except MemoryError:
            raise job.out_of_memory(vol) from None
        review = Review.for_plan(spec)
        rep = report_dict(vol, seg, name, spec.sha256, spec.name, asdict(post), {**timings, **seg.timings},
                          review=review, plan=describe_plan(spec))
        job.write(vol, seg, rep, gif)
    return rep
