"""SparK configuration and the compact per-token KV layout it implies.

One KV slot (one token of one layer) holds, per KV head, for keys:

=================  ======================  ===============================================
part               shape per token-head    meaning
=================  ======================  ===============================================
``kept``           ``[T]`` kv dtype         kept key values, in channel order
``mask``           ``[D/32]`` int32         bit ``c`` of word ``c // 32`` set = channel kept
``sign``           ``[D/32]`` int32         bit set = the original key was ``<= 0``
                                            ("mean" recovery only)
``fill``           ``[]`` float32           ``sqrt(mean pruned saliency)`` ("mean" only)
=================  ======================  ===============================================

Values are dense ``[D]`` unless ``value_ratio > 0``; then ``kept [Tv]``, ``mask [D/32]`` and a
float32 ``fill`` (the mean of the pruned values). Every slot also holds one int32 row id (shared by
all layers) into small per-layer tables of window statistics (the query channel norms that chose
and recover its channels); those tables cost per compression event, not per token.

``T = D - int(key_ratio * D)`` is fixed, so a slot is one row: SGLang's allocator, ``req_to_token``
and radix tree keep moving plain slot indices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable

import torch

RECOVERY_MODES = ("mean", "zero")
SUPPORTED_HEAD_DIMS = (32, 64, 128, 256)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BITS_PER_WORD = 32
#: Bytes of the per-slot window row id (int32), shared by all layers.
ROW_ID_BYTES = 4
#: Most float32 statistics a window row holds per layer and KV head: key channel norm, value bias.
WINDOW_STATS = 2


def _ratio_error(field: str, value: float) -> ValueError:
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
    """

    key_ratio: float = 0.5
    value_ratio: float = 0.0
    window: int = 32
    recovery: str = "mean"
    dense_layers: tuple[int, ...] = ()

    def __post_init__(self):
        for field in ("key_ratio", "value_ratio"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise _ratio_error(field, value)
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(
                f"SparK option window={self.window!r} must be a positive integer "
                "(the number of last prompt queries that score channels; the paper uses 32)"
            )
        if self.recovery not in RECOVERY_MODES:
            raise ValueError(
                f"SparK option recovery={self.recovery!r} is unknown: use one of {RECOVERY_MODES}"
            )
        object.__setattr__(self, "dense_layers", parse_dense_layers(self.dense_layers))

    def replace(self, **changes) -> "SparKConfig":
        return dataclasses.replace(self, **changes)

    def layout(self, head_dim: int, dtype: torch.dtype) -> "SlotLayout":
        return SlotLayout.build(self, head_dim, dtype)

    def is_dense_layer(self, layer_id: int) -> bool:
        return layer_id in self.dense_layers


@dataclass(frozen=True)
class SlotLayout:
    """Sizes of the compact layout for one head dim and dtype (see module docstring)."""

    head_dim: int
    dtype: torch.dtype
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
                f"SparK does not support KV dtype {dtype}: use one of float16, bfloat16, float32 "
                "(an FP8 KV cache cannot be combined with SparK)"
            )
        return SlotLayout(
            head_dim=head_dim,
            dtype=dtype,
            key_kept=head_dim - int(config.key_ratio * head_dim),
            value_kept=head_dim - int(config.value_ratio * head_dim),
            recovery=config.recovery,
            values_compressed=int(config.value_ratio * head_dim) > 0,
        )

    @property
    def words(self) -> int:
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

    def key_bytes_per_head(self) -> int:
        esize = self.dtype.itemsize
        side = 4 * self.words + (4 * self.words + 4 if self.stores_sign else 0)
        return self.key_kept * esize + side

    def value_bytes_per_head(self) -> int:
        esize = self.dtype.itemsize
        if not self.values_compressed:
            return self.head_dim * esize
        return self.value_kept * esize + 4 * self.words + 4

    @property
    def stats_per_window_row(self) -> int:
        """float32 statistics per row, layer and head: key channel norm (+ value bias)."""
        return WINDOW_STATS if self.values_compressed else 1

    def dense_bytes_per_head(self) -> int:
        return 2 * self.head_dim * self.dtype.itemsize


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
    window_row = sparse_layers * num_kv_heads * head_dim * 4 * layout.stats_per_window_row
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
