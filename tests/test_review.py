"""Review flag: features of a real prediction, rules from the card, calibration on OOF-like cases."""
from __future__ import annotations

import json

import numpy as np
import pytest

from segengine.engine.preprocess import Geometry
from segengine.engine.review import ReviewRules, assess, review_features
from segengine.train import review_calibration as cal

GEOM = Geometry(num_slices=4, height=8, width=8, z0=0, z1=4, y0=0, y1=8, x0=0, x1=8, pad_y=(0, 0), pad_x=(0, 0), size=8)


def _prob(values: dict[tuple[int, int, int], float]) -> np.ndarray:
    p = np.zeros((4, 8, 8), dtype=np.float32)
    for idx, v in values.items():
        p[idx] = v
    return p


def test_features_are_computed_from_the_prediction():
    prob = _prob({(1, 2, 2): 0.9, (1, 2, 3): 0.6, (2, 2, 2): 0.95, (2, 6, 6): 0.7})
    mask = np.zeros_like(prob, dtype=bool)
    mask[1, 2, 2] = mask[1, 2, 3] = mask[2, 2, 2] = True  # the largest component
    f = review_features(prob, mask, GEOM, tta_mask=mask)
    assert f["volume_px"] == 3
    assert f["confidence"] == pytest.approx((0.9 + 0.6 + 0.95) / 3)
    assert f["uncertain_share"] == pytest.approx(2 / 3)  # 0.6 and 0.7 lie in (0.2, 0.8)
    assert f["removed_share"] == pytest.approx(1 / 4)  # one of four thresholded voxels dropped
    assert f["volume_share"] == pytest.approx(3 / (4 * 8 * 8))
    assert f["tta_agreement"] == 1.0
    assert f["touches_volume_end"] is False
    mask[3, 0, 0] = True
    assert review_features(prob, mask, GEOM)["touches_volume_end"] is True


@pytest.mark.parametrize("rules, features, reasons", [
    (ReviewRules(min_confidence=0.8), {"confidence": 0.7}, ["low confidence"]),
    (ReviewRules(min_confidence=0.8), {"confidence": 0.9}, []),
    (ReviewRules(min_volume_px=10), {"volume_px": 0, "confidence": None}, ["tiny or empty"]),
    (ReviewRules(max_removed_share=0.1), {"removed_share": 0.3}, ["fragmented"]),
    (ReviewRules(min_tta_agreement=0.9), {"tta_agreement": None}, []),  # no TTA run: not judged
    (ReviewRules(min_tta_agreement=0.9), {"tta_agreement": 0.8}, ["flip TTA disagrees"]),
    (ReviewRules(flag_border=True, max_volume_share=0.05), {"touches_volume_end": True, "volume_share": 0.1},
     ["implausibly large", "first or last slice"]),
])
def test_rules_table(rules, features, reasons):
    base = {"volume_px": 100, "confidence": 0.9, "uncertain_share": 0.1, "volume_share": 0.01,
            "removed_share": 0.0, "tta_agreement": None, "touches_volume_end": False}
    out = assess({**base, **features}, rules)
    assert out["flag"] == bool(reasons)
    assert len(out["reasons"]) == len(reasons)
    for got, want in zip(out["reasons"], reasons):
        assert want in got


def test_no_rules_means_no_flag_and_says_why():
    out = assess({"volume_px": 0}, None)
    assert out["flag"] is False and "no review rules are calibrated" in out["note"]


def test_rules_round_trip_through_a_card():
    rules = ReviewRules(min_confidence=0.71, max_removed_share=0.2)
    card = {"review": {"rules": {k: v for k, v in rules.to_dict().items() if v not in (None, False)}}}
    assert ReviewRules.from_card(json.loads(json.dumps(card))) == rules
    assert ReviewRules.from_card({}) is None


