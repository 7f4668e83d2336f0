"""SparK configuration and the compact per-token KV layout it implies, described once.

A compressed layer stores, per slot (one token) and KV head, one **key record** of ``R`` bytes
(``R`` a multiple of 16, so a record is one aligned, vectorisable run of memory):

=================  ============================  =================================================
part               bytes at its offset           meaning
=================  ============================  =================================================
``kept``           ``T * e`` at 0                kept key entries in channel order, in the cache
                                                 dtype (``e`` bytes each); FP8 caches store
                                                 ``k / k_scale`` saturated to the format's range
``mask``           ``D / 8`` at ``align4(T*e)``  int32 words: bit ``c % 32`` of word ``c // 32``
                                                 set = channel ``c`` kept (``T`` bits set)
``sign``           ``4 * ceil(P / 32)``          int32 words, "mean" recovery only: bit ``i`` set
                                                 = the ``i``-th pruned channel (ascending) had a
                                                 key ``<= 0`` (or NaN)
``fill``           2                             bfloat16 ``sqrt(mean pruned saliency)``, "mean" only
(padding)          up to a multiple of 16
=================  ============================  =================================================

``T = D - P`` with ``P = int(key_ratio * D)`` pruned channels, fixed per configuration, so one slot
is one row of every buffer: SGLang's allocator, ``req_to_token`` and radix tree keep moving plain
slot indices. Values are SGLang's dense ``[D]`` entries unless ``value_ratio > 0``; then a **value
record**: ``kept`` (``Tv * e``), ``mask`` (``D / 8``), bfloat16 ``fill`` (the mean of the pruned
values), padded to 16 bytes.

Every slot also holds one int32 window-row id (shared by all layers) into a small per-layer table
of window statistics ``[rows, stats, Hkv, D]`` (bfloat16): the query channel norm ``Qn`` that
chooses and recovers a token's key channels (and the value channel bias when values are pruned).
Rows are per compression event (one request's extend), not per token.

``SlotLayout`` computes the offsets; the pool allocates records as ``uint8`` and hands the kernels
typed views of each part (``key_views``), so reference, pool, kernels and byte accounting share
this one description.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable

import torch

RECOVERY_MODES = ("mean", "zero")
SUPPORTED_HEAD_DIMS = (32, 64, 128, 256)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32) + FP8_DTYPES
BITS_PER_WORD = 32
#: Records start at multiples of this many bytes (one 128-bit load).
RECORD_ALIGN = 16
#: The fills' storage type: 16 bits with float32's range (a fill is ``sqrt`` of a saliency).
FILL_DTYPE = torch.bfloat16
#: Storage type of the window-statistics tables.
STATS_DTYPE = torch.bfloat16
#: Bytes of the per-slot window row id (int32), shared by all layers.
ROW_ID_BYTES = 4


def _align(offset: int, to: int) -> int:
    return -(-offset // to) * to


def _ratio_error(field: str, value) -> ValueError:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return ValueError(
            f"SparK option {field}={value!r} is a {type(value).__name__}, not a number: it is the fraction "
            f"of channels pruned per token, a float with 0 <= {field} < 1 (e.g. 0.5 or 0.8)"
        )
    return ValueError(
        f"SparK option {field}={value!r} is out of range: it is the fraction of channels pruned per "
        f"token and must satisfy 0 <= {field} < 1 (e.g. 0.5 or 0.8)"
    )


def parse_dense_layers(spec: str | Iterable[int] | None) -> tuple[int, ...]:
    """``"0,1,31"`` / ``[0, 1]`` / ``None`` -> sorted tuple of layer ids kept dense."""
    if spec is None or spec == "":
        return ()
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    try:
        layers = sorted({int(x) for x in items})
    except (TypeError, ValueError):
        raise ValueError(
            f"SparK option dense_layers={spec!r} is not a list of layer indices: "
            "give comma-separated integers such as '0,1,31'"
        ) from None
    if any(layer < 0 for layer in layers):
        raise ValueError(f"SparK option dense_layers={spec!r} has a negative layer index")
    return tuple(layers)


@dataclass(frozen=True)
class SparKConfig:
    """What SparK does to the KV cache. Validates itself on construction.

    key_ratio:    fraction of key channels pruned per token-head (``lambda``).
    value_ratio:  fraction of value channels pruned per token-head (0 keeps values dense).
    window:       number of last prompt queries that score the key channels.
    recovery:     ``"mean"`` (SparK's released default) or ``"zero"`` (ThinK-style zero fill).
    dense_layers: layer indices whose KV stays dense.
    reproducible: each extend's last query (the one whose logits pick the next token) reads the
                  cache as stored, its own prompt compressed, as a decode step does; then a
                  request that recomputes only the tail of a cached prompt (a resent prompt,
                  parallel samples) reproduces the cold run. Off: that query reads its own
                  extend dense, as every other prompt query does (better first tokens).
    """

    key_ratio: float = 0.5
    value_ratio: float = 0.0
    window: int = 32
    recovery: str = "mean"
    dense_layers: tuple[int, ...] = ()
    reproducible: bool = False

    def __post_init__(self):
        for field in ("key_ratio", "value_ratio"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise _ratio_error(field, value)
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(
                f"SparK option window={self.window!r} must be a positive integer, not a "
                f"{type(self.window).__name__} (the number of last prompt queries that score channels; "
                "the paper uses 32)"
            )
        if self.recovery not in RECOVERY_MODES:
            raise ValueError(
                f"SparK option recovery={self.recovery!r} is unknown: use one of {RECOVERY_MODES}"
            )
        if not isinstance(self.reproducible, bool):
            raise ValueError(f"SparK option reproducible={self.reproducible!r} must be True or False")
        object.__setattr__(self, "dense_layers", parse_dense_layers(self.dense_layers))

    def replace(self, **changes) -> "SparKConfig":
        return dataclasses.replace(self, **changes)

    def layout(self, head_dim: int, dtype: torch.dtype) -> "SlotLayout":
        return SlotLayout.build(self, head_dim, dtype)

    def is_dense_layer(self, layer_id: int) -> bool:
        return layer_id in self.dense_layers


@dataclass(frozen=True)
class SlotLayout:
    """Sizes and byte offsets of the compact records for one head dim and cache dtype."""

    head_dim: int
    dtype: torch.dtype  # the cache's storage dtype for kept (and dense) entries
    key_kept: int  # T
    value_kept: int  # Tv (== head_dim when values are dense)
    recovery: str
    values_compressed: bool

    @staticmethod
    def build(config: SparKConfig, head_dim: int, dtype: torch.dtype) -> "SlotLayout":
        if head_dim not in SUPPORTED_HEAD_DIMS:
            raise ValueError(
                f"SparK does not support head_dim={head_dim}: the compact layout and kernels handle "
                f"head dims {SUPPORTED_HEAD_DIMS}; serve this model with another attention backend"
            )
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"SparK does not support KV cache dtype {dtype}: use float16, bfloat16, float32 or an "
                "FP8 cache (--kv-cache-dtype fp8_e4m3 / fp8_e5m2)"
            )
        return SlotLayout(
            head_dim=head_dim,
            dtype=dtype,
            key_kept=head_dim - int(config.key_ratio * head_dim),
            value_kept=head_dim - int(config.value_ratio * head_dim),
            recovery=config.recovery,
            values_compressed=int(config.value_ratio * head_dim) > 0,
        )

    # --- counts ---------------------------------------------------------------------------------

    @property
    def words(self) -> int:
        """int32 words of a channel bitmap."""
        return self.head_dim // BITS_PER_WORD

    @property
    def key_pruned(self) -> int:
        return self.head_dim - self.key_kept

    @property
    def value_pruned(self) -> int:
        return self.head_dim - self.value_kept

    @property
    def stores_sign(self) -> bool:
        return self.recovery == "mean"

    @property
    def sign_words(self) -> int:
        """int32 words of sign bits (one bit per pruned key channel; "mean" only)."""
        return -(-self.key_pruned // BITS_PER_WORD) if self.stores_sign else 0

    @property
    def is_fp8(self) -> bool:
        return self.dtype in FP8_DTYPES

    @property
    def esize(self) -> int:
        return self.dtype.itemsize

    # --- key record -------------------------------------------------------------------------------

    @property
    def key_mask_offset(self) -> int:
        return _align(self.key_kept * self.esize, 4)

    @property
    def key_sign_offset(self) -> int:
        return self.key_mask_offset + 4 * self.words

    @property
    def key_fill_offset(self) -> int:
        return self.key_sign_offset + 4 * self.sign_words

    @property
    def key_record_bytes(self) -> int:
        end = self.key_fill_offset + (FILL_DTYPE.itemsize if self.stores_sign else 0)
        return _align(end, RECORD_ALIGN)

    # --- value record (values_compressed only) ----------------------------------------------------

    @property
    def value_mask_offset(self) -> int:
        return _align(self.value_kept * self.esize, 4)

    @property
    def value_fill_offset(self) -> int:
        return self.value_mask_offset + 4 * self.words

    @property
    def value_record_bytes(self) -> int:
        return _align(self.value_fill_offset + FILL_DTYPE.itemsize, RECORD_ALIGN)

    # --- bytes -------------------------------------------------------------------------------------

    def key_bytes_per_head(self) -> int:
        return self.key_record_bytes

    def value_bytes_per_head(self) -> int:
        return self.value_record_bytes if self.values_compressed else self.head_dim * self.esize

    @property
    def stats_per_window_row(self) -> int:
        """Statistics per window row, layer and head: key channel norm (+ value bias)."""
        return 2 if self.values_compressed else 1

    def window_row_bytes_per_head(self) -> int:
        return self.stats_per_window_row * self.head_dim * STATS_DTYPE.itemsize

    def dense_bytes_per_head(self) -> int:
        return 2 * self.head_dim * self.esize


def bytes_per_token(
    config: SparKConfig,
    head_dim: int,
    num_kv_heads: int,
    num_layers: int,
    dtype: torch.dtype,
    tokens_per_window: int | None = None,
) -> dict[str, float]:
    """Every byte stored per token, summed over layers and KV heads, next to the dense figure.

    ``tokens_per_window``: average number of tokens compressed under one window-statistics row;
    when given, the tables' cost is amortised over it and included in ``spark_total``.
    """
    layout = config.layout(head_dim, dtype)
    dense_layers = sum(1 for layer in range(num_layers) if config.is_dense_layer(layer))
    sparse_layers = num_layers - dense_layers
    dense = num_layers * num_kv_heads * layout.dense_bytes_per_head()
    keys = sparse_layers * num_kv_heads * layout.key_bytes_per_head()
    values = sparse_layers * num_kv_heads * layout.value_bytes_per_head()
    dense_part = dense_layers * num_kv_heads * layout.dense_bytes_per_head()
    window_row = sparse_layers * num_kv_heads * layout.window_row_bytes_per_head()
    spark = keys + values + dense_part + ROW_ID_BYTES
    result = {
        "dense": float(dense),
        "spark_keys": float(keys),
        "spark_values": float(values),
        "dense_layers": float(dense_part),
        "row_id": float(ROW_ID_BYTES),
        "window_row_bytes": float(window_row),
        "spark": float(spark),
    }
    if tokens_per_window:
        result["spark_total"] = spark + window_row / tokens_per_window
    result["ratio"] = result.get("spark_total", spark) / dense
    return result


# ---------------------------------------------------------------------------------------------
# Typed views of records
# ---------------------------------------------------------------------------------------------


def _part(records: torch.Tensor, offset: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
    """Bytes ``[offset, offset + nbytes)`` of every record ``[..., R]`` as ``[..., nbytes / e]`` of dtype."""
    return records[..., offset : offset + nbytes].view(dtype)


def key_views(layout: SlotLayout, records: torch.Tensor):
    """``(kept, mask, sign, fill)`` views into key records ``[S, H, R]`` uint8: ``kept [S, H, T]``
    (cache dtype), ``mask [S, H, D/32]`` int32, and for "mean" ``sign [S, H, ceil(P/32)]`` int32 and
    ``fill [S, H]`` bfloat16 (else None, None)."""
    kept = _part(records, 0, layout.key_kept * layout.esize, layout.dtype)
    mask = _part(records, layout.key_mask_offset, 4 * layout.words, torch.int32)
    if not layout.stores_sign:
        return kept, mask, None, None
    sign = _part(records, layout.key_sign_offset, 4 * layout.sign_words, torch.int32)
    fill = _part(records, layout.key_fill_offset, FILL_DTYPE.itemsize, FILL_DTYPE)[..., 0]
    return kept, mask, sign, fill


def value_views(layout: SlotLayout, records: torch.Tensor):
    """``(kept, mask, fill)`` views into value records ``[S, H, R]`` uint8."""
    kept = _part(records, 0, layout.value_kept * layout.esize, layout.dtype)
    mask = _part(records, layout.value_mask_offset, 4 * layout.words, torch.int32)
    fill = _part(records, layout.value_fill_offset, FILL_DTYPE.itemsize, FILL_DTYPE)[..., 0]
    return kept, mask, fill
