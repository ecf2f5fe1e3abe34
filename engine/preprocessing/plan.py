"""The preprocessing plan: every constant that turns a patient's slices into model input.

In nnU-Net's spirit one object owns the plan instead of constants scattered through the
code. The model card carries it (``input_size``, ``context_slices`` and an optional
``preprocessing`` block overriding the reference program's constants), so training, the
export checks and the engine preprocess a model's inputs the way it was trained.

Two schemes: ``reference`` (plan v1, the course program's: zero below 10% of the volume's
maximum, joint-percentile clip) and ``head_zscore`` (plan v2: a head mask from per-sequence
robust scales, z-score per sequence inside the head). v1 stays for the models trained with it;
a card names its scheme, so each model gets the inputs it learned on.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

REFERENCE_SIZE = 256
SCHEMES = ("reference", "head_zscore")
HEAD_THRESHOLDS = ("fraction", "log_otsu")


@dataclass(frozen=True)
class PreprocessingPlan:
    input_size: int = REFERENCE_SIZE  # the model grid is input_size x input_size
    context_slices: int = 0  # 2.5D: neighbouring slices on each side stacked as channels
    threshold_fraction: float = 0.1  # voxels below this share of the volume's maximum are zeroed, then cropped away
    percentiles: tuple[float, float] = (10.0, 99.0)  # intensities clipped to these, then z-normalized per channel
    image_order: int = 2  # spline order of the image resize (the mask is resized with order 0)
    # plan v2 ("head_zscore"): the head is where a sequence reaches head_fraction of its own
    # robust top (its head_percentile-th percentile), holes filled, specks away from it dropped;
    # each sequence is clipped to clip_percentiles inside the head and z-scored there
    scheme: str = "reference"
    head_fraction: float = 0.1
    head_percentile: float = 99.0
    # how a sequence's head threshold is found: "fraction" (head_fraction x robust top; v4 was trained
    # so) or "log_otsu" (Otsu's threshold of the in-plane smoothed log intensities, head_smooth
    # pixels' sigma; a voxel is head where most sequences pass): a gamma curve, a scale or noise
    # moves the first with the background, the second with the whole histogram
    head_threshold: str = "fraction"
    head_smooth: float = 1.5
    clip_percentiles: tuple[float, float] = (0.5, 99.5)

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> "PreprocessingPlan":
        """The plan a model card states; a card without a ``preprocessing`` block uses the reference constants."""
        extra = card.get("preprocessing") if isinstance(card.get("preprocessing"), dict) else {}
        known = {f.name for f in fields(cls)} - {"input_size", "context_slices"}
        given = {k: (tuple(v) if k in ("percentiles", "clip_percentiles") else v) for k, v in extra.items() if k in known}
        if given.get("scheme", "reference") not in SCHEMES:
            raise ValueError(f"unknown preprocessing scheme {given['scheme']!r} (known: {', '.join(SCHEMES)})")
        if given.get("head_threshold", "fraction") not in HEAD_THRESHOLDS:
            raise ValueError(f"unknown head threshold {given['head_threshold']!r} (known: {', '.join(HEAD_THRESHOLDS)})")
        return cls(input_size=int(card.get("input_size", REFERENCE_SIZE)),
                   context_slices=int(card.get("context_slices", 0)), **given)

    @classmethod
    def of(cls, plan: "PreprocessingPlan | int") -> "PreprocessingPlan":
        """A plan, or a bare grid size standing for the reference plan at that size."""
        return plan if isinstance(plan, cls) else cls(input_size=int(plan))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def card_block(self) -> dict[str, Any]:
        """The card's ``preprocessing`` block: every constant but the two the card holds at top level."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()
                if k not in ("input_size", "context_slices")}

    @property
    def robust(self) -> bool:
        """Plan v2: float intensities at the source's own depth, no maximum-based threshold."""
        return self.scheme == "head_zscore"


PLAN_V2 = PreprocessingPlan(scheme="head_zscore", head_threshold="log_otsu")
