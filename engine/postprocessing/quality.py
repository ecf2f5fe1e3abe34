"""Per-patient quality estimate: an expected DSC with an interval, a flag and its reasons.

Why: a mask a person should not trust must say so before anyone reads it. The estimate is a
small ridge regression over features every run already has (the probabilities, the mask,
what post-processing removed, the input's own intensities and, in accurate mode, how much the
averaged views agree). It is fitted on out-of-fold cross-validation patients
(``segengine cv calibrate-review``, ``train/quality_calibration.py``) and stored per mode
(``single``, ``tta``, ``ensemble``) in the model card or ensemble manifest under ``review``,
with the training patients' channel statistics. A mode without a calibration gets no
estimate and no flag (``null``), never a silent "ok"; the anomalies that flag in every mode
(``INTENSITY_Z_FLAG``, ``REMOVED_SHARE_FLAG``) set it there too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from segengine.engine.core.errors import ModelError
from segengine.engine.model.spec import SLICE_CHANNELS
from segengine.engine.postprocessing.postprocess import component_stats

CHANNELS = ("pre-contrast", "FLAIR", "post-contrast")  # the three channels of a slice, in order


FLAIR = 1


FLAG_BELOW = 0.80  # the flag: expected DSC below this


# Anomalies that set the flag in every mode, whatever the estimate (and even uncalibrated): each mode's
# regression weighs them differently (--tta's and the ensemble's barely at all), so a patient flagged
# in default mode for them must not pass unflagged in accurate mode.
INTENSITY_Z_FLAG = 3.0  # a channel's head mean this many robust z from the training patients'
# plan v2 cards compare the scale-free contrast instead (``contrast_stats``): its spread over the 90
# training patients is narrower, so 4 robust z flag about as many of them (4 of 90) as 3 did for
# the 8-bit head mean; the limit a run used is stored in its features (``intensity_z_limit``)
CONTRAST_Z_FLAG = 4.0
REMOVED_SHARE_FLAG = 0.25  # post-processing removed more than this share of the probable tumor mass


COPY_SHARE = 0.99  # a channel equal to FLAIR (within 1 grey level) on this share of head pixels is a copy


HEAD_LEVEL = 10  # grey level above which a pixel (any channel) counts as head, not background


MIN_COMPONENT_VOXELS = 10  # smaller specks are not counted as components


# features the regression may use, in this order (every mode stores the subset it was fitted on)
FEATURES = ("confidence", "high_share", "log_volume", "uncertain_ratio", "removed_share", "components",
            "flair_copies", "intensity_z", "views_disagreement")


HIGH = 0.9  # "confident" voxels: probability above this


def head_mask(image: np.ndarray) -> np.ndarray:
    """The head: pixels where any channel of the (D, H, W, 3) input exceeds HEAD_LEVEL."""
    return image.max(axis=-1) > HEAD_LEVEL


def channel_means(image: np.ndarray, head: np.ndarray | None = None) -> list[float]:
    """Mean grey level of each channel over the head (``head_mask``, computed here unless given)."""
    head = head_mask(image) if head is None else head
    if not head.any():
        return [0.0] * image.shape[-1]
    return [float(image[..., c][head].mean()) for c in range(image.shape[-1])]


def flair_copies(image: np.ndarray, head: np.ndarray | None = None) -> list[str]:
    """Names of the channels that are copies of FLAIR (a missing sequence filled in, as 10 of the 90
    training patients and ``readers.nifti``'s FLAIR-only cases arrive); ``image`` is (D, H, W, 3)."""
    head = head_mask(image) if head is None else head
    if not head.any():
        return []
    flair = image[..., FLAIR][head].astype(np.int16)
    out = []
    for c in range(SLICE_CHANNELS):
        if c != FLAIR and (np.abs(image[..., c][head].astype(np.int16) - flair) <= 1).mean() >= COPY_SHARE:
            out.append(CHANNELS[c])
    return out


def intensity_z(means: list[float], reference: dict | None,
                contrast: list[float] | None = None) -> tuple[float | None, str | None]:
    """Largest robust z-score of a channel's input statistic against the training patients'
    (median and MAD stored in the card); and the channel's name. None without a reference.

    A plan v2 card's reference holds ``contrast_median``: the statistic is then the scale-free
    contrast (``contrast_shape``), since float intensities have no fixed grey levels; a plan v1
    card's is the log head mean of the 8-bit input."""
    if not reference:
        return None, None
    scale_free = "contrast_median" in reference and contrast is not None
    values = [math.log(max(v, 1e-3)) for v in contrast] if scale_free else [math.log(max(m, 0.5)) for m in means]
    medians = reference["contrast_median"] if scale_free else reference["log_mean_median"]
    mads = reference["contrast_mad"] if scale_free else reference["log_mean_mad"]
    best, which = 0.0, None
    for c, v in enumerate(values):
        z = abs(v - medians[c]) / max(1.4826 * mads[c], 1e-3)
        if z > best:
            best, which = z, CHANNELS[c]
    return best, which


CONTRAST_PERCENTILE = 99.0  # a sequence's bright level inside the head
OUTSIDE_PEAK_NOTE = 3.0  # voxels outside the head brighter than this many times the head's bright level are named


def contrast_stats(intensities: np.ndarray) -> tuple[list[float], float]:
    """(per-sequence head mean / head 99th percentile, the brightest voxel outside the head over the
    head's 99th percentile, largest over sequences) of a (D, H, W, 3) volume of any scale.

    Scale-free, so a 12-bit NIfTI and the 8-bit Kaggle slices of one patient give the same numbers;
    a gamma curve or a bias field moves the first; a few hot voxels outside the head the second.
    The head is plan v2's (``preprocessing.head``)."""
    from segengine.engine.core.errors import EmptyVolumeError
    from segengine.engine.preprocessing.head import head_mask as robust_head
    from segengine.engine.preprocessing.stats import percentiles

    try:
        head = robust_head(intensities, 0.1, CONTRAST_PERCENTILE)
    except EmptyVolumeError:
        return [0.0] * intensities.shape[-1], 0.0
    shape, outside_peak = [], 0.0
    for c in range(intensities.shape[-1]):
        inside = np.asarray(intensities[..., c][head], dtype=np.float32)
        top = percentiles(inside, (CONTRAST_PERCENTILE,))[0] if inside.size else 0.0
        if not top > 0:
            shape.append(0.0)
            continue
        shape.append(float(inside.mean(dtype=np.float64)) / top)
        outside = intensities[..., c][~head]
        if outside.size:
            outside_peak = max(outside_peak, float(outside.max()) / top)
    return shape, outside_peak


def prediction_features(prob: np.ndarray, mask: np.ndarray, threshold: float = 0.5,
                        component_sizes: np.ndarray | None = None) -> dict[str, Any]:
    """What the probabilities and the kept mask say: confidence, size, margin, fragmentation.
    ``component_sizes``: the thresholded components' voxel counts, when post-processing has them."""
    mask = np.asarray(mask, dtype=bool)
    n = int(mask.sum())
    above = prob > threshold
    mass_above = float(prob[above].sum())
    sizes = component_stats(prob, above)[1]["size"] if component_sizes is None else component_sizes
    uncertain = int(((prob > 0.2) & (prob < 0.8)).sum())
    return {
        "volume_px": n,
        "confidence": float(prob[mask].mean()) if n else 0.0,
        "high_share": float((prob[mask] > HIGH).mean()) if n else 0.0,
        "log_volume": math.log10(1 + n),
        "uncertain_ratio": math.log1p(uncertain / max(n, 1)),
        "removed_share": 1.0 - float(prob[above & mask].sum()) / mass_above if mass_above else 0.0,
        "components": math.log1p(int((sizes >= MIN_COMPONENT_VOXELS).sum())),
    }


def quality_features(image: np.ndarray, prob: np.ndarray, mask: np.ndarray, threshold: float = 0.5,
                     reference: dict | None = None, views_agreement: float | None = None,
                     component_sizes: np.ndarray | None = None, intensities: np.ndarray | None = None) -> dict[str, Any]:
    """Every feature of one patient, from its (D, H, W, 3) input, native probabilities and mask.
    ``intensities``: the volume at its source's own depth (NIfTI, DICOM), else ``image`` stands in."""
    head = head_mask(image)  # once for both input features
    means = channel_means(image, head)
    contrast, outside_peak = contrast_stats(intensities if intensities is not None else image)
    z, z_channel = intensity_z(means, reference, contrast)
    limit = CONTRAST_Z_FLAG if reference and "contrast_median" in reference else INTENSITY_Z_FLAG
    copies = flair_copies(image, head)
    return {**prediction_features(prob, mask, threshold, component_sizes), "flair_copies": len(copies), "copied_channels": copies,
            "channel_means": [round(m, 2) for m in means], "contrast": [round(v, 4) for v in contrast],
            "outside_peak": round(outside_peak, 2), "intensity_z": z, "intensity_z_channel": z_channel,
            "intensity_z_limit": limit, "views_disagreement": None if views_agreement is None else 1.0 - views_agreement}


@dataclass(frozen=True)
class QualityModel:
    """One mode's calibration: standardized ridge regression on DSC, clipped to [0, 1]."""

    mode: str
    features: tuple[str, ...]
    center: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    residual_quantiles: tuple[float, float]  # out-of-fold (5%, 95%) of true - estimate: the interval
    typical: dict[str, float]  # the training patients' median of each feature (what the reasons compare with)
    calibration: str  # what it was fitted on, in words ("out of fold ..." or "proxy: ...")

    @classmethod
    def from_card(cls, card: dict, mode: str, where: str | None = None) -> "QualityModel | None":
        review = card.get("review")
        entry = review.get("modes", {}).get(mode) if isinstance(review, dict) and isinstance(review.get("modes"), dict) else None
        if entry is None:
            return None
        try:
            features = tuple(entry["features"])
            unknown = [f for f in features if f not in FEATURES]
            numbers = [*entry["center"], *entry["scale"], *entry["coef"], entry["intercept"], *entry["residual_quantiles"],
                       *entry["typical"].values()]
            if unknown or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers) \
                    or not len(features) == len(entry["center"]) == len(entry["scale"]) == len(entry["coef"]) \
                    or len(entry["residual_quantiles"]) != 2:
                raise ValueError
            return cls(mode, features, tuple(entry["center"]), tuple(entry["scale"]), tuple(entry["coef"]),
                       float(entry["intercept"]), tuple(entry["residual_quantiles"]), dict(entry["typical"]),
                       str(entry.get("calibration", "")))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ModelError(f"{where or 'model card'}: review.modes.{mode} is not a quality calibration "
                             "(re-run segengine cv calibrate-review)") from None

    def to_dict(self) -> dict:
        return {"features": list(self.features), "center": list(self.center), "scale": list(self.scale),
                "coef": list(self.coef), "intercept": self.intercept,
                "residual_quantiles": list(self.residual_quantiles), "typical": self.typical,
                "calibration": self.calibration}

    def contributions(self, features: dict) -> dict[str, float]:
        """Each feature's term of the estimate, relative to a patient at the training centre."""
        return {f: c * (float(features.get(f) or 0.0) - m) / s
                for f, m, s, c in zip(self.features, self.center, self.scale, self.coef)}

    def estimate(self, features: dict) -> float:
        return float(np.clip(self.intercept + sum(self.contributions(features).values()), 0.0, 1.0))


