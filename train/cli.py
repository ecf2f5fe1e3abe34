"""`segengine train` and `segengine cv` as Click commands: every option documented in --help.

Click checks and documents the options; the arguments, exactly as given, then go to the parser of
record, ``train/train.py``'s ``main(argv)`` (what ``python -m segengine.train.train`` runs) or
``train/cv.py``'s. The option lists here mirror those parsers (a test holds them equal: a training
option added there must be added here too). Only click is imported: ``--help`` stays instant.
"""
from __future__ import annotations

import sys

import click

from segengine.engine.core.cli_sections import ARGV_KEY, ForwardingCommand

# the defaults of train/train.py (DEFAULT_LR, PLANS), written out so --help does not import torch
DEFAULT_LR = 3e-3
PLANS = ("v1", "v2")
# the robust augmentations of train/robust_aug.py: --NAME-p P, the share of slices given each
ROBUST_AUGS = (("brightness", "each modality multiplied by 0.75-1.25"),
               ("noise", "Gaussian noise of variance up to 0.1"),
               ("blur", "one modality blurred, sigma 0.5-1.0"),
               ("dark-channel", "one modality re-quantized to 6-20 grey levels (a very dark scan, normalized)"),
               ("swap-contrast", "two modalities swapped (contrast that looks swapped)"),
               ("gamma", "gamma 0.7-1.5 on each modality (nnU-Net's range)"),
               ("bias-field", "a smooth multiplicative bias field (up to +-30 percent) on each modality"))

SHARE = click.FloatRange(0, 1)
COUNT = click.IntRange(min=0)
POSITIVE = click.IntRange(min=1)

TRAIN_SECTIONS = {
    "Data": ("--data", "--train-list", "--val-list", "--folds", "--fold", "--fold-seed", "--plan", "--cache-dir"),
    "Network": ("--arch", "--base-channels", "--no-deep-supervision", "--refine-channels", "--context-slices"),
    "Augmentation": ("--intensity-aug", "--flair-copy-p", "--crop", "--tumor-sampling",
                     *(f"--{name}-p" for name, _ in ROBUST_AUGS)),
    "Optimisation": ("--loss", "--tversky-alpha", "--tversky-beta", "--steps", "--batch-size", "--lr",
                     "--weight-decay", "--amp", "--seed", "--init-from", "--average-init"),
    "Run": ("--out", "--epoch-steps", "--stop-after", "--resume", "--threads"),
}


def _robust_aug_options(fn):
    for name, what in reversed(ROBUST_AUGS):
        fn = click.option(f"--{name}-p", type=SHARE, default=0.0, show_default=True, metavar="P",
                          help=f"share of slices with {what} (train/robust_aug.py; 0: off)")(fn)
    return fn


@click.command(cls=ForwardingCommand, sections=TRAIN_SECTIONS, context_settings={"show_default": True})
@click.option("--data", required=True, metavar="ROOT",
              help="dataset root: folders of <patient>_<n>.{tif,png,webp} slices with their _mask files")
@click.option("--train-list", default=None, metavar="FILE",
              help="patients to train on, one id per line (default: splits/train.txt beside --data)")
@click.option("--val-list", default=None, metavar="FILE",
              help="patients whose DSC is logged, never used to choose a checkpoint "
                   "(default: splits/reference_validation.txt)")
@click.option("--out", required=True, metavar="RUN",
              help="run folder: last.pt (checkpoint), history.json, config.json, TensorBoard logs, final_weights.pt")
@click.option("--folds", type=COUNT, default=0,
              help="patient-level cross-validation: split the train list into FOLDS (files in train/folds/); "
                   "0: no folds")
@click.option("--fold", type=COUNT, default=None, metavar="K",
              help="with --folds: train on the other folds; fold K's held-out patients are the logged validation")
@click.option("--fold-seed", type=int, default=0, help="seed of the fold split")
@click.option("--arch", type=click.Choice(["resunet", "reference_unet"]), default="resunet",
              help="network: resunet (segengine's residual U-Net) or reference_unet (the course's U-Net)")
@click.option("--base-channels", type=POSITIVE, default=16, help="channels of the first level (doubled per level)")
@click.option("--no-deep-supervision", is_flag=True,
              help="resunet: no auxiliary losses on the coarse decoder levels")
@click.option("--refine-channels", type=COUNT, default=0,
              help="width of the full-resolution refinement branch (0: none; resunet only)")
@click.option("--intensity-aug", is_flag=True,
              help="add per-channel gamma (0.7-1.5) and contrast (0.75-1.25) to the augmentation")
@click.option("--context-slices", type=COUNT, default=0, metavar="K",
              help="2.5D input: K neighbouring slices on each side as extra channels (3 * (2K + 1) inputs)")
