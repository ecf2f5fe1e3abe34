"""What `segengine run` writes per patient, atomically: masks, NIfTI, overlay, report."""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from segengine.engine.io import PatientVolume, write_mask_slices
from segengine.engine.metrics import volume_metrics
from segengine.engine.nifti_io import mask_nifti
from segengine.engine.pipeline import Segmentation
from segengine.engine.postprocess import border


class OutputError(OSError):
    """OUT is not writable, lies inside the input, or already holds results; one-line message."""


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


def _temp_prefixes(name: str) -> tuple[str, str]:
    """Names of atomic_dir's temporary folders: (being written, being replaced)."""
    return f".{name}.partial-", f".{name}.old-"


def remove_leftover_temp_dirs(out: Path, patient_id: str) -> None:
    """Remove temporary folders a killed writer of ``patient_id`` left in ``out``.

    Only safe once no writer of that patient can still be running (e.g. at the end of a job).
    """
    for prefix in _temp_prefixes(patient_id):
        for tmp in out.glob(prefix + "*"):
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_dir(out: Path, name: str, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder renamed to ``out/name`` only if the block completes.

    Patients' results and Triton model folders are written this way, so a reader never
    sees a half-written folder and a failed write leaves the previous one in place.
    """
    final = out / name
    if final.exists() and not overwrite:
        raise OutputError(f"{final}: results exist (use --overwrite to replace them)")
    partial, old = _temp_prefixes(name)
    tmp = Path(tempfile.mkdtemp(prefix=partial, dir=out))
    try:
        yield tmp
        if final.exists():
            trash = Path(tempfile.mkdtemp(prefix=old, dir=out))
            os.replace(final, trash / "old")
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def flair_rgb(image_slice: np.ndarray) -> np.ndarray:
    """FLAIR channel (index 1) of an HxWx3 uint8 slice as a contrast-stretched gray RGB image."""
    f = image_slice[..., 1].astype(np.float32)
    lo, hi = np.percentile(f, (1, 99.5))
    g = np.clip((f - lo) / max(hi - lo, 1e-6), 0, 1)
    return np.repeat((g * 255).astype(np.uint8)[..., None], 3, axis=2)


def overlay_slice(image_slice: np.ndarray, pred: np.ndarray, truth: np.ndarray | None) -> np.ndarray:
    rgb = flair_rgb(image_slice)
    if truth is not None:
        rgb[border(truth)] = (0, 220, 0)
    rgb[border(pred)] = (255, 40, 40)
    return rgb


def contact_sheet(volume: PatientVolume, pred: np.ndarray, truth: np.ndarray | None, max_tiles: int = 20,
                  columns: int = 5) -> np.ndarray:
    """Slices with tumor (predicted or true): FLAIR, predicted outline red, ground truth green."""
    has = pred.any(axis=(1, 2)) | (truth.any(axis=(1, 2)) if truth is not None else False)
    idx = np.flatnonzero(has)
    if idx.size == 0:
        idx = np.array([volume.num_slices // 2])
    if idx.size > max_tiles:
        idx = idx[np.linspace(0, idx.size - 1, max_tiles).round().astype(int)]
    tiles = [overlay_slice(volume.image[i], pred[i], None if truth is None else truth[i]) for i in idx]
    h, w = tiles[0].shape[:2]
    cols = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    sheet = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, cols)
        sheet[r * h : (r + 1) * h, c * w : (c + 1) * w] = t
    return sheet


def report_dict(volume: PatientVolume, seg: Segmentation, backend: str, model_sha256: str, model_name: str,
                postprocess: dict, timings: dict[str, float], spacing_mm: tuple[float, float, float] | None = None) -> dict:
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
        "postprocess": postprocess,
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
    }
    if volume.source_grid is not None:
        rep["nifti"] = volume.source_grid.report()
    if seg.truth is not None:
        m = volume_metrics(seg.mask, seg.truth)
        rep["metrics"] = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}
        rep["metrics_note"] = "native protocol: every slice on its original grid; HD95 in pixels"
    return rep


def write_patient(out: Path, volume: PatientVolume, seg: Segmentation, report: dict, overwrite: bool = False,
                  gif: bool = False) -> Path:
    """Write every output of one patient into ``out/<patient>/``, all or nothing."""
    import nibabel as nib
    from PIL import Image

    from segengine.engine.review_page import write_patient_review

    t = time.perf_counter()
    with atomic_dir(out, volume.patient_id, overwrite) as tmp:
        mask_u8 = np.where(seg.mask, np.uint8(255), np.uint8(0))
        write_mask_slices(tmp, volume.patient_id, volume.slice_numbers, mask_u8)
        nib.save(mask_nifti(volume, seg.mask), str(tmp / f"{volume.patient_id}_mask.nii.gz"))
        truth = seg.truth if seg.truth is not None else None
        Image.fromarray(contact_sheet(volume, seg.mask, truth)).save(tmp / "overlay.png", optimize=False)
        if gif:
            frames = [Image.fromarray(overlay_slice(volume.image[i], seg.mask[i], None if truth is None else truth[i]))
                      for i in range(volume.num_slices)]
            frames[0].save(tmp / "slices.gif", save_all=True, append_images=frames[1:], duration=120, loop=0)
        t_review = time.perf_counter()
        write_patient_review(tmp, volume, seg.mask, truth, report)
        report["timings_s"]["review_page"] = round(time.perf_counter() - t_review, 4)
        report["timings_s"]["write"] = round(time.perf_counter() - t, 4)
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
    return out / volume.patient_id
