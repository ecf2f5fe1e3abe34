"""A recording stand-in for the ``tensorrt`` 10.x Python module, for CPU tests of the TensorRT code.

It implements the names segengine calls (checked against TensorRT 10's Python API docs):
Logger, Builder(create_network, create_builder_config, create_optimization_profile,
build_serialized_network, platform_has_fast_fp16), OnnxParser(parse_from_file), BuilderConfig
(set_memory_pool_limit, set_flag, add_optimization_profile), IOptimizationProfile.set_shape,
INetworkDefinition(get_input, num_layers, get_layer), ILayer(name, precision, num_outputs,
set_output_type), Runtime.deserialize_cuda_engine, ICudaEngine(num_io_tensors, get_tensor_name,
get_tensor_mode, get_tensor_profile_shape, get_tensor_dtype, create_execution_context) and
IExecutionContext(set_input_shape, get_tensor_shape, set_tensor_address, execute_async_v3).

The "engine" runs the fp32 ONNX file it was parsed from with ONNX Runtime, reading and writing
host memory at the addresses it is given (``HostBuffers`` stands in for CUDA memory), and
refuses shapes outside its optimization profile like TensorRT does.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import types

import numpy as np


class HostBuffers:
    """TrtPlanRunner's buffer interface on host memory (numpy arrays and their addresses)."""

    stream_handle = 0

    def scope(self):
        return contextlib.nullcontext()

    def upload(self, array, dtype):
        a = np.ascontiguousarray(array, dtype=np.dtype(dtype))
        return a, a.ctypes.data

    def empty(self, shape, dtype):
        a = np.zeros(tuple(shape), dtype=np.dtype(dtype))
        return a, a.ctypes.data

    def download(self, array, n):
        return array[:n].astype(np.float32)


def _host_array(address: int, shape) -> np.ndarray:
    count = int(np.prod(shape))
    return np.ctypeslib.as_array((ctypes.c_float * count).from_address(address)).reshape(shape)


class _Layer:
    def __init__(self, name, num_outputs):
        self.name, self.num_outputs = name, num_outputs
        self.precision = None
        self.output_types = {}

    def set_output_type(self, index, dtype):
        self.output_types[index] = dtype


class _Network:
    def __init__(self, trt, flags):
        self.trt, self.flags = trt, flags
        self.layers, self.inputs, self.onnx_path = [], [], None

    @property
    def num_layers(self):
        return len(self.layers)

    def get_layer(self, i):
        return self.layers[i]

    def get_input(self, i):
        return types.SimpleNamespace(name=self.inputs[i])


class _Parser:
    def __init__(self, network):
        self.network = network
        self.num_errors = 0

    def parse_from_file(self, path):
        import onnx

        model = onnx.load(str(path))
        self.network.onnx_path = str(path)
        self.network.inputs = [i.name for i in model.graph.input]
        self.network.output = model.graph.output[0].name
        self.network.layers = [_Layer(n.name, len(n.output)) for n in model.graph.node]
        return True

    def get_error(self, i):
        return ""


class _Config:
    def __init__(self):
        self.flags, self.pool_limits, self.profiles = set(), {}, []

    def set_memory_pool_limit(self, pool, size):
        self.pool_limits[pool] = size

    def set_flag(self, flag):
        self.flags.add(flag)

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1


class _Profile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, min, opt, max):  # noqa: A002 - TensorRT's keyword names
        self.shapes[name] = (tuple(min), tuple(opt), tuple(max))


class _Builder:
    def __init__(self, trt):
        self.trt = trt
        self.platform_has_fast_fp16 = True

    def create_network(self, flags=0):
        self.trt.networks.append(_Network(self.trt, flags))
        return self.trt.networks[-1]

    def create_builder_config(self):
        self.trt.configs.append(_Config())
        return self.trt.configs[-1]

    def create_optimization_profile(self):
        return _Profile()

    def build_serialized_network(self, network, config):
        self.trt.built.append((network, config))
        if self.trt.fail_build:
            return None
        (name, (lo, opt, hi)), = config.profiles[0].shapes.items()
        return json.dumps({"onnx": network.onnx_path, "input": name, "output": network.output,
                           "profile": [lo, opt, hi]}).encode()


class _Context:
    def __init__(self, engine):
        self.engine = engine
        self.addresses, self.shape = {}, None

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.profile
        if name != self.engine.input or not lo[0] <= shape[0] <= hi[0] or tuple(shape[1:]) != tuple(lo[1:]):
            return False
        self.shape = tuple(shape)
        return True

    def get_tensor_shape(self, name):
        return (self.shape[0], 1, *self.shape[2:])

    def set_tensor_address(self, name, address):
        self.addresses[name] = address

    def execute_async_v3(self, stream):
        x = _host_array(self.addresses[self.engine.input], self.shape).copy()
        (y,) = self.engine.session.run(None, {self.engine.input: x})
        _host_array(self.addresses[self.engine.output], y.shape)[...] = y
        self.engine.trt.executed.append(self.shape[0])
        return True


class _Engine:
    def __init__(self, trt, plan):
        import onnxruntime as ort

        spec = json.loads(plan)
        self.trt, self.input, self.output = trt, spec["input"], spec["output"]
        self.profile = [tuple(s) for s in spec["profile"]]
        self.session = ort.InferenceSession(spec["onnx"], providers=["CPUExecutionProvider"])
        self.num_io_tensors = 2

    def get_tensor_name(self, i):
        return [self.input, self.output][i]

    def get_tensor_mode(self, name):
        return self.trt.TensorIOMode.INPUT if name == self.input else self.trt.TensorIOMode.OUTPUT

    def get_tensor_profile_shape(self, name, profile_index):
        return self.profile

    def get_tensor_dtype(self, name):
        return self.trt.float32

    def create_execution_context(self):
        return _Context(self)


def make(version: str = "10.13.3.9", fail_build: bool = False) -> types.ModuleType:
    """A fresh fake ``tensorrt`` module; its ``networks``/``configs``/``built``/``executed`` record calls."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.fail_build = fail_build
    trt.networks, trt.configs, trt.built, trt.executed = [], [], [], []
    trt.float32, trt.float16 = "DataType.FLOAT", "DataType.HALF"
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, severity=2: None})
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", OBEY_PRECISION_CONSTRAINTS="OBEY_PRECISION_CONSTRAINTS",
                                            PREFER_PRECISION_CONSTRAINTS="PREFER_PRECISION_CONSTRAINTS")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.Builder = lambda logger: _Builder(trt)
    trt.OnnxParser = lambda network, logger: _Parser(network)
    trt.Runtime = lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda plan: _Engine(trt, plan))
    return trt