def mode_of(spec) -> str:
    """The calibration a plan needs: ``single``, ``tta`` (one model, mirrored views) or ``ensemble``."""
    members = getattr(spec, "members", None)
    if members is None:
        return "single"
    return "ensemble" if len(members) > 1 else "tta"


def reference_stats(card: dict) -> dict | None:
    review = card.get("review")
    ref = review.get("input_reference") if isinstance(review, dict) else None
    return ref if isinstance(ref, dict) and "log_mean_median" in ref else None


_DESCRIBE = {
    "confidence": lambda v, t: f"mean probability inside the mask {v:.3f} (training patients' median {t:.3f})",
    "high_share": lambda v, t: (f"{v:.1%} of the mask is confident (p > {HIGH:g}; training patients' "
                                f"median {t:.1%})"),
    "log_volume": lambda v, t: f"mask of {10 ** v - 1:.0f} voxels (training patients' median {10 ** t - 1:.0f})",
    "uncertain_ratio": lambda v, t: (f"uncertain margin (0.2 < p < 0.8) {math.expm1(v):.2f} x the mask's size "
                                     f"(training patients' median {math.expm1(t):.2f})"),
    "removed_share": lambda v, t: (f"post-processing removed {v:.1%} of the probable tumor mass "
                                   f"(training patients' median {t:.1%})"),
    "components": lambda v, t: (f"{math.expm1(v):.0f} separate candidate regions "
                                f"(training patients' median {math.expm1(t):.0f})"),
    "intensity_z": lambda v, t: (f"input intensities unlike the training patients' (largest robust z {v:.1f}; "
                                 f"training patients' median {t:.1f})"),
    "views_disagreement": lambda v, t: (f"averaged views disagree: mean Dice with their mean {1 - v:.3f} "
                                        f"(training patients' median {1 - t:.3f})"),
}


