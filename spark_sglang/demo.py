"""Main job: what SparK stores per token and what it costs in attention error.

Runs the PyTorch reference on Llama-3.1-8B head geometry (32 layers, 8 KV heads, head dim 128,
bf16) with keys that have the outlier channels real post-RoPE keys show, and prints bytes per
token dense vs SparK next to the decode-attention error of held-out queries.
"""

from __future__ import annotations

import torch

from spark_sglang.kernels import reference as R
from spark_sglang.kernels.layout import SparKConfig

LAYERS, KV_HEADS, Q_HEADS, HEAD_DIM, DTYPE = 32, 8, 32, 128, torch.bfloat16


def synthetic_layer(seed: int, tokens: int = 1024, window: int = 32):
    """Keys/queries with a few large channels per head (as RoPE'd keys have), values Gaussian."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(KV_HEADS, HEAD_DIM, generator=g))  # log-normal channel scales
    k = torch.randn(tokens, KV_HEADS, HEAD_DIM, generator=g) * scale
    v = torch.randn(tokens, KV_HEADS, HEAD_DIM, generator=g)
    q_scale = scale.repeat_interleave(Q_HEADS // KV_HEADS, dim=0)
    queries = torch.randn(window + 16, Q_HEADS, HEAD_DIM, generator=g) * q_scale / HEAD_DIM**0.5
    return k.to(DTYPE), v.to(DTYPE), queries[:window].to(DTYPE), queries[window:].to(DTYPE)


def attention_error(config: SparKConfig, layer) -> float:
    k, v, window, held_out = layer
    sm_scale = HEAD_DIM**-0.5
    full, _ = R.attention(held_out, k, v, sm_scale)
    k_sim = R.simulate_keys(k, window, config.key_ratio, config.recovery)
    v_sim = R.simulate_values(v, config.value_ratio)
    approx, _ = R.attention(held_out, k_sim, v_sim, sm_scale)
    return float((approx - full).norm() / full.norm())


def main() -> None:
    layer = synthetic_layer(seed=0)
    print(f"SparK on Llama-3.1-8B geometry ({LAYERS} layers x {KV_HEADS} KV heads x D {HEAD_DIM}, bf16)")
    print(f"{'config':<32} {'bytes/token':>12} {'vs dense':>9} {'attn rel. error':>16}")
    dense = R.bytes_per_token(SparKConfig(key_ratio=0.0), HEAD_DIM, KV_HEADS, LAYERS, DTYPE)["dense"]
    print(f"{'dense':<32} {dense:>12.0f} {1.0:>9.3f} {0.0:>16.4f}")
    for key_ratio, value_ratio, recovery in [
        (0.5, 0.0, "mean"), (0.8, 0.0, "mean"), (0.8, 0.0, "zero"), (0.5, 0.5, "mean"),
    ]:
        config = SparKConfig(key_ratio=key_ratio, value_ratio=value_ratio, recovery=recovery)
        size = R.bytes_per_token(config, HEAD_DIM, KV_HEADS, LAYERS, DTYPE, tokens_per_window=1024)
        name = f"K {key_ratio} V {value_ratio} {recovery}"
        err = attention_error(config, layer)
        print(f"{name:<32} {size['spark_total']:>12.0f} {size['ratio']:>9.3f} {err:>16.4f}")


if __name__ == "__main__":
    main()
