"""HiCache's host tier holds SparK's compact records byte for byte.

Unit part, on CPU tensors with SGLang 0.5.23's real classes: the host pool SGLang's assembler builds
for the SparK pool (through ``patches/hicache.py``), SGLang's ``HostKVCache`` slot allocation, its
``L2TransferEngine`` running the backup (device -> host) and the layer-by-layer load
(host -> device), SGLang's token allocator. Buffers are poisoned before every copy; the loaded
slots must equal the originals byte for byte, read the window rows they were compressed with
(pinned while the host copy lives, even after the device slots and rows are reused) and give the
same attention. Engine part: ``sglang.Engine`` with ``--enable-hierarchical-cache`` on CPU, where
SGLang's HiCache controller runs (``torch.cpu`` streams): a prompt evicted to host and hit again
answers exactly as a device hit does, and a full host tier evicts instead of failing.
"""

import pytest
import torch
from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
from sglang.srt.mem_cache.hybrid_cache import hybrid_pool_assembler
from sglang.srt.mem_cache.l2_transfer import L2Transfer, L2TransferEngine
from sglang.srt.mem_cache.memory_pool import KVWriteLoc, MHATokenToKVPool
from sglang.srt.mem_cache.pool_host.base import HostKVCache, host_memory_budget_scope
from sglang.srt.mem_cache.pool_host.mha import MHATokenToKVPoolHost
from sglang.srt.plugins import load_plugins

from spark_sglang.host_pool import SparKHostPool, host_dense_bytes_per_token
from spark_sglang.kernels import reference as R
from spark_sglang.kernels.layout import SparKConfig, bytes_per_token
from spark_sglang.pool import SparKTokenToKVPool

HEADS, QO_HEADS, DIM, LAYERS, SIZE = 2, 4, 64, 3, 96
POISON = 0xA5


class Layer:
    def __init__(self, layer_id):
        self.layer_id = layer_id


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    monkeypatch.setenv("SPARK_SGLANG_KERNELS", "torch")  # the pure-PyTorch path: no compiler needed


def make_pool(config, dtype):
    return SparKTokenToKVPool(SIZE, page_size=1, dtype=dtype, head_num=HEADS, head_dim=DIM, layer_num=LAYERS,
                              device="cpu", enable_memory_saver=False, spark_config=config)  # fmt: skip


def make_host_pool(pool, ratio=2.0):
    """The host pool exactly as SGLang's ``build_kv_host_pool`` constructs it."""
    load_plugins()  # installs patches/hicache.py's hook on _mha_host_inputs
    host_cls, host_input, kwargs = hybrid_pool_assembler._mha_host_inputs(pool)
    assert host_cls is SparKHostPool and host_input is pool
    with host_memory_budget_scope(1 << 30):  # SGLang's budget snapshot, instead of the machine's free RAM
        return host_cls(host_input, ratio, 0, pool.page_size, "page_first", allocator_type="default", **kwargs)


def write(pool, slots, row, seed):
    """Compress random K/V into ``slots`` on every layer under window row ``row``."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(len(slots), HEADS, DIM, generator=gen)
    v = torch.randn(len(slots), HEADS, DIM, generator=gen)
    norm = R.window_channel_norm(torch.randn(8, QO_HEADS, DIM, generator=gen), HEADS)
    for cache in pool.layers:
        if cache.compressed:
            cache.window_stats[row, 0] = norm
            if cache.window_stats.shape[1] > 1:
                cache.window_stats[row, 1] = R.value_channel_bias(v)
    pool.slot_rows[slots] = row
    for layer_id in range(LAYERS):
        pool.set_kv_buffer(Layer(layer_id), KVWriteLoc(slots), k, v)


def slot_bytes(pool, slots):
    """Every byte the pool stores for ``slots``: each layer's key and value rows, and the row ids."""
    return [buffer[slots].clone() for cache in pool.layers for buffer in cache.storage] + [pool.slot_rows[slots].clone()]


def attention(pool, slots, q):
    """One decode query over ``slots`` through the pool's own decode path, on every layer."""
    wrapper = pool.ops.decode_wrapper(QO_HEADS, HEADS, DIM, device="cpu")
    wrapper.plan(torch.tensor([0, len(slots)], dtype=torch.int32), slots.long())
    outputs = []
    for layer_id in range(LAYERS):
        cache = pool.layer_cache(layer_id)
        if not cache.compressed:  # a dense layer: plain softmax attention
            k, v = cache.keys[slots].float(), cache.values[slots].float()
            probs = torch.softmax(torch.einsum("hgd,thd->hgt", q.view(HEADS, -1, DIM), k) / DIM**0.5, -1)
            outputs.append(torch.einsum("hgt,thd->hgd", probs, v).reshape(1, QO_HEADS, DIM))
            continue
        out, _ = wrapper.run(q, cache.keys, cache.values, cache.window_stats, pool.slot_rows)
        outputs.append(out.clone())
    return torch.stack(outputs)


