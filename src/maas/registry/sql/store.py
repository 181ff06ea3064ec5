"""The SQL :class:`~maas.registry.store.MetadataStore`: one database, its models, deployments and runs."""

from __future__ import annotations

from sqlalchemy import Engine

from maas.registry.sql.deployments import SqlDeploymentStore
from maas.registry.sql.engine import Database
from maas.registry.sql.models import SqlModelStore
from maas.registry.sql.runs import SqlRunStore


class SqlStore(SqlDeploymentStore, SqlModelStore):
    """All registry metadata in the SQL database at ``url``, its schema brought up to date on opening.

    Models and deployments through its own methods, runs through :attr:`runs`; each call one transaction.
    """

    def __init__(self, url: str, *, busy_timeout_s: float = 60.0) -> None:
        super().__init__(Database(url, busy_timeout_s=busy_timeout_s))
        self.runs = SqlRunStore(self.db)

    @property
    def url(self) -> str:
        return self.db.url

    @property
    def engine(self) -> Engine:
        return self.db.engine

    def current_revision(self) -> str | None:
        """The Alembic revision the database is at; None before the first migration."""
        return self.db.current_revision()

    def upgrade_schema(self) -> None:
        self.db.upgrade_schema()
