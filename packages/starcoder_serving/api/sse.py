"""Server-Sent Events, as the OpenAI and TGI streams write them."""

from __future__ import annotations

import json
from typing import Any

SSE_DONE = b"data: [DONE]\n\n"
# No caching, and no buffering by a proxy (nginx honours X-Accel-Buffering): each event goes out as it is made.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()
