"""The installed package's version, for `/get_server_info` and the OpenAPI schema."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version


def version() -> str:
    try:
        return _dist_version("radixfair")
    except PackageNotFoundError:
        return "0"
