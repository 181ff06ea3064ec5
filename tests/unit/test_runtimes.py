"""The ONNX and torch.export runtimes against the torch module they were exported from."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from maas import runtimes
from maas.errors import InvalidInput
from maas.runtimes.export import export
from maas.runtimes.onnx import FORMAT as ONNX
from maas.runtimes.torch_export import FORMAT as TORCH_EXPORT
from maas.tensors import Signature, TensorSpec

pytestmark = pytest.mark.unit

FORMATS = {"onnx": ONNX, "torch_export": TORCH_EXPORT}
OUTPUT_NAMES = ["logits", "doubled", "inverted"]
EXPECTED = Signature(
    inputs=(
        TensorSpec("features", "FP32", (-1, 4)),
        TensorSpec("ids", "INT64", (-1, 5)),
        TensorSpec("mask", "BOOL", (-1, 5)),
    ),
    outputs=(
        TensorSpec("logits", "FP32", (-1, 3)),
        TensorSpec("doubled", "INT64", (-1, 5)),
        TensorSpec("inverted", "BOOL", (-1, 5)),
    ),
)


class ThreeWay(torch.nn.Module):
    """Three inputs and three outputs of three dtypes."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(features), ids * 2, ~mask


def batch(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "features": rng.standard_normal((n, 4)).astype(np.float32),
        "ids": rng.integers(-1000, 1000, (n, 5), dtype=np.int64),
        "mask": rng.random((n, 5)) < 0.5,
    }


@pytest.fixture(scope="module")
def model() -> ThreeWay:
    torch.manual_seed(0)
    return ThreeWay().eval()


