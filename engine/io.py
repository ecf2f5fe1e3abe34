"""Patient folders of 2D MRI slices (the Kaggle ``kaggle_3m`` layout) in and out.

A patient folder holds ``<patient>_<n>.<ext>`` images (HxWx3 uint8: pre-contrast, FLAIR,
post-contrast) and optional ``<patient>_<n>_mask.<ext>`` masks (HxW uint8, 0/255).
Readers are picked by file ending, as in nnU-Net; every ill case raises a subclass of
:class:`DataError` whose message is one line naming the file.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".webp")
SLICE_NAME = re.compile(r"^(?P<patient>.+?)_(?P<n>\d+)(?P<mask>_mask)?(?P<ext>\.(?:tif|tiff|png|webp))$", re.IGNORECASE)


class DataError(ValueError):
    """Bad input data; ``str(err)`` is a one-line message that names the file."""


class NotAFolderError(DataError):
    pass


class NoSlicesError(DataError):
    pass


class UnreadableSliceError(DataError):
    pass


class SliceFormatError(DataError):
    pass


class SliceShapeError(DataError):
    pass


class SliceNumberingError(DataError):
    pass


class OrphanMaskError(DataError):
    pass


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
    source_grid: object | None = None  # NIfTI input: nifti_io.NiftiGrid, to write masks back onto its grid

    @property
    def num_slices(self) -> int:
        return int(self.image.shape[0])


# ---------------------------------------------------------------- readers by file ending
def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    return tifffile.imread(path)


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return np.asarray(im)


READERS = {".tif": _read_tiff, ".tiff": _read_tiff, ".png": _read_pil, ".webp": _read_pil}


def read_slice(path: Path) -> np.ndarray:
    """Read one 2D slice; any decoder failure becomes :class:`UnreadableSliceError`."""
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise SliceFormatError(f"{path}: unsupported file type (expected one of {', '.join(IMAGE_EXTENSIONS)})")
    try:
        return reader(path)
    except DataError:
        raise
    except Exception as exc:  # decoders raise many types for truncated/corrupt files
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnreadableSliceError(f"{path}: not a readable image ({first})") from None


def _as_rgb_uint8(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise SliceFormatError(f"{path}: {arr.dtype} pixels, expected 8-bit (uint8) slices")
    if arr.ndim == 2:
        return np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim == 3 and arr.shape[2] == 3:
        return arr
    if arr.ndim == 3 and arr.shape[2] == 4:
        raise SliceFormatError(f"{path}: RGBA slice, expected 3 channels (pre-contrast, FLAIR, post-contrast)")
    raise SliceFormatError(f"{path}: array of shape {arr.shape}, expected HxWx3 or HxW")


def _as_mask(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.dtype != np.uint8 and arr.dtype != bool:
        raise SliceFormatError(f"{path}: {arr.dtype} mask, expected uint8 0/255")
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise SliceFormatError(f"{path}: mask of shape {arr.shape}, expected HxW")
    return np.where(arr > 0, np.uint8(255), np.uint8(0))


def list_slices(folder: Path) -> tuple[str, dict[int, Path], dict[int, Path]]:
    """Index a patient folder: (patient id, {n: image path}, {n: mask path}); no pixels read."""
    folder = Path(folder)
    if not folder.exists():
        raise NotAFolderError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise NotAFolderError(f"{folder}: not a folder")
    images: dict[int, Path] = {}
    masks: dict[int, Path] = {}
    prefixes: set[str] = set()
    for entry in sorted(os.listdir(folder)):
        m = SLICE_NAME.match(entry)
        if not m or not (folder / entry).is_file():
            continue  # README, data.csv, hidden files: not slices
        n = int(m.group("n"))
        prefixes.add(m.group("patient"))
        target = masks if m.group("mask") else images
        if n in target:
            raise SliceNumberingError(f"{folder / entry}: duplicate slice number {n} (also {target[n].name})")
        target[n] = folder / entry
    if not images:
        if masks:
            n = min(masks)
            raise OrphanMaskError(f"{masks[n]}: mask without its image slice")
        raise NoSlicesError(f"{folder}: no image slices named <patient>_<n>.tif/.png/.webp")
    if len(prefixes) > 1:
        raise SliceNumberingError(f"{folder}: slices of several patients ({', '.join(sorted(prefixes))})")
    orphans = sorted(set(masks) - set(images))
    if orphans:
        raise OrphanMaskError(f"{masks[orphans[0]]}: mask without its image slice")
    numbers = sorted(images)
    expected = list(range(numbers[0], numbers[0] + len(numbers)))
    if numbers != expected:
        missing = sorted(set(expected) - set(numbers))[0] if set(expected) - set(numbers) else numbers[-1]
        raise SliceNumberingError(f"{folder}: slice {missing} is missing (slices must be numbered without gaps)")
    if masks and len(masks) != len(images):
        n = sorted(set(images) - set(masks))[0]
        raise OrphanMaskError(f"{images[n]}: no mask for this slice while other slices have masks")
    return prefixes.pop(), images, masks


def patient_id_of(path: Path) -> str:
    """The patient id (and OUT/<id> folder name) of a patient folder or NIfTI case file."""
    from segengine.engine.nifti_io import case_id, is_nifti_file

    return case_id(path) if is_nifti_file(path) else path.name


def check_patient(path: Path) -> None:
    """Fail on a missing, empty or ill-named patient before anything heavy is loaded."""
    from segengine.engine.nifti_io import check_nifti_case, is_nifti_case, is_nifti_file

    if is_nifti_file(path) and not path.is_file():
        raise NotAFolderError(f"{path}: no such file" if not path.exists() else f"{path}: not a NIfTI file")
    if is_nifti_case(path):
        check_nifti_case(path)
    else:
        list_slices(path)


def read_patient(folder: str | os.PathLike, with_mask: bool = True) -> PatientVolume:
    """Read a patient (Kaggle slice folder or NIfTI case) into a (D, H, W, 3) volume ordered by slice number."""
    from segengine.engine.nifti_io import is_nifti_case, read_nifti_case

    folder = Path(folder)
    if is_nifti_case(folder):
        return read_nifti_case(folder, with_mask)
    patient_id, images, masks = list_slices(folder)
    numbers = sorted(images)
    slices = []
    shape = None
    for n in numbers:
        path = images[n]
        arr = _as_rgb_uint8(read_slice(path), path)
        if shape is None:
            shape = arr.shape
        elif arr.shape != shape:
            raise SliceShapeError(f"{path}: size {arr.shape[1]}x{arr.shape[0]} differs from the patient's {shape[1]}x{shape[0]}")
        slices.append(arr)
    mask = None
    if with_mask and masks:
        mslices = []
        for n in numbers:
            path = masks[n]
            arr = _as_mask(read_slice(path), path)
            if arr.shape != shape[:2]:
                raise SliceShapeError(f"{path}: mask size {arr.shape[1]}x{arr.shape[0]} differs from its image {shape[1]}x{shape[0]}")
            mslices.append(arr)
        mask = np.stack(mslices)
    return PatientVolume(
        patient_id=patient_id,
        folder=folder,
        slice_numbers=numbers,
        image=np.stack(slices),
        mask=mask,
        image_paths=[images[n] for n in numbers],
    )


def list_patients(root: str | os.PathLike) -> list[Path]:
    """Patient folders and NIfTI case files under a dataset root (sorted); other files (data.csv) are ignored."""
    from segengine.engine.nifti_io import is_nifti_file

    root = Path(root)
    if not root.is_dir():
        raise NotAFolderError(f"{root}: no such folder" if not root.exists() else f"{root}: not a folder")
    folders = sorted(p for p in root.iterdir() if not p.name.startswith(".") and (p.is_dir() or is_nifti_file(p)))
    if not folders:
        raise NoSlicesError(f"{root}: no patient folders or NIfTI case files")
    seen: dict[str, Path] = {}
    for p in folders:
        if patient_id_of(p) in seen:
            raise DataError(f"{p}: same patient id as {seen[patient_id_of(p)].name} (results would share OUT/{patient_id_of(p)})")
        seen[patient_id_of(p)] = p
    return folders


def read_patient_list(path: str | os.PathLike) -> list[str]:
    """Patient ids from a text file, one per line; blank lines and # comments skipped."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise DataError(f"{path}: cannot read patient list ({exc.strerror})") from None
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def write_mask_slices(folder: Path, patient_id: str, slice_numbers: list[int], mask: np.ndarray) -> list[Path]:
    """Write ``<patient>_<n>_mask.tif`` (uint8 0/255) for every slice, the Kaggle naming."""
    import tifffile

    paths = []
    for n, sl in zip(slice_numbers, mask):
        p = folder / f"{patient_id}_{n}_mask.tif"
        tifffile.imwrite(p, np.where(sl > 0, np.uint8(255), np.uint8(0)))
        paths.append(p)
    return paths
