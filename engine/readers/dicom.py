"""DICOM studies in (pydicom), DICOM SEG out (highdicom).

A study is a folder (sub-folders included) of DICOM Part-10 files, told apart from other
files by the ``DICM`` marker, never by name. Every header is read first without pixel data
(``stop_before_pixels``) and checked: files grouped by SeriesInstanceUID, the FLAIR,
pre-contrast and post-contrast series told from their descriptions and sequence tags (or
``--series ROLE=<uid or description>``), slices ordered by position along the slice normal,
one shared geometry, sizes against :class:`readers.volume.SliceLimits` and the transfer syntax against
the decoders installed. Only then are pixels decoded. The volume is built on a RAS affine
derived from ImageOrientationPatient/ImagePositionPatient, so :class:`DicomGrid` maps it to
the model's display layout exactly as a NIfTI input's affine is (it is a ``NiftiGrid``); the
mask NIfTI, spacing and probability map come from there. The SEG references the FLAIR
instances, frame by frame, so viewers overlay it on the images it was computed from.
"""
from __future__ import annotations

import functools
import itertools
import os
import re
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, ClassVar, Iterator

import numpy as np

from segengine.engine.core.errors import DataError, DicomError, MemoryBudgetError, SliceLimitError
from segengine.engine.readers.kaggle import SLICE_NAME
from segengine.engine.readers.nifti import MAX_VOXELS, SEQUENCES, NiftiGrid, check_limits, to_uint8
from segengine.engine.readers.volume import DEFAULT_LIMITS, PatientVolume, SliceLimits

if TYPE_CHECKING:  # heavy imports stay inside the functions that need them
    import nibabel as nib
    from pydicom import Dataset


DICM_OFFSET = 128


MAX_DEPTH = 4  # study/series/... folders below the given one that are searched for files


DETECT_FILES = 64  # a folder is a DICOM study if one of its first files (in walk order) is DICOM


MAX_STUDY_FILES = 20000  # files looked at in one study: a mistaken --patient ~ is refused, not walked for hours


ROLES = ("flair", "pre", "post")


POSITION_ATOL_MM = 0.01


ORIENTATION_ATOL = 1e-4


# the study's folder name is the patient id (a study's PatientID is often anonymised or shared)
STUDY_ID_SOURCE = ("the DICOM study's folder name", "rename the folder")


