"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), the endpoint ``tritonclient.grpc``
and other OIP clients speak; it runs beside the REST API on the same :class:`~maas.serving.engine.core.Engine`.

:mod:`.codec` turns messages into the engine's requests and back, :mod:`.model_config` the engine's model
configuration into Triton's message; :mod:`.server` serves them.
"""
