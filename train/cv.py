"""Patient-level cross-validation: train/resume every fold, score the out-of-fold patients.

    python -m segengine.train.cv --data ../shared/data/lgg --out runs/cv/a1 --folds 5 -- --steps 4000
    python -m segengine.train.cv --out runs/cv/a1 --folds 5 --only 0,1 --score-only
    python -m segengine.train.cv compare runs/cv/a1 runs/cv/b0
    python -m segengine.train.cv rescore models/resunet16v4_folds.ensemble.json --out runs/cv/v4_rescore
    python -m segengine.train.cv component-rule runs/cv/v2_rescore --data DATA
    python -m segengine.train.cv calibrate-review runs/cv/v2_rescore --data DATA --write-card models/resunet16.json

Each fold trains with ``segengine train --folds N --fold K`` (arguments after ``--`` are
passed on; an interrupted fold resumes from its checkpoint, ``--stop-after`` splits it
across sessions). A finished fold is shipped like a release model (weights + card) and
scored with the engine's own pipeline and metrics on its held-out patients, in both
protocols and with each post-processing variant, so every attempt is compared patient by
patient (paired) with the same folds. Native out-of-fold probabilities are kept
(float16) for post-processing, ensemble and review-flag studies without re-inference.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from segengine.engine.core.atomic import write_json_atomic
from segengine.engine.core.errors import CvInputError, FoldError
from segengine.engine.evaluation.evaluate import summarize_rows
from segengine.engine.evaluation.metrics import volume_metrics
from segengine.engine.postprocessing.postprocess import PostprocessConfig, postprocess
from segengine.engine.readers.registry import read_patient
from segengine.train.folds import DEFAULT_DATA, DEFAULT_FOLD_SEED, fold_dir, load_or_write_folds, splits_dir
from segengine.train.paired import LOW_DSC, bootstrap_mean_ci, by_failure_kind, compare  # noqa: F401 - cv compare's, re-exported

# Post-processing variants scored on every out-of-fold patient (native protocol).
POST_VARIANTS = {
    "lcc": PostprocessConfig(),
    "lcc_fill2d": PostprocessConfig(fill_holes_2d=True),
    "none": PostprocessConfig.none(),
}


def fold_run(out: Path, k: int) -> Path:
    return out / f"fold{k}"


def train_fold(data: Path, out: Path, n_folds: int, k: int, seed: int, train_args: list[str]) -> bool:
    """Train (or resume) fold ``k``; True when its final weights exist."""
    from segengine.train.train import main as train_main

    run = fold_run(out, k)
    if (run / "final_weights.pt").exists():
        return True
    # "{fold}" in a training option names this fold: --init-from models/v2_fold{fold}.pt fine-tunes
    # each fold from the model that never saw its held-out patients
    args = ["--data", str(data), "--out", str(run), "--folds", str(n_folds), "--fold", str(k),
            "--fold-seed", str(seed), *(a.replace("{fold}", str(k)) for a in train_args)]
    if (run / "last.pt").exists():
        args.append("--resume")
    code = train_main(args)
    if code:  # bad input, already said in one line: not a fold to resume
        raise SystemExit(code)
    return (run / "final_weights.pt").exists()


def score_fold(data: Path, out: Path, n_folds: int, k: int, seed: int, threads: int | None) -> dict:
    """Ship fold ``k``'s model and score its held-out patients; cached in ``fold{k}/oof.json``."""
    from segengine.engine.model.spec import card_path, load_model_spec
    from segengine.train.ship import ship_run

    run = fold_run(out, k)
    result_path = run / "oof.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    held_out = load_or_write_folds_for(data, n_folds, seed)[k]
    weights = run / "model" / f"{out.name}_fold{k}.pt"
    card = ship_run(run, weights, data_split={
        "train": f"splits/train.txt minus fold {k} ({fold_dir(n_folds, seed).name}/fold{k}.txt)",
        "held_out": f"{fold_dir(n_folds, seed).name}/fold{k}.txt ({len(held_out)} patients, scored out of fold)"})
    write_json_atomic(card_path(weights), card)
    return score_model(load_model_spec(weights), data, held_out, k, run, threads)