def test_calibration_catches_bad_cases_within_the_good_budget(tmp_path):
    """Bad patients have low confidence; one good patient too. The fitted rule must catch
    every bad one and flag at most 20% of the good ones, and the leave-one-fold-out count
    is computed on folds the rule was not fitted on."""
    rng = np.random.default_rng(0)
    per_patient = {}
    for i in range(40):
        bad = i < 8
        conf = rng.uniform(0.55, 0.7) if bad or i == 8 else rng.uniform(0.8, 0.95)
        per_patient[f"P{i:02d}"] = {"dsc": 0.6 if bad else 0.9, "fold": i % 4, "review_features": {
            "volume_px": 1000, "confidence": conf, "uncertain_share": 0.1, "volume_share": 0.01,
            "removed_share": 0.0, "tta_agreement": None, "touches_volume_end": False}}
    cv_json = tmp_path / "cv.json"
    cv_json.write_text(json.dumps({"variants": {"native_lcc": {"per_patient": per_patient}}}))
    cases = cal.load_cases(cv_json)
    rules = cal.fit(cases, bad=0.8, max_good_flagged=0.2)
    c = cal.counts(cases, cal.flags(cases, rules), 0.8)
    assert c["bad_flagged"] == c["bad"] == 8
    assert c["good_flagged"] <= 0.2 * c["good"]
    assert rules.min_confidence is not None and 0.7 <= rules.min_confidence <= 0.8
    card = tmp_path / "card.json"
    card.write_text("{}")
    assert cal.main([str(cv_json), "--write-card", str(card)]) == 0
    stored = json.loads(card.read_text())["review"]
    assert stored["leave_one_fold_out"]["bad"] == 8 and stored["in_sample"]["bad_flagged"] == 8
    one_fold = {p: {**r, "fold": 0} for p, r in per_patient.items()}
    cv_json.write_text(json.dumps({"variants": {"native_lcc": {"per_patient": one_fold}}}))
    assert cal.main([str(cv_json), "--write-card", str(card)]) == 0
    assert json.loads(card.read_text())["review"]["leave_one_patient_out"]["bad"] == 8


# ------------------------------------------------------------------ the flag in real runs
def test_run_writes_the_review_flag_and_the_batch_lists_flagged_patients(kaggle_root, tmp_path):
    """A card whose rules demand near-certainty flags both real patients; the recomputed
    confidence inside each written mask is what the report says it is."""
    import shutil

    import tifffile
    from click.testing import CliRunner

    from conftest import VAL_PATIENTS, copy_model
    from segengine.engine.cli import main
    from segengine.engine.model import shipped_model_path

    model = copy_model(shipped_model_path(), tmp_path / "model")
    card = json.loads(model.with_suffix(".json").read_text())
    card["review"] = {"rules": {"min_confidence": 0.999}}
    model.with_suffix(".json").write_text(json.dumps(card))
    root = tmp_path / "root"
    for p in VAL_PATIENTS:
        shutil.copytree(kaggle_root / p, root / p)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["run", "--model", str(model), "--backend", "torch", "--patients", str(root),
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert f"flagged for review: {len(VAL_PATIENTS)} of {len(VAL_PATIENTS)} done" in res.output
    for p in VAL_PATIENTS:
        rep = json.loads((out / p / "report.json").read_text())
        assert rep["review"]["flag"] is True and "low confidence" in rep["review"]["reasons"][0]
        masks = np.stack([tifffile.imread(out / p / f"{p}_{n}_mask.tif") > 0 for n in rep["slice_numbers"]])
        assert rep["review"]["features"]["volume_px"] == int(masks.sum())
        assert f"review: {p}: low confidence" in res.output
    # without calibrated rules: not flagged, and the report says why
    plain = copy_model(shipped_model_path(), tmp_path / "plain")
    card.pop("review")
    plain.with_suffix(".json").write_text(json.dumps(card))
    res = CliRunner().invoke(main, ["run", "--model", str(plain), "--backend", "torch", "--patient",
                                    str(root / VAL_PATIENTS[0]), "--out", str(tmp_path / "out2")])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "out2" / VAL_PATIENTS[0] / "report.json").read_text())
    assert rep["review"]["flag"] is False and "no review rules are calibrated" in rep["review"]["note"]
