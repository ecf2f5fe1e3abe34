"""Fit the component rule (which 3D components of the thresholded mask to keep) on stored
out-of-fold probabilities, honestly: the rule scored on fold k is fitted on the other folds.

    segengine cv component-rule runs/cv/v2_rescore --data DATA --record docs/cv/v2_component_rule.json \\
        [--write-card models/resunet16.json]

Why: "keep the largest component" keeps a large false positive over a smaller true lesion
(CS_5395) and drops true satellite lesions. The candidates rank components by size or by
probability mass and keep others whose mass and peak clear a limit (``postprocess.chosen_components``,
the engine's own rule). Each patient's DSC under any candidate comes from per-component
overlap counts, so the whole grid is scored without re-labelling. The result is a cv.json-like
record (``native_lcc`` = the rule applied out of fold) that ``cv compare`` pairs with v2.
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

from segengine.engine.core.atomic import write_json_atomic
from segengine.engine.postprocessing.postprocess import FACE_CONNECTIVITY_3D, chosen_components, component_stats
from segengine.engine.readers.registry import read_patient

RANK_BY = ("size", "mass")
MASS_RATIOS = (2.0, 0.5, 0.3, 0.2, 0.1, 0.05, 0.02)  # 2.0: the first component alone
MIN_PEAKS = (0.5, 0.8, 0.9, 0.95, 0.98)
# the failure kinds the issue names (patient id prefixes), for the before/after table
FAILURE_KINDS = {
    "missed": ("TCGA_HT_A61A", "TCGA_DU_7306", "TCGA_DU_7018"),
    "over-segmented": ("TCGA_CS_5395", "TCGA_DU_7299", "TCGA_DU_8165"),
    "misplaced": ("TCGA_DU_5852", "TCGA_CS_6665"),
}


def candidates() -> list[dict]:
    out = [{"rank_by": r, "keep_mass_ratio": 2.0, "keep_min_peak": 1.0} for r in RANK_BY]
    out += [{"rank_by": r, "keep_mass_ratio": m, "keep_min_peak": p}
            for r, m, p in itertools.product(RANK_BY, MASS_RATIOS[1:], MIN_PEAKS)]
    return out


def load_cases(cv_out: Path, data: Path, threshold: float = 0.5) -> list[dict]:
    """Per out-of-fold patient: component stats of its thresholded probabilities and each
    component's overlap with the ground truth."""
    from scipy import ndimage as ndi

    cases = []
    for npz in sorted(cv_out.glob("fold*/oof/*.npz")):
        prob = np.load(npz)["prob"].astype(np.float32)
        truth = read_patient(data / npz.stem).mask > 0
        labels, stats = component_stats(prob, prob > threshold, FACE_CONNECTIVITY_3D)
        n = len(stats["size"])
        inter = (np.asarray(ndi.sum_labels(truth, labels, np.arange(1, n + 1)), dtype=float) if n else np.zeros(0))
        cases.append({"patient": npz.stem, "fold": int(npz.parent.parent.name.removeprefix("fold")),
                      "stats": stats, "inter": inter, "truth": float(truth.sum())})
    return cases


def case_dsc(case: dict, rule: dict) -> float:
    keep = chosen_components(case["stats"], **rule)
    pred, inter = case["stats"]["size"][keep].sum(), case["inter"][keep].sum()
    total = pred + case["truth"]
    return 1.0 if total == 0 else float(2 * inter / total)


def oracle_dsc(case: dict) -> float:
    """The best DSC any choice of components could reach (components added best overlap first):
    the ceiling of every component rule, known only with the ground truth."""
    size, inter = case["stats"]["size"], case["inter"]
    best, kept_inter, kept_size = 0.0, 0.0, 0.0
    for i in np.argsort(-(inter / np.maximum(size, 1))):
        kept_inter, kept_size = kept_inter + inter[i], kept_size + size[i]
        best = max(best, 2 * kept_inter / (kept_size + case["truth"]))
    return 1.0 if case["truth"] == 0 and not len(size) else float(best)


def best_rule(cases: list[dict]) -> dict:
    """The candidate with the highest mean DSC on ``cases`` (ties: the earlier, simpler one)."""
    scores = [np.mean([case_dsc(c, r) for c in cases]) for r in candidates()]
    return candidates()[int(np.argmax(scores))]


def rule_record(cases: list[dict], rules: dict[int, dict], name: str) -> dict:
    """cv.json-like: ``variants.native_lcc.per_patient`` holds each patient's DSC under ``rules[fold]``."""
    per = {c["patient"]: {"fold": c["fold"], "dsc": case_dsc(c, rules[c["fold"]])} for c in cases}
    d = np.array([r["dsc"] for r in per.values()])
    return {"recipe": name, "variants": {"native_lcc": {"patients": len(d), "mean": float(d.mean()),
                                                        "median": float(np.median(d)), "min": float(d.min()),
                                                        "below_0.70": int((d < 0.70).sum()), "per_patient": per}},
            "rules_by_held_out_fold": {str(k): r for k, r in sorted(rules.items())}}


