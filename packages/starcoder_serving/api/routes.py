"""The server's three routes, each a protocol run through the one request lifecycle (``lifecycle.py``).

``predict`` speaks two protocols: the seed contract, and TGI's (``{"inputs": ...}``, for IDE plugins and
huggingface_hub). A predict body never has an ``inputs`` field (its schema refuses one), so that field tells them
apart.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from starcoder_serving.api.lifecycle import RouteProtocol, serve
from starcoder_serving.api.openai_route import ChatProtocol, CompletionsProtocol
from starcoder_serving.api.predict_route import PredictProtocol
from starcoder_serving.api.tgi_route import TgiProtocol
from starcoder_serving.engine.engine import Engine


class Routes:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._predict = PredictProtocol()
        self._tgi = TgiProtocol(engine)
        self._completions = CompletionsProtocol(engine)
        self._chat = ChatProtocol(engine)

    async def predict(self, request: Request) -> Any:
        return await serve(self._predict, self.engine, request, pick=self._pick)

    def _pick(self, body: dict[str, Any]) -> RouteProtocol[Any]:
        return self._tgi if "inputs" in body else self._predict

    async def completions(self, request: Request) -> Any:
        return await serve(self._completions, self.engine, request)

    async def chat_completions(self, request: Request) -> Any:
        return await serve(self._chat, self.engine, request)
