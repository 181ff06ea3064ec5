"""Weights and constants rebuilt from their raw bytes and their config's tensor meta, never unpickled."""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch._export.serde import schema
from torch._export.serde.serialize import deserialize_scalar_type

from maas.errors import InvalidInput
from maas.runtimes.base import brief
from maas.runtimes.torch_export.archive import CONSTANTS_CONFIG, WEIGHTS_CONFIG, read_json, refusal
from maas.runtimes.torch_export.program import FQN, dict_to_dataclass

_CHUNK = 1 << 20


def _ints(values: object, what: str, refuse: Callable[[str, str], InvalidInput]) -> list[int]:
    """Sizes, strides or an offset (``[value]``) of a weight: non-negative plain integers."""
    if not isinstance(values, list) or len(values) > 64:
        raise refuse(what, "its sizes and strides must be lists of at most 64 integers")
    out = []
    for value in values:
        number = value.as_int if isinstance(value, schema.SymInt) and value.type == "as_int" else None
        if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number < 2**62:
            raise refuse(what, "its sizes, strides and offset must be non-negative integers")
        out.append(number)
    return out


def _read_bytes(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> torch.Tensor:
    """The member's bytes in a uint8 tensor, read in chunks (no second copy of a large weight)."""
    out = torch.empty(info.file_size, dtype=torch.uint8)
    view = out.numpy().data
    pos = 0
    with zf.open(info) as src:  # checks the member's CRC at its end
        while chunk := src.read(_CHUNK):
            if pos + len(chunk) > info.file_size:
                raise zipfile.BadZipFile(f"member {info.filename!r} is longer than its header says")
            view[pos : pos + len(chunk)] = chunk
            pos += len(chunk)
    if pos != info.file_size:
        raise zipfile.BadZipFile(f"member {info.filename!r} is shorter than its header says")
    return out


def payloads(
    path: Path, zf: zipfile.ZipFile, members: Mapping[str, zipfile.ZipInfo], kind: str
) -> dict[str, torch.Tensor]:
    """Weights (``kind='weights'``) or constants, each built from its raw bytes and its config's tensor meta."""
    refuse = refusal(path)
    config_name = WEIGHTS_CONFIG if kind == "weights" else CONSTANTS_CONFIG
    prefix = "weight_" if kind == "weights" else "tensor_"
    raw = read_json(path, zf, members[config_name])
    config = raw.get("config") if isinstance(raw, dict) else None
    if not isinstance(config, dict):
        raise refuse(config_name, "it is not a payload config (a JSON object with a 'config' object)")
    storages: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for fqn, meta in config.items():
        what = f"{config_name} entry {fqn!r}"
        if not isinstance(meta, dict) or meta.get("use_pickle") is not False:
            raise refuse(what, f"{fqn!r} is pickled (a tensor subclass or custom object)")
        path_name = meta.get("path_name")
        if kind == "constants" and isinstance(path_name, str) and not path_name.startswith(prefix):
            raise refuse(what, f"{fqn!r} is a custom object")
        if not isinstance(fqn, str) or not FQN.fullmatch(fqn):
            raise refuse(what, "its name is not a dotted parameter path")
        if (
            not isinstance(path_name, str)
            or not path_name.startswith(prefix)
            or f"data/{kind}/{path_name}" not in members
        ):
            raise refuse(what, f"it names no {prefix}N member of the archive")
        try:
            tensor_meta = dict_to_dataclass(schema.TensorMeta, meta.get("tensor_meta"))
            dtype = deserialize_scalar_type(tensor_meta.dtype)
            layout = tensor_meta.layout
        except Exception as exc:  # malformed meta: KeyError, AssertionError, TypeError, …
            raise refuse(what, f"its tensor meta is malformed ({brief(exc)})") from None
        if layout != schema.Layout.Strided:
            raise refuse(what, "only dense (strided) tensors are supported")
        sizes = _ints(tensor_meta.sizes, what, refuse)
        strides = _ints(tensor_meta.strides, what, refuse)
        (offset,) = _ints([tensor_meta.storage_offset], what, refuse)
        if len(sizes) != len(strides):
            raise refuse(what, "its sizes and strides differ in length")
        info = members[f"data/{kind}/{path_name}"]
        element = torch.empty((), dtype=dtype).element_size()
        if info.file_size % element:
            raise refuse(what, f"its {info.file_size} bytes are not a whole number of {dtype} elements")
        numel = info.file_size // element
        needed = 0 if 0 in sizes else offset + sum((n - 1) * s for n, s in zip(sizes, strides, strict=True)) + 1
        if needed > numel:
            raise refuse(what, f"its shape {sizes} needs {needed} elements, but {path_name} holds {numel}")
        if path_name not in storages:
            storages[path_name] = _read_bytes(zf, info).view(dtype)
        try:
            tensor = torch.as_strided(storages[path_name], sizes, strides, offset)
            if kind == "weights" and meta.get("is_param") is True:
                tensor = torch.nn.Parameter(tensor, requires_grad=bool(tensor_meta.requires_grad))
        except RuntimeError as exc:
            raise refuse(what, brief(exc)) from None
        out[fqn] = tensor
    return out
