"""Accurate mode: the mean probability of several models (a fold ensemble) and/or of mirrored
slices (flip test-time augmentation), behind the same Backend interface as one model.

An ensemble is a manifest ``<name>.ensemble.json`` beside ordinary member models (each a
``.pt`` with its card and SHA-256, verified on load like any model)::

    {"name": "resunet16v4_folds", "kind": "ensemble",
     "members": ["resunet16v4_folds_fold0.pt", ...], "review": {"modes": {"ensemble": ...}}, "cross_validation": {...}}

Averaging happens on the model grid, before the result is mapped back and post-processed,
so every code path (run, Ray, bench, validate) stays the one pipeline.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segengine.engine.core.errors import ModelError
from segengine.engine.inference.backends.base import Backend
from segengine.engine.model.spec import ModelSpec, load_model_spec, read_json, shipped_model_dir

ENSEMBLE_SUFFIX = ".ensemble.json"


MAX_MEMBERS = 16


MAX_MANIFEST_BYTES = 1 << 20


_NAME = re.compile(r"^[\w.+-]{1,100}$")


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
    def preprocessing(self):
        """The members' plan (``load_ensemble`` refuses members whose inputs differ)."""
        return self.members[0].preprocessing

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
    try:
        size = path.stat().st_size if path.is_file() else None
    except OSError as exc:
        raise ModelError(f"{path}: unreadable ensemble manifest ({exc.strerror or exc})") from None
    if size is None:
        raise ModelError(f"{path}: ensemble manifest not found")
    if size > MAX_MANIFEST_BYTES:
        raise ModelError(f"{path}: {size} bytes is not an ensemble manifest (limit {MAX_MANIFEST_BYTES})")
    card = read_json(path, "ensemble manifest")
    if not isinstance(card, dict) or card.get("kind") != "ensemble":
        raise ModelError(f"{path}: not an ensemble manifest (kind must be \"ensemble\")")
    if not isinstance(card.get("name", "ensemble"), str) or not _NAME.match(card.get("name", "ensemble")):
        raise ModelError(f"{path}: name must be 1-100 letters, digits or . + - _")
    members = card.get("members")
    if not isinstance(members, list) or not 1 <= len(members) <= MAX_MEMBERS or not all(isinstance(m, str) for m in members):
        raise ModelError(f"{path}: members must be a list of 1..{MAX_MEMBERS} model file names")
    if len(set(members)) != len(members):
        raise ModelError(f"{path}: a member is listed twice (it would weigh double in the mean)")
    specs = []
    for member in members:
        # members lie beside the manifest as plain .pt files: no paths, no "..", nothing out of the model folder
        if not (_NAME.match(member) and member.endswith(".pt") and member not in (".pt", "..pt")):
            raise ModelError(f"{path}: member {member[:60]!r} must be a .pt file name beside the manifest")
        weights = path.parent / member
        if not weights.is_file() or weights.resolve().parent != path.parent.resolve():
            raise ModelError(f"{path}: member {member} is not a model file beside the manifest")
        specs.append(load_model_spec(weights))
    if len({s.sha256 for s in specs}) != len(specs):
        raise ModelError(f"{path}: two members are the same weights (it would weigh double in the mean)")
    from segengine.engine.postprocessing.quality import QualityModel

    QualityModel.from_card(card, "ensemble", str(path))  # a manifest's calibration is checked before any work
    plans = {s.preprocessing for s in specs}
    if len(plans) != 1:
        shown = sorted((p.input_size, p.context_slices, p.scheme) for p in plans)
        raise ModelError(f"{path}: members differ in their preprocessing plan (input size, context slices, "
                         f"scheme: {shown})")
    return InferencePlan(members=specs, tta=tta, card=card, source=path)


def load_plan(model: str | os.PathLike | None, ensemble: bool | str | os.PathLike | None = None,
              tta: bool = False) -> ModelSpec | InferencePlan:
    """The one entry for what a run infers with: a model, a model with TTA, or an ensemble."""
    if ensemble:
        if model:
            raise ModelError("give --model or --ensemble, not both")
        return load_ensemble(None if ensemble is True else ensemble, tta)
    spec = load_model_spec(model)
    if not tta:
        return spec
    # the card keeps one quality calibration per mode: quality.Review picks the "tta" one
    return InferencePlan(members=[spec], tta=True, card=spec.card, source=spec.weights)


def describe_plan(spec) -> dict[str, Any] | None:
    """What report.json records beyond the model name: None for a plain single model."""
    return spec.describe() if isinstance(spec, InferencePlan) else None


def members_of(spec) -> list[ModelSpec]:
    return list(spec.members) if isinstance(spec, InferencePlan) else [spec]


AGREEMENT_THRESHOLD = 0.5  # a view's "mask" when its agreement with the mean is measured


class AveragingBackend(Backend):
    """Mean of the member backends' probabilities (and of their mirrored-slice predictions)."""

    last_views_agreement: float | None = None

    def __init__(self, plan: InferencePlan, members: list[Backend]):
        super().__init__(plan, threads=members[0].threads)
        self.members = members
        self.name = members[0].name
        self.precision = members[0].precision
        self._counts: list = []  # per batch: (view & mean, view, mean) mask sizes of every view

    def load(self) -> "AveragingBackend":
        for member in self.members:
            if not member.loaded:
                member.load()
        self.loaded = True
        return self

    def infer(self, batch):
        from segengine.engine.inference.predict import mirror

        inputs = [batch, mirror(batch)] if self.spec.tta else [batch]  # the mirrored batch is built once
        total, views = None, []
        for member in self.members:
            for view, x in enumerate(inputs):
                prob = member.infer(x)
                prob = mirror(prob) if view else prob
                views.append(prob > AGREEMENT_THRESHOLD)
                if total is None:
                    total = prob.astype(np.float32, copy=True)
                else:
                    total += prob
        mean = total / np.float32(len(self.members) * len(inputs))
        agreed = mean > AGREEMENT_THRESHOLD
        self._counts.append(np.array([[(v & agreed).sum(), v.sum(), agreed.sum()] for v in views], dtype=np.int64))
        return mean

    def predict(self, images, batch_size: int = 32):
        """The mean probabilities; ``last_views_agreement`` is then the mean Dice of each view's
        mask with the mean's, over the whole call (one patient): the quality estimate's
        disagreement feature (``quality.quality_features``)."""
        self._counts = []
        try:
            return super().predict(images, batch_size)
        finally:
            c = sum(self._counts) if self._counts else None
            self.last_views_agreement = None if c is None else float(np.mean(
                [1.0 if a + b == 0 else 2 * i / (a + b) for i, a, b in c]))

    def close(self) -> None:
        for member in self.members:
            member.close()
        super().close()
