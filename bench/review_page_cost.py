"""What the review page adds to writing one patient: time and image bytes of its viewer assets.

    python -m segengine.bench.review_page_cost --data kaggle_3m --patients-file val.txt

Times ``review_page.write_patient_review`` (FLAIR sprite, thumbnail, outlines, page) with the
ground truth standing in for the prediction; best of ``--repeats`` per patient.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from segengine.engine.evaluation.evaluate import select_patients
from segengine.engine.outputs.review_page import REVIEW_DIR, write_patient_review
from segengine.engine.readers.registry import read_patient


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--patients-file")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    per_patient, per_slice, sizes = [], [], []
    for folder in select_patients(args.data, args.patients_file):
        vol = read_patient(folder)
        truth = vol.mask > 0 if vol.mask is not None else None
        pred = truth if truth is not None else vol.image[..., 1] > 128
        best = float("inf")
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args.repeats):
                t = time.perf_counter()
                write_patient_review(Path(tmp), vol, pred, truth, {"input": str(folder)})
                best = min(best, time.perf_counter() - t)
            size = sum(f.stat().st_size for f in (Path(tmp) / REVIEW_DIR).iterdir() if f.suffix in (".jpg", ".webp"))
        per_patient.append(best * 1000)
        per_slice.append(best * 1000 / vol.num_slices)
        sizes.append(size)
        print(f"{vol.patient_id}: {vol.num_slices} slices, {best * 1000:.1f} ms, images {size / 1024:.0f} KiB")
    print(f"median {statistics.median(per_patient):.1f} ms per patient ({statistics.median(per_slice):.2f} ms per slice); "
          f"images {min(sizes) / 1024:.0f}-{max(sizes) / 1024:.0f} KiB per patient")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
