"""Train segengine's U-Net on the CPU: resumable, deterministic given a seed, logged.

    python -m segengine.train --data ../shared/data/lgg --out runs/resunet16

Checkpoints (``last.pt``, every epoch) hold the model, optimizer, schedule and every
random state, so an interrupted run resumed with ``--resume`` continues exactly. The
shipped model is the last epoch: checkpoints are never chosen on the validation
patients; their DSC is logged only to draw the learning curve.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from segengine.engine.core.atomic import atomic_file, write_json_atomic
from segengine.engine.evaluation.metrics import dsc
from segengine.engine.model.network import build_model, count_flops
from segengine.engine.model.spec import SLICE_CHANNELS, input_channels, sha256_file
from segengine.engine.postprocessing.postprocess import largest_component
from segengine.engine.preprocessing.plan import PLAN_V2, PreprocessingPlan
from segengine.engine.preprocessing.preprocess import context_index, stack_context
from segengine.engine.readers.volume import read_patient_list
from segengine.train import robust_aug
from segengine.train.data import VolumeSet, load_volume_set
from segengine.train.folds import split_for_fold, splits_dir

DEFAULT_LR = 3e-3  # one-cycle peak; the card's command names --lr only when it differs


# --plan: the preprocessing plans a model can be trained with (the card records the chosen one)
PLANS = {"v1": PreprocessingPlan(), "v2": PLAN_V2}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m segengine.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="dataset root: folders of <patient>_<n>.{tif,png,webp} slices with masks")
    ap.add_argument("--train-list", default=None, help="patients to train on (default: splits/train.txt beside --data)")
    ap.add_argument("--val-list", default=None, help="patients whose DSC is logged (default: splits/reference_validation.txt)")
    ap.add_argument("--out", required=True, help="run folder: checkpoints, TensorBoard logs, config")
    ap.add_argument("--folds", type=int, default=0,
                    help="patient-level cross-validation: split the train list into FOLDS (files in train/folds/)")
    ap.add_argument("--fold", type=int, default=None,
                    help="with --folds: train on the other folds; fold K's held-out patients are the logged validation")
    ap.add_argument("--fold-seed", type=int, default=0, help="seed of the fold split")
    ap.add_argument("--arch", default="resunet", choices=["resunet", "reference_unet"])
    ap.add_argument("--base-channels", type=int, default=16)
    ap.add_argument("--no-deep-supervision", action="store_true")
    ap.add_argument("--refine-channels", type=int, default=0,
                    help="width of the full-resolution refinement branch (0: none; resunet only)")
    ap.add_argument("--intensity-aug", action="store_true",
                    help="add per-channel gamma (0.7-1.5) and contrast (0.75-1.25) to the augmentation")
    ap.add_argument("--context-slices", type=int, default=0, metavar="K",
                    help="2.5D input: K neighbouring slices on each side as extra channels (3 * (2K + 1) inputs)")
    ap.add_argument("--loss", default="dice_bce", choices=["dice_bce", "tversky_bce"],
                    help="tversky_bce: BCE + MONAI's Tversky loss, which weighs missed tumor (beta) over false "
                         "tumor (alpha); the CV misses were under-segmentations")
    ap.add_argument("--tversky-alpha", type=float, default=0.3)
    ap.add_argument("--tversky-beta", type=float, default=0.7)
    ap.add_argument("--flair-copy-p", type=float, default=0.0, metavar="P",
                    help="share of slices whose pre- and post-contrast channels are replaced by FLAIR, as some "
                         "patients arrive (their missing sequences filled with FLAIR copies)")
    for name, what in (("brightness", "each modality multiplied by 0.75-1.25"),
                       ("noise", "Gaussian noise of variance up to 0.1"),
                       ("blur", "one modality blurred, sigma 0.5-1.0"),
                       ("dark-channel", "one modality re-quantized to 6-20 grey levels (a very dark scan, normalized)"),
                       ("swap-contrast", "two modalities swapped (contrast that looks swapped)"),
                       ("gamma", "gamma 0.7-1.5 on each modality (nnU-Net's range)"),
                       ("bias-field", "a smooth multiplicative bias field (up to +-30 percent) on each modality")):
        ap.add_argument(f"--{name}-p", type=float, default=0.0, metavar="P",
                        help=f"share of slices with {what} (train/robust_aug.py; 0: off)")
    ap.add_argument("--plan", default="v1", choices=sorted(PLANS),
                    help="preprocessing plan: v1 = the course's (threshold at 10%% of the maximum), v2 = head mask "
                         "and z-score per sequence from robust statistics (engine/preprocessing/head.py)")
    ap.add_argument("--amp", default="none", choices=["none", "bf16"],
                    help="bf16: bfloat16 autocast and channels-last memory, ~2.3x faster on CPUs with AMX/AVX-512 "
                         "BF16; weights stay float32")
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--epoch-steps", type=int, default=250, help="steps between checkpoints/validation")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=DEFAULT_LR)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--tumor-sampling", type=float, default=0.5,
                    help="share of draws weighted by tumor area (the rest uniform over slices)")
    ap.add_argument("--crop", type=int, default=0,
                    help="train on random CROPxCROP windows of the augmented 256 slices (0: whole slices); "
                         "the network is fully convolutional, so it still runs on whole slices")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    ap.add_argument("--init-from", default=None, metavar="PT",
                    help="start from these weights (a shipped model's .pt) instead of random ones: fine-tuning; "
                         "the deep-supervision heads that shipped models drop start fresh")
    ap.add_argument("--average-init", type=float, default=None, metavar="W",
                    help="with --init-from: the final weights are (1 - W) x the start + W x the trained ones "
                         "(train/soup.py; v3 uses 0.5)")
    ap.add_argument("--stop-after", type=int, default=0, metavar="STEP",
                    help="exit after checkpointing at this step (a multiple of --epoch-steps) to split a run "
                         "across sessions; --resume continues it exactly")
    ap.add_argument("--cache-dir", default=".cache")
    return ap.parse_args(argv)


# ------------------------------------------------------------------ augmentation
def augment(images: torch.Tensor, masks: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched random flip, rotation (+-15 deg), scale (0.9-1.1), shift (+-5%), channel gain/bias."""
    n = images.shape[0]
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=gen)  # noqa: E731
    angle = u(-15, 15) * math.pi / 180
    scale = u(0.9, 1.1)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    tx, ty = u(-0.05, 0.05), u(-0.05, 0.05)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    masks = (F.grid_sample(masks, grid, mode="bilinear", padding_mode="zeros", align_corners=False) > 0.5).float()
    gain = (1 + 0.1 * torch.randn(n, 3, 1, 1, generator=gen)).repeat(1, images.shape[1] // 3, 1, 1)
    bias = (0.1 * torch.randn(n, 3, 1, 1, generator=gen)).repeat(1, images.shape[1] // 3, 1, 1)
    return images * gain + bias, masks


def intensity_augment(images: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Per-slice, per-channel gamma and contrast changes (half the slices each).

    The lesion rims that the model misses are less hyperintense than their cores; varying
    the intensity curve teaches it not to rely on one brightness level. Gamma is applied
    on each channel's [min, max] range so it works on the normalized (signed) values.
    """
    n, c = images.shape[:2]
    lo = images.amin(dim=(2, 3), keepdim=True)
    hi = images.amax(dim=(2, 3), keepdim=True)
    unit = ((images - lo) / (hi - lo + 1e-6)).clamp(0, 1)
    gamma = torch.exp(torch.empty(n, c, 1, 1).uniform_(math.log(0.7), math.log(1.5), generator=gen))
    apply_gamma = torch.rand(n, c, 1, 1, generator=gen) < p
    unit = torch.where(apply_gamma, unit.pow(gamma), unit)
    out = lo + unit * (hi - lo)
    mean = out.mean(dim=(2, 3), keepdim=True)
    contrast = torch.empty(n, c, 1, 1).uniform_(0.75, 1.25, generator=gen)
    apply_contrast = torch.rand(n, c, 1, 1, generator=gen) < p
    return torch.where(apply_contrast, (out - mean) * contrast + mean, out)


def random_crop(images: torch.Tensor, masks: torch.Tensor, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random size x size window per slice (a 192 crop halves a training step's cost)."""
    n, (h, w) = images.shape[0], images.shape[-2:]
    if not 0 < size < min(h, w):
        return images, masks
    tops = torch.randint(0, h - size + 1, (n,), generator=gen).tolist()
    lefts = torch.randint(0, w - size + 1, (n,), generator=gen).tolist()
    windows = [(slice(None), slice(t, t + size), slice(l, l + size)) for t, l in zip(tops, lefts)]
    return (torch.stack([img[win] for img, win in zip(images, windows)]),
            torch.stack([m[win] for m, win in zip(masks, windows)]))


def flair_copy(images: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Replace pre- and post-contrast by FLAIR on a share ``p`` of slices (every context group).

    Ten of the 100 shared patients carry FLAIR copies in place of missing sequences; the
    channels are normalized one by one, so a copied raw channel is a copied normalized one.
    """
    if p <= 0:
        return images
    n, c = images.shape[:2]
    pick = torch.rand(n, generator=gen) < p
    if not bool(pick.any()):
        return images
    groups = images.reshape(n, c // SLICE_CHANNELS, SLICE_CHANNELS, *images.shape[2:])
    copied = groups[:, :, 1:2].expand_as(groups)
    return torch.where(pick[:, None, None, None, None], copied, groups).reshape(images.shape)


def tversky_bce_loss(alpha: float, beta: float):
    """BCE + MONAI's batch Tversky loss (beta > alpha penalizes missed tumor more)."""
    from monai.losses import TverskyLoss

    tversky = TverskyLoss(sigmoid=True, alpha=alpha, beta=beta, batch=True, smooth_nr=1.0, smooth_dr=1.0)

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, target) + tversky(logits, target)

    return loss


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice over the whole batch (batch Dice is stable on tumor-free slices)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).sum()
    dice = 1 - (2 * inter + 1) / (p.sum() + target.sum() + 1)
    return bce + dice


# ------------------------------------------------------------------ evaluation
@torch.no_grad()
def predict_volume(model: torch.nn.Module, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    model.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.asarray(images[i : i + batch_size], dtype=np.float32))
        out.append(torch.sigmoid(model(x))[:, 0].numpy())
    return np.concatenate(out)


def reference_protocol_dsc(model: torch.nn.Module, vs: VolumeSet, context: int = 0) -> dict[str, float]:
    """Per-patient DSC on the reference grid: sigmoid > 0.5, largest 3D component."""
    scores = {}
    for i, p in enumerate(vs.patients):
        images, masks = vs.volume(i)
        prob = predict_volume(model, stack_context(images, context))
        scores[p] = dsc(largest_component(prob > 0.5), masks > 0)
    return scores


def _overlay_grid(images: np.ndarray, masks: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """FLAIR with ground truth (green) and prediction (red) as one HWC uint8 strip."""
    tiles = []
    for img, m, p in zip(images, masks, probs):
        flair = img[1].astype(np.float32)
        flair = (flair - flair.min()) / (np.ptp(flair) + 1e-6)
        rgb = np.repeat(flair[..., None], 3, axis=2)
        rgb[..., 1] = np.where(m > 0, 0.5 * rgb[..., 1] + 0.5, rgb[..., 1])
        rgb[..., 0] = np.where(p > 0.5, 0.5 * rgb[..., 0] + 0.5, rgb[..., 0])
        tiles.append(rgb)
    return (np.concatenate(tiles, axis=1) * 255).astype(np.uint8)


# ------------------------------------------------------------------ main loop
def slice_weights(masks: np.ndarray, tumor_share: float) -> np.ndarray:
    area = masks.reshape(len(masks), -1).sum(axis=1).astype(np.float64)
    uniform = np.full(len(masks), 1.0 / len(masks))
    tumor = area / area.sum() if area.sum() > 0 else uniform
    w = (1 - tumor_share) * uniform + tumor_share * tumor
    return w / w.sum()


def init_weights(model: torch.nn.Module, path: str) -> None:
    """Load a shipped model's weights for fine-tuning; only the deep-supervision heads may be missing."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else payload
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensor shapes differ: another width or input channels
        raise SystemExit(f"--init-from {path}: weights do not fit this architecture ({str(exc).splitlines()[1:2]})")
    bad = [k for k in missing if not k.startswith("aux_heads.")] + list(unexpected)
    if bad:
        raise SystemExit(f"--init-from {path}: weights do not fit this architecture ({', '.join(bad[:3])} ...)")
    print(f"initialised from {path}" + (" (deep-supervision heads fresh)" if missing else ""), flush=True)


def main(argv=None) -> int:
    """Train; bad input (a patient list that is missing, a FIFO or names absent patients, bad folds) is
    one line on stderr and exit 2, never a traceback."""
    import sys

    from segengine.engine.core.errors import DataError, FoldError

    try:
        return _main(argv)
    except (DataError, FoldError) as exc:
        print(f"segengine train: error: {exc}", file=sys.stderr)
        return 2


def _absent_patients(data: Path, patients: list[str]) -> None:
    """Every listed patient is under --data, checked before any patient is read."""
    from segengine.engine.core.errors import DataError

    absent = [p for p in patients if not (data / p).exists()]
    if absent:
        raise DataError(f"{data}: {len(absent)} listed patient(s) not found there ({', '.join(absent[:3])}"
                        + (", ..." if len(absent) > 3 else "") + ")")


def _main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    out = Path(args.out)
    data = Path(args.data)
    splits = splits_dir(data)
    if args.average_init is not None and not (args.init_from and 0.0 < args.average_init < 1.0):
        raise SystemExit("--average-init W needs --init-from and 0 < W < 1")
    if (args.fold is None) != (not args.folds):
        raise SystemExit("give --folds N and --fold K together")
    if args.folds:
        if args.val_list:
            raise SystemExit("--val-list and --fold exclude each other: the held-out fold is the validation")
        train_patients, val_patients = split_for_fold(args.train_list or splits / "train.txt", args.folds, args.fold,
                                                      args.fold_seed)
    else:
        train_patients = read_patient_list(args.train_list or splits / "train.txt")
        val_patients = read_patient_list(args.val_list or splits / "reference_validation.txt")
    if set(train_patients) & set(val_patients):
        raise SystemExit("train and validation patient lists overlap")
    _absent_patients(data, train_patients + val_patients)
    out.mkdir(parents=True, exist_ok=True)  # after the inputs are checked: a refused run leaves nothing

    t0 = time.time()
    plan = PLANS[args.plan]
    train_set = load_volume_set(data, train_patients, cache_dir=args.cache_dir, plan=plan)
    val_set = load_volume_set(data, val_patients, cache_dir=args.cache_dir, plan=plan)
    print(f"data: {len(train_set.images)} train slices / {len(train_patients)} patients, "
          f"{len(val_set.images)} val slices / {len(val_patients)} patients ({time.time() - t0:.0f} s)", flush=True)

    arch = {"name": args.arch, "base_channels": args.base_channels}
    if args.context_slices:
        arch["in_channels"] = input_channels(args.context_slices)
    if args.arch == "resunet":
        arch["deep_supervision"] = not args.no_deep_supervision
        if args.refine_channels:
            arch["refine_channels"] = args.refine_channels
    model = build_model(arch)
    flops = count_flops(model)
    loss_fn = dice_bce_loss if args.loss == "dice_bce" else tversky_bce_loss(args.tversky_alpha, args.tversky_beta)
    amp = args.amp == "bf16"
    if amp:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    np_rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    step, elapsed, history = 0, 0.0, []
    ckpt_path = out / "last.pt"
    if args.init_from and not (args.resume and ckpt_path.exists()):
        init_weights(model, args.init_from)
    if args.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)  # RNG states are tensors and plain dicts
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        np_rng.bit_generator.state = ck["numpy_rng"]
        gen.set_state(ck["torch_gen"])
        torch.set_rng_state(ck["torch_rng"])
        step, elapsed, history = ck["step"], ck["elapsed_s"], ck["history"]
        print(f"resumed at step {step}", flush=True)
    config = {**vars(args), "architecture": arch, "flops_per_slice": flops, "preprocessing": plan.card_block(),
              "params": sum(p.numel() for p in model.parameters()),
              "train_patients": train_patients, "val_patients": val_patients}
    if args.init_from:  # the card must name the starting weights even after that file is replaced,
        # also when that happens between --stop-after and --resume: the first start's hash stays
        previous = json.loads((out / "config.json").read_text()) if args.resume and step else {}
        config["init_from_sha256"] = previous.get("init_from_sha256") or sha256_file(args.init_from)
    (out / "config.json").write_text(json.dumps(config, indent=2))

    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    writer = SummaryWriter(str(out / "tb"))
    weights = slice_weights(train_set.masks, args.tumor_sampling)
    neighbours = context_index(train_set.patient_index, args.context_slices)
    # refined logits, then (with refinement) the half-resolution logits, then the two coarse decoder levels
    ds_weights = [1.0, 0.5, 0.5, 0.25] if arch.get("refine_channels") else [1.0, 0.5, 0.25]
    bar = tqdm(total=args.steps, initial=step, desc="train", unit="step", dynamic_ncols=True, mininterval=5)
    running = []
    t_start = time.time() - elapsed
    while step < args.steps:
        model.train()
        idx = np_rng.choice(len(weights), size=args.batch_size, p=weights)
        x = torch.from_numpy(train_set.images[neighbours[idx]].astype(np.float32).reshape(len(idx), -1, *train_set.images.shape[2:]))
        y = torch.from_numpy(train_set.masks[idx].astype(np.float32))[:, None]
        x, y = augment(x, y, gen)
        if args.crop:
            x, y = random_crop(x, y, args.crop, gen)
        if args.intensity_aug:
            x = intensity_augment(x, gen)
        x = robust_aug.apply(x, vars(args), gen)
        x = flair_copy(x, args.flair_copy_p, gen)
        if amp:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            outputs = model(x)
        outputs = outputs if isinstance(outputs, list) else [outputs]
        loss = sum(w * loss_fn(o.float(), y) for w, o in zip(ds_weights, outputs))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step += 1
        running.append(float(loss.detach()))
        bar.update(1)
        if step % 20 == 0:
            writer.add_scalar("train/loss", np.mean(running[-20:]), step)
            writer.add_scalar("train/lr", sched.get_last_lr()[0], step)
            bar.set_postfix(loss=f"{np.mean(running[-20:]):.3f}")
        if step % args.epoch_steps == 0 or step == args.steps:
            scores = reference_protocol_dsc(model, val_set, args.context_slices)
            mean = float(np.mean(list(scores.values())))
            elapsed = time.time() - t_start
            per_patient = {str(k): float(v) for k, v in scores.items()}  # plain types: resume loads weights_only
            history.append({"step": step, "elapsed_s": round(elapsed, 1), "loss": float(np.mean(running)),
                            "val_dsc_reference": mean, "val_dsc_per_patient": per_patient})
            running = []
            writer.add_scalar("val/dsc_reference_protocol", mean, step)
            i = int(np.argmax([vs.any() for vs in val_set.masks]))
            sel = slice(max(0, i), i + 4)
            probs = predict_volume(model, stack_context(val_set.images[sel], args.context_slices))
            writer.add_image("val/overlay", _overlay_grid(val_set.images[sel], val_set.masks[sel], probs), step, dataformats="HWC")
            tqdm.write(f"step {step}: loss {history[-1]['loss']:.4f}  val DSC (reference protocol, logged only) {mean:.4f}  "
                       f"min {min(scores.values()):.3f}  {elapsed / 60:.1f} min")
            ck = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                  "numpy_rng": np_rng.bit_generator.state, "torch_gen": gen.get_state(), "torch_rng": torch.get_rng_state(),
                  "step": step, "elapsed_s": elapsed, "history": history, "architecture": arch}
            with atomic_file(ckpt_path) as tmp:
                torch.save(ck, tmp)
            write_json_atomic(out / "history.json", history)
            if args.stop_after and args.stop_after <= step < args.steps:
                break
    bar.close()
    writer.close()
    if step < args.steps:
        print(f"stopped at step {step} of {args.steps}; continue with --resume", flush=True)
        return 0
    model = model.to(memory_format=torch.contiguous_format)  # shipped weights in the layout every exporter expects
    torch.save({"architecture": arch, "state_dict": model.state_dict()}, out / "final_weights.pt")
    if args.average_init is not None:
        from segengine.train.soup import average_with_start

        average_with_start(out, args.average_init)
        print(f"averaged with {args.init_from} ({1 - args.average_init:g} / {args.average_init:g})", flush=True)
    print(f"done: {step} steps in {elapsed / 60:.1f} min -> {out / 'final_weights.pt'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
