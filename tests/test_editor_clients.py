"""Editor integrations against the real server: each test replays what the client sends (URL, headers, body, built
as in the client's own source) and reads the answer the way the client reads it.

Sources (read at these versions):

* llm-vscode 0.2.2 (huggingface/llm-vscode, package.json, src/extension.ts): passes ``llm.backend``, ``llm.url``,
  ``llm.requestBody``, ``llm.disableUrlPathCompletion`` ... to llm-ls 0.5.3, which it bundles; llm.nvim does the same.
* llm-ls 0.5.3 (huggingface/llm-ls, tag 0.5.3): crates/llm-ls/src/main.rs (``build_url``, ``request_completion``)
  and crates/llm-ls/src/backend.rs (``build_body``, ``build_headers``, ``parse_tgi_text``, ``parse_api_text``,
  ``parse_openai_text``).
* Continue (continuedev/continue): core/llm/llms/OpenAI.ts (``_convertArgs``, ``_legacystreamComplete`` for
  autocomplete (``raw``), ``_streamChat``, ``_getEndpoint``: ``new URL(endpoint, apiBase)``),
  core/autocomplete/templating/AutocompleteTemplate.ts (``stableCodeFimTemplate``, used for "starcoder" models),
  core/autocomplete/templating/getStopTokens.ts, core/llm/llms/HuggingFaceTGI.ts
  (``new URL("generate_stream", apiBase)``).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urljoin

import httpx
import pytest

from tests.conftest import RunningServer

PREFIX = "def fib(n):\n    "
SUFFIX = "\n    return a\n"
# llm-ls's FIM prompt with llm-vscode's StarCoder settings (fillInTheMiddle prefix/suffix/middle).
FIM_PROMPT = f"<fim_prefix>{PREFIX}<fim_suffix>{SUFFIX}<fim_middle>"
# llm-vscode 0.2.2's default llm.requestBody (package.json).
LLM_VSCODE_REQUEST_BODY = {"parameters": {"max_new_tokens": 60, "temperature": 0.2, "top_p": 0.95}}
LLM_LS_HEADERS = {"User-Agent": "llm-ls/0.5.3; rust/unknown; ide/VSCode", "Authorization": "Bearer hf_unused"}


def llm_ls_url(backend: str, url: str, disable_url_path_completion: bool) -> str:
    """llm-ls 0.5.3 main.rs ``build_url`` for the backends a truss could serve."""
    if disable_url_path_completion:
        return url
    if backend == "huggingface":
        return f"{url}/models/bigcode/starcoder"
    if backend == "tgi":
        return url if url.endswith("/generate") else url + ("generate" if url.endswith("/") else "/generate")
    assert backend == "openai"
    if url.endswith("/v1/completions"):
        return url
    if url.endswith("/v1/"):
        return url + "completions"
    if url.endswith("/v1"):
        return url + "/completions"
    return url + ("v1/completions" if url.endswith("/") else "/v1/completions")


def llm_ls_body(backend: str, request_body: dict[str, Any], prompt: str) -> dict[str, Any]:
    """backend.rs ``build_body``: llm.requestBody as is, plus the prompt (and ``return_full_text: false``)."""
    body = json.loads(json.dumps(request_body))
    if backend in ("huggingface", "tgi"):
        body["inputs"] = prompt
        if isinstance(body.get("parameters"), dict):
            body["parameters"]["return_full_text"] = False
        else:
            body["parameters"] = {"parameters": {"return_full_text": False}}  # sic: llm-ls nests it
        return body
    body.update(prompt=prompt, model="bigcode/starcoder", stream=False)
    return body


def llm_ls_generations(backend: str, text: str) -> list[str]:
    """backend.rs's parsers: serde's untagged enums, tried in order, whatever the status code."""
    value = json.loads(text)
    if backend == "openai":  # OpenAIGeneration {choices: [{text}]}, else OpenAIError {detail: [...]}
        assert isinstance(value, dict) and "choices" in value, f"llm-ls: data did not match any variant: {text}"
        return [choice["text"] for choice in value["choices"]]
    if isinstance(value, dict) and isinstance(value.get("generated_text"), str):
        return [value["generated_text"]]
    if isinstance(value, list) and all(isinstance(g, dict) and isinstance(g.get("generated_text"), str) for g in value):
        if backend == "tgi":  # parse_tgi_text: APIResponse::Generations => Err(Error::InvalidBackend)
            raise AssertionError("llm-ls: invalid backend (a list)")
        return [g["generated_text"] for g in value]
    assert isinstance(value, dict) and isinstance(value.get("error"), str), f"llm-ls: no variant matched: {text}"
    raise LlmLsBackendError(value["error"])


class LlmLsBackendError(Exception):
    """llm-ls's Error::Tgi / Error::InferenceApi: the backend's ``{"error": "..."}``, shown to the user."""


@pytest.mark.parametrize("backend", ["tgi", "huggingface"])
def test_llm_vscode_tgi_and_huggingface_backends_on_predict(server: RunningServer, backend: str) -> None:
    """settings.json: "llm.backend": "tgi" (or "huggingface"), "llm.url": <predict URL>,
    "llm.disableUrlPathCompletion": true, llm.requestBody left at its default."""
    url = llm_ls_url(backend, server.predict_url, disable_url_path_completion=True)
    body = llm_ls_body(backend, LLM_VSCODE_REQUEST_BODY, FIM_PROMPT)
    response = httpx.post(url, json=body, headers=LLM_LS_HEADERS, timeout=60)
    assert response.status_code == 200, response.text
    [generated] = llm_ls_generations(backend, response.text)
    # The same completion the OpenAI route gives for the same fill-in-the-middle request (seeded sampling aside,
    # compare greedy: a second request with temperature 0 through both).
    assert isinstance(generated, str)
    greedy = llm_ls_body(backend, {"parameters": {"max_new_tokens": 8, "do_sample": False}}, FIM_PROMPT)
    [text] = llm_ls_generations(backend, httpx.post(url, json=greedy, headers=LLM_LS_HEADERS, timeout=60).text)
    openai = httpx.post(
        f"{server.base_url}/v1/completions",
        json={"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 8, "temperature": 0},
        timeout=60,
    ).json()
    assert text == openai["choices"][0]["text"]


def test_llm_ls_tgi_error_is_the_object_it_shows(server: RunningServer) -> None:
    body = llm_ls_body("tgi", {"parameters": {"max_new_tokens": 10**6}}, FIM_PROMPT)
    response = httpx.post(server.predict_url, json=body, headers=LLM_LS_HEADERS, timeout=60)
    assert response.status_code == 400
    with pytest.raises(LlmLsBackendError, match="max_new_tokens"):
        llm_ls_generations("tgi", response.text)


def test_other_tgi_clients_still_get_tgi_root_routes_list(server: RunningServer) -> None:
    """huggingface_hub and the ``text-generation`` client post to TGI's ``/`` and read ``payload[0]``."""
    body = {"inputs": "def f():", "parameters": {"max_new_tokens": 2}}
    response = httpx.post(server.predict_url, json=body, headers={"User-Agent": "python-httpx"}, timeout=60)
    assert isinstance(response.json(), list)