def poison(pool, slots):
    for cache in pool.layers:
        for buffer in cache.storage:
            buffer[slots] = POISON
    pool.slot_rows[slots] = 0


CASES = {
    "K0.5-mean-dense-layer-fp32": (SparKConfig(key_ratio=0.5, dense_layers=(1,)), torch.float32),
    "K0.75-V0.5-zero-fp16": (SparKConfig(key_ratio=0.75, value_ratio=0.5, recovery="zero"), torch.float16),
    "K0.5-mean-fp8": (SparKConfig(key_ratio=0.5), torch.float8_e4m3fn),
}


@pytest.mark.parametrize("case", list(CASES))
def test_backup_and_load_round_trip_byte_for_byte(case):
    config, dtype = CASES[case]
    pool = make_pool(config, dtype)
    allocator = TokenToKVPoolAllocator(SIZE, dtype=dtype, device="cpu", kvcache=pool, need_sort=False)
    host = make_host_pool(pool)
    assert isinstance(host, HostKVCache) and host.size >= 2 * SIZE

    # Two requests' worth of tokens under two window rows, like two radix nodes.
    slots = allocator.alloc(20)
    (row_a, row_b), _ = pool.window_rows.allocate(2, pool._rows_referenced_by_slots)
    write(pool, slots[:12], row_a, seed=1)
    write(pool, slots[12:], row_b, seed=2)
    before = slot_bytes(pool, slots)
    q = torch.randn(1, QO_HEADS, DIM, generator=torch.Generator().manual_seed(3))
    attended = attention(pool, slots, q)

    engine = L2TransferEngine("direct")
    host_slots = host.alloc(20)
    for records in host.records:
        records.fill_(POISON)
    engine.submit_device_to_host([L2Transfer(host, pool, host_slots, slots)])
    assert torch.equal(host.row_ids[host_slots], pool.slot_rows[slots])

    # The node is evicted from the device: its slots are freed and reused by another request,
    # which also takes every window row the device pool can reclaim.
    allocator.free(slots)
    reused = allocator.alloc(SIZE)
    assert reused is not None
    live = pool.host_pinned_rows()
    assert live[row_a] and live[row_b] and int(live.sum()) == 2
    pool.window_rows.collect(live)
    taken, _ = pool.window_rows.allocate(pool.window_rows.num_free, lambda: live)
    assert row_a not in taken and row_b not in taken
    for cache in pool.layers:
        if cache.compressed:
            cache.window_stats[taken] = float("nan")
    poison(pool, reused)
    allocator.free(reused)

    # Loaded back into other device slots, layer by layer as HiCache's load does.
    target = allocator.alloc(20)
    poison(pool, target)
    engine.submit_host_to_device([L2Transfer(host, pool, host_slots, target)], transfer_layer_id_max=LAYERS)
    after = slot_bytes(pool, target)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert torch.equal(attention(pool, target, q), attended)

    # Host eviction ends the pin; a full host tier refuses allocation (SGLang then evicts host nodes).
    host.free(host_slots)
    assert not pool.host_pinned_rows().any()
    assert host.alloc(host.available_size() + 1) is None


def test_host_bytes_per_token_are_the_device_records():
    config = SparKConfig(key_ratio=0.5, dense_layers=(1,))
    pool = make_pool(config, torch.float32)
    host = make_host_pool(pool)
    sizes = bytes_per_token(config, DIM, HEADS, LAYERS, torch.float32)
    assert host.get_size_per_token() == sizes["spark"]  # records of every layer + the row id
    assert host_dense_bytes_per_token(pool) == sizes["dense"]
    assert host.get_size_per_token() < 0.9 * sizes["dense"]
    assert sum(records.nbytes for records in host.records) + host.row_ids.nbytes == host.size * host.size_per_token