# ---------------------------------------------------------------- finding the files
def _open_regular(path: Path) -> BinaryIO | None:
    """An open binary file if ``path`` is a regular file (symlinks followed), else None.

    Opened non-blocking and checked on the descriptor, so a FIFO or device is never read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
    except OSError:
        os.close(fd)
        return None
    return os.fdopen(fd, "rb")


def _is_dicom_file(path: Path) -> bool:
    fh = _open_regular(path)
    if fh is None:
        return False
    with fh:
        head = fh.read(DICM_OFFSET + 4)
    return head[DICM_OFFSET:] == b"DICM"


def _walk(folder: Path) -> Iterator[Path]:
    """Every file path under ``folder`` up to MAX_DEPTH, sorted, hidden entries skipped, links to folders not followed."""
    base = len(folder.parts)
    for root, dirs, files in os.walk(folder):
        depth = len(Path(root).parts) - base
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < MAX_DEPTH else []
        for name in sorted(files):
            if not name.startswith("."):
                yield Path(root) / name


def is_dicom_study(path: Path) -> bool:
    """A folder without Kaggle slices that holds at least one DICOM Part-10 file."""
    path = Path(path)
    if not path.is_dir():
        return False
    try:
        if any(SLICE_NAME.match(e) for e in os.listdir(path)):
            return False  # a Kaggle folder: the slice reader answers for it
    except OSError:
        return False
    return any(_is_dicom_file(p) for p in itertools.islice(_walk(path), DETECT_FILES))


def study_id(path: Path) -> str:
    """The study folder's name, taken from the absolute path: ``--patient .`` inside a study has
    no name of its own ("" would make OUT/<id> OUT itself)."""
    return Path(os.path.abspath(path)).name


# ---------------------------------------------------------------- headers
@dataclass
class Series:
    uid: str
    description: str
    modality: str
    files: list[Path] = field(default_factory=list)
    headers: list = field(default_factory=list)  # pydicom Datasets without pixel data
    pixel_offsets: list = field(default_factory=list)  # file offset of each PixelData element, or None

    @property
    def label(self) -> str:
        return f"series {self.description or '(no description)'!r} ({_shown(self.uid)})"


# header values longer than this are skipped while reading (pydicom's defer_size) and dropped:
# segengine reads only short ones (UIDs, descriptions, positions), and the plan keeps every
# image's header, so a vendor's private blob (or a crafted 2 GiB one) must not be held in memory
DEFER_BYTES = 4096


NATIVE_LE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")  # implicit / explicit VR little endian, uncompressed


# What a header may cost before it is parsed into memory. pydicom parses every element in front of the
# pixel data into Python objects (~50 bytes of memory per byte of tiny elements), so the bytes it reads
# there (values longer than DEFER_BYTES are skipped, not read) are capped per file, and over the study
# by --max-memory; a Deflated file is inflated whole by pydicom, so its inflated size is measured first,
# incrementally, and refused above --max-memory.
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
HEADER_MAX_BYTES = 1 << 20
HEADER_MEMORY_PER_BYTE = 50


class _HeaderTooLarge(Exception):
    pass


class _CappedReader:
    """A file object whose reads stop with _HeaderTooLarge past ``cap`` bytes (seeks are free)."""

    def __init__(self, fh, cap: int) -> None:
        self._fh, self._cap, self.count, self.exceeded = fh, cap, 0, False

    def read(self, size: int = -1) -> bytes:
        whole = size is None or size < 0
        if not whole and self.count + size > self._cap:
            self.exceeded = True
            raise _HeaderTooLarge()
        data = self._fh.read(self._cap + 1 - self.count if whole else size)
        self.count += len(data)
        if self.count > self._cap:
            self.exceeded = True
            raise _HeaderTooLarge()
        return data

    def __getattr__(self, name):
        return getattr(self._fh, name)


def _check_inflated_size(fh, path: Path, cap: int) -> bool:
    """Whether the file is Deflated; refuses one whose dataset inflates to more than ``cap`` bytes,
    measured by inflating in steps of 1 MiB that are counted and dropped (nothing kept)."""
    import zlib

    from pydicom.filereader import _read_file_meta_info, read_preamble

    fh.seek(0)
    read_preamble(fh, False)
    syntax = str(_read_file_meta_info(fh).get("TransferSyntaxUID", "") or "")
    if syntax != DEFLATED_LE:
        return False
    inflate, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
    while not inflate.eof:
        data = fh.read(1 << 16)
        if not data:
            break
        while data and not inflate.eof:
            total += len(inflate.decompress(data, 1 << 20))
            if total > cap:
                raise MemoryBudgetError(f"{path}: a Deflated DICOM file that inflates to more than {cap / 1e9:.2f} GB "
                                        "(--max-memory); refused before inflating it")
            data = inflate.unconsumed_tail
    return True


PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"


@functools.cache
def _quiet_pydicom() -> None:
    """Silence pydicom's UserWarnings (two stderr lines each, about header values it cannot
    validate or decode) for this process: the values segengine uses are checked here and
    refused with one line, and the warnings would stand between the user and that line."""
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")


def _read_header(path: Path, max_memory: int = DEFAULT_LIMITS.max_memory,
                 header_cap: int = HEADER_MAX_BYTES) -> tuple[Dataset, int | None, int] | None:
    """(dataset without pixels, file offset of its PixelData element or None, header bytes parsed),
    or None for a file that is not a regular DICOM Part-10 file (one open per file).

    pydicom stops in front of the pixel data element; for uncompressed little-endian files that
    offset lets the pixels be read later without parsing the header a second time. At most
    ``header_cap`` bytes are parsed, and a Deflated file is refused if it inflates past ``max_memory``.
    """
    import pydicom

    _quiet_pydicom()
    fh = _open_regular(path)
    if fh is None:
        return None
    reader = None
    try:
        with fh:
            if fh.read(DICM_OFFSET + 4)[DICM_OFFSET:] != b"DICM":
                return None
            deflated = _check_inflated_size(fh, path, max_memory)
            fh.seek(0)
            reader = _CappedReader(fh, max_memory if deflated else header_cap)  # Deflated: inflated size checked
            ds = pydicom.dcmread(reader, stop_before_pixels=True, defer_size=DEFER_BYTES)
            offset = fh.tell()
            _drop_deferred(ds)
    except MemoryBudgetError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for damaged files
        if isinstance(exc, _HeaderTooLarge) or (reader is not None and reader.exceeded):
            raise MemoryBudgetError(f"{path}: a DICOM header of more than {header_cap:,} bytes in front of the pixel "
                                    "data (values under 4 KB each); refused before it is parsed") from None
        raise DicomError(f"{path}: not a readable DICOM file ({_first_line(exc)})") from None
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    return ds, (offset if syntax in NATIVE_LE else None), (0 if deflated else reader.count)


def _drop_deferred(ds) -> None:
    """Remove the values pydicom skipped (defer_size): they would be re-read through the closed
    descriptor this file was parsed from, and none of them is one segengine or the SEG needs."""
    from pydicom.dataelem import RawDataElement

    for tag in list(ds.keys()):
        elem = ds.get_item(tag, keep_deferred=True)
        if isinstance(elem, RawDataElement) and elem.value is None and elem.length:
            del ds[tag]
        elif elem.VR in ("SQ", None) and ds[tag].VR == "SQ":  # None: implicit VR, known once converted
            for item in ds[tag].value:
                _drop_deferred(item)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _shown(value: object) -> str:
    """Header text as it may appear in a one-line error: escape sequences and other control
    characters written out (``\\x1b``), so a crafted header cannot drive the user's terminal."""
    text = str(value)[:120]
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def _header_number(ds, key: str, path: Path, default: float, kind: type = int) -> float:
    """A numeric header value (``default`` when absent or empty).

    pydicom keeps a malformed IS/DS value ("xx") as text and only warns, so the conversion
    here is where a broken exporter's header is refused with one line instead of a traceback.
    """
    from pydicom.errors import BytesLengthException

    try:
        value = ds.get(key)  # converted here: a US of odd length or an IS of 1e999 raises
    except (ValueError, OverflowError, BytesLengthException) as exc:
        raise DicomError(f"{path}: {key} is unreadable ({_shown(_first_line(exc))[:100]})") from None
    if value is None or value == "":
        return default
    try:
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise DicomError(f"{path}: {key} {_shown(value)!r} is not a number") from None


