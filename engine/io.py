"""Patient folders of 2D MRI slices (the Kaggle ``kaggle_3m`` layout) in and out.

A patient folder holds ``<patient>_<n>.<ext>`` images (HxWx3 uint8: pre-contrast, FLAIR,
post-contrast) and optional ``<patient>_<n>_mask.<ext>`` masks (HxW uint8, 0/255).
Readers are picked by file ending, as in nnU-Net; every ill case raises a subclass of
:class:`DataError` whose message is one line naming the file. Sizes are checked from each
file's header against :class:`SliceLimits` before any pixel is decoded, so a small file that
claims a huge image is refused instead of exhausting memory.
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


class PatientIdError(DataError):
    pass


class SliceLimitError(DataError):
    pass


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
    source_grid: object | None = None  # NIfTI input: nifti_io.NiftiGrid, to write masks back onto its grid

    @property
    def num_slices(self) -> int:
        return int(self.image.shape[0])


# ---------------------------------------------------------------- readers by file ending
def _quiet_tifffile():
    """tifffile logs header oddities as warnings; our own error is the one line the user sees."""
    import logging

    import tifffile

    logging.getLogger("tifffile").setLevel(logging.ERROR)
    return tifffile


def _read_tiff(path: Path) -> np.ndarray:
    from segengine.engine.tiff_fast import read_tiff  # plain Kaggle slices without tifffile's tag parsing

    arr = read_tiff(path)
    # else one page: the header check refused files of several
    return arr if arr is not None else _quiet_tifffile().imread(path, key=0)


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return np.asarray(im)


READERS = {".tif": _read_tiff, ".tiff": _read_tiff, ".png": _read_pil, ".webp": _read_pil}


def _tiff_shape(path: Path) -> tuple[int, ...]:
    """The first page's shape; a file of several pages (each would be decoded) or of samples wider
    than 8 bits is refused here, from the header (the fast path answers only for one 8-bit page)."""
    from segengine.engine.tiff_fast import tiff_shape

    shape = tiff_shape(path)
    if shape is not None:
        return shape
    with _quiet_tifffile().TiffFile(path) as tf:
        page = tf.pages[0]
        pages = len(tf.pages)
        if pages > 1:
            raise SliceFormatError(f"{path}: {pages} pages in one slice file, expected one image per slice")
        if np.dtype(page.dtype).itemsize != 1:
            raise SliceFormatError(f"{path}: {np.dtype(page.dtype)} pixels, expected 8-bit (uint8) slices")
        return tuple(page.shape)


def _pil_shape(path: Path) -> tuple[int, ...]:
    from PIL import Image

    try:
        with Image.open(path) as im:  # lazy: reads the header only
            w, h = im.size
            bands = len(im.getbands())
    except Image.DecompressionBombError as exc:
        raise SliceLimitError(f"{path}: image too large to decode ({str(exc).split('.')[0]})") from None
    return (h, w) if bands == 1 else (h, w, bands)


HEADER_READERS = {".tif": _tiff_shape, ".tiff": _tiff_shape, ".png": _pil_shape, ".webp": _pil_shape}


def _by_ending(readers: dict, path: Path):
    """Call the reader picked by file ending; any decoder failure becomes :class:`UnreadableSliceError`."""
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise SliceFormatError(f"{path}: unsupported file type (expected one of {', '.join(IMAGE_EXTENSIONS)})")
    try:
        return reader(path)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - decoders raise many types for truncated/corrupt files
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnreadableSliceError(f"{path}: not a readable image ({first})") from None


def slice_shape(path: Path) -> tuple[int, ...]:
    """(H, W[, C]) from the file header, no pixels decoded."""
    return _by_ending(HEADER_READERS, path)


GRAYSCALE_MESSAGE = "grayscale slice, expected 3 color channels (pre-contrast, FLAIR, post-contrast)"


SLICE_FILE_SLACK = 32 * 2**20  # tags, metadata, a compressor's worst case beyond the raw pixels


def check_slice_size(path: Path, limits: SliceLimits, is_mask: bool = False) -> tuple[int, ...]:
    """The header's shape, refusing sides outside the limits and one-channel images (before decoding).

    First the file's size: a slice of at most max_side x max_side x 4 bytes is never much larger on
    disk, and a header's tag tables (e.g. millions of strip offsets) take several times their size
    in memory to parse, before any shape can be checked."""
    most = limits.max_side ** 2 * 4 + SLICE_FILE_SLACK
    try:
        size = path.stat().st_size
    except OSError:  # vanished or unreadable: the header reader says so in its own words
        size = 0
    if size > most:
        raise SliceLimitError(f"{path}: {size:,} bytes, more than a slice of at most {limits.max_side}x"
                              f"{limits.max_side} pixels takes ({most:,}); raise --max-side if the slices are larger")
    shape = slice_shape(path)
    if len(shape) < 2:
        raise SliceFormatError(f"{path}: array of shape {shape}, expected HxWx3")
    if not is_mask and (len(shape) == 2 or shape[2] in (1, 2)):
        raise SliceFormatError(f"{path}: {GRAYSCALE_MESSAGE}")
    if len(shape) > 3 or (len(shape) == 3 and shape[2] > 4):
        raise SliceFormatError(f"{path}: array of shape {shape}, expected HxWx3")
    h, w = shape[:2]
    if max(h, w) > limits.max_side:
        raise SliceLimitError(f"{path}: {w}x{h} pixels, larger than the limit of {limits.max_side} px a side")
    if min(h, w) < limits.min_side:
        raise SliceLimitError(f"{path}: {w}x{h} pixels, smaller than the limit of {limits.min_side} px a side")
    return shape


def read_slice(path: Path) -> np.ndarray:
    """Read one 2D slice; any decoder failure becomes :class:`UnreadableSliceError`."""
    return _by_ending(READERS, path)


def _as_rgb_uint8(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.dtype != np.uint8:
        raise SliceFormatError(f"{path}: {arr.dtype} pixels, expected 8-bit (uint8) slices")
    if arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 2)):
        raise SliceFormatError(f"{path}: {GRAYSCALE_MESSAGE}")
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
    values = np.unique(arr)
    positive = values[values > 0]
    if positive.size > 1:
        shown = ", ".join(str(int(v)) for v in values[:6]) + (", ..." if values.size > 6 else "")
        raise SliceFormatError(f"{path}: mask with values {shown}; expected a binary mask: 0 for background and "
                               "one value (e.g. 255) for tumor")
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
        if not m or entry.startswith("._"):
            continue  # README, data.csv, macOS "._" metadata files: not slices
        path = folder / entry
        if not path.is_file():
            kind = ("a dangling symbolic link" if path.is_symlink() and not path.exists() else
                    "a folder" if path.is_dir() else "not a regular file (FIFO, socket or device)")
            raise UnreadableSliceError(f"{path}: named like a slice but is {kind}")
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
        raise NoSlicesError(f"{folder}: no image slices named <patient>_<n>.tif/.png/.webp nor another accepted layout "
                            f"(accepted: {ACCEPTED_LAYOUTS})")
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
    return check_patient_id(prefixes.pop(), folder), images, masks


SLICE_PREFIX_ID = ("the slices' name prefix", "rename the slices <patient>_<n>.tif")


def check_patient_id(patient_id: str, folder: Path, source: tuple[str, str] = SLICE_PREFIX_ID) -> str:
    """The one rule for patient ids: a plain, visible folder name in OUT.

    ``source`` says where the id came from and how to change it (the slices' prefix here;
    a NIfTI case's file or folder name in ``nifti_io``).
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
    if why:
        raise PatientIdError(f"{folder}: patient id {patient_id[:60]!r} ({source[0]}) {why}; {source[1]}")
    return patient_id


def check_headers(folder: Path, images: dict[int, Path], masks: dict[int, Path], limits: SliceLimits) -> None:
    """Slice count and every file header against the limits, before the first pixel is decoded."""
    from segengine.engine.budget import check_memory

    if len(images) > limits.max_slices:
        raise SliceLimitError(f"{folder}: {len(images)} slices, more than the limit of {limits.max_slices}")
    pixels = decoded = 0
    for n in sorted(images):
        shape = check_slice_size(images[n], limits)
        pixels += shape[0] * shape[1]
        decoded += int(np.prod(shape))
    for n in sorted(masks):
        decoded += int(np.prod(check_slice_size(masks[n], limits, is_mask=True)))
    h, w = shape[:2]
    check_memory(folder, len(images), pixels, decoded, limits.max_memory, f"{len(images)} slices of {w}x{h}")


def read_patient(folder: str | os.PathLike, with_mask: bool = True,
                 limits: SliceLimits = DEFAULT_LIMITS) -> PatientVolume:
    """Read a patient (Kaggle slice folder or NIfTI case, told apart by file ending) into a (D, H, W, 3) volume.

    Slices are ordered by slice number; every header is checked against ``limits`` first.
    """
    from segengine.engine.nifti_io import is_nifti_case, read_nifti_case

    folder = Path(folder)
    if is_nifti_case(folder):
        return read_nifti_case(folder, with_mask, limits)
    from segengine.engine.dicom_io import is_dicom_study, read_dicom_study  # DICOM study: engine/dicom_io.py

    if is_dicom_study(folder):
        return read_dicom_study(folder, with_mask, limits)
    patient_id, images, masks = list_slices(folder)
    numbers = sorted(images)
    check_headers(folder, images, masks if with_mask else {}, limits)
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
        spacing_mm=getattr(limits, "spacing_mm", None),  # --spacing (options.RunOptions); unknown otherwise
    )


