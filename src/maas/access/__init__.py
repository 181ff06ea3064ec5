"""Who may do what: API keys and their roles (:mod:`.keys`, :mod:`.principal`), and what every key used and may
still use (rate limits, quotas, usage). Kept in the registry's database; the serving layer enforces it."""
