"""What an artifact weighs: bytes on disk, and weights counted as elements, for every registry format."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from maas.compression import formats
from maas.errors import InvalidInput


def artifact_size(path: Path) -> int:
    """Bytes on disk: the file, or every file under a directory."""
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return path.stat().st_size


def count_parameters(path: Path, format: str) -> int:
    """Weights in the artifact, counted as elements (an int8 weight counts once, like its fp32 parent)."""
    if format == "onnx" or (format == "hf_transformers" and _hf_onnx(path) is not None):
        import onnx

        model = onnx.load(str(_hf_onnx(path) or path), load_external_data=False)
        total = 0
        for init in model.graph.initializer:
            if init.data_type in (
                onnx.TensorProto.FLOAT,
                onnx.TensorProto.FLOAT16,
                onnx.TensorProto.INT8,
                onnx.TensorProto.UINT8,
                onnx.TensorProto.BFLOAT16,
                onnx.TensorProto.DOUBLE,
            ):
                count = int(np.prod(init.dims)) if init.dims else 1
                if count > 1:  # scalars are scales and zero points, not weights
                    total += count
        return total
    if format == "torch_export":
        program = formats.load_program(path)  # the archive is checked first: nothing pickled loads
        return sum(int(t.numel()) for t in program.state_dict.values())
    if format == "hf_transformers":
        from safetensors import safe_open

        root = _hf_dir(path)
        total = 0
        for f in sorted(root.glob("*.safetensors")):
            with safe_open(str(f), framework="np") as st:
                for key in st.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    total += int(np.prod(st.get_slice(key).get_shape()))
        return total
    raise InvalidInput(f"cannot count the parameters of format {format!r}")


def _hf_dir(path: Path) -> Path:
    if path.is_dir():
        return path
    return formats.unpack_hf(path)


def _hf_onnx(path: Path) -> Path | None:
    if path.is_file() and not zipfile.is_zipfile(path):
        return None
    try:
        f = _hf_dir(path) / "model.onnx"
    except Exception:
        return None
    return f if f.is_file() else None