def kind_table(before: dict, after: dict, flair_copy: set[str]) -> list[dict]:
    """Mean DSC before/after of each failure kind (and of the FLAIR-copy patients)."""
    pb, pa = before["variants"]["native_lcc"]["per_patient"], after["variants"]["native_lcc"]["per_patient"]
    rows = []
    groups = {k: [p for p in pb if p.startswith(v)] for k, v in FAILURE_KINDS.items()}
    groups["FLAIR copies"] = sorted(p for p in pb if p in flair_copy)
    for kind, patients in groups.items():
        rows.append({"kind": kind, "patients": {p: [round(pb[p]["dsc"], 4), round(pa[p]["dsc"], 4)] for p in patients},
                     "mean_before": float(np.mean([pb[p]["dsc"] for p in patients])) if patients else None,
                     "mean_after": float(np.mean([pa[p]["dsc"] for p in patients])) if patients else None})
    return rows


def main(argv: list[str] | None = None) -> int:
    from segengine.engine.postprocessing.quality import flair_copies
    from segengine.train.paired import bootstrap_mean_ci, compare

    ap = argparse.ArgumentParser(prog="segengine cv component-rule", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="CV run folder with fold*/oof/*.npz and cv.json")
    ap.add_argument("--data", type=Path, required=True, help="the patients (Kaggle layout) for the ground truth")
    ap.add_argument("--record", type=Path, default=None, help="write the comparison JSON here (e.g. docs/cv/...)")
    ap.add_argument("--write-card", type=Path, default=None,
                    help="if the paired CI of the gain is above 0: store the rule fitted on all folds as this "
                         "card's default ``postprocess``")
    args = ap.parse_args(argv)

    cases = load_cases(args.run, args.data)
    folds = sorted({c["fold"] for c in cases})
    baseline = {k: candidates()[0] for k in folds}  # largest component: v2
    held_out = {k: best_rule([c for c in cases if c["fold"] != k]) for k in folds}
    before = rule_record(cases, baseline, "v2 (largest component)")
    after = rule_record(cases, held_out, "v2 + component rule (fitted leaving the fold out)")
    diff = np.array([after["variants"]["native_lcc"]["per_patient"][p]["dsc"] - r["dsc"]
                     for p, r in before["variants"]["native_lcc"]["per_patient"].items()])
    lo, hi = bootstrap_mean_ci(diff)
    all_folds = best_rule(cases)
    oracle = float(np.mean([oracle_dsc(c) for c in cases]))
    copies = {c["patient"] for c in cases if flair_copies(read_patient(args.data / c["patient"]).image)}
    record = {"protocol": f"native, {len(cases)} out-of-fold patients (folds {folds}), stored probabilities in {args.run}",
              "command": "segengine cv component-rule " + " ".join(argv or []),
              "before": {k: v for k, v in before["variants"]["native_lcc"].items() if k != "per_patient"},
              "after": {k: v for k, v in after["variants"]["native_lcc"].items() if k != "per_patient"},
              "mean_difference": float(diff.mean()), "bootstrap_95ci": [lo, hi],
              "better": int((diff > 1e-9).sum()), "worse": int((diff < -1e-9).sum()),
              "rules_by_held_out_fold": after["rules_by_held_out_fold"], "rule_fitted_on_all_folds": all_folds,
              "oracle_ceiling": {"what": "mean DSC with the best choice of components per patient (uses the truth)",
                                 "mean": oracle, "gain_over_largest": oracle - before["variants"]["native_lcc"]["mean"]},
              "by_failure_kind": kind_table(before, after, copies),
              "per_patient": {p: [r["dsc"], after["variants"]["native_lcc"]["per_patient"][p]["dsc"]]
                              for p, r in before["variants"]["native_lcc"]["per_patient"].items()},
              "note": "rules were chosen on these folds (candidates and grid designed on them)"}
    print(compare(before, after))
    print(f"rule per held-out fold: {json.dumps(held_out)}")
    print(f"rule fitted on all folds: {all_folds}")
    print(f"ceiling of any component choice (knowing the truth): mean {oracle:.4f} "
          f"({oracle - before['variants']['native_lcc']['mean']:+.4f} over the largest component)")
    for row in record["by_failure_kind"]:
        if row["patients"]:
            print(f"  {row['kind']:<15} {len(row['patients'])} patients: mean {row['mean_before']:.4f} -> {row['mean_after']:.4f}")
    if args.record:
        args.record.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(args.record, record)
    if args.write_card:
        if lo <= 0:
            print(f"not written to {args.write_card}: the paired 95% CI ({lo:+.4f}, {hi:+.4f}) is not above 0; "
                  "the rule stays opt-in (a model card's \"postprocess\" block)")
            return 0
        card = json.loads(args.write_card.read_text())
        card["postprocess"] = {**all_folds, "fitted": f"{len(cases)} out-of-fold patients, mean DSC gain "
                               f"{diff.mean():+.4f} (95% CI {lo:+.4f} to {hi:+.4f}) leaving each fold out",
                               "record": str(args.record) if args.record else None}
        write_json_atomic(args.write_card, card)
        print(f"wrote the rule into {args.write_card}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
