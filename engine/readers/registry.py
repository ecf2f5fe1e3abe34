"""Which reader opens a patient, picked by what the path is (nnU-Net's reader-by-ending idea).

A patient is opened once: :func:`open_patient` finds its reader, its id and its input files and
checks every header against the limits, without decoding a pixel; :meth:`OpenedPatient.read`
then decodes it without checking again. ``read_patient`` is the two in one call.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from segengine.engine.core.errors import DataError, NoSlicesError, NotAFolderError
from segengine.engine.readers import dicom, kaggle, nifti
from segengine.engine.readers.nnunet import images_folder, other_channel_files
from segengine.engine.readers.volume import DEFAULT_LIMITS, PatientVolume, SliceLimits, check_patient_id


@dataclass(frozen=True)
class Reader:
    """One input layout: how to recognise it, name it, check its headers and decode it."""

    name: str
    matches: Callable[[Path], bool]
    patient_id: Callable[[Path], str]
    # (patient id, input files, what read() needs so it checks nothing again), from one pass over the input
    check: Callable[[Path, SliceLimits, bool], tuple[str, list[Path], Any]]
    read: Callable[[Path, Any, bool, SliceLimits], PatientVolume]


def _missing_nifti(path: Path) -> bool:
    """A path named like a NIfTI file that is no file (a 4D case is given by its file)."""
    return nifti.is_nifti_file(path) and not path.is_file() and not nifti.is_nifti_case(path)


def _nifti_id(path: Path) -> str:
    if _missing_nifti(path):
        raise NotAFolderError(f"{path}: no such file" if not path.exists() else f"{path}: not a NIfTI file")
    return check_patient_id(nifti.case_id(path), path, nifti.CASE_ID_SOURCE)


def _dicom_id(path: Path) -> str:
    return check_patient_id(dicom.study_id(path), path, dicom.STUDY_ID_SOURCE)


def _kaggle_check(path: Path, limits: SliceLimits, with_mask: bool) -> tuple[str, list[Path], Any]:
    patient_id, images, masks = kaggle.list_slices(path)  # the folder is listed once: the id comes with it
    masks = masks if with_mask else {}
    kaggle.check_headers(path, images, masks, limits)  # bad sizes refused before a model is even loaded
    return patient_id, [*images.values(), *masks.values()], (patient_id, images, masks)


READERS: tuple[Reader, ...] = (
    Reader("nifti", lambda p: _missing_nifti(p) or nifti.is_nifti_case(p), _nifti_id,
           lambda p, limits, with_mask: (_nifti_id(p), *nifti.open_nifti_case(p, limits, with_mask)),
           lambda p, opened, with_mask, limits: nifti.read_nifti_case(p, with_mask, limits, opened)),
    Reader("dicom", dicom.is_dicom_study, _dicom_id,
           lambda p, limits, with_mask: (_dicom_id(p), dicom.check_dicom_study(p, limits), None),
           lambda p, _, with_mask, limits: dicom.read_dicom_study(p, with_mask, limits)),
    Reader("kaggle", lambda p: True, lambda p: kaggle.list_slices(p)[0], _kaggle_check,
           lambda p, listing, with_mask, limits: kaggle.read_slices(p, *listing, limits)),
)


def reader_for(path: Path) -> Reader:
    return next(r for r in READERS if r.matches(path))


def patient_id_of(path: Path) -> str:
    """The patient id (slices' prefix, NIfTI case or DICOM study name); DataError for ill ones."""
    path = Path(path)
    return reader_for(path).patient_id(path)


@dataclass
class OpenedPatient:
    """A patient whose id, input files and headers are known; nothing decoded yet."""

    source: Path
    patient_id: str
    files: list[Path]
    reader: Reader
    limits: SliceLimits
    with_mask: bool
    listing: Any = None

    def read(self) -> PatientVolume:
        return self.reader.read(self.source, self.listing, self.with_mask, self.limits)


def open_patient(path: str | os.PathLike, limits: SliceLimits = DEFAULT_LIMITS, with_mask: bool = True) -> OpenedPatient:
    """Id, input files and every header checked against ``limits``; raises DataError for ill input."""
    path = Path(path)
    reader = reader_for(path)
    patient_id, files, listing = reader.check(path, limits, with_mask)
    return OpenedPatient(path, patient_id, files, reader, limits, with_mask, listing)


def read_patient(path: str | os.PathLike, with_mask: bool = True, limits: SliceLimits = DEFAULT_LIMITS) -> PatientVolume:
    """Open and read a patient into a (D, H, W, 3) volume, slices in slice-number order."""
    return open_patient(path, limits, with_mask).read()


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


def list_patients(root: str | os.PathLike) -> list[Path]:
    """Patient folders and NIfTI case files under a dataset root (sorted); other files (data.csv) are ignored.
    An nnU-Net dataset folder (holding ``imagesTs/``) lists the cases of its ``imagesTs/``."""
    root = Path(root)
    if not root.is_dir():
        raise NotAFolderError(f"{root}: no such folder" if not root.exists() else f"{root}: not a folder")
    root = images_folder(root) or root  # an nnU-Net dataset folder: its imagesTs/ cases (labelsTs/ is their truth)
    channels = other_channel_files(root)  # a flat nnU-Net folder: one patient per case, its <case>_0000 file
    folders = sorted(p for p in root.iterdir() if not p.name.startswith(".") and (p.is_dir() or nifti.is_nifti_file(p))
                     and p not in channels)
    if not folders:
        raise NoSlicesError(f"{root}: no patient folders or NIfTI case files")
    return folders
