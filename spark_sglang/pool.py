"""``SparKTokenToKVPool``: SGLang's MHA KV pool with keys (and optionally values) stored compact.

One slot is still one row of every buffer, so SGLang's allocators, ``req_to_token`` and the radix
tree move plain slot indices as before. Per layer the pool holds (see ``kernels/layout.py``):

* compressed layers: key records ``[slots, Hkv, R]`` uint8 (read and written through their typed
  ``PackedKeys`` views), values dense ``[slots, Hkv, D]`` or value records (``PackedValues``
  views), and a table of window statistics ``[rows, stats, Hkv, D]`` bfloat16;
* dense layers (``--spark-dense-layers``): SGLang's plain ``[slots, Hkv, D]`` K and V buffers.

An FP8 cache (``--kv-cache-dtype fp8_e4m3`` / ``fp8_e5m2``) stores its kept and dense entries in
FP8 as ``x / k_scale`` (``v_scale`` for values), SGLang's convention, through ``uint8`` storage.

``slot_rows [slots]`` int32 (shared by all layers) holds the window row each slot was compressed
with; ``window_rows`` hands rows out and reclaims them (``spark_sglang.window_rows``).

With HiCache (``spark_sglang/host_pool.py``) evicted slots live on in host memory with their row
ids; the rows they reference stay pinned here, so the tables are provisioned for the host tokens
too (``host_tier``).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from sglang.srt.constants import GPU_MEMORY_TYPE_KV_CACHE
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, unwrap_write_loc

from spark_sglang.kernels.layout import STATS_DTYPE, SparKConfig, bytes_per_token, key_views, value_views
from spark_sglang.kernels.reference import PackedKeys, PackedValues, to_storage
from spark_sglang.kernel_ops import kernel_ops
from spark_sglang.window_rows import WindowRows

logger = logging.getLogger(__name__)

#: Window-statistics rows are provisioned at one per this many slots (and at least MIN_ROWS).
TOKENS_PER_WINDOW_ROW = 128
MIN_ROWS = 256


class LayerCache(NamedTuple):
    """One layer's storage: dense tensors, or the compact layout and its window statistics."""

    keys: PackedKeys | torch.Tensor
    values: PackedValues | torch.Tensor
    window_stats: torch.Tensor | None  # [rows, stats, Hkv, D] bfloat16; None for a dense layer
    storage: tuple[torch.Tensor, torch.Tensor]  # the key and value buffers ``keys``/``values`` view

    @property
    def compressed(self) -> bool:
        return self.window_stats is not None


