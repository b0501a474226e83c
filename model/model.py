"""Truss adapter for StarCoder: parse, call the engine, wrap the answer. The logic lives in packages/.

No `from __future__ import annotations` here: truss inspects the real `Request` annotation to hand
us the raw request.
"""

import gc
import logging
from pathlib import Path
from typing import Any

from starcoder_serving.api import body_limit
from starcoder_serving.api.http_body import MAX_BODY_BYTES
from starcoder_serving.api.routes import Routes
from starcoder_serving.engine.engine import Engine
from starcoder_serving.settings import ServingSettings
from starlette.requests import Request

logger = logging.getLogger(__name__)


class Model:
    def __init__(self, **kwargs: Any) -> None:
        self._config: dict[str, Any] = kwargs["config"]
        self._data_dir = Path(kwargs["data_dir"])
        self._secrets = kwargs["secrets"]
        # Set by truss when config.yaml has a model_cache: the weights are fetched in the background.
        self._lazy_data_resolver = kwargs.get("lazy_data_resolver")
        self._engine: Engine | None = None
        self._routes: Routes | None = None

    def _hf_token(self) -> str | None:
        """The Hugging Face token, or None (a local or public checkpoint needs none)."""
        try:
            token = self._secrets["hf_access_key"]
        except Exception:  # noqa: BLE001 - truss raises its own SecretNotFound for a declared but unset secret
            return None
        return token.strip() or None

    def load(self) -> None:
        # Before truss reads a body, not after: an oversized upload is refused and its connection closed.
        body_limit.install(MAX_BODY_BYTES)
        if self._lazy_data_resolver is not None:
            # The build-time weight cache lands in /app/model_cache in the background; truss refuses to
            # finish loading unless we wait for it here.
            self._lazy_data_resolver.block_until_download_complete()
        settings = ServingSettings.from_sources(self._config.get("model_metadata"))
        engine = Engine.load(settings, self._data_dir, hf_token=self._hf_token())
        engine.warm_up()  # before truss reports ready: the first user request pays no one-off costs
        # What load() built (the model, tokenizer, transformers and torch modules: millions of objects) lives as
        # long as the replica: kept out of the garbage collector's full passes, which would otherwise walk all of it
        # every few seconds under load and hold the event loop (and health checks) ~100-250 ms each time.
        gc.collect()
        gc.freeze()
        self._engine = engine
        self._routes = Routes(engine)

    def is_healthy(self) -> bool:
        """truss's health check (GET /v1/models/model answers 503 when False): Baseten restarts a replica
        whose engine cannot serve (worker thread gone, batch loop dead and not restartable, CUDA context
        poisoned)."""
        if self._engine is None:
            return False
        problem = self._engine.health()
        if problem is not None:
            logger.error("unhealthy: %s", problem)
        return problem is None

    # Taking the raw request (not parsed inputs) lets us answer malformed JSON in our own envelope
    # and notice when the client disconnects.
    async def predict(self, request: Request) -> Any:
        assert self._routes is not None, "load() has not run"
        return await self._routes.predict(request)

    # OpenAI-compatible routes (POST /v1/completions, POST /v1/chat/completions): same engine and
    # validation as predict, OpenAI's request and response shapes (see README: "The OpenAI-compatible API").
    async def completions(self, request: Request) -> Any:
        assert self._routes is not None, "load() has not run"
        return await self._routes.completions(request)

    async def chat_completions(self, request: Request) -> Any:
        assert self._routes is not None, "load() has not run"
        return await self._routes.chat_completions(request)