def list_patients(root: str | os.PathLike) -> list[Path]:
    """Patient folders and NIfTI case files under a dataset root (sorted); other files (data.csv) are ignored."""
    from segengine.engine.nifti_io import is_nifti_file
    from segengine.engine.nnunet_io import other_channel_files

    root = Path(root)
    if not root.is_dir():
        raise NotAFolderError(f"{root}: no such folder" if not root.exists() else f"{root}: not a folder")
    channels = other_channel_files(root)  # a flat nnU-Net folder: one patient per case, its <case>_0000 file
    folders = sorted(p for p in root.iterdir() if not p.name.startswith(".") and (p.is_dir() or is_nifti_file(p))
                     and p not in channels)
    if not folders:
        raise NoSlicesError(f"{root}: no patient folders or NIfTI case files")
    return folders


PATIENT_LIST_MAX_BYTES = 16 << 20


def read_patient_list(path: str | os.PathLike) -> list[str]:
    """Patient ids from a UTF-8 text file, one per line; blank lines and # comments skipped.

    A list that names no patient, or one patient twice (scored twice, "PASS on 2 patients"
    from one), is refused; so is anything but a regular file (a FIFO would block)."""
    from segengine.engine.fsguard import read_regular

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


def write_mask_slices(folder: Path, patient_id: str, slice_numbers: list[int], mask: np.ndarray) -> list[Path]:
    """Write ``<patient>_<n>_mask.tif`` (uint8 0/255) for every slice, the Kaggle naming.

    Every slice has the same shape, so every file has the same bytes around its pixels:
    tifffile writes the first one, and the others reuse its header with their own pixels
    (the same files, without re-packing the same TIFF tags 20-60 times per patient).
    """
    import io

    import tifffile

    mask_u8 = np.where(np.asarray(mask) > 0, np.uint8(255), np.uint8(0))
    paths = [folder / f"{patient_id}_{n}_mask.tif" for n in slice_numbers]
    if not paths:
        return paths
    first = io.BytesIO()
    tifffile.imwrite(first, mask_u8[0])
    data = first.getvalue()
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        (start,), (count,) = tif.pages[0].dataoffsets, tif.pages[0].databytecounts
    if count != mask_u8[0].nbytes:  # not one plain strip: let tifffile write each file
        for p, sl in zip(paths, mask_u8):
            tifffile.imwrite(p, sl)
        return paths
    head, tail = data[:start], data[start + count :]
    for p, sl in zip(paths, mask_u8):
        with open(p, "wb") as fh:
            fh.write(head)
            fh.write(np.ascontiguousarray(sl).data)
            fh.write(tail)
    return paths