def test_llm_vscode_without_disable_url_path_completion_reaches_no_route(server: RunningServer) -> None:
    """Without "llm.disableUrlPathCompletion": true llm-ls appends ``/generate`` (tgi) or ``/models/<id>``
    (huggingface) to llm.url: routes a truss does not have."""
    for backend in ("tgi", "huggingface"):
        url = llm_ls_url(backend, server.predict_url, disable_url_path_completion=False)
        assert url != server.predict_url
        response = httpx.post(url, json=llm_ls_body(backend, LLM_VSCODE_REQUEST_BODY, FIM_PROMPT), timeout=60)
        assert response.status_code == 404


def test_llm_vscode_openai_backend_on_v1_completions(server: RunningServer) -> None:
    """settings.json: "llm.backend": "openai", "llm.url": "<base>/v1/completions" (kept as is: it ends with
    /v1/completions), llm.requestBody with OpenAI's names (its default ``parameters`` object is TGI's)."""
    url = llm_ls_url("openai", f"{server.base_url}/v1", disable_url_path_completion=False)
    assert url == f"{server.base_url}/v1/completions"
    request_body = {"max_tokens": 16, "temperature": 0.2, "top_p": 0.95}
    response = httpx.post(url, json=llm_ls_body("openai", request_body, FIM_PROMPT), headers=LLM_LS_HEADERS)
    assert response.status_code == 200, response.text
    [generated] = llm_ls_generations("openai", response.text)
    assert isinstance(generated, str)


