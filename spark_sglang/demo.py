"""Main job: a real model served by SGLang dense and with SparK, side by side.

Serves SmolLM2-135M-Instruct (the embedded default, ``spark_sglang.smollm2``; any local HF model
with ``--model-path``) with ``sglang.Engine`` twice: once with a dense attention backend
(``torch_native`` on CPU, ``triton`` on a GPU) and once with ``spark``. Each engine answers the
same questions about a real document in one conversation, turn after turn, so every turn reuses
the previous turns from the radix cache. Then it prints the answers side by side, and per engine:
KV bytes per token, the token capacity of the pool, cached tokens per turn, seconds per request,
and the continuation perplexity of a real text over a cached, compressed context.

    python -m spark_sglang.demo [--model-path M] [--key-ratio 0.5] [--value-ratio 0] [--kv-cache-dtype fp8_e4m3]
"""

from __future__ import annotations

import argparse
import codecs
import json
import math
import os
import textwrap
import time

import torch

from spark_sglang.texts import load_documents
from spark_sglang.kernels.layout import SparKConfig, bytes_per_token
from spark_sglang.pool import TOKENS_PER_WINDOW_ROW
from spark_sglang.models import NAMES
from spark_sglang.models import model_path as model_path_of

QUESTIONS = [
    "Which is better, according to the text: beautiful or ugly?",
    "What does the text say about errors?",
    "How many obvious ways to do something should there be?",
]
CONTEXT_TOKENS, CONTINUATION_TOKENS = 640, 96
KV_DTYPES = {"auto": None, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def zen_of_python() -> str:
    """The Zen of Python (PEP 20), read from the standard library's ``this`` module, which keeps it
    ROT13-encoded in ``s`` (read from the source: importing the module prints it)."""
    import ast
    import importlib.util

    with open(importlib.util.find_spec("this").origin) as f:
        tree = ast.parse(f.read())
    encoded = next(node.value.value for node in tree.body
                   if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "s")  # fmt: skip
    return codecs.decode(encoded, "rot13")


def cpu_memory_fraction(model_path: str, kv_share: float = 0.08) -> float:
    """``mem_fraction_static`` for a CPU engine: on CPU SGLang takes it of the free host RAM, and the
    float32 weights (with 10 % loading overhead) must fit inside it, so it is their share of that
    RAM plus ``kv_share`` for the KV pool (0.08 is about 1.6 GB on a 24 GB machine)."""
    import psutil

    with open(os.path.join(model_path, "config.json")) as f:
        config = json.load(f)
    stored = getattr(torch, config.get("dtype") or config.get("torch_dtype") or "float32")
    files = [f for f in os.listdir(model_path) if f.endswith(".safetensors")]
    weights = sum(os.path.getsize(os.path.join(model_path, f)) for f in files) * 4 / stored.itemsize * 1.1
    return round(min(0.95, weights / psutil.virtual_memory().available + kv_share), 3)


def engine_kwargs(model_path: str, kv_cache_dtype: str = "auto") -> dict:
    """``sglang.Engine`` keywords shared by the demo and the task suite (CPU: float32, no CUDA
    graph, a static memory fraction that leaves room for the KV pool beside the weights)."""
    kwargs = dict(model_path=model_path, random_seed=0, log_level="error", kv_cache_dtype=kv_cache_dtype)
    if not torch.cuda.is_available():
        kwargs.update(device="cpu", dtype="float32", disable_cuda_graph=True,
                      mem_fraction_static=cpu_memory_fraction(model_path), sleep_on_idle=True)  # fmt: skip
    return kwargs


def serve(model_path: str, backend: str, args, **options) -> dict:
    """Run the conversation and the perplexity probe on one engine; return what it measured."""
    import sglang as sgl

    engine = sgl.Engine(attention_backend=backend, **engine_kwargs(model_path, args.kv_cache_dtype), **options)
    try:
        tokenizer = engine.tokenizer_manager.tokenizer
        info = engine.get_server_info()
        messages = [{"role": "system", "content": "Answer from the document, in one sentence."},
                    {"role": "user", "content": "Here is a document:\n\n" + zen_of_python()}]  # fmt: skip
        turns = []
        for question in QUESTIONS[: args.turns]:
            messages.append({"role": "user", "content": question})
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            start = time.perf_counter()
            out = engine.generate(prompt=prompt, sampling_params={"temperature": 0, "max_new_tokens": args.max_new_tokens})
            turns.append({"answer": out["text"].strip(), "seconds": time.perf_counter() - start,
                          "cached": out["meta_info"]["cached_tokens"], "prompt": out["meta_info"]["prompt_tokens"]})  # fmt: skip
            messages.append({"role": "assistant", "content": out["text"]})
        perplexity = continuation_perplexity(engine, tokenizer)
    finally:
        engine.shutdown()
    return {"capacity": info["max_total_num_tokens"], "turns": turns, "perplexity": perplexity}


def continuation_perplexity(engine, tokenizer) -> float:
    """Perplexity of a licence text's next tokens over its previous ones, the context cached (and,
    with SparK, compressed) by a first request, the continuation scored by a second."""
    ids = tokenizer.encode(load_documents()[0].text)[: CONTEXT_TOKENS + CONTINUATION_TOKENS]
    engine.generate(input_ids=ids[:CONTEXT_TOKENS], sampling_params={"max_new_tokens": 1})
    out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 1}, return_logprob=True,
                          logprob_start_len=CONTEXT_TOKENS)  # fmt: skip
    logprobs = [entry[0] for entry in out["meta_info"]["input_token_logprobs"] if entry[0] is not None]
    return math.exp(-sum(logprobs) / len(logprobs))


