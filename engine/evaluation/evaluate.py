"""Scoring: predicted mask folders or a model, per patient, with the reference's DSC chart."""
from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from segengine.engine.core.atomic import write_json_atomic
from segengine.engine.core.errors import DataError
from segengine.engine.evaluation.metrics import distance_unit, summarize, volume_metrics
from segengine.engine.inference import registry
from segengine.engine.inference.ensemble import describe_plan, load_plan
from segengine.engine.job.patient_job import segment
from segengine.engine.postprocessing.postprocess import PostprocessConfig
from segengine.engine.readers.registry import list_patients, read_patient
from segengine.engine.readers.volume import DEFAULT_LIMITS, SliceLimits, read_patient_list


def evaluate_model(data_root: Path, model: str | None, protocol: str, backend_name: str = "torch",
                   patients_file: str | None = None, threads: int | None = None, post: dict | None = None,
                   progress=None, ensemble: bool | Path | None = None, tta: bool = False,
                   limits: SliceLimits = DEFAULT_LIMITS) -> dict:
    """Per-patient metrics of a model (or an ensemble / TTA plan) in the reference or native protocol.

    Post-processing is the model card's, as ``run`` does it, with ``post`` (the CLI's --threshold,
    --no-postprocess, --fill-holes) on top: the scores are those of the masks ``run`` writes."""
    folders = select_patients(Path(data_root), patients_file)
    spec = load_plan(model, ensemble, tta)
    post = PostprocessConfig.from_card(spec.card, **(post or {}))
    name = registry.resolve(backend_name, spec, threads)
    rows = []
    with registry.create(name, spec, threads=threads) as backend:
        for folder in (progress(folders) if progress else folders):
            vol = read_patient(folder, limits=limits)
            if vol.mask is None:
                raise DataError(f"{folder}: no ground-truth masks to score against")
            seg = segment(vol, backend, protocol, post=post)
            spacing = vol.spacing_mm if protocol == "native" else None  # the reference grid is resized: pixels
            rows.append({"patient": vol.patient_id, **volume_metrics(seg.mask, seg.truth, spacing=spacing),
                         "hd95_unit": distance_unit(spacing)})
    return summarize_rows(rows, protocol=protocol, model=str(spec.weights), model_sha256=spec.sha256, backend=name,
                          postprocess=asdict(post), **({"plan": describe_plan(spec)} if describe_plan(spec) else {}))


METRICS = ("dsc", "hd95", "precision", "recall")


def select_patients(data_root: Path, patients_file: str | None) -> list[Path]:
    """Patient folders under ``data_root``, restricted to ``patients_file`` when given."""
    folders = list_patients(data_root)
    if not patients_file:
        return folders
    from segengine.engine.readers.registry import unique_patient_ids

    wanted = read_patient_list(patients_file)
    # by the run's patient id (slice prefix or NIfTI case name); an ill patient by its name, to fail on reading
    by_name = {pid or f.name: f for f, pid in unique_patient_ids(folders).items()}
    missing = [p for p in wanted if p not in by_name]
    if missing:
        raise DataError(f"{patients_file}: patient {missing[0]} not found under {data_root}")
    return [by_name[p] for p in wanted]


def read_prediction(pred_folder: Path, patient_id: str, slice_numbers: list[int], shape: tuple[int, int]) -> np.ndarray:
    """Predicted masks ``<patient>_<n>_mask.*`` for exactly the ground truth's slices."""
    from segengine.engine.core.fsguard import require_regular_file
    from segengine.engine.readers.kaggle import _as_mask, read_slice, slice_shape

    if not pred_folder.is_dir():
        raise DataError(f"{pred_folder}: no predictions for patient {patient_id}")
    out = []
    for n in slice_numbers:
        cands = [pred_folder / f"{patient_id}_{n}_mask{ext}" for ext in (".tif", ".tiff", ".png", ".webp")]
        path = next((c for c in cands if c.exists()), None)
        if path is None:
            raise DataError(f"{cands[0]}: predicted mask missing")
        require_regular_file(path, "predicted mask")  # a FIFO would block the decoder
        header = slice_shape(path)[:2]  # a wrong (e.g. huge) size is refused before decoding
        if header != shape:
            raise DataError(f"{path}: size {header[1]}x{header[0]} differs from the ground truth {shape[1]}x{shape[0]}")
        m = _as_mask(read_slice(path), path)
        if m.shape != shape:
            raise DataError(f"{path}: size {m.shape[1]}x{m.shape[0]} differs from the ground truth {shape[1]}x{shape[0]}")
        out.append(m > 0)
    return np.stack(out)


NIFTI_ENDINGS = (".nii.gz", ".nii")


def nifti_predictions(pred_root: Path) -> dict[str, Path]:
    """``{case: file}`` of the NIfTI files directly in ``pred_root``: ``<case>.nii.gz`` as nnUNetv2_predict
    writes them (and ``run`` beside its per-patient folders for nnU-Net input); empty if none."""
    found: dict[str, Path] = {}
    for entry in sorted(pred_root.iterdir()):
        ending = next((e for e in NIFTI_ENDINGS if entry.name.lower().endswith(e)), None)
        if ending is None or entry.name.startswith(".") or not entry.is_file():
            continue
        case = entry.name[: -len(ending)]
        if case in found:
            raise DataError(f"{entry}: a second prediction for case {case} (also {found[case].name})")
        found[case] = entry
    return found