def scan_study(folder: Path, max_memory: int = DEFAULT_LIMITS.max_memory) -> list[Series]:
    """The study's image series, grouped by SeriesInstanceUID (headers only); the headers kept
    (HEADER_MEMORY_PER_BYTE per byte parsed) must fit ``max_memory`` (--max-memory)."""
    series: dict[str, Series] = {}
    parsed = 0
    for i, path in enumerate(_walk(folder)):
        if i == MAX_STUDY_FILES:
            raise SliceLimitError(f"{folder}: more than {MAX_STUDY_FILES} files in the study folder; give one study")
        left = (max_memory // HEADER_MEMORY_PER_BYTE) - parsed
        if left <= 0:
            raise MemoryBudgetError(f"{folder}: the study's DICOM headers alone need more than {max_memory / 1e9:.2f} GB "
                                    "(--max-memory); refused before parsing more")
        header = _read_header(path, max_memory, min(HEADER_MAX_BYTES, left))
        if header is None:
            continue
        ds, offset, size = header
        parsed += size
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid or "Rows" not in ds:
            continue  # DICOMDIR, structured reports, presentation states: no image
        s = series.setdefault(uid, Series(uid, str(ds.get("SeriesDescription", "") or "").strip(),
                                          str(ds.get("Modality", "") or "").strip()))
        s.files.append(path)
        s.headers.append(ds)
        s.pixel_offsets.append(offset)
    if not series:
        raise DicomError(f"{folder}: DICOM files but no image series")
    return list(series.values())


# ---------------------------------------------------------------- which series is which
FLAIR_WORDS = re.compile(r"flair|dark[\s_-]*fluid|tirm", re.IGNORECASE)


T1_WORDS = re.compile(r"t1|mprage|spgr|bravo|tfe", re.IGNORECASE)


# checked before POST_WORDS: "PRE CONTRAST", "W/O GAD" name the contrast they were taken without
PRE_WORDS = re.compile(r"\bpre\b|pre[\s_-]*contrast|\bnon[\s_-]*contrast|w/o|without|\bnative\b|\bnon[\s_-]*gd\b",
                       re.IGNORECASE)


POST_WORDS = re.compile(r"post|gad|\bgd\b|contrast|\+\s*c\b|\bc\s*\+|\bce\b|t1c|\+gd", re.IGNORECASE)


LOCALIZER_WORDS = re.compile(r"locali[sz]er|scout|survey|3[\s-]*plane|\bloc\b", re.IGNORECASE)


def _text(s: Series) -> str:
    ds = s.headers[0]
    return " ".join(str(ds.get(k, "") or "") for k in ("SeriesDescription", "ProtocolName", "SequenceName"))


def classify(s: Series) -> str | None:
    """"flair", "pre", "post" or None (another sequence) from descriptions and sequence tags.

    T2-FLAIR is the model's FLAIR; a "T1 FLAIR" is a T1-weighted series. Without words, an
    inversion-recovery series with a long inversion and echo time is FLAIR.
    """
    ds = s.headers[0]
    text = _text(s)
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type or LOCALIZER_WORDS.search(text):
        return None
    t1 = bool(T1_WORDS.search(text))
    raw = ds.get("ScanningSequence") or []
    scanning = {str(v).upper() for v in ([raw] if isinstance(raw, str) else raw)}
    long_ir = "IR" in scanning and _number(ds, "InversionTime") >= 1500 and _number(ds, "EchoTime") >= 60
    if not t1 and (FLAIR_WORDS.search(text) or long_ir):
        return "flair"
    if t1:
        if PRE_WORDS.search(text):
            return "pre"
        contrast = bool(POST_WORDS.search(text)) or bool(str(ds.get("ContrastBolusAgent", "") or "").strip())
        return "post" if contrast else "pre"
    return None


def _number(ds, key: str) -> float:
    """A numeric tag's value, 0 when absent or unreadable (classification only)."""
    try:
        return float(ds.get(key) or 0)
    except (TypeError, ValueError):
        return 0.0


def _describe(series: list[Series]) -> str:
    return ", ".join(f"{s.description or '(no description)'!r} ({_shown(s.uid)})" for s in series)


def choose_series(folder: Path, series: list[Series], overrides: dict[str, str] | None = None) -> dict[str, list[Series]]:
    """{role: candidate series}: one FLAIR (required), any number of pre/post candidates (the plan
    keeps the one on FLAIR's grid). ``overrides``: role -> SeriesInstanceUID or SeriesDescription
    (case-insensitive), or "none" for pre/post (filled with FLAIR)."""
    overrides = dict(overrides or {})
    chosen: dict[str, Series] = {}
    for role, value in overrides.items():
        if value.lower() == "none":
            if role == "flair":
                raise DicomError("--series flair=none: FLAIR is required")
            continue
        hits = [s for s in series if s.uid == value] or [s for s in series if s.description.lower() == value.lower()]
        if not hits:
            raise DicomError(f"{folder}: --series {role}={value}: no series with that UID or description "
                             f"(series here: {_describe(series)})")
        if len(hits) > 1:
            raise DicomError(f"{folder}: --series {role}={value}: several series match ({_describe(hits)}); "
                             "give its SeriesInstanceUID")
        chosen[role] = [hits[0]]
    taken = {s[0].uid for s in chosen.values()}
    mr = [s for s in series if s.modality == "MR" and s.uid not in taken]
    for role in ROLES:
        if role in chosen or overrides.get(role, "").lower() == "none":
            continue
        hits = [s for s in mr if classify(s) == role]
        if len(hits) > 1 and role == "flair":
            raise DicomError(f"{folder}: several {role} series ({_describe(hits)}); choose one with "
                             f"--series {role}=<uid or description>")
        if hits:
            chosen[role] = hits
    if "flair" not in chosen:
        if not any(s.modality == "MR" for s in series):
            kinds = ", ".join(sorted({_shown(s.modality) or "none" for s in series}))
            raise DicomError(f"{folder}: no MR series (modality {kinds}); segengine segments brain MR only")
        raise DicomError(f"{folder}: no FLAIR series found among {_describe(series)}; name it with "
                         "--series flair=<uid or description>")
    for role, (s, *_) in chosen.items():
        if s.modality != "MR":
            raise DicomError(f"{folder}: {s.label} chosen as {role} has modality {_shown(s.modality) or 'none'}, expected MR")
    return chosen


# ---------------------------------------------------------------- geometry
@dataclass
class SeriesGrid:
    """A series' slices in order along the normal, with its RAS affine (array axes: column, row, slice)."""

    series: Series
    order: list[int]  # indices into series.files/headers, by position along the normal
    rows: int
    columns: int
    orientation: np.ndarray  # (6,) ImageOrientationPatient
    spacing: np.ndarray  # (2,) PixelSpacing: between rows, between columns
    positions: np.ndarray  # (n, 3) ImagePositionPatient in order
    affine: np.ndarray  # (4, 4) RAS
    frame_of_reference: str = ""  # FrameOfReferenceUID: positions of two series compare only within one

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.columns, self.rows, len(self.order))


