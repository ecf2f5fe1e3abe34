"""Figures for REPORT.md: segmentation examples (best to worst patient) and the learning curve.

    python -m segengine.train.figures --data /tmp/lgg/kaggle_3m \\
        --patients-file ../shared/data/lgg/splits/reference_validation.txt --run runs/resunet16 --out docs

examples.png: for each patient, the slice with the most ground truth: FLAIR with the
ground-truth outline (green) and the shipped model's outline (red), native protocol,
titled with the patient's DSC; sorted so the worst patient is last.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from segengine.engine.evaluation.evaluate import select_patients
from segengine.engine.evaluation.metrics import dsc
from segengine.engine.inference import registry
from segengine.engine.job.patient_job import segment
from segengine.engine.model.spec import load_model_spec
from segengine.engine.outputs.pictures import overlay_slice
from segengine.engine.readers.registry import read_patient


def examples_figure(data: Path, patients_file: str | None, model: str | None, out: Path, backend: str = "torch") -> list[dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = load_model_spec(model)
    cases = []
    with registry.create(backend, spec) as be:
        for folder in select_patients(data, patients_file):
            vol = read_patient(folder)
            seg = segment(vol, be, "native")
            area = seg.truth.reshape(len(seg.truth), -1).sum(axis=1)
            i = int(np.argmax(area))
            cases.append({"patient": vol.patient_id, "dsc": dsc(seg.mask, seg.truth), "slice": vol.slice_numbers[i],
                          "tile": overlay_slice(vol.image[i], seg.mask[i], seg.truth[i])})
    cases.sort(key=lambda c: -c["dsc"])
    cols = 5
    rows = int(np.ceil(len(cases) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.6 * rows), dpi=90)
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    for ax, c in zip(np.atleast_1d(axes).ravel(), cases):
        ax.imshow(c["tile"])
        ax.set_title(f"{c['patient'][5:]} #{c['slice']}\nDSC {c['dsc']:.3f}", fontsize=9)
    fig.suptitle("FLAIR, ground truth (green) vs prediction (red), native protocol; worst patient last", fontsize=11)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return [{k: v for k, v in c.items() if k != "tile"} for c in cases]


def learning_curve(run: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = json.loads((run / "history.json").read_text())
    steps = [h["step"] for h in hist]
    fig, ax1 = plt.subplots(figsize=(7, 3.5), dpi=100)
    ax1.plot(steps, [h["val_dsc_reference"] for h in hist], "o-", color="tab:blue", label="validation mean DSC (logged only)")
    ax1.set_xlabel("step (batch 16)")
    ax1.set_ylabel("DSC, reference protocol")
    ax1.set_ylim(0.4, 1.0)
    ax2 = ax1.twinx()
    ax2.plot(steps, [h["loss"] for h in hist], "s--", color="tab:red", label="training loss")
    ax2.set_ylabel("loss")
    fig.legend(loc="lower center", ncol=2, fontsize=8)
    ax1.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--patients-file")
    ap.add_argument("--model", default=None)
    ap.add_argument("--run", type=Path, help="training run folder, for the learning curve")
    ap.add_argument("--out", type=Path, default=Path("docs"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cases = examples_figure(args.data, args.patients_file, args.model, args.out / "examples.png")
    for c in cases:
        print(f"{c['patient']}: DSC {c['dsc']:.4f} (slice {c['slice']})")
    if args.run:
        learning_curve(args.run, args.out / "learning_curve.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