def score_model(spec, data: Path, held_out: list[str], k: int, run: Path, threads: int | None,
                reference: bool = True) -> dict:
    """Score one fold model on its held-out patients with the engine's own pipeline and metrics;
    keep the native probabilities (plain and mirrored, float16) in ``run/oof/``; write ``run/oof.json``."""
    from segengine.engine.inference import registry
    from segengine.engine.inference.predict import model_input, predict_flipped
    from segengine.engine.job.patient_job import segment
    from segengine.engine.postprocessing.finish import finish_patient
    from segengine.engine.preprocessing.preprocess import preprocess_patient

    run.mkdir(parents=True, exist_ok=True)
    oof_dir = run / "oof"
    oof_dir.mkdir(exist_ok=True)
    rows: dict[str, list[dict]] = ({f"native_{v}": [] for v in POST_VARIANTS} | {"native_lcc_tta": []}
                                   | ({"reference_lcc": []} if reference else {}))
    none = PostprocessConfig.none()
    with registry.create("torch", spec, threads=threads) as backend:
        for patient in held_out:
            vol = read_patient(data / patient)
            pre = preprocess_patient(vol, "native", spec.preprocessing)
            x = model_input(pre, spec)
            grid, grid_flipped = backend.predict(x), predict_flipped(backend, x)
            seg = finish_patient(vol, pre, grid, "native", none, {})
            flipped = finish_patient(vol, pre, grid_flipped, "native", none, {}).prob
            np.savez_compressed(oof_dir / f"{patient}.npz", prob=seg.prob.astype(np.float16),
                                prob_flipped=flipped.astype(np.float16))
            for name, post in POST_VARIANTS.items():
                rows[f"native_{name}"].append({"patient": patient, "fold": k,
                                               **volume_metrics(postprocess(seg.prob, post), seg.truth)})
            tta = postprocess((seg.prob + flipped) / 2, POST_VARIANTS["lcc"])
            rows["native_lcc_tta"].append({"patient": patient, "fold": k, **volume_metrics(tta, seg.truth)})
            if reference:
                ref = segment(vol, backend, "reference")
                rows["reference_lcc"].append({"patient": patient, "fold": k, **volume_metrics(ref.mask, ref.truth)})
            print(f"fold {k} {patient}: native DSC {rows['native_lcc'][-1]['dsc']:.4f}", flush=True)
    card = spec.card
    result = {"fold": k, "model_sha256": spec.sha256, "flops_per_slice": card.get("flops_per_slice"),
              "cpu_minutes": card.get("training", {}).get("cpu_minutes"),
              "command": card.get("training", {}).get("command"),
              "scores": {name: summarize_rows(r) for name, r in rows.items()}}
    (run / "oof.json").write_text(json.dumps(result, indent=2, default=_nan_none))
    return result


def _nan_none(v):
    return None if isinstance(v, float) and math.isnan(v) else v


def member_fold(spec, n_folds: int, seed: int) -> int:
    """The fold a shipped fold model held out, from its card (``held_out: cv5_seed0/foldK.txt ...``)."""
    import re

    held = str(spec.card.get("training", {}).get("data_split", {}).get("held_out", ""))
    m = re.match(rf"{re.escape(fold_dir(n_folds, seed).name)}/fold(\d+)\.txt", held)
    if not m:
        raise SystemExit(f"{spec.weights}: its card names no held-out fold of {fold_dir(n_folds, seed).name} ({held!r})")
    return int(m.group(1))