def _floats(ds, key: str, n: int, path: Path) -> np.ndarray:
    value = ds.get(key)
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.array([])
    if arr.shape != (n,) or not np.isfinite(arr).all():
        raise DicomError(f"{path}: no valid {key}; cannot place the image in space")
    return arr


def _check_transfer_syntax(ds, path: Path) -> None:
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    uid = UID(str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "1.2.840.10008.1.2"))
    if not uid.is_transfer_syntax:  # is_compressed would raise ValueError on it
        raise DicomError(f"{path}: unknown transfer syntax {_shown(uid)}; export the study with a standard one")
    if not uid.is_compressed:
        return
    try:
        available = get_decoder(uid).is_available
    except Exception:  # noqa: BLE001 - pydicom raises NotImplementedError for syntaxes it has no decoder for
        available = False
    if not available:
        raise DicomError(f"{path}: pixel data compressed as {uid.name}, and no decoder for it is installed "
                         "(install pylibjpeg with its plugins, or export the study uncompressed)")


def _check_pixel_encoding(ds, path: Path) -> None:
    """Bits and rescale that decode to one meaningful value per pixel, checked before any pixel is read.

    A slope of 0 or NaN would turn the image into a constant (a black FLAIR, segmented
    without complaint); BitsStored above BitsAllocated leaves which bits hold the value open.
    The rescale is computed in float64 and kept in float32 (``_read_series``), so it must fit
    float32 too (``RESCALE_SLOPE_RANGE``, ``RESCALE_INTERCEPT_STEPS``): a slope of 1e-300 would
    round to 0, an intercept of 1e10 would round the stored values together (another mask).
    """
    bits = _header_number(ds, "BitsAllocated", path, 16)
    if bits not in (8, 16, 32):
        raise DicomError(f"{path}: {bits}-bit pixels are not supported")
    stored = _header_number(ds, "BitsStored", path, bits)
    if not 1 <= stored <= bits:
        raise DicomError(f"{path}: BitsStored {stored} of BitsAllocated {bits}: an inconsistent header")
    if _header_number(ds, "PixelRepresentation", path, 0) not in (0, 1):
        raise DicomError(f"{path}: PixelRepresentation {_shown(ds.get('PixelRepresentation'))} is neither 0 "
                         "(unsigned) nor 1 (signed)")
    slope, intercept = _rescale(ds, path)
    if slope == 0 or not np.isfinite(slope) or not np.isfinite(intercept):
        raise DicomError(f"{path}: RescaleSlope {slope:g} / RescaleIntercept {intercept:g} give no usable image")
    low, high = RESCALE_SLOPE_RANGE
    if not low <= abs(slope) <= high or abs(intercept) > abs(slope) * RESCALE_INTERCEPT_STEPS:
        raise DicomError(f"{path}: RescaleSlope {slope:g} / RescaleIntercept {intercept:g} give no usable image "
                         f"(supported: {low:g} <= |slope| <= {high:g}, |intercept| <= {RESCALE_INTERCEPT_STEPS} x |slope|)")


