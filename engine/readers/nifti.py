"""NIfTI patients in, masks out on the input's own grid (nibabel).

Two forms of a patient, told apart by file ending as in nnU-Net:

* ``case.nii[.gz]``: one 4D volume whose last axis holds pre-contrast, FLAIR and
  post-contrast (the channel order of the Kaggle slices);
* a folder holding ``*_flair.nii[.gz]`` and optionally ``*_pre.nii[.gz]``,
  ``*_post.nii[.gz]`` (3D, same shape and affine) and a ground-truth ``*_mask.nii[.gz]``.
  A missing pre- or post-contrast sequence is filled with FLAIR, as the Kaggle data
  itself does for its patients without those sequences.

Volumes are reoriented by axis permutation and flips only (no resampling) into the Kaggle
slices' layout: axial slices, slice number rising inferior to superior, image top =
anterior, image left = the patient's right (radiological display). Intensities become
8 bits, the type of the Kaggle slices the model was trained on, by a linear min..max
rescale: jointly over the channels of a 4D file (one image, one scale), per file for
separate sequences (separate series, separate units). Any linear rescale of the input
(dtype, slope, offset) thus gives the same 8-bit volume, and the preprocessing's
percentile normalisation does the rest. :class:`NiftiGrid` keeps what is needed to
write a mask back onto the input's voxel grid with its affine.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segengine.engine.core.errors import NiftiError, SliceLimitError
from segengine.engine.readers.volume import DEFAULT_LIMITS, PatientVolume, SliceLimits

NIFTI_ENDINGS = (".nii.gz", ".nii")


SEQUENCES = ("pre", "flair", "post")  # channel order of a Kaggle slice


SEQUENCE_FILE = re.compile(r"^(?P<case>.+)_(?P<seq>pre|flair|post|mask)\.nii(?:\.gz)?$", re.IGNORECASE)


# Axis codes (nibabel, direction each array axis points to) of a Kaggle volume held as
# (row, column, slice): rows run anterior -> posterior, columns right -> left, slices up.
KAGGLE_AXCODES = ("P", "L", "S")


# The largest volume read (voxels per sequence), so a forged header cannot exhaust memory.
MAX_VOXELS = 512 * 512 * 512


_MM_PER_UNIT = {"mm": 1.0, "unknown": 1.0, "meter": 1000.0, "micron": 0.001}


AFFINE_ATOL_MM = 1e-3


def is_nifti_file(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_ENDINGS)


# where a NIfTI case's patient id comes from and how to change it, for readers.volume.check_patient_id's message
CASE_ID_SOURCE = ("the NIfTI case's file name without .nii[.gz], or its folder's name", "rename the case")


def case_id(path: Path) -> str:
    """Patient id of a NIfTI case: the file name without .nii[.gz], or the folder's name.

    Unchecked; ``patient_job.patient_id_of`` validates it with the slices' rule. A flat nnU-Net
    folder's ``<case>_0000`` file stands for ``<case>``.
    """
    from segengine.engine.readers.nnunet import case_of_file

    name = case_of_file(path) or path.name
    for ending in NIFTI_ENDINGS:
        if name.lower().endswith(ending):
            return name[: -len(ending)]
    return name


def sequence_files(folder: Path) -> dict[str, Path]:
    """``{"pre"|"flair"|"post"|"mask": path}`` of a folder's NIfTI sequences (empty if none)."""
    found: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        m = SEQUENCE_FILE.match(entry.name)
        if not m or not entry.is_file():
            continue
        seq = m.group("seq").lower()
        if seq in found:
            raise NiftiError(f"{entry}: a second {seq} volume (also {found[seq].name})")
        found[seq] = entry
    from segengine.engine.readers.nnunet import channel_files

    for seq, entry in channel_files(folder).items():
        if seq in found:
            raise NiftiError(f"{entry}: a second {seq} volume (also {found[seq].name})")
        found[seq] = entry
    return found