def rescore(manifest: Path, data: Path, out: Path, n_folds: int, seed: int, threads: int | None,
            reference: bool) -> list[dict]:
    """Score every member of a shipped fold ensemble on the fold its card says it held out
    (out-of-fold probabilities without training; each fold cached in ``out/fold{k}/oof.json``)."""
    from segengine.engine.inference.ensemble import load_ensemble

    folds = load_or_write_folds_for(data, n_folds, seed)
    results = []
    for spec in load_ensemble(manifest).members:
        k = member_fold(spec, n_folds, seed)
        cached = fold_run(out, k) / "oof.json"
        results.append(json.loads(cached.read_text()) if cached.exists() else
                       score_model(spec, data, folds[k], k, fold_run(out, k), threads, reference))
    return sorted(results, key=lambda r: r["fold"])


def load_or_write_folds_for(data: Path, n_folds: int, seed: int) -> list[list[str]]:
    return load_or_write_folds(splits_dir(data) / "train.txt", n_folds, seed)


def aggregate(fold_results: list[dict], name: str, n_folds: int, seed: int) -> dict:
    """Every out-of-fold patient once, per scoring variant, with per-fold means."""
    out = {"recipe": name, "folds": f"{fold_dir(n_folds, seed).name} ({len(fold_results)} of {n_folds} scored)",
           "command": fold_results[0]["command"] if fold_results else None,
           "flops_per_slice": fold_results[0]["flops_per_slice"] if fold_results else None,
           "cpu_minutes_per_fold": [r["cpu_minutes"] for r in fold_results], "variants": {}}
    for variant in fold_results[0]["scores"] if fold_results else []:
        rows = [row for r in fold_results for row in r["scores"][variant]["patients"]]
        dscs = np.array([row["dsc"] for row in rows], dtype=float)
        out["variants"][variant] = {
            "patients": len(rows), "mean": float(dscs.mean()), "median": float(np.median(dscs)),
            "min": float(dscs.min()), f"below_{LOW_DSC:.2f}": int((dscs < LOW_DSC).sum()),
            "per_fold_mean": {str(r["fold"]): r["scores"][variant]["summary"]["dsc"]["mean"] for r in fold_results},
            "per_patient": {row["patient"]: {k: v for k, v in row.items() if k != "patient"} for row in rows},
        }
    return out


def card_summary(agg: dict, source: str) -> dict:
    """What a model card says of its recipe's cross-validation (no per-patient rows: see ``source``)."""
    keep = ("patients", "mean", "median", "min", f"below_{LOW_DSC:.2f}", "per_fold_mean")
    return {"recipe": agg["recipe"], "folds": agg["folds"], "command": agg["command"], "per_patient": source,
            "protocols": {v: {k: (round(x, 4) if isinstance(x, float) else
                                  {f: round(m, 4) for f, m in x.items()} if isinstance(x, dict) else x)
                              for k, x in agg["variants"][v].items() if k in keep}
                          for v in ("native_lcc", "reference_lcc", "native_lcc_fill2d", "native_lcc_tta")
                          if v in agg["variants"]}}


