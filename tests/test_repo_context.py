"""Completions that know the repository: each family's own format, built from its vocabulary's tokens, and the
context fitted into the window (farthest files dropped first, the text nearest the cursor kept)."""

from __future__ import annotations

import copy
from typing import Any

import httpx
import pytest
from starcoder_serving.api.predict_route import PredictProtocol
from starcoder_serving.engine.engine import Engine
from starcoder_serving.engine.validation import ValidPrompt
from starcoder_serving.errors import InvalidRequest

from tests.conftest import RunningServer

PARSE = PredictProtocol().parse

BODY: dict[str, Any] = {
    "prefix": "def f(x):\n    ",
    "suffix": "\n    return y\n",
    "repo_name": "octo/proj",
    "path": "src/a.py",
    "files": [
        {"path": "src/util.py", "content": "def g(x):\n    return x\n"},
        {"path": "src/b.py", "content": "from util import g\n"},
    ],
    "max_new_tokens": 4,
}

# StarCoder2 paper (arXiv:2402.19173), section 5: a repository's files joined by <file_sep>, FIM inside one of them
# with the file's path at the start of its prefix.
STARCODER2_PROMPT = (
    "<repo_name>octo/proj"
    "<file_sep>src/util.py\ndef g(x):\n    return x\n"
    "<file_sep>src/b.py\nfrom util import g\n"
    "<file_sep><fim_prefix>src/a.py\ndef f(x):\n    <fim_suffix>\n    return y\n<fim_middle>"
)
# StarCoder: one document per file, its metadata first (<reponame>, <filename>), ended by <|endoftext|>; the file
# being completed carries its metadata inside the FIM prefix.
STARCODER_PROMPT = (
    "<reponame>octo/proj<filename>src/util.py\ndef g(x):\n    return x\n<|endoftext|>"
    "<reponame>octo/proj<filename>src/b.py\nfrom util import g\n<|endoftext|>"
    "<fim_prefix><reponame>octo/proj<filename>src/a.py\ndef f(x):\n    <fim_suffix>\n    return y\n<fim_middle>"
)


