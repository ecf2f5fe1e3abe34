"""Kaggle patients converted to NIfTI segment like their tif folders: Dice per patient.

    python -m segengine.bench.nifti_agreement --data kaggle_3m --every 9 [--backend onnxruntime]

Each patient is written as a 4D NIfTI (one int16 scale) and as three files (pre float32,
FLAIR int16, post uint16, each its own scale), on an oblique, permuted and flipped grid
with non-unit spacing; both are segmented and compared with the tif folder's masks. Too
slow for a unit test over many patients; ``tests/test_nifti.py`` uses the same conversion.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np

SPACING = (3.3, 0.94, 0.9)  # slice, row, column (mm)
THREE_FILES = (("pre", np.float32, 0.01), ("flair", np.int16, 7.0), ("post", np.uint16, 40.0))


def _rotation(degrees) -> np.ndarray:
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def kaggle_to_input_grid(volume: np.ndarray, axcodes=("S", "R", "A"), degrees=(14, -9, 21), spacing=SPACING):
    """A (D, H, W[, C]) volume in the Kaggle layout as (array, affine) of a scanner-like NIfTI.

    Written from the dataset's own conventions, independently of the engine's reader: Kaggle
    rows run anterior -> posterior (-y in RAS+), columns the patient's right -> left (-x),
    slices inferior -> superior (+z). The grid is then tilted by ``degrees`` and its array
    axes permuted and flipped to ``axcodes``.
    """
    from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

    arr = np.moveaxis(volume, 0, 2)  # (row, column, slice[, C])
    sd, sr, sc = spacing
    affine = np.eye(4)
    affine[:3, :3] = _rotation(degrees) @ np.column_stack([[0, -sr, 0], [-sc, 0, 0], [0, 0, sd]])
    affine[:3, 3] = (91.5, -120.25, -60.0)
    t = ornt_transform(axcodes2ornt(("P", "L", "S")), axcodes2ornt(axcodes))
    return apply_orientation(arr, t), affine @ inv_ornt_aff(t, arr.shape[:3])


def save_nifti(data: np.ndarray, affine: np.ndarray, path: Path, dtype, scale: float, offset: float = 0.0) -> None:
    import nibabel as nib

    img = nib.Nifti1Image((data.astype(np.float64) * scale + offset).astype(dtype), affine)
    img.set_qform(affine, code="scanner")  # both frames set, as dcm2niix writes them
    img.set_sform(affine, code="scanner")
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))


def write_three_files(image: np.ndarray, folder: Path, case: str, axcodes=("L", "P", "I")) -> None:
    """A (D, H, W, 3) Kaggle volume as ``<case>_pre/_flair/_post.nii.gz``, each its own dtype and scale."""
    folder.mkdir(parents=True, exist_ok=True)
    for c, (seq, dtype, scale) in enumerate(THREE_FILES):
        data, affine = kaggle_to_input_grid(image[..., c], axcodes)
        save_nifti(data, affine, folder / f"{case}_{seq}.nii.gz", dtype, scale)


def main(argv: list[str] | None = None) -> int:
    from segengine.engine.evaluation.metrics import dsc
    from segengine.engine.inference import registry
    from segengine.engine.job.patient_job import segment
    from segengine.engine.model.spec import load_model_spec
    from segengine.engine.readers.registry import list_patients, read_patient

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--every", type=int, default=1, help="every Nth patient (sorted)")
    parser.add_argument("--backend", default="onnxruntime")
    args = parser.parse_args(argv)
    spec = load_model_spec(None)
    dice4, dice3 = [], []
    with registry.create(registry.resolve(args.backend, spec), spec, threads=1) as backend, \
            tempfile.TemporaryDirectory() as tmp:
        for folder in list_patients(args.data)[:: args.every]:
            vol = read_patient(folder)
            ref = segment(vol, backend).mask
            data, affine = kaggle_to_input_grid(vol.image)
            save_nifti(data, affine, Path(tmp) / "case4d.nii.gz", np.int16, 13.7)
            write_three_files(vol.image, Path(tmp) / "case3", "case3")
            dice4.append(float(dsc(segment(read_patient(Path(tmp) / "case4d.nii.gz"), backend).mask, ref)))
            dice3.append(float(dsc(segment(read_patient(Path(tmp) / "case3"), backend).mask, ref)))
            peaks = [int(vol.image[..., c].max()) for c in range(3)]
            print(f"{vol.patient_id}: sequence maxima {peaks}: Dice vs tif 4D {dice4[-1]:.4f}, three files {dice3[-1]:.4f}",
                  flush=True)
    print(f"{len(dice4)} patients; 4D: min {min(dice4):.4f} median {statistics.median(dice4):.4f}; "
          f"three files: min {min(dice3):.4f} median {statistics.median(dice3):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
