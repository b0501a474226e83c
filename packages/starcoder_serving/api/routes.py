"""The server's three routes, each a protocol run through the one request lifecycle (``lifecycle.py``).

``predict`` speaks two protocols: the seed contract, and TGI's (``{"inputs": ...}``, for IDE plugins and
huggingface_hub). A predict body never has an ``inputs`` field (its schema refuses one), so that field tells them
apart.

TGI answers one request on two routes: ``/`` with a list (``[{"generated_text": ...}]``, what huggingface_hub and
the ``text-generation`` client read) and ``/generate`` with the object alone. A truss has one route, so predict
answers the list, except to llm-ls (llm-vscode, llm.nvim), whose ``tgi`` backend reads only the object (llm-ls
0.5.3, crates/llm-ls/src/backend.rs, ``parse_tgi_text``: a list is an "invalid backend"). llm-ls names itself in
every request's User-Agent (``llm-ls/<version>; rust/unknown; ide/<ide>``, ``build_tgi_headers``).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from starcoder_serving.api.lifecycle import RouteProtocol, serve
from starcoder_serving.api.openai_route import ChatProtocol, CompletionsProtocol
from starcoder_serving.api.predict_route import PredictProtocol
from starcoder_serving.api.tgi_route import TgiProtocol
from starcoder_serving.engine.engine import Engine

# How llm-ls's requests begin their User-Agent (llm-ls 0.5.3, backend.rs, build_tgi_headers).
LLM_LS_USER_AGENT = "llm-ls/"


class Routes:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._predict = PredictProtocol()
        self._tgi = TgiProtocol(engine)
        self._tgi_generate = TgiProtocol(engine, answer_object=True)  # TGI's /generate shape, for llm-ls
        self._completions = CompletionsProtocol(engine)
        self._chat = ChatProtocol(engine)

    async def predict(self, request: Request) -> Any:
        wants_object = request.headers.get("user-agent", "").startswith(LLM_LS_USER_AGENT)
        return await serve(self._predict, self.engine, request, pick=lambda body: self._pick(body, wants_object))

    def _pick(self, body: dict[str, Any], wants_object: bool) -> RouteProtocol[Any]:
        if "inputs" not in body:
            return self._predict
        return self._tgi_generate if wants_object else self._tgi

    async def completions(self, request: Request) -> Any:
        return await serve(self._completions, self.engine, request)

    async def chat_completions(self, request: Request) -> Any:
        return await serve(self._chat, self.engine, request)