# The modality rescale's bounds: values stay normal float32 numbers (|slope| in range, stored values up to
# 32 bits), and float32's 24-bit mantissa still tells stored values one step apart at the intercept.
RESCALE_SLOPE_RANGE = (1e-20, 1e20)
RESCALE_INTERCEPT_STEPS = 2 ** 22


def _rescale(ds, path: Path) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept), (1, 0) when absent (an absent slope is 1, a slope of 0 is not)."""
    return (_header_number(ds, "RescaleSlope", path, 1.0, float),
            _header_number(ds, "RescaleIntercept", path, 0.0, float))


def check_series(s: Series, limits: SliceLimits) -> SeriesGrid:
    """Headers of one series: single-frame monochrome MR of one orientation, size and spacing,
    positions on one line without gaps; the limits checked on the display axes. No pixels."""
    n = len(s.files)
    first = s.files[0]
    for path, ds in zip(s.files, s.headers):
        frames = _header_number(ds, "NumberOfFrames", path, 1)
        if frames > 1:
            raise DicomError(f"{path}: multi-frame image ({frames} frames) is not supported; export the series "
                             "as single-frame (classic) MR images")
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
        if _header_number(ds, "SamplesPerPixel", path, 1) != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise DicomError(f"{path}: color image ({_shown(photometric)}); expected grayscale MR")
        _check_pixel_encoding(ds, path)
        _check_transfer_syntax(ds, path)
    frames_of_reference = {str(ds.get("FrameOfReferenceUID", "") or "") for ds in s.headers}
    if len(frames_of_reference) > 1:
        raise DicomError(f"{first.parent}: {s.label} mixes frames of reference (images from several sessions or "
                         "registrations): their positions cannot be compared")
    rows = {(_header_number(ds, "Rows", p, 0), _header_number(ds, "Columns", p, 0)) for p, ds in zip(s.files, s.headers)}
    if len(rows) > 1:
        raise DicomError(f"{first.parent}: {s.label} mixes image sizes {sorted(rows)}")
    (r, c), = rows
    iops = np.array([_floats(ds, "ImageOrientationPatient", 6, p) for p, ds in zip(s.files, s.headers)])
    spacings = np.array([_floats(ds, "PixelSpacing", 2, p) for p, ds in zip(s.files, s.headers)])
    ipps = np.array([_floats(ds, "ImagePositionPatient", 3, p) for p, ds in zip(s.files, s.headers)])
    if not np.allclose(iops, iops[0], atol=ORIENTATION_ATOL):
        raise DicomError(f"{first.parent}: {s.label} mixes image orientations (several stacks or a reformat)")
    if not np.allclose(spacings, spacings[0], atol=1e-4) or (spacings[0] <= 0).any():
        raise DicomError(f"{first.parent}: {s.label} mixes or lacks pixel spacings")
    x, y = iops[0][:3], iops[0][3:]
    if abs(np.linalg.norm(x) - 1) > 1e-3 or abs(np.linalg.norm(y) - 1) > 1e-3 or abs(x @ y) > 1e-3:
        raise DicomError(f"{first}: ImageOrientationPatient {iops[0].tolist()} is not two orthogonal unit vectors")
    normal = np.cross(x, y)
    along = ipps @ normal
    order = [int(i) for i in np.argsort(along, kind="stable")]
    along, ipps_sorted = along[order], ipps[order]
    steps = np.diff(along)
    if n > 1:
        same = np.flatnonzero(steps < POSITION_ATOL_MM)
        if same.size:
            i = int(same[0])
            raise DicomError(f"{first.parent}: {s.label} has two images at one position ({s.files[order[i]].name}, "
                             f"{s.files[order[i + 1]].name}: several echoes, phases or stacks in one series)")
        step = float(np.median(steps))
        gap = np.flatnonzero(steps > step * 1.5)
        if gap.size:
            i = int(gap[0])
            raise DicomError(f"{first.parent}: {s.label} is missing slices: a gap of {steps[i]:.2f} mm after the image "
                             f"at {along[i]:.2f} mm along the normal (slices are {step:.2f} mm apart)")
        if np.abs(steps - step).max() > max(0.1 * step, POSITION_ATOL_MM):
            raise DicomError(f"{first.parent}: {s.label} has uneven slice spacing ({steps.min():.2f} to {steps.max():.2f} mm)")
        step_vec = (ipps_sorted[-1] - ipps_sorted[0]) / (n - 1)
        line = ipps_sorted[0] + np.arange(n)[:, None] * step_vec
        if np.abs(ipps_sorted - line).max() > max(0.05 * step, 0.1):
            raise DicomError(f"{first.parent}: {s.label}: image positions do not lie on one line (an inconsistent "
                             "oblique or several stacks)")
    else:
        ds = s.headers[0]  # one image: no second position, so the header's spacing is the slice step
        thickness = abs(_header_number(ds, "SpacingBetweenSlices", first, 0.0, float)) or \
            abs(_header_number(ds, "SliceThickness", first, 1.0, float))
        if not 0 < thickness < np.inf:
            raise DicomError(f"{first}: no valid SpacingBetweenSlices or SliceThickness for a one-image series")
        step_vec = normal * thickness
    dr, dc = spacings[0]
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = x * dc, y * dr, step_vec, ipps_sorted[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS -> RAS, the NIfTI convention
    grid = SeriesGrid(s, order, r, c, iops[0], spacings[0], ipps_sorted, affine, frames_of_reference.pop())
    _check_size(grid, limits)
    return grid


class _Header:
    """What readers.nifti.check_limits reads: a shape and an affine."""

    def __init__(self, shape: tuple[int, int, int], affine: np.ndarray) -> None:
        self.shape, self.affine = shape, affine


def _check_size(grid: SeriesGrid, limits: SliceLimits) -> None:
    where = grid.series.files[0].parent
    try:
        check_limits(_Header(grid.shape, grid.affine), where, limits)
    except SliceLimitError as exc:
        raise SliceLimitError(f"{exc} ({grid.series.label})") from None
    if int(np.prod(grid.shape)) > MAX_VOXELS:
        raise SliceLimitError(f"{where}: {grid.series.label} of {'x'.join(map(str, grid.shape))} voxels is larger than "
                              f"{MAX_VOXELS}")
    from segengine.engine.readers.budget import check_memory

    voxels = int(np.prod(grid.shape))
    # three channels decoded and rescaled as float32, their float32 copy in the Kaggle layout (plan v2),
    # then the uint8 volume and the mask (as for NIfTI)
    check_memory(where, len(grid.order), voxels, voxels * (3 * 4 + 3 * 4 + 4), limits.max_memory,
                 f"{len(grid.order)} slices of {grid.columns}x{grid.rows}")


def _same_grid(a: SeriesGrid, b: SeriesGrid) -> str | None:
    """What differs between two series' grids, or None."""
    if a.frame_of_reference and b.frame_of_reference and a.frame_of_reference != b.frame_of_reference:
        return "another frame of reference: equal positions need not be the same place"
    if (a.rows, a.columns) != (b.rows, b.columns):
        return f"{b.columns}x{b.rows} images against {a.columns}x{a.rows}"
    if len(a.order) != len(b.order):
        return f"{len(b.order)} slices against {len(a.order)}"
    if not np.allclose(a.orientation, b.orientation, atol=ORIENTATION_ATOL):
        return "another orientation"
    if not np.allclose(a.spacing, b.spacing, atol=1e-4):
        return f"pixel spacing {b.spacing.tolist()} against {a.spacing.tolist()}"
    if not np.allclose(a.positions, b.positions, atol=POSITION_ATOL_MM):
        return "other slice positions"
    return None


