"""How much of the volume each head rule takes, clean and perturbed (issue 29's diagnosis).

    python -m segengine.bench.head_masks --data ../shared/data/lgg --json docs/robustness/head_masks.json

For each patient and each perturbation of ``bench/robustness.py`` the share of the volume each head
rule of plan v2 marks as head, and the Dice of that head with the same rule's clean head. The
fraction rule (v4 as trained) spreads into a noisy background under gamma 0.7 and noise; log_otsu
should keep the clean head. Default patients: those whose CV masks collapsed with the fraction rule.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

DEFAULT_PATIENTS = ("TCGA_DU_5871_19941206", "TCGA_DU_7306_19930512", "TCGA_CS_5397_20010315", "TCGA_DU_5852_19950709",
                    "TCGA_FG_A60K_20040224", "TCGA_HT_A61A_20000127", "TCGA_FG_5962_20000626")
RULES = ("fraction", "log_otsu")


def measure(image: np.ndarray) -> dict[str, dict[str, dict[str, float]]]:
    """condition -> rule -> {share, dice_with_clean} for one (D, H, W, 3) Kaggle volume."""
    from segengine.bench.robustness import conditions, label, perturbed_intensities
    from segengine.engine.evaluation.metrics import dsc
    from segengine.engine.preprocessing.head import head_mask
    from segengine.engine.preprocessing.plan import PLAN_V2

    clean: dict[str, np.ndarray] = {}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, strength in conditions():
        x = perturbed_intensities(image, name, strength)
        row = {}
        for rule in RULES:
            head = head_mask(x, PLAN_V2.head_fraction, PLAN_V2.head_percentile, rule, PLAN_V2.head_smooth)
            clean.setdefault(rule, head)
            row[rule] = {"share": round(float(head.mean()), 4), "dice_with_clean": round(dsc(head, clean[rule]), 4)}
        out[label(name, strength)] = row
    return out


def main(argv: list[str] | None = None) -> int:
    from segengine.bench.machine import machine_info
    from segengine.engine.core.atomic import write_json_atomic
    from segengine.engine.readers.registry import read_patient

    ap = argparse.ArgumentParser(prog="python -m segengine.bench.head_masks", description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, type=Path, help="folder of patient folders")
    ap.add_argument("--patients", default=",".join(DEFAULT_PATIENTS), help="comma list of patient ids")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args(argv)
    per_patient = {}
    for pid in [p for p in args.patients.split(",") if p]:
        per_patient[pid] = measure(read_patient(args.data / pid).image)
        rows = per_patient[pid]
        print(pid + ": " + "  ".join(f"{k} " + "/".join(f"{rows[k][r]['share']:.2f}" for r in RULES) for k in rows), flush=True)
    worst = {rule: min(v[rule]["dice_with_clean"] for p in per_patient.values() for v in p.values()) for rule in RULES}
    write_json_atomic(args.json, {"rules": list(RULES), "command": "python -m segengine.bench.head_masks " + " ".join(
        argv if argv is not None else sys.argv[1:]), "machine": machine_info(), "worst_dice_with_clean": worst,
        "per_patient": per_patient})
    print("worst Dice with the clean head: " + ", ".join(f"{r} {w:.3f}" for r, w in worst.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
