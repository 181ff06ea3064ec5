"""The artifact store is chosen by MAAS_ARTIFACTS_URL's scheme; S3 locations parse into bucket and key prefix."""

from __future__ import annotations

from pathlib import Path

import pytest

from maas.errors import InvalidInput
from maas.registry.artifact_stores import open_artifact_store
from maas.registry.artifacts import LocalArtifactStore
from maas.registry.s3_artifacts import S3ArtifactStore
from maas.registry.s3_client import Location

HEX = "ab" + "0" * 62


def test_default_and_file_urls_are_local_folders(tmp_path: Path) -> None:
    default = open_artifact_store(None, home=tmp_path, key=None)
    assert isinstance(default, LocalArtifactStore) and default.root == tmp_path / "artifacts"
    for url in (f"file://{tmp_path}/elsewhere", str(tmp_path / "elsewhere")):
        store = open_artifact_store(url, home=tmp_path, key=None)
        assert isinstance(store, LocalArtifactStore) and store.root == tmp_path / "elsewhere"
        assert store.decrypted == tmp_path / "cache" / "decrypted"


def test_s3_url_names_bucket_and_prefix(tmp_path: Path) -> None:
    store = open_artifact_store("s3://models/team/a/", home=tmp_path, key=None)
    assert isinstance(store, S3ArtifactStore) and store.cache == tmp_path / "cache" / "s3"
    assert store.location == Location("models", "team/a")
    assert store.location.key(HEX) == f"team/a/sha256/ab/{HEX}"
    assert Location.parse("s3://models").key(HEX) == f"sha256/ab/{HEX}"
    assert store.local_path(f"sha256:{HEX}") == tmp_path / "cache" / "s3" / "sha256" / "ab" / HEX


@pytest.mark.parametrize(
    ("url", "message"), [("gs://bucket/x", "unknown scheme 'gs'"), ("s3:///prefix", "names no bucket")]
)
def test_bad_urls_say_what_is_accepted(tmp_path: Path, url: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        open_artifact_store(url, home=tmp_path, key=None)
