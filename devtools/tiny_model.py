"""Build tiny checkpoints of the family's two architectures locally: no download, deterministic, seconds.

* ``starcoder``: bigcode/starcoder's architecture (``gpt_bigcode``, multi-query attention, learned absolute
  positions over an 8192-token window).
* ``starcoder2``: StarCoder2's (``starcoder2``: grouped-query attention, RoPE, 16,384 positions, a sliding
  window; the window is scaled down with everything else, to 512 tokens, so short test prompts cross it).

Each has a byte-level BPE tokenizer whose special tokens sit at the real model's ids, so every code path
(FIM, the end tokens, context-window checks, the sliding-window cache) runs exactly as on the real model.
The weights are random, so the text is gibberish, but it is the same gibberish on every machine.

    python -m devtools.tiny_model .cache/tiny-starcoder
    python -m devtools.tiny_model --architecture starcoder2 .cache/tiny-starcoder2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

# StarCoder's special tokens, in id order (tokenizer_config.json of bigcode/starcoder).
STARCODER_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<fim_prefix>",
    "<fim_middle>",
    "<fim_suffix>",
    "<fim_pad>",
    "<filename>",
    "<gh_stars>",
    "<issue_start>",
    "<issue_comment>",
    "<issue_closed>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<empty_output>",
    "<commit_before>",
    "<commit_msg>",
    "<commit_after>",
    "<reponame>",
)
# StarCoder2's special tokens, in id order (tokenizer_config.json of bigcode/starcoder2-*).
STARCODER2_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<fim_prefix>",
    "<fim_middle>",
    "<fim_suffix>",
    "<fim_pad>",
    "<repo_name>",
    "<file_sep>",
    "<issue_start>",
    "<issue_comment>",
    "<issue_closed>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<jupyter_script>",
    "<empty_output>",
    "<code_to_intermediate>",
    "<intermediate_to_code>",
    "<pr>",
    "<pr_status>",
    "<pr_is_merged>",
    "<pr_base>",
    "<pr_file>",
    "<pr_base_code>",
    "<pr_diff>",
    "<pr_diff_hunk>",
    "<pr_comment>",
    "<pr_event_id>",
    "<pr_review>",
    "<pr_review_state>",
    "<pr_review_comment>",
    "<pr_in_reply_to_review_id>",
    "<pr_in_reply_to_comment_id>",
    "<pr_diff_hunk_comment_line>",
    "<NAME>",
    "<EMAIL>",
    "<KEY>",
    "<PASSWORD>",
)
EOS_TOKEN = "<|endoftext|>"
# Bump when a recipe changes so cached builds are rebuilt.
RECIPE_VERSION = "4"
STARCODER2_RECIPE_VERSION = "1"
VOCAB_SIZE = 1024
N_POSITIONS = 8192
STARCODER2_POSITIONS = 16384
STARCODER2_SLIDING_WINDOW = 512

# A small, fixed corpus of code-like text: the BPE merges are learnt from it, so it must never be
# generated from anything that changes between machines or versions.
_CORPUS_SNIPPETS: tuple[str, ...] = (
    "def compute_fib(n):\n    if n < 2:\n        return n\n    return compute_fib(n - 1) + compute_fib(n - 2)\n",
    "import os\nimport sys\nfrom typing import List, Dict, Optional\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        self.items.append(item)\n",
    "for i in range(10):\n    print(i * i)\n",
    "while True:\n    line = input()\n    if not line:\n        break\n",
    "function add(a, b) {\n  return a + b;\n}\nconsole.log(add(1, 2));\n",
    '#include <stdio.h>\nint main(void) {\n    printf("hello, world\\n");\n    return 0;\n}\n',
    "SELECT name, COUNT(*) FROM users GROUP BY name ORDER BY 2 DESC;\n",
    'fn main() {\n    let v: Vec<i32> = (0..10).collect();\n    println!("{:?}", v);\n}\n',
    'public static void main(String[] args) {\n    System.out.println("Hello");\n}\n',
    "# Python function that finds primes:\ndef is_prime(n):\n    return n > 1 and all(n % d for d in range(2, n))\n",
    "Below is an instruction that describes a task. Write a response that completes the request.\n",
    "Human: How do I reverse a list in Python?\n\nAssistant: Use slicing: `items[::-1]`.\n",
    "try:\n    value = int(text)\nexcept ValueError as error:\n    raise SystemExit(str(error))\n",
    "x = {\"key\": [1, 2, 3], 'other': (4.5, None, True, False)}\n",
    "héllo wörld — ünïcödé ✓ 日本語 🙂\n",
)


def _train_tokenizer(
    directory: Path,
    special_tokens: tuple[str, ...],
    max_length: int,
    corpus: Iterable[str] | None = None,
    vocab_size: int = VOCAB_SIZE,
) -> None:
    """A byte-level BPE tokenizer with ``special_tokens`` first (the real model's ids), its merges learnt from
    ``corpus`` (default: the fixed snippets above), saved into ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),  # given first, so they get the real model's ids
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(_CORPUS_SNIPPETS) * 4 if corpus is None else corpus, trainer=trainer)
    for token_id, token in enumerate(special_tokens):
        assert tokenizer.token_to_id(token) == token_id, f"{token} is not at the real model's id {token_id}"

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        additional_special_tokens=list(special_tokens[1:]),
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(directory)


