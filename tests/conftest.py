"""Shared fixtures: a few real patients unpacked from ../shared in the Kaggle layout."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
UNPACK = SHARED / "data" / "unpack_lgg.py"
SPLITS = SHARED / "data" / "lgg" / "splits"
# Two reference-validation patients (one with a small tumor that stresses post-processing)
# and one training patient.
VAL_PATIENTS = ["TCGA_CS_6668_20011025", "TCGA_DU_7014_19860618"]
TRAIN_PATIENT = "TCGA_CS_4941_19960909"


def running_in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def pytest_collection_modifyitems(config, items):
    try:
        import tensorrt  # noqa: F401
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with TensorRT; none here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def kaggle_root(tmp_path_factory) -> Path:
    """DEST/kaggle_3m with three real patients as uncompressed .tif (what users have)."""
    if not UNPACK.exists():
        if running_in_ci():  # CI must run the real-data suite, not report it as skipped
            pytest.fail(f"shared data not found at {UNPACK}: CI needs ../shared beside the clone")
        pytest.skip(f"shared data not found at {UNPACK}")
    dest = tmp_path_factory.mktemp("lgg")
    subprocess.run([sys.executable, str(UNPACK), str(dest), "--patients", ",".join(VAL_PATIENTS + [TRAIN_PATIENT])],
                   check=True, capture_output=True)
    return dest / "kaggle_3m"


@pytest.fixture(scope="session")
def val_patients_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("lists") / "val.txt"
    p.write_text("\n".join(VAL_PATIENTS) + "\n")
    return p


@pytest.fixture()
def patient_copy(kaggle_root, tmp_path) -> Path:
    """A private copy of one validation patient, free to damage."""
    dst = tmp_path / "in" / VAL_PATIENTS[0]
    shutil.copytree(kaggle_root / VAL_PATIENTS[0], dst)
    return dst


def tree_hashes(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``folder`` (symlinks followed): to prove inputs untouched."""
    import hashlib

    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def copy_model(weights: Path, folder: Path, exports: bool = False) -> Path:
    """Copy a model's weights and card (and with ``exports`` its ONNX files and sidecars)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = weights.parent.glob(weights.stem + ".*") if exports else (weights, weights.with_suffix(".json"))
    for f in files:
        shutil.copy(f, folder / f.name)
    return folder / weights.name


@pytest.fixture(scope="session")
def random_model(tmp_path_factory) -> Path:
    """A model with seeded random weights and a valid card: for export/bench mechanics,
    where what is measured does not depend on what the weights learned."""
    import torch

    from segengine.engine.model import sha256_file
    from segengine.engine.network import ResUNet

    folder = tmp_path_factory.mktemp("random-model")
    weights = folder / "resunet16.pt"
    arch = {"name": "resunet", "base_channels": 16, "deep_supervision": False}
    torch.manual_seed(0)
    torch.save({"architecture": arch, "state_dict": ResUNet(base_channels=16, deep_supervision=False).state_dict()}, weights)
    card = {"name": "resunet16", "architecture": arch, "input_size": 256, "sha256": sha256_file(weights),
            "note": "random weights for tests"}
    weights.with_suffix(".json").write_text(json.dumps(card))
    return weights
