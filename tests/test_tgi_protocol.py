"""TGI's protocol on predict, through the real huggingface_hub client (what IDE plugins speak)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import huggingface_hub.constants
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import ValidationError as TgiValidationError

from tests.conftest import RunningServer

PROMPT = "def compute_fib(n):"


@pytest.fixture(scope="module")
def hub(server: RunningServer) -> Iterator[InferenceClient]:
    # `make test` sets HF_HUB_OFFLINE=1 so nothing reaches the hub; huggingface_hub then refuses every
    # request, even to this local server. A user's client is not offline: lift it for the client alone.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        yield InferenceClient(model=server.predict_url)


def seed_contract(server: RunningServer, **fields: object) -> dict[str, object]:
    response = httpx.post(server.predict_url, json={"prompt": PROMPT, **fields}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["data"]


def test_plain_text_generation_is_the_same_completion_as_the_seed_contract(
    hub: InferenceClient, server: RunningServer
) -> None:
    text = hub.text_generation(PROMPT, max_new_tokens=12)
    assert text == seed_contract(server, max_new_tokens=12)["completion"]
    full = httpx.post(
        server.predict_url, json={"inputs": PROMPT, "parameters": {"max_new_tokens": 12, "return_full_text": True}}
    )
    assert full.status_code == 200 and isinstance(full.json(), list)
    assert full.json()[0]["generated_text"] == PROMPT + text


def test_details_give_tokens_logprobs_seed_and_the_prompt(hub: InferenceClient, server: RunningServer) -> None:
    out = hub.text_generation(
        PROMPT, max_new_tokens=10, details=True, decoder_input_details=True, do_sample=True, seed=5, temperature=0.7
    )
    details = out.details
    assert details is not None
    assert details.finish_reason in ("length", "eos_token", "stop_sequence")
    assert details.generated_tokens == len(details.tokens) and details.seed == 5
    assert all(token.logprob is not None and token.logprob <= 0 for token in details.tokens)
    prompt_tokens = seed_contract(server, max_new_tokens=1)["prompt_tokens"]
    assert len(details.prefill) == prompt_tokens and details.prefill[0].logprob is None
    again = hub.text_generation(PROMPT, max_new_tokens=10, details=True, do_sample=True, seed=5, temperature=0.7)
    assert again.generated_text == out.generated_text  # the seed is honoured
    greedy = hub.text_generation(PROMPT, max_new_tokens=10, details=True)
    assert greedy.details is not None and greedy.details.seed is None


def test_streamed_tokens_add_up_to_the_text(hub: InferenceClient) -> None:
    whole = hub.text_generation(PROMPT, max_new_tokens=16)
    assert "".join(hub.text_generation(PROMPT, max_new_tokens=16, stream=True)) == whole
    events = list(hub.text_generation(PROMPT, max_new_tokens=16, stream=True, details=True))
    assert [e.generated_text for e in events[:-1]] == [None] * (len(events) - 1)
    assert events[-1].generated_text == whole and events[-1].details is not None
    assert events[-1].details.generated_tokens == len(events)
    assert "".join(e.token.text for e in events if not e.token.special) == whole


def test_errors_are_tgi_shaped(hub: InferenceClient, server: RunningServer) -> None:
    with pytest.raises(TgiValidationError, match="cap of 2048"):
        hub.text_generation(PROMPT, max_new_tokens=100000)
    for parameters, name in (({"watermark": True}, "watermark"), ({"best_of": 2}, "best_of"), ({"temprature": 1}, "")):
        response = httpx.post(server.predict_url, json={"inputs": PROMPT, "parameters": parameters}, timeout=60)
        assert response.status_code == 400, response.text
        body = response.json()
        assert body["error_type"] == "validation" and name in body["error"]
    assert httpx.post(server.predict_url, json={"inputs": ""}, timeout=60).json()["error_type"] == "validation"


def test_truncate_keeps_the_last_input_tokens(server: RunningServer) -> None:
    body = {"inputs": "x = 1\n" * 50 + PROMPT, "parameters": {"max_new_tokens": 4, "truncate": 8, "details": True,
                                                              "decoder_input_details": True}}  # fmt: skip
    response = httpx.post(server.predict_url, json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()[0]["details"]["prefill"]) == 8
