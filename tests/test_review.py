"""Quality estimate: features on hand-made arrays, the card's calibration, the fit, real runs."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from segengine.engine.core.errors import ModelError
from segengine.engine.postprocessing.quality import (CHANNELS, QualityModel, Review, assess, channel_means, flair_copies, intensity_z, prediction_features, summary_text)


def _image(pre: np.ndarray, flair: np.ndarray, post: np.ndarray) -> np.ndarray:
    return np.stack([pre, flair, post], axis=-1).astype(np.uint8)


RNG = np.random.default_rng(0)
FLAIR_T = RNG.integers(20, 200, size=(3, 16, 16)).astype(np.uint8)
OTHER_T = RNG.integers(20, 200, size=(3, 16, 16)).astype(np.uint8)
NOISE_1 = np.clip(FLAIR_T.astype(int) + RNG.integers(-1, 2, size=FLAIR_T.shape), 0, 255)


# ------------------------------------------------------------------ input anomalies
@pytest.mark.parametrize("image, copies", [
    (_image(FLAIR_T, FLAIR_T, FLAIR_T), ["pre-contrast", "post-contrast"]),  # a FLAIR-only case filled in
    (_image(OTHER_T, FLAIR_T, FLAIR_T), ["post-contrast"]),
    (_image(NOISE_1, FLAIR_T, OTHER_T), ["pre-contrast"]),  # within one grey level: still a copy (lossy re-save)
    (_image(FLAIR_T // 2 + 5, FLAIR_T, OTHER_T), []),  # a darker, correlated channel is no copy
    (_image(OTHER_T, FLAIR_T, OTHER_T), []),
    (np.zeros((2, 8, 8, 3), np.uint8), []),  # an empty volume has no head to compare
])
def test_flair_copies_on_known_tensors(image, copies):
    assert flair_copies(image) == copies


def test_channel_means_and_intensity_z_by_hand():
    img = np.zeros((1, 2, 4, 3), np.uint8)
    img[0, 0, :2] = [20, 40, 80]  # two head pixels; the rest is background (below the head level)
    img[0, 1, 0] = [40, 60, 100]
    assert channel_means(img) == pytest.approx([(20 + 20 + 40) / 3, (40 + 40 + 60) / 3, (80 + 80 + 100) / 3])
    ref = {"log_mean_median": [math.log(30.0)] * 3, "log_mean_mad": [0.1] * 3}
    z, which = intensity_z([30.0, 30.0 * math.e, 30.0], ref)
    assert which == "FLAIR" and z == pytest.approx(1 / (1.4826 * 0.1))
    assert intensity_z([1.0, 2.0, 3.0], None) == (None, None)


def test_prediction_features_by_hand():
    prob = np.zeros((4, 8, 8), np.float32)
    prob[1, 2, 2], prob[1, 2, 3], prob[2, 2, 2] = 0.9, 0.6, 0.95  # one component of three voxels
    prob[2, 6, 6] = 0.7  # a second, one-voxel component (dropped by the largest-component rule)
    prob[0, 0, 0] = 0.3  # uncertain, below the threshold
    mask = prob > 0.5
    mask[2, 6, 6] = False
    f = prediction_features(prob, mask)
    assert f["volume_px"] == 3
    assert f["confidence"] == pytest.approx((0.9 + 0.6 + 0.95) / 3)
    assert f["high_share"] == pytest.approx(1 / 3)  # only 0.95 is above 0.9
    assert f["log_volume"] == pytest.approx(math.log10(4))
    assert f["uncertain_ratio"] == pytest.approx(math.log1p(3 / 3))  # 0.6, 0.7 and 0.3 lie in (0.2, 0.8)
    assert f["removed_share"] == pytest.approx(0.7 / (0.9 + 0.6 + 0.95 + 0.7))  # share of the mass above 0.5
    assert f["components"] == 0.0  # both components are under MIN_COMPONENT_VOXELS
    empty = prediction_features(np.zeros((2, 4, 4), np.float32), np.zeros((2, 4, 4), bool))
    assert empty["volume_px"] == 0 and empty["confidence"] == 0.0 and empty["removed_share"] == 0.0


# ------------------------------------------------------------------ the card's calibration
MODEL = QualityModel("single", ("confidence", "log_volume"), (0.9, 4.0), (0.05, 0.5), (0.1, 0.02), 0.85,
                     (-0.2, 0.1), {"confidence": 0.95, "log_volume": 4.0}, "out of fold: test")


@pytest.mark.parametrize("features, expected", [
    ({"confidence": 0.9, "log_volume": 4.0}, 0.85),  # at the centre: the intercept
    ({"confidence": 0.8, "log_volume": 4.0}, 0.85 + 0.1 * -2),  # two scales below on confidence
    ({"confidence": 0.9, "log_volume": 5.0}, 0.85 + 0.02 * 2),
    ({"confidence": 0.2, "log_volume": 0.0}, 0.0),  # clipped at 0
])
def test_estimate_is_the_stored_linear_model(features, expected):
    assert MODEL.estimate(features) == pytest.approx(expected)


def test_calibration_round_trips_through_a_card_and_bad_ones_are_one_line():
    card = json.loads(json.dumps({"review": {"modes": {"single": MODEL.to_dict()}}}))
    assert QualityModel.from_card(card, "single") == MODEL
    assert QualityModel.from_card(card, "tta") is None  # another mode's calibration never stands in
    assert QualityModel.from_card({}, "single") is None
    for bad in ({"coef": [0.1, "x"]}, {"features": ["confidence", "shoe_size"]}, {"center": [0.9]},
                {"residual_quantiles": [0.1]}, {"intercept": float("nan")}):
        broken = {"review": {"modes": {"single": {**MODEL.to_dict(), **bad}}}}
        with pytest.raises(ModelError, match="review.modes.single is not a quality calibration"):
            QualityModel.from_card(broken, "single")


def test_assess_flags_below_080_with_reasons_that_are_true_as_printed():
    low = {"confidence": 0.8, "log_volume": 4.0, "volume_px": 9999, "flair_copies": 0, "copied_channels": []}
    out = assess(low, MODEL, "single")
    assert out["expected_dsc"] == pytest.approx(0.65) and out["flag"] is True
    assert out["interval"] == [pytest.approx(0.45), pytest.approx(0.75)]
    assert out["reasons"] == ["mean probability inside the mask 0.800 (training patients' median 0.950)"]
    assert "expected DSC 0.650 (90% interval 0.450-0.750) REVIEW: mean probability" in summary_text(out)
    good = assess({**low, "confidence": 0.95}, MODEL, "single")
    assert good["flag"] is False and good["reasons"] == []


def test_no_calibration_means_no_estimate_and_no_ok_but_anomalies_are_named():
    feats = {"volume_px": 0, "copied_channels": ["pre-contrast", "post-contrast"], "flair_copies": 2}
    out = assess(feats, None, "ensemble")
    assert out["expected_dsc"] is None and out["flag"] is None and "uncalibrated" in out["note"]
    assert out["reasons"][0].startswith("pre-contrast and post-contrast are copies of FLAIR")
    assert "no tumor found" in out["reasons"][1]
    assert summary_text(out).startswith("quality uncalibrated: pre-contrast and post-contrast are copies")


def test_every_shipped_mode_has_its_own_calibration():
    from segengine.engine.inference.ensemble import load_plan

    reviews = {m: Review.for_plan(load_plan(None, e, t)) for m, e, t in
               (("single", None, False), ("tta", None, True), ("ensemble", True, False))}
    for mode, review in reviews.items():
        assert review.mode == mode and review.model is not None and review.model.mode == mode
        assert review.reference and len(review.reference["log_mean_median"]) == len(CHANNELS)
    assert "views_disagreement" in reviews["tta"].model.features
    assert reviews["ensemble"].model.calibration.startswith("proxy")
    assert reviews["single"].model.calibration.startswith("out of fold")


# ------------------------------------------------------------------ the fit
def _case(i: int, dsc: float, conf: float) -> dict:
    f = {"confidence": 0.9, "high_share": conf, "log_volume": 4.0 + 0.01 * (i % 3), "uncertain_ratio": 0.2, "removed_share": 0.0,
         "components": 0.7, "flair_copies": 0, "views_disagreement": 0.05}
    return {"patient": f"P{i:02d}", "fold": i % 4, "means": [40.0 + i % 5, 45.0, 50.0],
            "single": {"features": f, "dsc": dsc}, "tta": {"features": f, "dsc": dsc}, "ensemble": {"features": f, "dsc": dsc}}


def test_fit_ranks_by_the_informative_feature_and_scores_left_out_folds():
    """DSC is a monotone function of the confident share here; leaving each fold out, the estimate must
    rank every patient as the truth does and flag exactly the ones below 0.80."""
    from segengine.train.quality_calibration import fit_mode

    rng = np.random.default_rng(1)
    conf = rng.uniform(0.6, 0.99, size=40)
    cases = [_case(i, float(0.3 + 0.65 * (c - 0.6) / 0.39), float(c)) for i, c in enumerate(conf)]
    model, scores, held = fit_mode(cases, "single")
    assert scores["spearman"] == pytest.approx(1.0)
    assert scores["bad_flagged"] == scores["bad"] > 0 and scores["good_flagged"] == 0
    assert model.features[0] == "high_share" and model.coef[0] > 0
    assert model.calibration.startswith("out of fold: 40 CV patients")


# ------------------------------------------------------------------ real runs
def _run(args):
    from click.testing import CliRunner

    from segengine.engine.cli import main

    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return res


def test_run_writes_the_estimate_for_a_real_patient_and_names_a_flair_copy(kaggle_root, tmp_path):
    """The shipped card's calibration gives every real patient an estimate in [0, 1] inside its
    interval; the same patient with pre/post replaced by FLAIR is named as a FLAIR copy."""
    import tifffile

    from conftest import VAL_PATIENTS

    p = VAL_PATIENTS[0]
    copy = tmp_path / "copy" / p
    shutil.copytree(kaggle_root / p, copy)
    for tif in copy.glob(f"{p}_*.tif"):
        if not tif.name.endswith("_mask.tif"):
            img = tifffile.imread(tif)
            tifffile.imwrite(tif, np.repeat(img[..., 1:2], 3, axis=-1))
    for folder, out in ((kaggle_root / p, tmp_path / "plain"), (copy, tmp_path / "copied")):
        res = _run(["run", "--backend", "torch", "--threads", "1", "--patient", str(folder), "--out", str(out)])
        review = json.loads((out / p / "report.json").read_text())["review"]
        assert 0.0 <= review["interval"][0] <= review["expected_dsc"] <= review["interval"][1] <= 1.0
        assert review["flag"] == (review["expected_dsc"] < 0.80)
        assert f"expected DSC {review['expected_dsc']:.3f}" in res.output
        assert "copies of FLAIR" in res.output if out.name == "copied" else "FLAIR" not in res.output
    copied = json.loads((tmp_path / "copied" / p / "report.json").read_text())["review"]
    assert copied["features"]["copied_channels"] == ["pre-contrast", "post-contrast"]
    assert copied["reasons"][0].startswith("pre-contrast and post-contrast are copies of FLAIR")


def test_tta_measures_how_much_the_views_agree(kaggle_root, tmp_path):
    """With --tta the estimate uses the flip views' agreement, measured on this patient and
    recomputed here: the weights on the slices and on their mirror images (mirrored back), each
    view's mask (p > 0.5) scored by Dice against the mask of the two views' mean."""
    from conftest import VAL_PATIENTS
    from segengine.engine.inference.backends.torch_backend import TorchBackend
    from segengine.engine.readers.registry import read_patient
    from segengine.engine.model.spec import load_model_spec
    from segengine.engine.inference.predict import model_input
    from segengine.engine.preprocessing.preprocess import preprocess_patient

    p = VAL_PATIENTS[1]
    _run(["run", "--backend", "torch", "--threads", "1", "--tta", "--patient", str(kaggle_root / p),
          "--out", str(tmp_path / "o")])
    review = json.loads((tmp_path / "o" / p / "report.json").read_text())["review"]
    assert review["calibration"].startswith("out of fold") and "mirrored" in review["calibration"]
    spec = load_model_spec()
    x = model_input(preprocess_patient(read_patient(kaggle_root / p), "native", spec.preprocessing), spec)
    with TorchBackend(spec, threads=1) as backend:
        plain = backend.predict(x)
        mirrored = backend.predict(np.ascontiguousarray(x[..., ::-1]))[..., ::-1]
    mean = (plain + mirrored) / 2 > 0.5
    dices = [2 * (v & mean).sum() / (v.sum() + mean.sum()) for v in (plain > 0.5, mirrored > 0.5)]
    assert 0 < 1 - np.mean(dices) < 1
    assert review["features"]["views_disagreement"] == pytest.approx(1 - np.mean(dices), abs=1e-4)  # a few pixels at p = 0.5 at most


def test_views_agreement_is_the_mean_dice_of_each_view_with_the_mean():
    """Two members on one patient: A marks 4 pixels, B marks 2 of them. The mean marks the 2 both
    see (0.5 is not above 0.5 on the others), so Dice(A, mean) = 2*2/(4+2), Dice(B, mean) = 1."""
    from types import SimpleNamespace

    from segengine.engine.inference.backends.base import Backend
    from segengine.engine.inference.ensemble import AveragingBackend

    class Fixed(Backend):
        def __init__(self, prob):
            super().__init__(SimpleNamespace(), threads=1)
            self.prob = prob

        def load(self):
            return self

        def infer(self, batch):
            return np.repeat(self.prob[None], len(batch), axis=0)

    a, b = np.zeros((4, 4), np.float32), np.zeros((4, 4), np.float32)
    a[0, :4] = 1.0
    b[0, :2] = 1.0
    plan = SimpleNamespace(tta=False)
    backend = AveragingBackend(plan, [Fixed(a), Fixed(b)])
    backend.predict(np.zeros((3, 3, 4, 4), np.float32), batch_size=2)  # two batches, summed over both
    assert backend.last_views_agreement == pytest.approx((2 * 2 / (4 + 2) + 1.0) / 2)
    backend.predict(np.zeros((1, 3, 4, 4), np.float32))
    assert backend.last_views_agreement == pytest.approx((2 * 2 / (4 + 2) + 1.0) / 2)  # per call, not cumulative
