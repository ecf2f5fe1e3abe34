"""A study received from the network, segmented by ``run``'s own job.

The model is loaded once per process (``load_setup``, the same plan/backend resolution as
``run``); each study is a folder of DICOM files named by its StudyInstanceUID, segmented by
``job.patient_job.PatientJob`` stage by stage (same series selection, refusals, memory budget,
outputs in OUT/<StudyInstanceUID>/ as ``run --patient`` writes them). Only inference is
serialised when several studies are in flight: one loaded backend serves them all.
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from segengine.engine.core.errors import DataError, DiskFullError, PatientBusyError, ResultsExistError
from segengine.engine.inference import registry
from segengine.engine.inference.ensemble import load_plan
from segengine.engine.job.batch import _summary_line, patient_error
from segengine.engine.job.patient_job import PatientJob, RunSetup
from segengine.engine.outputs.dicom_seg import SEG_NAME
from segengine.engine.postprocessing.postprocess import PostprocessConfig
from segengine.engine.readers.volume import DEFAULT_LIMITS, SliceLimits

UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def check_uid(value: object, what: str = "StudyInstanceUID") -> str:
    """A DICOM UID (digits and dots, at most 64 characters): safe as a folder name."""
    text = str(value or "").strip().rstrip("\x00")
    if not text or len(text) > 64 or not UID.match(text):
        raise DataError(f"{what} {text[:80]!r} is not a DICOM UID (digits and dots, at most 64 characters)")
    return text


def load_setup(backend_name: str = "auto", model: Path | None = None, threads: int | None = None,
               limits: SliceLimits = DEFAULT_LIMITS, overwrite: bool = False, batch_size: int = 32,
               threshold: float = 0.5) -> tuple[RunSetup, float]:
    """The model and backend ``run`` would use (``load_plan``, ``registry.resolve``), loaded; (setup, load seconds)."""
    spec = load_plan(model, None, False)
    name = registry.resolve(backend_name, spec, threads)
    post = PostprocessConfig.from_card(spec.card, largest_component=True, fill_holes_2d=False, threshold=threshold)
    t = time.perf_counter()
    backend = registry.create(name, spec, threads=threads).load()
    return RunSetup(backend, name, spec, post, batch_size, overwrite, False, limits), time.perf_counter() - t


@dataclass
class StudyOutcome:
    study: str  # the StudyInstanceUID, as OUT/<study> names it
    status: str  # "done", "exists", "busy", "full" (OUT's disk: worth another try later), "failed"
    line: str  # one line for the log
    report: dict | None = None
    seg: Path | None = None  # OUT/<study>/<study>_seg.dcm when written

    @property
    def ok(self) -> bool:
        return self.status == "done"


class StudySegmenter:
    """Segments study folders into OUT with one loaded backend; safe to call from several threads."""

    def __init__(self, setup: RunSetup, out: Path):
        self.setup, self.out = setup, Path(out)
        self._infer = threading.Lock()

    def segment(self, folder: Path) -> StudyOutcome:
        study = Path(folder).name
        t0 = time.perf_counter()
        try:
            job = PatientJob(folder, self.out, self.setup.overwrite, self.setup.limits)
            with job:
                job.read()
                job.preprocess(self.setup)
                with self._infer:
                    job.infer(self.setup)
                report = job.finish(self.setup)
        except ResultsExistError as exc:
            return StudyOutcome(study, "exists", f"{exc}; nothing sent")
        except PatientBusyError as exc:
            return StudyOutcome(study, "busy", f"{exc}; nothing sent")
        except DiskFullError as exc:
            return StudyOutcome(study, "full", str(exc))
        except MemoryError:
            return StudyOutcome(study, "failed", f"{study}: out of memory; nothing written, nothing sent")
        except Exception as exc:  # noqa: BLE001 - one bad study is one line; the node goes on
            return StudyOutcome(study, "failed", f"{study}: {patient_error(exc)}; nothing sent")
        seg = self.out / report["patient"] / SEG_NAME.format(patient=report["patient"])
        return StudyOutcome(study, "done", _summary_line(report, time.perf_counter() - t0), report,
                            seg if seg.is_file() else None)

    def close(self) -> None:
        self.setup.backend.close()


_INDEX = threading.Lock()


def write_index(out: Path, log: Callable[[str], None]) -> None:
    """OUT/index.html, as ``run`` writes it after a batch (the patient pages were just written: not
    re-rendered); one writer at a time; a failure is a warning."""
    from segengine.engine.outputs.review_page import write_index as _write

    try:
        with _INDEX:
            _write(out, refresh_patients=False)
    except OSError as exc:
        log(f"segengine: warning: review page not written ({exc.strerror or exc})")
