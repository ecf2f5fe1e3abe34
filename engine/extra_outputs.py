"""Outputs beyond the masks, NIfTI, overlay and report: the DICOM SEG of a DICOM study and,
with ``--save-probabilities``, the probability map. Called by ``outputs.write_patient``
inside the patient's temporary folder, so they are written all or nothing with the rest."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from segengine.engine.io import PatientVolume
from segengine.engine.pipeline import Segmentation


def write_extra_outputs(folder: Path, volume: PatientVolume, seg: Segmentation, report: dict,
                        probabilities: bool = False) -> None:
    """Write them into ``folder`` and record them in ``report`` (written after this)."""
    import nibabel as nib

    from segengine.engine.dicom_io import SEG_NAME, DicomGrid, write_seg
    from segengine.engine.nifti_io import prob_nifti

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
