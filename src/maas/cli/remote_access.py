"""API keys, the audit log and usage of a remote server, through its admin API: the methods of
:class:`~maas.access.keys.KeyStore`, :class:`~maas.registry.audit.AuditLog` (admin keys only) and
:class:`~maas.access.usage.UsageStore` (an admin: every key's; any other key: its own) the CLI calls, returning the
same entities."""

from __future__ import annotations

from datetime import datetime

from maas.access.keys import ApiKey, check_key_id
from maas.access.principal import KeyLimits, Role
from maas.access.usage import UsageTotal
from maas.cli import wire
from maas.cli.remote import AdminClient, quote
from maas.registry.audit import AuditEntry, AuditVerifyResult


class RemoteKeys:
    def __init__(self, client: AdminClient) -> None:
        self.client = client

    def create(
        self,
        name: str,
        role: Role | str,
        *,
        models: list[str] | tuple[str, ...] = (),
        expires_at: datetime | None = None,
        limits: KeyLimits = KeyLimits(),
        created_by: str | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key and its secret token; the server records its own caller as ``created_by``."""
        del created_by
        body = {
            "name": name,
            "role": str(role),
            "models": list(models),
            "expires": expires_at.isoformat() if expires_at else None,
            "limits": limits.to_dict(),
        }
        answer = self.client.call("POST", "/keys", body=body)
        return self.client.decode(lambda a: (wire.api_key(a), str(a["key"])), answer)

    def list(self) -> list[ApiKey]:
        return self.client.decode_list(wire.api_key, self.client.call("GET", "/keys"), "keys")

    def get(self, key_id: str) -> ApiKey:
        return self.client.decode(wire.api_key, self.client.call("GET", f"/keys/{quote(check_key_id(key_id))}"))

    def revoke(self, key_id: str) -> ApiKey:
        answer = self.client.call("POST", f"/keys/{quote(check_key_id(key_id))}/revoke")
        return self.client.decode(wire.api_key, answer)

    def rotate(self, key_id: str) -> tuple[ApiKey, str]:
        answer = self.client.call("POST", f"/keys/{quote(check_key_id(key_id))}/rotate")
        return self.client.decode(lambda a: (wire.api_key(a), str(a["key"])), answer)


class RemoteAuditLog:
    def __init__(self, client: AdminClient) -> None:
        self.client = client

    def list(self, *, since: datetime | None = None, actor: str | None = None, limit: int = 100) -> list[AuditEntry]:
        query = {"since": since.isoformat() if since else None, "actor": actor, "limit": limit}
        return self.client.decode_list(wire.audit_entry, self.client.call("GET", "/audit", query=query), "entries")

    def verify(self, *, expect_head: str | None = None) -> AuditVerifyResult:
        answer = self.client.call("GET", "/audit/verify", query={"expect_head": expect_head})
        return self.client.decode(wire.audit_verify, answer)


class RemoteUsage:
    def __init__(self, client: AdminClient) -> None:
        self.client = client

    def query(
        self,
        *,
        key_id: str | None = None,
        model: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        by: str = "day",
    ) -> list[UsageTotal]:
        query = {
            "key": key_id,
            "model": model,
            "since": since.isoformat() if since else None,
            "until": until.isoformat() if until else None,
            "by": by,
        }
        return self.client.decode_list(wire.usage_total, self.client.call("GET", "/usage", query=query), "usage")
