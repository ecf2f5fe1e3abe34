"""PyTorch eager on the CPU (or CUDA when present): the source of truth for every export."""
from __future__ import annotations

import importlib.util

import numpy as np

from segengine.engine.inference.backends.base import Backend
from segengine.engine.model.spec import load_torch_model


class TorchBackend(Backend):
    name = "torch"

    @classmethod
    def availability(cls, spec=None):
        return None if importlib.util.find_spec("torch") else "torch is not installed"

    def load(self):
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        self._torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_torch_model(self.spec).to(self.device)
        self.loaded = True
        return self

    def infer(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(batch).to(self.device))
            return torch.sigmoid(logits)[:, 0].float().cpu().numpy()

    def close(self):
        self.model = None
        super().close()
