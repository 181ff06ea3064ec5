"""The ``Registry`` facade: the one way models enter, are named, moved and fetched."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from maas import envs
from maas.errors import ArtifactIntegrityError, InvalidInput, NotFound
from maas.registry import debris, encryption
from maas.registry.artifact_stores import open_artifact_store
from maas.registry.artifacts import ArtifactMissing, ArtifactStore, DigestMismatch
from maas.registry.audit import current_audit_context
from maas.registry.deployments import DeploymentMethods
from maas.registry.deprecated import DeprecatedRunMethods
from maas.registry.entities import (
    AliasEvent,
    GcResult,
    Lineage,
    ModelVersion,
    RegisteredModel,
    ServingTarget,
    VerifyReport,
    VerifyResult,
)
from maas.registry.runs import RunStore
from maas.registry.store import MetadataStore, open_store
from maas.registry.uri import LATEST, ModelRef, parse_ref, validate_alias, validate_name
from maas.tensors import Signature

log = logging.getLogger(__name__)

#: The alias a bare model name resolves to when it exists (else the latest version).
DEFAULT_ALIAS = "production"


def _actor(actor: str | None) -> str | None:
    """``actor``, else the current audit context's (a server's key, or the local user): alias history and the audit
    log name the same actor."""
    return actor or current_audit_context().actor


def _metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            raise InvalidInput(f"metric {k!r} must be a number, got {v!r}") from None
    return out


class Registry(DeploymentMethods, DeprecatedRunMethods):
    """Registered models, their numbered versions, aliases, lineage and deployments (``deploy``,
    ``get_deployment``, ``list_deployments``, ``undeploy``); training runs in :attr:`runs`.

    ``Registry()`` opens the embedded default (SQLite under ``MAAS_HOME``, or ``MAAS_DATABASE_URL``)
    and brings its schema up to date. Safe to use from several threads and processes at once.
    """

    def __init__(
        self,
        database_url: str | None = None,
        *,
        home: Path | None = None,
        artifacts: ArtifactStore | None = None,
    ) -> None:
        self.home = Path(home) if home is not None else envs.MAAS_HOME
        url = database_url or envs.MAAS_DATABASE_URL
        if url is None:
            self.home.mkdir(parents=True, exist_ok=True)
            url = f"sqlite:///{self.home / 'maas.db'}"
        self.store: MetadataStore = open_store(url, busy_timeout_s=float(envs.MAAS_DB_BUSY_TIMEOUT_S))
        self.artifacts: ArtifactStore = artifacts or open_artifact_store(
            envs.MAAS_ARTIFACTS_URL, home=self.home, key=encryption.key_from_env()
        )
        #: Training runs: create, log to and read them here (``registry.runs.create_run(...)``).
        self.runs: RunStore = self.store.runs

    # --- entering ------------------------------------------------------------------------------

    def register(
        self,
        path: str | Path,
        name: str,
        *,
        format: str | None = None,
        signature: Signature | None = None,
        description: str = "",
        tags: Mapping[str, str] | None = None,
        metrics: Mapping[str, float] | None = None,
        alias: str | None = None,
        parent: str | None = None,
        source_run: str | None = None,
        creator: str | None = None,
        lineage_extra: Mapping[str, object] | None = None,
    ) -> ModelVersion:
        """Store the artifact at ``path`` and add it as the next version of ``name``.

        The format is detected from the file when not given. The artifact is always inspected by its format's
        runtime (which refuses files that could run code or cannot load), and its signature is inferred from it
        unless ``signature`` is given. The artifact is durably in the
        store before the version row is committed.
        """
        from maas import runtimes

        validate_name(name)
        if alias is not None:
            validate_alias(alias)
        path = Path(path)
        if not path.exists():
            raise InvalidInput(
                f"{path} does not exist; give the path of a model file (.onnx, .pt2 or .gguf) or of a Hugging Face "
                "model directory"
            )
        if not path.is_file() and not path.is_dir():
            raise InvalidInput(
                f"{path} is neither a file nor a directory; give a model file (.onnx, .pt2 or .gguf) or a Hugging Face "
                "model directory"
            )
        fmt = format or runtimes.detect_format(path)
        clean_metrics = _metrics(metrics or {})
        parent_ref = None
        if parent is not None:
            parent_ref = self.resolve(parent).uri
        # A directory is stored as the one file its format packs it into (hf_transformers: a zip), packed
        # inside the artifact store, where `maas gc` finds it if this process dies.
        with self.artifacts.scratch() as scratch:
            artifact = runtimes.pack(path, fmt, scratch)
            # Always inspected, also when a signature is given: that is the check that the artifact loads without
            # running code (a format's inspect refuses anything else).
            inferred = runtimes.inspect(path, fmt)
            sig = signature or inferred
            with self.artifacts.guard(exclusive=False):
                digest, size = self.artifacts.put(artifact)
                version = self.store.create_version(
                    name,
                    format=fmt,
                    signature=sig,
                    digest=digest,
                    size=size,
                    description=description,
                    tags={str(k): str(v) for k, v in (tags or {}).items()},
                    metrics=clean_metrics,
                    lineage=Lineage(
                        parent=parent_ref,
                        source_run=source_run,
                        creator=_actor(creator),
                        extra=dict(lineage_extra or {}),
                    ),
                    alias=alias,
                )
        log.info("registered %s (%s, %s)", version.uri, fmt, digest)
        return version

    def update_version(
        self,
        name: str,
        version: int,
        *,
        description: str | None = None,
        tags: Mapping[str, str] | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> ModelVersion:
        return self.store.update_version(
            validate_name(name),
            version,
            description=description,
            tags=dict(tags) if tags else None,
            metrics=_metrics(metrics) if metrics else None,
        )

    # --- reading -------------------------------------------------------------------------------

    def list_models(self) -> list[RegisteredModel]:
        return self.store.list_models()

    def get_model(self, name: str) -> RegisteredModel:
        return self.store.get_model(validate_name(name))

    def list_versions(self, name: str) -> list[ModelVersion]:
        return self.store.list_versions(validate_name(name))

    def get_version(self, name: str, version: int) -> ModelVersion:
        return self.store.get_version(validate_name(name), int(version))

    def resolve(self, ref: str | ModelRef) -> ModelVersion:
        """The version a reference names: ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``NAME``
        (its ``production`` alias, else its latest version), or the same without ``models:/``."""
        r = parse_ref(ref) if isinstance(ref, str) else ref
        if r.version is not None:
            return self.store.get_version(r.name, r.version)
        if r.alias is not None and r.alias != LATEST:
            version = self.store.get_alias(r.name, r.alias)
            if version is None:
                aliases = ", ".join(sorted(self.store.get_model(r.name).aliases)) or "none"
                raise NotFound(f"model {r.name!r} has no alias {r.alias!r} (its aliases: {aliases})")
            return self.store.get_version(r.name, version)
        if r.alias is None:
            version = self.store.get_alias(r.name, DEFAULT_ALIAS)
            if version is not None:
                return self.store.get_version(r.name, version)
        latest = self.store.latest_version(r.name)
        if latest is None:
            raise NotFound(f"model {r.name!r} has no versions")
        return self.store.get_version(r.name, latest)

    # --- aliases -------------------------------------------------------------------------------

    def set_alias(self, name: str, alias: str, version: int, *, actor: str | None = None) -> AliasEvent:
        return self.store.set_alias(validate_name(name), validate_alias(alias), int(version), actor=_actor(actor))

    def delete_alias(self, name: str, alias: str, *, actor: str | None = None) -> AliasEvent:
        return self.store.delete_alias(validate_name(name), validate_alias(alias), actor=_actor(actor))

    def rollback(self, name: str, alias: str = DEFAULT_ALIAS, *, actor: str | None = None) -> AliasEvent:
        """Point ``alias`` back at the version it held before; repeated calls keep walking back."""
        return self.store.rollback(validate_name(name), validate_alias(alias), actor=_actor(actor))

    def alias_history(self, name: str, alias: str | None = None) -> list[AliasEvent]:
        return self.store.alias_history(validate_name(name), validate_alias(alias) if alias else None)

    # --- removing ------------------------------------------------------------------------------

    def delete_version(self, name: str, version: int, *, force: bool = False, actor: str | None = None) -> ModelVersion:
        """Delete one version. Refused (``Conflict``) while an alias points at it, unless ``force``,
        which deletes those aliases too. The artifact is removed once no version uses it."""
        with self.artifacts.guard(exclusive=True):
            mv, still_used = self.store.delete_version(
                validate_name(name), int(version), force=force, actor=_actor(actor)
            )
            if not still_used:
                self.artifacts.delete(mv.artifact_digest)
        return mv

    def delete_model(self, name: str) -> None:
        with self.artifacts.guard(exclusive=True):
            for digest in self.store.delete_model(validate_name(name)):
                self.artifacts.delete(digest)

    # --- artifacts -----------------------------------------------------------------------------

    def artifact_path(self, version: ModelVersion, *, verify: bool = True) -> Path:
        """A local path to the version's artifact (a decrypted copy, when it is stored encrypted), its sha256
        checked again unless ``verify`` is False.

        Raises ``ArtifactIntegrityError`` naming the version and both digests when the file is
        missing or its bytes changed, and ``ArtifactKeyError`` when it is encrypted with a key not configured.
        """
        digest = version.artifact_digest
        try:
            return self.artifacts.fetch(digest, verify=verify)
        except ArtifactMissing:
            raise ArtifactIntegrityError(
                f"{version.uri}: artifact {digest} is missing from the artifact store; "
                "restore the file or register the model again"
            ) from None
        except DigestMismatch as exc:
            raise ArtifactIntegrityError(
                f"{version.uri}: artifact digest mismatch: expected {digest}, actual {exc.actual}; "
                "the stored file is corrupted: restore it or register the model again"
            ) from None
        except ArtifactIntegrityError as exc:
            raise ArtifactIntegrityError(
                f"{version.uri}: artifact {digest} {exc}; restore the file or register the model again"
            ) from None
        except encryption.ArtifactKeyError as exc:
            raise encryption.ArtifactKeyError(f"{version.uri}: artifact {digest} {exc}") from None

    def verify(self, name: str | None = None) -> VerifyReport:
        """Re-check the digests of every version (of one model, or of all), and list the debris in the
        store (store-wide, whichever model was named): what :meth:`gc` would remove."""
        names = [validate_name(name)] if name else [m.name for m in self.list_models()]
        results = []
        for n in names:
            for mv in self.list_versions(n):
                try:
                    self.artifact_path(mv)
                    results.append(VerifyResult(n, mv.version, True, mv.artifact_digest, mv.artifact_digest))
                except (ArtifactIntegrityError, encryption.ArtifactKeyError) as exc:
                    actual = self.artifacts.check(mv.artifact_digest)
                    results.append(VerifyResult(n, mv.version, False, mv.artifact_digest, actual, str(exc)))
        return VerifyReport(tuple(results), tuple(debris.find(self.store, self.artifacts, self.home)))

    def gc(self, *, dry_run: bool = False) -> GcResult:
        """Remove the debris interrupted work left: artifacts no version references, temporaries no
        running process holds, stale Hugging Face extractions. Never what a version or an in-flight
        registration uses; waits while a registration is between storing its artifact and committing."""
        return debris.collect(self.store, self.artifacts, self.home, dry_run=dry_run)

    # --- serving -------------------------------------------------------------------------------

    def serving_targets(self) -> list[ServingTarget]:
        """What each bare model name means right now; polled by the server to follow alias moves."""
        return self.store.serving_targets(DEFAULT_ALIAS)

    def version_digests(self) -> dict[tuple[str, int], str]:
        """Every existing (name, version) and its artifact digest; lets a server drop what was deleted or
        replaced (a model deleted and registered again reuses its version numbers)."""
        return self.store.version_digests()