def ship_ensemble(cv_out: Path, n_folds: int, models_dir: Path, name: str, agg: dict, source: str) -> Path:
    """Copy every fold's shipped model beside a ``NAME.ensemble.json`` manifest (``run --ensemble``).

    Members are stored as float16 weights (half the bytes; the loader computes in float32),
    each with its own card and SHA-256; the manifest carries the recipe's CV summary. Its quality
    calibration (``review.modes.ensemble``) is written afterwards by ``cv calibrate-review
    --write-manifest``: a single model's does not fit averaged probabilities. Every fold must be
    finished: an ensemble of some folds is not the recipe's.
    """
    import re

    import torch

    from segengine.engine.inference.ensemble import ENSEMBLE_SUFFIX
    from segengine.engine.model.spec import card_path, sha256_file

    if not re.fullmatch(r"[\w.+-]{1,90}", name) or name.startswith("."):
        raise SystemExit(f"--ship-ensemble {name!r}: a plain name (letters, digits, . + - _), written into --models-dir")
    members, staged = [], []
    models_dir.mkdir(parents=True, exist_ok=True)
    for k in range(n_folds):
        shipped = sorted((fold_run(cv_out, k) / "model").glob("*.pt"))
        if len(shipped) != 1:
            raise SystemExit(f"fold {k} of {cv_out} is not scored yet (no fold{k}/model/*.pt): score every fold first")
        payload = torch.load(shipped[0], map_location="cpu", weights_only=True)
        payload["state_dict"] = {key: v.half() if v.is_floating_point() else v for key, v in payload["state_dict"].items()}
        if not all(bool(torch.isfinite(v).all()) for v in payload["state_dict"].values() if v.is_floating_point()):
            raise SystemExit(f"fold {k}: a weight overflows float16; ship this ensemble in float32")
        member = models_dir / f"{name}_fold{k}.pt"
        tmp = models_dir / f".{member.name}.tmp"  # every member is written before any is put in place
        torch.save(payload, tmp)
        card = json.loads(card_path(shipped[0]).read_text())
        card.update(name=member.stem, sha256=sha256_file(tmp),
                    weights_storage="float16 (computed in float32; fold models are ensemble members)")
        card_tmp = models_dir / f".{member.stem}.json.tmp"
        card_tmp.write_text(json.dumps(card, indent=2) + "\n")
        staged += [(tmp, member), (card_tmp, card_path(member))]
        members.append(member.name)
    for tmp, final in staged:
        os.replace(tmp, final)
    manifest = {"name": name, "kind": "ensemble", "members": members,
                "combine": "mean of the members' sigmoid probabilities on the model grid (with --tta: and of "
                           "each member's left-right mirrored slices), then the usual post-processing",
                "cross_validation": card_summary(agg, source)}
    path = models_dir / f"{name}{ENSEMBLE_SUFFIX}"
    write_json_atomic(path, manifest)
    return path


def threshold_sweep(cv_out: Path, data: Path, thresholds: list[float]) -> list[str]:
    """Native out-of-fold DSC at each probability threshold (largest component after it), from
    the stored probabilities, paired with 0.5: a threshold is chosen on training folds or not at all."""
    from segengine.engine.evaluation.metrics import dsc

    scores: dict[float, list[float]] = {t: [] for t in thresholds}
    for npz in sorted(cv_out.glob("fold*/oof/*.npz")):
        prob = np.load(npz)["prob"].astype(np.float32)
        truth = read_patient(data / npz.stem).mask > 0
        for t in thresholds:
            scores[t].append(dsc(postprocess(prob, PostprocessConfig(threshold=t)), truth))
    base = np.array(scores.get(0.5) or scores[thresholds[0]])
    lines = []
    for t in thresholds:
        d = np.array(scores[t])
        diff = d - base
        lines.append(f"threshold {t:.2f}: {len(d)} patients, mean {d.mean():.4f}, median {np.median(d):.4f}, "
                     f"vs 0.5 {diff.mean() * 100:+.2f} points, better on {(diff > 1e-9).sum()}, worse on {(diff < -1e-9).sum()}")
    return lines


