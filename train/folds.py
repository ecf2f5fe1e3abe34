"""Patient-level cross-validation folds: one rule, fixed by a seed, written to files.

The folds split ``splits/train.txt`` (90 patients) into ``n`` groups of patients; a slice
never lands in a different fold from its patient. The files under ``train/folds/`` are
the record: training and scoring read them, and a re-generation that disagrees with
them (a changed train list or rule) is refused instead of silently moving patients.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from segengine.engine.core.errors import FoldError
from segengine.engine.readers.volume import read_patient_list

FOLDS_DIR = Path(__file__).resolve().parent / "folds"
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lgg"  # ../shared beside the checkout
DEFAULT_FOLD_SEED = 0


def make_folds(patients: list[str], n_folds: int, seed: int = DEFAULT_FOLD_SEED) -> list[list[str]]:
    """Shuffle the sorted ids with ``seed`` and deal them out round-robin (sizes differ by <= 1).

    Dealing by institution first (the TCGA site code, e.g. CS/DU/HT) keeps every site in
    every fold, so no fold is scored on a scanner the model has never seen.
    """
    if not 2 <= n_folds <= len(patients):
        raise FoldError(f"--folds {n_folds}: need 2 <= folds <= {len(patients)} patients")
    rng = np.random.default_rng(seed)
    order = [patients[i] for i in rng.permutation(len(patients))] if patients else []
    site = lambda p: p.split("_")[1] if p.count("_") >= 2 else ""  # noqa: E731
    order.sort(key=site)  # stable: shuffled within each site
    folds: list[list[str]] = [[] for _ in range(n_folds)]
    for i, p in enumerate(order):
        folds[i % n_folds].append(p)
    return [sorted(f) for f in folds]


def splits_dir(data: str | os.PathLike) -> Path:
    """The split lists of a dataset root: its own ``splits/`` or, for an unpacked Kaggle layout, the shared data's."""
    own = Path(data) / "splits"
    return own if own.is_dir() else DEFAULT_DATA / "splits"


def fold_dir(n_folds: int, seed: int = DEFAULT_FOLD_SEED, root: Path | None = None) -> Path:
    return (root or FOLDS_DIR) / f"cv{n_folds}_seed{seed}"


def load_or_write_folds(train_list: str | os.PathLike, n_folds: int, seed: int = DEFAULT_FOLD_SEED,
                        root: Path | None = None) -> list[list[str]]:
    """The held-out patients of every fold: read from ``root`` or written there once."""
    patients = sorted(read_patient_list(train_list))
    folds = make_folds(patients, n_folds, seed)
    d = fold_dir(n_folds, seed, root)
    files = [d / f"fold{k}.txt" for k in range(n_folds)]
    if all(f.exists() for f in files):
        stored = [sorted(read_patient_list(f)) for f in files]
        if stored != folds:
            raise FoldError(f"{d}: fold files differ from what seed {seed} gives for {train_list}; "
                            "the train list or the fold rule changed")
        return stored
    if any(f.exists() for f in files):
        raise FoldError(f"{d}: some fold files are missing")
    d.mkdir(parents=True, exist_ok=True)
    for k, f in enumerate(files):
        f.write_text(f"# fold {k} of {n_folds} (seed {seed}): held-out patients\n" + "\n".join(folds[k]) + "\n")
    return folds


def split_for_fold(train_list: str | os.PathLike, n_folds: int, fold: int,
                   seed: int = DEFAULT_FOLD_SEED) -> tuple[list[str], list[str]]:
    """(training patients, held-out patients) of ``fold``."""
    if not 0 <= fold < n_folds:
        raise FoldError(f"--fold {fold}: must be in 0..{n_folds - 1}")
    folds = load_or_write_folds(train_list, n_folds, seed)
    held_out = folds[fold]
    train = sorted(p for k, f in enumerate(folds) if k != fold for p in f)
    return train, held_out
