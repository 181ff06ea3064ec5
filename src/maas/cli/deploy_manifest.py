"""``maas deploy-manifest``: write what a cluster needs to run the maas image (Kubernetes: Deployment + Service)."""

from __future__ import annotations

from pathlib import Path

import typer

from maas.errors import InvalidInput


def deploy_manifest(
    target: str = typer.Option("kubernetes", "--target", help="Where it will run: kubernetes."),
    image: str = typer.Option("maas:0.1.0", "--image", help="The maas image (built from the Dockerfile)."),
    replicas: int = typer.Option(2, "--replicas", min=1, help="Pods serving the shared registry."),
    name: str = typer.Option("maas", "--name", help="Name of the Deployment and the Service."),
    secret: str = typer.Option(
        "maas-registry", "--secret", help="Secret with MAAS_DATABASE_URL and MAAS_ARTIFACTS_URL (and S3 keys)."
    ),
    namespace: str = typer.Option(None, "--namespace", "-n", help="Namespace (default: kubectl's)."),
    out: Path = typer.Option(None, "--out", "-o", help="Write here instead of printing."),
) -> None:
    """Print (or write) the manifests that run `maas serve` on a cluster, against a shared registry."""
    from pydantic import ValidationError

    from maas.cli.output import console
    from maas.serving.kubernetes import KubernetesTarget, render

    if target != "kubernetes":
        raise InvalidInput(f"--target {target!r}: the one target today is kubernetes")
    try:
        spec = KubernetesTarget(image=image, replicas=replicas, name=name, secret=secret, namespace=namespace)
    except ValidationError as exc:
        wrong = ", ".join(f"--{e['loc'][0]} ({e['msg']})" for e in exc.errors())
        raise InvalidInput(f"{wrong}; names are DNS labels: lowercase letters, digits and '-'") from None
    text = render(spec)
    if out is None:
        typer.echo(text, nl=False)
        return
    out.write_text(text)
    console.print(f"wrote {out}: Deployment and Service '{name}'; create Secret '{secret}' first (see its header)")