@dataclass
class StudyPlan:
    """What a study's headers decided: the series per role, their shared grid; no pixels read yet."""

    folder: Path
    grids: dict[str, SeriesGrid]  # role -> grid (FLAIR always)
    ignored: list[Series]

    @property
    def files(self) -> list[Path]:
        return [f for g in self.grids.values() for f in g.series.files]


_PLANS: OrderedDict = OrderedDict()  # (folder, limits) -> (files' stat signature, plan)


_PLANS_LOCK = threading.Lock()


PLAN_CACHE_SIZE = 4


def _signature(files: list[Path]) -> tuple | None:
    try:
        return tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in (os.stat(f) for f in files))
    except OSError:
        return None


def plan_study(folder: str | Path, limits: SliceLimits = DEFAULT_LIMITS) -> StudyPlan:
    """Headers only: find, classify and check the series (the one-line refusals happen here).

    A job checks a study before the model loads and reads it later: the plan is kept for a few
    studies and reused while its files are unchanged (same inode, size, mtime), so each header
    is parsed once per run.
    """
    folder = Path(folder)
    key = (os.path.realpath(folder), limits)
    with _PLANS_LOCK:
        hit = _PLANS.get(key)
    if hit is not None and hit[0] == _signature(hit[1].files):
        return hit[1]
    plan = _plan_study(folder, limits)
    with _PLANS_LOCK:
        _PLANS[key] = (_signature(plan.files), plan)
        _PLANS.move_to_end(key)
        while len(_PLANS) > PLAN_CACHE_SIZE:
            _PLANS.popitem(last=False)
    return plan


