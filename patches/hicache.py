"""Seam: HiCache (``--enable-hierarchical-cache``) keeps SparK's compact records in host memory.

SGLang builds the host mirror of an MHA device pool from ``_mha_host_inputs(pool)``: the host pool
class and the dense K/V buffer description it copies. For the SparK pool this returns
``SparKHostPool`` and the pool itself (``spark_sglang/host_pool.py``), so evicted radix nodes are
kept byte for byte (records and window-row ids) and loaded back exactly. Everything else in
HiCache (the radix tree's host nodes, the controller, its streams and write policies, host
eviction) is SGLang's own.

``SPARK_SGLANG_HICACHE_RESERVE_GIB``: host RAM HiCache leaves free for the OS when it sizes the host
tier (SGLang's fixed 10 GiB otherwise; it refuses a host tier that would cut into it). For small
machines, such as the 24 GiB CPU machines the CI runs HiCache engines on.
"""

import os

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

TARGET = "sglang.srt.mem_cache.hybrid_cache.hybrid_pool_assembler._mha_host_inputs"


def _mha_host_inputs(original, pool, drafts=()):
    from spark_sglang.host_pool import SparKHostPool
    from spark_sglang.pool import SparKTokenToKVPool

    if not isinstance(pool, SparKTokenToKVPool):
        return original(pool, drafts)
    return SparKHostPool, pool, dict(
        device_capacity_tokens=pool.size if pool.host_capacity_tokens is None else pool.host_capacity_tokens,
        start_layer=pool.start_layer,
        end_layer=pool.end_layer,
        draft_buffer_infos=tuple(drafts),
    )


def host_tier(server_args) -> tuple[float, float] | None:
    """``(hicache_ratio, hicache_size GB)`` when HiCache is on, else None: the SparK pool provisions
    window rows for the tokens the host tier will hold, as ``HostKVCache`` sizes it."""
    if not getattr(server_args, "enable_hierarchical_cache", False):
        return None
    return float(getattr(server_args, "hicache_ratio", None) or 2.0), float(getattr(server_args, "hicache_size", 0) or 0)


def install() -> None:
    HookRegistry.register(TARGET, _mha_host_inputs, HookType.AROUND)
    reserve_gib = os.environ.get("SPARK_SGLANG_HICACHE_RESERVE_GIB")
    if reserve_gib:
        from sglang.srt.mem_cache.pool_host import base

        base.HICACHE_HOST_MEMORY_RESERVE_BYTES = int(float(reserve_gib) * 1024**3)