def worst_cases_figure(cv_out: Path, data: Path, png: Path, n: int = 3, max_tiles: int = 10) -> list[str]:
    """Contact sheets (FLAIR, ground truth green, prediction red) of the ``n`` worst out-of-fold
    patients, from the stored probabilities, one band per patient, titled by DSC."""
    from PIL import Image, ImageDraw

    from segengine.engine.outputs.pictures import contact_sheet

    agg = json.loads((cv_out / "cv.json").read_text())
    rows = agg["variants"]["native_lcc"]["per_patient"]
    worst = sorted(rows, key=lambda p: rows[p]["dsc"])[:n]
    bands = []
    for p in worst:
        vol = read_patient(data / p)
        prob = np.load(cv_out / f"fold{rows[p]['fold']}" / "oof" / f"{p}.npz")["prob"].astype(np.float32)
        sheet = contact_sheet(vol, postprocess(prob, POST_VARIANTS["lcc"]), vol.mask > 0, max_tiles=max_tiles,
                              columns=max_tiles).convert("RGB")
        band = Image.new("RGB", (sheet.width, sheet.height + 22), "white")
        band.paste(sheet, (0, 22))
        r = rows[p]
        ImageDraw.Draw(band).text((4, 4), f"{p} (fold {r['fold']}): DSC {r['dsc']:.3f}, precision {r['precision']:.3f}, "
                                          f"recall {r['recall']:.3f}", fill="black")
        bands.append(band)
    width = max(b.width for b in bands)
    fig = Image.new("RGB", (width, sum(b.height for b in bands)), "white")
    y = 0
    for b in bands:
        fig.paste(b, (0, y))
        y += b.height
    fig.thumbnail((1600, 10_000))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.save(png, optimize=True)
    return worst


def flair_only_scores(cv_out: Path, data: Path, k: int, threads: int | None = None) -> list[tuple[str, float, float]]:
    """(patient, native DSC as given, native DSC with pre/post-contrast replaced by FLAIR) for fold
    ``k``'s held-out patients: how much the model leans on the sequences a case may lack."""
    from dataclasses import replace

    from segengine.engine.evaluation.metrics import dsc
    from segengine.engine.inference import registry
    from segengine.engine.job.patient_job import segment
    from segengine.engine.model.spec import load_model_spec

    spec = load_model_spec(fold_run(cv_out, k) / "model" / f"{cv_out.name}_fold{k}.pt")
    held_out = json.loads((fold_run(cv_out, k) / "oof.json").read_text())["scores"]["native_lcc"]["patients"]
    rows = []
    with registry.create("torch", spec, threads=threads) as backend:
        for r in held_out:
            vol = read_patient(data / r["patient"])
            flair = vol.image.copy()
            flair[..., 0] = flair[..., 2] = flair[..., 1]
            given, only = segment(vol, backend), segment(replace(vol, image=flair), backend)
            rows.append((r["patient"], dsc(given.mask, given.truth), dsc(only.mask, only.truth)))
    return rows


def read_cv_result(run: str | Path, variants: tuple[str, ...] = ()) -> dict:
    """A CV run's cv.json (given the folder or the file), refusing a missing, empty or foreign one."""
    path = Path(run) / "cv.json" if Path(run).is_dir() else Path(run)
    if not path.is_file():
        raise CvInputError(f"{run}: no cv.json (a CV run folder, scored by `segengine cv`, or its cv.json)")
    try:
        res = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CvInputError(f"{path}: unreadable cv.json ({(str(exc).splitlines() or [type(exc).__name__])[0][:120]})"
                           ) from None
    if not isinstance(res, dict) or not isinstance(res.get("variants"), dict) or not res["variants"]:
        raise CvInputError(f"{path}: no scored variants in this cv.json")
    for v in variants:
        if not isinstance(res["variants"].get(v), dict) or not isinstance(res["variants"][v].get("per_patient"), dict):
            raise CvInputError(f"{path}: no variant {v!r} (has {', '.join(sorted(res['variants']))})")
    return res


