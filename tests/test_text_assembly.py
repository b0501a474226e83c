"""Incremental detokenization and stop sequences: streamed pieces must add up to the whole."""

from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from starcoder_serving.text.detokenizer import IncrementalDetokenizer, plain_decoder
from starcoder_serving.text.stop_sequences import StopSequenceMatcher
from transformers import AutoTokenizer


def test_stop_sequence_is_cut_and_never_emitted() -> None:
    matcher = StopSequenceMatcher(["\nclass"])
    pieces = [matcher.feed(t) for t in ["def f():\n    return 1\n", "\ncl", "ass B:"]]
    assert "".join(p.emit for p in pieces) == "def f():\n    return 1\n"
    assert [p.stopped for p in pieces] == [False, False, True]


def test_the_first_completed_stop_sequence_wins() -> None:
    assert StopSequenceMatcher(["a", "EaE"]).feed("EaE").emit == "E"


def test_partial_match_that_does_not_complete_is_released() -> None:
    matcher = StopSequenceMatcher(["END"])
    first, second = matcher.feed("abcEN"), matcher.feed("x")
    assert (first.emit, second.emit, second.stopped) == ("abc", "ENx", False)


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="abcE N\n", max_size=60),
    stops=st.lists(st.text(alphabet="abcE N\n", min_size=1, max_size=4), max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=10),
)
def test_any_split_of_the_text_gives_the_same_result(text: str, stops: list[str], cuts: list[int]) -> None:
    # Reference: scan the whole text; the stop sequence that ends first wins (ties: the longer one).
    ends = [(i + len(s), i) for s in stops if (i := text.find(s)) >= 0]
    expected_cut = min(ends)[1] if ends else -1
    expected = text if expected_cut < 0 else text[:expected_cut]
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    matcher = StopSequenceMatcher(stops)
    out, stopped = [], False
    for start, end in itertools.pairwise(bounds):
        scan = matcher.feed(text[start:end])
        out.append(scan.emit)
        if scan.stopped:
            stopped = True
            break
    if not stopped:
        out.append(matcher.flush())
    assert "".join(out) == expected
    assert stopped == (expected_cut >= 0)


def test_multibyte_characters_are_never_split(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "naïve café — 日本語 🙂🙂 ok"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.encode("utf-8")) // 4  # many characters span several byte-level tokens
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.push(i) for i in ids] + [detokenizer.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in piece for piece in pieces)


@settings(max_examples=100, deadline=None)
@given(ids=st.lists(st.integers(min_value=0, max_value=600), max_size=40))
def test_pieces_concatenate_to_the_plain_decode(tiny_model_dir: Path, ids: list[int]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.push(i) for i in ids] + [detokenizer.flush()]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)


@settings(max_examples=50, deadline=None)
@given(ids=st.lists(st.integers(min_value=0, max_value=600), max_size=40))
def test_the_direct_decoder_is_the_tokenizers_decode(
    tiny_model_dir: Path, tiny_starcoder2_dir: Path, ids: list[int]
) -> None:
    """The detokenizer calls the Rust backend directly where transformers does no clean-up of spaces (both tiny
    vocabularies are BPE, as StarCoder's are): the text must be exactly transformers' decode."""
    for directory in (tiny_model_dir, tiny_starcoder2_dir):
        tokenizer = _tokenizer(directory)
        assert plain_decoder(tokenizer)(ids) == tokenizer.decode(ids, skip_special_tokens=True)


@functools.cache
def _tokenizer(directory: Path) -> Any:
    return AutoTokenizer.from_pretrained(directory)


def test_a_tokenizer_that_cleans_up_spaces_keeps_transformers_decode(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert plain_decoder(tokenizer).func == tokenizer.backend_tokenizer.decode  # type: ignore[attr-defined]
    tokenizer.clean_up_tokenization_spaces = True
    tokenizer.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True
    assert plain_decoder(tokenizer).func == tokenizer.decode  # type: ignore[attr-defined]


def test_many_tokens_at_once_give_the_text_of_one_at_a_time(tiny_model_dir: Path) -> None:
    """A quiet request's tokens arrive in one event: the same text as pushed one by one, split characters too."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer("naïve café — 日本語 🙂 ok\n    return x", add_special_tokens=False)["input_ids"]
    one_by_one = IncrementalDetokenizer(tokenizer)
    expected = "".join([one_by_one.push(i) for i in ids] + [one_by_one.flush()])
    for split in (1, 3, len(ids) - 1):
        at_once = IncrementalDetokenizer(tokenizer)
        assert at_once.push_many(ids[:split]) + at_once.push_many(ids[split:]) + at_once.flush() == expected
