"""Kaggle patients written as DICOM studies segment like their tif folders: Dice through the SEG.

    python -m segengine.bench.dicom_agreement --data kaggle_3m --patients-file val.txt [--json out.json]

Each patient becomes a study (tests/dicom_study.py: oblique by 12 degrees, frames stored
transposed, shuffled names, one folder); both forms are segmented (native protocol, same
backend), the study's mask is written as a DICOM SEG, read back with highdicom and placed on
the Kaggle slices through each frame's referenced FLAIR instance (the study's own map, not
segengine's reader), then compared with the tif folder's mask.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO / "tests"))
    from dicom_study import make_study

    from segengine.engine.evaluation.evaluate import select_patients
    from segengine.engine.evaluation.metrics import dsc
    from segengine.engine.inference import registry
    from segengine.engine.job.patient_job import segment
    from segengine.engine.model.spec import load_model_spec
    from segengine.engine.outputs.dicom_seg import write_seg
    from segengine.engine.readers.registry import read_patient

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--patients-file")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    spec = load_model_spec(None)
    name = registry.resolve(args.backend, spec)
    rows = []
    with registry.create(name, spec, threads=1) as backend, tempfile.TemporaryDirectory() as tmp:
        for folder in select_patients(args.data, args.patients_file):
            ref = segment(read_patient(folder), backend).mask
            study = make_study(folder, Path(tmp) / folder.name, "one-folder", "transpose", 12.0)
            vol = read_patient(study.folder)
            seg_path = Path(tmp) / f"{folder.name}_seg.dcm"
            write_seg(seg_path, vol.source_grid, segment(vol, backend).mask)
            got = study.seg_on_kaggle_slices(seg_path, ref.shape)
            rows.append({"patient": folder.name, "dice": float(dsc(got, ref)), "tif_voxels": int(ref.sum()),
                         "seg_voxels": int(got.sum())})
            print(f"{folder.name}: Dice(SEG, tif) {rows[-1]['dice']:.4f} ({rows[-1]['seg_voxels']} vs "
                  f"{rows[-1]['tif_voxels']} voxels)", flush=True)
    dice = [r["dice"] for r in rows]
    result = {"protocol": "native", "backend": name, "model": spec.name, "model_sha256": spec.sha256,
              "study": "tests/dicom_study.py one-folder, frames transposed, 12 degree tilt", "patients": rows,
              "min_dice": min(dice), "median_dice": statistics.median(dice)}
    print(f"{len(rows)} patients ({name}, {spec.name} {spec.sha256[:12]}): Dice min {min(dice):.4f} "
          f"median {statistics.median(dice):.4f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
