"""Errors a request can meet, each with the HTTP status it maps to and a message meant for the client."""

from __future__ import annotations

from typing import Any

import pydantic

from starcoder_serving.api.generation_params import PYTHON_ONLY_PARAMETERS


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


def _field_name(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "body"


def describe_validation_error(error: pydantic.ValidationError, known_fields: frozenset[str]) -> InvalidRequest:
    """One readable sentence per problem: which field, what is wrong, how to fix it."""
    problems: list[str] = []
    first_param: str | None = None
    for detail in error.errors():
        loc = tuple(detail["loc"])
        name = _field_name(loc)
        first_param = first_param or name
        if detail["type"] == "extra_forbidden" and len(loc) == 1:
            if name in PYTHON_ONLY_PARAMETERS:
                problems.append(f"`{name}` is not accepted: {PYTHON_ONLY_PARAMETERS[name]}.")
            else:
                problems.append(
                    f"Unknown parameter `{name}`. Remove it; accepted parameters are: {', '.join(sorted(known_fields))}."
                )
        elif detail["type"] == "value_error" and not loc:
            problems.append(str(detail["msg"]).removeprefix("Value error, ") + ".")
        else:
            got = detail.get("input")
            shown = repr(got) if not isinstance(got, (dict, list)) or len(repr(got)) < 80 else type(got).__name__
            problems.append(f"`{name}`: {detail['msg']} (got {shown}).")
    return InvalidRequest(" ".join(problems), param=first_param)
