"""Reference applications built on contact360-worker; run from a checkout, not installed."""
