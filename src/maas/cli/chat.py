"""``maas chat NAME``: talk to a language model served by a running ``maas serve``, over its OpenAI-compatible API.

With ``--message`` it sends one message, streams the answer to stdout and exits. Otherwise it reads lines from
stdin, keeping the conversation, and streams each answer as it is generated; ``/exit`` or end of input quits,
Ctrl-C during an answer stops that answer. An error in one turn is printed and the conversation goes on without
that turn; a server that cannot be reached ends it.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import typer

from maas import envs
from maas.cli.chat_client import ChatClient, Unreachable
from maas.errors import MaasError

EXIT_COMMANDS = ("/exit", "/quit")


def chat(
    name: str = typer.Argument(..., help="The model, as `maas serve` serves it: NAME, NAME/VERSION or NAME@ALIAS."),
    url: str = typer.Option(None, "--url", help="The server (default http://127.0.0.1:MAAS_PORT, port 8000)."),
    system: str = typer.Option(None, "--system", help="A system message that starts the conversation."),
    temperature: float = typer.Option(
        None, "--temperature", min=0.0, max=2.0, help="Sampling temperature; 0 is greedy (server default: 1)."
    ),
    max_tokens: int = typer.Option(None, "--max-tokens", min=1, help="Most tokens per answer (default: no limit)."),
    message: str = typer.Option(None, "--message", help="Send this one message, print the answer and exit."),
    api_key: str = typer.Option(None, "--api-key", help="Sent as `Authorization: Bearer KEY`."),
) -> None:
    """Chat with a served language model (OpenAI API, streamed); /exit or Ctrl-D quits."""
    from rich.markup import escape

    from maas.cli.output import err_console, fail

    client = ChatClient(url or f"http://127.0.0.1:{envs.MAAS_PORT}", api_key=api_key)
    params: dict[str, Any] = {"model": name}
    if temperature is not None:
        params["temperature"] = temperature
    if max_tokens is not None:
        params["max_tokens"] = max_tokens
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []

    if message is not None:
        try:
            _answer(client, params, [*history, {"role": "user", "content": message}], interruptible=False)
        except MaasError as exc:
            fail(str(exc))
        return

    try:
        client.model(name)
    except MaasError as exc:
        fail(str(exc))
    interactive = sys.stdin.isatty()
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input())
        err_console.print(
            f"[dim]chatting with {escape(name)} at {client.shown}; /exit or Ctrl-D quits[/]", highlight=False
        )
    while (line := _read(interactive)) is not None:
        text = line.strip()
        if not text:
            continue
        if text in EXIT_COMMANDS:
            break
        turn = [*history, {"role": "user", "content": text}]
        try:
            answer = _answer(client, params, turn, interruptible=True)
        except Unreachable as exc:
            fail(str(exc))
        except MaasError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            continue
        history = [*turn, {"role": "assistant", "content": answer}]


def _read(interactive: bool) -> str | None:
    """The next line of input, or None at its end. Ctrl-C at the prompt starts the line again."""
    while True:
        try:
            if interactive:
                return input("> ")
            line = sys.stdin.readline()
            return line if line else None
        except EOFError:
            return None
        except KeyboardInterrupt:
            sys.stderr.write("\n(/exit or Ctrl-D quits)\n")


def _answer(client: ChatClient, params: dict[str, Any], messages: list[dict[str, str]], *, interruptible: bool) -> str:
    """Stream the answer to ``messages`` to stdout; its text. ``interruptible``: Ctrl-C stops the answer (its text
    as far as it got is returned) instead of the command."""
    parts: list[str] = []
    pieces = client.stream({**params, "messages": messages})
    answered = False  # a refused request printed nothing, and ends no line
    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
            parts.append(piece)
        answered = True
    except KeyboardInterrupt:
        if not interruptible:
            raise
        sys.stderr.write(" [stopped]")
        answered = True
    finally:
        pieces.close()  # closes the connection: the server stops generating
        if answered or parts:
            sys.stdout.write("\n")
            sys.stdout.flush()
    return "".join(parts)
