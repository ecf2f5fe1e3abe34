"""The component rule and the paired comparison it is judged by (hand-made volumes)."""
from __future__ import annotations

import numpy as np
import pytest

from segengine.engine.core.errors import ModelError
from segengine.engine.postprocessing.postprocess import (PostprocessConfig, component_stats, largest_component, postprocess,
                                                        postprocess_with_sizes)


def _volume() -> np.ndarray:
    """Three components: 6 voxels at p 0.6, 4 voxels at p 0.99, 1 voxel at p 0.95."""
    prob = np.zeros((3, 10, 10), np.float32)
    prob[1, 0, :6] = 0.6
    prob[1, 5, :4] = 0.99
    prob[1, 9, 9] = 0.95
    return prob


@pytest.mark.parametrize("rule, kept", [
    ({}, {"big"}),  # the default: the largest component (v2)
    ({"rank_by": "mass"}, {"sure"}),  # mass 3.96 against the largest's 3.6: the confident one first, alone
    ({"rank_by": "size", "keep_mass_ratio": 0.5, "keep_min_peak": 0.9}, {"big", "sure"}),  # 3.96 >= 0.5 * 3.6, peak .99
    ({"rank_by": "size", "keep_mass_ratio": 0.5, "keep_min_peak": 0.995}, {"big"}),  # no other peak that high
    ({"rank_by": "size", "keep_mass_ratio": 0.2, "keep_min_peak": 0.9}, {"big", "sure", "speck"}),  # .95 >= .2 * 3.6
])
def test_rules_keep_the_components_they_say(rule, kept):
    prob = _volume()
    where = {"big": (1, 0, 0), "sure": (1, 5, 0), "speck": (1, 9, 9)}
    mask = postprocess(prob, PostprocessConfig(**rule))
    assert {k for k, idx in where.items() if mask[idx]} == kept
    assert mask.sum() == sum({"big": 6, "sure": 4, "speck": 1}[k] for k in kept)  # whole components only
    if rule == {}:
        assert np.array_equal(mask, largest_component(prob > 0.5))


@pytest.mark.parametrize("config, sizes", [
    (PostprocessConfig(), [6, 4, 1]),
    (PostprocessConfig(rank_by="mass"), [6, 4, 1]),
    (PostprocessConfig(threshold=0.7), [4, 1]),  # the 0.6 component is below the threshold
    (PostprocessConfig.none(), None),  # no component step: the quality features label it themselves
])
def test_postprocess_hands_the_component_sizes_to_the_quality_features(config, sizes):
    """Labelled once: the sizes post-processing returns are the ones the quality features would count."""
    from segengine.engine.postprocessing.quality import prediction_features

    prob = _volume()
    mask, got = postprocess_with_sizes(prob, config)
    assert np.array_equal(mask, postprocess(prob, config))
    assert (got is None) == (sizes is None) and (got is None or list(got) == sizes)
    assert prediction_features(prob, mask, config.threshold, got) == prediction_features(prob, mask, config.threshold)


def test_component_stats_by_hand():
    _, stats = component_stats(_volume(), _volume() > 0.5)
    assert sorted(stats["size"]) == [1, 4, 6]
    assert sorted(np.round(stats["mass"], 4)) == [0.95, 3.6, 3.96]
    assert sorted(np.round(stats["peak"], 4)) == [0.6, 0.95, 0.99]


def test_card_rule_and_bad_rules():
    assert PostprocessConfig.from_card({}) == PostprocessConfig()
    card = {"postprocess": {"rank_by": "mass", "keep_mass_ratio": 0.3, "keep_min_peak": 0.9, "fitted": "text"}}
    post = PostprocessConfig.from_card(card, fill_holes_2d=True)
    assert (post.rank_by, post.keep_mass_ratio, post.keep_min_peak, post.fill_holes_2d) == ("mass", 0.3, 0.9, True)
    assert PostprocessConfig.from_card(card, largest_component=False).rule_name == "every component"
    for bad in ({"rank_by": "colour"}, {"keep_mass_ratio": "x"}, {"keep_min_peak": True}):
        with pytest.raises(ModelError, match="postprocess rule"):
            PostprocessConfig.from_card({"postprocess": bad})


def test_oracle_is_the_best_subset_and_case_dsc_counts_overlaps():
    from segengine.train.component_rule import case_dsc, oracle_dsc

    # components of 10 (8 true), 4 (4 true), 6 (0 true) voxels; 14 true voxels in all
    case = {"stats": {"size": np.array([10.0, 4.0, 6.0]), "mass": np.array([9.0, 3.9, 5.0]),
                      "peak": np.array([1.0, 0.99, 0.9])}, "inter": np.array([8.0, 4.0, 0.0]), "truth": 14.0}
    assert case_dsc(case, {"rank_by": "size", "keep_mass_ratio": 2.0, "keep_min_peak": 1.0}) == pytest.approx(16 / 24)
    assert oracle_dsc(case) == pytest.approx(2 * 12 / (14 + 14))  # the first two, not the false third