def main(argv: list[str] | None = None) -> int:
    """`segengine cv ...`: bad input is one line on stderr and exit 2."""
    try:
        return _main(argv)
    except (FoldError, CvInputError) as exc:
        print(f"segengine: error: {exc}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["flair-only"]:
        ap = argparse.ArgumentParser(prog="segengine cv flair-only", description=flair_only_scores.__doc__)
        ap.add_argument("run", type=Path, help="CV run folder (fold*/model/, fold*/oof.json)")
        ap.add_argument("--fold", type=int, default=0, help="the fold whose model and held-out patients are scored")
        ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset root (default: %(default)s)")
        args = ap.parse_args(argv[1:])
        rows = flair_only_scores(args.run, args.data, args.fold)
        for p, a, b in rows:
            print(f"{p:<26} as given {a:.4f}  FLAIR in all three channels {b:.4f}")
        print(f"mean over {len(rows)}: as given {np.mean([r[1] for r in rows]):.4f}, "
              f"FLAIR in all three channels {np.mean([r[2] for r in rows]):.4f}")
        return 0
    if argv[:1] == ["worst"]:
        ap = argparse.ArgumentParser(prog="segengine cv worst", description=worst_cases_figure.__doc__)
        ap.add_argument("run", type=Path, help="CV run folder (cv.json, fold*/oof/)")
        ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset root (default: %(default)s)")
        ap.add_argument("--out", type=Path, default=Path("docs/cv_worst.png"), help="the PNG to write (default: %(default)s)")
        ap.add_argument("-n", type=int, default=3, help="how many of the worst patients (default: %(default)s)")
        args = ap.parse_args(argv[1:])
        print("worst:", ", ".join(worst_cases_figure(args.run, args.data, args.out, args.n)), "->", args.out)
        return 0
    if argv[:1] == ["compare"]:
        ap = argparse.ArgumentParser(prog="segengine cv compare",
                                     description="Paired per-patient comparison of two CV runs: mean difference with "
                                                 "its bootstrap CI, patients better and worse.")
        ap.add_argument("runs", nargs=2, help="two CV run folders (or their cv.json files)")
        ap.add_argument("--variant", default="native_lcc",
                        help="scoring variant of cv.json to compare (native_lcc, native_lcc_tta, native_lcc_fill2d, "
                             "native_none, reference_lcc; default: %(default)s)")
        ap.add_argument("--variant-b", default=None, help="score the second run with this variant (e.g. native_lcc_fill2d)")
        ap.add_argument("--by-kind", action="store_true",
                        help="also print a markdown table by failure kind (the patients issue 23 named in v2)")
        args = ap.parse_args(argv[1:])
        res = [read_cv_result(args.runs[0], (args.variant,)),
               read_cv_result(args.runs[1], (args.variant_b or args.variant,))]
        print(compare(res[0], res[1], args.variant, args.variant_b))
        if args.by_kind:
            print(by_failure_kind(res[0], res[1], args.variant))
        return 0
    if argv[:1] == ["component-rule"]:
        from segengine.train.component_rule import main as component_rule_main

        return component_rule_main(argv[1:])
    if argv[:1] == ["calibrate-review"]:
        from segengine.train.quality_calibration import main as calibrate_main

        return calibrate_main(argv[1:])
    if argv[:1] == ["rescore"]:
        ap = argparse.ArgumentParser(prog="segengine cv rescore", description=rescore.__doc__)
        ap.add_argument("manifest", type=Path, help="a fold ensemble's *.ensemble.json (members name their held-out fold)")
        ap.add_argument("--out", type=Path, required=True, help="CV run folder to write (fold*/oof.json, fold*/oof/, cv.json)")
        ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset root (default: %(default)s)")
        ap.add_argument("--folds", type=int, default=5, help="the fold split the members were trained on (default: 5)")
        ap.add_argument("--fold-seed", type=int, default=DEFAULT_FOLD_SEED, help="its seed (default: %(default)s)")
        ap.add_argument("--threads", type=int, default=None, help="scoring threads (default: all cores)")
        ap.add_argument("--native-only", action="store_true", help="skip the reference protocol (a third of the time)")
        args = ap.parse_args(argv[1:])
        results = rescore(args.manifest, args.data, args.out, args.folds, args.fold_seed, args.threads,
                          not args.native_only)
        agg = aggregate(results, args.out.name, args.folds, args.fold_seed)
        (args.out / "cv.json").write_text(json.dumps(agg, indent=2, default=_nan_none))
        for variant, v in agg["variants"].items():
            print(f"{variant:<16} {v['patients']:>3} patients  mean {v['mean']:.4f}  median {v['median']:.4f}")
        return 0
    if argv[:1] == ["thresholds"]:
        ap = argparse.ArgumentParser(prog="segengine cv thresholds", description=threshold_sweep.__doc__)
        ap.add_argument("run", type=Path, help="CV run folder (fold*/oof/*.npz)")
        ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset root (default: %(default)s)")
        ap.add_argument("--thresholds", default="0.3,0.4,0.5,0.6,0.7,0.8",
                        help="comma list of probability thresholds (default: %(default)s)")
        args = ap.parse_args(argv[1:])
        for line in threshold_sweep(args.run, args.data, [float(t) for t in args.thresholds.split(",")]):
            print(line)
        return 0
    train_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, train_args = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(prog="python -m segengine.train.cv", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--out", required=True, help="CV run folder: fold0..foldN-1, cv.json")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--fold-seed", type=int, default=DEFAULT_FOLD_SEED)
    ap.add_argument("--only", default=None, help="comma-separated folds to train/score (screening: 0 or 0,1)")
    ap.add_argument("--score-only", action="store_true", help="score finished folds; train nothing")
    ap.add_argument("--threads", type=int, default=None, help="scoring threads")
    ap.add_argument("--record", default=None, help="also write the aggregate here (e.g. docs/cv/a1.json)")
    ap.add_argument("--card", default=None,
                    help="write the recipe's CV summary into this model card (a model trained with the same recipe)")
    ap.add_argument("--ship-ensemble", default=None, metavar="NAME",
                    help="after scoring every fold: copy the fold models to --models-dir as NAME_foldK.pt "
                         "beside NAME.ensemble.json (the --ensemble accurate mode)")
    ap.add_argument("--models-dir", default="models")
    # `segengine cv` reaches here without the "--" (Click consumes it): options this parser does
    # not know are the training options either way
    args, extra = ap.parse_known_args(argv)
    train_args = train_args or extra

    data, out = Path(args.data), Path(args.out)
    folds = [int(f) for f in args.only.split(",")] if args.only else list(range(args.folds))
    load_or_write_folds_for(data, args.folds, args.fold_seed)
    results = []
    for k in folds:
        done = (fold_run(out, k) / "final_weights.pt").exists()
        if not done and not args.score_only:
            done = train_fold(data, out, args.folds, k, args.fold_seed, train_args)
            if not done:
                print(f"fold {k} stopped before its last step; run the same command again to resume", flush=True)
                break
        if done:
            results.append(score_fold(data, out, args.folds, k, args.fold_seed, args.threads))
    if not results:
        print("no finished fold to score")
        return 1
    agg = aggregate(results, out.name, args.folds, args.fold_seed)
    text = json.dumps(agg, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v)
    (out / "cv.json").write_text(text)
    if args.record:
        Path(args.record).parent.mkdir(parents=True, exist_ok=True)
        Path(args.record).write_text(text)
    if args.card:
        card_file = Path(args.card)
        card = json.loads(card_file.read_text())
        card["cross_validation"] = card_summary(agg, args.record or str(out / "cv.json"))
        write_json_atomic(card_file, card)
    if args.ship_ensemble:
        if len(results) != args.folds:
            raise SystemExit(f"--ship-ensemble needs all {args.folds} folds scored; {len(results)} are")
        path = ship_ensemble(out, args.folds, Path(args.models_dir), args.ship_ensemble, agg,
                             args.record or str(out / "cv.json"))
        print(f"wrote {path}")
    for variant, v in agg["variants"].items():
        print(f"{variant:<16} {v['patients']:>3} patients  mean {v['mean']:.4f}  median {v['median']:.4f}  "
              f"min {v['min']:.4f}  <{LOW_DSC:.2f}: {v[f'below_{LOW_DSC:.2f}']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
