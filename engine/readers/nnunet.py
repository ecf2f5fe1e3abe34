"""nnU-Net channel naming: ``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``, ...

A case is a folder holding one case's channel files, or, in a flat folder of several cases
(nnU-Net's ``imagesTs/``), the case's ``<case>_0000`` file: ``--patient imagesTs/a_0000.nii.gz``,
and ``--patients imagesTs`` lists one patient per case.

The channel order comes from a ``dataset.json`` beside the files (in the case folder, or the
folder or dataset folder above it: ``channel_names`` of nnU-Net v2 or ``modality`` of v1),
otherwise the Kaggle order (0000 pre-contrast, 0001 FLAIR, 0002 post-contrast). The files
are then read by readers.nifti as a three-file case. A case in a flat ``imagesTs/`` (or ``imagesTr/``) with
``labelsTs/<case>.nii.gz`` beside it gets that label as its ground truth; a dataset folder holding
``imagesTs/`` stands for its test cases (:func:`images_folder`).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from segengine.engine.core.errors import DataError, NnunetError
from segengine.engine.core.fsguard import read_regular

CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})\.nii(?:\.gz)?$", re.IGNORECASE)


KAGGLE_ORDER = {0: "pre", 1: "flair", 2: "post"}


DATASET_JSON = "dataset.json"


# nnU-Net's dataset.json is a few KB (v1's lists every training case: ~100 bytes each); read with this cap,
# never whole: a 2 GB file is refused before it is read, a deeply nested one is refused, not a traceback
DATASET_JSON_MAX_BYTES = 16 << 20


# after spaces, '-' and '_' are removed: "T1 pre-contrast" -> "t1precontrast"
PRE_CONTRAST = re.compile(r"pre|native|noncontrast|non|without|^t1n")  # checked first: they contain "contrast"


POST_CONTRAST = re.compile(r"gd|gad|(?<![a-z])ce|t1c|post|contrast|\+c")  # "ce" not inside a word ("T1_SPACE")


def role_of(name: str) -> str | None:
    """A channel name of dataset.json as "flair", "pre", "post", or None (T2, DWI, ...)."""
    n = name.strip().lower().replace(" ", "").replace("-", "").replace("_", "")
    if "flair" in n and not n.startswith("t1") or n == "t2f":
        return "flair"
    if n.startswith("t1") or "mprage" in n:
        if PRE_CONTRAST.search(n):
            return "pre"
        words = re.split(r"[\s_-]+", name.strip().lower())
        return "post" if POST_CONTRAST.search(n) or "ce" in words else "pre"  # "T1w_ce"
    return None


def dataset_json(folder: Path) -> Path | None:
    """The nearest dataset.json: in the case folder, its parent (imagesTs/) or the dataset folder above."""
    for d in (folder, folder.parent, folder.parent.parent):
        p = d / DATASET_JSON
        if p.is_file():
            return p
    return None


def channel_roles(folder: Path) -> tuple[dict[int, str], Path | None]:
    """{channel: role} from dataset.json, or the Kaggle order without one."""
    path = dataset_json(folder)
    if path is None:
        return dict(KAGGLE_ORDER), None
    try:
        meta = json.loads(read_regular(path, DATASET_JSON, DATASET_JSON_MAX_BYTES))
        names = meta.get("channel_names") or meta.get("modality")
        channels = {int(k): str(v) for k, v in names.items()}
    except RecursionError:
        raise NnunetError(f"{path}: not a dataset.json (nested too deeply to read)") from None
    except DataError as exc:  # not a regular file, or larger than the cap
        raise NnunetError(str(exc)) from None
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        raise NnunetError(f"{path}: not a dataset.json with channel_names (or modality) ({exc})") from None
    roles: dict[int, str] = {}
    for ch, name in sorted(channels.items()):
        role = role_of(name)
        if role is None:
            continue
        if role in roles.values():
            raise NnunetError(f"{path}: two channels are {role} ({channels})")
        roles[ch] = role
    if "flair" not in roles.values():
        raise NnunetError(f"{path}: no FLAIR channel among {channels} (FLAIR is required)")
    return roles, path


def is_nnunet_name(name: str) -> bool:
    return bool(CHANNEL_FILE.match(name))


IMAGES_TS, LABELS_TS = "imagesTs", "labelsTs"


def images_folder(root: Path) -> Path | None:
    """The ``imagesTs/`` of an nnU-Net dataset folder (``DatasetXXX/imagesTs``, ``labelsTs``, ``dataset.json``),
    or None: ``--patients DatasetXXX`` segments its test cases, as ``nnUNetv2_predict -i imagesTs`` does."""
    images = root / IMAGES_TS
    return images if images.is_dir() and not images.is_symlink() else None


def label_file(folder: Path, case: str) -> Path | None:
    """A case's ground truth ``labelsXx/<case>.nii[.gz]`` beside the flat ``imagesXx/`` folder that holds
    its channel files (nnU-Net's layout: labelsTs beside imagesTs), or None."""
    if not folder.name.startswith("images") or len(folder.name) <= len("images"):
        return None
    labels = folder.parent / ("labels" + folder.name[len("images"):])
    for ending in (".nii.gz", ".nii"):
        path = labels / f"{case}{ending}"
        if path.is_file():
            return path
    return None


def _cases(folder: Path) -> dict[str, dict[int, Path]]:
    """{case: {channel: file}} of the nnU-Net-named regular files in ``folder``."""
    cases: dict[str, dict[int, Path]] = {}
    for entry in sorted(folder.iterdir()):
        m = CHANNEL_FILE.match(entry.name)
        if m and entry.is_file():
            cases.setdefault(m.group("case"), {})[int(m.group("channel"))] = entry
    return cases


def case_of_file(path: Path) -> str | None:
    """The case a ``<case>_0000.nii[.gz]`` file stands for in a flat folder (the file has channel
    siblings), or None: a lone file, even named like a channel, is an ordinary NIfTI case."""
    m = CHANNEL_FILE.match(path.name)
    if not m or not path.is_file() or int(m.group("channel")) != 0:
        return None
    siblings = [e for e in path.parent.iterdir() if (mm := CHANNEL_FILE.match(e.name)) and mm.group("case") == m.group("case")]
    return m.group("case") if len(siblings) > 1 else None


def other_channel_files(folder: Path) -> set[Path]:
    """The channel files of a flat folder that are not a case's ``_0000`` file (not patients of their own)."""
    return {f for files in _cases(folder).values() if 0 in files and len(files) > 1 for ch, f in files.items() if ch}


def channel_files(folder: Path, case: str | None = None) -> dict[str, Path]:
    """``{"pre"|"flair"|"post": path}`` of the nnU-Net files of a case folder, or of ``case`` in a flat folder."""
    cases = _cases(folder)
    if case is not None:
        cases = {case: cases.get(case, {})}
    if not cases:
        return {}
    if len(cases) > 1:
        shown = ", ".join(sorted(cases)[:5]) + (", ..." if len(cases) > 5 else "")
        first = sorted(cases)[0]
        raise NnunetError(f"{folder}: several nnU-Net cases ({shown}); give one case (--patient "
                          f"{folder / (first + '_0000.nii.gz')}) or the folder with --patients")
    (files,) = cases.values()
    roles, source = channel_roles(folder)
    found: dict[str, Path] = {}
    for ch, path in sorted(files.items()):
        if ch in roles:
            found[roles[ch]] = path
        elif source is None:
            raise NnunetError(f"{path}: channel {ch:04d} has no role in the Kaggle order (0000 pre-contrast, "
                              "0001 FLAIR, 0002 post-contrast); add a dataset.json with channel_names")
    label = label_file(folder, next(iter(cases)))
    if label is not None:  # labelsTs/<case>.nii.gz: the case is scored (report.json's metrics)
        found["mask"] = label
    return found
