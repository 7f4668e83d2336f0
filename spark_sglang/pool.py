"""``SparKTokenToKVPool``: SGLang's MHA KV pool with keys (and optionally values) stored compact.

One slot is still one row of every buffer, so SGLang's allocators, ``req_to_token`` and the radix
tree move plain slot indices as before. Per layer the pool holds (see ``kernels/layout.py``):

* compressed layers: ``PackedKeys`` (kept values, bitmap, sign bits, fill), values dense or
  ``PackedValues``, and a table of window statistics ``[rows, stats, Hkv, D]`` float32;
* dense layers (``--spark-dense-layers``): SGLang's plain ``[slots, Hkv, D]`` K and V buffers.

``slot_rows [slots]`` int32 (shared by all layers) holds the window row each slot was compressed
with; ``window_rows`` hands rows out and reclaims them (``spark_sglang.window_rows``).
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from sglang.srt.constants import GPU_MEMORY_TYPE_KV_CACHE
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, unwrap_write_loc

from spark_sglang.kernels.layout import SparKConfig
from spark_sglang.kernels.reference import PackedKeys, PackedValues
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
    window_stats: torch.Tensor | None  # [rows, stats, Hkv, D] float32; None for a dense layer

    @property
    def compressed(self) -> bool:
        return self.window_stats is not None


def num_window_rows(size: int) -> int:
    return max(MIN_ROWS, -(-size // TOKENS_PER_WINDOW_ROW))


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    return [t for t in x if t is not None]


def _index(x, loc, device=None):
    """The rows ``loc`` of a dense tensor or of each tensor of a packed tuple (moved to ``device``)."""
    if isinstance(x, torch.Tensor):
        return x[loc].to(device or x.device)
    return type(x)(*(None if t is None else t[loc].to(device or t.device) for t in x))


def _assign(dst, loc, src) -> None:
    for d, s in zip(_tensors(dst), _tensors(src)):
        d[loc] = s.to(d.device, non_blocking=True)


class SparKTokenToKVPool(MHATokenToKVPool):
    """Compact SparK KV pool. ``spark_config`` selects ratios, recovery and dense layers."""

    def __init__(self, size: int, page_size: int, dtype: torch.dtype, head_num: int, head_dim: int,
                 layer_num: int, device: str, enable_memory_saver: bool, *,
                 spark_config: SparKConfig, v_head_dim: int | None = None, **kwargs):  # fmt: skip
        if v_head_dim not in (None, head_dim):
            raise ValueError(
                f"SparK needs equal key and value head dims (got {head_dim} and {v_head_dim}); "
                "serve this model with another attention backend"
            )
        if kwargs.get("quant_method") is not None or kwargs.get("post_capture_active"):
            raise ValueError("SparK's pool does not support a quantized KV cache or post-capture KV sizing")
        self.config = spark_config
        self.layout = spark_config.layout(head_dim, dtype)  # raises on an unsupported head dim / dtype
        self.num_window_rows = num_window_rows(size)
        self.ops = kernel_ops(device)  # Triton kernels on CUDA, the PyTorch path elsewhere
        kwargs.update(enable_kv_cache_copy=False, post_capture_active=False)
        super().__init__(size, page_size, dtype, head_num, head_dim, layer_num, device,
                         enable_memory_saver, v_head_dim=head_dim, **kwargs)  # fmt: skip

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
        rows, heads, dim, words = self.size + self.page_size, self.head_num, self.head_dim, self.layout.words
        mean = self.layout.stores_sign

        def zeros(*shape, dtype=self.dtype):
            return torch.zeros(shape, dtype=dtype, device=self.device)

        self.layers: list[LayerCache] = []
        for local in range(self.layer_num):
            if self.config.is_dense_layer(self.start_layer + local):
                self.layers.append(LayerCache(zeros(rows, heads, dim), zeros(rows, heads, dim), None))
                continue
            keys = PackedKeys(
                kept=zeros(rows, heads, self.layout.key_kept),
                mask=zeros(rows, heads, words, dtype=torch.int32),
                sign=zeros(rows, heads, words, dtype=torch.int32) if mean else None,
                fill=zeros(rows, heads, dtype=torch.float32) if mean else None,
            )
            if self.layout.values_compressed:
                values = PackedValues(
                    kept=zeros(rows, heads, self.layout.value_kept),
                    mask=zeros(rows, heads, words, dtype=torch.int32),
                    fill=zeros(rows, heads, dtype=torch.float32),
                )
            else:
                values = zeros(rows, heads, dim)
            stats = zeros(self.num_window_rows, self.layout.stats_per_window_row, heads, dim, dtype=torch.float32)
            self.layers.append(LayerCache(keys, values, stats))
        self.slot_rows = zeros(rows, dtype=torch.int32)

    def _dense_view(self, storage) -> torch.Tensor:
        if isinstance(storage, torch.Tensor):
            return storage
        shape = (self.size + self.page_size, self.head_num, self.head_dim)
        return torch.empty(shape, dtype=self.dtype, device="meta")

    def _clear_buffers(self):
        del self.layers, self.slot_rows, self.k_buffer, self.v_buffer

    def layer_cache(self, layer_id: int) -> LayerCache:
        return self.layers[layer_id - self.start_layer]

    def get_kv_size_bytes(self):
        """(key bytes, value bytes): every buffer, side data, window tables and row ids included."""
        k_bytes = self.slot_rows.nbytes
        v_bytes = 0
        for layer in self.layers:
            k_bytes += sum(t.nbytes for t in _tensors(layer.keys))
            k_bytes += layer.window_stats.nbytes if layer.compressed else 0
            v_bytes += sum(t.nbytes for t in _tensors(layer.values))
        return k_bytes, v_bytes

    def bytes_per_slot(self) -> float:
        return sum(self.get_kv_size_bytes()) / (self.size + self.page_size)

    # --- writes --------------------------------------------------------------------------------

    def set_kv_buffer(self, layer, loc_info, cache_k, cache_v, k_scale=None, v_scale=None,
                      layer_id_override=None, dcp_kv_mask=None):  # fmt: skip
        """Compress and store the new tokens' K/V at ``loc`` with the window rows in ``slot_rows``."""
        if k_scale is not None or v_scale is not None or dcp_kv_mask is not None:
            raise ValueError("SparK's pool does not take KV scales or a DCP write mask")
        loc, _, _ = unwrap_write_loc(loc_info)
        layer_id = layer_id_override if layer_id_override is not None else layer.layer_id
        self.store(layer_id, loc, cache_k, cache_v, self.slot_rows[loc])

    def store(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: torch.Tensor):
        """Write K/V at ``loc``, compressed under window ``rows`` (``slot_rows[loc]``, which the
        attention backend computes once per batch instead of once per layer)."""
        cache = self.layer_cache(layer_id)
        k = k.to(self.dtype).view(-1, self.head_num, self.head_dim)
        v = v.to(self.dtype).view(-1, self.head_num, self.head_dim)
        if not cache.compressed:
            cache.keys[loc] = k
            cache.values[loc] = v
            return
        self.ops.compress_and_store(k, v, loc, rows, cache.window_stats, cache.keys, cache.values)

    def move_kv_cache(self, tgt_loc: torch.Tensor, src_loc: torch.Tensor):
        for cache in self.layers:
            _assign(cache.keys, tgt_loc, _index(cache.keys, src_loc))
            _assign(cache.values, tgt_loc, _index(cache.values, src_loc))
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
            keys, values = _index(cache.keys, indices, "cpu"), _index(cache.values, indices, "cpu")
            copy["layers"].append((keys, values, stats))
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
            _assign(cache.keys, indices, keys)
            _assign(cache.values, indices, values)
            if cache.compressed:
                cache.window_stats[new_rows] = stats.to(self.device)
        self.slot_rows[indices] = new_rows[row_of_slot.to(self.device)]

    def _rows_referenced_by_slots(self) -> torch.Tensor:
        # Conservative: freed slots keep their stale row ids, so some dead rows stay live.
        live = torch.zeros(self.num_window_rows, dtype=torch.bool, device=self.device)
        live[self.slot_rows.long()] = True
        return live

    # --- features SparK does not support ---------------------------------------------------------

    def get_contiguous_buf_infos(self):
        raise NotImplementedError("SparK's compact KV pool does not support PD disaggregation transfer")

    def get_device_pool_infos(self):
        raise NotImplementedError("SparK's compact KV pool does not support HiCache / host KV mirrors")