@click.option("--loss", type=click.Choice(["dice_bce", "tversky_bce"]), default="dice_bce",
              help="dice_bce: BCE + batch soft Dice; tversky_bce: BCE + MONAI's Tversky loss, which weighs "
                   "missed tumor (beta) over false tumor (alpha)")
@click.option("--tversky-alpha", type=float, default=0.3, help="with --loss tversky_bce: weight of false tumor")
@click.option("--tversky-beta", type=float, default=0.7, help="with --loss tversky_bce: weight of missed tumor")
@click.option("--flair-copy-p", type=SHARE, default=0.0, metavar="P",
              help="share of slices whose pre- and post-contrast channels are replaced by FLAIR, as some "
                   "patients arrive (their missing sequences filled with FLAIR copies)")
@_robust_aug_options
@click.option("--plan", type=click.Choice(PLANS), default="v1",
              help="preprocessing plan: v1 = the course's (threshold at 10% of the maximum), v2 = head mask "
                   "and z-score per sequence from robust statistics (engine/preprocessing/head.py)")
@click.option("--amp", type=click.Choice(["none", "bf16"]), default="none",
              help="bf16: bfloat16 autocast and channels-last memory, ~2.3x faster on CPUs with AMX/AVX-512 "
                   "BF16; weights stay float32")
@click.option("--steps", type=POSITIVE, default=5000, help="optimizer steps in all (the one-cycle schedule's length)")
@click.option("--epoch-steps", type=POSITIVE, default=250,
              help="steps between checkpoints and validation DSC logs")
