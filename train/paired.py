"""Paired per-patient comparison of two scorings of the same patients (two CV results, or two
post-processing variants of one): the one implementation ``cv compare``, ``cv component-rule``
and the reports use, so every difference is stated with the same bootstrap CI."""
from __future__ import annotations

import numpy as np


def compare(a: dict, b: dict, variant: str = "native_lcc", variant_b: str | None = None) -> str:
    """Paired per-patient comparison of two CV results on the patients both scored (or, with
    ``variant_b``, of two scoring variants, e.g. a post-processing step, of one result)."""
    from scipy.stats import wilcoxon

    pa, pb = a["variants"][variant]["per_patient"], b["variants"][variant_b or variant]["per_patient"]
    common = sorted(set(pa) & set(pb))
    if not common:
        return "no patients in common"
    da = np.array([pa[p]["dsc"] for p in common])
    db = np.array([pb[p]["dsc"] for p in common])
    diff = db - da
    lo, hi = bootstrap_mean_ci(diff)
    lines = [f"{variant}{' vs ' + variant_b if variant_b else ''}: {len(common)} patients in common",
             f"  {a['recipe']}: mean {da.mean():.4f} median {np.median(da):.4f} min {da.min():.4f}",
             f"  {b['recipe']}: mean {db.mean():.4f} median {np.median(db):.4f} min {db.min():.4f}",
             f"  {b['recipe']} - {a['recipe']}: mean {diff.mean():+.4f} (paired bootstrap 95% CI "
             f"{lo:+.4f} to {hi:+.4f}), better on {(diff > 0).sum()}, worse on {(diff < 0).sum()}"]
    if np.any(diff != 0):
        lines[-1] += f", Wilcoxon p = {wilcoxon(db, da).pvalue:.3f}"
    worst = np.argsort(diff)[:3]
    lines.append("  largest losses: " + ", ".join(f"{common[i]} {diff[i]:+.3f}" for i in worst))
    i = int(np.argmax(np.abs(diff)))
    lines.append(f"  largest |difference|: {common[i]} {diff[i]:+.5f}")
    return "\n".join(lines)


def bootstrap_mean_ci(values: np.ndarray, n: int = 10_000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean over patients (resampled with replacement; paired
    differences go in as one value per patient, so the pairing is kept)."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n, values.size))].mean(axis=1)
    return (float(np.quantile(means, (1 - level) / 2)), float(np.quantile(means, (1 + level) / 2)))