def read_nifti_prediction(path: Path, volume) -> np.ndarray:
    """A NIfTI prediction of ``volume`` as a (D, H, W) bool mask in the Kaggle layout, foreground = label > 0.

    It must lie on the case's own grid (its shape and affine: what nnUNetv2_predict and ``run``
    write); for Kaggle slices, the (column, row, slice) array of ``run``'s mask NIfTI."""
    from segengine.engine.readers import nifti

    img = nifti._load(path)  # header checks: readable, finite affine, size, scaling
    shape = tuple(int(n) for n in img.shape)
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        raise DataError(f"{path}: {len(shape)}D volume of shape {shape}, expected a 3D segmentation")
    data = nifti._read_array(img, path).reshape(shape[:3])
    grid = volume.source_grid
    if isinstance(grid, nifti.NiftiGrid):
        if shape[:3] != grid.shape:
            raise DataError(f"{path}: shape {shape[:3]} differs from the case's {grid.shape} (a prediction must be on "
                            "the input's grid)")
        if not np.allclose(img.affine, grid.affine, atol=nifti.AFFINE_ATOL_MM):
            raise DataError(f"{path}: affine differs from the case's (a prediction must be on the input's grid)")
        return grid.to_kaggle(data) > 0
    expected = tuple(volume.image.shape[:3][::-1])
    if shape[:3] != expected:
        raise DataError(f"{path}: shape {shape[:3]} differs from the case's {expected} (columns, rows, slices)")
    return data.transpose(2, 1, 0) > 0


NNUNET_METRICS = ("Dice", "IoU", "FP", "TP", "FN", "TN", "n_pred", "n_ref")


def nnunet_case_metrics(pred: np.ndarray, truth: np.ndarray) -> dict:
    """nnU-Net's per-label metrics of one case (its evaluator's definitions: Dice and IoU NaN when both are empty)."""
    p, t = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    tp = int(np.count_nonzero(p & t))
    fp, fn = int(np.count_nonzero(p)) - tp, int(np.count_nonzero(t)) - tp
    tn = int(p.size) - tp - fp - fn
    wrong_or_right = tp + fp + fn
    return {"Dice": 2 * tp / (2 * tp + fp + fn) if wrong_or_right else math.nan,
            "IoU": tp / wrong_or_right if wrong_or_right else math.nan,
            "FP": fp, "TP": tp, "FN": fn, "TN": tn, "n_pred": fp + tp, "n_ref": fn + tp}


def _nan_mean(values: list[float]) -> float:
    defined = [float(v) for v in values if not math.isnan(v)]
    return sum(defined) / len(defined) if defined else math.nan


def nnunet_summary(cases: list[dict]) -> dict:
    """nnU-Net's summary.json of label 1: ``metric_per_case``, ``mean`` and ``foreground_mean`` (NaN-skipping
    means, as its evaluator computes them); ``cases``: ``{"metrics": ..., "prediction_file", "reference_file"}``."""
    mean = {m: _nan_mean([c["metrics"][m] for c in cases]) for m in NNUNET_METRICS}
    per_case = [{"metrics": {"1": c["metrics"]}, "prediction_file": c["prediction_file"],
                 "reference_file": c["reference_file"]} for c in cases]
    return {"foreground_mean": dict(mean), "mean": {"1": mean}, "metric_per_case": per_case}


def _nnunet_data_root(data_root: Path) -> Path:
    """``--data labelsTs``: the cases are those of ``imagesTs`` beside it (their labels are the ground truth)."""
    name = data_root.name
    if name.startswith("labels") and len(name) > len("labels"):
        images = data_root.parent / ("images" + name[len("labels"):])
        if images.is_dir():
            return images
    return data_root


def score_predictions(data_root: Path, pred_root: Path, patients_file: str | None = None,
                      progress: Callable[[Iterable], Iterable] = lambda x: x,
                      limits: SliceLimits = DEFAULT_LIMITS) -> dict:
    """Native-protocol scores of predicted mask folders against the ground truth.

    A ``pred_root`` holding NIfTI files (``<case>.nii.gz``, nnUNetv2_predict's output or ``run``'s
    for nnU-Net input) is scored file by file, matched by case name, and the result also carries
    nnU-Net's ``summary.json`` (``nnunet_summary``), which ``write_result`` writes beside metrics.json."""
    predictions = nifti_predictions(pred_root)
    if predictions:
        return _score_nifti_predictions(_nnunet_data_root(Path(data_root)), pred_root, predictions, patients_file,
                                        progress, limits)
    rows = []
    for folder in progress(select_patients(data_root, patients_file)):
        vol = read_patient(folder, limits=limits)
        if vol.mask is None:
            raise DataError(f"{folder}: no ground-truth masks to score against")
        pred = read_prediction(pred_root / vol.patient_id, vol.patient_id, vol.slice_numbers, vol.mask.shape[1:])
        rows.append({"patient": vol.patient_id, **volume_metrics(pred, vol.mask > 0, spacing=vol.spacing_mm),
                     "hd95_unit": distance_unit(vol.spacing_mm)})
    return summarize_rows(rows, protocol="native", source=str(pred_root))