def _plan_study(folder: Path, limits: SliceLimits) -> StudyPlan:
    series = scan_study(folder, limits.max_memory)
    chosen = choose_series(folder, series, dict(getattr(limits, "series", ()) or ()))
    flair = check_series(chosen.pop("flair")[0], limits)
    grids = {"flair": flair}
    for role, candidates in chosen.items():
        if len(candidates) == 1:  # named with --series, or the only one: it must fit
            g = check_series(candidates[0], limits)
            why = _same_grid(flair, g)
            if why:
                raise DicomError(f"{folder}: the {role} {g.series.label} does not share the FLAIR series' grid ({why}); "
                                 f"the series must share one geometry (--series {role}=none leaves it out)")
            grids[role] = g
            continue
        fitting = [g for g in (_grid_or_none(c, limits) for c in candidates) if g is not None and not _same_grid(flair, g)]
        if len(fitting) != 1:
            raise DicomError(f"{folder}: several {role} series ({_describe(candidates)}), {len(fitting)} of them on the "
                             f"FLAIR series' grid; choose one with --series {role}=<uid or description>")
        grids[role] = fitting[0]
    used = {g.series.uid for g in grids.values()}
    return StudyPlan(folder, grids, [s for s in series if s.uid not in used])


def _grid_or_none(s: Series, limits: SliceLimits) -> SeriesGrid | None:
    """The series' grid, or None if its headers are refused (a candidate that cannot be the one)."""
    try:
        return check_series(s, limits)
    except DataError:
        return None


def check_dicom_study(folder: str | Path, limits: SliceLimits = DEFAULT_LIMITS) -> list[Path]:
    """Headers only, before a model loads; returns the files read (what OUT/<id> is kept away from)."""
    return plan_study(folder, limits).files


# ---------------------------------------------------------------- pixels
def _native_frame(path: Path, ds, offset: int | None, rows: int, columns: int) -> np.ndarray | None:
    """An uncompressed little-endian frame read at its PixelData offset, or None to let pydicom decode it."""
    bits = _header_number(ds, "BitsAllocated", path, 16)  # checked by _check_pixel_encoding
    stored = _header_number(ds, "BitsStored", path, bits)
    signed = _header_number(ds, "PixelRepresentation", path, 0) == 1
    if offset is None or (signed and stored and stored < bits):
        return None
    explicit = str(ds.file_meta.TransferSyntaxUID) == NATIVE_LE[1]
    expected = rows * columns * bits // 8
    fh = _open_regular(path)
    if fh is None:
        raise DicomError(f"{path}: not a regular file")
    with fh:
        fh.seek(offset)
        head = fh.read(12 if explicit else 8)
        if head[:4] != PIXEL_DATA_TAG or (explicit and head[4:6] not in (b"OW", b"OB")):
            return None
        length = int.from_bytes(head[-4:], "little")
        if length not in (expected, expected + (expected & 1)):
            return None  # pydicom says what is wrong with it
        data = fh.read(expected)
    if len(data) != expected:
        raise DicomError(f"{path}: truncated pixel data ({len(data)} of {expected} bytes)")
    frame = np.frombuffer(data, dtype=f"<{'i' if signed else 'u'}{bits // 8}").reshape(rows, columns)
    if stored and stored < bits:  # unsigned: bits above BitsStored are not part of the value
        frame = frame & np.array((1 << stored) - 1, dtype=frame.dtype)
    return frame


