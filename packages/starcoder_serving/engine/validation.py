"""The one validation stage: any protocol's ``GenerationRequest`` in, a ``ValidRequest`` (its prompts rendered and
tokenized, one ``GenerationPlan`` per sequence) out, or an ``InvalidRequest`` that names the client's own field.

Like TGI's ``validate()`` or vLLM's ``to_sampling_params()``: a route's schema owns only its shape (which fields
exist, their types and ranges, the spellings it refuses); every limit of this server and every rule that spans
fields is here, once. Everything that can be refused is refused here, before any token is generated. Messages are
written with the protocol's names (``FieldNames``), never renamed afterwards.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from starcoder_serving.engine.jobs import GenerationPlan
from starcoder_serving.engine.request import (
    TRANSFORMERS_NAMES,
    ChatPrompt,
    FieldNames,
    FimPrompt,
    GenerationRequest,
    Prompt,
    RepoContext,
    TextPrompt,
    TokenPrompt,
)
from starcoder_serving.engine.sampling_params import SamplingParams
from starcoder_serving.errors import InvalidRequest
from starcoder_serving.settings import ServingSettings
from starcoder_serving.text.completion_endings import CompletionEnding
from starcoder_serving.text.prompts import ChatRenderer, FimTokens, InstructionTemplate, RenderedPrompt
from starcoder_serving.text.repo_context import fit_repo_prompt


@dataclasses.dataclass(frozen=True)
class ValidPrompt:
    index: int  # its place among the request's prompts
    rendered: RenderedPrompt  # the model text (empty for token ids) and the stop sequences its form implies
    prompt_ids: list[int]
    echo: str  # what ``echo`` puts before each of its completions
    plans: tuple[GenerationPlan, ...]  # one per sequence (n); none when the prompt is only scored


@dataclasses.dataclass(frozen=True)
class Choice:
    """One answer of the request: the index clients see, its prompt, and its plan (None: only scored)."""

    index: int
    prompt: ValidPrompt
    plan: GenerationPlan | None


@dataclasses.dataclass(frozen=True)
class ValidRequest:
    request: GenerationRequest
    prompts: tuple[ValidPrompt, ...]

    @functools.cached_property
    def choices(self) -> tuple[Choice, ...]:
        """Each prompt's sequences in turn (OpenAI's order for several prompts with n each)."""
        n = self.request.sampling.n
        out: list[Choice] = []
        for prompt in self.prompts:
            plans: Sequence[GenerationPlan | None] = prompt.plans or [None] * n
            out.extend(Choice(len(out), prompt, plan) for plan in plans)
        return tuple(out)

    @property
    def plans(self) -> list[GenerationPlan]:
        return [choice.plan for choice in self.choices if choice.plan is not None]

    @property
    def prompt_tokens(self) -> int:
        """Each prompt counted once, however many sequences it has."""
        return sum(len(prompt.prompt_ids) for prompt in self.prompts)


# Characters per token of the context window below which a prompt is tokenized whole without counting first (code
# averages 3-4; 4 x StarCoder's 8,192 tokens is 32K characters, ~25 ms of tokenizing).
_CHARS_PER_TOKEN = 4
# math.log(sys.float_info.max): a larger exponent of e overflows a float.
_LARGEST_EXPONENT = 709.78


class RequestValidator:
    """The model's and the server's limits, and how to render and tokenize a prompt; ``validate`` applies them."""

    def __init__(
        self,
        *,
        settings: ServingSettings,
        model_name: str,
        context_window: int,
        vocab_size: int,
        logits_width: int,
        end_token_ids: frozenset[int],
        tokenize: Callable[[str], list[int]],
        decode: Callable[[list[int]], str],
        fim: FimTokens | None,
        chat: ChatRenderer,
        instructions: InstructionTemplate,
        generation_defaults: Mapping[str, Any],
    ) -> None:
        self.settings = settings
        self.model_name = model_name
        self.context_window = context_window
        self.vocab_size = vocab_size  # the ids the tokenizer knows: the valid range of a client's token id
        self.logits_width = logits_width  # the tokens the model can generate (its output rows; may exceed the above)
        self.end_token_ids = end_token_ids
        self._tokenize = tokenize
        self._decode = decode
        self._fim = fim
        self._chat = chat
        self._instructions = instructions
        # A request inherits what it does not set from the checkpoint's generation config, as generate() does.
        self._generation_defaults = dict(generation_defaults)

    def validate(self, request: GenerationRequest) -> ValidRequest:
        self._check_request(request)
        return ValidRequest(
            request, tuple(self._prompt(request, i, prompt) for i, prompt in enumerate(request.prompts))
        )

    def plan(
        self, prompt_ids: list[int], sampling: SamplingParams, names: FieldNames = TRANSFORMERS_NAMES
    ) -> list[GenerationPlan]:
        """Plans for a prompt already in tokens, every rule checked (callers inside the process: warm-up, tests)."""
        request = GenerationRequest((TokenPrompt(tuple(prompt_ids)),), sampling, names=names)
        self._check_request(request)
        self._check_prompt_length(request, prompt_ids, "prompt")
        return self._plans(request, prompt_ids, ())

    # ---- rules of the whole request ----

    def _check_request(self, request: GenerationRequest) -> None:
        sampling, output, name = request.sampling, request.output, request.names
        settings = self.settings
        if sampling.n > 1 and output.stream and not output.several_per_stream:
            raise InvalidRequest(f'`{name("n")}` > 1 cannot be streamed; send "stream": false.', param=name("n"))
        if sampling.n > 1 and output.distinct_sequences and (sampling.greedy or sampling.beam_search):
            raise InvalidRequest(
                f'`{name("n")}` > 1 needs sampling: send "{name("do_sample")}": true (and no {name("num_beams")}), '
                "otherwise every sequence would be the same.",
                param=name("n"),
            )
        if sampling.n > settings.max_num_return_sequences:
            raise InvalidRequest(f"`{name('n')}` must be <= {settings.max_num_return_sequences}.", param=name("n"))
        if sampling.n > 1 and sampling.beam_search:
            raise InvalidRequest(
                f"`{name('n')}` > 1 cannot be combined with {name('num_beams')} on this server; send one of them.",
                param=name("n"),
            )
        if sampling.num_beams > settings.max_num_beams:
            raise InvalidRequest(f"`{name('num_beams')}` must be <= {settings.max_num_beams}.", param=name("num_beams"))
        self._check_stop(sampling.stop, name("stop"))
        for field, ids in sampling.token_ids().items():
            self._check_vocabulary(ids, name(field))
        if output.score_prompt and output.stream:
            raise InvalidRequest(
                f'Prompt scoring (`{name("echo")}` with `{name("logprobs")}`) is not streamed; send "stream": false.',
                param=name("stream"),
            )
        if not output.generate and not output.score_prompt:
            raise InvalidRequest(
                f'`{name("max_new_tokens")}` 0 only scores the prompt: send it with "{name("echo")}": true and '
                f"{name('logprobs')}, or send {name('max_new_tokens')} >= 1.",
                param=name("max_new_tokens"),
            )
        if sampling.stop_at is not None and not all(isinstance(p, TextPrompt | FimPrompt) for p in request.prompts):
            raise InvalidRequest(
                f"`{name('stop_at')}` ends a completion at the cursor's line or block: send it with a text prompt or "
                "a fill-in-the-middle prefix.",
                param=name("stop_at"),
            )
        if output.echo and any(isinstance(prompt, FimPrompt) for prompt in request.prompts):
            raise InvalidRequest(
                f"`{name('echo')}` cannot be combined with `{name('suffix')}` (fill-in-the-middle).", param=name("echo")
            )

    def _check_stop(self, stop: tuple[str, ...], field: str) -> None:
        settings = self.settings
        if len(stop) > settings.max_stop_sequences:
            raise InvalidRequest(
                f"`{field}` has {len(stop)} sequences; send at most {settings.max_stop_sequences}.", param=field
            )
        for sequence in stop:
            if not sequence or len(sequence) > settings.max_stop_sequence_chars:
                raise InvalidRequest(
                    f"Each `{field}` sequence must have 1 to {settings.max_stop_sequence_chars} characters.",
                    param=field,
                )

    def _check_vocabulary(self, ids: Sequence[int], field: str) -> None:
        bad = [i for i in ids if i >= self.vocab_size]
        if bad:
            raise InvalidRequest(
                f"`{field}` names token ids {bad[:5]} outside the vocabulary (0..{self.vocab_size - 1}).", param=field
            )

    # ---- one prompt ----

    def _prompt(self, request: GenerationRequest, index: int, prompt: Prompt) -> ValidPrompt:
        rendered, echo = self._render(request, prompt)
        if isinstance(prompt, TokenPrompt):
            prompt_ids = list(prompt.ids)
        elif request.truncate_prompt is not None:  # any length: its last tokens are kept
            prompt_ids = self._tokenize(rendered.text)
        else:
            prompt_ids = self._tokenize_bounded(rendered.text, prompt.field)
        if request.truncate_prompt is not None:  # TGI keeps the last `truncate` tokens of the input
            prompt_ids = prompt_ids[-request.truncate_prompt :]
        self._check_prompt_length(request, prompt_ids, prompt.field)
        plans = (
            self._plans(request, prompt_ids, rendered.implied_stop, _cursor_line(prompt))
            if request.output.generate
            else []
        )
        return ValidPrompt(index, rendered, prompt_ids, echo, tuple(plans))

    def _tokenize_bounded(self, text: str, field: str) -> list[int]:
        """The text's tokens; a text far longer than the context window is refused having tokenized about a window's
        worth of it, not all of it (tokenizing 1 MiB takes ~0.75 s of a core, which one client could repeat).

        A text of up to ``_CHARS_PER_TOKEN`` characters per token of the window is tokenized whole. A longer one is
        counted piece by piece first, stopping once the count passes the window: cutting a text can add a token at
        each cut, never remove one, so the count is only trusted as a refusal once it passes the window by more than
        the number of cuts. A text that passes that check is tokenized whole, for the exact ids."""
        window, piece = self.context_window, self.context_window * _CHARS_PER_TOKEN
        if len(text) > piece:
            counted = 0
            for cuts, start in enumerate(range(0, len(text), piece)):
                counted += len(self._tokenize(text[start : start + piece]))
                if counted > window + cuts:
                    raise InvalidRequest(
                        f"The prompt has over {window} tokens ({len(text)} characters), more than the "
                        f"{window}-token context window; shorten it.",
                        param=field,
                    )
        return self._tokenize(text)

    def _render(self, request: GenerationRequest, prompt: Prompt) -> tuple[RenderedPrompt, str]:
        """The model text of one input form, and its echo (the prompt as the client wrote it)."""
        echo = request.output.echo
        if isinstance(prompt, TextPrompt):
            return RenderedPrompt(prompt.text), prompt.text if echo else ""
        if isinstance(prompt, TokenPrompt):
            self._check_vocabulary(prompt.ids, prompt.field)
            return RenderedPrompt(""), self._decode(list(prompt.ids)) if echo else ""
        if isinstance(prompt, FimPrompt):
            if self._fim is None:
                raise InvalidRequest(
                    f"`{prompt.field}`: this model ({self.model_name}) has no fill-in-the-middle tokens; send a plain "
                    "prompt.",
                    param=prompt.field,
                )
            if not isinstance(prompt.prefix, str):
                raise InvalidRequest(
                    f"`{prompt.field}` (fill-in-the-middle) needs a text `{request.names('prompt')}`, not token ids.",
                    param=prompt.field,
                )
            if prompt.context is not None:
                return self._render_repo(request, self._fim, prompt.context, prompt.prefix, prompt.suffix), ""
            return self._fim.render(prompt.prefix, prompt.suffix), ""
        if isinstance(prompt, ChatPrompt):
            if prompt.messages[-1][0] == "assistant":
                raise InvalidRequest(
                    f"`{prompt.field}` must end with a user (or system) message: the model answers as the assistant.",
                    param=prompt.field,
                )
            return self._chat.render([{"role": role, "content": text} for role, text in prompt.messages]), ""
        return self._instructions.render(prompt.instruction, prompt.input), ""

    def _render_repo(
        self, request: GenerationRequest, fim: FimTokens, context: RepoContext, prefix: str, suffix: str
    ) -> RenderedPrompt:
        """A FIM prompt inside its repository, fitted to leave room for the tokens to generate (the requested
        ``max_new_tokens``, else the default, at most half the window)."""
        if fim.repo is None:
            raise InvalidRequest(
                f"`{context.field}`: this model ({self.model_name}) has no repository tokens; send the prefix and "
                "suffix alone.",
                param=context.field,
            )
        window, sampling = self.context_window, request.sampling
        reserve = sampling.max_new_tokens or min(self.settings.default_max_new_tokens, window // 2)
        return fit_repo_prompt(
            fim,
            fim.repo,
            repo_name=context.repo_name,
            path=context.path,
            files=[(file.path, file.content) for file in context.files],
            prefix=prefix,
            suffix=suffix,
            limit=max(1, window - reserve),
            budget=self.settings.context_token_budget,
            tokenize=self._tokenize,
            decode=self._decode,
        )

    def _check_prompt_length(self, request: GenerationRequest, prompt_ids: list[int], field: str) -> None:
        tokens, window = len(prompt_ids), self.context_window
        if tokens == 0:
            raise InvalidRequest("The prompt encodes to no tokens; send some text.", param=field)
        if not request.output.generate:
            if tokens > window:
                raise InvalidRequest(f"The prompt has {tokens} tokens; at most {window} can be scored.", param=field)
        elif tokens >= window:
            raise InvalidRequest(
                f"The prompt has {tokens} tokens, which fills the {window}-token context window; shorten it so "
                "there is room to generate.",
                param=field,
            )

    def _plans(
        self, request: GenerationRequest, prompt_ids: list[int], implied_stop: tuple[str, ...], cursor_line: str = ""
    ) -> list[GenerationPlan]:
        """n plans for one prompt: lengths resolved against it, the checkpoint's defaults filled in, and each
        sequence its own seed (seed, seed + 1, ...)."""
        sampling, name = request.sampling, request.names
        max_new_tokens, min_new_tokens = self._lengths(sampling, len(prompt_ids), name)
        self._check_overflows(sampling, max_new_tokens, name)
        self._check_something_left(sampling, min_new_tokens, name)
        try:
            sampling.model_copy(update={"max_new_tokens": max_new_tokens}).check_with_transformers()
        except ValueError as exc:
            message = str(exc).split("\nIf you're using a pretrained model")[0].strip()
            raise InvalidRequest(f"Invalid generation parameters: {message}") from None
        resolved = sampling.with_model_defaults(self._generation_defaults).with_lengths(max_new_tokens, min_new_tokens)
        if implied_stop:
            resolved = resolved.model_copy(update={"stop": (*sampling.stop, *implied_stop)})
        if sampling.stop_at is not None:
            resolved = resolved.model_copy(update={"stop_at": CompletionEnding(sampling.stop_at.mode, cursor_line)})
        return [GenerationPlan(list(prompt_ids), resolved.for_sequence(i)) for i in range(sampling.n)]

    @staticmethod
    def _check_overflows(sampling: SamplingParams, max_new_tokens: int, name: FieldNames) -> None:
        """Beam search scores a beam by length ** length_penalty in a Python float, which raises OverflowError past
        float range: refused here instead of failing mid-search (the batch never uses length_penalty)."""
        penalty = sampling.length_penalty
        if sampling.beam_search and penalty is not None and penalty * math.log(max_new_tokens + 1) >= _LARGEST_EXPONENT:
            field = name("length_penalty")
            raise InvalidRequest(
                f"`{field}` {penalty:g}: a beam's length ** {penalty:g} overflows; send a smaller {field}.", param=field
            )

    def _check_something_left(self, sampling: SamplingParams, min_new_tokens: int, name: FieldNames) -> None:
        """Bans that leave the model no token at all, from the first step on: refused before anything runs (the
        batch would fail the request mid-stream, and beam search would answer an empty text)."""
        banned = {*sampling.suppress_tokens, *(word[0] for word in sampling.bad_words_ids if len(word) == 1)}
        first_step = banned | set(sampling.begin_suppress_tokens)
        if min_new_tokens > 0:
            first_step |= self.end_token_ids
        if len(first_step) < self.logits_width:  # ids are below vocab_size, so a ban of every row has this many
            return
        sent = [
            field for field in ("suppress_tokens", "bad_words_ids", "begin_suppress_tokens") if getattr(sampling, field)
        ]
        fields = ", ".join(f"`{name(field)}`" for field in sent)
        until = f" before {name('min_new_tokens')} new tokens" if min_new_tokens else ""
        raise InvalidRequest(
            f"{fields} leave no token the model may generate{until}; ban fewer tokens.",
            param=name(sent[0]),
        )

    def _lengths(self, sampling: SamplingParams, prompt_tokens: int, name: FieldNames) -> tuple[int, int]:
        """New-token bounds (most, least) for this prompt. ``max_length`` / ``min_length`` count the prompt, as in
        transformers, and ``max_new_tokens`` wins over ``max_length``."""
        settings, window = self.settings, self.context_window
        room = window - prompt_tokens
        max_new_tokens, most = sampling.max_new_tokens, name("max_new_tokens")
        if max_new_tokens is None and sampling.max_length is not None:
            max_new_tokens, most = sampling.max_length - prompt_tokens, name("max_length")
            if max_new_tokens <= 0:
                raise InvalidRequest(
                    f"`{most}` ({sampling.max_length}) counts the prompt, which already has {prompt_tokens} tokens; "
                    f"send a larger {most} or use {name('max_new_tokens')}.",
                    param=most,
                )
        if max_new_tokens is None:
            max_new_tokens = min(settings.default_max_new_tokens, room)
        cap = settings.max_new_tokens_cap
        if max_new_tokens > cap:
            raise InvalidRequest(
                f"`{most}` asks for {max_new_tokens} new tokens, above this server's cap of {cap}; send at most "
                f"{cap} new tokens.",
                param=most,
            )
        if prompt_tokens + max_new_tokens > window:
            largest = room if most == name("max_new_tokens") else window
            raise InvalidRequest(
                f"The prompt has {prompt_tokens} tokens and {max_new_tokens} new tokens were requested: "
                f"{prompt_tokens + max_new_tokens} > the {window}-token context window. Send {most} <= {largest} "
                "or a shorter prompt.",
                param=most,
            )
        min_new_tokens, least = sampling.min_new_tokens, name("min_new_tokens")
        if sampling.min_length is not None and "min_new_tokens" not in sampling.model_fields_set:
            min_new_tokens, least = max(0, sampling.min_length - prompt_tokens), name("min_length")
        if min_new_tokens > max_new_tokens:
            counted = f" ({prompt_tokens} prompt tokens + {min_new_tokens} new)" if least == name("min_length") else ""
            raise InvalidRequest(
                f"`{least}` asks for at least {min_new_tokens} new tokens{counted}, more than the {max_new_tokens} "
                f"allowed by {most}; lower it or raise {most}.",
                param=least,
            )
        return max_new_tokens, min_new_tokens


def _cursor_line(prompt: Prompt) -> str:
    """The text of the line the cursor is on: the prompt's (or prefix's) last line (``stop_at``)."""
    text = prompt.text if isinstance(prompt, TextPrompt) else prompt.prefix if isinstance(prompt, FimPrompt) else ""
    return text.rsplit("\n", 1)[-1] if isinstance(text, str) else ""
