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
from pathlib import Path

import numpy as np

from segengine.engine.core.errors import (DataError, NoSlicesError, NotAFolderError, OrphanMaskError, SliceFormatError,
                                          SliceLimitError, SliceNumberingError, SliceShapeError, UnreadableSliceError)
from segengine.engine.readers.volume import ACCEPTED_LAYOUTS, PatientVolume, SliceLimits, check_patient_id

IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".webp")


SLICE_NAME = re.compile(r"^(?P<patient>.+?)_(?P<n>\d+)(?P<mask>_mask)?(?P<ext>\.(?:tif|tiff|png|webp))$", re.IGNORECASE)


# ---------------------------------------------------------------- readers by file ending
def _quiet_tifffile():
    """tifffile logs header oddities as warnings; our own error is the one line the user sees."""
    import logging

    import tifffile

    logging.getLogger("tifffile").setLevel(logging.ERROR)
    return tifffile


def _read_tiff(path: Path) -> np.ndarray:
    from segengine.engine.readers.tiff_fast import read_tiff

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
    from segengine.engine.readers.tiff_fast import tiff_shape

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


def check_headers(folder: Path, images: dict[int, Path], masks: dict[int, Path], limits: SliceLimits) -> None:
    """Slice count and every file header against the limits, before the first pixel is decoded."""
    from segengine.engine.readers.budget import check_memory

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


def read_slices(folder: Path, patient_id: str, images: dict[int, Path], masks: dict[int, Path],
                limits: SliceLimits) -> PatientVolume:
    """Decode a listed, header-checked slice folder (``list_slices`` + ``check_headers``)."""
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
    if masks:
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
        spacing_mm=getattr(limits, "spacing_mm", None),  # --spacing (job.options.RunOptions); unknown otherwise
    )
