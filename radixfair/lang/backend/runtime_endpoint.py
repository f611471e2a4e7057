"""`RuntimeEndpoint(base_url)`: a backend over a server's native HTTP API, as SGLang's frontend
speaks it: `POST /generate` (cumulative SSE text ending in `data: [DONE]` when streaming),
`GET /get_model_info`, `GET /get_server_info`, `POST /flush_cache`.

Connections are kept alive and reused across threads (`HttpClient`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from radixfair.lang.backend.http import HttpClient, api_headers
from radixfair.lang.backend.native import NativeBackend
from radixfair.lang.chat_template import ChatTemplate, get_chat_template, model_chat_template


class RuntimeEndpoint(NativeBackend):
    def __init__(self, base_url: str, api_key: str | None = None, verify: str | bool | None = None,
                 chat_template_name: str | None = None, client_id: str | None = None,
                 timeout: float | None = None) -> None:
        """`api_key` is sent as `Authorization: Bearer`; `verify` is a CA bundle path, or False to
        skip TLS verification; `chat_template_name` overrides the served model's own template;
        `client_id` is sent as `X-Client-Id` (the fair scheduler's unit, where the server has no API
        keys); `timeout` bounds each socket wait in seconds (None: none)."""
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self._http = HttpClient(self.base_url, api_headers(api_key, client_id), verify, timeout)
        self.model_info: dict[str, Any] = self._http.json("GET", "/get_model_info")
        self.chat_template: ChatTemplate = (
            get_chat_template(chat_template_name) if chat_template_name
            else model_chat_template(self.model_info.get("chat_template"), self.model_info.get("special_tokens"))
        )

    def get_model_name(self) -> str:
        return str(self.model_info.get("model_path", ""))

    def get_chat_template(self) -> ChatTemplate:
        return self.chat_template

    def flush_cache(self) -> None:
        self._http.json("POST", "/flush_cache")

    def get_server_info(self) -> dict[str, Any]:
        info: dict[str, Any] = self._http.json("GET", "/get_server_info")
        return info

    def shutdown(self) -> None:
        self._http.close()

    def _generate(self, body: dict[str, Any]) -> Any:
        return self._http.json("POST", "/generate", body)

    def _generate_stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        for data in self._http.sse("POST", "/generate", body):
            yield json.loads(data)
