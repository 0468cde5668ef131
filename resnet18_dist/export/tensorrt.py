"""TensorRT engine from the ONNX model, when ``tensorrt`` is importable on a CUDA machine.

Not exercised by CI (no GPU there); see the export issue's note for what has been checked.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np

from resnet18_dist.atomic import atomic_write


def tensorrt_unavailable_reason() -> str | None:
    """None when an engine can be built here, else why not (printed as the skip message)."""
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt Python package is not installed"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def build_engine(onnx_path: Path, out_path: Path, image_size: int, max_batch: int = 256) -> None:
    """An FP16 engine with a dynamic batch profile 1..max_batch (optimised for 64)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    shape = (3, image_size, image_size)
    profile.set_shape(name, (1, *shape), (64, *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError("TensorRT failed to build the engine")
    atomic_write(out_path, lambda fh: fh.write(bytes(engine)))


def engine_runner(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """Run the engine on CUDA tensors owned by torch (no pycuda needed)."""
    import tensorrt as trt
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inp = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
    out = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
    stream = torch.cuda.Stream()

    def run(x: np.ndarray) -> np.ndarray:
        xt = torch.from_numpy(np.ascontiguousarray(x)).cuda()
        context.set_input_shape(inp, tuple(xt.shape))
        yt = torch.empty(tuple(context.get_tensor_shape(out)), device="cuda", dtype=torch.float32)
        context.set_tensor_address(inp, xt.data_ptr())
        context.set_tensor_address(out, yt.data_ptr())
        context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return yt.cpu().numpy()

    return run
