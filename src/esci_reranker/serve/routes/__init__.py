"""Routers, one per resource: operations (health, ready, metrics), info, scoring, compat (/v1, /v2)."""
