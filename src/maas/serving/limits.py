"""Bounds on the work one request may cause, and the checks that enforce them.

Every bound is a field of :class:`RequestLimits` with a safe default, set per server from ``MAAS_*``
variables (see :mod:`maas.envs`). A request over a bound is refused before the work it would cause is
done, with 413 and a message naming the bound and the variable that raises it. Shapes are checked
before any data is read, so a small body cannot declare a huge tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from maas import envs
from maas.errors import InvalidInput, PayloadTooLarge

#: numpy refuses more than 64 dimensions; no model needs anywhere near that.
MAX_RANK = 32


def payload_bytes(array: np.ndarray) -> int:
    """The bytes ``array`` carries: its buffer, or for BYTES (object arrays, whose buffer holds only pointers) the
    wire size of its elements (a 4-byte length each, then the bytes)."""
    if array.dtype != object:
        return int(array.nbytes)
    return 4 * array.size + sum(len(x) if isinstance(x, bytes | str) else 0 for x in array.flat)


class RequestLimits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The JSON part of a request: the whole body, or the header before binary tensors (after inflating).
    max_json_bytes: int = Field(8 * 1024 * 1024, gt=0)
    #: What a gzip or deflate body may inflate to.
    max_inflated_bytes: int = Field(64 * 1024 * 1024, gt=0)
    #: Elements of one tensor: the product of its non-zero dimensions, and the bound on each dimension.
    max_tensor_elements: int = Field(1 << 24, gt=0)
    #: Elements of one BYTES tensor, and bytes of one BYTES element.
    max_bytes_elements: int = Field(16_384, gt=0)
    max_bytes_element_bytes: int = Field(1024 * 1024, gt=0)
    #: Raw bytes of all output tensors of one response.
    max_output_bytes: int = Field(64 * 1024 * 1024, gt=0)

    @classmethod
    def from_env(cls) -> RequestLimits:
        inflated = envs.MAAS_MAX_INFLATED_BYTES
        try:
            max_inflated = int(inflated) if inflated else envs.MAAS_MAX_REQUEST_BYTES
        except ValueError:
            raise ValueError(
                f"MAAS_MAX_INFLATED_BYTES={inflated!r} is not a valid int; unset it or give a number"
            ) from None
        return cls(
            max_json_bytes=envs.MAAS_MAX_JSON_BYTES,
            max_inflated_bytes=max_inflated,
            max_tensor_elements=envs.MAAS_MAX_TENSOR_ELEMENTS,
            max_bytes_elements=envs.MAAS_MAX_BYTES_ELEMENTS,
            max_bytes_element_bytes=envs.MAAS_MAX_BYTES_ELEMENT_BYTES,
            max_output_bytes=envs.MAAS_MAX_OUTPUT_BYTES,
        )

    # --- checks --------------------------------------------------------------------------------

    def check_json(self, size: int) -> None:
        if size > self.max_json_bytes:
            raise PayloadTooLarge(
                f"the request's JSON is {size:,} bytes, over the limit of {self.max_json_bytes:,} bytes "
                "(MAAS_MAX_JSON_BYTES); send large tensors as binary data (tritonclient's default) or smaller batches"
            )

    def check_shape(self, name: str, shape: Sequence[int], datatype: str) -> int:
        """The element count of ``shape`` after checking every bound on it (rank, each dimension, product)."""
        if len(shape) > MAX_RANK:
            raise InvalidInput(f"input '{name}' has {len(shape)} dimensions; at most {MAX_RANK} are supported")
        biggest = max(shape, default=0)
        if biggest > self.max_tensor_elements:
            raise PayloadTooLarge(
                f"input '{name}' has a dimension of {biggest:,}, over the limit of {self.max_tensor_elements:,} "
                "(MAAS_MAX_TENSOR_ELEMENTS)"
            )
        nonzero = 1
        for d in shape:
            if d:
                nonzero *= d
                if nonzero > self.max_tensor_elements:
                    raise PayloadTooLarge(
                        f"input '{name}' shape {list(shape)} spans over {self.max_tensor_elements:,} elements "
                        "(MAAS_MAX_TENSOR_ELEMENTS; zero dimensions aside); send smaller batches"
                    )
        count = math.prod(shape)
        if datatype == "BYTES" and count > self.max_bytes_elements:
            raise PayloadTooLarge(
                f"input '{name}' holds {count:,} BYTES elements, over the limit of {self.max_bytes_elements:,} "
                "(MAAS_MAX_BYTES_ELEMENTS); send smaller batches"
            )
        return count

    def check_bytes_element(self, name: str, index: int, size: int) -> None:
        if size > self.max_bytes_element_bytes:
            raise PayloadTooLarge(
                f"input '{name}' element {index} is {size:,} bytes, over the limit of "
                f"{self.max_bytes_element_bytes:,} bytes per BYTES element (MAAS_MAX_BYTES_ELEMENT_BYTES)"
            )

    def check_outputs(self, what: str, outputs: Mapping[str, np.ndarray]) -> None:
        """Refuse a response whose tensors add up to more than ``max_output_bytes`` (raw, before encoding)."""
        total = 0
        for value in outputs.values():
            total += payload_bytes(np.asarray(value))
            if total > self.max_output_bytes:
                raise PayloadTooLarge(
                    f"{what} would answer with over {self.max_output_bytes:,} bytes of output tensors "
                    "(MAAS_MAX_OUTPUT_BYTES); send smaller batches or request fewer outputs"
                )
