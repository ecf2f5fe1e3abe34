"""The one interface every backend implements (Polygraphy-style runners)."""
from __future__ import annotations

import abc
from typing import TYPE_CHECKING

from segengine.engine.model import ModelSpec

if TYPE_CHECKING:  # numpy loads only when a backend runs, after the CLI has bounded thread pools
    import numpy as np


class BackendUnavailable(RuntimeError):
    """The backend's runtime (package, GPU, export file) is missing here; one-line message."""


class Backend(abc.ABC):
    """load() once, infer(batch) many times, close() at the end.

    ``infer`` takes (N, 3, S, S) float32 normalized slices and returns (N, S, S) float32
    probabilities. Heavy runtimes are imported in ``load``, never at module import.
    """

    name: str = ""
    precision: str = "fp32"

    def __init__(self, spec: ModelSpec, threads: int | None = None):
        self.spec = spec
        self.threads = threads
        self.loaded = False

    @classmethod
    def availability(cls, spec: ModelSpec | None = None) -> str | None:
        """None when usable here, else the reason it is not."""
        return None

    @abc.abstractmethod
    def load(self) -> "Backend": ...

    @abc.abstractmethod
    def infer(self, batch: np.ndarray) -> np.ndarray: ...

    def close(self) -> None:
        self.loaded = False

    def __enter__(self) -> "Backend":
        if not self.loaded:
            self.load()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def predict(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Probabilities for any number of slices, in batches of ``batch_size``."""
        import numpy as np

        if len(images) == 0:
            return np.zeros((0,) + images.shape[2:], dtype=np.float32)
        out = [self.infer(np.ascontiguousarray(images[i : i + batch_size], dtype=np.float32))
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out)
