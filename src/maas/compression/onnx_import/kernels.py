"""Functions that graphs made by :mod:`maas.compression.onnx_import` call when they run.

The ``size_*`` functions compute on sizes as Python values (``Shape`` of a tensor, and what ``Gather``,
``Concat``, arithmetic … make of it), so ``torch.export`` sees a dynamic batch as a symbolic size, never as
data. The others compute an ONNX op on tensors where no single torch function matches its semantics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

# -- sizes as Python values ---------------------------------------------------------------------------


def as_list(v: Any) -> list[Any]:
    return list(v) if isinstance(v, list | tuple) else [v]


def size_shape(x: torch.Tensor, start: int = 0, end: int | None = None) -> list[Any]:
    return list(x.shape[start:end])


def size_gather(data: Any, idx: Any) -> Any:
    data = as_list(data)
    return [data[i] for i in idx] if isinstance(idx, list) else data[idx]


def size_concat(*parts: Any) -> list[Any]:
    return [v for p in parts for v in as_list(p)]


def size_unsqueeze(v: Any) -> list[Any]:
    return [v]


def size_squeeze(v: Any) -> Any:
    return v[0] if isinstance(v, list) and len(v) == 1 else v


def size_slice(v: Any, start: int, end: int, step: int) -> list[Any]:
    return as_list(v)[slice(start, max(end, -(2**62)), step)]


def size_arith(fn: Callable[[Any, Any], Any], a: Any, b: Any) -> Any:
    if isinstance(a, list) or isinstance(b, list):
        la, lb = as_list(a), as_list(b)
        n = max(len(la), len(lb))
        la, lb = (la * n if len(la) == 1 else la), (lb * n if len(lb) == 1 else lb)
        return [fn(x, y) for x, y in zip(la, lb, strict=True)]
    return fn(a, b)


def size_floordiv(a: Any, b: Any) -> Any:
    return a // b


# -- tensors --------------------------------------------------------------------------------------------


def reshape(x: torch.Tensor, shape: Sequence[Any], allowzero: int = 0) -> torch.Tensor:
    if not allowzero:
        shape = [x.shape[i] if isinstance(d, int) and d == 0 else d for i, d in enumerate(shape)]
    return torch.reshape(x, list(shape))


def gather(data: torch.Tensor, idx: torch.Tensor, axis: int) -> torch.Tensor:
    axis = axis % data.dim()
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    picked = torch.index_select(data, axis, idx.reshape(-1))
    return picked.reshape(*data.shape[:axis], *idx.shape, *data.shape[axis + 1 :])


def unsqueeze(x: torch.Tensor, axes: Sequence[int]) -> torch.Tensor:
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = torch.unsqueeze(x, a)
    return x


def transpose(x: torch.Tensor) -> torch.Tensor:
    return x.permute(*reversed(range(x.dim())))


def flatten(x: torch.Tensor, axis: int) -> torch.Tensor:
    axis = axis % (x.dim() + 1) if axis < 0 else axis
    if axis == 0:
        return x.reshape(1, -1)
    return torch.flatten(torch.flatten(x, 0, axis - 1), 1) if axis > 1 else torch.flatten(x, 1)


def softmax_2d(fn: Callable[..., torch.Tensor], x: torch.Tensor, axis: int) -> torch.Tensor:
    # opset < 13: (Log)Softmax over the input coerced to 2-D at ``axis``.
    return fn(flatten(x, axis), dim=-1).reshape(x.shape)


def argmax_last(fn: Callable[..., torch.Tensor], x: torch.Tensor, axis: int, keepdim: bool) -> torch.Tensor:
    flipped = fn(torch.flip(x, [axis]), dim=axis, keepdim=keepdim)
    return x.shape[axis] - 1 - flipped


def global_mean(x: torch.Tensor) -> torch.Tensor:
    return torch.mean(x, dim=list(range(2, x.dim())), keepdim=True)


def global_max(x: torch.Tensor) -> torch.Tensor:
    return torch.amax(x, dim=list(range(2, x.dim())), keepdim=True)


def reduce_all(fn: Callable[..., torch.Tensor], x: torch.Tensor, keepdim: bool) -> torch.Tensor:
    return fn(x, dim=list(range(x.dim())), keepdim=keepdim)


def slice_tensor(
    x: torch.Tensor, starts: list[int], ends: list[int], axes: list[int], steps: list[int]
) -> torch.Tensor:
    index: list[Any] = [slice(None)] * x.dim()
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        index[a % x.dim()] = slice(s, min(e, 2**62), st)
    return x[tuple(index)]
