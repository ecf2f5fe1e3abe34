"""What `segengine run` writes per patient, atomically: masks, NIfTI, overlay, report."""
from __future__ import annotations

from typing import TYPE_CHECKING

import json
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from segengine.engine.fsguard import (OutputError, check_result_entry, disown, entry_kind, is_owned_dir,
                                      make_owned_dir)
from segengine.engine.io import PatientVolume, write_mask_slices
from segengine.engine.metrics import distance_unit, volume_metrics
from segengine.engine.nifti_io import mask_nifti
from segengine.engine.extra_outputs import write_extra_outputs
from segengine.engine.pipeline import Segmentation
from segengine.engine.postprocess import border


class ResultsExistError(OutputError):
    """OUT/<patient> is complete and --overwrite was not given."""


class ResourceError(RuntimeError):
    """The machine ran out of something (disk, memory) while a job ran; one-line message, exit 1."""


class DiskFullError(ResourceError):
    pass


def check_out_dir(out: Path, inputs: list[Path]) -> None:
    """Refuse an OUT inside an input folder; create OUT and prove it writable."""
    out_r = out.resolve()
    for src in inputs:
        src_r = src.resolve()
        if out_r == src_r or src_r in out_r.parents:
            raise OutputError(f"{out}: output folder lies inside the input folder {src}; inputs are never written to")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".segengine-probe-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{out}: output folder is not writable ({exc.strerror or exc})") from None


