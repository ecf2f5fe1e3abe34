"""Calibrate the review flag's thresholds on out-of-fold CV predictions (never on the ten).

    python -m segengine.train.review_calibration runs/cv/a1/cv.json [--write-card models/resunet16.json]

A patient is "bad" when its native DSC is below ``--bad`` (0.80). Rules are added greedily,
each time the single feature limit that catches the most still-uncaught bad patients per
good patient it newly flags, while the flagged share of good patients stays within
``--max-good-flagged`` (0.20). The catch rate is also estimated
leave-one-fold-out (rules fitted on the other folds, counted on the left-out one; with a
single fold, leave-one-patient-out), which is the figure to quote; the in-sample one flatters.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from segengine.engine.review import ReviewRules, assess

# feature -> (rule field, direction): "min" flags values below the limit, "max" above it.
CANDIDATES = {
    "confidence": ("min_confidence", "min"),
    "uncertain_share": ("max_uncertain_share", "max"),
    "volume_px": ("min_volume_px", "min"),
    "volume_share": ("max_volume_share", "max"),
    "removed_share": ("max_removed_share", "max"),
    # tta_agreement is recorded in CV but not offered: `segengine run` has no TTA yet, so a rule
    # on it would never fire where it matters
}


def load_cases(cv_json: Path, variant: str = "native_lcc") -> list[dict]:
    res = json.loads(Path(cv_json).read_text())
    return [{"patient": p, "dsc": r["dsc"], "fold": r["fold"], "features": r["review_features"]}
            for p, r in res["variants"][variant]["per_patient"].items()]


def flags(cases: list[dict], rules: ReviewRules) -> np.ndarray:
    return np.array([assess(c["features"], rules)["flag"] for c in cases])


def fit(cases: list[dict], bad: float, max_good_flagged: float) -> ReviewRules:
    """Greedy OR of single-feature limits (midpoints between observed values)."""
    is_bad = np.array([c["dsc"] < bad for c in cases])
    rules = ReviewRules()
    while True:
        current = flags(cases, rules)
        best, best_score = None, 0.0
        for feature, (field, direction) in CANDIDATES.items():
            values = sorted({c["features"][feature] for c in cases if c["features"].get(feature) is not None})
            for lo, hi in zip(values, values[1:]):
                limit = (lo + hi) / 2
                limit = int(np.ceil(limit)) if feature == "volume_px" else float(limit)
                trial = replace(rules, **{field: limit})
                f = flags(cases, trial)
                if (f & ~is_bad).sum() > max_good_flagged * max(1, (~is_bad).sum()):
                    continue
                gain = ((f & is_bad) & ~current).sum()
                cost = ((f & ~is_bad) & ~current).sum()
                score = gain / (cost + 1)
                if gain and score > best_score:
                    best, best_score = trial, score
        if best is None:
            return rules
        rules = best


def counts(cases: list[dict], f: np.ndarray, bad: float) -> dict:
    is_bad = np.array([c["dsc"] < bad for c in cases])
    return {"bad": int(is_bad.sum()), "bad_flagged": int((f & is_bad).sum()),
            "good": int((~is_bad).sum()), "good_flagged": int((f & ~is_bad).sum())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cv_json", nargs="+", help="cv.json files whose out-of-fold patients calibrate the rules")
    ap.add_argument("--bad", type=float, default=0.80)
    ap.add_argument("--max-good-flagged", type=float, default=0.20)
    ap.add_argument("--write-card", help="store the rules and their counts in this model card")
    args = ap.parse_args(argv)

    cases = [c for path in args.cv_json for c in load_cases(Path(path))]
    rules = fit(cases, args.bad, args.max_good_flagged)
    in_sample = counts(cases, flags(cases, rules), args.bad)
    folds = sorted({c["fold"] for c in cases})
    # held-out estimate: rules fitted without the fold (or, with one fold, the patient) they are counted on
    key = "fold" if len(folds) > 1 else "patient"
    groups = sorted({c[key] for c in cases})
    f_all = np.zeros(len(cases), dtype=bool)
    for g in groups:
        train = [c for c in cases if c[key] != g]
        idx = [i for i, c in enumerate(cases) if c[key] == g]
        f_all[idx] = flags([cases[i] for i in idx], fit(train, args.bad, args.max_good_flagged))
    held_out = counts(cases, f_all, args.bad)
    summary = {"rules": {k: v for k, v in rules.to_dict().items() if v not in (None, False)},
               "calibrated_on": f"{len(cases)} out-of-fold CV patients ({', '.join(args.cv_json)}), folds {folds}",
               "bad_means": f"native DSC < {args.bad}", "in_sample": in_sample,
               f"leave_one_{key}_out": held_out}
    print(json.dumps(summary, indent=2))
    if args.write_card:
        card = json.loads(Path(args.write_card).read_text())
        card["review"] = summary
        Path(args.write_card).write_text(json.dumps(card, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
