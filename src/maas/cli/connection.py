"""What the CLI's HTTP clients (``maas chat``, the remote CLI) share: the TLS trust for https URLs, and a failed
connection told in a few words."""

from __future__ import annotations

import socket
import ssl

from maas import envs
from maas.errors import InvalidInput


def tls_context() -> ssl.SSLContext:
    """What an https URL is checked against: the system's trusted CAs, or the PEM bundle MAAS_SSL_CA_FILE names."""
    cafile = envs.MAAS_SSL_CA_FILE
    try:
        return ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidInput(
            f"MAAS_SSL_CA_FILE={cafile} cannot be used as a CA bundle ({getattr(exc, 'strerror', None) or exc}); "
            "point it at a readable PEM file of the certificates to trust"
        ) from None


def reason(exc: BaseException) -> str:
    """Why a connection failed, in a few words, with the fix where there is one."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(exc, socket.gaierror):
        return "unknown host"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"{exc.verify_message}; to trust the server's CA, set MAAS_SSL_CA_FILE to its PEM file"
    return str(exc) or type(exc).__name__
