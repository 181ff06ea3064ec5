"""``maas keys …``: make, list, revoke and rotate API keys, in the local database or, with MAAS_SERVER_URL set, on
that server (an admin key's work; see :mod:`maas.cli.backend`). A key's secret is printed once, when it is made or
rotated; the database keeps only its hash."""

from __future__ import annotations

from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from maas.cli import backend
from maas.cli.output import console, err_console, print_json

app = typer.Typer(help="API keys: who may call which models, with which limits.", no_args_is_help=True)


def _limits(rpm: int | None, tpm: int | None, concurrent: int | None, day: str | None, month: str | None) -> Any:
    from maas.access.principal import KeyLimits

    return KeyLimits(
        rpm=rpm,
        tpm=tpm,
        concurrent=concurrent,
        requests_per_day=_quota(day, "--quota-requests", "day"),
        tokens_per_month=_quota(month, "--quota-tokens", "month"),
    )


def _quota(text: str | None, option: str, period: str) -> int | None:
    """``N/day`` (or a bare N) as N."""
    if text is None:
        return None
    count, _, per = text.strip().partition("/")
    if per and per.strip().lower() != period:
        from maas.errors import InvalidInput

        raise InvalidInput(f"{option} counts per {period}: write {option} {count.strip() or 'N'}/{period}")
    try:
        value = int(count)
    except ValueError:
        from maas.errors import InvalidInput

        raise InvalidInput(f"{option} {text!r} is not a count; write e.g. {option} 1000/{period}") from None
    return value


def _print_secret(key: dict[str, Any], token: str, verb: str) -> None:
    console.print(f"{verb} key [bold]{escape(key['id'])}[/] ({escape(key['name'])}, {key['role']})")
    console.print(f"  [bold yellow]{token}[/]", soft_wrap=True, highlight=False)
    err_console.print("This is the only time the key is shown: store it now (the server keeps only its hash).")


@app.command("create")
def create(
    name: str = typer.Option(..., "--name", help="Who or what holds the key."),
    role: str = typer.Option(..., "--role", help="admin, publisher, consumer or monitor."),
    models: str = typer.Option("", "--models", help="Comma-separated model-name patterns (e.g. 'digits*,sentiment')."),
    expires: str = typer.Option(None, "--expires", help="30d, 12h, 2w, or an ISO date; default: never."),
    rpm: int = typer.Option(None, "--rpm", min=0, help="Requests per minute."),
    tpm: int = typer.Option(None, "--tpm", min=0, help="Tokens per minute (language and embedding models)."),
    concurrent: int = typer.Option(None, "--concurrent", min=0, help="Requests in flight at once."),
    quota_requests: str = typer.Option(None, "--quota-requests", help="Requests per UTC day, e.g. 10000/day."),
    quota_tokens: str = typer.Option(None, "--quota-tokens", help="Tokens per UTC month, e.g. 5000000/month."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON (the secret under `key`)."),
) -> None:
    """Make an API key; its secret is printed once."""
    from maas.access.times import parse_expiry
    from maas.registry.audit import current_audit_context

    store = backend.keys()
    key, token = store.create(
        name,
        role,
        models=[m for m in models.split(",") if m.strip()],
        expires_at=parse_expiry(expires) if expires else None,
        limits=_limits(rpm, tpm, concurrent, quota_requests, quota_tokens),
        created_by=current_audit_context().actor,
    )
    if json_out:
        print_json({**key.to_dict(), "key": token})
    else:
        _print_secret(key.to_dict(), token, "Made")


@app.command("list")
def list_keys(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Every key (never a secret), with its role, models, limits and state."""
    keys: list[dict[str, Any]] = [k.to_dict() for k in backend.keys().list()]
    if json_out:
        print_json(keys)
        return
    if not keys:
        console.print("No API keys. Make one with [bold]maas keys create --name NAME --role ROLE[/].")
        return
    table = Table("id", "name", "role", "models", "limits", "state", "expires", "created")
    for k in keys:
        limits = " ".join(f"{n}={v}" for n, v in k["limits"].items()) or "-"
        table.add_row(
            k["id"],
            escape(k["name"]),
            k["role"],
            escape(",".join(k["models"]) or "-"),
            limits,
            k["state"],
            (k["expires_at"] or "never")[:19],
            k["created_at"][:19],
        )
    console.print(table)


@app.command("revoke")
def revoke(
    key_id: str = typer.Argument(..., help="The key's id (`maas keys list`)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Revoke a key for good; servers refuse it within MAAS_AUTH_CACHE_S (1 s)."""
    key: dict[str, Any] = backend.keys().revoke(key_id).to_dict()
    if json_out:
        print_json(key)
    else:
        console.print(f"Revoked key [bold]{key['id']}[/] ({escape(key['name'])}).")


@app.command("rotate")
def rotate(
    key_id: str = typer.Argument(..., help="The key's id (`maas keys list`)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON (the new secret under `key`)."),
) -> None:
    """A new secret for a key (same id, role, models and limits); the old secret stops working."""
    key, token = backend.keys().rotate(key_id)
    if json_out:
        print_json({**key.to_dict(), "key": token})
    else:
        _print_secret(key.to_dict(), token, "Rotated")