def is_nifti_case(path: Path) -> bool:
    """A ``.nii[.gz]`` file, or a folder holding ``*_pre|flair|post.nii[.gz]`` or nnU-Net ``*_0000.nii[.gz]`` volumes."""
    from segengine.engine.readers.nnunet import is_nnunet_name

    path = Path(path)
    if path.is_file():
        return is_nifti_file(path)
    if not path.is_dir():
        return False
    return any(SEQUENCE_FILE.match(e.name) or is_nnunet_name(e.name) for e in path.iterdir())


@dataclass(frozen=True)
class NiftiGrid:
    """The input's voxel grid: what mapping a mask back onto it takes."""

    shape: tuple[int, int, int]  # the input's spatial shape
    affine: np.ndarray  # the input's affine (4x4)
    header: object  # the input's nibabel header (qform/sform codes, units), copied into the mask
    orientation: np.ndarray  # nibabel ornt of the input's array axes (io_orientation of its affine)
    files: dict[str, str]  # sequence -> file read
    filled_with_flair: tuple[str, ...]  # sequences missing from the input

    def to_kaggle(self, data: np.ndarray) -> np.ndarray:
        """Input array (x, y, z[, ...]) -> (slice, row, column[, ...]) in the Kaggle layout."""
        from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

        arr = apply_orientation(data, ornt_transform(self.orientation, axcodes2ornt(KAGGLE_AXCODES)))
        return np.moveaxis(arr, 2, 0)

    def from_kaggle(self, volume: np.ndarray) -> np.ndarray:
        """(slice, row, column) in the Kaggle layout -> the input's array axes."""
        from nibabel.orientations import apply_orientation, axcodes2ornt, ornt_transform

        return apply_orientation(np.moveaxis(volume, 0, 2), ornt_transform(axcodes2ornt(KAGGLE_AXCODES), self.orientation))

    def mask_image(self, mask: np.ndarray):
        """A (D, H, W) mask in Kaggle layout as a uint8 0/1 NIfTI on the input's grid, affine and frame codes."""
        import nibabel as nib

        data = np.ascontiguousarray(self.from_kaggle(np.asarray(mask, dtype=np.uint8)))
        header = self.header.copy()
        header.set_data_dtype(np.uint8)
        header.set_slope_inter(1.0, 0.0)
        header.set_intent("none")
        header["cal_min"], header["cal_max"] = 0, 1
        header["descrip"] = b"segengine predicted mask"
        # the copied header already holds this affine, so nibabel keeps its sform/qform as they are
        image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        return image_class(data, self.affine, header)

    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel spacing along (slice, row, column) in mm, from the affine and the header's units."""
        from nibabel.orientations import axcodes2ornt, ornt_transform

        unit = self.header.get_xyzt_units()[0]
        zooms = np.linalg.norm(self.affine[:3, :3], axis=0) * _MM_PER_UNIT.get(unit, 1.0)
        to_kaggle = ornt_transform(self.orientation, axcodes2ornt(KAGGLE_AXCODES))
        out = np.empty(3)
        out[to_kaggle[:, 0].astype(int)] = zooms  # (row, column, slice)
        return tuple(round(float(out[i]), 6) for i in (2, 0, 1))  # the affine is float32: no more digits

    def report(self) -> dict:
        import nibabel as nib

        return {"files": self.files, "shape": list(self.shape), "affine": np.round(self.affine, 6).tolist(),
                "axcodes": "".join(nib.orientations.ornt2axcodes(self.orientation)),
                "filled_with_flair": list(self.filled_with_flair)}


