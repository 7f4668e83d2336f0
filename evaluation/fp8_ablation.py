"""Where an FP8 KV cache hurts a model: keys or values, which layers.

``python -m evaluation.fp8_ablation --model qwen2.5-coder-1.5b --corpus python-sources`` runs the
samples of :mod:`.frontier` with SGLang's ``fp8_e4m3`` cast (scale 1) applied to part of the cache
only, the rest kept as the cache receives it (bfloat16), and prints the KL and perplexity change of
each variant beside FP8 everywhere, with the largest key magnitude per layer. It answers why FP8
breaks a model (``docs/frontier.md``) without changing what the frontier measures.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

import torch

from spark_sglang import texts

from . import activations, frontier, quant

#: (label, quantize keys?, quantize values?, layers quantized: None = all, else a predicate on the
#: layer index given the layer count)
Variant = tuple[str, bool, bool, Callable[[int, int], bool] | None]

VARIANTS: tuple[Variant, ...] = (
    ("FP8 keys and values, every layer", True, True, None),
    ("FP8 keys only", True, False, None),
    ("FP8 values only", False, True, None),
    ("FP8 except layer 0", True, True, lambda layer, layers: layer != 0),
    ("FP8 in layer 0 only", True, True, lambda layer, layers: layer == 0),
    ("FP8 except the first and last layer", True, True, lambda layer, layers: 0 < layer < layers - 1),
)


def layer_mask(num_layers: int, num_kv_heads: int, layers: Callable[[int, int], bool] | None) -> torch.Tensor:
    """``[L*Hkv]`` bool: the layer-major heads whose layer is quantized."""
    chosen = [layers is None or layers(layer, num_layers) for layer in range(num_layers)]
    return torch.tensor(chosen).repeat_interleave(num_kv_heads)


def partly_fp8(x: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """``x`` ``[N, L*Hkv, D]`` with the chosen heads cast to FP8 E4M3 and read back."""
    return torch.where(heads[None, :, None], quant.FP8_E4M3.quantize(x), x)


def key_magnitudes(sample: frontier.Sample) -> list[float]:
    """Largest |key| per layer (post-RoPE, float32) over the context."""
    per_head = sample.keys.abs().amax(dim=(0, 2))
    return per_head.view(sample.num_layers, sample.num_kv_heads).amax(dim=1).tolist()


def run(model, samples: list[frontier.Sample]) -> tuple[dict, list[float]]:
    """{variant label: (KL per sample, perplexity change % per sample)}, key |max| per layer."""
    results = {label: ([], []) for label, *_ in VARIANTS}
    magnitudes = None
    for sample in samples:
        layer_max = key_magnitudes(sample)
        magnitudes = layer_max if magnitudes is None else [max(a, b) for a, b in zip(magnitudes, layer_max)]
        reference = frontier.continuation_logprobs(model, sample, sample.keys, sample.values)
        reference_nll = frontier.mean_nll(sample, reference)
        cache = frontier.CacheInput.of(sample)
        for label, on_keys, on_values, layers in VARIANTS:
            heads = layer_mask(sample.num_layers, sample.num_kv_heads, layers)
            keys = partly_fp8(cache.keys, heads) if on_keys else cache.keys
            values = partly_fp8(cache.values, heads) if on_values else cache.values
            logprobs = frontier.continuation_logprobs(model, sample, keys, values)
            nll = frontier.mean_nll(sample, logprobs)
            results[label][0].append(frontier.mean_kl(reference, logprobs))
            results[label][1].append(100 * (math.exp(nll - reference_nll) - 1))
    return results, magnitudes or []


def table(results: dict, magnitudes: list[float]) -> list[str]:
    lines = ["| FP8 E4M3 (scale 1) applied to | KL, nats/token | perplexity change, % |", "|---|---:|---:|"]
    for label, (kl, ppl) in results.items():
        kl_mean, kl_se = frontier.mean_se(torch.tensor(kl, dtype=torch.float64))
        ppl_mean, ppl_se = frontier.mean_se(torch.tensor(ppl, dtype=torch.float64))
        lines.append(f"| {label} | {kl_mean:.3g} ± {kl_se:.2g} | {ppl_mean:+.2f} ± {ppl_se:.2f} |")
    lines += ["", "Largest |key| per layer (post-RoPE): " + ", ".join(f"{m:.0f}" for m in magnitudes)]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluation.fp8_ablation", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="a name of evaluation.activations.MODEL_NAMES or a folder")
    p.add_argument("--corpus", default="licenses", choices=["licenses", "python-sources"])
    p.add_argument("--contexts", type=int, default=2)
    p.add_argument("--context-len", type=int, default=frontier.DEFAULTS["context_len"])
    p.add_argument("--continuation-len", type=int, default=frontier.DEFAULTS["continuation_len"])
    p.add_argument("--window", type=int, default=frontier.DEFAULTS["window"])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    path, name = activations.resolve_model(args.model)
    lm = activations.load_causal_lm(path)
    documents = texts.load_documents(texts.corpus_paths(args.corpus))
    samples = list(frontier.iter_samples(lm, documents, args.context_len, args.continuation_len,
                                         args.window, args.contexts))
    results, magnitudes = run(lm.model, samples)
    print(f"{name}: {len(samples)} samples ({', '.join(s.source for s in samples)})")
    print("\n".join(table(results, magnitudes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