def check_writable_file(path: Path, option: str) -> None:
    """Before any work: ``path`` can be created or replaced (its folder exists and is writable)."""
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise OutputError(f"{path}: {option} names a folder, expected a file path")
    if not parent.is_dir():
        why = "is not a folder" if parent.exists() else "does not exist"
        raise OutputError(f"{path}: {option}: {parent} {why}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".segengine-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{path}: {option}: folder {parent} is not writable ({exc.strerror or exc})") from None
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{path}: {option}: file exists and is not writable")


def check_writable_dir(path: Path, option: str) -> None:
    """Before any work: ``path`` is (or can be made) a writable folder."""
    try:
        check_out_dir(path, [])
    except OutputError as exc:
        raise OutputError(f"{option}: {exc}") from None


# Temporary entries of atomic_dir beside OUT/<name>: ".<name>.partial-XXXXXXXX" (being written)
# and ".<name>.old-XXXXXXXX/old" (the previous result while it is being replaced); XXXXXXXX is
# tempfile's 8-character suffix, so the id "A.partial-x" never matches A's temp entries.
TEMP_ENTRY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-[a-z0-9_]{8}$")


def _temp_prefixes(name: str) -> tuple[str, str]:
    return f".{name}.partial-", f".{name}.old-"


def temp_entries(out: Path, name: str | None = None) -> list[tuple[str, str, Path]]:
    """(name, "partial"|"old", path) of atomic_dir's temporary entries in ``out`` (of ``name`` only if given)."""
    found = []
    try:
        entries = list(os.scandir(out))
    except FileNotFoundError:
        return []
    for entry in entries:
        m = TEMP_ENTRY.match(entry.name)
        if m and (name is None or m.group("name") == name):
            found.append((m.group("name"), m.group("kind"), Path(entry.path)))
    return found


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Every file and folder under ``folder`` on disk before it is renamed into place."""
    for root, dirs, files in os.walk(folder):
        for f in files:
            _fsync_path(Path(root) / f)
        _fsync_path(Path(root))


@contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, for steps that must not be split (a temp folder
    created and recorded, a lock taken and recorded, the two renames of a replace).

    Python-level: the handlers are swapped for a recorder and the signals replayed on exit
    (a signal mask would not do: any of the runtimes' threads may receive a process signal).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(caught):
            handler = previous[s]
            if callable(handler):
                handler(s, None)  # e.g. raises KeyboardInterrupt / the CLI's Terminated
            elif handler == signal.SIG_DFL:
                signal.raise_signal(s)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def recover_interrupted(out: Path, name: str) -> str | None:
    """Finish or undo a replace of ``out/name`` that a killed writer left half done.

    Call only while no other writer of ``name`` can run (the patient lock is held). Temp
    folders being written are removed; a previous result set aside (``.old-``) is put back
    when ``out/name`` is missing, and deleted only when ``out/name`` is in place (a complete
    folder: it only ever gets there by one rename of a finished folder). Only temp folders
    the engine made are touched (``fsguard``: real folders with its owner marker; links and
    planted folders are left alone and reported). Returns what it did.
    """
    final = out / name
    did = []
    entries = temp_entries(out, name)
    for _, kind, path in sorted(entries, key=lambda e: e[1] != "old"):  # "old" first
        if not is_owned_dir(path, name, kind):
            did.append(f"left {path.name} alone ({'a symbolic link' if path.is_symlink() else 'not made by segengine'})")
            continue
        if kind == "old":
            kept = path / "old"
            if entry_kind(final) == "missing" and entry_kind(kept) == "dir":
                os.replace(kept, final)
                _fsync_path(out)
                did.append("restored the previous result")
            if entry_kind(final) == "dir":
                shutil.rmtree(path, ignore_errors=True)
        else:
            shutil.rmtree(path, ignore_errors=True)
            did.append("removed an unfinished temp folder")
    return "; ".join(did) or None


@contextmanager
def atomic_dir(out: Path, name: str, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out/name`` only if the block completes.

    Patients' results and Triton model folders are written this way, so a reader never sees
    a half-written folder. The files and folder are fsynced before the rename. Replacing is
    two renames (old aside, new in); a kill between them is undone by recover_interrupted at
    the next write, so the old result is only deleted once the new one is in place. Callers
    that may run concurrently hold a lock on ``name`` (see patient_job).
    """
    final = out / name
    recover_interrupted(out, name)
    if check_result_entry(final) and not overwrite:  # a link or file at OUT/<name>: refused, left alone
        raise ResultsExistError(f"{final}: results exist (use --overwrite to replace them)")
    partial, old = _temp_prefixes(name)
    tmp = None
    try:
        with deferred_signals():
            tmp = make_owned_dir(out, partial, name, "partial")
        yield tmp
        _fsync_tree(tmp)
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; results follow the umask like any folder
        with deferred_signals():  # Ctrl-C/SIGTERM never split a replace; SIGKILL is undone by recover_interrupted
            if check_result_entry(final):
                trash = make_owned_dir(out, old, name, "old")
                os.replace(final, trash / "old")
                os.replace(tmp, final)
                _fsync_path(out)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(tmp, final)
                _fsync_path(out)
            disown(final)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        try:
            recover_interrupted(out, name)  # put a result set aside back if the new one is not in
        except OSError:
            pass
        raise


TRUTH_COLOR, PRED_COLOR = (0, 220, 0), (255, 40, 40)  # outlines: ground truth green, prediction red
SHEET_GRAYS = 254  # overlay.png is a palette image: 254 gray levels, then the two outline colors


def _stretched_flair(images: np.ndarray) -> np.ndarray:
    """FLAIR channel (index 1) of (..., H, W, 3) uint8 slices, each stretched to [0, 1] (1st-99.5th percentile)."""
    f = images[..., 1].astype(np.float32)
    lo, hi = np.percentile(f, (1, 99.5), axis=(-2, -1), keepdims=True)
    return np.clip((f - lo) / np.maximum(hi - lo, np.float32(1e-6)), 0, 1)


def flair_rgb(images: np.ndarray) -> np.ndarray:
    """FLAIR channel (index 1) of (..., H, W, 3) uint8 slices, each contrast-stretched to gray RGB."""
    return np.repeat((_stretched_flair(images) * 255).astype(np.uint8)[..., None], 3, axis=-1)


def overlay_slices(images: np.ndarray, pred: np.ndarray, truth: np.ndarray | None) -> np.ndarray:
    """(N, H, W, 3) FLAIR tiles with the outline of each slice's prediction (red) and truth (green)."""
    rgb = flair_rgb(images)
    if truth is not None:
        rgb[border(truth, per_slice=True)] = TRUTH_COLOR
    rgb[border(pred, per_slice=True)] = PRED_COLOR
    return rgb


def overlay_slice(image_slice: np.ndarray, pred: np.ndarray, truth: np.ndarray | None) -> np.ndarray:
    """One HxWx3 tile of :func:`overlay_slices`."""
    return overlay_slices(image_slice[None], pred[None], None if truth is None else truth[None])[0]


def contact_sheet(volume: PatientVolume, pred: np.ndarray, truth: np.ndarray | None, max_tiles: int = 20,
                  columns: int = 5):
    """Slices with tumor (predicted or true): FLAIR, predicted outline red, ground truth green.

    A palette ("P") PIL image: one byte per pixel, so writing it as PNG is a third of the
    work of the RGB sheet (and a smaller file), at 254 gray levels instead of 256.
    """
    from PIL import Image

    has = pred.any(axis=(1, 2)) | (truth.any(axis=(1, 2)) if truth is not None else False)
    idx = np.flatnonzero(has)
    if idx.size == 0:
        idx = np.array([volume.num_slices // 2])
    if idx.size > max_tiles:
        idx = idx[np.linspace(0, idx.size - 1, max_tiles).round().astype(int)]
    tiles = (_stretched_flair(volume.image[idx]) * (SHEET_GRAYS - 1)).astype(np.uint8)
    if truth is not None:
        tiles[border(truth[idx], per_slice=True)] = SHEET_GRAYS
    tiles[border(pred[idx], per_slice=True)] = SHEET_GRAYS + 1
    n, h, w = tiles.shape
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * cols, h, w), dtype=np.uint8)
    grid[:n] = tiles
    sheet = Image.fromarray(grid.reshape(rows, cols, h, w).transpose(0, 2, 1, 3).reshape(rows * h, cols * w), "P")
    grays = np.linspace(0, 255, SHEET_GRAYS).round().astype(np.uint8)
    sheet.putpalette(np.concatenate([np.repeat(grays, 3), TRUTH_COLOR, PRED_COLOR]).astype(np.uint8).tobytes())
    return sheet


if TYPE_CHECKING:
    from segengine.engine.quality import Review


def report_dict(volume: PatientVolume, seg: Segmentation, backend: str, model_sha256: str, model_name: str,
                postprocess: dict, timings: dict[str, float], spacing_mm: tuple[float, float, float] | None = None,
                review: "Review | None" = None, plan: dict | None = None) -> dict:
    """report.json of one patient; ``review`` (the plan's ``quality.Review``) gives the quality
    estimate; ``plan`` lists an ensemble's or TTA run's member models (``InferencePlan.describe``)."""
    from segengine.engine.quality import Review

    mask = seg.mask
    spacing_mm = spacing_mm or volume.spacing_mm
    area = mask.reshape(len(mask), -1).sum(axis=1).astype(int)
    with_tumor = np.flatnonzero(area)
    rep = {
        "patient": volume.patient_id,
        "input": str(volume.folder),
        "slices": volume.num_slices,
        "slice_numbers": volume.slice_numbers,
        "height": int(mask.shape[1]),
        "width": int(mask.shape[2]),
        "tumor_area_px_per_slice": {str(n): int(a) for n, a in zip(volume.slice_numbers, area)},
        "tumor_volume_px": int(area.sum()),
        "tumor_volume_mm3": None if spacing_mm is None else float(area.sum() * np.prod(spacing_mm)),
        "spacing_mm": None if spacing_mm is None else list(spacing_mm),
        "spacing_note": None if spacing_mm else "voxel spacing unknown for Kaggle-layout slices; volume in pixels only",
        "tumor_slices": [volume.slice_numbers[i] for i in with_tumor],
        "tumor_bounding_slices": None if with_tumor.size == 0 else
        [volume.slice_numbers[int(with_tumor[0])], volume.slice_numbers[int(with_tumor[-1])]],
        "backend": backend,
        "model": model_name,
        "model_sha256": model_sha256,
        **({"plan": plan} if plan else {}),
        "postprocess": postprocess,
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "review": (review or Review("single", None, None)).assess(
            volume.image, seg.prob, seg.mask, postprocess.get("threshold", 0.5), seg.views_agreement),
    }
    if volume.source_grid is not None:  # "nifti", or "dicom" for a DICOM study (dicom_io.DicomGrid)
        rep[getattr(volume.source_grid, "REPORT_KEY", "nifti")] = volume.source_grid.report()
    if seg.truth is not None:
        unit = distance_unit(spacing_mm)
        m = volume_metrics(seg.mask, seg.truth, spacing=spacing_mm)
        rep["metrics"] = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}
        rep["metrics_note"] = f"native protocol: every slice on its original grid; HD95 in {unit}"
        rep["distance_unit"] = unit
    return rep


