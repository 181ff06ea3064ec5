"""Kubernetes manifests for the maas image: a Deployment of ``maas serve`` and a Service in front of it.

The registry is shared, so every pod serves the same models: the metadata database and the artifact store are URLs
read from a Secret (``MAAS_DATABASE_URL``, ``MAAS_ARTIFACTS_URL``, and the S3 credentials when the store is S3).
API keys are required; the pods run as a non-root user on a read-only root filesystem.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

HTTP_PORT = 8000
GRPC_PORT = 8001
#: The image's user (see the Dockerfile); MAAS_HOME is an emptyDir it owns.
UID = 10001
HOME = "/var/lib/maas"


class KubernetesTarget(BaseModel):
    """What ``maas deploy-manifest --target kubernetes`` writes; every name is a DNS label."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("maas", pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
    image: str = Field("maas:0.1.0", min_length=1)
    replicas: int = Field(2, ge=1)
    #: The Secret holding the registry's URLs (keys named like the variables) and, optionally, S3 credentials.
    secret: str = Field("maas-registry", pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
    namespace: str | None = Field(None, pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


#: Variables read from the Secret: (name, required).
SECRET_KEYS = (
    ("MAAS_DATABASE_URL", True),
    ("MAAS_ARTIFACTS_URL", True),
    ("MAAS_REDIS_URL", False),
    ("AWS_ACCESS_KEY_ID", False),
    ("AWS_SECRET_ACCESS_KEY", False),
    ("AWS_ENDPOINT_URL", False),
)


def _metadata(target: KubernetesTarget) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": target.name, "labels": _labels(target)}
    if target.namespace:
        meta["namespace"] = target.namespace
    return meta


def _labels(target: KubernetesTarget) -> dict[str, str]:
    return {"app.kubernetes.io/name": "maas", "app.kubernetes.io/instance": target.name}


def _probe(path: str, period_s: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period_s,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def _container(target: KubernetesTarget) -> dict[str, Any]:
    env: list[dict[str, Any]] = [
        {"name": "MAAS_HOME", "value": HOME},
        {"name": "MAAS_AUTH", "value": "required"},
    ]
    env += [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": target.secret, "key": key, "optional": not required}}}
        for key, required in SECRET_KEYS
    ]
    return {
        "name": "maas",
        "image": target.image,
        "args": ["serve", "--host", "0.0.0.0", "--port", str(HTTP_PORT), "--grpc-port", str(GRPC_PORT)],
        "ports": [
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
        ],
        "env": env,
        # Models load in the background: ready once they have; live as soon as the process answers.
        "startupProbe": _probe("/v2/health/live", 2, 60),
        "livenessProbe": _probe("/v2/health/live", 10, 3),
        "readinessProbe": _probe("/v2/health/ready", 5, 2),
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "home", "mountPath": HOME}, {"name": "tmp", "mountPath": "/tmp"}],
    }


def deployment(target: KubernetesTarget) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(target),
        "spec": {
            "replicas": target.replicas,
            "selector": {"matchLabels": _labels(target)},
            "template": {
                "metadata": {"labels": _labels(target)},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": UID,
                        "runAsGroup": UID,
                        "fsGroup": UID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [_container(target)],
                    "volumes": [{"name": "home", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}],
                },
            },
        },
    }


def service(target: KubernetesTarget) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(target),
        "spec": {
            "type": "ClusterIP",
            "selector": _labels(target),
            "ports": [
                {"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
                {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"},
            ],
        },
    }


def manifests(target: KubernetesTarget) -> list[dict[str, Any]]:
    return [deployment(target), service(target)]


def render(target: KubernetesTarget) -> str:
    """The manifests as one multi-document YAML file, with a header saying which Secret to create first."""
    import yaml

    keys = ", ".join(key for key, _ in SECRET_KEYS)
    header = (
        f"# maas on Kubernetes: Deployment and Service '{target.name}'. Create the Secret first:\n"
        f"#   kubectl create secret generic {target.secret} \\\n"
        "#     --from-literal=MAAS_DATABASE_URL=postgresql+psycopg://USER:PASSWORD@HOST/maas \\\n"
        "#     --from-literal=MAAS_ARTIFACTS_URL=s3://BUCKET/maas\n"
        f"# Keys read from it: {keys} (the last four optional).\n"
    )
    return header + yaml.safe_dump_all(manifests(target), sort_keys=False, explicit_start=True)