def assess(features: dict, model: QualityModel | None, mode: str, reference: dict | None = None) -> dict:
    """report.json's ``review``: ``{expected_dsc, interval, flag, reasons, calibration, features}``.

    Input anomalies are named whatever the estimate says; the other reasons are the features
    that pull the estimate down most (each with the value and the training patients' median).
    The flag is an expected DSC below FLAG_BELOW, or an anomaly that flags in every mode (input
    intensities beyond INTENSITY_Z_FLAG, post-processing removing more than REMOVED_SHARE_FLAG of
    the mass): then it is set even where the mode has no calibration (else ``null`` there).
    """
    reasons, flagging = [], []
    if features.get("copied_channels"):
        copied = features["copied_channels"]
        reasons.append(f"{' and '.join(copied)} {'is a copy' if len(copied) == 1 else 'are copies'} of FLAIR "
                       "(a missing sequence filled in)" + (f": {reference['flair_copy_cv']}" if reference and
                                                           reference.get("flair_copy_cv") else ""))
    scale_free = bool(reference and "contrast_median" in reference and features.get("contrast"))
    z_limit = float(features.get("intensity_z_limit") or INTENSITY_Z_FLAG)
    if features.get("intensity_z") is not None and features["intensity_z"] > z_limit:
        i = CHANNELS.index(features["intensity_z_channel"])
        if scale_free:
            reasons.append(f"{features['intensity_z_channel']} contrast unlike the training patients' (head mean at "
                           f"{features['contrast'][i]:.0%} of its bright level, training median "
                           f"{math.exp(reference['contrast_median'][i]):.0%}; robust z {features['intensity_z']:.1f})")
        else:
            reasons.append(f"{features['intensity_z_channel']} intensity far from the training patients' "
                           f"(head mean {features['channel_means'][i]:.1f}, robust z {features['intensity_z']:.1f})")
        flagging.append("intensity_z")
    if float(features.get("outside_peak") or 0.0) > OUTSIDE_PEAK_NOTE:
        robust = bool(reference and reference.get("scheme") == "head_zscore")
        reasons.append(f"voxels outside the head up to {features['outside_peak']:.1f} x the head's bright level "
                       + ("(left out by the head mask)" if robust else "(they set the intensity threshold of this "
                                                                     "model's preprocessing: the head may be lost)"))
        if not robust:
            flagging.append("outside_peak")
    if float(features.get("removed_share") or 0.0) > REMOVED_SHARE_FLAG:
        reasons.append(f"post-processing removed {features['removed_share']:.1%} of the probable tumor mass "
                       f"(more than {REMOVED_SHARE_FLAG:.0%})")
        flagging.append("removed_share")
    if features.get("volume_px") == 0:
        reasons.append("no tumor found: if this patient has a lesion, it was missed")
    if model is None:
        return {"expected_dsc": None, "interval": None, "flag": True if flagging else None, "reasons": reasons,
                "calibration": None, "features": features,
                "note": f"uncalibrated: no quality calibration for mode {mode!r} in this model's card or manifest"}
    expected = model.estimate(features)
    lo, hi = model.residual_quantiles
    interval = [round(float(np.clip(expected + lo, 0, 1)), 3), round(float(np.clip(expected + hi, 0, 1)), 3)]
    flag = expected < FLAG_BELOW or bool(flagging)
    if expected < FLAG_BELOW:
        pulls = sorted((c, f) for f, c in model.contributions(features).items()
                       if c < -0.01 and f in _DESCRIBE and f not in flagging)
        for _, f in pulls[:3]:
            reasons.append(_DESCRIBE[f](float(features[f]), float(model.typical.get(f, 0.0))))
    return {"expected_dsc": round(expected, 3), "interval": interval, "flag": bool(flag), "reasons": reasons,
            "calibration": model.calibration, "features": features}


