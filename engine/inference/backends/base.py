"""The one interface every backend implements (Polygraphy-style runners)."""
from __future__ import annotations

import abc
from typing import TYPE_CHECKING

from segengine.engine.core.errors import BackendUnavailable
from segengine.engine.model.spec import ModelSpec

if TYPE_CHECKING:  # numpy loads only when a backend runs, after the CLI has bounded thread pools
    import numpy as np


class Backend(abc.ABC):
    """load() once, infer(batch) many times, close() at the end.

    ``infer`` takes (N, C, S, S) float32 normalized slices (``spec.input_shape``: C = 3, or 3 per
    slice of a 2.5D model's context, as ``inference.predict.model_input`` stacks them) and returns
    (N, S, S) float32 probabilities. Heavy runtimes are imported in ``load``, never at module import.
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

    @classmethod
    def missing_export(cls, spec: ModelSpec | None, how: str = "run `segengine export`") -> str | None:
        """Why ``spec`` has no ``cls.export_kind`` file beside its weights (None: it has one, or no spec)."""
        kind = getattr(cls, "export_kind", None)
        if spec is None or kind is None or spec.export_path(kind).exists():
            return None
        return f"no {kind} export beside {spec.weights.name} ({how})"

    @abc.abstractmethod
    def load(self) -> "Backend": ...

    @abc.abstractmethod
    def infer(self, batch: np.ndarray) -> np.ndarray: ...

    def close(self) -> None:
        self.loaded = False

    def check_input_shape(self, declared, where: str) -> None:
        """Refuse a runtime whose input per item (``declared``: C, S, S; None or a string for a
        dynamic dim) is not what the model card says: a card edited to another context, or an
        export of another input size, would otherwise fail inside the runtime on the first batch."""
        got = tuple(d if isinstance(d, int) and d > 0 else None for d in declared)
        if got != self.spec.input_shape:
            c, s, _ = self.spec.input_shape
            raise BackendUnavailable(f"{where} takes input (N, {', '.join(str(d) for d in got)}) but "
                                     f"{self.spec.weights.name}'s card says (N, {c}, {s}, {s}) "
                                     f"(context_slices {self.spec.context_slices}); re-export it")

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
