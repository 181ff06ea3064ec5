"""Access control on every surface of the server: who a request acts as (API keys, or nobody when auth is off),
which models it may see, what it may still use (rate limits, quotas) and what it used (metering)."""
