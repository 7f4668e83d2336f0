"""``SparKHostPool``: HiCache's host tier for the compact SparK pool, byte for byte.

SGLang's ``--enable-hierarchical-cache`` keeps radix nodes evicted from the device pool in host
memory and loads them back on a hit. Its MHA host pools mirror dense ``[slots, Hkv, D]`` K/V
buffers; SparK's device pool holds something else per slot (``spark_sglang/pool.py``): per layer
one key record and one value record (kept entries, bitmap, sign bits, fill; or dense entries on a
dense layer) as raw ``uint8`` rows, plus one int32 window-row id shared by all layers. This host
pool stores exactly those bytes:

* ``records[l]`` ``[size, key_bytes_l + value_bytes_l]`` uint8: layer ``l``'s key record bytes
  then its value record bytes, as the device buffers hold them (one host slot = one token);
* ``row_ids`` ``[size]`` int32: the window-statistics row each slot was compressed under.

The rows' statistics stay in the device pool's per-layer tables. A row that an allocated host
slot references is *pinned*: the device pool's row reclamation counts it as live
(``SparKTokenToKVPool.host_pinned_rows``), so a node loaded back reads the statistics it was
compressed with and attends exactly as before eviction. The pin ends when HiCache frees the host
slot (host eviction), so a full host tier evicts as it does for dense pools.

Copies are plain PyTorch indexing (gather on one side, copy, scatter on the other), so the pool
works on any device, CPU included, and needs neither sgl_kernel's transfer kernels nor a
particular ``--hicache-mem-layout`` (the records' layout is SparK's; the option is kept for
SGLang's bookkeeping). The storage tier (``--hicache-storage-backend``) is refused at start-up:
a page written there would reference window rows that are no longer pinned.
"""

from __future__ import annotations

import logging

import torch
from sglang.srt.mem_cache.pool_host.base import HostKVCache
from sglang.srt.mem_cache.pool_host.common import alloc_with_host_register

from spark_sglang.kernels.layout import ROW_ID_BYTES

logger = logging.getLogger(__name__)


