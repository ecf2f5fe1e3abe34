"""What `segengine run` writes per patient, all or nothing: one writer per output format.

``write_patient`` runs every writer of :data:`WRITERS` inside the patient's temporary folder
(``results_dir.atomic_dir``), then report.json, so OUT/<patient>/ appears complete or not at
all. A writer that does not apply (no DICOM input, no --gif) writes nothing.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from segengine.engine.outputs.masks import write_mask_slices
from segengine.engine.outputs.nifti import mask_nifti, prob_nifti
from segengine.engine.outputs.pictures import contact_sheet, overlay_slices
from segengine.engine.outputs.results_dir import atomic_dir
from segengine.engine.postprocessing.finish import Segmentation
from segengine.engine.readers.volume import PatientVolume


@dataclass
class PatientOutputs:
    """What the writers write from: the patient, its segmentation, its report (written last) and the options."""

    volume: PatientVolume
    seg: Segmentation
    report: dict
    gif: bool = False
    probabilities: bool = False


def _mask_slices(folder: Path, o: PatientOutputs) -> None:
    """<patient>_<n>_mask.tif per input slice, uint8 0/255 (the Kaggle naming)."""
    write_mask_slices(folder, o.volume.patient_id, o.volume.slice_numbers, o.seg.mask)


def _mask_nifti(folder: Path, o: PatientOutputs) -> None:
    """<patient>_mask.nii.gz on the input's grid (nibabel's gzip level 1)."""
    import nibabel as nib

    nib.save(mask_nifti(o.volume, o.seg.mask), str(folder / f"{o.volume.patient_id}_mask.nii.gz"))


def _dicom_seg(folder: Path, o: PatientOutputs) -> None:
    """<patient>_seg.dcm for a DICOM study, referencing its FLAIR instances."""
    from segengine.engine.outputs.dicom_seg import SEG_NAME, write_seg
    from segengine.engine.readers.dicom import DicomGrid

    grid = o.volume.source_grid
    if not isinstance(grid, DicomGrid) or o.seg.protocol != "native":
        return
    t = time.perf_counter()
    path = folder / SEG_NAME.format(patient=o.volume.patient_id)
    try:
        info = write_seg(path, grid, o.seg.mask, o.report.get("model", "segengine"), o.report.get("model_sha256", ""))
    except (OSError, MemoryError):
        raise  # a full disk or memory fails the patient (nothing kept), as for every other output
    except Exception as exc:  # noqa: BLE001 - highdicom refuses source headers it finds incomplete
        # the masks, NIfTI and report are still right: keep them, say why there is no SEG
        path.unlink(missing_ok=True)
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        info = {"error": f"no DICOM SEG written: {why}"}
        print(f"segengine: warning: {o.volume.patient_id}: {info['error']}", file=sys.stderr, flush=True)
    o.report.setdefault(grid.REPORT_KEY, {})["seg"] = info
    o.report["timings_s"]["dicom_seg"] = round(time.perf_counter() - t, 4)


def _probabilities(folder: Path, o: PatientOutputs) -> None:
    """--save-probabilities: <patient>_prob.nii.gz on the input's grid."""
    import nibabel as nib

    if not o.probabilities:
        return
    name = f"{o.volume.patient_id}_prob.nii.gz"
    nib.save(prob_nifti(o.volume, o.seg.prob), str(folder / name))
    o.report["probabilities"] = {"file": name, "grid": "the input's (as the mask NIfTI)",
                                 "storage": "uint16, scl_slope 1/65535 (NIfTI-1 has no float16)"}


def _overlay(folder: Path, o: PatientOutputs) -> None:
    """overlay.png: the slices with tumor, outlines of prediction and truth (zlib level 1: as small as 6 here)."""
    contact_sheet(o.volume, o.seg.mask, o.seg.truth).save(folder / "overlay.png", compress_level=1)


def _gif(folder: Path, o: PatientOutputs) -> None:
    """--gif: slices.gif, every slice with its outlines."""
    from PIL import Image

    if not o.gif:
        return
    frames = [Image.fromarray(t) for t in overlay_slices(o.volume.image, o.seg.mask, o.seg.truth)]
    frames[0].save(folder / "slices.gif", save_all=True, append_images=frames[1:], duration=120, loop=0)


def _review_page(folder: Path, o: PatientOutputs) -> None:
    """review.html, the patient's page of the review index."""
    from segengine.engine.outputs.review_page import write_patient_review

    t = time.perf_counter()
    write_patient_review(folder, o.volume, o.seg.mask, o.seg.truth, o.report)
    o.report["timings_s"]["review_page"] = round(time.perf_counter() - t, 4)


WRITERS: tuple[tuple[str, Callable[[Path, PatientOutputs], None]], ...] = (
    ("mask slices", _mask_slices),
    ("mask NIfTI", _mask_nifti),
    ("DICOM SEG", _dicom_seg),
    ("probabilities", _probabilities),
    ("overlay", _overlay),
    ("gif", _gif),
    ("review page", _review_page),
)


def write_patient(out: Path, volume: PatientVolume, seg: Segmentation, report: dict, overwrite: bool = False,
                  gif: bool = False, probabilities: bool = False) -> Path:
    """Write every output of one patient into ``out/<patient>/``, all or nothing; report.json last."""
    t = time.perf_counter()
    outputs = PatientOutputs(volume, seg, report, gif, probabilities)
    with atomic_dir(out, volume.patient_id, overwrite) as tmp:
        for _, writer in WRITERS:
            writer(tmp, outputs)
        flat = nnunet_prediction_name(volume)
        if flat:
            report["nnunet_prediction"] = f"../{flat}"
        report["timings_s"]["write"] = round(time.perf_counter() - t, 4)
        (tmp / "report.json").write_text(json.dumps(report, indent=2))
        if flat:
            _nnunet_prediction(out, tmp, volume.patient_id, flat)
    return out / volume.patient_id


def nnunet_prediction_name(volume: PatientVolume) -> str | None:
    """``<case>.nii.gz`` for a case of a flat nnU-Net folder (``imagesTs/<case>_0000.nii.gz``), else None."""
    from segengine.engine.readers.nnunet import case_of_file

    source = Path(volume.folder)
    return f"{volume.patient_id}.nii.gz" if not source.is_dir() and case_of_file(source) else None


def _nnunet_prediction(out: Path, tmp: Path, patient_id: str, name: str) -> None:
    """OUT/<case>.nii.gz, the mask NIfTI (uint8 0/1 on the input's grid and affine) where nnUNetv2_predict
    puts its predictions, so nnU-Net's evaluator and tools read OUT as they read its output folder.

    Written as the patient's folder is complete, just before that folder is renamed into place
    (a run killed in between redoes the patient and rewrites both); a copy staged in the
    temporary folder replaces the old file in one rename, so no reader sees half a file.
    """
    import shutil

    from segengine.engine.core.atomic import fsync_path

    staged = tmp / ".nnunet-prediction.nii.gz"
    shutil.copyfile(tmp / f"{patient_id}_mask.nii.gz", staged)
    fsync_path(staged)
    os.replace(staged, out / name)
