"""Tiny ONNX models built directly with ``onnx.helper`` (no torch, no export step), for tests and docs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def save_graph(graph: Any, path: Path, *, check: bool = False) -> Path:
    """``graph`` (an ``onnx.GraphProto``) saved as a model at opset 17, IR version 8 (what onnxruntime here takes)."""
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="maas.testing")
    model.ir_version = 8
    if check:
        onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path


def make_identity_model(path: Path, datatype: str, width: int = 3) -> Path:
    """``x`` -> ``y`` (Identity) of the Open Inference Protocol ``datatype`` (BYTES too), shape [-1, width]."""
    from onnx import TensorProto, helper

    names = {"BOOL": "BOOL", "FP16": "FLOAT16", "FP32": "FLOAT", "FP64": "DOUBLE", "BYTES": "STRING"}
    elem = getattr(TensorProto, names.get(datatype, datatype))
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        f"identity_{datatype.lower()}",
        [helper.make_tensor_value_info("x", elem, ["batch", width])],
        [helper.make_tensor_value_info("y", elem, ["batch", width])],
    )
    return save_graph(graph, path)


def make_multi_io_model(path: Path, *, scale: float = 1.0, features: int = 4, width: int = 3) -> Path:
    """A model with three inputs and three outputs of different datatypes, all with a dynamic batch:

    - ``x`` FP32 [-1, features] -> ``y`` FP32 [-1, features] = x * scale + 1
    - ``ids`` INT64 [-1, width] -> ``ids_out`` INT64 [-1, width] = ids * 2
    - ``mask`` BOOL [-1, width] -> ``mask_out`` BOOL [-1, width] = not mask

    ``scale`` makes versions distinguishable by their output.
    """
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Mul", ["x", "scale"], ["xs"]),
        helper.make_node("Add", ["xs", "one"], ["y"]),
        helper.make_node("Mul", ["ids", "two"], ["ids_out"]),
        helper.make_node("Not", ["mask"], ["mask_out"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(scale, dtype=np.float32), "scale"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "one"),
        numpy_helper.from_array(np.array(2, dtype=np.int64), "two"),
    ]
    graph = helper.make_graph(
        nodes,
        "multi_io",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", width]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, ["batch", width]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", features]),
            helper.make_tensor_value_info("ids_out", TensorProto.INT64, ["batch", width]),
            helper.make_tensor_value_info("mask_out", TensorProto.BOOL, ["batch", width]),
        ],
        initializer=inits,
    )
    return save_graph(graph, path, check=True)


def make_linear_model(path: Path, *, features: int = 4, outputs: int = 2, seed: int = 0) -> Path:
    """``y = x @ W + b`` with random weights: FP32 [-1, features] -> FP32 [-1, outputs]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((features, outputs)).astype(np.float32)
    b = rng.standard_normal(outputs).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", outputs])],
        initializer=[numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )
    return save_graph(graph, path)


def make_text_model(path: Path) -> Path:
    """A BYTES model: ``text`` BYTES [-1] -> ``echo`` BYTES [-1] (identity) and ``batch`` INT64 [1] (its length)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["text"], ["echo"]),
            helper.make_node("Shape", ["text"], ["batch"]),
        ],
        "text",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch"])],
        [
            helper.make_tensor_value_info("echo", TensorProto.STRING, ["batch"]),
            helper.make_tensor_value_info("batch", TensorProto.INT64, [1]),
        ],
    )
    return save_graph(graph, path)
