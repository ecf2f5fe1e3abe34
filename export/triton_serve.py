"""Serve one model folder of a `segengine export --triton` repository with PyTriton's Triton server.

    SERVER_PYTHON export/triton_serve.py REPO/resunet16 --http-port 8000 --grpc-port 8001

PyTriton (``nvidia-pytriton`` on PyPI) bundles a Triton Inference Server that runs on CPU
but carries only Triton's Python backend. So this script runs the folder's ``1/model.onnx``
in an ONNX Runtime session inside a Python model bound under the config's name, tensors,
max_batch_size and dynamic batching (read from ``config.pbtxt`` with Triton's ModelConfig
proto). A full Triton server (the NGC container) loads the same folder with its
onnxruntime backend instead, and clients cannot tell the difference.

It runs in the server's own environment (PyTriton needs numpy<2; see README), so it imports
only pytriton, onnxruntime, numpy and tritonclient, never segengine.
"""
from __future__ import annotations

import argparse
import os
import sys
import sysconfig
from pathlib import Path


def load_config(model_dir: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def _serve_config_parameters(cfg) -> None:
    """Make the config Triton serves carry the repository config's ``parameters`` (the weights' SHA-256).

    PyTriton writes its own config.pbtxt for a bound function and has no user-facing field for
    model parameters; its generator's backend-parameter step is extended to add them.
    """
    from pytriton.model_config import generator

    extra = {key: {"string_value": value.string_value} for key, value in cfg.parameters.items()}
    original = generator.ModelConfigGenerator._set_backend_parameters

    def with_parameters(self, model_config):
        original(self, model_config)
        if self._config.model_name == cfg.name:
            model_config.setdefault("parameters", {}).update(extra)

    generator.ModelConfigGenerator._set_backend_parameters = with_parameters


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path, help="REPO/<model> written by segengine export --triton")
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--grpc-port", type=int, default=8001)
    ap.add_argument("--metrics-port", type=int, default=8002)
    ap.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)")
    args = ap.parse_args(argv)

    # Triton's Python-backend stub embeds libpython; make it load this interpreter's, not another
    # installation's of the same minor version (whose stdlib would not match this one's).
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, os.environ.get("LD_LIBRARY_PATH")]))

    import numpy as np
    import onnxruntime as ort
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    cfg = load_config(args.model_dir)
    if cfg.platform != "onnxruntime_onnx":
        print(f"triton_serve: {cfg.name} is {cfg.platform}; only onnxruntime_onnx models run here", file=sys.stderr)
        return 2
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(args.model_dir / "1" / "model.onnx"), sess_options=opts,
                                   providers=["CPUExecutionProvider"])
    (inp,), (out,) = cfg.input, cfg.output

    @batch
    def infer(**inputs):
        (prob,) = session.run([out.name], {inp.name: inputs[inp.name].astype(np.float32, copy=False)})
        return {out.name: prob}

    _serve_config_parameters(cfg)
    batcher = DynamicBatcher(preferred_batch_size=list(cfg.dynamic_batching.preferred_batch_size),
                             max_queue_delay_microseconds=cfg.dynamic_batching.max_queue_delay_microseconds)
    with Triton(config=TritonConfig(http_port=args.http_port, grpc_port=args.grpc_port,
                                    metrics_port=args.metrics_port)) as triton:
        triton.bind(model_name=cfg.name, infer_func=infer,
                    inputs=[Tensor(name=inp.name, dtype=np.float32, shape=tuple(inp.dims))],
                    outputs=[Tensor(name=out.name, dtype=np.float32, shape=tuple(out.dims))],
                    config=ModelConfig(max_batch_size=cfg.max_batch_size, batcher=batcher))
        print(f"triton_serve: serving {cfg.name} on http :{args.http_port}, grpc :{args.grpc_port}", flush=True)
        triton.serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
