"""Errors a request can meet, each with the HTTP status it maps to and a message meant for the client."""

from __future__ import annotations


class ServingError(Exception):
    """An error whose message is safe and useful to show the client."""

    status_code = 500
    error_type = "server_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(ServingError):
    status_code = 400
    error_type = "invalid_request_error"


class PayloadTooLarge(InvalidRequest):
    status_code = 413


class Overloaded(ServingError):
    status_code = 503
    error_type = "overloaded_error"


class GenerationFailed(ServingError):
    status_code = 500


def out_of_memory() -> Overloaded:
    """The accelerator ran out of memory for one request (either generation path): retryable, with the fixes."""
    return Overloaded(
        "The GPU ran out of memory for this request. Retry, or send a shorter prompt, fewer new tokens or fewer beams."
    )
