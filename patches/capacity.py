"""Seam: SGLang sizes the KV pool with SparK's compact bytes per token.

``max_total_num_tokens = available bytes // cell size``: a smaller cell gives more tokens in the
same ``--mem-fraction-static``. The cell counts every byte the pool stores per slot, window rows
amortised at the rate the pool provisions them (more with a HiCache host tier).
"""

import logging
import math

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from spark_sglang.patches.kv_pool import spark_enabled
from spark_sglang.kernels.layout import bytes_per_token
from spark_sglang.server_args import spark_config

logger = logging.getLogger(__name__)


def spark_cell_size(kvc, num_layers: int) -> int:
    from sglang.srt.runtime_context import get_parallel

    from spark_sglang.patches.hicache import host_tier
    from spark_sglang.pool import TOKENS_PER_WINDOW_ROW

    model = kvc.model_config
    parallel = get_parallel()
    heads = model.get_num_kv_heads(parallel.attn_tp_size, parallel.attn_dcp_size)
    # With a HiCache host tier of r x the device pool, the pool provisions rows for (1 + r) x its
    # tokens (host-held tokens pin theirs). A tier sized in GB (--hicache-size) is not known per
    # device token here: its rows are allocated beside the pool (see SparKTokenToKVPool.host_tokens).
    tier = host_tier(kvc.server_args)
    host_ratio = tier[0] if tier is not None and tier[1] <= 0 else 0.0
    sizes = bytes_per_token(
        spark_config(kvc.server_args), model.head_dim, heads, num_layers, kvc.kv_cache_dtype,
        tokens_per_window=TOKENS_PER_WINDOW_ROW / (1 + host_ratio),
    )  # fmt: skip
    return math.ceil(sizes["spark_total"])


def _compute_cell_size(original, self, kvc, num_layers):
    dense = original(self, kvc, num_layers)
    if not spark_enabled() or kvc.use_mla_backend:
        return dense
    spark = spark_cell_size(kvc, num_layers)
    logger.info(
        "SparK KV cache: %d bytes/token dense, %d bytes/token SparK (%.1f%%): %.2fx tokens in the same memory",
        dense, spark, 100 * spark / dense, dense / spark,
    )  # fmt: skip
    return spark


def install() -> None:
    HookRegistry.register(
        "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size",
        _compute_cell_size, HookType.AROUND,
    )  # fmt: skip
