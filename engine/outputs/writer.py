"""What `segengine run` writes per patient, atomically: masks, NIfTI, overlay, report."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from segengine.engine.outputs.masks import write_mask_slices
from segengine.engine.outputs.nifti import mask_nifti
from segengine.engine.outputs.pictures import contact_sheet, overlay_slices
from segengine.engine.outputs.results_dir import atomic_dir
from segengine.engine.postprocessing.finish import Segmentation
from segengine.engine.readers.volume import PatientVolume


def write_patient(out: Path, volume: PatientVolume, seg: Segmentation, report: dict, overwrite: bool = False,
                  gif: bool = False, probabilities: bool = False) -> Path:
    """Write every output of one patient into ``out/<patient>/``, all or nothing
    (with ``probabilities``, also the probability map: see write_extra_outputs)."""
    import nibabel as nib
    from PIL import Image

    from segengine.engine.outputs.review_page import write_patient_review

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


def write_extra_outputs(folder: Path, volume: PatientVolume, seg: Segmentation, report: dict,
                        probabilities: bool = False) -> None:
    """Write them into ``folder`` and record them in ``report`` (written after this)."""
    import nibabel as nib

    from segengine.engine.outputs.dicom_seg import SEG_NAME, write_seg
    from segengine.engine.outputs.nifti import prob_nifti
    from segengine.engine.readers.dicom import DicomGrid

    grid = volume.source_grid
    if isinstance(grid, DicomGrid) and seg.protocol == "native":
        t = time.perf_counter()
        path = folder / SEG_NAME.format(patient=volume.patient_id)
        try:
            info = write_seg(path, grid, seg.mask, report.get("model", "segengine"), report.get("model_sha256", ""))
        except (OSError, MemoryError):
            raise  # a full disk or memory fails the patient (nothing kept), as for every other output
        except Exception as exc:  # noqa: BLE001 - highdicom refuses source headers it finds incomplete
            # the masks, NIfTI and report are still right: keep them, say why there is no SEG
            path.unlink(missing_ok=True)
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            info = {"error": f"no DICOM SEG written: {why}"}
            print(f"segengine: warning: {volume.patient_id}: {info['error']}", file=sys.stderr, flush=True)
        report.setdefault(grid.REPORT_KEY, {})["seg"] = info
        report["timings_s"]["dicom_seg"] = round(time.perf_counter() - t, 4)
    if probabilities:
        name = f"{volume.patient_id}_prob.nii.gz"
        nib.save(prob_nifti(volume, seg.prob), str(folder / name))
        report["probabilities"] = {"file": name, "grid": "the input's (as the mask NIfTI)",
                                   "storage": "uint16, scl_slope 1/65535 (NIfTI-1 has no float16)"}
