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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segengine.engine.core.errors import ModelError
from segengine.engine.preprocessing.plan import PreprocessingPlan

SHIPPED_MODEL_NAME = "resunet16"


# export kind -> file suffix beside the weights (every kind has a sidecar ``<file>.json``)
EXPORT_SUFFIXES = {"onnx": ".onnx", "onnx-int8": ".int8.onnx", "onnx-fp16": ".fp16.onnx", "tensorrt-fp16": ".fp16.plan"}


# What a card may say, checked before anything is built or allocated: (type, low, high) per
# field; architectures list every keyword their constructor takes (network.ARCHITECTURES).
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


MAX_CONTEXT_SLICES = 8  # 2.5D: neighbouring slices on each side fed as channels


SLICE_CHANNELS = 3  # one slice's modalities: pre-contrast, FLAIR, post-contrast


def input_channels(context_slices: int) -> int:
    """Channels a network takes: the modalities of a slice and of its ``context_slices`` neighbours
    on each side (``preprocess.stack_context``); the one rule cards, exports and backends follow."""
    return SLICE_CHANNELS * (2 * context_slices + 1)


ARCHITECTURE_FIELDS: dict[str, dict[str, tuple]] = {
    "resunet": {"in_channels": (int, 3, input_channels(MAX_CONTEXT_SLICES)), "base_channels": (int, 1, 256), "depth": (int, 1, 6),
                "stem_stride": (int, 1, 4), "deep_supervision": (bool,), "refine_channels": (int, 0, 256)},
    "reference_unet": {"in_channels": (int, 3, 3), "base_channels": (int, 1, 256)},
}


CARD_FIELDS = {"input_size": (int, 32, 1024), "context_slices": (int, 0, MAX_CONTEXT_SLICES), "flops_per_slice": (int, 0, 10**15), "params": (int, 0, 10**10)}


SIDECAR_FIELDS = {"input_size": (int, 32, 1024), "opset": (int, 7, 100)}


VERDICT_FIELDS = {"passed": (bool,), "patients_count": (int, 0, 10**6)}


def _check_fields(where: Path, prefix: str, data: dict, fields: dict[str, tuple]) -> None:
    for key, rule in fields.items():
        if key not in data:
            continue
        value, kind = data[key], rule[0]
        ok = type(value) is kind or (kind is float and type(value) is int)  # bool is not an int here
        if not ok:
            raise ModelError(f"{where}: {prefix}{key} is {value!r} ({type(value).__name__}), expected {kind.__name__}")
        if len(rule) == 3 and not rule[1] <= value <= rule[2]:
            raise ModelError(f"{where}: {prefix}{key} = {value} is outside {rule[1]}..{rule[2]}")


def _check_sha(where: Path, key: str, value: Any, required: bool) -> None:
    if value is None and not required:
        return
    if not isinstance(value, str) or not _HEX64.match(value):
        raise ModelError(f"{where}: {key} must be a SHA-256 (64 lowercase hex digits), got {str(value)[:40]!r}")


def check_card(card: Any, where: Path) -> dict[str, Any]:
    """A model card's types and bounds (e.g. base_channels 1..256), so nothing absurd is allocated."""
    if not isinstance(card, dict):
        raise ModelError(f"{where}: model card must be a JSON object")
    if "architecture" not in card or "sha256" not in card:
        raise ModelError(f"{where}: model card lacks 'architecture' or 'sha256'")
    _check_sha(where, "sha256", card["sha256"], required=True)
    _check_fields(where, "", card, CARD_FIELDS)
    arch = card["architecture"]
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str):
        raise ModelError(f"{where}: architecture must be an object with a 'name'")
    fields = ARCHITECTURE_FIELDS.get(arch["name"])
    if fields is None:
        raise ModelError(f"{where}: unknown architecture {arch['name']!r} (known: {', '.join(ARCHITECTURE_FIELDS)})")
    unknown = sorted(set(arch) - set(fields) - {"name"})
    if unknown:
        raise ModelError(f"{where}: architecture {arch['name']} has no parameter {unknown[0]!r}")
    _check_fields(where, "architecture.", arch, fields)
    want = input_channels(card.get("context_slices", 0))
    if arch.get("in_channels", SLICE_CHANNELS) != want:
        raise ModelError(f"{where}: architecture.in_channels = {arch.get('in_channels', SLICE_CHANNELS)} does not fit "
                         f"context_slices = {card.get('context_slices', 0)} (expected {want})")
    return card


