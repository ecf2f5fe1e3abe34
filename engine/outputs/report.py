"""report.json of one patient: volumes, slices with tumor, model and backend, timings, the quality
estimate (``review``) and, with ground truth, the metrics."""
from __future__ import annotations

import math

import numpy as np

from segengine.engine.evaluation.metrics import distance_unit, volume_metrics
from segengine.engine.postprocessing.finish import Segmentation
from segengine.engine.postprocessing.quality import Review
from segengine.engine.readers.volume import PatientVolume


def report_dict(volume: PatientVolume, seg: Segmentation, backend: str, model_sha256: str, model_name: str,
                postprocess: dict, timings: dict[str, float], spacing_mm: tuple[float, float, float] | None = None,
                review: "Review | None" = None, plan: dict | None = None) -> dict:
    """report.json of one patient; ``review`` (the plan's ``quality.Review``) gives the quality
    estimate; ``plan`` lists an ensemble's or TTA run's member models (``InferencePlan.describe``)."""
    from segengine.engine.postprocessing.quality import Review

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
            volume.image, seg.prob, seg.mask, postprocess.get("threshold", 0.5), seg.views_agreement,
            seg.component_sizes, volume.intensities),
    }
    if volume.source_grid is not None:  # "nifti", or "dicom" for a DICOM study (readers.dicom.DicomGrid)
        rep[getattr(volume.source_grid, "REPORT_KEY", "nifti")] = volume.source_grid.report()
    if seg.truth is not None:
        unit = distance_unit(spacing_mm)
        m = volume_metrics(seg.mask, seg.truth, spacing=spacing_mm)
        rep["metrics"] = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}
        rep["metrics_note"] = f"native protocol: every slice on its original grid; HD95 in {unit}"
        rep["distance_unit"] = unit
    return rep
