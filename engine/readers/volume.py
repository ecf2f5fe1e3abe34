"""What every reader returns and checks: the patient volume, the header limits and the one
rule for patient ids (a plain, visible folder name in OUT); patient lists from text files."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from segengine.engine.core.errors import DataError, PatientIdError

DEFAULT_MAX_MEMORY_GB = 2.0  # --max-memory's default (engine.budget)


@dataclass(frozen=True)
class SliceLimits:
    """What a patient may claim in its file headers; checked before decoding."""

    min_side: int = 32
    max_side: int = 1024
    max_slices: int = 512
    max_memory: int = int(DEFAULT_MAX_MEMORY_GB * 10**9)  # bytes per patient, estimated from the headers (engine.budget)


DEFAULT_LIMITS = SliceLimits()


_PATH_SEPARATORS = {"/", "\\", os.sep, os.altsep} - {None}


PATIENT_ID_MAX_LEN = 200


# OUT's own entries beside the patients' folders, never a patient id (compared case-insensitively: a
# case-insensitive filesystem has one INDEX.HTML): the review page (outputs.review_page.INDEX_PAGE; a
# test holds them equal) and the nnU-Net-layout predictions OUT/<case>.nii.gz (outputs.writer).
RESERVED_OUT_NAMES = ("index.html",)
RESERVED_OUT_SUFFIXES = (".nii.gz",)


ACCEPTED_LAYOUTS = ("Kaggle slices <patient>_<n>.tif/.png/.webp; a 4D case.nii[.gz]; a folder of "
                    "<case>_flair.nii[.gz] (+ _pre, _post, _mask); nnU-Net <case>_0000/_0001/_0002.nii[.gz] "
                    "(+ dataset.json); a DICOM study (one folder or sub-folders per series)")


@dataclass
class PatientVolume:
    """One patient's slices in slice-number order."""

    patient_id: str
    folder: Path
    slice_numbers: list[int]
    image: np.ndarray  # (D, H, W, 3) uint8
    mask: np.ndarray | None = None  # (D, H, W) uint8 0/255, or None without ground truth
    image_paths: list[Path] = field(default_factory=list)
    spacing_mm: tuple[float, float, float] | None = None  # (slice, row, column); unknown for Kaggle slices
    source_grid: object | None = None  # NIfTI input: readers.nifti.NiftiGrid, to write masks back onto its grid
    # (D, H, W, 3) float32 at the source's own depth (NIfTI, DICOM: rescaled, not windowed), for
    # plan v2; None where the source is 8-bit already (Kaggle slices: ``image`` is the data)
    intensities: np.ndarray | None = None

    @property
    def num_slices(self) -> int:
        return int(self.image.shape[0])


SLICE_PREFIX_ID = ("the slices' name prefix", "rename the slices <patient>_<n>.tif")


def check_patient_id(patient_id: str, folder: Path, source: tuple[str, str] = SLICE_PREFIX_ID) -> str:
    """The one rule for patient ids: a plain, visible folder name in OUT, not one of OUT's own files.

    ``source`` says where the id came from and how to change it (the slices' prefix here;
    a NIfTI case's file or folder name in ``readers.nifti``).
    """
    why = None
    if patient_id in (".", "..") or patient_id.startswith("."):
        why = "starts with '.'"
    elif any(sep in patient_id for sep in _PATH_SEPARATORS):
        why = "contains a path separator"
    elif len(patient_id) > PATIENT_ID_MAX_LEN:
        why = f"is longer than {PATIENT_ID_MAX_LEN} characters"
    elif not patient_id.isprintable():
        why = "contains control characters"
    elif patient_id.casefold() in RESERVED_OUT_NAMES or patient_id.casefold().endswith(RESERVED_OUT_SUFFIXES):
        why = "is the name of a file segengine writes in OUT beside the patients' folders"
    if why:
        raise PatientIdError(f"{folder}: patient id {patient_id[:60]!r} ({source[0]}) {why}; {source[1]}")
    return patient_id


PATIENT_LIST_MAX_BYTES = 16 << 20


def read_patient_list(path: str | os.PathLike) -> list[str]:
    """Patient ids from a UTF-8 text file, one per line; blank lines and # comments skipped.

    A list that names no patient, or one patient twice (scored twice, "PASS on 2 patients"
    from one), is refused; so is anything but a regular file (a FIFO would block)."""
    from segengine.engine.core.fsguard import read_regular

    path = Path(path)
    try:
        text = read_regular(path, "patient list", PATIENT_LIST_MAX_BYTES).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: patient list is not UTF-8 text (byte {exc.start})") from None
    ids = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not ids:
        raise DataError(f"{path}: patient list names no patient (only blank lines or # comments)")
    seen: set[str] = set()
    for pid in ids:
        if pid in seen:
            raise DataError(f"{path}: patient {pid} is listed twice")
        seen.add(pid)
    return ids
