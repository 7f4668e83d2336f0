"""Seam: SGLang builds ``SparKTokenToKVPool`` instead of its MHA pool, and never bypasses its writes."""

import functools

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from spark_sglang.server_args import BACKEND_NAME, spark_config


def spark_enabled() -> bool:
    from sglang.srt.runtime_context import attention_backends

    return BACKEND_NAME in tuple(attention_backends())


def _resolve_kv_pool_class(original, self, *, kind, default):
    pool_class = original(self, kind=kind, default=default)
    if kind != "mha" or not spark_enabled():
        return pool_class
    from spark_sglang.patches.hicache import host_tier
    from spark_sglang.pool import SparKTokenToKVPool

    return functools.partial(SparKTokenToKVPool, spark_config=spark_config(self.server_args),
                             host_tier=host_tier(self.server_args))  # fmt: skip


def _enable_fused_set_kv_buffer(original, *args, **kwargs):
    # Fused RoPE+KV-write kernels write dense K/V straight into the pool's buffers.
    from sglang.srt.model_executor.forward_context import get_token_to_kv_pool

    from spark_sglang.pool import SparKTokenToKVPool

    if isinstance(get_token_to_kv_pool(), SparKTokenToKVPool):
        return False
    return original(*args, **kwargs)


def install() -> None:
    HookRegistry.register(
        "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._resolve_kv_pool_class",
        _resolve_kv_pool_class, HookType.AROUND,
    )  # fmt: skip
    HookRegistry.register(
        "sglang.srt.models.utils.enable_fused_set_kv_buffer", _enable_fused_set_kv_buffer, HookType.AROUND
    )