@pytest.mark.parametrize("values, lo, hi", [
    (np.full(30, 0.02), 0.02, 0.02),  # no spread: the CI is the value
    (np.r_[np.zeros(50), np.ones(50)], 0.5 - 1.96 * 0.05, 0.5 + 1.96 * 0.05),  # sd 0.5/sqrt(100) = 0.05
])
def test_bootstrap_ci_matches_the_normal_approximation(values, lo, hi):
    from segengine.train.paired import bootstrap_mean_ci

    got = bootstrap_mean_ci(values)
    assert got == pytest.approx((lo, hi), abs=0.01)


def test_component_stats_agree_with_scipy_on_many_components():
    """The per-component sums and peaks (computed over the mask's voxels only, for speed) equal
    scipy.ndimage's whole-volume measurements on a volume of hundreds of components."""
    import scipy.ndimage as ndi

    rng = np.random.default_rng(0)
    prob = ndi.gaussian_filter(rng.random((12, 64, 64)), 1.5)
    prob = ((prob - prob.min()) / (prob.max() - prob.min())).astype(np.float32)
    labels, stats = component_stats(prob, prob > 0.55)
    index = np.arange(1, labels.max() + 1)
    assert len(index) > 50
    np.testing.assert_array_equal(stats["size"], ndi.sum_labels(np.ones_like(prob), labels, index))
    np.testing.assert_allclose(stats["mass"], ndi.sum_labels(prob, labels, index), rtol=1e-6)
    np.testing.assert_array_equal(stats["peak"], ndi.maximum(prob, labels, index))


def _cv_result(recipe: str, dscs: dict[str, float], variant: str = "native_lcc") -> dict:
    return {"recipe": recipe, "variants": {variant: {"per_patient": {p: {"dsc": d} for p, d in dscs.items()}}}}


# (A's DSCs, B's DSCs, lines expected in the comparison, worked out by hand)
COMPARISONS = [
    # P0 and P4 scored by one side only; differences B - A: P1 +0.1, P2 0, P3 -0.3 -> mean -0.2 / 3.
    # Wilcoxon drops the zero: ranks 1 (+) and 2 (-), W+ = 1 of the equally likely 0..3, two-sided p = 1.
    ({"P0": 0.9, "P1": 0.5, "P2": 0.6, "P3": 0.7}, {"P1": 0.6, "P2": 0.6, "P3": 0.4, "P4": 0.1},
     ["native_lcc: 3 patients in common", "A: mean 0.6000 median 0.6000 min 0.5000",
      "B: mean 0.5333 median 0.6000 min 0.4000", "B - A: mean -0.0667", "better on 1, worse on 1, Wilcoxon p = 1.000",
      "largest losses: P3 -0.300, P2 +0.000, P1 +0.100", "largest |difference|: P3 -0.30000"]),
    # B raises one of two patients by 0.06: mean +0.03
    ({"P1": 0.8, "P2": 0.7}, {"P1": 0.86, "P2": 0.7}, ["2 patients in common", "B - A: mean +0.0300", "better on 1, worse on 0"]),
    # identical scores: a zero difference and no test on all-zero differences
    ({"P1": 0.8, "P2": 0.7}, {"P1": 0.8, "P2": 0.7}, ["B - A: mean +0.0000 (paired bootstrap 95% CI +0.0000 to +0.0000), "
                                                      "better on 0, worse on 0\n"]),
    ({"P1": 0.8}, {"P2": 0.8}, ["no patients in common"]),
]


@pytest.mark.parametrize("a, b, expected", COMPARISONS)
def test_paired_comparison_against_hand_computed_figures(a, b, expected):
    from segengine.train.paired import compare

    text = compare(_cv_result("A", a), _cv_result("B", b))
    for line in expected:
        assert line in text, (line, text)


def test_paired_comparison_ci_lies_within_the_differences_and_compares_variants():
    """A bootstrap mean of resampled differences cannot leave [min, max] of the differences; with
    ``variant_b`` one result's two scorings are compared (the component rule's use)."""
    import re

    from segengine.train.paired import compare

    res = _cv_result("A", {"P1": 0.5, "P2": 0.6, "P3": 0.7})
    res["variants"]["other"] = {"per_patient": {"P1": {"dsc": 0.6}, "P2": {"dsc": 0.6}, "P3": {"dsc": 0.4}}}
    text = compare(res, res, "native_lcc", "other")
    assert text.startswith("native_lcc vs other: 3 patients in common")
    lo, hi = map(float, re.search(r"CI ([-+.\d]+) to ([-+.\d]+)", text).groups())
    assert -0.3 <= lo < -0.2 / 3 < hi <= 0.1
