"""StarCoder-15.5B on one CUDA GPU, in process: decode speed against the memory-bandwidth roofline,
and the engine's batched throughput against one-at-a-time ``generate()``.

    make bench BENCH_ARGS="--gpu"
    python -m bench.gpu --prompt-tokens 512 --new-tokens 128 --levels 1 2 4 8 16 32 64

No download: the model is StarCoder's exact architecture (GPTBigCode, 40 layers, 6144 wide, 48 heads,
multi-query attention, 8192 positions, 49152-token vocabulary) with random bf16 weights created
directly on the GPU. Speed does not depend on the weights' values, only on their shapes and dtype.
The tiny model's tokenizer builds the prompts; the output rows of ids it cannot decode are zeroed so
every generated token is printable (the matrix multiply keeps its full 49152 x 6144 shape).

Roofline: each decode step of one sequence must read every weight once, so one stream can produce
at most (device-to-device copy bandwidth) / (weight bytes) tokens per second. The bandwidth is
measured here with a large tensor copy, not taken from a datasheet.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pydantic

from bench.loadgen import Percentiles, build_prompt

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "data"


class DecodeResult(pydantic.BaseModel):
    prompt_tokens: int
    new_tokens: int
    prefill_s: float  # generate(max_new_tokens=1): prompt forward + first token
    generate_s: float  # generate(max_new_tokens=L), median of repeats
    decode_tokens_per_s: float  # (L - 1) / (generate_s - prefill_s)
    roofline_tokens_per_s: float
    fraction_of_roofline: float


class EngineLevel(pydantic.BaseModel):
    concurrency: int
    requests: int
    failures: int = 0
    output_tokens: int
    wall_s: float
    output_tokens_per_s: float
    latency_s: Percentiles
    ttft_s: Percentiles


class EngineRun(pydantic.BaseModel):
    name: str  # "batched" or "seed"
    levels: list[EngineLevel]
    # Requests per serving path (engine/path_choice.py): proves the "batched" run really was batched.
    routed: dict[str, int]


class GpuReport(pydantic.BaseModel):
    label: str
    created_at: str
    device: str
    torch: str
    shape: str
    parameters: int
    weight_bytes: int
    copy_bandwidth_gb_s: float
    decode: DecodeResult
    runs: list[EngineRun]
    ratios: dict[int, float | None]


def starcoder_config(shape: str) -> Any:
    from transformers import GPTBigCodeConfig

    common: dict[str, Any] = {
        "vocab_size": 49152,
        "n_positions": 8192,
        "multi_query": True,
        "activation_function": "gelu_pytorch_tanh",
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
    if shape == "starcoder":  # bigcode/starcoder's config.json
        return GPTBigCodeConfig(n_layer=40, n_embd=6144, n_head=48, n_inner=24576, **common)
    # A few-MB stand-in with the same code path, so this module can be checked on a CPU.
    return GPTBigCodeConfig(n_layer=2, n_embd=128, n_head=4, n_inner=512, **{**common, "n_positions": 2048})


def build_model(shape: str, device: str, dtype_name: str, printable_ids: int) -> Any:
    import torch
    from transformers import GenerationConfig, GPTBigCodeForCausalLM

    config = starcoder_config(shape)
    config._attn_implementation = "sdpa"
    dtype = getattr(torch, dtype_name)
    # Created in the target dtype on the target device: an fp32 copy of 15.5B parameters (62 GB)
    # would not fit next to the bf16 one on an 80 GB card.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with torch.device(device):
            model = GPTBigCodeForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        # Zero logits for ids the tokenizer cannot decode and for <|endoftext|> (id 0), so that greedy
        # decoding never ends early: the max of ~700 random logits of decodable ids is above 0.
        model.lm_head.weight[printable_ids:] = 0
        model.lm_head.weight[0] = 0
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return model.eval()


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str, n_bytes: int, iterations: int = 20) -> float:
    """Bytes per second moved by ``dst.copy_(src)``: each copy reads and writes n_bytes."""
    import torch

    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(iterations):
        dst.copy_(src)
    synchronize(device)
    elapsed = time.perf_counter() - started
    del src, dst
    return 2 * n_bytes * iterations / elapsed


def timed_generate(model: Any, prompt_ids: list[int], new_tokens: int, device: str) -> float:
    import torch

    input_ids = torch.tensor([prompt_ids], device=device)
    synchronize(device)
    started = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    synchronize(device)
    return time.perf_counter() - started


def measure_decode(
    model: Any, prompt_ids: list[int], new_tokens: int, device: str, repeats: int, roofline: float
) -> DecodeResult:
    timed_generate(model, prompt_ids, 4, device)  # warm-up: kernels, allocator, cuBLAS handles
    prefill = statistics.median(timed_generate(model, prompt_ids, 1, device) for _ in range(repeats))
    full = statistics.median(timed_generate(model, prompt_ids, new_tokens, device) for _ in range(repeats))
    decode = (new_tokens - 1) / (full - prefill) if new_tokens > 1 and full > prefill else 0.0
    return DecodeResult(
        prompt_tokens=len(prompt_ids),
        new_tokens=new_tokens,
        prefill_s=prefill,
        generate_s=full,
        decode_tokens_per_s=decode,
        roofline_tokens_per_s=roofline,
        fraction_of_roofline=decode / roofline if roofline else 0.0,
    )


def engine_settings(device: str, dtype_name: str, batched: bool, new_tokens: int, max_queued: int) -> Any:
    from starcoder_serving.settings import ServingSettings

    # Through from_sources, as the server reads them, so STARCODER_CONTINUOUS_BATCHING means here
    # exactly what it means on the server.
    return ServingSettings.from_sources(
        {
            "checkpoint": "random-weights-starcoder-15.5b",
            "dtype": dtype_name,
            "device": device,
            "max_new_tokens_cap": max(new_tokens, 2048),
            "max_queued_requests": max_queued,
        },
        environ={"STARCODER_CONTINUOUS_BATCHING": "1" if batched else "0"},
    )


async def engine_level(
    engine: Any,
    prompts: Sequence[list[int]],
    new_tokens: int,
    concurrency: int,
    requests_per_client: int,
) -> EngineLevel:
    """``concurrency`` clients, client i sending prompts[i % len(prompts)] back to back; a failed request is
    counted, not raised, so one level's errors do not hide the others' figures."""
    from starcoder_serving.engine.sampling_params import SamplingParams

    latencies: list[float] = []
    ttfts: list[float] = []
    tokens = 0
    failures = 0

    async def client(prompt_ids: list[int]) -> None:
        nonlocal tokens, failures
        for _ in range(requests_per_client):
            # build_model makes <|endoftext|> unreachable, so each request runs all L tokens (plain greedy:
            # the cheapest row of the batch sampler).
            plan = engine.plan(prompt_ids, SamplingParams(max_new_tokens=new_tokens))[0]
            done: list[Any] = []
            started = time.perf_counter()
            first: float | None = None
            try:
                async for _delta in engine.stream(plan, on_complete=done.append):
                    first = first if first is not None else time.perf_counter()
            except Exception as error:  # noqa: BLE001 - counted and printed: the level's figures stay usable
                failures += 1
                print(f"request failed: {type(error).__name__}: {error}", flush=True)
                continue
            latencies.append(time.perf_counter() - started)
            if first is not None:
                ttfts.append(first - started)
            tokens += done[0].completion_tokens if done else 0

    started = time.perf_counter()
    await asyncio.gather(*(client(prompts[i % len(prompts)]) for i in range(concurrency)))
    wall = time.perf_counter() - started
    return EngineLevel(
        concurrency=concurrency,
        requests=concurrency * requests_per_client,
        failures=failures,
        output_tokens=tokens,
        wall_s=wall,
        output_tokens_per_s=tokens / wall,
        latency_s=Percentiles.of(latencies),
        ttft_s=Percentiles.of(ttfts),
    )


def run_engine(
    name: str,
    model: Any,
    tokenizer: Any,
    settings: Any,
    prompt_ids: list[int],
    new_tokens: int,
    levels: Sequence[int],
    requests_per_client: int,
) -> EngineRun:
    from starcoder_serving.engine.engine import Engine

    engine = Engine(model, tokenizer, settings, DATA_DIR)
    results: list[EngineLevel] = []
    try:

        async def all_levels() -> None:
            await engine_level(engine, [prompt_ids], new_tokens, min(4, max(levels)), 1)  # warm-up
            for concurrency in levels:
                level = await engine_level(engine, [prompt_ids], new_tokens, concurrency, requests_per_client)
                results.append(level)
                print(
                    f"[{name}] c={concurrency:>3}: {level.output_tokens_per_s:8.1f} tok/s  "
                    f"p50 latency {level.latency_s.p50 or 0:.2f} s",
                    flush=True,
                )

        asyncio.run(all_levels())
    finally:
        engine.shutdown()
    routed = {path.value: count for path, count in engine.routed.items()}
    print(f"[{name}] requests per path: {routed}", flush=True)
    return EngineRun(name=name, levels=results, routed=routed)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help=argparse.SUPPRESS)  # passed through from bench.run
    parser.add_argument(
        "--shape",
        choices=("starcoder", "tiny"),
        default="starcoder",
        help="tiny: a small stand-in to check this script on a CPU (numbers mean nothing)",
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--requests-per-client", type=int, default=1)
    parser.add_argument("--no-seed", action="store_true", help="skip the one-at-a-time generate() baseline")
    parser.add_argument("--repeats", type=int, default=3, help="single-stream timings are medians of this many")
    parser.add_argument("--copy-gib", type=float, default=2.0, help="size of the bandwidth-test tensor")
    parser.add_argument("--label", default="gpu")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "docs" / "bench")
    args, _unknown = parser.parse_known_args(argv)  # bench.run's own options may ride along
    return args


def main(argv: list[str] | None = None) -> int:
    import torch
    from transformers import AutoTokenizer

    from devtools.tiny_model import build_tiny_model
    from devtools.truss_local import DEFAULT_TINY_MODEL_DIR

    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "bench --gpu needs a CUDA GPU, and torch sees none here "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}). Run it on a CUDA machine "
            "with a CUDA build of torch, or use --shape tiny --device cpu to check the script.",
            file=sys.stderr,
        )
        return 2
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model(DEFAULT_TINY_MODEL_DIR))
    prompt_ids = list(tokenizer(build_prompt(tokenizer, args.prompt_tokens), add_special_tokens=False)["input_ids"])
    device_name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"

    bandwidth = copy_bandwidth(args.device, int(args.copy_gib * 2**30))
    print(f"device {device_name}: device-to-device copy {bandwidth / 1e9:.0f} GB/s", flush=True)
    started = time.perf_counter()
    model = build_model(args.shape, args.device, args.dtype, printable_ids=len(tokenizer))
    parameters = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(
        f"built {args.shape} ({parameters / 1e9:.2f} B parameters, {weight_bytes / 1e9:.1f} GB) in "
        f"{time.perf_counter() - started:.0f} s",
        flush=True,
    )
    roofline = bandwidth / weight_bytes
    decode = measure_decode(model, prompt_ids, args.new_tokens, args.device, args.repeats, roofline)
    print(
        f"single stream: {decode.decode_tokens_per_s:.1f} decode tok/s vs roofline {roofline:.1f} "
        f"({decode.fraction_of_roofline:.0%}); prefill of {len(prompt_ids)} tokens {decode.prefill_s * 1000:.0f} ms",
        flush=True,
    )

    max_queued = max(256, max(args.levels) * args.requests_per_client)
    runs = [
        run_engine(
            "batched",
            model,
            tokenizer,
            engine_settings(args.device, args.dtype, True, args.new_tokens, max_queued),
            prompt_ids,
            args.new_tokens,
            args.levels,
            args.requests_per_client,
        )
    ]
    if not args.no_seed:
        runs.append(
            run_engine(
                "seed",
                model,
                tokenizer,
                engine_settings(args.device, args.dtype, False, args.new_tokens, max_queued),
                prompt_ids,
                args.new_tokens,
                args.levels,
                args.requests_per_client,
            )
        )
    ratios: dict[int, float | None] = {}
    if len(runs) == 2:
        for b, s in zip(runs[0].levels, runs[1].levels):
            ratios[b.concurrency] = b.output_tokens_per_s / s.output_tokens_per_s if s.output_tokens_per_s else None
            print(
                f"c={b.concurrency:>3}: batched {b.output_tokens_per_s:8.1f} tok/s / seed "
                f"{s.output_tokens_per_s:8.1f} tok/s = {ratios[b.concurrency] or 0:.2f}x"
            )
    report = GpuReport(
        label=args.label,
        created_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        device=device_name,
        torch=torch.__version__,
        shape=args.shape,
        parameters=parameters,
        weight_bytes=weight_bytes,
        copy_bandwidth_gb_s=bandwidth / 1e9,
        decode=decode,
        runs=runs,
        ratios=ratios,
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"results-{args.label}.json"
    path.write_text(report.model_dump_json(indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