def check_sidecar(side: Any, where: Path) -> dict[str, Any]:
    """An export sidecar's types and bounds; its verdict (if any) must be well formed."""
    if not isinstance(side, dict):
        raise ModelError(f"{where}: sidecar must be a JSON object")
    _check_sha(where, "source_sha256", side.get("source_sha256"), required=True)
    # required: without the export's own hash its file could be swapped unseen (issue 30)
    _check_sha(where, "sha256", side.get("sha256"), required=True)
    _check_fields(where, "", side, SIDECAR_FIELDS)
    for key in [k for k in side if k.startswith("validation")]:  # one verdict per runtime (verdict.verdict_key)
        verdict = side[key]
        if verdict is not None:
            if not isinstance(verdict, dict):
                raise ModelError(f"{where}: {key} must be an object")
            _check_fields(where, f"{key}.", verdict, VERDICT_FIELDS)
    return side


JSON_MAX_BYTES = 16 << 20  # a card or sidecar is a few kB; a larger file is not one


def read_json(path: Path, what: str) -> Any:
    """A model card, sidecar or manifest: a regular file (never a FIFO or device: fsguard), bounded in size."""
    from segengine.engine.core.errors import NotRegularFileError
    from segengine.engine.core.fsguard import read_regular

    try:
        return json.loads(read_regular(path, what, JSON_MAX_BYTES).decode("utf-8"))
    except NotRegularFileError as exc:
        raise ModelError(str(exc)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelError(f"{path}: unreadable {what} ({(str(exc).splitlines() or [type(exc).__name__])[0][:120]})") from None


def shipped_model_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "models"  # segengine/models beside segengine/engine


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
    def preprocessing(self) -> PreprocessingPlan:
        """The plan that turns slices into this model's input (carried by the card)."""
        return PreprocessingPlan.from_card(self.card)

    @property
    def context_slices(self) -> int:
        """Neighbouring slices on each side fed as extra channels (0: plain 2D slices)."""
        return int(self.card.get("context_slices", 0))

    @property
    def in_channels(self) -> int:
        """Input channels of the network and of every export (``check_card`` holds the
        architecture's ``in_channels`` to this)."""
        return input_channels(self.context_slices)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, S, S): one item of the network's input batch."""
        return (self.in_channels, self.input_size, self.input_size)

    @property
    def architecture(self) -> dict[str, Any]:
        return dict(self.card["architecture"])

    def export_path(self, kind: str) -> Path:
        return self.weights.with_name(self.name + EXPORT_SUFFIXES[kind])

    def sidecar(self, kind: str) -> dict[str, Any] | None:
        p = sidecar_path(self.export_path(kind))
        if not p.exists():
            return None
        return check_sidecar(read_json(p, "sidecar"), p)


def _regular(path: Path, what: str) -> None:
    from segengine.engine.core.errors import NotRegularFileError
    from segengine.engine.core.fsguard import require_regular_file

    try:
        require_regular_file(path, what)
    except NotRegularFileError as exc:
        raise ModelError(str(exc)) from None


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
    _regular(weights, "model file")  # a FIFO or /dev/zero would block the checksum forever
    cp = card_path(weights)
    if not cp.exists():
        raise ModelError(f"{weights}: no model card {cp.name} beside it")
    card = check_card(read_json(cp, "model card"), cp)
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
    _regular(path, f"{kind} export")
    side = spec.sidecar(kind)
    if side is None:
        raise ModelError(f"{path}: no sidecar {sidecar_path(path).name}; re-export")
    if side.get("source_sha256") != spec.sha256:
        raise ModelError(f"{path}: stale export (made from weights {str(side.get('source_sha256'))[:12]}..., "
                         f"model is {spec.sha256[:12]}...); re-export")
    if side["sha256"] != sha256_file(path):
        raise ModelError(f"{path}: SHA-256 does not match its sidecar: corrupt export file")
    return path


def load_torch_model(spec: ModelSpec):
    """Build the network and load its weights (``weights_only=True``), eval mode."""
    import torch

    from segengine.engine.model.network import build_model

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
