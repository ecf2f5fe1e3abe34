"""What reading a DICOM study and writing its SEG add per patient, against reading its tif folder.

    python -m segengine.bench.dicom_cost --data kaggle_3m --patients-file val.txt [--repeats 5] [--json out.json]

Each patient is written as a DICOM study (tests/dicom_study.py: three series and a localizer,
one folder, oblique) and timed interleaved in one process: the tif read, the study's read
(header pass, with the plan cache emptied, plus pixels; what a run does once per patient) and
the SEG write of the patient's ground-truth mask. Medians over ``repeats``; imports are timed
separately (once per process). A loaded machine inflates every figure alike; the ratio holds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from segengine.engine.outputs.dicom_seg import write_seg

REPO = Path(__file__).resolve().parents[1]


def _import_s() -> float:
    code = "import time; t = time.perf_counter(); import pydicom, highdicom; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout)


def main(argv: list[str] | None = None) -> int:

    sys.path.insert(0, str(REPO / "tests"))
    from dicom_study import make_study

    from segengine.bench.machine import describe_cpu, machine_info
    from segengine.engine.evaluation.evaluate import select_patients
    from segengine.engine.readers import dicom as dicom_io
    from segengine.engine.readers.registry import read_patient

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--patients-file")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for folder in select_patients(args.data, args.patients_file):
            study = Path(tmp) / folder.name
            make_study(folder, study, "one-folder", "transpose", 12.0)
            mask = read_patient(folder).mask > 0
            read_patient(study)  # warm: imports, page cache
            tif, dcm, seg = [], [], []
            for _ in range(args.repeats):
                t = time.perf_counter()
                read_patient(folder, with_mask=False)
                tif.append(time.perf_counter() - t)
                dicom_io._PLANS.clear()
                t = time.perf_counter()
                vol = read_patient(study)
                dcm.append(time.perf_counter() - t)
                t = time.perf_counter()
                write_seg(Path(tmp) / "seg.dcm", vol.source_grid, mask)
                seg.append(time.perf_counter() - t)
            row = {"patient": folder.name, "slices": int(mask.shape[0]), "tif_read_s": statistics.median(tif),
                   "dicom_read_s": statistics.median(dcm), "seg_write_s": statistics.median(seg)}
            row["extra_s"] = row["dicom_read_s"] - row["tif_read_s"] + row["seg_write_s"]
            rows.append(row)
            print(f"{row['patient']}: {row['slices']} slices, tif read {row['tif_read_s']:.3f} s, DICOM read "
                  f"{row['dicom_read_s']:.3f} s, SEG write {row['seg_write_s']:.3f} s: extra {row['extra_s']:.3f} s",
                  flush=True)
    result = {"patients": rows, "median_extra_s": statistics.median(r["extra_s"] for r in rows),
              "max_extra_s": max(r["extra_s"] for r in rows), "import_pydicom_highdicom_s": _import_s(),
              "repeats": args.repeats, "cpu": describe_cpu(machine_info())}  # every speed figure names its CPU
    print(f"{len(rows)} patients: extra per patient median {result['median_extra_s']:.3f} s, max "
          f"{result['max_extra_s']:.3f} s; import of pydicom+highdicom {result['import_pydicom_highdicom_s']:.2f} s "
          f"once per process; {result['cpu']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