def num_window_rows(size: int) -> int:
    return max(MIN_ROWS, -(-size // TOKENS_PER_WINDOW_ROW))


def _assign(dst: torch.Tensor, loc, src: torch.Tensor) -> None:
    dst[loc] = src.to(dst.device, non_blocking=True)


class SparKTokenToKVPool(MHATokenToKVPool):
    """Compact SparK KV pool. ``spark_config`` selects ratios, recovery and dense layers."""

    def __init__(self, size: int, page_size: int, dtype: torch.dtype, head_num: int, head_dim: int,
                 layer_num: int, device: str, enable_memory_saver: bool, *,
                 spark_config: SparKConfig, v_head_dim: int | None = None,
                 host_tier: tuple[float, float] | None = None, **kwargs):  # fmt: skip
        if v_head_dim not in (None, head_dim):
            raise ValueError(
                f"SparK needs equal key and value head dims (got {head_dim} and {v_head_dim}); "
                "serve this model with another attention backend"
            )
        if kwargs.get("quant_method") is not None or kwargs.get("post_capture_active"):
            raise ValueError("SparK's pool does not support a quantized KV cache or post-capture KV sizing")
        self.config = spark_config
        self.layout = spark_config.layout(head_dim, dtype)  # raises on an unsupported head dim / dtype
        # Host-resident slots (HiCache) keep their rows pinned here: provision rows for them too.
        self.host_tokens = self._host_tokens(size, host_tier, head_num, layer_num)
        self.num_window_rows = num_window_rows(size + self.host_tokens)
        self.host_pools = []  # SparKHostPool instances whose slots pin window rows
        self.ops = kernel_ops(device)  # Triton kernels on CUDA, the PyTorch path elsewhere
        kwargs.update(enable_kv_cache_copy=False, post_capture_active=False)
        super().__init__(size, page_size, dtype, head_num, head_dim, layer_num, device,
                         enable_memory_saver, v_head_dim=head_dim, **kwargs)  # fmt: skip

    def _host_tokens(self, size: int, host_tier, head_num: int, layer_num: int) -> int:
        """Tokens HiCache's host tier holds (0 without it): ``host_tier = (ratio, size GB)`` sized as
        ``HostKVCache`` does, by GB over the host bytes per token if given, else ratio x device."""
        if host_tier is None:
            return 0
        ratio, size_gb = host_tier
        if size_gb > 0:
            per_token = bytes_per_token(self.config, self.layout.head_dim, head_num, layer_num, self.layout.dtype)
            return int(size_gb * 1e9 // per_token["spark"])  # the records and the row id, as the host stores them
        return int(size * ratio)

    # --- buffers -------------------------------------------------------------------------------

    def _create_buffers(self):
        # In SGLang's memory-saver region, so --enable-memory-saver can release the KV cache.
        with self.memory_saver_adapter.region(GPU_MEMORY_TYPE_KV_CACHE):
            self._create_compact_buffers()
        self.window_rows = WindowRows(self.num_window_rows)
        # SGLang's shape probes (e.g. the Triton backend's v_head_dim) read k_buffer / v_buffer:
        # dense layers give their tensors, compressed layers a storage-less tensor of the dense shape.
        self.k_buffer = [self._dense_view(layer.keys) for layer in self.layers]
        self.v_buffer = [self._dense_view(layer.values) for layer in self.layers]
        self.k_scale_buffer = self.v_scale_buffer = None
        self.native_k_scale_buffer = self.native_v_scale_buffer = None
        self.dq_k_buffer = self.dq_v_buffer = None

    def _create_compact_buffers(self):
        rows, heads, dim, layout = self.size + self.page_size, self.head_num, self.head_dim, self.layout

        def zeros(*shape, dtype=torch.uint8):
            return torch.zeros(shape, dtype=dtype, device=self.device)

        def dense():  # [rows, Hkv, D] in the cache dtype; FP8 through uint8 storage
            raw = zeros(rows, heads, dim * layout.esize)
            return raw, raw.view(self.dtype)

        self.layers: list[LayerCache] = []
        for local in range(self.layer_num):
            if self.config.is_dense_layer(self.start_layer + local):
                (k_raw, k), (v_raw, v) = dense(), dense()
                self.layers.append(LayerCache(k, v, None, (k_raw, v_raw)))
                continue
            k_raw = zeros(rows, heads, layout.key_record_bytes)
            keys = PackedKeys(*key_views(layout, k_raw))
            if layout.values_compressed:
                v_raw = zeros(rows, heads, layout.value_record_bytes)
                values = PackedValues(*value_views(layout, v_raw))
            else:
                v_raw, values = dense()
            stats = zeros(self.num_window_rows, layout.stats_per_window_row, heads, dim, dtype=STATS_DTYPE)
            self.layers.append(LayerCache(keys, values, stats, (k_raw, v_raw)))
        self.slot_rows = zeros(rows, dtype=torch.int32)

    def _dense_view(self, storage) -> torch.Tensor:
        if isinstance(storage, torch.Tensor):
            return storage
        shape = (self.size + self.page_size, self.head_num, self.head_dim)
        return torch.empty(shape, dtype=self.dtype, device="meta")

    def _clear_buffers(self):
        del self.layers, self.slot_rows, self.k_buffer, self.v_buffer

    def layer_cache(self, layer_id: int) -> LayerCache:
        """One layer's storage. With HiCache, first waits (on the current stream) until a load
        from host memory in flight has written this layer, as SGLang's pools do."""
        self.wait_for_layer(layer_id)
        return self.layers[layer_id - self.start_layer]

    def wait_for_layer(self, layer_id: int) -> None:
        if self.layer_transfer_counter is not None:
            self.layer_transfer_counter.wait_until(layer_id - self.start_layer)

    def get_kv_size_bytes(self):
        """(key bytes, value bytes): every buffer, side data, window tables and row ids included."""
        k_bytes = self.slot_rows.nbytes
        v_bytes = 0
        for layer in self.layers:
            k_bytes += layer.storage[0].nbytes + (layer.window_stats.nbytes if layer.compressed else 0)
            v_bytes += layer.storage[1].nbytes
        return k_bytes, v_bytes

    def bytes_per_slot(self) -> float:
        return sum(self.get_kv_size_bytes()) / (self.size + self.page_size)

    # --- writes --------------------------------------------------------------------------------

    def set_kv_buffer(self, layer, loc_info, cache_k, cache_v, k_scale=None, v_scale=None,
                      layer_id_override=None, dcp_kv_mask=None):  # fmt: skip
        """Compress and store the new tokens' K/V at ``loc`` with the window rows in ``slot_rows``."""
        if dcp_kv_mask is not None:
            raise ValueError("SparK's pool does not take a DCP write mask")
        loc, _, _ = unwrap_write_loc(loc_info)
        layer_id = layer_id_override if layer_id_override is not None else layer.layer_id
        self.store(layer_id, loc, cache_k, cache_v, self.slot_rows[loc], _scale(k_scale), _scale(v_scale))

    def store(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor,
              k_scale: float = 1.0, v_scale: float = 1.0):  # fmt: skip
        """Write K/V at ``loc``, compressed under window ``rows`` (``slot_rows[loc]``, which the
        attention backend computes once per batch instead of once per layer). FP8 caches store
        ``k / k_scale`` and ``v / v_scale``."""
        cache = self.layer_cache(layer_id)
        k = k.view(-1, self.head_num, self.head_dim)
        v = v.view(-1, self.head_num, self.head_dim)
        if not cache.compressed:
            cache.keys[loc] = to_storage(k, self.dtype, k_scale)
            cache.values[loc] = to_storage(v, self.dtype, v_scale)
            return
        self.ops.compress_and_store(k, v, loc, rows, cache.window_stats, cache.keys, cache.values,
                                    k_scale=k_scale, v_scale=v_scale)  # fmt: skip

    def move_kv_cache(self, tgt_loc: torch.Tensor, src_loc: torch.Tensor):
        for cache in self.layers:
            for buffer in cache.storage:
                buffer[tgt_loc] = buffer[src_loc]
        self.slot_rows[tgt_loc] = self.slot_rows[src_loc]

    # --- retraction: CPU copy and reload ---------------------------------------------------------

    def get_cpu_copy(self, indices, mamba_indices=None, req_pool_index=None):
        """Compact entries of ``indices`` and the window rows they use, on the CPU.

        The rows' statistics travel with the copy: while it is away its rows may be reclaimed.
        """
        rows, row_of_slot = torch.unique(self.slot_rows[indices], return_inverse=True)
        copy = {"row_of_slot": row_of_slot.cpu(), "layers": []}
        for cache in self.layers:
            stats = cache.window_stats[rows].cpu() if cache.compressed else None
            copy["layers"].append(tuple(buffer[indices].cpu() for buffer in cache.storage) + (stats,))
        return copy

    def load_cpu_copy(self, kv_cache_cpu, indices, mamba_indices=None, req_pool_index=None):
        """Write a CPU copy back at ``indices``, under freshly allocated window rows."""
        row_of_slot = kv_cache_cpu["row_of_slot"]
        count = int(row_of_slot.max()) + 1 if row_of_slot.numel() else 0
        rows, fresh = self.window_rows.allocate(count, self._rows_referenced_by_slots)
        if not all(fresh):  # borrowed statistics would recover these keys wrongly: refuse
            raise RuntimeError(
                "SparK: no free window-statistics row to reload a retracted request; "
                "raise the pool size or lower concurrency"
            )
        new_rows = torch.tensor(rows, dtype=torch.int32, device=self.device)
        for cache, (keys, values, stats) in zip(self.layers, kv_cache_cpu["layers"]):
            _assign(cache.storage[0], indices, keys)
            _assign(cache.storage[1], indices, values)
            if cache.compressed:
                cache.window_stats[new_rows] = stats.to(self.device)
        self.slot_rows[indices] = new_rows[row_of_slot.to(self.device)]

    def _rows_referenced_by_slots(self) -> torch.Tensor:
        # Conservative: freed slots keep their stale row ids, so some dead rows stay live.
        live = torch.zeros(self.num_window_rows, dtype=torch.bool, device=self.device)
        live[self.slot_rows.long()] = True
        return live | self.host_pinned_rows()

    # --- HiCache host tier -----------------------------------------------------------------------

    def attach_host_pool(self, host_pool) -> None:
        """Register a host pool whose allocated slots pin the window rows they reference."""
        self.host_pools.append(host_pool)

    def host_pinned_rows(self) -> torch.Tensor:
        """Bool ``[num_window_rows]``: rows referenced by slots held in host memory."""
        pinned = torch.zeros(self.num_window_rows, dtype=torch.bool)
        for host_pool in self.host_pools:
            pinned |= host_pool.pinned_rows(self.num_window_rows)
        return pinned.to(self.device)

    # --- features SparK does not support ---------------------------------------------------------

    def get_contiguous_buf_infos(self):
        raise NotImplementedError("SparK's compact KV pool does not support PD disaggregation transfer")

    def get_device_pool_infos(self):
        # SGLang's dense host pools read these; SparK's host pool (host_pool.py) reads the records.
        raise NotImplementedError("SparK's compact KV pool has no dense K/V buffers for SGLang's MHA host pools")


def _scale(scale) -> float:
    """SGLang passes a layer's ``k_scale`` / ``v_scale`` as None, a float or a 1-element tensor."""
    if scale is None:
        return 1.0
    return float(scale.item()) if isinstance(scale, torch.Tensor) else float(scale)
