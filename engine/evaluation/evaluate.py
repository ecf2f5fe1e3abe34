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


def score_predictions(data_root: Path, pred_root: Path, patients_file: str | None = None,
                      progress: Callable[[Iterable], Iterable] = lambda x: x,
                      limits: SliceLimits = DEFAULT_LIMITS) -> dict:
    """Native-protocol scores of predicted mask folders against the ground truth."""
    rows = []
    for folder in progress(select_patients(data_root, patients_file)):
        vol = read_patient(folder, limits=limits)
        if vol.mask is None:
            raise DataError(f"{folder}: no ground-truth masks to score against")
        pred = read_prediction(pred_root / vol.patient_id, vol.patient_id, vol.slice_numbers, vol.mask.shape[1:])
        rows.append({"patient": vol.patient_id, **volume_metrics(pred, vol.mask > 0, spacing=vol.spacing_mm),
                     "hd95_unit": distance_unit(vol.spacing_mm)})
    return summarize_rows(rows, protocol="native", source=str(pred_root))


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
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "metrics.json", result)
    dsc_chart(result, out_dir / "dsc.png", title)
