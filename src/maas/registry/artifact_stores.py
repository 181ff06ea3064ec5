"""Artifact stores by URI scheme (as MLflow chooses its stores): ``MAAS_ARTIFACTS_URL`` names one.

A path or ``file:///path`` is a local folder (:mod:`maas.registry.artifacts`; default ``$MAAS_HOME/artifacts``);
``s3://bucket/prefix`` an S3-compatible bucket (:mod:`maas.registry.s3_artifacts`). Each store module is imported
on first use; its ``open_url(url, *, home, key)`` builds the store.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from maas.errors import InvalidInput
from maas.imports import load_entry
from maas.registry.artifacts import ArtifactStore
from maas.registry.encryption import ArtifactKey

#: URI scheme -> "module:attribute" of the function that opens a store of that kind.
ARTIFACT_STORES: dict[str, str] = {
    "file": "maas.registry.artifacts:open_url",
    "s3": "maas.registry.s3_artifacts:open_url",
}


def open_artifact_store(url: str | None, *, home: Path, key: ArtifactKey | None) -> ArtifactStore:
    """The store ``url`` names (None: the folder ``home/artifacts``); plaintext copies and caches go under
    ``home/cache``."""
    url = url or str(home / "artifacts")
    scheme = urlsplit(url).scheme if "://" in url else "file"
    if scheme not in ARTIFACT_STORES:
        known = ", ".join(f"{s}://" for s in ARTIFACT_STORES)
        raise InvalidInput(
            f"MAAS_ARTIFACTS_URL={url!r} has the unknown scheme {scheme!r}; use a folder path, or one of: {known}"
        )
    store: ArtifactStore = load_entry(ARTIFACT_STORES[scheme])(url, home=home, key=key)
    return store
