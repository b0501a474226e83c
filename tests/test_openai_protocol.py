"""OpenAI request validation and its mapping onto engine parameters, without a server."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starcoder_serving.api.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    parse_chat_request,
    parse_completion_request,
)
from starcoder_serving.engine.engine import Engine
from starcoder_serving.engine.validation import ValidRequest
from starcoder_serving.errors import InvalidRequest
from starcoder_serving.text.token_texts import TokenTexts

CHAT = [{"role": "user", "content": "hi"}]


def completion(**fields: Any) -> dict[str, Any]:
    return {"model": "starcoder", "prompt": "def f():", **fields}


def validated(engine: Engine, parse: Any, body: dict[str, Any]) -> ValidRequest:
    """What the server does with a body before generating: parse its shape, then the one validation stage."""
    return engine.validate(parse(body).to_request())


def sent(parsed: Any, logprobs: int | None = None) -> dict[str, Any]:
    """The engine parameters the request sets (the rest are the engine's defaults)."""
    return parsed.sampling_params(logprobs).model_dump(exclude_unset=True)


def test_openai_defaults_sample_the_whole_distribution() -> None:
    parsed = parse_completion_request(completion())
    assert sent(parsed) == {"n": 1, "logprobs": None, "do_sample": True, "temperature": 1.0, "top_k": 0}
    assert not parsed.streaming and parsed.choices_per_prompt == 1 and "stop" not in sent(parsed)


def test_sampling_parameters_map_to_transformers_names() -> None:
    parsed = parse_completion_request(
        completion(max_tokens=9, temperature=0.5, top_p=0.9, top_k=40, repetition_penalty=1.2, min_tokens=3, stop="\n")
    )
    assert sent(parsed) == {
        "n": 1,
        "logprobs": None,
        "max_new_tokens": 9,
        "min_new_tokens": 3,
        "repetition_penalty": 1.2,
        "do_sample": True,
        "temperature": 0.5,
        "top_k": 40,
        "top_p": 0.9,
        "stop": ("\n",),
    }
    biased = parse_completion_request(completion(logit_bias={"5": 10, "7": -100}, presence_penalty=0.5, seed=3))
    assert sent(biased)["logit_bias"] == {5: 10.0, 7: -100.0}
    assert (sent(biased)["presence_penalty"], sent(biased)["seed"]) == (0.5, 3)


def test_temperature_zero_is_greedy() -> None:
    parsed = parse_completion_request(completion(temperature=0, top_p=0.5, top_k=5))
    assert sent(parsed) == {"n": 1, "logprobs": None, "do_sample": False}


def test_chat_max_completion_tokens_and_logprobs() -> None:
    parsed = parse_chat_request({"messages": CHAT, "max_completion_tokens": 7, "logprobs": True, "top_logprobs": 3})
    assert sent(parsed, parsed.chosen_logprobs)["max_new_tokens"] == 7
    assert sent(parsed, parsed.chosen_logprobs)["logprobs"] == 3
    assert parsed.chosen_logprobs == 3
    assert parse_chat_request({"messages": CHAT, "logprobs": True}).chosen_logprobs == 0
    assert parse_chat_request({"messages": CHAT}).chosen_logprobs is None


def test_chat_messages_accept_text_parts_and_developer_role() -> None:
    parsed = parse_chat_request(
        {
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            ],
            "response_format": {"type": "text"},
            "tools": [],
            # What some clients send by default; harmless in these forms.
            "store": False,
            "metadata": {},
            "service_tier": "auto",
        }
    )
    assert parsed.to_request().prompts[0].messages == (("system", "Be brief."), ("user", "ab"))


def test_prompt_forms() -> None:
    assert parse_completion_request(completion(prompt="x")).prompts() == ["x"]
    assert parse_completion_request(completion(prompt=["x", "y"])).prompts() == ["x", "y"]
    assert parse_completion_request(completion(prompt=[1, 2])).prompts() == [[1, 2]]
    assert parse_completion_request(completion(prompt=[[1], [2, 3]])).prompts() == [[1], [2, 3]]