class SparKHostPool(HostKVCache):
    """Host mirror of a ``SparKTokenToKVPool``. Built by HiCache through ``patches/hicache.py``
    with the arguments SGLang gives its MHA host pools."""

    def __init__(self, device_pool, host_to_device_ratio: float, host_size: int, page_size: int, layout: str,
                 pin_memory: bool = True, device: str = "cpu", allocator_type: str = "default", *,
                 device_capacity_tokens: int, start_layer: int, end_layer: int, draft_buffer_infos=(),
                 write_back_staging=None, pool_label: str = "kv", host_token_capacity: int | None = None,
                 **unused):  # fmt: skip
        if draft_buffer_infos:
            raise ValueError("SparK's HiCache host pool does not hold speculative-decoding draft layers")
        self.device_pool = device_pool
        self.layer_num = self.target_layer_num = device_pool.layer_num
        # Bytes per token of each layer's key and value storage, exactly as the device holds them.
        self.widths = [tuple(_row_bytes(buffer) for buffer in cache.storage) for cache in device_pool.layers]
        # Host memory can be pinned only where there is an accelerator to pin it for.
        pin = pin_memory and torch.device(device_pool.device).type == "cuda"
        super().__init__(
            dtype=torch.uint8, device_capacity_tokens=device_capacity_tokens,
            size_per_token=self.get_size_per_token(), start_layer=start_layer, end_layer=end_layer,
            host_to_device_ratio=host_to_device_ratio, host_size=host_size, page_size=page_size,
            layout=layout, pin_memory=pin, device=device, pool_label=pool_label,
            host_token_capacity=host_token_capacity,
        )  # fmt: skip
        device_pool.attach_host_pool(self)
        dense = host_dense_bytes_per_token(device_pool)
        logger.info(
            "SparK HiCache host pool: %d tokens, %.3f GB; %d bytes/token dense, %d bytes/token SparK (%.1f%%): "
            "%.2fx tokens in the same host memory", self.size, self.size * self.size_per_token / 1e9,
            dense, self.size_per_token, 100 * self.size_per_token / dense, dense / self.size_per_token,
        )  # fmt: skip

    # --- buffers -------------------------------------------------------------------------------

    def get_size_per_token(self) -> int:
        return sum(k + v for k, v in self.widths) + ROW_ID_BYTES

    def get_ksize_per_token(self) -> int:
        return sum(k for k, _ in self.widths) + ROW_ID_BYTES

    def init_kv_buffer(self):
        # SGLang's host allocation: registered with CUDA when pinned (HostKVCache.destroy unregisters).
        def empty(*shape, dtype=torch.uint8):
            return alloc_with_host_register(shape, dtype, self.device, self.pin_memory, self.allocator)

        self.records = [empty(self.size, k + v) for k, v in self.widths]
        self.row_ids = empty(self.size, dtype=torch.int32)
        self.row_ids.zero_()  # a slot allocated but not yet written pins a valid (if arbitrary) row
        return [*self.records, self.row_ids]

    # --- window rows ---------------------------------------------------------------------------

    def pinned_rows(self, num_rows: int) -> torch.Tensor:
        """Bool ``[num_rows]`` (CPU): rows referenced by an allocated host slot."""
        pinned = torch.zeros(num_rows, dtype=torch.bool)
        with self.lock:
            used = self.slot_used[: self.size]
            pinned[self.row_ids[used].long()] = True
        return pinned

    # --- transfers -----------------------------------------------------------------------------

    def backup_from_device_all_layer(self, device_pool, host_indices, device_indices, io_backend):
        """Device slots -> host slots, every layer and the window-row ids."""
        src = device_indices.to(device_pool.device).long()
        dst = host_indices.to(self.device).long()
        for records, cache in zip(self.records, device_pool.layers):
            k, v = cache.storage
            staged = torch.cat((k[src].flatten(1), v[src].flatten(1)), dim=1)
            records[dst] = staged.to(self.device)
        self.row_ids[dst] = device_pool.slot_rows[src].to(self.device)

    def load_to_device_per_layer(self, device_pool, host_indices, device_indices, layer_id, io_backend, *,
                                 is_draft: bool = False):  # fmt: skip
        """Host slots -> device slots for one layer; with layer 0 the window-row ids, so that the
        backend (which waits for layer 0 before it reads them) sees them with the first layer."""
        if is_draft or not 0 <= layer_id < self.layer_num:
            return
        src = host_indices.to(self.device).long()
        dst = device_indices.to(device_pool.device).long()
        k, v = device_pool.layers[layer_id].storage
        key_bytes = self.widths[layer_id][0]
        staged = self.records[layer_id][src].to(device_pool.device, non_blocking=self.pin_memory)
        k[dst] = staged[:, :key_bytes].view(-1, *k.shape[1:])
        v[dst] = staged[:, key_bytes:].view(-1, *v.shape[1:])
        if layer_id == 0:
            device_pool.slot_rows[dst] = self.row_ids[src].to(device_pool.device, non_blocking=self.pin_memory)

    # --- the storage tier's flat-page interface (refused at start-up) ----------------------------

    def _no_storage(self, *args, **kwargs):
        raise NotImplementedError(
            "SparK's host pool has no storage-tier pages: its slots reference window rows kept in the "
            "device pool; drop --hicache-storage-backend"
        )

    get_data_page = get_dummy_flat_data_page = set_from_flat_data_page = _no_storage
    get_page_buffer_meta = get_split_heads_page_buffer_meta = _no_storage

    def is_stride_page_aligned(self, page_size_bytes: int = 4096) -> bool:
        return False


def _row_bytes(buffer: torch.Tensor) -> int:
    """Bytes of one slot's row of a device buffer ``[slots, ...]``."""
    return buffer[0].numel() * buffer.element_size()


def host_dense_bytes_per_token(device_pool) -> int:
    """What SGLang's dense MHA host pool would store per token for this geometry."""
    return 2 * device_pool.layer_num * device_pool.head_num * device_pool.head_dim * device_pool.layout.esize
