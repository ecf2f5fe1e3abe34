"""Training augmentations, the FLAIR-copy augmentation, the Tversky loss and bf16 training,
each against an expectation computed independently of the code under test."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from segengine.train import robust_aug as ra
from segengine.train import train as train_mod


def _images(n: int = 6, groups: int = 3, size: int = 24, seed: int = 0) -> torch.Tensor:
    """(N, 3 * groups, S, S): groups of (pre, FLAIR, post) with distinct content per modality."""
    return torch.randn(n, 3 * groups, size, size, generator=torch.Generator().manual_seed(seed))


def _gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", list(ra.TRANSFORMS))
def test_each_transform_is_the_identity_at_0_seeded_and_shape_keeping(name):
    x = _images()
    t = ra.TRANSFORMS[name]
    assert torch.equal(t(x, 0.0, _gen()), x)
    a, b = t(x, 1.0, _gen(5)), t(x, 1.0, _gen(5))
    assert torch.equal(a, b) and a.shape == x.shape and torch.isfinite(a).all() and not torch.equal(a, x)


def test_brightness_scales_each_modality_alike_in_every_context_slice():
    x = _images().abs() + 0.5  # positive: ratios are defined
    out = ra.brightness(x, 1.0, _gen())
    ratio = (out / x).reshape(6, 3, 3, -1)  # (N, groups, modality, pixels)
    assert torch.allclose(ratio, ratio[..., :1], atol=1e-5)  # one factor per plane
    assert torch.allclose(ratio[:, :1], ratio, atol=1e-5)  # the same in every context slice
    assert bool(((ratio >= 0.75 - 1e-6) & (ratio <= 1.25 + 1e-6)).all())


def test_noise_is_zero_mean_with_variance_at_most_01():
    x = torch.zeros(64, 3, 32, 32)
    d = ra.noise(x, 1.0, _gen())
    per_slice_var = d.reshape(64, -1).var(dim=1)
    assert abs(float(d.mean())) < 0.01
    assert float(per_slice_var.max()) < 0.1 * 1.15  # U(0, 0.1) variances; 3072 samples per slice
    assert float(per_slice_var.mean()) == pytest.approx(0.05, abs=0.015)  # the mean of U(0, 0.1)


@pytest.mark.parametrize("sigma", [0.5, 0.8, 1.0])
def test_gaussian_blur_matches_scipy(sigma):
    from scipy.ndimage import gaussian_filter

    plane = np.random.default_rng(0).normal(size=(2, 20, 20)).astype(np.float32)
    want = np.stack([gaussian_filter(p, sigma, mode="mirror") for p in plane])
    got = ra.gaussian_blur(torch.from_numpy(plane), sigma).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_blur_touches_one_modality_of_each_slice():
    x = _images()
    out = ra.blur(x, 1.0, _gen())
    changed = (out != x).reshape(6, 3, 3, -1).any(dim=-1)  # (N, group, modality)
    assert bool((changed.sum(dim=2) == 1).all())  # one modality per context slice...
    assert bool((changed == changed[:, :1]).all())  # ... the same one in every context slice


def test_dark_channel_has_few_levels_and_is_normalized_again():
    x = _images(n=4, groups=1, size=32)
    out = ra.dark_channel(x, 1.0, _gen())
    for i in range(4):
        changed = [m for m in range(3) if not torch.equal(out[i, m], x[i, m])]
        assert len(changed) == 1
        ch = out[i, changed[0]]
        assert 6 <= len(torch.unique(ch)) <= 20
        assert float(ch.mean()) == pytest.approx(0.0, abs=1e-4) and float(ch.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)


def test_swap_contrast_exchanges_two_whole_modalities():
    x = _images()
    out = ra.swap_contrast(x, 1.0, _gen())
    g_in, g_out = x.reshape(6, 3, 3, 24, 24), out.reshape(6, 3, 3, 24, 24)
    for i in range(6):
        perm = [next(j for j in range(3) if torch.equal(g_out[i, 0, m], g_in[i, 0, j])) for m in range(3)]
        assert sorted(perm) == [0, 1, 2] and sum(p != m for m, p in enumerate(perm)) == 2  # a transposition
        for g in range(3):
            assert all(torch.equal(g_out[i, g, m], g_in[i, g, perm[m]]) for m in range(3))


def test_apply_draws_nothing_when_every_option_is_off():
    gen = _gen(3)
    before = gen.get_state()
    x = _images()
    assert torch.equal(ra.apply(x, {"brightness_p": 0.0, "noise_p": 0}, gen), x)
    assert torch.equal(gen.get_state(), before)  # v2's random stream is untouched
    assert ra.describe({"noise_p": 0.2}) == "Gaussian noise (variance <= 0.1) on 20% of slices"


@pytest.mark.parametrize("p, copied", [(1.0, True), (0.0, False)])
def test_flair_copy_on_a_known_tensor(p, copied):
    x = _images(n=4, groups=3)
    out = train_mod.flair_copy(x, p, _gen())
    groups_in, groups_out = x.reshape(4, 3, 3, 24, 24), out.reshape(4, 3, 3, 24, 24)
    if copied:  # every modality of every context slice is that slice's FLAIR
        for m in range(3):
            assert torch.equal(groups_out[:, :, m], groups_in[:, :, 1])
    else:
        assert torch.equal(out, x)


def test_tversky_bce_loss_against_a_hand_computation():
    logits = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]]], [[[1.0, 1.0], [-2.0, 0.0]]]])
    target = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]], [[[0.0, 1.0], [0.0, 1.0]]]])
    p = [1 / (1 + np.exp(-v)) for v in logits.flatten().tolist()]
    t = target.flatten().tolist()
    bce = -np.mean([ti * np.log(pi) + (1 - ti) * np.log(1 - pi) for pi, ti in zip(p, t)])
    tp = sum(pi * ti for pi, ti in zip(p, t))
    fp = sum(pi * (1 - ti) for pi, ti in zip(p, t))
    fn = sum((1 - pi) * ti for pi, ti in zip(p, t))
    alpha, beta = 0.3, 0.7
    tversky = 1 - (tp + 1) / (tp + alpha * fp + beta * fn + 1)  # batch=True, smooth 1 (numerator and denominator)
    got = float(train_mod.tversky_bce_loss(alpha, beta)(logits, target))
    assert got == pytest.approx(bce + tversky, rel=1e-5)


def test_bf16_autocast_gives_the_fp32_loss_within_bf16_precision():
    """bfloat16 keeps 8 significant bits (relative step 2**-8 = 0.4%); a small network's loss
    must agree with float32 to a few such steps (2%), as train --amp bf16 relies on."""
    from segengine.engine.model.network import build_model

    torch.manual_seed(0)
    model = build_model({"name": "resunet", "base_channels": 4, "in_channels": 3, "deep_supervision": False}).eval()
    x = torch.randn(2, 3, 64, 64)
    y = (torch.rand(2, 1, 64, 64) > 0.8).float()
    loss = train_mod.tversky_bce_loss(0.3, 0.7)
    with torch.no_grad():
        fp32 = float(loss(model(x).float(), y))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x.contiguous(memory_format=torch.channels_last))
        bf16 = float(loss(out.float(), y))
    assert bf16 == pytest.approx(fp32, rel=0.02)
