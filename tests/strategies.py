"""Hypothesis strategies for request bodies a careless or hostile client could send."""

from __future__ import annotations

from hypothesis import strategies as st

# Any JSON value (NaN and infinities included: Python's json reads and writes them).
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=16),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)

# Names the predict route knows, a Python-only one and an unknown one.
predict_fields = st.sampled_from(
    [
        "prompt",
        "prefix",
        "suffix",
        "messages",
        "instruction",
        "input",
        "stream",
        "stop",
        "seed",
        "max_new_tokens",
        "min_length",
        "temperature",
        "top_p",
        "top_k",
        "num_beams",
        "do_sample",
        "bad_words_ids",
        "suppress_tokens",
        "num_return_sequences",
        "streamer",
        "unknown",
    ]
)