@click.option("--batch-size", type=POSITIVE, default=16, help="slices per optimizer step")
@click.option("--lr", type=float, default=DEFAULT_LR, help="peak learning rate of the one-cycle schedule (AdamW)")
@click.option("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
@click.option("--tumor-sampling", type=SHARE, default=0.5,
              help="share of draws weighted by tumor area (the rest uniform over slices)")
@click.option("--crop", type=COUNT, default=0,
              help="train on random CROPxCROP windows of the augmented 256 slices (0: whole slices); "
                   "the network is fully convolutional, so it still runs on whole slices")
@click.option("--seed", type=int, default=42, help="seed of the weights, the sampling and the augmentation")
@click.option("--threads", type=POSITIVE, default=2, help="PyTorch intra-op threads")
@click.option("--resume", is_flag=True, help="continue exactly from OUT/last.pt (weights, optimizer, schedule, RNGs)")
@click.option("--init-from", default=None, metavar="PT",
              help="start from these weights (a shipped model's .pt) instead of random ones: fine-tuning; "
                   "the deep-supervision heads that shipped models drop start fresh")
@click.option("--average-init", type=float, default=None, metavar="W",
              help="with --init-from: the final weights are (1 - W) x the start + W x the trained ones "
                   "(train/soup.py; v3 uses 0.5)")
@click.option("--stop-after", type=COUNT, default=0, metavar="STEP",
              help="exit after checkpointing at this step (a multiple of --epoch-steps) to split a run "
                   "across sessions; --resume continues it exactly (0: run to --steps)")
@click.option("--cache-dir", default=".cache", metavar="DIR",
              help="where the decoded, preprocessed training volumes are cached between runs")
@click.pass_context
def train(ctx: click.Context, **_options) -> None:
    """Train a model on the CPU: resumable, deterministic given a seed, logged.

    \b
    Checkpoints (OUT/last.pt, every --epoch-steps) hold the model, optimizer, schedule and every
    random state, so a run resumed with --resume continues exactly. The model is the last step's:
    checkpoints are never chosen on the validation patients, whose DSC is only logged.
    Bad input (a patient list missing, not a regular file, or naming absent patients) is one line, exit 2.

    \b
    Examples:
      segengine train --data ../shared/data/lgg --out runs/resunet16 --steps 4000
      segengine train --data ../shared/data/lgg --out runs/ft --init-from models/resunet16.pt --steps 2000 \\
        --lr 0.001 --average-init 0.5 --flair-copy-p 0.15
      segengine train --data ../shared/data/lgg --out runs/a1 --stop-after 1000 ...   (then the same with --resume)
    """
    from segengine.train.train import main as train_main

    sys.exit(train_main(ctx.meta[ARGV_KEY]))


# ------------------------------------------------------------------ cv
CV_COMMANDS = {  # name: what it does (each parses its own options: segengine cv NAME --help)
    "compare": "paired per-patient comparison of two CV runs (bootstrap CI, better/worse counts)",
    "rescore": "score a shipped fold ensemble's members out of fold, without training",
    "thresholds": "native out-of-fold DSC at each probability threshold, from the stored probabilities",
    "component-rule": "fit and record the component-selection rule on out-of-fold probabilities",
    "calibrate-review": "fit the quality estimate (review flag) on out-of-fold results; write it into a card",
    "worst": "contact sheets of the worst out-of-fold patients",
    "flair-only": "a fold's DSC with FLAIR in all three channels (how much the model leans on the others)",
}

CV_SECTIONS = {
    "Folds": ("--data", "--out", "--folds", "--fold-seed", "--only", "--score-only", "--threads"),
    "Results": ("--record", "--card", "--ship-ensemble", "--models-dir"),
}


def _fold_list(value: str | None) -> str | None:
    """--only K,...: fold numbers, checked (the value itself goes on to train/cv.py as given)."""
    if value is not None and not all(k.strip().isdigit() for k in value.split(",")):
        raise click.BadParameter(f"{value!r}: expected fold numbers like 0 or 0,1")
    return value


class CvCommand(ForwardingCommand):
    """`segengine cv [OPTIONS] [-- TRAINING OPTIONS]`, or `segengine cv COMMAND ...`: a first
    argument naming one of CV_COMMANDS goes, with the rest, to train/cv.py's parser of that command."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] in CV_COMMANDS:
            ctx.meta[ARGV_KEY] = list(args)
            return []
        if args and not args[0].startswith("-"):
            ctx.fail(f"no cv command {args[0]!r} (commands: {', '.join(CV_COMMANDS)}; or options, "
                     "then -- and the training options)")
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        argv = ctx.meta[ARGV_KEY]
        if argv and argv[0] in CV_COMMANDS:
            from segengine.train.cv import main as cv_main

            sys.exit(cv_main(argv))
        return super().invoke(ctx)

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        return ["[OPTIONS] [-- TRAINING OPTIONS]"]

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_help(ctx, formatter)
        formatter.write_paragraph()
        formatter.write_text(f"Or: {ctx.command_path} COMMAND [ARGS]... ({ctx.command_path} COMMAND --help "
                             "lists its options)")
        with formatter.section("Commands"):
            formatter.write_dl(list(CV_COMMANDS.items()))


@click.command(cls=CvCommand, sections=CV_SECTIONS,
               context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "show_default": True})
@click.option("--data", default=None, metavar="ROOT",
              help="dataset root with splits/train.txt (default: ../shared/data/lgg beside the checkout)")
@click.option("--out", required=True, metavar="RUN", help="CV run folder: fold0..foldN-1 (each a training run), cv.json")
@click.option("--folds", type=int, default=5, help="number of patient folds of splits/train.txt (2 or more)")
@click.option("--fold-seed", type=int, default=0, help="seed of the fold split (train/folds/cv<N>_seed<S>/)")
@click.option("--only", default=None, metavar="K,...", callback=lambda ctx, param, value: _fold_list(value),
              help="comma list of the folds to train and score (screening: 0 or 0,1; default: every fold)")
@click.option("--score-only", is_flag=True, help="score the finished folds; train nothing")
@click.option("--threads", type=POSITIVE, default=None,
              help="scoring threads (training's are a training option: after --, --threads N)")
@click.option("--record", default=None, metavar="JSON", help="also write the aggregate here (e.g. docs/cv/a1.json)")
@click.option("--card", default=None, metavar="JSON",
              help="write the recipe's CV summary into this model card (a model trained with the same recipe)")
@click.option("--ship-ensemble", default=None, metavar="NAME",
              help="after scoring every fold: copy the fold models to --models-dir as NAME_foldK.pt "
                   "beside NAME.ensemble.json (the --ensemble accurate mode)")
@click.option("--models-dir", default="models", metavar="DIR", help="where --ship-ensemble writes")
@click.pass_context
def cv(ctx: click.Context, **_options) -> None:
    """Cross-validate a training recipe: train (or resume) every fold, score its held-out patients.

    \b
    Each fold trains as `segengine train --folds N --fold K` with the training options given
    after -- (`segengine train --help` lists them; training options cv does not know also pass
    without the --); "{fold}" in them names the fold (--init-from m_fold{fold}.pt). An
    interrupted fold resumes from its checkpoint. A finished fold is shipped like a release
    model and scored with the engine's own pipeline on its held-out patients, both protocols
    and each post-processing variant, so recipes compare patient by patient (cv compare).

    \b
    Examples:
      segengine cv --out runs/cv/a1 --folds 5 --record docs/cv/a1.json -- --steps 4000
      segengine cv --out runs/cv/a1 --folds 5 --only 0,1 --score-only
      segengine cv compare runs/cv/a1 runs/cv/b1 --by-kind
      segengine cv rescore models/resunet16v4_folds.ensemble.json --out runs/cv/v4_rescore
    """
    from segengine.train.cv import main as cv_main

    sys.exit(cv_main(ctx.meta[ARGV_KEY]))
