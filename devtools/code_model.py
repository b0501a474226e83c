"""The tiny code model that `make serve` serves by default: StarCoder's architecture, trained on real code.

devtools/tiny_model.py's checkpoints have random weights: their text is gibberish, so they cannot show whether
n-gram / prompt-lookup drafting is ever accepted. This one is trained, on one CPU thread, on the Python standard
library's own sources, which ship with every Python, so nothing is downloaded:

* Corpus: every ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` in sorted path order, leaving out the test
  suites (``test/``, ``tests/``), ``idlelib/``, ``site-packages/`` and the two data-table packages ``encodings/``
  and ``pydoc_data/``, up to MAX_CORPUS_BYTES; files joined by ``<|endoftext|>``.
* Tokenizer: tiny_model's byte-level BPE (StarCoder's special tokens at StarCoder's ids, ``<|endoftext|>`` = 0),
  its merges learnt from that corpus, VOCAB_SIZE tokens.
* Model: ``gpt_bigcode`` (multi-query attention, 8192 positions, untied output embeddings), N_LAYER layers of
  N_EMBD, N_HEAD heads. Its copying circuit is planted rather than learnt (plant_induction_circuit says how and
  why): frozen sinusoid positions, two heads that read the previous two tokens, and an induction head over them.
  Each training window sits at a random offset in the 8192-token window, so no position is special and a prompt
  longer than a training window reads as well (copying after a 700-token prefix: as good as without).
* Training: causal LM on random SEQ_LEN-token windows of the corpus, BATCH windows a step, REPEAT_FRACTION of them
  with one of their spans repeated further on (repeat_a_span), STEPS steps of AdamW (warm-up, then cosine decay),
  bfloat16 autocast, torch.manual_seed(SEED), one thread. Saved in float16 (the server loads it in float32).

The committed checkpoint (devtools/code_model/; code_model_recipe.json there records these numbers) was made with
``python -m devtools.code_model --train devtools/code_model`` under CPython 3.11.7, torch 2.13.0, transformers
5.23.0 (the corpus is that Python's standard library: 550 files, 9.2 MB, 2.88M tokens), seed 0, 1,600 steps of
16 x 256 tokens (6.6M tokens, about 2.3 passes): final training loss 2.56 nats a token (mean of the last 100 steps;
2.69 on the windows left as they are; ln 2048 = 7.62 at the start), in 9 min 51 s wall on one thread of a Xeon
with AMX (bfloat16). 3.52M parameters (1.57M of them the frozen position table), 7.05 MB of float16 weights, 7.2 MB
in all. Two runs on one machine write the same bytes (checked at 30 steps). What it writes is clumsy, repetitive
Python, but it copies: in a 150-token stretch of textwrap.py seen a second time, its top token is the text's next
one at 73% of the positions (27% the first time round).

    python -m devtools.code_model --train devtools/code_model      # ~10 minutes on one CPU thread
    python -m devtools.code_model --sample devtools/code_model     # greedy completions of a few prompts
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

from devtools.tiny_model import N_POSITIONS, STARCODER_SPECIAL_TOKENS, _train_tokenizer

SEED = 0
EXCLUDED_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "encodings", "pydoc_data"})
MAX_CORPUS_BYTES = 12_000_000
VOCAB_SIZE = 2048
N_EMBD = 192
N_LAYER = 4
N_HEAD = 4
N_INNER = 512
SEQ_LEN = 256
BATCH = 16
STEPS = 1600
PEAK_LR = 2e-3
WARMUP_STEPS = 100
FINAL_LR_FRACTION = 0.1
WEIGHT_DECAY = 0.1
REPEAT_FRACTION = 0.5
POSITION_PAIRS = 12
POSITION_AMPLITUDE = 0.17
SIGNATURE_NORM = 0.6
TOKEN_NORM = 0.6
PREVIOUS_TOKEN_SHARPNESS = 4.0
INDUCTION_SHARPNESS = 4.0

# A prompt ending in a newline asks for a token the tokenizer never makes (a newline is one token with the next
# line's indentation), hence none here.
SAMPLE_PROMPTS: tuple[str, ...] = (
    "def compute_fib(n):",
    (
        "class Counter:\n    def __init__(self, widget_count):\n        self.widget_count = widget_count\n\n"
        "    def increment(self):"
    ),
    "def read_config(path):\n    with open(path) as f:",
)


def corpus_files(root: Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files, in sorted path order, less EXCLUDED_DIRS, up to MAX_CORPUS_BYTES."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if EXCLUDED_DIRS.intersection(path.relative_to(root).parts[:-1]) or not path.is_file():
            continue
        size = path.stat().st_size
        if total + size > MAX_CORPUS_BYTES:
            break
        files.append(path)
        total += size
    return files


def corpus_texts(files: list[Path]) -> list[str]:
    return [path.read_text(encoding="utf-8", errors="replace") for path in files]


# The residual stream's reserved features (the rest, TOKEN_FEATURES onwards, are the tokens' learnt features).
POSITIONS = slice(0, 24)  # frozen position sinusoids: POSITION_PAIRS sine/cosine pairs
SIGNATURE = slice(24, 40)  # each token's frozen random signature, from its embedding
PREVIOUS = slice(40, 56)  # the previous token's signature, written by layer 0's first head
BEFORE_PREVIOUS = slice(56, 72)  # the signature of the token before that, written by layer 0's second head
TOKEN_FEATURES = 72


def position_frequencies():  # -> torch.Tensor
    """Geometric, from 3 radians a position (the previous token's sharp peak) down to 0.03 (a ~200-token period)."""
    import torch

    return 3.0 * 0.01 ** (torch.arange(POSITION_PAIRS, dtype=torch.float32) / (POSITION_PAIRS - 1))


def position_table(positions: int, width: int):  # -> torch.Tensor
    """The frozen position embeddings: sine/cosine pairs in POSITIONS, zero in every other feature. Each pair
    has the same norm at every position, so a position's embedding does too."""
    import torch

    angle = torch.arange(positions, dtype=torch.float32)[:, None] * position_frequencies()
    table = torch.zeros(positions, width)
    table[:, POSITIONS.start : POSITIONS.stop : 2] = torch.sin(angle)
    table[:, POSITIONS.start + 1 : POSITIONS.stop : 2] = torch.cos(angle)
    return table * POSITION_AMPLITUDE


def token_signatures(vocab_size: int):  # -> torch.Tensor
    """A random +-1 pattern a token (its own generator, so the model's seed does not move it), of norm SIGNATURE_NORM."""
    import torch

    width = SIGNATURE.stop - SIGNATURE.start
    signs = torch.randint(0, 2, (vocab_size, width), generator=torch.Generator().manual_seed(SEED + 1)) * 2 - 1
    return signs.float() * (SIGNATURE_NORM / math.sqrt(width))


def plant_induction_circuit(model, signatures) -> None:
    """Set (again, after every optimizer step) the weights of the one circuit this model is given rather than left
    to find: copying from the prompt, what n-gram drafting bets on.

    Copying takes an induction head: heads that attend to the previous tokens, and a later one that attends to the
    token after an earlier occurrence of the current tokens through them. Trained from random weights, this model
    does not find one in the ten minutes it trains (its loss on a window that repeats itself stays its loss on one
    that does not, even with a previous-token head planted); planted, what to copy is learnt as the rest is:

    * embeddings: POSITIONS hold frozen sinusoids, SIGNATURE a frozen random signature a token (+-1s), the two
      other reserved blocks nothing; the learnt features (TOKEN_FEATURES onwards) are kept at mean 0 and norm
      TOKEN_NORM, so that layer 0's layer norm divides every token by the same amount and the planted attention is
      equally sharp on all;
    * layer 0, head 0 attends to the previous token: its query rotates the position pairs back by one position,
      and the (multi-query, shared) key's first half reads the positions, so query x key = sum over the pairs of
      cos(w (i - 1 - j)), at its peak at j = i - 1 whatever i is; head 1, rotating by two, attends to the token
      before. The shared value's first third reads SIGNATURE, and the output projection copies head 0's into
      PREVIOUS, head 1's into BEFORE_PREVIOUS;
    * layer 1, head 0 is the induction head: its query reads SIGNATURE and PREVIOUS (the current token and the one
      before), the shared key PREVIOUS and BEFORE_PREVIOUS, so position i attends to the positions j whose two
      previous tokens are i's last two (a one-token match scores half as much: a bigram alone, ")" or "self",
      would be ambiguous). How sharply, the model sets itself: layer 1's layer norm divides by the residual
      stream's scale, which layer 0's outputs set. The value, and how it turns into the next token's logits, are
      learnt;
    * no other layer writes into the reserved features, and the two layer norms pass them through unscaled.

    Every other head and weight is trained as usual (the shared keys' and values' other dimensions included)."""
    import torch

    width, head = model.config.n_embd, model.config.n_embd // model.config.n_head
    n = SIGNATURE.stop - SIGNATURE.start  # a signature's width
    reserved = slice(0, TOKEN_FEATURES)
    layers = model.transformer.h
    with torch.no_grad():
        wte = model.transformer.wte.weight
        wte[:, reserved] = 0.0
        wte[:, SIGNATURE] = signatures.to(wte.dtype)
        features = wte[:, TOKEN_FEATURES:]
        features -= features.mean(dim=1, keepdim=True)
        features *= TOKEN_NORM / features.norm(dim=1, keepdim=True).clamp_min(1e-6)
        for layer in layers:
            layer.attn.c_proj.weight[reserved] = 0.0
            layer.attn.c_proj.bias[reserved] = 0.0
            layer.mlp.c_proj.weight[reserved] = 0.0
            layer.mlp.c_proj.bias[reserved] = 0.0
        for layer, kept in ((layers[0], slice(0, SIGNATURE.stop)), (layers[1], slice(SIGNATURE.start, TOKEN_FEATURES))):
            layer.ln_1.weight[kept] = 1.0
            layer.ln_1.bias[kept] = 0.0

        # Layer 0: heads 0 and 1 attend 1 and 2 tokens back. c_attn's rows: every head's query, the key, the value.
        attn = layers[0].attn.c_attn
        positions = POSITIONS.stop - POSITIONS.start
        for back in (1, 2):
            angle = position_frequencies() * back
            query = torch.zeros(head, width)
            for pair in range(POSITION_PAIRS):
                s, c = POSITIONS.start + 2 * pair, POSITIONS.start + 2 * pair + 1
                query[2 * pair, s], query[2 * pair, c] = torch.cos(angle[pair]), -torch.sin(angle[pair])  # sin(w(i-b))
                query[2 * pair + 1, s], query[2 * pair + 1, c] = torch.sin(angle[pair]), torch.cos(angle[pair])
            rows = slice((back - 1) * head, back * head)
            attn.weight[rows] = PREVIOUS_TOKEN_SHARPNESS * query
            attn.bias[rows] = 0.0
        key, value = slice(width, width + positions), slice(width + head, width + head + n)
        attn.weight[key] = 0.0
        attn.weight[key, POSITIONS] = torch.eye(positions)
        attn.bias[key] = 0.0
        attn.weight[value] = 0.0
        attn.weight[value, SIGNATURE] = torch.eye(n)
        attn.bias[value] = 0.0
        # A head's output is its attended value (head h is the output projection's inputs h * head onwards), which
        # layer 0's layer norm divided by its scale: multiplied back, the blocks hold the signatures themselves.
        proj = layers[0].attn.c_proj
        for back, block in ((1, PREVIOUS), (2, BEFORE_PREVIOUS)):
            proj.weight[block] = 0.0
            proj.weight[block, (back - 1) * head : (back - 1) * head + n] = torch.eye(n) * embedding_scale(model)

        # Layer 1, head 0: the induction head. Query (current, previous) x key (previous, before previous).
        attn = layers[1].attn.c_attn
        attn.weight[:head] = 0.0
        attn.weight[:n, SIGNATURE] = INDUCTION_SHARPNESS * torch.eye(n)
        attn.weight[n : 2 * n, PREVIOUS] = INDUCTION_SHARPNESS * torch.eye(n)
        attn.bias[:head] = 0.0
        key = slice(width, width + 2 * n)
        attn.weight[key] = 0.0
        attn.weight[width : width + n, PREVIOUS] = torch.eye(n)
        attn.weight[width + n : width + 2 * n, BEFORE_PREVIOUS] = torch.eye(n)
        attn.bias[key] = 0.0


def embedding_scale(model) -> float:
    """The standard deviation of a position's embedding over its features, the same at every position and token
    (as plant_induction_circuit keeps them): what layer 0's layer norm divides by."""
    total = POSITION_PAIRS * POSITION_AMPLITUDE**2 + SIGNATURE_NORM**2 + TOKEN_NORM**2
    return math.sqrt(total / model.config.n_embd)


def new_model(vocab_size: int):  # -> GPTBigCodeForCausalLM
    from transformers import GenerationConfig, GPTBigCodeConfig, GPTBigCodeForCausalLM

    config = GPTBigCodeConfig(
        vocab_size=vocab_size,
        n_positions=N_POSITIONS,  # StarCoder's 8192-token window: the server reads it from the checkpoint
        n_embd=N_EMBD,
        n_layer=N_LAYER,
        n_head=N_HEAD,
        n_inner=N_INNER,
        multi_query=True,  # StarCoder's multi-query attention: one shared key/value head
        tie_word_embeddings=False,
        resid_pdrop=0.0,  # about two passes over the corpus: nothing to regularise, and dropout is slow
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="sdpa",
    )
    model = GPTBigCodeForCausalLM(config)
    model.transformer.wpe.weight.data.copy_(position_table(N_POSITIONS, N_EMBD))
    model.transformer.wpe.weight.requires_grad_(False)
    plant_induction_circuit(model, token_signatures(vocab_size))
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return model


def repeat_a_span(tokens, generator):  # -> torch.Tensor
    """``tokens`` with a copy of one of its spans (16 to 96 tokens) inserted further on, the end cut to keep the
    length: what an identifier, a call or a line used twice looks like, so that the induction head's value (which
    token to copy) is learnt early."""
    import torch

    length = len(tokens)
    span = int(torch.randint(16, 97, (1,), generator=generator))
    source = int(torch.randint(0, length - 2 * span - 16, (1,), generator=generator))
    at = int(torch.randint(source + span, length - 16, (1,), generator=generator))
    return torch.cat([tokens[:at], tokens[source : source + span], tokens[at:]])[:length]


def mean(values: list[float]) -> float:
    return sum(values) / max(1, len(values))


def learning_rate(step: int, steps: int = STEPS) -> float:
    if step < WARMUP_STEPS:
        return PEAK_LR * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return PEAK_LR * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(out_dir: Path, steps: int = STEPS, log: Callable[[str], None] | None = None) -> dict[str, object]:
    """Train the code model from nothing and save it (float16 safetensors, tokenizer, generation config) in
    ``out_dir``; returns the recipe record also written there as code_model_recipe.json. ``log``: where progress
    lines go (default: stdout, flushed)."""
    log = log or (lambda line: print(line, flush=True))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    import torch
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    started = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)

    files = corpus_files()
    texts = corpus_texts(files)
    _train_tokenizer(out_dir, STARCODER_SPECIAL_TOKENS, N_POSITIONS, corpus=texts, vocab_size=VOCAB_SIZE)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert eos == 0
    stream: list[int] = []
    for encoding in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):  # files > 8192 tokens
        stream.extend(encoding.ids)
        stream.append(eos)
    data = torch.tensor(stream, dtype=torch.long)
    corpus_bytes = sum(len(text.encode()) for text in texts)
    log(
        f"corpus: {len(files)} files, {corpus_bytes / 1e6:.1f} MB, {len(data) / 1e6:.2f}M tokens "
        f"({corpus_bytes / len(data):.2f} bytes a token); tokenizer in {time.monotonic() - started:.0f} s"
    )

    model = new_model(len(tokenizer)).train()
    params = sum(p.numel() for p in model.parameters())
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]  # all but the positions
    decay = [p for _, p in trained if p.ndim == 2]
    no_decay = [p for _, p in trained if p.ndim != 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=PEAK_LR,
        betas=(0.9, 0.95),
        fused=True,
    )
    generator = torch.Generator().manual_seed(SEED)
    window = torch.arange(SEQ_LEN + 1)
    signatures = token_signatures(len(tokenizer))
    losses: list[float] = []
    natural_losses: list[float] = []
    train_started = time.monotonic()
    for step in range(steps):
        starts = torch.randint(0, len(data) - SEQ_LEN - 1, (BATCH,), generator=generator)
        offsets = torch.randint(0, N_POSITIONS - SEQ_LEN + 1, (BATCH, 1), generator=generator)
        tokens = data[starts[:, None] + window]
        repeated = torch.rand(BATCH, generator=generator) < REPEAT_FRACTION
        for row in torch.nonzero(repeated)[:, 0].tolist():
            tokens[row] = repeat_a_span(tokens[row], generator)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model.transformer(input_ids=inputs, position_ids=offsets + window[:-1]).last_hidden_state
            logits = model.lm_head(hidden)
        token_losses = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
        ).view(BATCH, SEQ_LEN)
        loss = token_losses.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        plant_induction_circuit(model, signatures)
        losses.append(loss.item())
        if not repeated.all():
            natural_losses.append(token_losses[~repeated].mean().item())
        if step % 50 == 0 or step == steps - 1:
            log(
                f"step {step:5d}  loss {mean(losses[-50:]):.3f} (windows left as they are: "
                f"{mean(natural_losses[-50:]):.3f})  lr {learning_rate(step, steps):.2e}  "
                f"{time.monotonic() - train_started:.0f} s"
            )

    model.eval()
    model.to(torch.float16)
    model.save_pretrained(out_dir, safe_serialization=True)
    recipe = {
        "python": platform.python_version(),
        "corpus_files": len(files),
        "corpus_bytes": corpus_bytes,
        "corpus_tokens": len(data),
        "vocab_size": len(tokenizer),
        "parameters": params,
        "seed": SEED,
        "steps": steps,
        "batch": BATCH,
        "seq_len": SEQ_LEN,
        "repeat_fraction": REPEAT_FRACTION,
        "final_loss": round(mean(losses[-100:]), 4),
        "final_loss_unrepeated_windows": round(mean(natural_losses[-100:]), 4),
        "wall_s": round(time.monotonic() - started, 1),
    }
    (out_dir / "code_model_recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    log(json.dumps(recipe))
    return recipe


def greedy_completions(directory: Path, prompts: tuple[str, ...] = SAMPLE_PROMPTS, max_new_tokens: int = 48):
    """(prompt, greedy completion) pairs from the checkpoint in ``directory``, run in float32 on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    pairs = []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        pairs.append((prompt, tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=False)))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--train", metavar="OUT_DIR", type=Path, help="train the model and save it there")
    action.add_argument("--sample", metavar="DIR", type=Path, help="print greedy completions of a checkpoint")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"training steps (default {STEPS})")
    args = parser.parse_args()
    if args.train:
        train(args.train, args.steps)
        directory = args.train
    else:
        directory = args.sample
    for prompt, completion in greedy_completions(directory):
        print(f"--- {prompt!r} ->\n{completion}")


if __name__ == "__main__":
    main()
