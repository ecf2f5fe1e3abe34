"""Networks: segengine's residual U-Net and the course's reference U-Net (for comparison).

Both take (N, C, 256, 256) normalized slices (C = in_channels: 3, or 3 per slice of a 2.5D
ResUNet's context) and return (N, 1, 256, 256) logits, so every
backend, export and evaluation works on the reference grid. The residual U-Net runs at
half resolution inside (a stride-2 stem, a bilinear x2 head): 1/14 of the reference cost.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ResBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Identity() if cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x), inplace=True)


class ResUNet(nn.Module):
    """4-level residual U-Net working at ``input_size / stem_stride`` internally.

    With ``deep_supervision`` the training forward also returns logits of the two
    coarsest decoder levels (upsampled to the input size); eval returns one tensor.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 16, depth: int = 4, stem_stride: int = 2,
                 deep_supervision: bool = True, refine_channels: int = 0):
        super().__init__()
        c = base_channels
        widths = [c * 2**i for i in range(depth + 1)]
        self.stem_stride = stem_stride
        self.in_channels = in_channels
        self.stem = _conv_bn_relu(in_channels, c, stride=stem_stride)
        self.encoders = nn.ModuleList([ResBlock(c, widths[0])] + [ResBlock(widths[i - 1], widths[i]) for i in range(1, depth + 1)])
        self.ups = nn.ModuleList([nn.ConvTranspose2d(widths[i], widths[i - 1], 2, stride=2) for i in range(depth, 0, -1)])
        self.decoders = nn.ModuleList([ResBlock(widths[i - 1] * 2, widths[i - 1]) for i in range(depth, 0, -1)])
        self.head = nn.Conv2d(widths[0], 1, 1)
        # Optional full-resolution refinement: boundaries are scored on the 256 grid, and the
        # half-resolution decoder can only place them by bilinear interpolation of its logits.
        # A thin branch of full-resolution input features fused with the upsampled decoder
        # features lets the network move an edge by one input pixel for ~0.3 GFLOP.
        self.refine_channels = refine_channels
        if refine_channels:
            if stem_stride != 2:
                raise ValueError("refine_channels needs stem_stride 2")
            r = refine_channels
            self.fine = _conv_bn_relu(in_channels, r)
            self.refine = nn.Sequential(_conv_bn_relu(widths[0] + r, r), _conv_bn_relu(r, r))
            self.refine_head = nn.Conv2d(r, 1, 1)
        self.deep_supervision = deep_supervision
        if deep_supervision:
            # decoder outputs at 1/8 and 1/4 of the internal resolution
            self.aux_heads = nn.ModuleList([nn.Conv2d(widths[2], 1, 1), nn.Conv2d(widths[1], 1, 1)])

    def forward(self, x: torch.Tensor):
        size = x.shape[-2:]
        h = self.stem(x)
        skips = []
        for i, enc in enumerate(self.encoders):
            if i > 0:
                h = F.max_pool2d(h, 2)
            h = enc(h)
            skips.append(h)
        h = skips.pop()
        aux = []
        for j, (up, dec) in enumerate(zip(self.ups, self.decoders)):
            h = dec(torch.cat([up(h), skips.pop()], dim=1))
            if self.deep_supervision and self.training and j in (1, 2):
                aux.append(F.interpolate(self.aux_heads[j - 1](h), size=size, mode="bilinear", align_corners=False))
        logits = self.head(h)
        if self.stem_stride != 1:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        if self.refine_channels:
            up = F.interpolate(h, size=size, mode="bilinear", align_corners=False)
            fine = self.refine_head(self.refine(torch.cat([up, self.fine(x)], dim=1)))
            # the half-resolution logits become a deep-supervision output of the refined ones
            if self.deep_supervision and self.training:
                aux.insert(0, logits)
            logits = logits + fine
        if aux:
            return [logits] + aux
        return logits


class ReferenceUNet(nn.Module):
    """The course's reference U-Net (4 levels, 32 base channels, plain conv blocks)."""

    def __init__(self, in_channels: int = 3, base_channels: int = 32):
        super().__init__()
        f = base_channels

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(_conv_bn_relu(cin, cout), _conv_bn_relu(cout, cout))

        self.encoders = nn.ModuleList([block(in_channels, f), block(f, 2 * f), block(2 * f, 4 * f), block(4 * f, 8 * f)])
        self.bottleneck = block(8 * f, 16 * f)
        self.ups = nn.ModuleList([nn.ConvTranspose2d(16 * f // 2**i, 8 * f // 2**i, 2, stride=2) for i in range(4)])
        self.decoders = nn.ModuleList([block(16 * f // 2**i, 8 * f // 2**i) for i in range(4)])
        self.head = nn.Conv2d(f, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        h = x
        for enc in self.encoders:
            h = enc(h)
            skips.append(h)
            h = F.max_pool2d(h, 2)
        h = self.bottleneck(h)
        for up, dec in zip(self.ups, self.decoders):
            h = dec(torch.cat([up(h), skips.pop()], dim=1))
        return self.head(h)


ARCHITECTURES = {"resunet": ResUNet, "reference_unet": ReferenceUNet}


def build_model(arch: dict[str, Any]) -> nn.Module:
    """Build from a model card's ``architecture`` entry: {"name": ..., **kwargs}."""
    kwargs = dict(arch)
    name = kwargs.pop("name")
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r} (known: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[name](**kwargs)


def count_flops(model: nn.Module, size: int = 256) -> int:
    """FLOPs (2 x multiply-accumulates) of one eval forward on a (1, C, size, size) slice."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, getattr(model, "in_channels", 3), size, size))
    model.train(was_training)
    return int(counter.get_total_flops())


class ProbabilityModel(nn.Module):
    """Logits model + sigmoid: what is exported and what backends return."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(x))
