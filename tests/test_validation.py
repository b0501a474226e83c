"""Request validation: every malformed request gets a message naming the field and the fix."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starcoder_serving.api.generation_params import PYTHON_ONLY_PARAMETERS
from starcoder_serving.api.predict_route import PredictProtocol
from starcoder_serving.engine.engine import Engine
from starcoder_serving.errors import InvalidRequest

from tests.strategies import json_values, predict_fields

PARSE = PredictProtocol().parse


def parse_error(body: dict[str, object], engine: Engine | None = None) -> str:
    """The message predict answers ``body`` with: from its schema, or (with an engine) from the validation stage."""
    with pytest.raises(InvalidRequest) as caught:
        parsed = PARSE(body)
        if engine is not None:
            engine.validate(parsed.to_request())
    return caught.value.message


def test_seed_request_parses_with_no_generation_parameters() -> None:
    parsed = PARSE({"prompt": "def compute_fib(n):"})
    assert parsed.prompt == "def compute_fib(n):"
    assert parsed.set_parameters() == {}
    assert parsed.stream is False


def test_generation_parameters_pass_through_by_their_transformers_names() -> None:
    body = {"prompt": "x", "max_new_tokens": 5, "temperature": 0.7, "do_sample": True, "top_k": 3, "num_beams": 1}
    assert PARSE(body).set_parameters() == {k: v for k, v in body.items() if k != "prompt"}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, "exactly one input form"),
        ({"prompt": ""}, "`prompt`"),
        ({"prompt": 42}, "`prompt`: Input should be a valid string"),
        ({"prompt": ["a"]}, "`prompt`"),
        ({"prompt": "x", "max_new_tokens": "10"}, "`max_new_tokens`: Input should be a valid integer"),
        ({"prompt": "x", "max_new_tokens": 0}, "`max_new_tokens`: Input should be greater than or equal to 1"),
        ({"prompt": "x", "temperature": -1.0}, "`temperature`: Input should be greater than 0"),
        ({"prompt": "x", "top_p": 1.5}, "`top_p`"),
        ({"prompt": "x", "do_sample": 1}, "`do_sample`: Input should be a valid boolean"),
        ({"prompt": "x", "stream": "yes"}, "`stream`"),
        ({"prompt": "x", "seed": -3}, "`seed`"),
        ({"prompt": "x", "prefix": "a"}, "exactly one input form"),
        ({"suffix": "a"}, '"suffix" needs "prefix"'),
        ({"messages": []}, "`messages`"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "`messages.0.role`"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "must end with a user"),
        ({"input": "data"}, '"input" needs "instruction"'),
        ({"prompt": "x", "bad_words_ids": [[-1]]}, "`bad_words_ids.0.0`"),
    ],
)
def test_bad_values_name_the_field(engine: Engine, body: dict[str, object], expected: str) -> None:
    assert expected in parse_error(body, engine)


@pytest.mark.parametrize("stop", [[1], 5, [["nested"]], {"a": "b"}])
def test_a_field_of_several_shapes_is_named_once_with_its_shapes(stop: object) -> None:
    """pydantic reports each union member that failed ("stop.str", "stop.list[str].0"); a client wrote `stop`."""
    with pytest.raises(InvalidRequest) as caught:
        PARSE({"prompt": "x", "stop": stop})
    assert caught.value.param == "stop"
    assert caught.value.message == "`stop` must be a string or a list of strings."


def test_unknown_parameters_are_named_with_the_list_of_accepted_ones() -> None:
    message = parse_error({"prompt": "x", "max_tokenz": 5})
    assert "Unknown parameter `max_tokenz`" in message
    assert "max_new_tokens" in message  # the fix is in the message


@pytest.mark.parametrize("name", sorted(PYTHON_ONLY_PARAMETERS))
def test_python_only_parameters_are_refused_with_their_reason(name: str) -> None:
    message = parse_error({"prompt": "x", name: "anything"})
    assert f"`{name}` is not accepted: {PYTHON_ONLY_PARAMETERS[name]}" in message


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(predict_fields, json_values, max_size=5))
def test_fuzzed_bodies_either_parse_or_raise_a_client_error(body: dict[str, object]) -> None:
    json.dumps(body)  # the fuzzer only sends what a client could
    try:
        PARSE(body)
    except InvalidRequest as error:
        assert error.status_code == 400 and error.message
