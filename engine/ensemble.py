"""Accurate mode: the mean probability of several models (a fold ensemble) and/or of mirrored
slices (flip test-time augmentation), behind the same Backend interface as one model.

An ensemble is a manifest ``<name>.ensemble.json`` beside ordinary member models (each a
``.pt`` with its card and SHA-256, verified on load like any model)::

    {"name": "resunet16v2_folds", "kind": "ensemble",
     "members": ["resunet16v2_fold0.pt", ...], "review": {...}, "cross_validation": {...}}

Averaging happens on the model grid, before the result is mapped back and post-processed,
so every code path (run, Ray, bench, validate) stays the one pipeline.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segengine.engine.backends.base import Backend
from segengine.engine.model import ModelError, ModelSpec, load_model_spec, read_json, shipped_model_dir

ENSEMBLE_SUFFIX = ".ensemble.json"
MAX_MEMBERS = 16


@dataclass
class InferencePlan:
    """What a run averages: member models, optionally each with its mirrored slices too.

    Quacks like a ModelSpec where the engine reads one (name, sha256, card, input_size,
    context_slices), so reports name exactly what produced a mask.
    """

    members: list[ModelSpec]
    tta: bool
    card: dict[str, Any]
    source: Path

    @property
    def name(self) -> str:
        base = self.card.get("name") or self.members[0].name
        return base + ("+tta" if self.tta else "")

    @property
    def weights(self) -> Path:
        return self.source

    @property
    def sha256(self) -> str:
        """One digest of the members' digests, in order, and of the TTA switch."""
        text = "ensemble:" + ",".join(m.sha256 for m in self.members) + (":flip-tta" if self.tta else "")
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def input_size(self) -> int:
        return self.members[0].input_size

    @property
    def context_slices(self) -> int:
        return self.members[0].context_slices

    @property
    def in_channels(self) -> int:
        return self.members[0].in_channels

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.members[0].input_shape

    def describe(self) -> dict[str, Any]:
        """The report's record of the plan: members and their SHA-256s."""
        return {"members": [{"name": m.name, "sha256": m.sha256} for m in self.members], "flip_tta": self.tta}


def shipped_ensemble_path() -> Path:
    found = sorted(shipped_model_dir().glob("*" + ENSEMBLE_SUFFIX))
    if len(found) != 1:
        raise ModelError(f"{shipped_model_dir()}: expected one shipped *{ENSEMBLE_SUFFIX}, found {len(found)}")
    return found[0]


def load_ensemble(manifest: str | os.PathLike | None = None, tta: bool = False) -> InferencePlan:
    """Read an ensemble manifest and verify every member (card schema, SHA-256, same input)."""
    path = Path(manifest) if manifest else shipped_ensemble_path()
    if not path.is_file():
        raise ModelError(f"{path}: ensemble manifest not found")
    card = read_json(path, "ensemble manifest")
    if not isinstance(card, dict) or card.get("kind") != "ensemble":
        raise ModelError(f"{path}: not an ensemble manifest (kind must be \"ensemble\")")
    members = card.get("members")
    if not isinstance(members, list) or not 1 <= len(members) <= MAX_MEMBERS or not all(isinstance(m, str) for m in members):
        raise ModelError(f"{path}: members must be a list of 1..{MAX_MEMBERS} model file names")
    specs = []
    for member in members:
        if Path(member).name != member:  # members lie beside the manifest: no paths out of the model folder
            raise ModelError(f"{path}: member {member!r} must be a file name beside the manifest")
        specs.append(load_model_spec(path.parent / member))
    shapes = {(s.input_size, s.context_slices) for s in specs}
    if len(shapes) != 1:
        raise ModelError(f"{path}: members differ in input size or context slices ({sorted(shapes)})")
    return InferencePlan(members=specs, tta=tta, card=card, source=path)


def load_plan(model: str | os.PathLike | None, ensemble: bool | str | os.PathLike | None = None,
              tta: bool = False) -> ModelSpec | InferencePlan:
    """The one entry for what a run infers with: a model, a model with TTA, or an ensemble."""
    if ensemble:
        if model:
            raise ModelError("give --model or --ensemble, not both")
        return load_ensemble(None if ensemble is True else ensemble, tta)
    spec = load_model_spec(model)
    return InferencePlan(members=[spec], tta=True, card=spec.card, source=spec.weights) if tta else spec


def describe_plan(spec) -> dict[str, Any] | None:
    """What report.json records beyond the model name: None for a plain single model."""
    return spec.describe() if isinstance(spec, InferencePlan) else None


def members_of(spec) -> list[ModelSpec]:
    return list(spec.members) if isinstance(spec, InferencePlan) else [spec]


class AveragingBackend(Backend):
    """Mean of the member backends' probabilities (and of their mirrored-slice predictions)."""

    def __init__(self, plan: InferencePlan, members: list[Backend]):
        super().__init__(plan, threads=members[0].threads)
        self.members = members
        self.name = members[0].name
        self.precision = members[0].precision

    def load(self) -> "AveragingBackend":
        for member in self.members:
            if not member.loaded:
                member.load()
        self.loaded = True
        return self

    def infer(self, batch):
        import numpy as np

        total = None
        count = 0
        for member in self.members:
            views = [member.infer(batch)]
            if self.spec.tta:
                views.append(member.infer(np.ascontiguousarray(batch[..., ::-1]))[..., ::-1])
            for prob in views:
                total = prob.astype(np.float32, copy=True) if total is None else total + prob
                count += 1
        return total / np.float32(count)

    def close(self) -> None:
        for member in self.members:
            member.close()
        super().close()