@pytest.fixture(scope="module")
def exported(model: ThreeWay, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("exported")
    # A batch of 1 exercises the repeat-to-2 path that keeps the batch dimension dynamic.
    example = tuple(torch.from_numpy(a) for a in batch(1).values())
    return export(model, example, out, name="three", output_names=OUTPUT_NAMES)


def test_export_writes_both_files_and_no_temporaries(exported: dict[str, Path]) -> None:
    assert set(exported) == {"onnx", "torch_export"}
    folder = exported["onnx"].parent
    assert sorted(p.name for p in folder.iterdir()) == ["three.onnx", "three.pt2"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_inspect_signature(fmt: str, exported: dict[str, Path]) -> None:
    assert FORMATS[fmt].inspect(exported[fmt]) == EXPECTED


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n", [1, 7, 64])
def test_outputs_match_torch(fmt: str, n: int, exported: dict[str, Path], model: ThreeWay) -> None:
    inputs = batch(n, seed=n)
    for array in inputs.values():
        array.setflags(write=False)  # as a request body decoded with np.frombuffer arrives
    with torch.no_grad():
        want = [t.numpy() for t in model(*(torch.from_numpy(a.copy()) for a in inputs.values()))]
    runtime = FORMATS[fmt].load(exported[fmt])
    try:
        assert runtime.device == "cpu"
        assert runtime.signature == EXPECTED
        got = runtime.infer(inputs)
    finally:
        runtime.close()
    assert list(got) == OUTPUT_NAMES
    np.testing.assert_allclose(got["logits"], want[0], atol=1e-5, rtol=0)
    assert got["logits"].dtype == np.float32
    np.testing.assert_array_equal(got["doubled"], want[1], strict=True)
    np.testing.assert_array_equal(got["inverted"], want[2], strict=True)


@pytest.mark.parametrize("fmt", FORMATS)
def test_output_subset_in_signature_order(fmt: str, exported: dict[str, Path]) -> None:
    runtime = FORMATS[fmt].load(exported[fmt])
    inputs = batch(3)
    got = runtime.infer(inputs, outputs=["inverted", "logits"])
    assert list(got) == ["logits", "inverted"]
    np.testing.assert_array_equal(got["inverted"], ~inputs["mask"])
    with pytest.raises(InvalidInput, match=r"unknown output.*nope"):
        runtime.infer(inputs, outputs=["nope"])
    with pytest.raises(InvalidInput, match=r"missing input.*mask"):
        runtime.infer({k: v for k, v in inputs.items() if k != "mask"})


@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_without_cuda_falls_back_to_cpu(
    fmt: str, exported: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the fallback is for machines without it")
    with caplog.at_level(logging.WARNING, logger=f"maas.runtimes.{fmt}"):
        runtime = FORMATS[fmt].load(exported[fmt], device="cuda")
    assert runtime.device == "cpu"
    assert "running on the CPU" in caplog.text
    with pytest.raises(InvalidInput, match="unknown device"):
        FORMATS[fmt].load(exported[fmt], device="tpu")


@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_matches_cpu(fmt: str, exported: dict[str, Path]) -> None:
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers() if fmt == "onnx" else torch.cuda.is_available()
    if not has_cuda:
        pytest.skip(f"no CUDA backend for {fmt} on this machine")
    inputs = batch(64)
    want = FORMATS[fmt].load(exported[fmt]).infer(inputs)
    runtime = FORMATS[fmt].load(exported[fmt], device="cuda")
    assert runtime.device == "cuda"
    got = runtime.infer(inputs)
    runtime.close()
    np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(got["doubled"], want["doubled"], strict=True)
    np.testing.assert_array_equal(got["inverted"], want["inverted"], strict=True)


def test_onnx_bytes_round_trip(tmp_path: Path) -> None:
    text_in = helper.make_tensor_value_info("text", TensorProto.STRING, ["n"])
    text_out = helper.make_tensor_value_info("echo", TensorProto.STRING, ["n"])
    graph = helper.make_graph([helper.make_node("Identity", ["text"], ["echo"])], "echo", [text_in], [text_out])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    path = tmp_path / "echo.onnx"
    onnx.save(proto, path)

    assert ONNX.inspect(path) == Signature(
        inputs=(TensorSpec("text", "BYTES", (-1,)),), outputs=(TensorSpec("echo", "BYTES", (-1,)),)
    )
    values = np.array([b"hello", "gr\u00fc\u00df dich".encode(), b""], dtype=object)
    got = ONNX.load(path).infer({"text": values})["echo"]
    assert got.dtype == object
    assert got.tolist() == values.tolist()
    with pytest.raises(InvalidInput, match="not UTF-8"):
        ONNX.load(path).infer({"text": np.array([b"\xff"], dtype=object)})


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("content", [b"\x08\x07 this is not a model \xff\xfe" * 10, b"", b"\x08\x07"])
def test_garbage_is_invalid_input(fmt: str, content: bytes, tmp_path: Path) -> None:
    path = tmp_path / f"garbage{FORMATS[fmt].suffixes[0]}"
    path.write_bytes(content)  # the short ones parse as (empty) protobuf messages
    with pytest.raises(InvalidInput, match=re.escape(path.name)):
        FORMATS[fmt].inspect(path)


def test_pt2_without_names_file_uses_program_names(exported: dict[str, Path], tmp_path: Path) -> None:
    plain = tmp_path / "plain.pt2"
    torch.export.save(torch.export.load(exported["torch_export"]), plain)
    signature = TORCH_EXPORT.inspect(plain)
    assert [s.name for s in signature.inputs] == ["features", "ids", "mask"]
    assert [s.name for s in signature.outputs] == ["output_0", "output_1", "output_2"]


def _rewrite(src: Path, dst: Path, change: Callable[[str, bytes], tuple[str, bytes] | None]) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            entry = change(info.filename, zin.read(info))
            if entry is not None:
                zout.writestr(entry[0], entry[1])
        root = zin.namelist()[0].split("/")[0]
        extra = change(f"{root}/+", b"")
        if extra is not None:
            zout.writestr(*extra)


def _pickled_weight(name: str, data: bytes) -> tuple[str, bytes] | None:
    if name.endswith("_weights_config.json"):
        config = json.loads(data)
        for meta in config["config"].values():
            meta["use_pickle"] = True
        return name, json.dumps(config).encode()
    return None if name.endswith("/+") else (name, data)


def _unsafe_sample_inputs(name: str, data: bytes) -> tuple[str, bytes] | None:
    if "/data/sample_inputs/" in name:
        # A pickle of a global the safe unpickler does not allow; torch would fall back to full unpickling.
        return name, b"\x80\x02cfractions\nFraction\nq\x00K\x01K\x02\x86q\x01Rq\x02."
    return None if name.endswith("/+") else (name, data)


def _aoti_member(name: str, data: bytes) -> tuple[str, bytes] | None:
    if name.endswith("/+"):
        return name[:-1] + "data/aotinductor/model/model.so", b"\x7fELF"
    return name, data


@pytest.mark.parametrize(
    ("change", "reason"),
    [(_pickled_weight, "pickled"), (_unsafe_sample_inputs, "safe unpickler"), (_aoti_member, "native code")],
)
def test_pt2_that_would_run_code_is_refused(
    change: Callable[[str, bytes], tuple[str, bytes] | None], reason: str, exported: dict[str, Path], tmp_path: Path
) -> None:
    bad = tmp_path / "bad.pt2"
    _rewrite(exported["torch_export"], bad, change)
    with pytest.raises(InvalidInput, match=rf"refusing.*{reason}"):
        TORCH_EXPORT.inspect(bad)
    with pytest.raises(InvalidInput, match=rf"refusing.*{reason}"):
        TORCH_EXPORT.load(bad)


@pytest.mark.parametrize("fmt", FORMATS)
def test_detect_format_without_suffix(fmt: str, exported: dict[str, Path], tmp_path: Path) -> None:
    blob = tmp_path / "sha256-blob"
    shutil.copyfile(exported[fmt], blob)
    assert runtimes.detect_format(blob) == fmt
    assert runtimes.inspect(blob, fmt) == EXPECTED


def test_importing_runtimes_imports_no_framework() -> None:
    code = (
        "import maas.runtimes, sys; "
        "assert 'torch' not in sys.modules and 'onnx' not in sys.modules and 'onnxruntime' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
