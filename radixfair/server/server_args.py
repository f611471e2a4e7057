"""`radixfair serve`'s own settings (the engine's are `EngineArgs`), each flag declared once here."""

from __future__ import annotations

from dataclasses import dataclass

from radixfair.config_flags import flag
from radixfair.server.app import DEFAULT_MAX_BODY_BYTES


@dataclass(frozen=True)
class ServerArgs:
    host: str = flag("127.0.0.1", "bind address; the default serves this machine only")
    port: int = flag(30000, "TCP port")
    api_key: str | None = flag(None, "require 'Authorization: Bearer KEY'", exclusive="auth")
    api_keys: str | None = flag(None, 'JSON {"KEY": {"client": "alice", "weight": 2}}: per-key client identity',
                                metavar="FILE", exclusive="auth")
    max_body_bytes: int = flag(DEFAULT_MAX_BODY_BYTES, "larger request bodies are refused with 413")
