"""CPU speed of the spark backend's CPU path against SGLang's dense ``torch_native`` backend.

One ``sglang.Engine`` per backend serves SmolLM2-135M-Instruct (float32, CPU); for each context
length and batch size, in the same process and on the same prompts:

* **prefill**: ``batch`` fresh prompts of ``context`` tokens (cache flushed), one new token each:
  the wall time of the call (prefill of the whole batch plus one decode step, which is small
  beside it);
* **decode step**: the same prompts again (a radix hit on all but their last token), generating
  ``short`` and then ``long`` tokens; ``(t_long - t_short) / (long - short)`` is the time of one
  decode step of the whole batch at about ``context`` tokens of KV.

Medians over ``--repeats``, then SparK / dense ratios. Client-side wall times: they include the
engine's scheduling and IPC, the same for both backends.

    python benchmarks/bench_cpu.py [--contexts 512,2048,8000] [--batches 1,8] [--max-batch-tokens 16384]
                                   [--repeats 3] [--out docs/bench_cpu.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from spark_sglang.texts import load_documents
from spark_sglang.kernel_ops import kernel_choice
from spark_sglang.smollm2 import smollm2_path

SHORT, LONG = 2, 10


def prompts(tokenizer, context: int, batch: int) -> list[list[int]]:
    """``batch`` distinct token-id prompts of ``context`` tokens of real text."""
    ids = tokenizer.encode(" ".join(doc.text for doc in load_documents()))
    step = max(1, (len(ids) - context) // max(1, batch))
    return [ids[b * step : b * step + context] for b in range(batch)]


def timed(engine, input_ids, new_tokens: int) -> float:
    start = time.perf_counter()
    engine.generate(input_ids=input_ids, sampling_params={"temperature": 0, "max_new_tokens": new_tokens,
                                                          "ignore_eos": True})  # fmt: skip
    return time.perf_counter() - start


def measure(engine, tokenizer, context: int, batch: int, repeats: int) -> dict:
    batch_ids = prompts(tokenizer, context, batch)
    prefill, decode = [], []
    for _ in range(repeats):
        assert engine.flush_cache().success
        prefill.append(timed(engine, batch_ids, 1))
        short, long = timed(engine, batch_ids, SHORT), timed(engine, batch_ids, LONG)
        decode.append((long - short) / (LONG - SHORT))
    return {"prefill": statistics.median(prefill), "decode": statistics.median(decode)}


def shapes(args) -> list[tuple[int, int]]:
    """(context, batch) pairs measured: those within ``--max-batch-tokens`` prompt tokens."""
    return [(c, b) for c in args.contexts for b in args.batches if c * b <= args.max_batch_tokens]


def run_backend(backend: str, args, **options) -> dict:
    import sglang as sgl

    tokens = max(c * b for c, b in shapes(args)) + 4 * 1024
    engine = sgl.Engine(model_path=args.model_path, device="cpu", attention_backend=backend, dtype="float32",
                        disable_cuda_graph=True, max_total_tokens=tokens, mem_fraction_static=0.3,
                        chunked_prefill_size=-1, random_seed=0, log_level="error", sleep_on_idle=True,
                        **options)  # fmt: skip
    try:
        tokenizer = engine.tokenizer_manager.tokenizer
        timed(engine, prompts(tokenizer, 64, 1), 2)  # warm-up
        return {(c, b): measure(engine, tokenizer, c, b, args.repeats) for c, b in shapes(args)}
    finally:
        engine.shutdown()


def table(dense: dict, spark: dict, args) -> str:
    lines = [
        f"SmolLM2-135M-Instruct, float32, CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); SparK key ratio {args.key_ratio}, "
        f"{kernel_choice('cpu')} kernels; "
        f"medians of {args.repeats}; seconds; context x batch above {args.max_batch_tokens} tokens not run.",
        "",
        "| context | batch | prefill dense | prefill SparK | ratio | decode step dense | decode step SparK | ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for key in dense:
        d, s = dense[key], spark[key]
        lines.append(f"| {key[0]} | {key[1]} | {d['prefill']:.3f} | {s['prefill']:.3f} | {s['prefill'] / d['prefill']:.2f}x "
                     f"| {d['decode']:.3f} | {s['decode']:.3f} | {s['decode'] / d['decode']:.2f}x |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None, help="default: the embedded SmolLM2")
    parser.add_argument("--contexts", default="512,2048,8000", help="8000: SmolLM2 holds 8192 tokens in all")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-batch-tokens", type=int, default=16384,
                        help="skip context x batch above this (8 x 8000 tokens prefill for minutes on 2 cores)")
    parser.add_argument("--key-ratio", type=float, default=0.5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    args.model_path = args.model_path or smollm2_path()
    args.contexts = [int(x) for x in args.contexts.split(",")]
    args.batches = [int(x) for x in args.batches.split(",")]
    dense = run_backend("torch_native", args)
    spark = run_backend("spark", args, spark_key_ratio=args.key_ratio)
    text = table(dense, spark, args)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