def predict(server: RunningServer, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(server.predict_url, json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["data"]  # type: ignore[no-any-return]


def test_starcoder2_writes_the_repository_level_sequence(starcoder2_server: RunningServer) -> None:
    data = predict(starcoder2_server, BODY)
    assert data["prompt"] == STARCODER2_PROMPT
    assert data["context"] == {
        "files_used": ["src/util.py", "src/b.py"],
        "files_dropped": [],
        "context_tokens": data["context"]["context_tokens"],
        "prefix_tokens_dropped": 0,
        "suffix_tokens_dropped": 0,
        "prompt_tokens": data["prompt_tokens"],
    }
    assert data["context"]["context_tokens"] > 0


def test_starcoder_writes_its_file_metadata(server: RunningServer) -> None:
    data = predict(server, BODY)
    assert data["prompt"] == STARCODER_PROMPT
    assert data["context"]["files_used"] == ["src/util.py", "src/b.py"]
    # Without a repository name or other files, only the file's own path.
    alone = predict(server, {"prefix": "x = ", "suffix": "\n", "path": "a.py", "max_new_tokens": 1})
    assert alone["prompt"] == "<fim_prefix><filename>a.py\nx = <fim_suffix>\n<fim_middle>"


def test_completions_take_the_same_context_and_report_it_in_usage(
    server: RunningServer, starcoder2_server: RunningServer
) -> None:
    body = {key: value for key, value in BODY.items() if key not in ("prefix", "max_new_tokens")}
    body.update(model="tiny", prompt=BODY["prefix"], max_tokens=4, temperature=0)
    answer = httpx.post(f"{starcoder2_server.base_url}/v1/completions", json=body, timeout=60).json()
    (context,) = answer["usage"]["context"]
    assert context["files_used"] == ["src/util.py", "src/b.py"] and context["files_dropped"] == []
    assert context["prompt_tokens"] == answer["usage"]["prompt_tokens"]
    # Plain completions carry no such report.
    plain = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=60).json()
    assert "context" not in plain["usage"]


def validate(engine: Engine, body: dict[str, Any], **settings: Any) -> ValidPrompt:
    validator = engine.validator
    if settings:
        validator = copy.copy(validator)
        validator.settings = validator.settings.model_copy(update=settings)
    return validator.validate(PARSE(body).to_request()).prompts[0]


def twenty_thousand_tokens_of_files(engine: Engine) -> list[dict[str, str]]:
    files = [
        {
            "path": f"pkg/mod{i:02}.py",
            "content": "".join(f"def f{i}_{j}(a, b):\n    return a * {j} + b\n" for j in range(60)),
        }
        for i in range(16)
    ]
    total = sum(len(engine.tokenize(file["content"])) for file in files)
    assert 18_000 < total < 30_000, total
    return files


def test_twenty_thousand_tokens_of_context_fit_an_8k_window(engine: Engine) -> None:
    assert engine.context_window == 8192
    files = twenty_thousand_tokens_of_files(engine)
    paths = [file["path"] for file in files]
    body = {**BODY, "files": files, "max_new_tokens": 64}

    # The default budget (4,096 tokens): the nearest files (the last sent) that fit it, the farther ones dropped.
    prompt = validate(engine, body)
    report = prompt.rendered.context
    assert report is not None
    kept = len(report.files_used)
    assert 0 < kept < len(files)
    assert list(report.files_dropped) == paths[: len(files) - kept]
    assert list(report.files_used) == paths[len(files) - kept :]
    assert report.context_tokens <= engine.settings.context_token_budget
    assert prompt.rendered.text.endswith(STARCODER_PROMPT.split("<|endoftext|>")[-1])  # the current file, whole
    assert prompt.rendered.text.startswith(f"<reponame>octo/proj<filename>{report.files_used[0]}\n")

    # A budget above the window: the files fill what the file being completed and the generation leave.
    roomy = validate(engine, body, context_token_budget=100_000)
    assert roomy.rendered.context is not None
    assert len(roomy.rendered.context.files_used) > kept
    # Whole files: what is left unused is less than one more file.
    largest = max(len(engine.tokenize(file["content"])) for file in files) + 16
    assert 8192 - 64 - largest < len(roomy.prompt_ids) <= 8192 - 64

    # A budget of 0: no other file.
    assert validate(engine, body, context_token_budget=0).rendered.context.files_used == ()  # type: ignore[union-attr]


def test_a_file_too_long_for_the_window_keeps_the_text_nearest_the_cursor(engine: Engine) -> None:
    prefix = "".join(f"line_{i} = {i}\n" for i in range(2000)) + "def f(x):\n    "
    suffix = "\n    return y\n" + "".join(f"tail_{i} = {i}\n" for i in range(2000))
    prompt = validate(engine, {**BODY, "prefix": prefix, "suffix": suffix})
    report = prompt.rendered.context
    assert report is not None and report.files_used == () and report.files_dropped == ("src/util.py", "src/b.py")
    assert report.prefix_tokens_dropped > 0 and report.suffix_tokens_dropped > 0
    assert 8192 - 64 < len(prompt.prompt_ids) <= 8192 - BODY["max_new_tokens"]  # room left for what it asked
    text = prompt.rendered.text
    kept_prefix = text.split("<fim_suffix>")[0]
    kept_suffix = text.split("<fim_suffix>")[1].removesuffix("<fim_middle>")
    assert kept_prefix.endswith("line_1999 = 1999\ndef f(x):\n    ") and "line_0 = 0\n" not in kept_prefix
    assert kept_suffix.startswith("\n    return y\ntail_0 = 0\n") and "tail_1999" not in kept_suffix


def test_context_goes_with_a_prefix() -> None:
    with pytest.raises(InvalidRequest, match='go with "prefix"'):
        PARSE({"prompt": "x", "files": [{"path": "a.py", "content": ""}]})
    with pytest.raises(InvalidRequest, match="files"):
        PARSE({"prefix": "x", "files": [{"path": "", "content": "y"}]})
