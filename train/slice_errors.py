"""Per-slice error table of one patient (reference protocol): where a model loses DSC.

    python -m segengine.train.slice_errors --data DATA --patient TCGA_HT_7616_19940813 [--model PATH]

For every slice with ground truth or prediction: tumor pixels in each, true positives,
the model's mean probability on the missed tumor pixels, and the mean normalized FLAIR
value (per-volume z-score, as the network sees it) over all tumor pixels and over the
missed ones. A miss with low probability on low FLAIR means the annotation covers tissue
that is not hyperintense: more training on hyperintense lesions will not find it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

FLAIR = 1  # channel order: pre-contrast, FLAIR, post-contrast


def slice_errors(images: np.ndarray, truth: np.ndarray, prob: np.ndarray, pred: np.ndarray) -> list[dict]:
    rows = []
    for i, (img, g, p, q) in enumerate(zip(images, truth > 0, prob, pred)):
        if not (g.any() or q.any()):
            continue
        missed = g & ~q
        rows.append({
            "slice": i, "truth_px": int(g.sum()), "pred_px": int(q.sum()), "tp_px": int((g & q).sum()),
            "p_on_missed": float(p[missed].mean()) if missed.any() else None,
            "flair_on_truth": float(img[FLAIR][g].mean()) if g.any() else None,
            "flair_on_missed": float(img[FLAIR][missed].mean()) if missed.any() else None,
        })
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="Kaggle-layout root (or the shared webp/png root)")
    ap.add_argument("--patient", required=True)
    ap.add_argument("--model", default=None, help="model .pt (default: shipped)")
    args = ap.parse_args(argv)

    import torch

    from segengine.engine.model.spec import load_model_spec, load_torch_model
    from segengine.engine.postprocessing.postprocess import largest_component
    from segengine.train.data import load_volume_set
    from segengine.train.train import predict_volume

    spec = load_model_spec(Path(args.model) if args.model else None)
    model = load_torch_model(spec)
    torch.set_num_threads(2)
    vs = load_volume_set(args.data, [args.patient], cache_dir=None, workers=1)
    images, truth = vs.volume(0)
    prob = predict_volume(model, images)
    pred = largest_component(prob > 0.5)

    def fmt(v):
        return "-" if v is None else f"{v:.2f}"

    print(f"{'slice':>5} {'truth px':>9} {'pred px':>8} {'TP px':>7} {'p(missed)':>10} {'FLAIR truth':>12} {'FLAIR missed':>13}")
    for r in slice_errors(images, truth, prob, pred):
        print(f"{r['slice']:>5} {r['truth_px']:>9} {r['pred_px']:>8} {r['tp_px']:>7} {fmt(r['p_on_missed']):>10} "
              f"{fmt(r['flair_on_truth']):>12} {fmt(r['flair_on_missed']):>13}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
