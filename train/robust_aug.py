"""Intensity augmentations aimed at the cross-validation failures (issue 23), each behind a
``segengine train`` option and off by default.

Why each exists:

- ``brightness`` / ``noise`` / ``blur``: nnU-Net's intensity set (multiplicative brightness
  0.75-1.25, Gaussian noise of variance up to 0.1, Gaussian blur sigma 0.5-1.0): scanner and
  site differences the fixed gain/bias of ``train.augment`` does not span.
- ``dark_channel``: TCGA_HT_A61A's FLAIR is the darkest of the 90 (a few grey levels over the
  brain); after per-channel normalization a dark channel is a coarsely quantized one. One
  modality is re-quantized to 6-20 levels and re-normalized.
- ``swap_contrast``: sequences whose contrast looks swapped (HT_A61A's lesion is brighter in
  pre/post than in FLAIR): two modalities exchange places.

Images are (N, C, H, W) with C = 3 per slice of a 2.5D context (``model.SLICE_CHANNELS``):
every transform treats one modality alike in every context slice, as a scan would.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from segengine.engine.model.spec import SLICE_CHANNELS


def _groups(images: torch.Tensor) -> torch.Tensor:
    """(N, G, 3, H, W) view: G context slices of three modalities."""
    n, c = images.shape[:2]
    return images.reshape(n, c // SLICE_CHANNELS, SLICE_CHANNELS, *images.shape[2:])


def _pick(n: int, p: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen) < p


def brightness(images: torch.Tensor, p: float, gen: torch.Generator, lo: float = 0.75, hi: float = 1.25) -> torch.Tensor:
    """Multiply each modality of a share ``p`` of slices by its own factor in [lo, hi]."""
    n = images.shape[0]
    factor = lo + (hi - lo) * torch.rand(n, 1, SLICE_CHANNELS, 1, 1, generator=gen)
    factor = torch.where(_pick(n, p, gen)[:, None, None, None, None], factor, torch.ones_like(factor))
    return (_groups(images) * factor).reshape(images.shape)


def noise(images: torch.Tensor, p: float, gen: torch.Generator, max_variance: float = 0.1) -> torch.Tensor:
    """Add Gaussian noise of variance U(0, max_variance) to a share ``p`` of slices."""
    n = images.shape[0]
    sigma = torch.sqrt(max_variance * torch.rand(n, 1, 1, 1, generator=gen))
    picked = torch.nonzero(_pick(n, p, gen)).flatten()
    out = images.clone()  # noise drawn for the picked slices only (a whole batch of it costs ~0.1 s)
    out[picked] += sigma[picked] * torch.randn((len(picked), *images.shape[1:]), generator=gen)
    return out


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Normalized 1D Gaussian taps out to ``truncate`` sigmas (scipy.ndimage's default reach)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (C, H, W) planes, edges mirrored (scipy.ndimage's "mirror")."""
    k = gaussian_kernel(sigma)
    r = (len(k) - 1) // 2
    x = image[:, None]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return x[:, 0]


def blur(images: torch.Tensor, p: float, gen: torch.Generator, lo: float = 0.5, hi: float = 1.0) -> torch.Tensor:
    """Blur one random modality (every context slice of it) of a share ``p`` of slices, sigma U(lo, hi)."""
    n = images.shape[0]
    picked = _pick(n, p, gen)
    sigmas = lo + (hi - lo) * torch.rand(n, generator=gen)
    modality = torch.randint(0, SLICE_CHANNELS, (n,), generator=gen)
    out = _groups(images).clone()
    for i in torch.nonzero(picked).flatten().tolist():
        m = int(modality[i])
        out[i, :, m] = gaussian_blur(out[i, :, m], float(sigmas[i]))
    return out.reshape(images.shape)


def dark_channel(images: torch.Tensor, p: float, gen: torch.Generator, levels: tuple[int, int] = (6, 20)) -> torch.Tensor:
    """Re-quantize one modality of a share ``p`` of slices to ``levels`` grey levels over its
    range, then z-normalize it again (what per-channel normalization makes of a very dark scan)."""
    n = images.shape[0]
    picked = _pick(n, p, gen)
    modality = torch.randint(0, SLICE_CHANNELS, (n,), generator=gen)
    count = torch.randint(levels[0], levels[1] + 1, (n,), generator=gen)
    out = _groups(images).clone()
    for i in torch.nonzero(picked).flatten().tolist():
        ch = out[i, :, int(modality[i])]
        lo, hi = ch.min(), ch.max()
        q = torch.round((ch - lo) / (hi - lo + 1e-6) * (int(count[i]) - 1))
        out[i, :, int(modality[i])] = (q - q.mean()) / (q.std(unbiased=False) + 1e-6)
    return out.reshape(images.shape)