def _score_nifti_predictions(data_root: Path, pred_root: Path, predictions: dict[str, Path], patients_file: str | None,
                             progress: Callable[[Iterable], Iterable], limits: SliceLimits) -> dict:
    from segengine.engine.readers.nnunet import case_of_file, label_file

    rows, cases = [], []
    for folder in progress(select_patients(data_root, patients_file)):
        vol = read_patient(folder, limits=limits)
        if vol.mask is None:
            raise DataError(f"{folder}: no ground truth to score against (for nnU-Net cases: labelsTs/{vol.patient_id}"
                            ".nii.gz beside imagesTs/)")
        if vol.patient_id not in predictions:
            raise DataError(f"{pred_root / (vol.patient_id + '.nii.gz')}: no prediction for case {vol.patient_id}")
        pred, truth = read_nifti_prediction(predictions[vol.patient_id], vol), vol.mask > 0
        rows.append({"patient": vol.patient_id, **volume_metrics(pred, truth, spacing=vol.spacing_mm),
                     "hd95_unit": distance_unit(vol.spacing_mm)})
        label = label_file(folder.parent, vol.patient_id) if not folder.is_dir() and case_of_file(folder) else None
        cases.append({"metrics": nnunet_case_metrics(pred, truth), "prediction_file": str(predictions[vol.patient_id]),
                      "reference_file": str(label or folder)})
    if not rows:
        raise DataError(f"{data_root}: no cases to score")
    return {**summarize_rows(rows, protocol="native", source=str(pred_root), predictions="nifti"),
            "nnunet_summary": nnunet_summary(cases)}


NNUNET_SUMMARY = "summary.json"


def write_nnunet_summary(path: Path, summary: dict) -> None:
    """nnU-Net's summary.json as its evaluator writes it (sorted keys, NaN where a metric is undefined)."""
    import json

    from segengine.engine.core.atomic import write_bytes_atomic

    write_bytes_atomic(path, (json.dumps(summary, indent=4, sort_keys=True) + "\n").encode())


def summarize_rows(rows: list[dict], **meta) -> dict:
    summary = {m: summarize([r[m] for r in rows]) for m in METRICS if rows and m in rows[0]}
    units = sorted({r["hd95_unit"] for r in rows if "hd95_unit" in r})
    if units:  # HD95 is in mm for patients with a known spacing, in pixels for the others
        meta["hd95_unit"] = units[0] if len(units) == 1 else "mixed (see each patient's hd95_unit)"
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
    return {**meta, "patients": clean, "summary": summary}


def format_table(result: dict) -> str:
    metrics = [m for m in METRICS if m in result["summary"]]
    head = f"{'patient':<26}" + "".join(f"{m:>11}" for m in metrics)
    lines = [head, "-" * len(head)]

    def fmt(v):
        return f"{'n/a':>11}" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:>11.4f}"

    for r in result["patients"]:
        lines.append(f"{r['patient']:<26}" + "".join(fmt(r[m]) for m in metrics))
    lines.append("-" * len(head))
    for stat in ("mean", "median"):
        lines.append(f"{stat:<26}" + "".join(fmt(result["summary"][m][stat]) for m in metrics))
    return "\n".join(lines)


def dsc_chart(result: dict, path: Path, title: str | None = None) -> None:
    """Horizontal bars of per-patient DSC, sorted, with mean and median lines (as the reference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(result["patients"], key=lambda r: r["dsc"])
    names = [r["patient"] for r in rows]
    values = [r["dsc"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, max(3, 0.35 * len(rows) + 1.2)), dpi=100)
    ax.barh(np.arange(len(values)), values, color="skyblue")
    mean, median = float(np.mean(values)), float(np.median(values))
    ax.axvline(mean, color="tomato", linewidth=2, label=f"mean {mean:.3f}")
    ax.axvline(median, color="forestgreen", linewidth=2, label=f"median {median:.3f}")
    ax.set_yticks(np.arange(len(values)))
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("Dice coefficient", fontsize="large")
    ax.legend(loc="lower right")
    ax.set_title(title or f"DSC per patient ({result.get('protocol', '')} protocol)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_result(result: dict, out_dir: Path, title: str | None = None) -> None:
    """metrics.json and dsc.png in ``out_dir``; and nnU-Net's summary.json when NIfTI predictions were scored."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = result.get("nnunet_summary")
    write_json_atomic(out_dir / "metrics.json", {k: v for k, v in result.items() if k != "nnunet_summary"})
    dsc_chart(result, out_dir / "dsc.png", title)
    if summary is not None:
        write_nnunet_summary(out_dir / NNUNET_SUMMARY, summary)