REFUSED_COMPLETIONS: list[tuple[dict[str, Any], str, str]] = [
    ({"prompt": "x", "temprature": 1}, "temprature", "Unknown parameter `temprature`"),
    ({"prompt": "x", "max_new_tokens": 5}, "max_new_tokens", "use max_tokens"),
    ({"max_tokens": 5}, "prompt", "`prompt` is required"),
    ({"prompt": []}, "prompt", "`prompt` must be a string"),
    ({"prompt": [1, "x"]}, "prompt", "`prompt` must be"),
    ({"prompt": "x", "stop": [1]}, "stop", "`stop` must be a string or a list"),
    ({"prompt": "x", "presence_penalty": 2.1}, "presence_penalty", "`presence_penalty`"),
    ({"prompt": "x", "frequency_penalty": -2.5}, "frequency_penalty", "`frequency_penalty`"),
    ({"prompt": "x", "logit_bias": {"a1": 5}}, "logit_bias", "decimal strings"),
    ({"prompt": "x", "logit_bias": {"a1": 5, "7": 1, "-3": 2, "1e3": 1}}, "logit_bias", "got 'a1', '-3', '1e3'."),
    ({"prompt": "x", "logit_bias": {"1": 101}}, "logit_bias.1", "less than or equal to 100"),
    ({"prompt": "x", "best_of": 2}, "best_of", "does not rank"),
    ({"prompt": "x", "echo": True, "logprobs": 0, "stream": True}, "stream", "not streamed"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "only scores the prompt"),
    ({"prompt": "x", "echo": True, "suffix": "y"}, "echo", "suffix"),
    ({"prompt": [1, 2], "suffix": "y"}, "suffix", "token ids"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", '"stream": true'),
    ({"prompt": "x", "stream": True, "stream_options": {"include_usge": True}}, "stream_options.include_usge", ""),
    ({"prompt": "x", "logprobs": 6}, "logprobs", "less than or equal to 5"),
    ({"prompt": "x", "temperature": 2.5}, "temperature", ""),
    ({"prompt": "x", "temperature": "0.5"}, "temperature", ""),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", ""),
    ({"prompt": "x", "stream": "yes"}, "stream", ""),
    ({"prompt": "x", "n": 0}, "n", ""),
    ({"prompt": "x", "min_tokens": 5, "max_tokens": 2}, "min_tokens", "more than the 2 allowed by max_tokens"),
]


@pytest.mark.parametrize(("body", "param", "expected"), REFUSED_COMPLETIONS, ids=[c[1] for c in REFUSED_COMPLETIONS])
def test_refused_completion_requests_name_the_parameter(
    engine: Engine, body: dict[str, Any], param: str, expected: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        validated(engine, parse_completion_request, body)
    assert caught.value.status_code == 400
    assert caught.value.param == param
    assert expected in caught.value.message


REFUSED_CHATS: list[tuple[dict[str, Any], str, str]] = [
    ({"messages": []}, "messages", "`messages`"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role", ""),
    ({"messages": [{"role": "user", "content": "x", "nmae": "bob"}]}, "messages.0.nmae", "Unknown field"),
    ({"messages": [{"role": "user", "content": "x", "refusal": "no"}]}, "messages.0.refusal", "must be null"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages.0.content",
        "list of {",
    ),
    ({"messages": [*CHAT, {"role": "assistant", "content": "x"}]}, "messages", "must end with a user"),
    ({"messages": CHAT, "tools": [{"type": "function"}]}, "tools", "tool"),
    ({"messages": CHAT, "response_format": {"type": "json_object"}}, "response_format", "structured output"),
    ({"messages": CHAT, "store": True}, "store", "not stored"),
    ({"messages": CHAT, "metadata": {"team": "a"}}, "metadata", "stored completions"),
    ({"messages": CHAT, "service_tier": "flex"}, "service_tier", "one service tier"),
    ({"messages": CHAT, "top_logprobs": 2}, "top_logprobs", '"logprobs": true'),
    ({"messages": CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs", ""),
    ({"messages": CHAT, "max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens", "either"),
    ({"messages": CHAT, "prompt": "x"}, "prompt", "Unknown parameter `prompt`"),
]


@pytest.mark.parametrize(("body", "param", "expected"), REFUSED_CHATS, ids=[c[1] for c in REFUSED_CHATS])
def test_refused_chat_requests_name_the_parameter(
    engine: Engine, body: dict[str, Any], param: str, expected: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        validated(engine, parse_chat_request, body)
    assert caught.value.param == param
    assert expected in caught.value.message


# ---- against the in-process engine: limits, FIM, token ids, finish reasons ----


def test_the_engines_limits_are_worded_in_openai_names(engine: Engine) -> None:
    with pytest.raises(
        InvalidRequest, match="`max_tokens` asks for 100000 new tokens, above this server's cap"
    ) as caught:
        validated(engine, parse_completion_request, completion(max_tokens=100000))
    assert caught.value.param == "max_tokens"
    with pytest.raises(InvalidRequest, match="`max_completion_tokens` asks for 100000") as caught:
        validated(engine, parse_chat_request, {"messages": CHAT, "max_completion_tokens": 100000})
    assert caught.value.param == "max_completion_tokens"
    with pytest.raises(InvalidRequest, match="`n` must be <="):
        validated(engine, parse_completion_request, completion(n=100))
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        validated(engine, parse_completion_request, completion(prompt=[1, 10**9]))
    with pytest.raises(InvalidRequest, match="`stop` has"):
        validated(engine, parse_completion_request, completion(stop=[str(i) for i in range(40)]))


def test_planning_builds_one_plan_per_choice(engine: Engine) -> None:
    valid = validated(
        engine, parse_completion_request, completion(prompt=["a", "bb"], n=2, seed=5, temperature=0.7, max_tokens=4)
    )
    assert [c.index for c in valid.choices] == [0, 1, 2, 3]
    assert [c.plan.sampling.seed for c in valid.choices] == [5, 6, 5, 6]
    assert valid.prompt_tokens == len(engine.tokenize("a")) + len(engine.tokenize("bb"))
    fim = validated(
        engine, parse_completion_request, completion(prompt="def f(", suffix="    return 1\n", max_tokens=4)
    )
    assert fim.choices[0].plan.prompt_ids == engine.tokenize("<fim_prefix>def f(<fim_suffix>    return 1\n<fim_middle>")
    chat = validated(engine, parse_chat_request, {"messages": CHAT, "stop": "END", "max_tokens": 4})
    assert chat.choices[0].plan.stop == ("END", *engine.chat.render(CHAT).implied_stop)


def test_token_texts_round_trip(engine: Engine) -> None:
    texts = TokenTexts(engine.tokenizer)
    ids = engine.tokenize("def f(x):\n    return 'é'\n")
    assert b"".join(texts.bytes_of(i) for i in ids).decode("utf-8") == "def f(x):\n    return 'é'\n"
    assert all(isinstance(texts.text_of(i), str) for i in range(engine.vocab_size))


# ---- fuzz: no body crashes the parser; every refusal is a 400 InvalidRequest ----

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
field_names = st.sampled_from(
    [*CompletionRequest.model_fields, *ChatCompletionRequest.model_fields, "max_new_tokens", "x"]
)
bodies = st.dictionaries(field_names, json_values, max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies)
def test_fuzzed_bodies_parse_or_get_a_clear_400(engine: Engine, body: dict[str, Any]) -> None:
    for parse in (parse_completion_request, parse_chat_request):
        try:
            validated(engine, parse, body)
        except InvalidRequest as error:
            assert error.status_code == 400 and error.message
            json.dumps(error.message)