SWAPS = ((0, 1), (1, 2), (0, 2))  # pre<->FLAIR, FLAIR<->post, pre<->post


def swap_contrast(images: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Exchange two modalities (one of SWAPS, every context slice alike) in a share ``p`` of slices."""
    n = images.shape[0]
    picked = _pick(n, p, gen)
    which = torch.randint(0, len(SWAPS), (n,), generator=gen)
    out = _groups(images).clone()
    for i in torch.nonzero(picked).flatten().tolist():
        a, b = SWAPS[int(which[i])]
        out[i, :, [a, b]] = out[i, :, [b, a]]
    return out.reshape(images.shape)


def _unit_range(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each slice's per-modality (min, max) over its context slices and pixels, (N, 1, 3, 1, 1) each."""
    lo = groups.amin(dim=(1, 3, 4), keepdim=True)
    hi = groups.amax(dim=(1, 3, 4), keepdim=True)
    return lo, hi


def gamma(images: torch.Tensor, p: float, gen: torch.Generator, lo: float = 0.7, hi: float = 1.5) -> torch.Tensor:
    """nnU-Net's gamma (0.7-1.5, log-uniform) on each modality's [min, max] range, every context slice
    alike, in a share ``p`` of slices: a display transfer or another scanner's contrast curve."""
    n = images.shape[0]
    g = _groups(images)
    vmin, vmax = _unit_range(g)
    span = (vmax - vmin).clamp_min(1e-6)
    unit = ((g - vmin) / span).clamp(0, 1)
    gam = torch.exp(math.log(lo) + (math.log(hi) - math.log(lo)) * torch.rand(n, 1, SLICE_CHANNELS, 1, 1, generator=gen))
    picked = _pick(n, p, gen)[:, None, None, None, None]
    return torch.where(picked, vmin + unit.pow(gam) * span, g).reshape(images.shape)


def bias_field(images: torch.Tensor, p: float, gen: torch.Generator, strength: float = 0.3) -> torch.Tensor:
    """A smooth multiplicative field (exp of a random quadratic over the slice, up to about
    +-``strength``) on each modality above its minimum, in a share ``p`` of slices: coil shading."""
    n, _, h, w = images.shape
    g = _groups(images)
    vmin, _ = _unit_range(g)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    basis = torch.stack([xx, yy, xx * yy, xx * xx - 1 / 3, yy * yy - 1 / 3])  # (5, H, W)
    coef = (torch.rand(n, SLICE_CHANNELS, 5, generator=gen) * 2 - 1) * (strength / 2)
    field = torch.exp(torch.einsum("nck,khw->nchw", coef, basis))[:, None]  # (N, 1, 3, H, W)
    picked = _pick(n, p, gen)[:, None, None, None, None]
    return torch.where(picked, vmin + (g - vmin) * field, g).reshape(images.shape)


# option name -> transform, in the order train.py applies them (after the spatial augmentation)
TRANSFORMS = {"brightness_p": brightness, "noise_p": noise, "blur_p": blur, "dark_channel_p": dark_channel,
              "swap_contrast_p": swap_contrast, "gamma_p": gamma, "bias_field_p": bias_field}


def apply(images: torch.Tensor, options: dict, gen: torch.Generator) -> torch.Tensor:
    """Every transform whose probability in ``options`` is above 0 (none draw random numbers otherwise,
    so a run without them keeps v2's random stream)."""
    for name, transform in TRANSFORMS.items():
        p = float(options.get(name) or 0.0)
        if p > 0:
            images = transform(images, p, gen)
    return images


def describe(options: dict) -> str:
    """The card's words for the options used ("" for none)."""
    words = {"brightness_p": "brightness 0.75-1.25", "noise_p": "Gaussian noise (variance <= 0.1)",
             "blur_p": "Gaussian blur (sigma 0.5-1.0)", "dark_channel_p": "a modality re-quantized to 6-20 levels",
             "swap_contrast_p": "two modalities swapped", "gamma_p": "gamma 0.7-1.5 per modality",
             "bias_field_p": "a smooth bias field (+-30%) per modality"}
    used = [f"{words[k]} on {float(options[k]):.0%} of slices" for k in TRANSFORMS if float(options.get(k) or 0) > 0]
    return ", ".join(used)

