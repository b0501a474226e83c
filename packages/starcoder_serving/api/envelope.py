"""The seed Truss's response envelope: ``{"status", "data", "message"}``."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from starcoder_serving.errors import ServingError


def success(data: dict[str, Any]) -> dict[str, Any]:
    return {"status": "success", "data": data, "message": None}


def failure(error: ServingError) -> JSONResponse:
    return JSONResponse(
        status_code=error.status_code,
        content={"status": "failed", "data": None, "message": error.message},
    )
