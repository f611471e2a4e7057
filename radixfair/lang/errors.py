"""Errors the frontend language raises."""

from __future__ import annotations


class BackendError(RuntimeError):
    """A backend could not serve an operation: the server answered with an error status (`status`
    is its HTTP code), could not be reached (`status` is None), or refused the request in-process."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status
