"""Per-patient review flag: which results a person should look at before trusting them.

The features are computed from what every run already has (native probabilities, the
post-processed mask, the crop geometry and, with --tta, the flipped prediction). The
thresholds that turn features into a flag are not chosen here: they are calibrated on
out-of-fold cross-validation predictions (``python -m segengine.train.review_calibration``)
and stored in the model card under ``review``, so each model carries the rules that fit it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from segengine.engine.metrics import dsc
from segengine.engine.preprocess import Geometry


@dataclass(frozen=True)
class ReviewRules:
    """Flag a patient when any feature is on the wrong side of its limit (None: not used)."""

    min_confidence: float | None = None  # mean probability inside the predicted mask
    max_uncertain_share: float | None = None  # voxels with 0.2 < p < 0.8, relative to the mask's size
    min_volume_px: int | None = None  # a (near-)empty prediction in a tumor segmentation tool
    max_volume_share: float | None = None  # mask voxels / brain-crop voxels
    max_removed_share: float | None = None  # share of the thresholded mass dropped by the largest-component step
    min_tta_agreement: float | None = None  # Dice between the plain and the flipped prediction
    flag_border: bool = False  # tumor in the first/last slice of the volume: it may continue outside

    @classmethod
    def from_card(cls, card: dict, where=None) -> "ReviewRules | None":
        """The card's (or manifest's) rules; a limit of the wrong type is refused before any work."""
        rules = card.get("review", {}).get("rules") if isinstance(card.get("review"), dict) else None
        if not isinstance(rules, dict):
            return None
        known = {f.name for f in fields(cls)}
        chosen = {k: v for k, v in rules.items() if k in known}
        for k, v in chosen.items():
            ok = isinstance(v, bool) if k == "flag_border" else (
                v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v == v))
            if not ok:
                from segengine.engine.model import ModelError

                raise ModelError(f"{where or 'model card'}: review rule {k} = {str(v)[:40]!r} is not a number")
        return cls(**chosen)

    def to_dict(self) -> dict:
        return asdict(self)


def review_features(prob: np.ndarray, mask: np.ndarray, geometry: Geometry, threshold: float = 0.5,
                    tta_mask: np.ndarray | None = None) -> dict[str, float | int | bool | None]:
    """Cheap summaries of one patient's prediction on its original grid."""
    mask = np.asarray(mask, dtype=bool)
    n = int(mask.sum())
    inside = prob[mask]
    g = geometry
    crop_voxels = max(1, (g.z1 - g.z0) * (g.y1 - g.y0) * (g.x1 - g.x0))
    thresholded = int((prob > threshold).sum())
    uncertain = int(((prob > 0.2) & (prob < 0.8)).sum())
    touches_end = bool(n and (mask[0].any() or mask[-1].any()))
    return {
        "volume_px": n,
        "confidence": float(inside.mean()) if n else None,
        "uncertain_share": uncertain / n if n else None,
        "volume_share": n / crop_voxels,
        "removed_share": (thresholded - n) / thresholded if thresholded else 0.0,
        "tta_agreement": float(dsc(mask, tta_mask)) if tta_mask is not None else None,
        "touches_volume_end": touches_end,
    }


def assess(features: dict, rules: ReviewRules | None) -> dict:
    """``{"flag", "reasons", "features"}`` for report.json (no rules: unflagged, and says why)."""
    if rules is None:
        return {"flag": False, "reasons": [], "features": features,
                "note": "no review rules are calibrated for this model or mode (--tta and --ensemble "
                        "average probabilities the rules were not fitted on)"}
    reasons = []

    def below(value, limit, text):
        if limit is not None and value is not None and value < limit:
            reasons.append(text.format(value=value, limit=limit))

    def above(value, limit, text):
        if limit is not None and value is not None and value > limit:
            reasons.append(text.format(value=value, limit=limit))

    f = features
    if rules.min_volume_px is not None and f["volume_px"] < rules.min_volume_px:
        reasons.append(f"tiny or empty prediction ({f['volume_px']} voxels < {rules.min_volume_px})")
    below(f["confidence"], rules.min_confidence, "low confidence inside the mask (mean p {value:.2f} < {limit:.2f})")
    above(f["uncertain_share"], rules.max_uncertain_share,
          "wide uncertain margin ({value:.2f} of the mask's size at 0.2 < p < 0.8 > {limit:.2f})")
    above(f["volume_share"], rules.max_volume_share, "implausibly large ({value:.1%} of the brain crop > {limit:.1%})")
    above(f["removed_share"], rules.max_removed_share,
          "fragmented prediction ({value:.0%} of the thresholded voxels outside the largest component > {limit:.0%})")
    below(f["tta_agreement"], rules.min_tta_agreement, "flip TTA disagrees (Dice {value:.3f} < {limit:.3f})")
    if rules.flag_border and f["touches_volume_end"]:
        reasons.append("tumor in the first or last slice: it may continue outside the scanned volume")
    return {"flag": bool(reasons), "reasons": reasons, "features": features}
