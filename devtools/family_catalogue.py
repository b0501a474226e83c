"""The StarCoder family as this package deploys it: the one source the variant files are generated from.

Each entry copies the architecture fields of the checkpoint's published ``config.json`` (so the variant files
can be sized here, with no download) and the facts its model card states: whether the repository is gated,
and its HumanEval pass@1. At load time the server reads the real ``config.json`` (family/profile.py) and logs
the shape it found, so a catalogue entry that drifted from its checkpoint shows in the first log lines.

    python -m devtools.variants          # rewrite config.yaml and variants/*.yaml from this catalogue
"""

from __future__ import annotations

from typing import Any

import pydantic

# gpt_bigcode (StarCoder, StarCoderBase): multi-query attention, learned positions over 8192 tokens.
_STARCODER_COMMON: dict[str, Any] = {
    "model_type": "gpt_bigcode",
    "vocab_size": 49152,
    "n_positions": 8192,
    "multi_query": True,
}
# starcoder2: grouped-query attention, RoPE, 16,384-token context with a 4,096-token sliding window.
_STARCODER2_COMMON: dict[str, Any] = {
    "model_type": "starcoder2",
    "vocab_size": 49152,
    "max_position_embeddings": 16384,
    "sliding_window": 4096,
    "bos_token_id": 0,
    "eos_token_id": 0,
}


class KnownCheckpoint(pydantic.BaseModel):
    """One deployable member of the family."""

    model_config = pydantic.ConfigDict(frozen=True)

    name: str  # the variant's file name: variants/<name>.yaml
    hub_id: str
    model_name: str  # what Baseten shows
    summary: str
    # The architecture fields of its config.json.
    config: dict[str, Any]
    # True: the repository asks to accept the BigCode OpenRAIL-M agreement before downloading.
    gated: bool
    # pass@1 on HumanEval as its model card reports it (None: the card reports none).
    humaneval_pass_at_1: float | None
    # Weight files to fetch at build time.
    weight_patterns: tuple[str, ...] = ("*.safetensors",)
    example_input: dict[str, Any] = pydantic.Field(default_factory=lambda: {"prompt": "def compute_fib(n):"})
    # model_metadata entries that differ from the defaults (templates of an instruction-tuned model).
    metadata: dict[str, Any] = pydantic.Field(default_factory=dict)


CATALOGUE: tuple[KnownCheckpoint, ...] = (
    KnownCheckpoint(
        name="starcoder",
        hub_id="bigcode/starcoder",
        model_name="StarCoder",
        summary="StarCoder (15.5B): StarCoderBase further trained on 35B Python tokens.",
        config={**_STARCODER_COMMON, "n_layer": 40, "n_embd": 6144, "n_head": 48},
        gated=True,
        humaneval_pass_at_1=0.336,
    ),
    KnownCheckpoint(
        name="starcoderbase-1b",
        hub_id="bigcode/starcoderbase-1b",
        model_name="StarCoderBase-1B",
        summary="StarCoderBase-1B: the 1B model of the StarCoderBase family (80+ languages).",
        config={**_STARCODER_COMMON, "n_layer": 24, "n_embd": 2048, "n_head": 16},
        gated=True,
        humaneval_pass_at_1=0.1517,
    ),
    KnownCheckpoint(
        name="starcoderbase-3b",
        hub_id="bigcode/starcoderbase-3b",
        model_name="StarCoderBase-3B",
        summary="StarCoderBase-3B: the 3B model of the StarCoderBase family (80+ languages).",
        config={**_STARCODER_COMMON, "n_layer": 36, "n_embd": 2816, "n_head": 22},
        gated=True,
        humaneval_pass_at_1=0.2146,
    ),
    KnownCheckpoint(
        name="starcoderbase-7b",
        hub_id="bigcode/starcoderbase-7b",
        model_name="StarCoderBase-7B",
        summary="StarCoderBase-7B: the 7B model of the StarCoderBase family (80+ languages).",
        config={**_STARCODER_COMMON, "n_layer": 42, "n_embd": 4096, "n_head": 32},
        gated=True,
        humaneval_pass_at_1=0.2837,
    ),
    KnownCheckpoint(
        name="starcoder2-3b",
        hub_id="bigcode/starcoder2-3b",
        model_name="StarCoder2-3B",
        summary="StarCoder2-3B: trained on 17 languages of The Stack v2 (3+ trillion tokens).",
        config={
            **_STARCODER2_COMMON,
            "num_hidden_layers": 30,
            "hidden_size": 3072,
            "intermediate_size": 12288,
            "num_attention_heads": 24,
            "num_key_value_heads": 2,
        },
        gated=False,
        humaneval_pass_at_1=0.317,
    ),
    KnownCheckpoint(
        name="starcoder2-7b",
        hub_id="bigcode/starcoder2-7b",
        model_name="StarCoder2-7B",
        summary="StarCoder2-7B: trained on 17 languages of The Stack v2 (3.5+ trillion tokens).",
        config={
            **_STARCODER2_COMMON,
            "num_hidden_layers": 32,
            "hidden_size": 4608,
            "intermediate_size": 18432,
            "num_attention_heads": 36,
            "num_key_value_heads": 4,
        },
        gated=False,
        humaneval_pass_at_1=0.354,
    ),
    KnownCheckpoint(
        name="starcoder2-15b",
        hub_id="bigcode/starcoder2-15b",
        model_name="StarCoder2-15B",
        summary="StarCoder2-15B: trained on 600+ languages of The Stack v2 (4+ trillion tokens).",
        config={
            **_STARCODER2_COMMON,
            "num_hidden_layers": 40,
            "hidden_size": 6144,
            "intermediate_size": 24576,
            "num_attention_heads": 48,
            "num_key_value_heads": 4,
            "tie_word_embeddings": False,  # the 3B and 7B tie them; the 15B has its own output matrix
        },
        gated=False,
        humaneval_pass_at_1=0.463,
    ),
    KnownCheckpoint(
        name="starcoder-gpteacher",
        hub_id="GeorgiaTechResearchInstitute/starcoder-gpteacher-code-instruct",
        model_name="StarCoder-GPTeacher",
        summary="StarCoder (15.5B) fine-tuned on GPTeacher-Codegen instructions; Alpaca prompts.",
        config={**_STARCODER_COMMON, "n_layer": 40, "n_embd": 6144, "n_head": 48},
        gated=False,
        humaneval_pass_at_1=None,
        # Whichever format the repository ships its weights in.
        weight_patterns=("*.safetensors", "*.bin"),
        example_input={"instruction": "Write a function that computes the square root."},
        metadata={
            "instruction_template_file": "instruction_template.json",
            # Chat requests become Alpaca turns too, since that is all this fine-tune has seen.
            "chat_template_file": "alpaca_chat_template.jinja",
            "chat_stop": ["\n### Instruction:"],
        },
    ),
)

DEFAULT_VARIANT = "starcoder"


def by_name(name: str) -> KnownCheckpoint:
    for checkpoint in CATALOGUE:
        if checkpoint.name == name:
            return checkpoint
    raise KeyError(f"no variant {name!r}; known: {', '.join(c.name for c in CATALOGUE)}")


def by_hub_id(hub_id: str) -> KnownCheckpoint | None:
    for checkpoint in CATALOGUE:
        if checkpoint.hub_id == hub_id:
            return checkpoint
    return None
