"""``ENGINE: "connguard.backends.postgresql"``: Django's PostgreSQL backend, pooled."""
