"""The DICOM SEG of a DICOM study (highdicom): one segment referencing the FLAIR instances."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from segengine.engine.readers.dicom import DicomGrid

if TYPE_CHECKING:  # heavy imports stay inside the functions that need them
    import highdicom as hd


SEG_NAME = "{patient}_seg.dcm"


# ---------------------------------------------------------------- DICOM SEG
def segment_description(model_name: str, version: str) -> hd.seg.SegmentDescription:
    """The SEG's one segment, coded (SCT Neoplasm, a morphologically abnormal structure of the
    brain) rather than only labelled, so viewers and PACS can tell what it is without our text;
    the algorithm identification names the model that produced it."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.seg.SegmentDescription(
        segment_number=1, segment_label="FLAIR abnormality",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="segengine", version=version, family=codes.cid7162.ArtificialIntelligence,
            source=model_name),
        anatomic_regions=[codes.SCT.Brain])


def write_seg(path: Path, grid: DicomGrid, mask: np.ndarray, model_name: str = "segengine",
              model_sha256: str = "") -> dict:
    """A binary DICOM SEG of ``mask`` (display layout) on the FLAIR images; returns what the report says of it."""
    import highdicom as hd
    from pydicom.uid import generate_uid

    try:
        from importlib.metadata import version as _version

        version = _version("segengine")
    except Exception:  # noqa: BLE001 - an uninstalled checkout
        version = "unknown"
    frames = grid.frames(mask).astype(bool)
    seg = hd.seg.Segmentation(
        source_images=list(grid.flair_headers), pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment_description(model_name, version)],
        series_instance_uid=generate_uid(), series_number=9001, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer="segengine", manufacturer_model_name=model_name[:64], software_versions=version,
        device_serial_number=(model_sha256 or "none")[:64], series_description="segengine FLAIR abnormality",
        content_label="FLAIR_ABN",
        omit_empty_frames=bool(frames.any()))  # only slices with tumor; an empty SEG keeps all (highdicom would say so)
    seg.save_as(path)
    return {"file": path.name, "series_instance_uid": str(seg.SeriesInstanceUID),
            "sop_instance_uid": str(seg.SOPInstanceUID), "frames": int(seg.NumberOfFrames),
            "references_series": grid.series["flair"]["uid"]}
