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
    from segengine.engine.inference.gpu import why_no_cuda

    no_cuda = why_no_cuda()  # answered from the file system where no NVIDIA driver is loaded
    if no_cuda:
        skip_cuda = pytest.mark.skip(reason=f"needs a CUDA device: {no_cuda}")
        for item in items:
            if item.get_closest_marker("cuda"):
                item.add_marker(skip_cuda)
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


@pytest.fixture(scope="session", autouse=True)
def _backend_speed_cache(tmp_path_factory):
    """auto's measured ms/slice (engine/speed.py) go to a private folder, never the user's ~/.cache."""
    os.environ["SEGENGINE_CACHE_DIR"] = str(tmp_path_factory.mktemp("speed-cache"))


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


def save_random_model(folder: Path, name: str, arch: dict, **card) -> Path:
    """Seeded random weights of ``arch`` saved as ``folder/name.pt`` with a valid card (``card``:
    more card fields, e.g. input_size, context_slices); returns the weights path."""
    import torch

    from segengine.engine.model.spec import sha256_file
    from segengine.engine.model.network import build_model

    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"{name}.pt"
    torch.manual_seed(0)
    torch.save({"architecture": arch, "state_dict": build_model(arch).state_dict()}, weights)
    card = {"name": name, "architecture": arch, "input_size": 256, "sha256": sha256_file(weights),
            "note": "random weights for tests", **card}
    weights.with_suffix(".json").write_text(json.dumps(card))
    return weights


@pytest.fixture(scope="session")
def random_model(tmp_path_factory) -> Path:
    """A model with seeded random weights and a valid card: for export/bench mechanics,
    where what is measured does not depend on what the weights learned."""
    arch = {"name": "resunet", "base_channels": 16, "deep_supervision": False}
    return save_random_model(tmp_path_factory.mktemp("random-model"), "resunet16", arch)


CONTEXT_SLICES = 1  # the 2.5D test model: each slice with one neighbour on each side, 9 channels
CONTEXT_SIZE = 64


@pytest.fixture(scope="session")
def context_model(tmp_path_factory) -> Path:
    """A tiny 2.5D model (seeded random weights, 9 input channels, 64 x 64 grid) with a valid card."""
    from segengine.engine.model.spec import input_channels

    arch = {"name": "resunet", "base_channels": 4, "in_channels": input_channels(CONTEXT_SLICES), "deep_supervision": False}
    return save_random_model(tmp_path_factory.mktemp("context-model"), "ctx", arch, input_size=CONTEXT_SIZE,
                             context_slices=CONTEXT_SLICES)


@pytest.fixture(scope="session")
def lgg_root() -> Path:
    """The shared dataset as the engine reads it (lossless WebP/PNG, one folder a patient)."""
    root = SHARED / "data" / "lgg"
    if not (root / TRAIN_PATIENT).is_dir():
        if running_in_ci():
            pytest.fail(f"shared data not found at {root}: CI needs ../shared beside the clone")
        pytest.skip(f"shared data not found at {root}")
    return root


def mask_agreement_with_torch(spec, backend: str, folder: Path) -> tuple[int, float]:
    """(torch's tumor pixels, Dice of ``backend``'s grid masks with torch's) on one real patient:
    an export's verdict re-earned in the test instead of read back from its sidecar."""
    from segengine.engine.inference import registry
    from segengine.engine.inference.predict import model_input
    from segengine.engine.preprocessing.preprocess import preprocess_patient
    from segengine.engine.readers.registry import read_patient

    x = model_input(preprocess_patient(read_patient(folder), "native", spec.preprocessing), spec)
    with registry.create("torch", spec, threads=1) as ref, registry.create(backend, spec, threads=1) as other:
        a, b = ref.predict(x) > 0.5, other.predict(x) > 0.5
    return int(a.sum()), float(2 * (a & b).sum() / (a.sum() + b.sum()))
