"""Turn a training run into a shippable model: inference-only weights plus a model card.

    python -m segengine.train.ship --run runs/resunet16 --out models/resunet16.pt \\
        --data /tmp/lgg/kaggle_3m --val-list ../shared/data/lgg/splits/reference_validation.txt

The card records architecture, split, steps and CPU time, FLOPs/slice, parameters, the
SHA-256 of the weights and, with --data, validation DSC in both protocols (scored with
`segengine evaluate`'s own code). The weights are the run's last step, not a checkpoint
picked on the validation patients.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
from pathlib import Path

import torch

from segengine.engine.core.atomic import write_json_atomic
from segengine.engine.model.network import build_model, count_flops
from segengine.engine.model.spec import card_path, input_channels, sha256_file
from segengine.train import robust_aug
from segengine.train.train import DEFAULT_LR


def _init_from(config: dict) -> dict | None:
    """The weights a fine-tune started from (``--init-from``): file name and SHA-256."""
    path = config.get("init_from")
    if not path:
        return None
    sha = config.get("init_from_sha256") or (sha256_file(Path(path)) if Path(path).is_file() else None)
    return {"weights": str(path), "sha256": sha}


def ship_run(run: Path, out: Path, data_split: dict | None = None) -> dict:
    """Write ``out`` (inference-only weights) and return its card (not yet written).

    Reads the run's ``final_weights.pt`` with ``weights_only=True`` plus its config and
    history; auxiliary deep-supervision heads are dropped (inference never uses them).
    """
    config = json.loads((run / "config.json").read_text())
    history = json.loads((run / "history.json").read_text())
    init = _init_from(config)  # before ``out`` is written: a fine-tune may replace its own starting weights
    final = torch.load(run / "final_weights.pt", map_location="cpu", weights_only=True)
    arch = dict(final["architecture"])
    state = {k: v for k, v in final["state_dict"].items() if not k.startswith("aux_heads")}
    if arch["name"] == "resunet":
        arch["deep_supervision"] = False
    model = build_model(arch)
    model.load_state_dict(state)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"architecture": arch, "state_dict": model.state_dict()}, out)
    refine = config.get("refine_channels", 0)
    context = int(config.get("context_slices", 0))
    fold = f" --folds {config['folds']} --fold {config['fold']}" if config.get("folds") else ""
    return {
        "name": out.stem,
        "task": "FLAIR abnormality (lower-grade glioma) segmentation, LGG kaggle_3m slices",
        "architecture": arch,
        "input_size": 256,
        "context_slices": context,
        **({"preprocessing": config["preprocessing"]} if config.get("preprocessing", {}).get("scheme", "reference")
           != "reference" else {}),
        "input": f"(N, {input_channels(context)}, 256, 256) float32: pre-contrast, FLAIR, post-contrast after the "
                 + ("v2 (head z-score)" if config.get("plan", "v1") == "v2" else "reference") + " "
                 "preprocessing" + (f", slices i-{context}..i+{context} in order" if context else ""),
        "output": "(N, 1, 256, 256) logits (exports add the sigmoid: probabilities)",
        "internal_resolution": 256 // arch.get("stem_stride", 2) if arch["name"] == "resunet" else 256,
        "flops_per_slice": count_flops(model),
        "params": sum(p.numel() for p in model.parameters()),
        "training": {
            "data_split": data_split or {"train": "splits/train.txt (90 patients)",
                                         "validation": "splits/reference_validation.txt (10 patients, logged only)"},
            "steps": history[-1]["step"], "batch_size": config["batch_size"], "optimizer": "AdamW",
            "lr": config["lr"], "weight_decay": config["weight_decay"], "schedule": "one-cycle (10% warm-up, cosine)",
            "loss": ("BCE + batch Tversky (MONAI; alpha {tversky_alpha} on false tumor, beta {tversky_beta} on missed "
                     "tumor)".format(**config) if config.get("loss") == "tversky_bce" else "BCE + batch soft Dice")
                    + ", deep supervision "
                    + ("1 (refined) / 0.5 (half resolution) / 0.5 / 0.25" if refine else "1 / 0.5 / 0.25"),
            "augmentation": "flip, rotation +-15 deg, scale 0.9-1.1, shift +-5%, channel gain/bias"
                            + (", per-channel gamma 0.7-1.5 and contrast 0.75-1.25" if config.get("intensity_aug") else "")
                            + (f", random {config['crop']}x{config['crop']} windows" if config.get("crop") else "")
                            + (f", pre/post channels replaced by FLAIR on {config['flair_copy_p']:.0%} of slices"
                               if config.get("flair_copy_p") else "")
                            + (f", {robust_aug.describe(config)}" if robust_aug.describe(config) else ""),
            "precision": "bfloat16 autocast, channels-last (weights float32)" if config.get("amp") == "bf16" else "float32",
            "sampling": f"{config['tumor_sampling']:.0%} of draws weighted by tumor area, rest uniform",
            "seed": config["seed"], "threads": config["threads"],
            "cpu_minutes": round(history[-1]["elapsed_s"] / 60, 1),
            "machine": f"{platform.processor() or platform.machine()}, CPU only",
            "checkpoint": "last step (not selected on validation patients)",
            **({"init_from": init} if init else {}),
            **({"weight_averaging": f"{1 - config['average_init']:g} x the starting weights + "
                                    f"{config['average_init']:g} x the trained ones (train/soup.py)"}
               if config.get("average_init") else {}),
            "command": f"segengine train --data ../shared/data/lgg --out {run} --steps {config['steps']}" + fold
                       + (f" --crop {config['crop']}" if config.get("crop") else "")
                       + (f" --refine-channels {refine}" if refine else "")
                       + (f" --context-slices {context}" if context else "")
                       + (f" --plan {config['plan']}" if config.get("plan", "v1") != "v1" else "")
                       + (" --intensity-aug" if config.get("intensity_aug") else "")
                       + (f" --loss {config['loss']}" if config.get("loss", "dice_bce") != "dice_bce" else "")
                       + (f" --tversky-alpha {config['tversky_alpha']} --tversky-beta {config['tversky_beta']}"
                          if config.get("loss") == "tversky_bce" else "")
                       + (f" --flair-copy-p {config['flair_copy_p']}" if config.get("flair_copy_p") else "")
                       + "".join(f" --{k[:-2].replace('_', '-')}-p {config[k]}" for k in robust_aug.TRANSFORMS
                                 if config.get(k))
                       + (f" --amp {config['amp']}" if config.get("amp", "none") != "none" else "")
                       + (f" --lr {config['lr']:g}" if config["lr"] != DEFAULT_LR else "")
                       + (f" --init-from {init['weights']}" if init else "")
                       + (f" --average-init {config['average_init']:g}" if config.get("average_init") else "")
                       + (f" --epoch-steps {config['epoch_steps']}" if config.get("epoch_steps", 250) != 250 else ""),
        },
        "validation_history_reference_protocol": [{"step": h["step"], "dsc": round(h["val_dsc_reference"], 4)} for h in history],
        "sha256": sha256_file(out),
        "created": _dt.date.today().isoformat(),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="training run folder (final_weights.pt, config.json, history.json)")
    ap.add_argument("--out", required=True, help="weights file to write, e.g. models/resunet16.pt")
    ap.add_argument("--data", help="Kaggle-layout root holding the validation patients (to score the card's DSC)")
    ap.add_argument("--val-list", help="validation patients")
    args = ap.parse_args(argv)

    out = Path(args.out)
    previous = json.loads(card_path(out).read_text()) if card_path(out).exists() else {}
    card = ship_run(Path(args.run), out)
    # the review rules and the CV summary belong to the recipe, not to these weights' bytes: keep them
    card.update({k: previous[k] for k in ("review", "cross_validation") if k in previous})
    if args.data:
        from segengine.engine.evaluation.evaluate import evaluate_model

        card["validation"] = {}
        write_json_atomic(card_path(out), card)  # the card must exist before the model can load
        for protocol in ("reference", "native"):
            res = evaluate_model(Path(args.data), str(out), protocol, "torch", args.val_list)
            card["validation"][protocol] = {
                "patients": res["summary"]["dsc"]["n"],
                "mean_dsc": round(res["summary"]["dsc"]["mean"], 4),
                "median_dsc": round(res["summary"]["dsc"]["median"], 4),
                "per_patient_dsc": {r["patient"]: round(r["dsc"], 4) for r in res["patients"]},
                "command": f"segengine evaluate --model --data DATA --patients-file {args.val_list} --protocol {protocol}",
            }
            print(f"{protocol}: mean DSC {res['summary']['dsc']['mean']:.4f}")
    write_json_atomic(card_path(out), card)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) and {card_path(out)}; sha256 {card['sha256']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