def write_patient(out: Path, volume: PatientVolume, seg: Segmentation, report: dict, overwrite: bool = False,
                  gif: bool = False, probabilities: bool = False) -> Path:
    """Write every output of one patient into ``out/<patient>/``, all or nothing
    (with ``probabilities``, also the probability map: see extra_outputs)."""
    import nibabel as nib
    from PIL import Image

    from segengine.engine.review_page import write_patient_review

    t = time.perf_counter()
    with atomic_dir(out, volume.patient_id, overwrite) as tmp:
        write_mask_slices(tmp, volume.patient_id, volume.slice_numbers, seg.mask)
        nib.save(mask_nifti(volume, seg.mask), str(tmp / f"{volume.patient_id}_mask.nii.gz"))  # nibabel's gzip level 1
        write_extra_outputs(tmp, volume, seg, report, probabilities)  # DICOM SEG, probability map
        truth = seg.truth
        # zlib level 1: as small as the default level 6 on these sheets, at a third of the time
        contact_sheet(volume, seg.mask, truth).save(tmp / "overlay.png", compress_level=1)
        if gif:
            frames = [Image.fromarray(t) for t in overlay_slices(volume.image, seg.mask, truth)]
            frames[0].save(tmp / "slices.gif", save_all=True, append_images=frames[1:], duration=120, loop=0)
        t_review = time.perf_counter()
        write_patient_review(tmp, volume, seg.mask, truth, report)
        report["timings_s"]["review_page"] = round(time.perf_counter() - t_review, 4)
        report["timings_s"]["write"] = round(time.perf_counter() - t, 4)
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
    return out / volume.patient_id
