"""Routing requests across workers. `policies/` holds the routing decisions as plain objects (no
HTTP, no torch): the HTTP router and the multi-worker simulator use the same ones."""
