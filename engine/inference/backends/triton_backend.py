"""A Triton Inference Server as a backend: slices go over HTTP to a served segengine model.

The server is named by ``SEGENGINE_TRITON_URL`` (default localhost:8000) and serves the
model under its card name (``SEGENGINE_TRITON_MODEL`` overrides it), as laid out by
`segengine export --triton`. Pre- and post-processing stay local, so masks equal a local
ONNX Runtime run's when the server runs the same export. ``load`` reads the served model's
config from the server and refuses one whose ``segengine.source_sha256`` parameter is not
the local weights' SHA-256 (what report.json names).
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np

from segengine.engine.core.errors import BackendUnavailable
from segengine.engine.inference.backends.base import Backend

WEIGHTS_SHA256_PARAMETER = "segengine.source_sha256"  # the weights' SHA-256 in a served model's config (`segengine export --triton`)


def server_url() -> str:
    return os.environ.get("SEGENGINE_TRITON_URL", "localhost:8000")


class TritonBackend(Backend):
    name = "triton"
    export_kind = None  # remote: nothing to verify beside the weights
    precision = "fp32"

    def model_name(self) -> str:
        return os.environ.get("SEGENGINE_TRITON_MODEL", self.spec.name)

    @classmethod
    def availability(cls, spec=None):
        if not importlib.util.find_spec("tritonclient"):
            return "tritonclient is not installed (pip install 'segengine[scale]')"
        if "SEGENGINE_TRITON_URL" not in os.environ:
            return "set SEGENGINE_TRITON_URL to a Triton server serving the model"
        return None

    def load(self):
        import tritonclient.http as httpclient

        url = server_url()
        try:
            self.client = httpclient.InferenceServerClient(url=url, connection_timeout=5.0, network_timeout=120.0)
            ready = self.client.is_model_ready(self.model_name())
        except Exception as exc:  # noqa: BLE001 - connection errors come in many types
            raise BackendUnavailable(f"Triton server at {url} is not reachable ({str(exc).splitlines()[0][:120]})") from None
        if not ready:
            raise BackendUnavailable(f"Triton server at {url} does not have model {self.model_name()!r} ready")
        self.check_identity(self.client.get_model_config(self.model_name()), url)
        meta = self.client.get_model_metadata(self.model_name())
        self.input_name, self.output_name = meta["inputs"][0]["name"], meta["outputs"][0]["name"]
        where = f"Triton model {self.model_name()!r} at {url}"
        shape = meta["inputs"][0].get("shape")
        if not isinstance(shape, list) or len(shape) < 3:
            raise BackendUnavailable(f"{where} does not report its input shape ({shape!r})")
        self.check_input_shape([int(d) for d in shape[-3:]], where)
        self.loaded = True
        return self

    def check_identity(self, config: dict, url: str) -> None:
        """Refuse a served model whose config does not name these weights' SHA-256."""

        served = ((config or {}).get("parameters") or {}).get(WEIGHTS_SHA256_PARAMETER, {}).get("string_value")
        if not served:
            raise BackendUnavailable(f"Triton model {self.model_name()!r} at {url} does not say which weights it serves "
                                     f"(no {WEIGHTS_SHA256_PARAMETER} parameter); serve a `segengine export --triton` repository")
        if served != self.spec.sha256:
            raise BackendUnavailable(f"Triton model {self.model_name()!r} at {url} serves weights {served[:12]}..., "
                                     f"not {self.spec.weights.name} ({self.spec.sha256[:12]}...); refusing")

    def infer(self, batch: np.ndarray) -> np.ndarray:
        import tritonclient.http as httpclient

        inp = httpclient.InferInput(self.input_name, list(batch.shape), "FP32")
        inp.set_data_from_numpy(np.ascontiguousarray(batch, dtype=np.float32), binary_data=True)
        out = httpclient.InferRequestedOutput(self.output_name, binary_data=True)
        result = self.client.infer(self.model_name(), inputs=[inp], outputs=[out])
        return result.as_numpy(self.output_name)[:, 0]

    def close(self):
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
        self.client = None
        super().close()
