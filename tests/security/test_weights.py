"""Safetensors weights whose header lies about their data are refused at registration, not left for the
server to fail on at load (a publisher's crafted file must never reach the store)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from maas.errors import InvalidInput
from maas.registry import Registry
from maas.runtimes.hf.safetensors_check import check_safetensors
from tests.unit.test_hf_transformers import small_copy


def write_safetensors(path: Path, header: dict[str, object], data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def good(path: Path) -> Path:
    data = np.arange(6, dtype=np.float32).tobytes()
    return write_safetensors(path, {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}, data)


CRAFTED = {
    "huge shape over four bytes": ({"w": {"dtype": "F32", "shape": [2**40], "data_offsets": [0, 4]}}, b"\0" * 4),
    "offsets past the end": ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
    "negative offset": ({"w": {"dtype": "U8", "shape": [4], "data_offsets": [-4, 0]}}, b"\0" * 8),
    "unknown dtype": ({"w": {"dtype": "PY_OBJECT", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),
    "overlapping tensors": (
        {
            "a": {"dtype": "U8", "shape": [6], "data_offsets": [0, 6]},
            "b": {"dtype": "U8", "shape": [6], "data_offsets": [2, 8]},
        },
        b"\0" * 8,
    ),
    "header not an object": ([1, 2, 3], b""),
}


def test_a_well_formed_file_passes(tmp_path: Path) -> None:
    check_safetensors(good(tmp_path / "w.safetensors"))


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_headers_are_refused(tmp_path: Path, case: str) -> None:
    header, data = CRAFTED[case]
    path = write_safetensors(tmp_path / "w.safetensors", header, data)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput) as info:
        check_safetensors(path)
    assert str(tmp_path) not in str(info.value)


def test_a_header_longer_than_the_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(InvalidInput, match="header claims"):
        check_safetensors(path)


def test_registration_refuses_a_model_whose_weights_lie(registry: Registry, tmp_path: Path) -> None:
    model = small_copy(tmp_path / "crafted", weights=False)
    header, data = CRAFTED["huge shape over four bytes"]
    write_safetensors(model / "model.safetensors", header, data)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match=r"model\.safetensors"):
        registry.register(model, "crafted")
    assert registry.list_models() == []
