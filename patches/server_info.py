"""Seam: ``get_server_info()["internal_states"][rank]["spark"]`` reports the SparK pool's state.

Operators see how many window-statistics rows are in use and how many requests had to borrow one;
the soak benchmark checks after a run that every slot and row came back.
"""

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

TARGET = "sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController.get_internal_state"


def spark_state(scheduler) -> dict | None:
    """The SparK pool's occupancy, or None when the scheduler does not serve with ``spark``."""
    from sglang.srt.runtime_context import get_parallel

    from spark_sglang import cpu_batch_invariant
    from spark_sglang.pool import SparKTokenToKVPool

    model_runner = scheduler.tp_worker.model_runner
    pool = model_runner.token_to_kv_pool
    if not isinstance(pool, SparKTokenToKVPool):
        return None
    backend = model_runner.attn_backend
    live = int(backend._live_rows().sum()) if hasattr(backend, "_live_rows") else None
    allocator = scheduler.token_to_kv_pool_allocator
    return {
        # internal_states come in the order the replicas answer, not by rank
        "dp_rank": get_parallel().dp_rank or 0,
        "kernels": pool.ops.name,
        "bytes_per_slot": pool.bytes_per_slot(),
        "pool_slots": pool.size,
        "free_slots": int(allocator.available_size()),
        "evictable_slots": int(scheduler.tree_cache.evictable_size()),
        "window_rows": pool.num_window_rows,
        "window_rows_live": live,
        "window_rows_borrowed": pool.window_rows.borrowed,
        "reproducible": pool.config.reproducible,
        # deterministic mode on CPU: the model's matmuls run row-count-independent (patches/deterministic.py)
        "cpu_batch_invariant_matmuls": cpu_batch_invariant.installed(),
    }


def _get_internal_state(result, self, *args, **kwargs):
    state = spark_state(self.scheduler)
    if state is not None:
        result.internal_state["spark"] = state
    return result


def install() -> None:
    HookRegistry.register(TARGET, _get_internal_state, HookType.AFTER)
