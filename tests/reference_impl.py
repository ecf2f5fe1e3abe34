"""The course reference program's preprocessing, written the way it did it (whole-volume
skimage resize, float64), used only to check that the engine's fast path reproduces it."""
import numpy as np
from skimage.exposure import rescale_intensity
from skimage.transform import resize


def reference_preprocess(image: np.ndarray, mask: np.ndarray, size: int = 256):
    volume, mask = image[1:-1].copy(), mask[1:-1].copy()
    volume[volume < np.max(volume) * 0.1] = 0
    z = np.nonzero(np.max(np.max(np.max(volume, axis=-1), axis=-1), axis=-1))
    y = np.nonzero(np.max(np.max(np.max(volume, axis=0), axis=-1), axis=-1))
    x = np.nonzero(np.max(np.max(np.max(volume, axis=0), axis=0), axis=-1))
    sl = (slice(np.min(z), np.max(z) + 1), slice(np.min(y), np.max(y) + 1), slice(np.min(x), np.max(x) + 1))
    volume, mask = volume[sl], mask[sl]
    a, b = volume.shape[1], volume.shape[2]
    if a != b:
        diff = (max(a, b) - min(a, b)) / 2.0
        pad = (int(np.floor(diff)), int(np.ceil(diff)))
        padding = ((0, 0), (0, 0), pad) if a > b else ((0, 0), pad, (0, 0))
        mask = np.pad(mask, padding)
        volume = np.pad(volume, padding + ((0, 0),))
    mask = resize(mask, (volume.shape[0], size, size), order=0, mode="constant", cval=0, anti_aliasing=False)
    volume = resize(volume, (volume.shape[0], size, size, 3), order=2, mode="constant", cval=0, anti_aliasing=False)
    p10, p99 = np.percentile(volume, 10), np.percentile(volume, 99)
    volume = rescale_intensity(volume, in_range=(p10, p99))
    volume = (volume - np.mean(volume, axis=(0, 1, 2))) / np.std(volume, axis=(0, 1, 2))
    return volume.transpose(0, 3, 1, 2), (mask > 0).astype(np.uint8)
