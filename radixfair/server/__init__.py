"""HTTP server: SGLang's native API and the OpenAI-compatible API over one `Engine`."""

from radixfair.server.app import ServerClient, create_app

__all__ = ["ServerClient", "create_app"]