# Continue: getStopTokens (model "starcoder": no starcoder2 artifacts, no language stop words in this version):
# the template's stops, then "\n\n", "\r\n\r\n", then "/src/", "#- coding: utf-8", "```".
CONTINUE_STARCODER_STOPS = [
    "<fim_prefix>",
    "<fim_suffix>",
    "<fim_middle>",
    "<file_sep>",
    "<|endoftext|>",
    "</fim_middle>",
    "</code>",
    "\n\n",
    "\r\n\r\n",
    "/src/",
    "#- coding: utf-8",
    "```",
]


def continue_stream(response: httpx.Response) -> list[dict[str, Any]]:
    """core/llm/stream.ts ``streamSse``: each ``data:`` line's JSON until ``[DONE]``."""
    assert response.status_code == 200, response.text
    values = []
    for line in response.text.splitlines():
        if line.startswith("data:"):
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                break
            values.append(json.loads(data))
    return values


def test_continue_openai_autocomplete_on_v1_completions(server: RunningServer) -> None:
    """config.json: provider "openai", apiBase "<base>/v1/" (the trailing slash matters: ``new URL("completions",
    apiBase)``), "useLegacyCompletionsEndpoint": true, completionOptions.maxTokens set; its whole stop list is accepted.
    Autocomplete calls ``_legacystreamComplete`` (``raw``): ``_convertArgs`` + ``prompt`` + ``stream: true``."""
    api_base = f"{server.base_url}/v1/"
    url = urljoin(api_base, "completions")
    assert url == f"{server.base_url}/v1/completions"
    assert urljoin(f"{server.base_url}/v1", "completions") == f"{server.base_url}/completions"  # without the slash
    body = {
        "model": "starcoder",
        "max_tokens": 16,  # completionOptions.maxTokens
        "temperature": 0.01,
        "top_p": 0.95,
        "frequency_penalty": 0.1,
        "presence_penalty": 0.1,
        "stream": True,
        "stop": CONTINUE_STARCODER_STOPS,  # all of them: no maxStopWords setting needed
        "prompt": FIM_PROMPT,
    }
    headers = {"Content-Type": "application/json", "Authorization": "Bearer unused", "api-key": "unused"}
    values = continue_stream(httpx.post(url, content=json.dumps(body), headers=headers, timeout=60))
    text = "".join(v["choices"][0]["text"] for v in values if v.get("choices") and v["choices"][0].get("text"))
    assert values and isinstance(text, str)


def test_continue_openai_chat_on_v1_chat_completions(server: RunningServer) -> None:
    """Chat: ``_streamChat`` posts ``_convertArgs`` to ``new URL("chat/completions", apiBase)``, reads
    ``choices[0].delta.content``."""
    url = urljoin(f"{server.base_url}/v1/", "chat/completions")
    body = {
        "messages": [
            {"role": "system", "content": "You are a helpful coding assistant."},
            {"role": "user", "content": "Write a Python function that adds two numbers."},
        ],
        "model": "starcoder",
        "max_tokens": 32,
        "temperature": 0.5,
        "top_p": 0.9,
        "frequency_penalty": 0.2,
        "presence_penalty": 0.3,
        "stream": True,
    }
    values = continue_stream(httpx.post(url, json=body, headers={"Authorization": "Bearer unused"}, timeout=60))
    content = "".join(v["choices"][0]["delta"].get("content") or "" for v in values if v.get("choices"))
    assert values and isinstance(content, str)
    assert values[0]["object"] == "chat.completion.chunk"


