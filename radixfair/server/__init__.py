"""HTTP server: SGLang's native API and the OpenAI-compatible API over one engine."""

from radixfair.server.app import create_app
from radixfair.server.auth import ServerClient

__all__ = ["ServerClient", "create_app"]
