"""overlay.png and slices.gif: FLAIR with the prediction's outline (orange) and the truth's (sky blue).

The two colours are Okabe and Ito's colour-blind-safe pair (told apart with every common
colour-vision deficiency, unlike red and green), the outlines two pixels wide (inside the
mask, so the anatomy around it stays visible), and overlay.png names each tile's slice number
and carries its own legend.
"""
from __future__ import annotations

import math

import numpy as np

from segengine.engine.postprocessing.postprocess import border
from segengine.engine.readers.volume import PatientVolume

TRUTH_COLOR, PRED_COLOR = (86, 180, 233), (230, 159, 0)  # outlines: ground truth sky blue, prediction orange


OUTLINE_WIDTH = 2  # pixels, inside the mask's edge


SHEET_GRAYS = 254  # overlay.png is a palette image: 254 gray levels, then the two outline colors


LEGEND_HEIGHT = 18  # pixels: overlay.png's legend strip under the tiles


def outline(mask: np.ndarray, width: int = OUTLINE_WIDTH) -> np.ndarray:
    """Each slice's outline ``width`` pixels thick, inside the mask (a mask thinner than that: all of it)."""
    from scipy import ndimage as ndi

    mask = np.asarray(mask, dtype=bool)
    if width <= 1:
        return border(mask, per_slice=True)
    structure = np.zeros((3,) * mask.ndim, dtype=bool)
    structure[(1,) * (mask.ndim - 2)] = ndi.generate_binary_structure(2, 1)
    return mask & ~ndi.binary_erosion(mask, structure=structure, iterations=width, border_value=0)


def _stretched_flair(images: np.ndarray) -> np.ndarray:
    """FLAIR channel (index 1) of (..., H, W, 3) uint8 slices, each stretched to [0, 1] (1st-99.5th percentile)."""
    f = images[..., 1].astype(np.float32)
    lo, hi = np.percentile(f, (1, 99.5), axis=(-2, -1), keepdims=True)
    return np.clip((f - lo) / np.maximum(hi - lo, np.float32(1e-6)), 0, 1)


def flair_rgb(images: np.ndarray) -> np.ndarray:
    """FLAIR channel (index 1) of (..., H, W, 3) uint8 slices, each contrast-stretched to gray RGB."""
    return np.repeat((_stretched_flair(images) * 255).astype(np.uint8)[..., None], 3, axis=-1)


def overlay_slices(images: np.ndarray, pred: np.ndarray, truth: np.ndarray | None) -> np.ndarray:
    """(N, H, W, 3) FLAIR tiles with the outline of each slice's prediction (orange) and truth (sky blue)."""
    rgb = flair_rgb(images)
    if truth is not None:
        rgb[outline(truth)] = TRUTH_COLOR
    rgb[outline(pred)] = PRED_COLOR
    return rgb


def overlay_slice(image_slice: np.ndarray, pred: np.ndarray, truth: np.ndarray | None) -> np.ndarray:
    """One HxWx3 tile of :func:`overlay_slices`."""
    return overlay_slices(image_slice[None], pred[None], None if truth is None else truth[None])[0]


def contact_sheet(volume: PatientVolume, pred: np.ndarray, truth: np.ndarray | None, max_tiles: int = 20,
                  columns: int = 5):
    """Slices with tumor (predicted or true): FLAIR, predicted outline orange, ground truth sky blue,
    each tile's slice number in its top-left corner and a legend strip under the tiles.

    A palette ("P") PIL image: one byte per pixel, so writing it as PNG is a third of the
    work of the RGB sheet (and a smaller file), at 254 gray levels instead of 256.
    """
    from PIL import Image

    has = pred.any(axis=(1, 2)) | (truth.any(axis=(1, 2)) if truth is not None else False)
    idx = np.flatnonzero(has)
    if idx.size == 0:
        idx = np.array([volume.num_slices // 2])
    if idx.size > max_tiles:
        idx = idx[np.linspace(0, idx.size - 1, max_tiles).round().astype(int)]
    tiles = (_stretched_flair(volume.image[idx]) * (SHEET_GRAYS - 1)).astype(np.uint8)
    if truth is not None:
        tiles[outline(truth[idx])] = SHEET_GRAYS
    tiles[outline(pred[idx])] = SHEET_GRAYS + 1
    n, h, w = tiles.shape
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * cols, h, w), dtype=np.uint8)
    grid[:n] = tiles
    body = grid.reshape(rows, cols, h, w).transpose(0, 2, 1, 3).reshape(rows * h, cols * w)
    legend = _legend_items(truth is not None)
    width = max(body.shape[1], _legend_width(legend))
    canvas = np.zeros((body.shape[0] + LEGEND_HEIGHT, width), dtype=np.uint8)
    canvas[: body.shape[0], : body.shape[1]] = body
    sheet = Image.fromarray(canvas, "P")
    _label_tiles(sheet, [volume.slice_numbers[i] for i in idx], cols, h, w)
    _draw_legend(sheet, legend, body.shape[0])
    grays = np.linspace(0, 255, SHEET_GRAYS).round().astype(np.uint8)
    sheet.putpalette(np.concatenate([np.repeat(grays, 3), TRUTH_COLOR, PRED_COLOR]).astype(np.uint8).tobytes())
    return sheet


WHITE, BLACK = SHEET_GRAYS - 1, 0  # palette indices of the text and its background


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _legend_items(with_truth: bool) -> list[tuple[int | None, str]]:
    """(palette index of the swatch or None, text) of overlay.png's legend."""
    items = [(SHEET_GRAYS + 1, "predicted outline")]
    items.append((SHEET_GRAYS, "ground truth outline") if with_truth else (None, "no ground truth given"))
    return items + [(None, "n = slice number")]


def _legend_width(items: list[tuple[int | None, str]]) -> int:
    from PIL import Image, ImageDraw

    draw = ImageDraw.Draw(Image.new("P", (1, 1)))
    return int(sum(draw.textlength(text, font=_font()) + (16 if swatch is not None else 0) + 14 for swatch, text in items)) + 4


def _label_tiles(sheet, numbers: list[int], cols: int, h: int, w: int) -> None:
    """Each tile's slice number in white on black in its top-left corner."""
    from PIL import ImageDraw

    draw, font = ImageDraw.Draw(sheet), _font()
    for k, n in enumerate(numbers):
        r, c = divmod(k, cols)
        x, y = c * w + 2, r * h + 2
        text = f"{n}"
        box = draw.textbbox((x + 2, y + 1), text, font=font)
        draw.rectangle((x, y, min(box[2] + 2, (c + 1) * w - 1), min(box[3] + 2, (r + 1) * h - 1)), fill=BLACK)
        draw.text((x + 2, y + 1), text, fill=WHITE, font=font)


def _draw_legend(sheet, items: list[tuple[int | None, str]], top: int) -> None:
    """The legend strip under the tiles: a swatch of each outline colour and what it is."""
    from PIL import ImageDraw

    draw, font = ImageDraw.Draw(sheet), _font()
    x, y = 4, top + (LEGEND_HEIGHT - 10) // 2
    for swatch, text in items:
        if swatch is not None:
            draw.rectangle((x, y, x + 11, y + 9), fill=swatch)
            x += 16
        draw.text((x, y - 1), text, fill=WHITE, font=font)
        x += int(draw.textlength(text, font=font)) + 14