def model_geometry(model_path: str) -> tuple[int, int, int]:
    with open(os.path.join(model_path, "config.json")) as f:
        config = json.load(f)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return head_dim, config["num_key_value_heads"], config["num_hidden_layers"]


def report(model_path: str, config: SparKConfig, args, dense: dict, spark: dict) -> None:
    head_dim, kv_heads, layers = model_geometry(model_path)
    cpu = not torch.cuda.is_available()
    dtype = KV_DTYPES[args.kv_cache_dtype] or (torch.float32 if cpu else torch.bfloat16)
    sizes = bytes_per_token(config, head_dim, kv_heads, layers, dtype, tokens_per_window=TOKENS_PER_WINDOW_ROW)
    device = torch.cuda.get_device_name() if not cpu else "CPU (PyTorch path, float32)"
    print(f"\nSparK vs dense SGLang on {os.path.basename(model_path.rstrip('/'))}, {device}, KV cache {dtype}")
    print(f"SparK: key ratio {config.key_ratio}, value ratio {config.value_ratio}, recovery {config.recovery!r}; "
          f"dense backend: {args.dense_backend}\n")  # fmt: skip
    for turn, question in enumerate(QUESTIONS[: args.turns]):
        d, s = dense["turns"][turn], spark["turns"][turn]
        print(f"Q{turn + 1}: {question}")
        for name, t in (("dense", d), ("SparK", s)):
            wrapped = textwrap.fill(t["answer"], width=96, initial_indent=f"  {name:>5}: ", subsequent_indent=" " * 9)
            print(f"{wrapped}\n{'':9}[{t['cached']}/{t['prompt']} prompt tokens cached, {t['seconds']:.1f} s]")
    print(f"\n{'':40}{'dense':>12}{'SparK':>12}")
    print(f"{'KV bytes per token (all layers)':40}{sizes['dense']:>12.0f}{sizes['spark_total']:>12.0f}"
          f"   ({sizes['ratio']:.1%} of dense)")  # fmt: skip
    same_budget = int(dense["capacity"] * sizes["dense"] // sizes["spark_total"])
    print(f"{'tokens in the dense pool budget':40}{dense['capacity']:>12}{same_budget:>12}"
          f"   ({same_budget / dense['capacity']:.2f}x)")  # fmt: skip
    print(f"{'tokens SGLang allocated (measured)':40}{dense['capacity']:>12}{spark['capacity']:>12}")
    change = spark["perplexity"] / dense["perplexity"] - 1
    print(f"{'continuation perplexity, cached context':40}{dense['perplexity']:>12.3f}{spark['perplexity']:>12.3f}"
          f"   ({change:+.2%})")  # fmt: skip
    seconds = [sum(t["seconds"] for t in r["turns"]) / len(r["turns"]) for r in (dense, spark)]
    print(f"{'seconds per answer':40}{seconds[0]:>12.2f}{seconds[1]:>12.2f}")
    if cpu:
        print("\nOn CPU each engine's budget is the free host RAM sampled at its start-up, so the measured capacities"
              "\nmove with whatever else runs; bytes per token are exact. Perplexity: "
              f"{CONTINUATION_TOKENS} tokens of {load_documents()[0].name} after {CONTEXT_TOKENS} cached ones;"
              "\ndocs/frontier.md measures it over 8 texts against FP8/FP4 caches.")  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", choices=NAMES,
                        help="a named model (qwen2.5-coder-1.5b: run `python -m spark_sglang.models fetch` first)")
    parser.add_argument("--model-path", default=None, help="any local Hugging Face model (overrides --model)")
    parser.add_argument("--key-ratio", type=float, default=0.5)
    parser.add_argument("--value-ratio", type=float, default=0.0)
    parser.add_argument("--recovery", default="mean", choices=["mean", "zero"])
    parser.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_DTYPES))
    parser.add_argument("--dense-backend", default=None, help="default: torch_native on CPU, triton on CUDA")
    parser.add_argument("--turns", type=int, default=len(QUESTIONS), choices=range(1, len(QUESTIONS) + 1))
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args(argv)
    args.dense_backend = args.dense_backend or ("triton" if torch.cuda.is_available() else "torch_native")
    config = SparKConfig(key_ratio=args.key_ratio, value_ratio=args.value_ratio, recovery=args.recovery)
    model_path = args.model_path or model_path_of(args.model)
    dense = serve(model_path, args.dense_backend, args)
    spark = serve(model_path, "spark", args, spark_key_ratio=config.key_ratio, spark_value_ratio=config.value_ratio,
                  spark_recovery=config.recovery)  # fmt: skip
    report(model_path, config, args, dense, spark)
    return {"dense": dense, "spark": spark}


if __name__ == "__main__":
    main()
