"""SGLang plugin entry point (group ``sglang.srt.plugins``): SGLang calls ``register()`` in the
launcher, the Engine and every scheduler process, before it reads its arguments."""

from spark_sglang.patches import (
    attention, capacity, chunking, deterministic, hicache, kv_pool, radix_cache, refusals, server_args,
    server_info,
)  # fmt: skip


def register() -> None:
    server_args.install()
    refusals.install()
    attention.install()
    kv_pool.install()
    hicache.install()
    capacity.install()
    radix_cache.install()
    chunking.install()
    server_info.install()
    deterministic.install()
