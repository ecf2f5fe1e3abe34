"""Candidate features for the quality estimate, tried leave-one-fold-out (issue 23's flag target).

    python -m segengine.train.quality_features_tried runs/cv/v2_rescore --data DATA \\
        --json docs/cv/v2_quality_features_tried.json

Adds each candidate (and each pair) to the fitted features of ``quality_calibration`` and
reports the same leave-one-fold-out figures (patients below 0.80 flagged, the others flagged,
Spearman). Candidates beyond the engine's own features are computed here from the stored
out-of-fold probabilities: the mean probability in a 2-voxel shell outside the mask
(``boundary_p``), the share of slices with tumor, the largest slice's share of the volume and
the 10th percentile of the probabilities inside the mask. Chosen on these folds: a screen, not
a result; nothing here changes the shipped estimate unless a candidate reaches the target.
"""
from __future__ import annotations

import argparse
import itertools
import platform
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from segengine.engine.core.atomic import now_iso, write_json_atomic
from segengine.engine.model.spec import load_model_spec
from segengine.engine.postprocessing.postprocess import PostprocessConfig, postprocess
from segengine.train import quality_calibration as qc

EXTRA = ("confidence", "uncertain_ratio", "components", "boundary_p", "slice_share", "peak_slice_share", "p10_inside")


def add_candidates(cases: list[dict], run: Path, post: PostprocessConfig) -> None:
    for c in cases:
        prob = np.load(run / f"fold{c['fold']}" / "oof" / f"{c['patient']}.npz")["prob"].astype(np.float32)
        mask = postprocess(prob, post)
        n = int(mask.sum())
        shell = ndi.binary_dilation(mask, iterations=2) & ~mask
        c["single"]["features"].update(
            boundary_p=float(prob[shell].mean()) if shell.any() else 0.0,
            slice_share=float(mask.any(axis=(1, 2)).mean()),
            peak_slice_share=float(mask.sum(axis=(1, 2)).max() / n) if n else 1.0,
            p10_inside=float(np.quantile(prob[mask], 0.1)) if n else 0.0)


def score(cases: list[dict], feats: tuple[str, ...]) -> dict:
    qc.MODE_FEATURES["single"] = feats
    _, s, _ = qc.fit_mode(cases, "single")
    return {"features": list(feats), "bad_flagged": s["bad_flagged"], "bad": s["bad"],
            "good_flagged": s["good_flagged"], "good": s["good"], "spearman": round(s["spearman"], 4),
            "mean_abs_error": round(s["mean_abs_error"], 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m segengine.train.quality_features_tried", description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="CV run folder with fold*/oof/*.npz (segengine cv rescore)")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    spec = load_model_spec()
    post = PostprocessConfig.from_card(spec.card)
    cases = qc.load_cases(args.run, args.data, post)
    add_candidates(cases, args.run, post)
    rows = [score(cases, qc.FITTED)]
    rows += [score(cases, qc.FITTED + (e,)) for e in EXTRA]
    rows += [score(cases, qc.FITTED + pair) for pair in itertools.combinations(EXTRA, 2)]
    for r in rows:
        print(f"{'+'.join(r['features'][len(qc.FITTED):]) or 'shipped':<36} flagged bad {r['bad_flagged']}/{r['bad']}, "
              f"good {r['good_flagged']}/{r['good']}, Spearman {r['spearman']:.3f}")
    target = [r for r in rows if r["bad_flagged"] >= 0.8 * r["bad"] and r["good_flagged"] <= 0.15 * r["good"]]
    print(f"reaching the target (>= 80% of bad flagged, <= 15% of good): {len(target)} of {len(rows)}")
    if args.json:
        write_json_atomic(args.json, {"protocol": "native, leave one fold out over the 90 CV patients (cv5_seed0)",
                                      "model_sha256": spec.sha256, "machine": platform.processor() or platform.machine(),
                                      "date": now_iso(), "command": "python -m segengine.train.quality_features_tried "
                                      f"{args.run} --data DATA --json {args.json}", "rows": rows,
                                      "reaching_target": len(target)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
