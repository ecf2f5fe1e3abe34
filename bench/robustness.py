"""Robustness benchmark: patients written as scanner-like NIfTI cases, each intensity perturbation
class at two strengths, DSC against the clean case (issue 29).

    python -m segengine.bench.robustness --data DIR --patients-file splits/reference_validation.txt \\
        --model models/resunet16.pt --json docs/robustness_v4_val.json --plot docs/robustness.png
    python -m segengine.bench.robustness --data DIR --cv-ensemble models/NAME.ensemble.json --every 3 ...

Each patient's Kaggle slices become one int16 NIfTI file per sequence (on an oblique, permuted
grid, as ``nifti_agreement``), perturbed before writing, then read and segmented by the engine's
own reader and job. With ``--cv-ensemble`` every patient is segmented by the fold member that
never saw it (out of fold), so the 90 training patients can be scored honestly.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

SEQUENCE_NAMES = ("pre", "flair", "post")


def _outside_head(image: np.ndarray, n: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` voxel positions (z, y, x) with no signal in any sequence, as far from the head as the
    volume allows (the corners of the middle slices): where a vessel, fat or an artifact sits."""
    dark = image.max(axis=-1) == 0
    d = image.shape[0]
    zs = [d // 2 + k for k in range(-(n // 2), n - n // 2)]
    zs = [min(max(z, 0), d - 1) for z in zs]
    picked = []
    for i, z in enumerate(zs):
        corner = [(0, 0), (0, -1), (-1, 0), (-1, -1)][i % 4]
        ys, xs = np.nonzero(dark[z])
        if ys.size == 0:
            ys, xs = np.array([0]), np.array([0])
        h, w = dark.shape[1:]
        ty, tx = (0 if corner[0] == 0 else h - 1), (0 if corner[1] == 0 else w - 1)
        j = int(np.argmin((ys - ty) ** 2 + (xs - tx) ** 2))
        picked.append((z, int(ys[j]), int(xs[j])))
    z, y, x = (np.array(v) for v in zip(*picked))
    return z, y, x


def extreme_voxels(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Six voxels outside the head at ``strength`` x each sequence's maximum."""
    out = image.copy()
    z, y, x = _outside_head(image)
    for c in range(image.shape[-1]):
        out[z, y, x, c] = strength * image[..., c].max()
    return out


def gamma(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """A display transfer: each sequence mapped as max * (x / max) ** strength."""
    out = np.empty_like(image)
    for c in range(image.shape[-1]):
        top = image[..., c].max()
        out[..., c] = top * (image[..., c] / top) ** strength if top > 0 else image[..., c]
    return out


def sequence_scale(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Sequences at unrelated scales: pre-contrast x ``strength`` (a 12-bit range), FLAIR / ``strength``."""
    out = image.copy()
    out[..., 0] *= strength
    out[..., 1] /= strength
    return out


def bias_field(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth multiplicative field, exp(+-``strength``) from one side of the head to the other,
    with a gentler slope along the slices: coil shading, the same for every sequence."""
    d, h, w = image.shape[:3]
    zz, yy, xx = np.meshgrid(np.linspace(-1, 1, d), np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    field = np.exp(strength * (0.7 * xx + 0.5 * yy + 0.3 * zz) / 1.0)
    return image * field[..., None]


def noise(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Rician-like noise: the magnitude of the image plus complex Gaussian noise of sigma
    ``strength`` x each sequence's 99th percentile."""
    out = np.empty_like(image)
    for c in range(image.shape[-1]):
        ch = image[..., c]
        sigma = strength * np.percentile(ch[ch > 0], 99) if (ch > 0).any() else 0.0
        out[..., c] = np.hypot(ch + rng.normal(0, sigma, ch.shape), rng.normal(0, sigma, ch.shape))
    return out


# class -> (perturbation, its two strengths); "clean" is the case as given
PERTURBATIONS: dict[str, tuple[Callable[[np.ndarray, float, np.random.Generator], np.ndarray], tuple[float, float]]] = {
    "extreme_voxels": (extreme_voxels, (2.0, 10.0)),
    "gamma": (gamma, (0.7, 1.5)),
    "sequence_scale": (sequence_scale, (3.0, 16.0)),
    "bias_field": (bias_field, (0.2, 0.4)),
    "noise": (noise, (0.02, 0.05)),
}
INT16_MAX = 32767


def perturbed_intensities(image: np.ndarray, name: str | None, strength: float | None, seed: int = 0) -> np.ndarray:
    """A (D, H, W, 3) Kaggle volume as float64 intensities with one perturbation applied (None: clean)."""
    x = image.astype(np.float64)
    if name is None:
        return x
    fn, _ = PERTURBATIONS[name]
    return fn(x, float(strength), np.random.default_rng(seed))


def write_case(intensities: np.ndarray, folder: Path, case: str) -> Path:
    """One int16 NIfTI per sequence (``<case>_pre/_flair/_post.nii.gz``), as scanners store them.

    Whole numbers within int16 are stored as they are; anything else (a perturbation's fractions,
    a range beyond int16) spans the int16 range with a header scale factor (nibabel's slope), as a
    scanner's rescale slope does. Rounding fractions to whole numbers would not be a change of
    scale but of bit depth: FLAIR at a sixteenth of 8 bits would keep 16 grey levels."""
    import nibabel as nib

    from segengine.bench.nifti_agreement import kaggle_to_input_grid

    target = folder / case
    target.mkdir(parents=True, exist_ok=True)
    for c, seq in enumerate(SEQUENCE_NAMES):
        data, affine = kaggle_to_input_grid(intensities[..., c], ("L", "P", "I"))
        top = float(np.abs(data).max())
        whole = top <= INT16_MAX and bool(np.all(data == np.rint(data)))
        slope = 1.0 if whole else top / INT16_MAX
        img = nib.Nifti1Image(np.rint(data / slope).astype(np.int16), affine)
        img.header.set_slope_inter(slope, 0.0)
        img.set_qform(affine, code="scanner")
        img.set_sform(affine, code="scanner")
        nib.save(img, str(target / f"{case}_{seq}.nii.gz"))
    return target


def conditions() -> list[tuple[str | None, float | None]]:
    return [(None, None)] + [(name, s) for name, (_, strengths) in PERTURBATIONS.items() for s in strengths]


def label(name: str | None, strength: float | None) -> str:
    return "clean" if name is None else f"{name}@{strength:g}"


def score_patient(folder: Path, backend, tmp: Path) -> dict[str, float]:
    """DSC against the ground truth of every condition for one patient (native protocol)."""
    from segengine.engine.core.errors import DataError
    from segengine.engine.evaluation.metrics import dsc
    from segengine.engine.job.patient_job import segment
    from segengine.engine.readers.registry import read_patient

    vol = read_patient(folder)
    truth = vol.mask > 0
    scores = {}
    for name, strength in conditions():
        case = write_case(perturbed_intensities(vol.image, name, strength), tmp, "case")
        try:
            seg = segment(read_patient(case), backend)
            scores[label(name, strength)] = float(dsc(seg.mask > 0, truth))
        except DataError as exc:  # a refused volume scores 0 and says why
            print(f"  {vol.patient_id} {label(name, strength)}: refused ({exc})", file=sys.stderr)
            scores[label(name, strength)] = 0.0
        for f in case.iterdir():
            f.unlink()
        case.rmdir()
    return scores


def summarize(per_patient: dict[str, dict[str, float]]) -> dict:
    """Mean DSC per condition and its difference from the clean case, with the worst patient drop."""
    out = {}
    for name, strength in conditions():
        key = label(name, strength)
        values = [s[key] for s in per_patient.values()]
        deltas = [s[key] - s["clean"] for s in per_patient.values()]
        out[key] = {"mean_dsc": statistics.fmean(values), "mean_delta_vs_clean": statistics.fmean(deltas),
                    "worst_delta": min(deltas)}
    return out


def plot(records: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [label(n, s) for n, s in conditions()][1:]
    fig, ax = plt.subplots(figsize=(11, 4.2))
    width = 0.8 / max(len(records), 1)
    for i, rec in enumerate(records):
        vals = [rec["summary"][k]["mean_delta_vs_clean"] for k in keys]
        ax.bar(np.arange(len(keys)) + i * width, vals, width, label=rec["name"])
    ax.axhline(-0.02, color="k", linestyle="--", linewidth=1, label="target: within 0.02")
    ax.set_xticks(np.arange(len(keys)) + width * (len(records) - 1) / 2, keys, rotation=30, ha="right")
    ax.set_ylabel("mean DSC minus clean case")
    ax.set_title("Intensity perturbations of NIfTI cases (segengine bench.robustness)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from segengine.bench.machine import machine_info
    from segengine.engine.core.atomic import write_json_atomic
    from segengine.engine.inference import registry
    from segengine.engine.model.spec import load_model_spec
    from segengine.engine.readers.volume import read_patient_list

    ap = argparse.ArgumentParser(prog="python -m segengine.bench.robustness", description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path, help="folder of Kaggle patient folders (with masks)")
    ap.add_argument("--patients-file", type=Path, help="patients to score (one id a line)")
    ap.add_argument("--model", type=Path, help="model weights (default: the shipped model)")
    ap.add_argument("--cv-ensemble", type=Path, help="a fold ensemble manifest: score each member's held-out patients")
    ap.add_argument("--every", type=int, default=1, help="every Nth patient (sorted), for a quicker screen")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--name", default=None, help="this record's name in the picture")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--plot", type=Path, help="a PNG of this record (and of --compare's records)")
    ap.add_argument("--compare", type=Path, nargs="*", default=[], help="earlier JSON records to draw beside it")
    args = ap.parse_args(argv)

    jobs: list[tuple[object, list[str]]] = []
    if args.cv_ensemble:
        from segengine.train.cv import DEFAULT_FOLD_SEED, load_or_write_folds_for, member_fold

        manifest = json.loads(args.cv_ensemble.read_text())
        n = len(manifest["members"])
        folds = load_or_write_folds_for(args.data, n, DEFAULT_FOLD_SEED)
        for member in manifest["members"]:
            spec = load_model_spec(args.cv_ensemble.parent / member)
            jobs.append((spec, sorted(folds[member_fold(spec, n, DEFAULT_FOLD_SEED)])[:: args.every]))
        protocol = f"out of fold: each of {args.cv_ensemble.name}'s members on its held-out patients"
    else:
        ids = read_patient_list(args.patients_file) if args.patients_file else sorted(p.name for p in args.data.iterdir() if p.is_dir())
        jobs.append((load_model_spec(args.model), ids[:: args.every]))
        protocol = f"one model on {args.patients_file or 'every patient under --data'}"
    per_patient: dict[str, dict[str, float]] = {}
    models = []
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for spec, ids in jobs:
            models.append({"weights": spec.weights.name, "sha256": spec.sha256,
                           "plan": spec.preprocessing.scheme, "patients": ids})
            with registry.create(registry.resolve(args.backend, spec), spec, threads=args.threads) as backend:
                for pid in ids:
                    per_patient[pid] = score_patient(args.data / pid, backend, Path(tmp))
                    s = per_patient[pid]
                    print(f"{pid}: clean {s['clean']:.3f}  " + "  ".join(
                        f"{k} {v - s['clean']:+.3f}" for k, v in s.items() if k != "clean"), flush=True)
    summary = summarize(per_patient)
    record = {"name": args.name or args.json.stem, "protocol": protocol, "backend": args.backend, "models": models,
              "machine": machine_info(), "patients": len(per_patient), "seconds": round(time.time() - t0, 1),
              "command": "python -m segengine.bench.robustness " + " ".join(argv if argv is not None else sys.argv[1:]),
              "perturbations": {n: {"strengths": list(s), "what": fn.__doc__.split("\n")[0]}
                                for n, (fn, s) in PERTURBATIONS.items()},
              "summary": summary, "per_patient": per_patient}
    write_json_atomic(args.json, record)
    for key, row in summary.items():
        print(f"{key:<22} mean DSC {row['mean_dsc']:.4f}  vs clean {row['mean_delta_vs_clean']:+.4f}  "
              f"worst {row['worst_delta']:+.4f}")
    if args.plot:
        plot([json.loads(p.read_text()) for p in args.compare] + [record], args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