def summary_text(review: dict | None) -> str:
    """One line for the terminal and the review page: the estimate and its reasons."""
    if not isinstance(review, dict):
        return ""
    if review.get("expected_dsc") is None:
        text = "quality uncalibrated" + (" REVIEW" if review.get("flag") else "")
    else:
        lo, hi = review.get("interval") or (None, None)
        proxy = str(review.get("calibration") or "").startswith("proxy")
        text = (f"expected DSC {review['expected_dsc']:.3f}" + (f" (90% interval {lo:.3f}-{hi:.3f}"
                                                                 + (", proxy calibration" if proxy else "") + ")"
                                                                 if lo is not None else "")
                + (" REVIEW" if review.get("flag") else ""))
    reasons = review.get("reasons") or []
    return text + (": " + "; ".join(str(r) for r in reasons) if reasons else "")


@dataclass(frozen=True)
class Review:
    """What a run needs to review each patient: its mode's calibration (or None) and the training
    patients' input statistics, read once per run from the card or manifest."""

    mode: str
    model: QualityModel | None
    reference: dict | None

    @classmethod
    def for_plan(cls, spec) -> "Review":
        """The plan's calibration: a single model's or ``--tta``'s from its card, an ensemble's from
        its manifest (a card's calibration never stands in for another mode's)."""
        mode = mode_of(spec)
        card = spec.card if isinstance(getattr(spec, "card", None), dict) else {}
        where = str(getattr(spec, "source", None) or getattr(spec, "weights", "model card"))
        return cls(mode, QualityModel.from_card(card, mode, where), reference_stats(card))

    def assess(self, image: np.ndarray, prob: np.ndarray, mask: np.ndarray, threshold: float = 0.5,
               views_agreement: float | None = None, component_sizes: np.ndarray | None = None,
               intensities: np.ndarray | None = None) -> dict:
        features = quality_features(image, prob, mask, threshold, self.reference, views_agreement, component_sizes,
                                    intensities)
        return assess(features, self.model, self.mode, self.reference)
