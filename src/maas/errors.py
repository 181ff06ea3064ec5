"""The error tree. Each error knows its HTTP and gRPC status; the mapping to a response happens once,
in the server's exception handlers. Messages say what was wrong and what to do about it."""

from __future__ import annotations


class MaasError(Exception):
    """Base of every error maas raises on purpose."""

    http_status: int = 500
    grpc_code: str = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidInput(MaasError):
    """The caller sent something malformed or inconsistent."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"


class NotFound(MaasError):
    http_status = 404
    grpc_code = "NOT_FOUND"


class Conflict(MaasError):
    """The request clashes with the current state (e.g. deleting a version an alias points at)."""

    http_status = 409
    grpc_code = "FAILED_PRECONDITION"


class Unauthorized(MaasError):
    http_status = 401
    grpc_code = "UNAUTHENTICATED"


class Forbidden(MaasError):
    http_status = 403
    grpc_code = "PERMISSION_DENIED"


class PayloadTooLarge(MaasError):
    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"


class RequestTimeout(MaasError):
    """The client did not send its request (headers or body) in time."""

    http_status = 408
    grpc_code = "DEADLINE_EXCEEDED"


class UnsupportedMediaType(MaasError):
    http_status = 415
    grpc_code = "INVALID_ARGUMENT"


class RateLimited(MaasError):
    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"


class Unavailable(MaasError):
    """Temporarily unable to serve (a model still loading, or one that failed to load)."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


class ArtifactIntegrityError(Unavailable):
    """A stored artifact is missing or its sha256 no longer matches the registry."""


class UnsupportedFormat(InvalidInput):
    """No runtime knows the artifact's format."""
