"""Main job: serve a model with SGLang dense and with SparK, and compare.

Runs ``sglang.Engine`` twice on the same model (the embedded tiny Llama by default; CPU here, GPU
where present): once with the dense ``triton`` attention backend, once with ``spark``. Prints bytes
per token, the token capacity each pool got, the cached tokens each turn of a multi-turn exchange
reused from the radix cache, and how far SparK's greedy answers agree with the dense ones.

    python -m spark_sglang.demo [--model-path M] [--key-ratio 0.5] [--value-ratio 0] [--turns 3]
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from spark_sglang.kernels.layout import SparKConfig, bytes_per_token
from spark_sglang.pool import TOKENS_PER_WINDOW_ROW
from spark_sglang.tiny_model import build_tiny_llama

TURNS = [
    "def parse_config(path):\n    \"\"\"Read a JSON configuration file and return a dict.\"\"\"\n",
    "    with open(path) as f:\n",
    "        data = json.load(f)\n    return data\n\ndef main():\n",
    "    config = parse_config(sys.argv[1])\n",
]


def engine_kwargs(model_path: str) -> dict:
    kwargs = dict(model_path=model_path, random_seed=0, log_level="error", mem_fraction_static=0.05)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # SparK's Triton kernels on CPU
        kwargs.update(device="cpu", dtype="float32", disable_cuda_graph=True)
    return kwargs


def converse(model_path: str, backend: str, turns: int, max_new_tokens: int, **options) -> dict:
    """A multi-turn exchange: each prompt extends the previous one, so the radix cache hits it.

    The turns are fixed text (not the model's answers), so both servers answer identical prompts.
    """
    import sglang as sgl

    engine = sgl.Engine(attention_backend=backend, **engine_kwargs(model_path), **options)
    try:
        capacity = engine.get_server_info()["max_total_num_tokens"]
        prompt, answers, cached, prompt_tokens = "", [], [], []
        for turn in TURNS[:turns]:
            prompt += turn
            out = engine.generate(prompt=prompt, sampling_params={"temperature": 0, "max_new_tokens": max_new_tokens})
            answers.append(out["output_ids"])
            cached.append(out["meta_info"]["cached_tokens"])
            prompt_tokens.append(out["meta_info"]["prompt_tokens"])
    finally:
        engine.shutdown()
    return {"capacity": capacity, "answers": answers, "cached": cached, "prompt_tokens": prompt_tokens}


def model_geometry(model_path: str) -> tuple[int, int, int]:
    with open(os.path.join(model_path, "config.json")) as f:
        config = json.load(f)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return head_dim, config["num_key_value_heads"], config["num_hidden_layers"]


def agreement(dense: list[int], spark: list[int]) -> int:
    """Leading tokens of a greedy answer that match."""
    same = 0
    for a, b in zip(dense, spark):
        if a != b:
            break
        same += 1
    return same


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None, help="model to serve (default: the embedded tiny Llama)")
    parser.add_argument("--key-ratio", type=float, default=0.5)
    parser.add_argument("--value-ratio", type=float, default=0.0)
    parser.add_argument("--recovery", default="mean", choices=["mean", "zero"])
    parser.add_argument("--turns", type=int, default=3, choices=range(1, len(TURNS) + 1))
    parser.add_argument("--max-new-tokens", type=int, default=12)
    args = parser.parse_args(argv)
    config = SparKConfig(key_ratio=args.key_ratio, value_ratio=args.value_ratio, recovery=args.recovery)
    model_path = args.model_path or build_tiny_llama()

    dense = converse(model_path, "triton", args.turns, args.max_new_tokens)
    spark = converse(model_path, "spark", args.turns, args.max_new_tokens, spark_key_ratio=config.key_ratio,
                     spark_value_ratio=config.value_ratio, spark_recovery=config.recovery)  # fmt: skip

    head_dim, kv_heads, layers = model_geometry(model_path)
    dtype = torch.float32 if not torch.cuda.is_available() else torch.bfloat16
    sizes = bytes_per_token(config, head_dim, kv_heads, layers, dtype, tokens_per_window=TOKENS_PER_WINDOW_ROW)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (Triton interpreter, float32)"
    print(f"\nSparK vs dense SGLang on {os.path.basename(model_path.rstrip('/'))}, {device}")
    print(f"config: key ratio {config.key_ratio}, value ratio {config.value_ratio}, recovery {config.recovery!r}\n")
    print(f"{'':34}{'dense':>12}{'SparK':>12}")
    print(f"{'KV bytes per token (all layers)':34}{sizes['dense']:>12.0f}{sizes['spark_total']:>12.0f}"
          f"   ({sizes['ratio']:.1%} of dense)")  # fmt: skip
    same_budget = int(dense["capacity"] * sizes["dense"] // sizes["spark_total"])
    print(f"{'tokens in the dense pool budget':34}{dense['capacity']:>12}{same_budget:>12}"
          f"   ({same_budget / dense['capacity']:.2f}x)")  # fmt: skip
    print(f"{'tokens SGLang allocated (measured)':34}{dense['capacity']:>12}{spark['capacity']:>12}")
    for turn in range(args.turns):
        same = agreement(dense["answers"][turn], spark["answers"][turn])
        label = f"turn {turn + 1}: cached / prompt tokens"
        print(f"{label:34}{dense['cached'][turn]:>6}/{dense['prompt_tokens'][turn]:<5}"
              f"{spark['cached'][turn]:>6}/{spark['prompt_tokens'][turn]:<5}"
              f"   greedy answer agrees for {same}/{len(dense['answers'][turn])} leading tokens")  # fmt: skip
    if not torch.cuda.is_available():
        print("\nOn CPU each engine's budget is the free host RAM sampled at its start-up, so the measured"
              "\ncapacities move with whatever else runs; bytes per token are exact. The tiny model has random"
              "\nweights: its greedy text diverges at the first changed logit. docs/fidelity.md measures"
              "\nfidelity on real activations.")  # fmt: skip
    return {"dense": dense, "spark": spark, "bytes": sizes}


if __name__ == "__main__":
    main()