def test_dense_pools_keep_sglangs_host_pool():
    load_plugins()
    dense = MHATokenToKVPool(SIZE, page_size=1, dtype=torch.float32, head_num=HEADS, head_dim=DIM,
                             layer_num=LAYERS, device="cpu", enable_memory_saver=False)  # fmt: skip
    assert hybrid_pool_assembler._mha_host_inputs(dense)[0] is MHATokenToKVPoolHost


def test_window_rows_are_provisioned_for_host_tokens():
    config = SparKConfig(key_ratio=0.5)
    plain = make_pool(config, torch.float32)
    with_host = SparKTokenToKVPool(64 * 1024, page_size=1, dtype=torch.float32, head_num=HEADS, head_dim=DIM,
                                   layer_num=LAYERS, device="cpu", enable_memory_saver=False, spark_config=config,
                                   host_tier=(2.0, 0.0))  # fmt: skip
    assert with_host.host_tokens == 2 * 64 * 1024
    assert with_host.num_window_rows == 3 * 64 * 1024 // 128 > plain.num_window_rows
    by_size = SparKTokenToKVPool(SIZE, page_size=1, dtype=torch.float32, head_num=HEADS, head_dim=DIM,
                                 layer_num=LAYERS, device="cpu", enable_memory_saver=False, spark_config=config,
                                 host_tier=(2.0, 0.5))  # fmt: skip  # --hicache-size 0.5 (GB) wins over the ratio
    assert by_size.host_tokens == int(0.5e9 // bytes_per_token(config, DIM, HEADS, LAYERS, torch.float32)["spark"])


# --- the engine ---------------------------------------------------------------------------------


def prompt(i):
    return "".join(f"def f{i}_{j}(x):\n    return x * {i} + {j}\n" for j in range(12)) + "# end\n"


@pytest.fixture(scope="module")
def hicache_run():
    """One SparK engine with HiCache on a 640-token device pool and a 2x host tier."""
    import os
    import time

    import sglang as sgl

    from spark_sglang.tiny_model import build_tiny_llama

    os.environ["SPARK_SGLANG_HICACHE_RESERVE_GIB"] = "1"  # inherited by the scheduler (a shared 24 GiB machine)
    try:
        engine = sgl.Engine(model_path=build_tiny_llama(), device="cpu", attention_backend="spark", dtype="float32",
                            disable_cuda_graph=True, mem_fraction_static=0.05, max_total_tokens=640, random_seed=0,
                            log_level="error", enable_hierarchical_cache=True, hicache_ratio=2.0)  # fmt: skip
    finally:
        del os.environ["SPARK_SGLANG_HICACHE_RESERVE_GIB"]
    results = []
    try:
        # P0 twice (a device hit), P1-P3 push P0 out of the device pool (to host), P0 again (a host
        # hit), P4-P8 overflow the host tier, P1 again (evicted from host by then).
        for i in [0, 0, 1, 2, 3, 0, 4, 5, 6, 7, 8, 1]:
            out = engine.generate(prompt=prompt(i), sampling_params={"temperature": 0, "max_new_tokens": 6},
                                  return_logprob=True)  # fmt: skip
            meta = out["meta_info"]
            results.append((i, out["output_ids"], [lp for lp, _, _ in meta["output_token_logprobs"]],
                            meta["cached_tokens_details"] or {"device": 0, "host": 0}))  # fmt: skip
        # A node's last write-through to host holds a lock until the scheduler's next loop
        # processes its acknowledgement: poll until the pool settles (or give up: a leak).
        for _ in range(50):
            state = engine.get_server_info()["internal_states"][0]["spark"]
            if state["free_slots"] + state["evictable_slots"] == state["pool_slots"]:
                break
            time.sleep(0.2)
    finally:
        engine.shutdown()
    return results, state


def test_engine_host_hit_reads_exactly_as_a_device_hit(hicache_run):
    results, _ = hicache_run
    _, device_ids, device_logprobs, device_hit = results[1]
    _, host_ids, host_logprobs, host_hit = results[5]
    assert device_hit["device"] > 200 and device_hit["host"] == 0
    assert host_hit["host"] > 200  # P0 came back from host memory
    assert host_ids == device_ids and host_logprobs == device_logprobs


def test_engine_full_host_tier_evicts_and_nothing_leaks(hicache_run):
    results, state = hicache_run
    assert results[-1][3]["host"] == 0  # P1 was evicted from the full host tier; served all the same
    assert all(len(ids) == 6 for _, ids, _, _ in results)
    assert state["free_slots"] + state["evictable_slots"] == state["pool_slots"]
    assert state["window_rows_borrowed"] == 0
