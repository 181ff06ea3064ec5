"""The engine's model configuration (Triton's JSON form, what ``GET /v2/models/{name}/config`` answers) as the
``inference.ModelConfig`` message of Triton's gRPC ``ModelConfig`` RPC."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from maas.errors import MaasError
from maas.serving.grpc.generated import grpc_predict_v2_pb2 as pb


def model_config(config: dict[str, Any]) -> pb.ModelConfigResponse:
    """``config`` as a ``ModelConfigResponse``. Its keys are the message's field names and its enums their value
    names (``TYPE_FP32``, ``KIND_CPU``), as in Triton's JSON. A key or value the message cannot carry is a bug
    here, never the client's: :class:`~maas.errors.MaasError`, answered ``INTERNAL``."""
    message = pb.ModelConfig()
    try:
        json_format.ParseDict(config, message)
    except json_format.ParseError as exc:
        raise MaasError(
            f"the model configuration does not fit inference.ModelConfig ({exc}); add the field to "
            "grpc_predict_v2.proto with Triton's number and run `make proto`"
        ) from exc
    return pb.ModelConfigResponse(config=message)