def _decoded_frame(path: Path) -> tuple[np.ndarray, object]:
    import pydicom

    fh = _open_regular(path)
    if fh is None:
        raise DicomError(f"{path}: not a regular file")
    try:
        with fh:
            ds = pydicom.dcmread(fh)
        return ds.pixel_array, ds
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt pixel data, decoder failures
        raise DicomError(f"{path}: truncated or corrupt pixel data ({_first_line(exc)})") from None


def _read_series(grid: SeriesGrid) -> np.ndarray:
    """The series' voxels as float32 (column, row, slice), modality rescale applied per image."""
    s = grid.series
    out = np.empty((len(grid.order), grid.rows, grid.columns), dtype=np.float32)
    for k, i in enumerate(grid.order):
        path, ds = s.files[i], s.headers[i]
        frame = _native_frame(path, ds, s.pixel_offsets[i], grid.rows, grid.columns)
        if frame is None:
            frame, ds = _decoded_frame(path)
        if frame.shape != (grid.rows, grid.columns):
            raise DicomError(f"{path}: pixel data of shape {frame.shape}, header says {grid.rows}x{grid.columns}")
        slope, intercept = _rescale(ds, path)
        sign = -1.0 if str(ds.get("PhotometricInterpretation")) == "MONOCHROME1" else 1.0  # bright = low values
        out[k] = frame * (slope * sign) + intercept * sign  # in float64 (bounded by _check_pixel_encoding), kept float32
    return out.transpose(2, 1, 0)


@dataclass(frozen=True)
class DicomGrid(NiftiGrid):
    """A DICOM study's FLAIR grid as a NiftiGrid (RAS affine from the headers) plus what the SEG references."""

    REPORT_KEY: ClassVar[str] = "dicom"
    flair_headers: tuple = ()  # FLAIR datasets without pixels, in slice order (the SEG's source images)
    series: dict = field(default_factory=dict)  # role -> {"uid", "description", "images"}
    ignored: tuple = ()  # (uid, description) of the study's other series

    def report(self) -> dict:
        import nibabel as nib

        return {"series": self.series, "filled_with_flair": list(self.filled_with_flair),
                "ignored_series": [{"uid": u, "description": d} for u, d in self.ignored],
                "shape": list(self.shape), "affine": np.round(self.affine, 6).tolist(),
                "axcodes": "".join(nib.orientations.ornt2axcodes(self.orientation))}

    def frames(self, mask: np.ndarray) -> np.ndarray:
        """A (D, H, W) display-layout mask as (slice, row, column) frames of the FLAIR images, in slice order."""
        return np.ascontiguousarray(self.from_kaggle(np.asarray(mask, dtype=np.uint8)).transpose(2, 1, 0))


def _nifti_header(affine: np.ndarray) -> nib.Nifti1Header:
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_qform(affine, code="scanner")
    header.set_sform(affine, code="scanner")
    header.set_xyzt_units("mm", "sec")
    return header


def read_dicom_study(folder: str | Path, with_mask: bool = True, limits: SliceLimits = DEFAULT_LIMITS) -> PatientVolume:
    """Read a study into the display layout (D, H, W, 3 uint8: pre, FLAIR, post); no ground truth."""
    from nibabel.orientations import io_orientation

    plan = plan_study(folder, limits)
    flair = plan.grids["flair"]
    filled = tuple(r for r in ("pre", "post") if r not in plan.grids)
    grid = DicomGrid(shape=flair.shape, affine=flair.affine, header=_nifti_header(flair.affine),
                     orientation=io_orientation(flair.affine),
                     files={r: str(plan.grids[r if r in plan.grids else "flair"].series.uid) for r in SEQUENCES},
                     filled_with_flair=filled,
                     flair_headers=tuple(flair.series.headers[i] for i in flair.order),
                     series={r: {"uid": g.series.uid, "description": g.series.description, "images": len(g.order)}
                             for r, g in plan.grids.items()},
                     ignored=tuple((s.uid, s.description) for s in plan.ignored))
    # separate series, separate units: each rescaled to 8 bits on its own for display and plan v1,
    # as NIfTI files are; plan v2 reads the rescaled values themselves (``intensities``)
    raw = {r: _read_series(g) for r, g in plan.grids.items()}
    channels = {r: grid.to_kaggle(to_uint8(v)) for r, v in raw.items()}
    image = np.empty(channels["flair"].shape + (len(SEQUENCES),), dtype=np.uint8)  # C order whatever the views' axes
    intensities = np.empty(image.shape, dtype=np.float32)
    for c, r in enumerate(SEQUENCES):
        image[..., c] = channels.get(r, channels["flair"])
        intensities[..., c] = grid.to_kaggle(raw.get(r, raw["flair"]))
    del raw
    return PatientVolume(patient_id=study_id(plan.folder), folder=plan.folder,
                         slice_numbers=list(range(1, image.shape[0] + 1)), image=image, intensities=intensities,
                         mask=None, spacing_mm=grid.spacing_mm(), source_grid=grid)