# ---------------------------------------------------------------- reading
def _load(path: Path):
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for damaged headers
        raise NiftiError(f"{path}: not a readable NIfTI file ({_first_line(exc)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise NiftiError(f"{path}: not a single-file NIfTI image ({type(img).__name__})")
    affine = img.affine
    if affine is None or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise NiftiError(f"{path}: degenerate affine (zero or non-finite voxel axes)")
    if int(np.prod(img.shape[:3])) > MAX_VOXELS:
        raise NiftiError(f"{path}: volume of {'x'.join(map(str, img.shape))} voxels is larger than {MAX_VOXELS} per sequence")
    _check_scaling(img, path)
    return img


def _check_scaling(img, path: Path) -> None:
    """scl_slope/scl_inter: unset (slope 0 or NaN: no scaling, as the NIfTI standard says) or a
    finite positive slope and a finite offset; anything else would silently change the image."""
    from nibabel.openers import ImageOpener

    try:  # the header as stored: nibabel moves scaling out of img.header and ignores an infinite slope
        with ImageOpener(str(path)) as fh:
            raw = type(img.header).from_fileobj(fh, check=False)
        slope, inter = (float(np.asarray(raw[k]).item()) for k in ("scl_slope", "scl_inter"))
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for damaged headers
        raise NiftiError(f"{path}: not a readable NIfTI header ({_first_line(exc)})") from None
    if slope == 0 or np.isnan(slope):
        return
    if not np.isfinite(slope) or slope < 0 or not np.isfinite(inter):
        raise NiftiError(f"{path}: header scaling scl_slope={slope:g}, scl_inter={inter:g} is not a finite positive "
                         "slope and a finite offset; fix the header (e.g. slope 1, offset 0)")


def decoded_bytes(img) -> int:
    """Bytes of the voxel values nibabel returns: stored dtype, or float64 when the header scales them."""
    slope, inter = img.dataobj.slope, img.dataobj.inter
    size = np.dtype(img.get_data_dtype()).itemsize
    return int(np.prod(img.shape)) * (8 if (slope, inter) != (1.0, 0.0) else max(size, 1))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _read_array(img, path: Path, index: tuple = ()) -> np.ndarray:
    """The voxel values (header scaling applied) of ``img.dataobj[index]``; checked finite."""
    try:
        data = np.asarray(img.dataobj[index] if index else img.dataobj)
    except Exception as exc:  # noqa: BLE001 - truncated gzip/raw data raise EOFError, ValueError, OSError...
        raise NiftiError(f"{path}: truncated or corrupt image data ({_first_line(exc)})") from None
    if data.dtype.kind not in "biuf":
        raise NiftiError(f"{path}: {data.dtype} voxels, expected integer or float intensities")
    if data.dtype.kind == "f" and not np.isfinite(data).all():
        bad = int(data.size - np.isfinite(data).sum())
        raise NiftiError(f"{path}: {bad} non-finite voxel values (NaN or infinity)")
    return data


def to_uint8(volume: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """``volume`` rescaled linearly, ``lo`` (default its min) -> 0 and ``hi`` (default its max) -> 255.

    Any linear rescale of the input (another dtype, slope, offset) maps to the same 8 bits;
    a constant volume gives zeros.
    """
    lo = float(volume.min()) if lo is None else lo
    hi = float(volume.max()) if hi is None else hi
    if hi <= lo:
        return np.zeros(volume.shape, dtype=np.uint8)
    scaled = np.subtract(volume, np.float32(lo), dtype=np.float32)  # one float32 array, then in place
    scaled *= np.float32(255.0 / (hi - lo))
    return np.rint(scaled, out=scaled).astype(np.uint8)


def _grid(img, files: dict[str, str], filled: tuple[str, ...]) -> NiftiGrid:
    from nibabel.orientations import io_orientation

    return NiftiGrid(shape=tuple(int(s) for s in img.shape[:3]), affine=img.affine.copy(), header=img.header.copy(),
                     orientation=io_orientation(img.affine), files=files, filled_with_flair=filled)


def check_limits(img, path: Path, limits: SliceLimits) -> None:
    """Slices and in-plane sides as they will be after reorientation, against ``limits``, from the header."""
    from nibabel.orientations import io_orientation

    # io_orientation: which world axis (0 = L-R columns, 1 = A-P rows, 2 = I-S slices) each array axis runs along
    size = {int(axis): int(n) for (axis, _), n in zip(io_orientation(img.affine), img.shape[:3])}
    cols, rows, slices = size[0], size[1], size[2]
    if slices > limits.max_slices:
        raise SliceLimitError(f"{path}: {slices} axial slices, more than the limit of {limits.max_slices}")
    if max(rows, cols) > limits.max_side:
        raise SliceLimitError(f"{path}: {cols}x{rows} pixels a slice, larger than the limit of {limits.max_side} px a side")
    if min(rows, cols) < limits.min_side:
        raise SliceLimitError(f"{path}: {cols}x{rows} pixels a slice, smaller than the limit of {limits.min_side} px a side")


def _open_case(path: Path, with_mask: bool = True, limits: SliceLimits = DEFAULT_LIMITS) -> tuple[dict, dict[str, Path]]:
    """Headers of a case, every shape and affine checked against each other and ``limits``; no voxel data read yet.

    Returns ({sequence: nibabel image}, {sequence: file}); a 4D file is ``{"stack": image}``.
    """
    from segengine.engine.readers.nnunet import case_of_file, channel_files

    flat_case = None if path.is_dir() else case_of_file(path)  # <case>_0000 of a flat nnU-Net folder
    if not path.is_dir() and flat_case is None:
        img = _load(path)
        shape = img.shape
        if len(shape) != 4:
            raise NiftiError(f"{path}: {len(shape)}D volume of shape {shape}; a case file is 4D (x, y, z, 3: pre-contrast, "
                             f"FLAIR, post-contrast), or give a folder of *_flair.nii.gz (+ *_pre, *_post)")
        if shape[3] != 3:
            raise NiftiError(f"{path}: {shape[3]} volumes on the last axis, expected 3 (pre-contrast, FLAIR, post-contrast)")
        if min(shape[:3]) < 1:
            raise NiftiError(f"{path}: empty volume of shape {shape}")
        check_limits(img, path, limits)
        _check_memory(path, {"stack": img}, limits)
        return {"stack": img}, {"stack": path}
    files = sequence_files(path) if flat_case is None else channel_files(path.parent, flat_case)
    if "flair" not in files:
        raise NiftiError(f"{path}: no *_flair.nii[.gz] volume or nnU-Net FLAIR channel (<case>_0001, or as dataset.json "
                         "names it) (FLAIR is required; pre/post-contrast are optional)")
    images = {}
    for seq in ("flair", "pre", "post", "mask"):
        if seq not in files or (seq == "mask" and not with_mask):
            continue
        img = _load(files[seq])
        shape = img.shape
        if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
            raise NiftiError(f"{files[seq]}: {len(shape)}D volume of shape {shape}, expected a 3D {seq} volume")
        if min(shape[:3]) < 1:
            raise NiftiError(f"{files[seq]}: empty volume of shape {shape}")
        if seq == "flair":
            check_limits(img, files[seq], limits)
        if seq != "flair":
            flair = images["flair"]
            if shape[:3] != flair.shape[:3]:
                raise NiftiError(f"{files[seq]}: shape {shape[:3]} differs from the FLAIR volume's {flair.shape[:3]}")
            if not np.allclose(img.affine, flair.affine, atol=AFFINE_ATOL_MM):
                raise NiftiError(f"{files[seq]}: affine differs from the FLAIR volume's (the sequences must share one grid)")
        images[seq] = img
    _check_memory(path, images, limits)
    return images, files


def _check_memory(path: Path, images: dict, limits: SliceLimits) -> None:
    """The case's decoded voxels (every sequence read, at its dtype and scaling) and the pipeline's
    arrays against ``limits.max_memory``, from the headers (engine.budget)."""
    from nibabel.orientations import io_orientation

    from segengine.engine.readers.budget import check_memory

    img = images.get("stack", images.get("flair"))
    size = {int(axis): int(n) for (axis, _), n in zip(io_orientation(img.affine), img.shape[:3])}
    cols, rows, slices = size[0], size[1], size[2]
    voxels = cols * rows * slices
    # + the uint8 volume and mask, and the float32 intensities (plan v2)
    decoded = sum(decoded_bytes(i) for i in images.values()) + voxels * 4 + voxels * 3 * 4
    check_memory(path, slices, voxels, decoded, limits.max_memory,
                 f"{slices} slices of {cols}x{rows}, {np.dtype(img.get_data_dtype())} voxels")


def open_nifti_case(path: str | Path, limits: SliceLimits = DEFAULT_LIMITS,
                    with_mask: bool = True) -> tuple[list[Path], tuple[dict, dict[str, Path]]]:
    """(the case's files, its checked headers for ``read_nifti_case(opened=...)``): opened once."""
    opened = _open_case(Path(path), with_mask, limits)
    return list(opened[1].values()), opened


def read_nifti_case(path: str | Path, with_mask: bool = True, limits: SliceLimits = DEFAULT_LIMITS,
                    opened: tuple[dict, dict[str, Path]] | None = None) -> PatientVolume:
    """Read a 4D ``case.nii[.gz]`` or a folder of per-sequence volumes into the Kaggle layout
    (``opened``: the headers ``open_nifti_case`` checked, so they are not read again)."""
    path = Path(path)
    images, files = opened if opened is not None else _open_case(path, with_mask, limits)
    if "stack" in images:
        img = images["stack"]
        grid = _grid(img, {s: str(path) for s in SEQUENCES}, ())
        # one image, one intensity scale: the three channels are rescaled together, keeping their ratios
        channels = [_read_array(img, path, (..., c)) for c in range(3)]
        lo, hi = min(float(c.min()) for c in channels), max(float(c.max()) for c in channels)
        image = np.stack([grid.to_kaggle(to_uint8(c, lo, hi)) for c in channels], axis=-1)
        return _volume(case_id(path), path, image, None, grid, _intensities([grid.to_kaggle(c) for c in channels]))
    filled = tuple(s for s in ("pre", "post") if s not in images)
    grid = _grid(images["flair"], {s: str(files[s if s in images else "flair"]) for s in SEQUENCES}, filled)

    def voxels(seq: str) -> np.ndarray:
        return grid.to_kaggle(_read_array(images[seq], files[seq]).reshape(grid.shape))

    # separate series, separate units: each sequence is rescaled on its own
    raw = {s: voxels(s) for s in SEQUENCES if s in images}
    flair = to_uint8(raw["flair"])
    image = np.stack([flair if s == "flair" or s in filled else to_uint8(raw[s]) for s in SEQUENCES], axis=-1)
    intensities = _intensities([raw.get(s, raw["flair"]) for s in SEQUENCES])
    del raw
    mask = np.where(voxels("mask") > 0, np.uint8(255), np.uint8(0)) if "mask" in images else None
    return _volume(case_id(path), path, image, mask, grid, intensities)


def _intensities(channels: list[np.ndarray]) -> np.ndarray:
    """(D, H, W, 3) float32 at the file's own depth (its scaling applied), for plan v2: no windowing."""
    out = np.empty(channels[0].shape + (len(channels),), dtype=np.float32)
    for c, ch in enumerate(channels):
        out[..., c] = ch
    return out


def _volume(patient_id: str, source: Path, image: np.ndarray, mask: np.ndarray | None, grid: NiftiGrid,
            intensities: np.ndarray | None = None) -> PatientVolume:
    return PatientVolume(patient_id=patient_id, folder=source, slice_numbers=list(range(1, image.shape[0] + 1)),
                         image=np.ascontiguousarray(image), mask=None if mask is None else np.ascontiguousarray(mask),
                         spacing_mm=grid.spacing_mm(), source_grid=grid, intensities=intensities)
