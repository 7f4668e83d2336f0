"""Equal-bytes arithmetic: every method's KV bytes per context token, side data included.

All figures are bytes per token summed over layers and KV heads (what an engine's
``cell_size`` is), for a cache of ``kv_dtype`` (16-bit by default: the serving case; the harness
computes attention in float32 regardless). ``tokens_per_event`` is the number of tokens compressed
under one window (the context length in this harness): per-event tables are amortised over it.

* **Dense**: ``L * Hkv * 2 * D * esize``.
* **SparK** (``key_ratio``, ``value_ratio``, ``recovery``): :func:`kernels.layout.bytes_per_token`,
  i.e. ``SparKConfig(...).layout(D, dtype).key_bytes_per_head() + value_bytes_per_head()`` per
  layer-head (kept entries, channel bitmap, sign bits and fill scale for "mean", value fill), plus
  the 4-byte window row id per token and the window-statistics rows amortised per event.
* **ThinK** (structured, zero fill, values dense): kept key channels ``T * esize`` + dense values
  per layer-head; its side data is one ``D/8``-byte channel mask per layer-head per event (amortised)
  and, counted like SparK's, a 4-byte row id per token telling which event's mask a slot uses.
* **Token eviction** (SnapKV): a kept token stores dense K and V. Kept sets differ per head but
  every head keeps the same number, so a per-head contiguous cache (kvpress / Hugging Face style)
  needs no index: attention is a set operation over post-RoPE keys. ``index_bytes`` (per kept
  token-head) charges for an explicit index instead, e.g. 4 for an int32 per-head slot table in a
  paged engine. Bytes per *context* token = ``keep_fraction * (dense + L * Hkv * index_bytes)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spark_sglang.kernels.layout import ROW_ID_BYTES, SparKConfig, bytes_per_token


def _esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class CacheShape:
    """The KV cache geometry the bytes are counted for."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_dtype: torch.dtype = torch.bfloat16

    @property
    def heads(self) -> int:
        """Layer-heads: ``L * Hkv``."""
        return self.num_layers * self.num_kv_heads

    def dense(self) -> float:
        return float(self.heads * 2 * self.head_dim * _esize(self.kv_dtype))


def spark_bytes(
    shape: CacheShape,
    key_ratio: float,
    value_ratio: float = 0.0,
    recovery: str = "mean",
    tokens_per_event: int | None = None,
) -> float:
    """SparK bytes per token, all side data included (``spark_total`` of ``bytes_per_token``)."""
    config = SparKConfig(key_ratio=key_ratio, value_ratio=value_ratio, recovery=recovery)
    counted = bytes_per_token(
        config, shape.head_dim, shape.num_kv_heads, shape.num_layers, shape.kv_dtype,
        tokens_per_window=tokens_per_event,
    )
    return counted.get("spark_total", counted["spark"])


def think_bytes(shape: CacheShape, key_ratio: float, tokens_per_event: int | None = None) -> float:
    """ThinK (structured key-channel pruning, zero fill, dense values) bytes per token."""
    d, esize = shape.head_dim, _esize(shape.kv_dtype)
    kept = d - int(key_ratio * d)
    per_token = shape.heads * (kept + d) * esize + ROW_ID_BYTES
    mask_table = shape.heads * d / 8
    return float(per_token + (mask_table / tokens_per_event if tokens_per_event else 0.0))


def eviction_bytes(shape: CacheShape, keep_fraction: float, index_bytes: float = 0.0) -> float:
    """Token eviction bytes per context token when ``keep_fraction`` of tokens stay (dense)."""
    return keep_fraction * (shape.dense() + shape.heads * index_bytes)


def eviction_fraction(shape: CacheShape, target_bytes: float, index_bytes: float = 0.0) -> float:
    """Fraction of tokens eviction may keep to spend ``target_bytes`` per context token."""
    return min(1.0, target_bytes / (shape.dense() + shape.heads * index_bytes))


def eviction_keep_count(num_tokens: int, keep_fraction: float) -> int:
    """Tokens kept per head out of ``num_tokens``: nearest integer, at least 1."""
    return max(1, min(num_tokens, int(round(keep_fraction * num_tokens))))
