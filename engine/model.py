"""Model files and their cards: find the shipped model, verify checksums, refuse stale exports.

A model is a PyTorch weights file ``<name>.pt`` with a card ``<name>.json`` beside it
(architecture, training split, DSC, SHA-256 of the weights). Exports live beside it as
``<name>.onnx`` / ``<name>.int8.onnx`` / ``<name>.fp16.onnx`` / ``<name>.fp16.plan``, each with a sidecar
``<file>.json`` naming the SHA-256 of the weights it came from.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHIPPED_MODEL_NAME = "resunet16"
# export kind -> file suffix beside the weights (every kind has a sidecar ``<file>.json``)
EXPORT_SUFFIXES = {"onnx": ".onnx", "onnx-int8": ".int8.onnx", "onnx-fp16": ".fp16.onnx", "tensorrt-fp16": ".fp16.plan"}


class ModelError(ValueError):
    """A model file is missing, corrupt, or does not match its card; one-line message."""


def shipped_model_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "models"


def shipped_model_path() -> Path:
    return shipped_model_dir() / f"{SHIPPED_MODEL_NAME}.pt"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def card_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def sidecar_path(export_file: Path) -> Path:
    return export_file.with_name(export_file.name + ".json")


@dataclass
class ModelSpec:
    """A verified model: its weights file, card, and the exports found beside it."""

    weights: Path
    card: dict[str, Any]
    sha256: str
    exports: dict[str, Path] = field(default_factory=dict)  # export kind (EXPORT_SUFFIXES) -> path

    @property
    def name(self) -> str:
        return self.weights.stem

    @property
    def input_size(self) -> int:
        return int(self.card.get("input_size", 256))

    @property
    def context_slices(self) -> int:
        """Neighbouring slices on each side fed as extra channels (0: plain 2D slices)."""
        return int(self.card.get("context_slices", 0))

    @property
    def architecture(self) -> dict[str, Any]:
        return dict(self.card["architecture"])

    def export_path(self, kind: str) -> Path:
        return self.weights.with_name(self.name + EXPORT_SUFFIXES[kind])

    def sidecar(self, kind: str) -> dict[str, Any] | None:
        p = sidecar_path(self.export_path(kind))
        if not p.exists():
            return None
        return json.loads(p.read_text())


def load_model_spec(path: str | os.PathLike | None = None, verify: bool = True) -> ModelSpec:
    """Resolve a weights file (default: the shipped model), read its card, verify the SHA-256."""
    weights = Path(path) if path is not None else shipped_model_path()
    if weights.is_dir():
        candidates = sorted(weights.glob("*.pt"))
        if len(candidates) != 1:
            raise ModelError(f"{weights}: expected exactly one .pt model file in the folder, found {len(candidates)}")
        weights = candidates[0]
    if not weights.exists():
        raise ModelError(f"{weights}: model file not found")
    cp = card_path(weights)
    if not cp.exists():
        raise ModelError(f"{weights}: no model card {cp.name} beside it")
    try:
        card = json.loads(cp.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{cp}: unreadable model card ({exc})") from None
    if "architecture" not in card or "sha256" not in card:
        raise ModelError(f"{cp}: model card lacks 'architecture' or 'sha256'")
    digest = sha256_file(weights)
    if verify and digest != card["sha256"]:
        raise ModelError(f"{weights}: SHA-256 {digest[:12]}... does not match its card ({card['sha256'][:12]}...): "
                         "corrupt or replaced model file")
    spec = ModelSpec(weights=weights, card=card, sha256=digest)
    for kind in EXPORT_SUFFIXES:
        if spec.export_path(kind).exists():
            spec.exports[kind] = spec.export_path(kind)
    return spec


def check_export(spec: ModelSpec, kind: str) -> Path:
    """The export file of ``kind`` for this model, refusing a missing, stale or corrupt one."""
    path = spec.export_path(kind)
    if not path.exists():
        raise ModelError(f"{path}: no {kind} export of {spec.weights.name}; run `segengine export --model {spec.weights}`")
    side = spec.sidecar(kind)
    if side is None:
        raise ModelError(f"{path}: no sidecar {sidecar_path(path).name}; re-export")
    if side.get("source_sha256") != spec.sha256:
        raise ModelError(f"{path}: stale export (made from weights {str(side.get('source_sha256'))[:12]}..., "
                         f"model is {spec.sha256[:12]}...); re-export")
    if side.get("sha256") and side["sha256"] != sha256_file(path):
        raise ModelError(f"{path}: SHA-256 does not match its sidecar: corrupt export file")
    return path


def load_torch_model(spec: ModelSpec):
    """Build the network and load its weights (``weights_only=True``), eval mode."""
    import torch

    from segengine.engine.network import build_model

    try:
        payload = torch.load(spec.weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types on bad files
        raise ModelError(f"{spec.weights}: not a loadable PyTorch weights file ({str(exc).splitlines()[0][:120]})") from None
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else None
    if not isinstance(state, dict):
        raise ModelError(f"{spec.weights}: no state_dict inside")
    arch = spec.architecture
    if arch.get("name") == "resunet":
        arch["deep_supervision"] = any(k.startswith("aux_heads") for k in state)
    model = build_model(arch)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"{spec.weights}: weights do not fit architecture {arch} ({str(exc).splitlines()[0][:120]})") from None
    return model.eval()
