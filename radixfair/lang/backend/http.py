"""A small keep-alive HTTP/1.1 client for the language's HTTP backends (the standard library's
`http.client`: the language needs no HTTP package). Connections are reused across the many threads
a batch of programs runs on; an idle connection the server closed is retried once.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import urllib.parse
from collections.abc import Iterator
from typing import Any

from radixfair.lang.errors import BackendError

_MAX_IDLE = 64  # idle connections kept for reuse


def api_headers(api_key: str | None, client_id: str | None) -> dict[str, str]:
    """JSON requests with a Bearer key and radixfair's fair-scheduling unit (`X-Client-Id`), where given."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    if client_id:
        headers["X-Client-Id"] = client_id
    return headers


class HttpClient:
    """A small keep-alive HTTP/1.1 client shared by threads (a pool of idle connections)."""

    def __init__(self, base_url: str, headers: dict[str, str], verify: str | bool | None,
                 timeout: float | None) -> None:
        url = urllib.parse.urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"base_url: expected http://host:port or https://host:port, got {base_url!r}")
        self.base_url = base_url
        self._https = url.scheme == "https"
        self._host = url.hostname
        self._port = url.port
        self._root = url.path.rstrip("/")
        self._headers = headers
        self._timeout = timeout
        self._ssl: ssl.SSLContext | None = None
        if self._https:
            self._ssl = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
            if verify is False:
                self._ssl.check_hostname = False
                self._ssl.verify_mode = ssl.CERT_NONE
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _new(self) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=self._timeout, context=self._ssl)
        return http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)

    def _release(self, conn: http.client.HTTPConnection, reusable: bool) -> None:
        if reusable:
            with self._lock:
                if len(self._idle) < _MAX_IDLE:
                    self._idle.append(conn)
                    return
        conn.close()

    def _send(self, method: str, path: str, body: Any) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        payload = None if body is None else json.dumps(body).encode()
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        reused = conn is not None
        while True:
            if conn is None:
                conn = self._new()
            try:
                conn.request(method, self._root + path, body=payload, headers=self._headers)
                return conn, conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                conn.close()
                if not reused:
                    raise BackendError(f"{method} {self.base_url}{path}: the connection failed: {e}") from e
                # the server closed an idle keep-alive connection: the request never reached it
                conn, reused = None, False
            except OSError as e:
                conn.close()
                raise BackendError(f"cannot reach {self.base_url}: {e}") from e

    def _check(self, method: str, path: str, conn: http.client.HTTPConnection,
               resp: http.client.HTTPResponse) -> None:
        if resp.status == 200:
            return
        raw = resp.read()
        self._release(conn, not resp.will_close)
        raise BackendError(f"{method} {path}: HTTP {resp.status}: {error_message(raw)}", resp.status)

    def json(self, method: str, path: str, body: Any = None) -> Any:
        conn, resp = self._send(method, path, body)
        self._check(method, path, conn, resp)
        try:
            raw = resp.read()
        except OSError as e:
            conn.close()
            raise BackendError(f"{method} {self.base_url}{path}: the connection failed: {e}") from e
        self._release(conn, not resp.will_close)
        return json.loads(raw) if raw else None

    def sse(self, method: str, path: str, body: Any) -> Iterator[str]:
        """The `data:` payloads of an event stream, up to `[DONE]`."""
        conn, resp = self._send(method, path, body)
        self._check(method, path, conn, resp)
        complete = False
        try:
            for raw in resp:
                line = raw.decode("utf-8").rstrip("\r\n")
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    complete = True
                    break
                yield data
            if not complete:
                raise BackendError(f"{method} {self.base_url}{path}: the stream ended without [DONE]")
            resp.read()  # the rest of the body, so the connection can carry the next request
        except OSError as e:
            raise BackendError(f"{method} {self.base_url}{path}: the connection failed: {e}") from e
        finally:
            # a stream left early still has a body in flight: that connection cannot be reused
            self._release(conn, complete and not resp.will_close)


def error_message(raw: bytes) -> str:
    try:
        body = json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace").strip() or "(empty body)"
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if isinstance(err, str):
            return err
        if "message" in body:
            return str(body["message"])
    return json.dumps(body)