def test_continue_huggingface_tgi_provider_reaches_no_route(server: RunningServer) -> None:
    """HuggingFaceTGI.ts posts to ``new URL("generate_stream", apiBase)``: from the predict URL that is
    ``/v1/models/generate_stream`` (Baseten: ``/environments/production/generate_stream``), no route on a truss."""
    url = urljoin(server.predict_url, "generate_stream")
    assert url == f"{server.base_url}/v1/models/generate_stream"
    assert (
        urljoin("https://model-x.api.baseten.co/environments/production/predict", "generate_stream")
        == "https://model-x.api.baseten.co/environments/production/generate_stream"
    )
    response = httpx.post(url, json={"inputs": FIM_PROMPT, "parameters": {"max_new_tokens": 4}}, timeout=60)
    assert response.status_code in (404, 405)  # 405: truss's GET /v1/models/{name} (a model named generate_stream)


def test_llm_ls_nested_parameters_without_a_request_body_parameters_object(server: RunningServer) -> None:
    """llm.requestBody without ``parameters`` (e.g. ``{}``): build_body nests ``{"parameters": {"return_full_text":
    false}}`` inside ``parameters``; read as return_full_text."""
    body = llm_ls_body("tgi", {}, "def add(a, b):")
    assert body["parameters"] == {"parameters": {"return_full_text": False}}
    response = httpx.post(server.predict_url, json=body, headers=LLM_LS_HEADERS, timeout=60)
    assert response.status_code == 200, response.text
    [generated] = llm_ls_generations("tgi", response.text)
    assert not generated.startswith("def add(a, b):")


def tabby_stream(response: httpx.Response) -> str:
    """Tabby (TabbyML/tabby, crates/http-api-bindings/src/completion/openai.rs): each event's data must parse as
    ``{choices: [{text: String, finish_reason: Option<String>}]}`` (``.expect``: anything else panics), read until
    the first choice with a finish_reason."""
    assert response.status_code == 200, response.text
    text = ""
    for line in response.text.splitlines():
        if not line.startswith("data:"):
            continue
        chunk = json.loads(line[len("data:") :].strip())  # `[DONE]` here would be Tabby's panic
        assert isinstance(chunk["choices"], list)
        if chunk["choices"]:
            choice = chunk["choices"][0]
            assert isinstance(choice["text"], str)
            text += choice["text"]
            if choice.get("finish_reason") is not None:
                return text
    raise AssertionError("no finish_reason before the stream ended")


@pytest.mark.parametrize(
    ("kind", "prompt", "suffix"),
    [
        # kind "openai/completion": FIM_TEMPLATE "{prefix}<|FIM|>{suffix}" split into prompt and suffix
        ("openai/completion", PREFIX, SUFFIX),
        ("openai/completion", PREFIX, ""),  # cursor at the end of the file: an empty suffix
        # kind "openai/legacy_completion_no_fim" with prompt_template "<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>"
        ("openai/legacy_completion_no_fim", FIM_PROMPT, None),
    ],
)
def test_tabby_openai_completion_kinds(server: RunningServer, kind: str, prompt: str, suffix: str | None) -> None:
    """config.toml ``[model.completion.http]``: kind, model_name = "starcoder", api_endpoint = "<base>/v1"; Tabby
    posts ``{api_endpoint}/completions`` with ``suffix`` serialized even when None (null), bearer auth."""
    body = {
        "model": "starcoder",
        "prompt": prompt,
        "suffix": suffix,
        "max_tokens": 16,  # Tabby's max_decoding_tokens (64 by default; fewer here to keep the test quick)
        "temperature": 0.1,
        "stream": True,
        "presence_penalty": 0.0,
    }
    url = f"{server.base_url}/v1/completions"
    response = httpx.post(url, json=body, headers={"Authorization": "Bearer unused"}, timeout=60)
    assert isinstance(tabby_stream(response), str), kind