def _build_model(directory: Path, vocab_size: int) -> None:
    import torch
    from transformers import GenerationConfig, GPTBigCodeConfig, GPTBigCodeForCausalLM

    config = GPTBigCodeConfig(
        vocab_size=vocab_size,
        n_positions=N_POSITIONS,
        n_embd=64,
        n_layer=2,
        n_head=4,
        multi_query=True,  # StarCoder's multi-query attention: one shared key/value head
        tie_word_embeddings=False,  # tied random embeddings just echo the last token forever
        bos_token_id=0,
        eos_token_id=0,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    model = GPTBigCodeForCausalLM(config).eval()
    with torch.no_grad():
        # Random weights almost never pick <|endoftext|>; lengthen its output row so that some greedy
        # completions end on EOS after a few dozen tokens (the seed prompt after 52) and others run
        # to the length limit, as real ones do.
        model.lm_head.weight[0] *= 1.5
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model.save_pretrained(directory, safe_serialization=True)


def _build_starcoder2_model(directory: Path, vocab_size: int) -> None:
    import torch
    from transformers import GenerationConfig, Starcoder2Config, Starcoder2ForCausalLM

    config = Starcoder2Config(
        vocab_size=vocab_size,
        max_position_embeddings=STARCODER2_POSITIONS,
        sliding_window=STARCODER2_SLIDING_WINDOW,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention: two query heads share each key/value head
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    model = Starcoder2ForCausalLM(config).eval()
    file_sep = STARCODER2_SPECIAL_TOKENS.index("<file_sep>")
    with torch.no_grad():
        # As StarCoder2 does, some completions end a file with <file_sep> (which its config does not list
        # as an end token) and others run to the length limit.
        model.lm_head.weight[file_sep] *= 2.0
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model.save_pretrained(directory, safe_serialization=True)


def _build(directory: str | os.PathLike[str], version: str, architecture: str) -> Path:
    """Build the checkpoint into ``directory`` unless an up-to-date build is already there."""
    target = Path(directory)
    stamp = target / "tiny_model_recipe.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("version") == version:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a crash never leaves a half-written checkpoint.
    staging = Path(tempfile.mkdtemp(prefix=f".tiny-{architecture}-", dir=target.parent))
    try:
        from transformers import AutoTokenizer

        if architecture == "starcoder2":
            _train_tokenizer(staging, STARCODER2_SPECIAL_TOKENS, STARCODER2_POSITIONS)
            _build_starcoder2_model(staging, vocab_size=len(AutoTokenizer.from_pretrained(staging)))
        else:
            _train_tokenizer(staging, STARCODER_SPECIAL_TOKENS, N_POSITIONS)
            _build_model(staging, vocab_size=len(AutoTokenizer.from_pretrained(staging)))
        (staging / "tiny_model_recipe.json").write_text(json.dumps({"version": version}))
        shutil.rmtree(target, ignore_errors=True)
        staging.chmod(0o755)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("built tiny %s-architecture model in %s", architecture, target)
    return target


def build_tiny_model(directory: str | os.PathLike[str]) -> Path:
    """The tiny StarCoder (gpt_bigcode) checkpoint."""
    return _build(directory, RECIPE_VERSION, "starcoder")


def build_tiny_starcoder2(directory: str | os.PathLike[str]) -> Path:
    """The tiny StarCoder2 (starcoder2) checkpoint."""
    return _build(directory, f"starcoder2-{STARCODER2_RECIPE_VERSION}", "starcoder2")


BUILDERS = {"starcoder": build_tiny_model, "starcoder2": build_tiny_starcoder2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", help="where to write the checkpoint")
    parser.add_argument("--architecture", choices=sorted(BUILDERS), default="starcoder")
    args = parser.parse_args()
    print(BUILDERS[args.architecture](args.directory))


if __name__ == "__main__":
    main()
