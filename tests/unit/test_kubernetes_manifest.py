"""`maas deploy-manifest --target kubernetes`: a Deployment and a Service that pass the Kubernetes API schema (the
strict, offline JSON schemas of kubernetes-validate), with the registry from a Secret, keys required, health probes,
and the image's non-root user."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from maas.cli.main import app
from maas.serving.kubernetes import KubernetesTarget, manifests

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (dev extra)")

KUBERNETES = "1.33.0"  # an old-enough release that current clusters accept the same manifests
DOCKERFILE = Path(__file__).resolve().parents[2] / "Dockerfile"


def written(tmp_path: Path, *args: str) -> list[dict[str, Any]]:
    out = tmp_path / "maas.yaml"
    result = CliRunner().invoke(app, ["deploy-manifest", "--target", "kubernetes", *args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return list(yaml.safe_load_all(out.read_text()))


@pytest.mark.parametrize("version", [KUBERNETES, kubernetes_validate.latest_version()])
def test_the_manifests_pass_the_kubernetes_schema(tmp_path: Path, version: str) -> None:
    docs = written(tmp_path, "--image", "registry.example/maas:1", "--replicas", "3", "--name", "infer")
    assert [d["kind"] for d in docs] == ["Deployment", "Service"]
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # raises on an unknown or mistyped field


def test_a_mistyped_field_is_caught_by_the_validation() -> None:
    bad = manifests(KubernetesTarget())[0]
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES, strict=True)


def test_the_pods_serve_the_shared_registry_with_keys_and_probes(tmp_path: Path) -> None:
    deployment, service = written(tmp_path, "--replicas", "3", "--secret", "reg")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MAAS_AUTH"]["value"] == "required"
    for key in ("MAAS_DATABASE_URL", "MAAS_ARTIFACTS_URL"):
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": "reg", "key": key, "optional": False}
    assert not any("value" in e and re.search(r"://|PASSWORD|SECRET", str(e["value"])) for e in env.values())
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["selector"]["matchLabels"] == deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert {p["port"] for p in service["spec"]["ports"]} == {p["containerPort"] for p in container["ports"]}
    # The image's user, never root, on a read-only root filesystem.
    user = re.findall(r"^USER (\d+)", DOCKERFILE.read_text(), re.MULTILINE)[-1]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == int(user)
    assert container["securityContext"]["readOnlyRootFilesystem"]


def test_a_bad_name_is_refused_with_the_rule(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["deploy-manifest", "--name", "My_Server"])
    assert result.exit_code == 1
    assert "--name" in str(result.exception) and "DNS labels" in str(result.exception)
