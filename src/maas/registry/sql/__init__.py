"""The SQL metadata store: SQLite (the embedded default) or PostgreSQL (``MAAS_DATABASE_URL``).

``engine`` holds the database (engine, migrations, transactions), ``models`` and ``runs`` the statements
of each, ``rows`` the row lookups and conversions the model statements share, ``store`` the
:class:`~maas.registry.store.MetadataStore` made of them. ORM rows never leave this package.
"""
