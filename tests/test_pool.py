"""SparKTokenToKVPool with SGLang 0.5.23's real allocator, request pool and radix cache."""

from array import array

import pytest
import torch
from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import KVWriteLoc, MHATokenToKVPool, ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixKey
from sglang.srt.mem_cache.unified_cache.components import ComponentType
from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

from spark_sglang.backend import allocated_slots, running_requests
from spark_sglang.kernels import reference as R
from spark_sglang.kernels.layout import SparKConfig
from spark_sglang.pool import MIN_ROWS, SparKTokenToKVPool
from spark_sglang.window_rows import WindowRows, live_rows

HEADS, DIM, LAYERS, SIZE = 2, 32, 2, 64


class Layer:
    def __init__(self, layer_id):
        self.layer_id = layer_id


def make_pool(config, size=SIZE, dtype=torch.float32):
    return SparKTokenToKVPool(size, page_size=1, dtype=dtype, head_num=HEADS, head_dim=DIM, layer_num=LAYERS,
                              device="cpu", enable_memory_saver=False, spark_config=config)  # fmt: skip


def rand(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def write(pool, slots, row, seed):
    """Give `row` window statistics, point `slots` at it and write random K/V on every layer.
    Returns the K/V and the key norm as the (bfloat16) table holds it."""
    k, v = rand(seed, len(slots), HEADS, DIM), rand(seed + 1, len(slots), HEADS, DIM)
    norm = R.window_channel_norm(rand(seed + 2, 8, 2 * HEADS, DIM), HEADS)
    for cache in pool.layers:
        if cache.compressed:
            cache.window_stats[row, 0] = norm
            if cache.window_stats.shape[1] > 1:
                cache.window_stats[row, 1] = R.value_channel_bias(v)
            stored_norm = cache.window_stats[row, 0]
    pool.slot_rows[slots] = row
    for layer_id in range(LAYERS):
        pool.set_kv_buffer(Layer(layer_id), KVWriteLoc(slots), k, v)
    return k, v, stored_norm


def read_keys(pool, layer_id, slots):
    cache = pool.layer_cache(layer_id)
    if not cache.compressed:
        return cache.keys[slots]
    stats = cache.window_stats[pool.slot_rows[slots].long(), 0]
    return R.unpack_keys(R.PackedKeys(*(None if t is None else t[slots] for t in cache.keys)), stats)


def read_values(pool, layer_id, slots):
    values = pool.layer_cache(layer_id).values
    if isinstance(values, torch.Tensor):
        return values[slots]
    return R.unpack_values(R.PackedValues(*(t[slots] for t in values)))


@pytest.mark.parametrize("recovery", ["mean", "zero"])
@pytest.mark.parametrize("value_ratio", [0.0, 0.5])
def test_write_read_matches_reference(recovery, value_ratio):
    config = SparKConfig(key_ratio=0.5, value_ratio=value_ratio, recovery=recovery, dense_layers=(1,))
    pool = make_pool(config)
    assert isinstance(pool, MHATokenToKVPool)
    slots = torch.tensor([5, 9, 1, 40, 63])
    k, v, norm = write(pool, slots, row=3, seed=0)
    expected_k = R.simulate_keys_with_norm(k, norm, 0.5, recovery)
    torch.testing.assert_close(read_keys(pool, 0, slots), expected_k, rtol=1e-6, atol=1e-6)
    bias = pool.layers[0].window_stats[3, -1]
    expected_v = R.unpack_values(R.pack_values(v, bias, 0.5)) if value_ratio else v
    torch.testing.assert_close(read_values(pool, 0, slots), expected_v, rtol=1e-6, atol=1e-6)
    assert torch.equal(read_keys(pool, 1, slots), k) and torch.equal(read_values(pool, 1, slots), v)  # dense layer


def test_size_bytes_count_every_buffer_and_are_smaller_than_dense():
    config = SparKConfig(key_ratio=0.5)
    pool = make_pool(config, size=4096)
    dense = MHATokenToKVPool(4096, page_size=1, dtype=torch.float32, head_num=HEADS, head_dim=DIM,
                             layer_num=LAYERS, device="cpu", enable_memory_saver=False)  # fmt: skip
    layout = config.layout(DIM, torch.float32)
    slots = 4096 + 1
    per_slot = LAYERS * HEADS * (layout.key_bytes_per_head() + layout.value_bytes_per_head()) + 4
    tables = LAYERS * pool.num_window_rows * HEADS * DIM * 2  # bfloat16 Qn
    assert sum(pool.get_kv_size_bytes()) == slots * per_slot + tables
    assert sum(pool.get_kv_size_bytes()) < 0.85 * sum(dense.get_kv_size_bytes())
    assert pool.num_window_rows == MIN_ROWS


def test_move_and_cpu_copy_round_trip():
    pool = make_pool(SparKConfig(key_ratio=0.75, value_ratio=0.5), size=2 * MIN_ROWS)
    src = torch.tensor([1, 2, 3, 4])
    k, _, _ = write(pool, src, row=7, seed=10)
    before = [read_keys(pool, 0, src), read_values(pool, 0, src)]
    pool.move_kv_cache(torch.tensor([20, 21, 22, 23]), src)
    assert torch.equal(read_keys(pool, 0, torch.tensor([20, 21, 22, 23])), before[0])
    copy = pool.get_cpu_copy(src)
    write(pool, src, row=8, seed=99)  # overwritten meanwhile (e.g. by another request)
    # Every row handed out and referenced by some slot: nothing to reload into ...
    saved_rows = pool.slot_rows.clone()
    pool.window_rows.allocate(pool.window_rows.num_free, lambda: None)
    pool.slot_rows.copy_(torch.arange(pool.slot_rows.numel()) % pool.num_window_rows)
    untouched = pool.layers[0].keys.kept.clone()
    with pytest.raises(RuntimeError, match="window-statistics row"):
        pool.load_cpu_copy(copy, torch.tensor([30, 31, 32, 33]))
    assert torch.equal(pool.layers[0].keys.kept, untouched)  # ... refused, nothing written
    pool.slot_rows.copy_(saved_rows)  # ... until rows are unreferenced again
    target = torch.tensor([30, 31, 32, 33])
    pool.load_cpu_copy(copy, target)
    assert pool.slot_rows[target].unique().numel() == 1 and int(pool.slot_rows[target][0]) != 7
    assert torch.equal(read_keys(pool, 0, target), before[0])
    assert torch.equal(read_values(pool, 0, target), before[1])


def test_refuses_unsupported_geometry():
    with pytest.raises(ValueError, match="head_dim=96"):
        SparKTokenToKVPool(8, page_size=1, dtype=torch.float16, head_num=1, head_dim=96, layer_num=1,
                           device="cpu", enable_memory_saver=False, spark_config=SparKConfig())  # fmt: skip
    with pytest.raises(ValueError, match="equal key and value head dims"):
        SparKTokenToKVPool(8, page_size=1, dtype=torch.float16, head_num=1, head_dim=64, layer_num=1,
                           device="cpu", enable_memory_saver=False, spark_config=SparKConfig(), v_head_dim=32)  # fmt: skip


def test_radix_cache_and_window_rows_lifecycle():
    """Insert, match, evict under memory pressure; slots and window rows come back."""
    pool = make_pool(SparKConfig(key_ratio=0.5))
    allocator = TokenToKVPoolAllocator(SIZE, dtype=torch.float32, device="cpu", kvcache=pool, need_sort=False)
    requests = ReqToTokenPool(size=4, max_context_len=128, device="cpu", enable_memory_saver=False)
    cache = UnifiedRadixCache(CacheInitParams(disable=False, req_to_token_pool=requests,
                                              token_to_kv_pool_allocator=allocator, page_size=1,
                                              tree_components=(ComponentType.FULL,)))  # fmt: skip
    rows = WindowRows(4)
    req_rows = torch.zeros(requests.size + 1, dtype=torch.int32)
    baseline = allocator.available_size()

    def live():
        return live_rows(rows.num_rows, pool.slot_rows, allocated_slots(allocator), req_rows, running_requests(requests))

    # Two requests with a shared 20-token prefix, each compressed under its own window row.
    prompt_a = array("q", range(100, 140))
    slots_a = allocator.alloc(40)
    (row_a,), _ = rows.allocate(1, live)
    keys_a, _, _ = write(pool, slots_a, row_a, seed=1)
    cache.insert(InsertParams(key=RadixKey(prompt_a), value=slots_a))
    hit = cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", list(range(100, 120)) + [7] * 10))))
    assert hit.device_prefix_len == 20
    hit_slots = cache.path_device_indices(hit.last_device_node)[:20]
    assert torch.equal(hit_slots, slots_a[:20])
    # The shared prefix is read back compressed under request A's window.
    assert torch.equal(read_keys(pool, 0, hit_slots), read_keys(pool, 0, slots_a[:20]))
    torch.testing.assert_close(read_keys(pool, 0, hit_slots), R.simulate_keys_with_norm(
        keys_a[:20], pool.layers[0].window_stats[row_a, 0], 0.5), rtol=1e-6, atol=1e-6)  # fmt: skip

    # Memory pressure: a request needing more than is free evicts the cache.
    need = allocator.available_size() + 30
    assert allocator.alloc(need) is None
    cache.evict(EvictParams(num_tokens=30))
    slots_b = allocator.alloc(need)
    assert slots_b is not None
    (row_b,), _ = rows.allocate(1, live)
    write(pool, slots_b, row_b, seed=2)
    req_b = requests.alloc_rows(1)[0]
    req_rows[req_b] = row_b

    # Request A's tokens are gone from the cache: its row is reclaimed once rows run out;
    # request B's row stays live while B runs, even after its slots are freed.
    allocator.free(slots_b)
    cache.evict(EvictParams(num_tokens=SIZE))
    assert allocator.available_size() == baseline
    assert rows.num_free == 2
    assert not live()[row_a] and live()[row_b]
    got, fresh = rows.allocate(3, live)  # needs a collection: row A comes back, B's does not
    assert sorted(got) == sorted({0, 1, 2, 3} - {row_b}) and all(fresh)
    requests.free_rows([req_b])
    assert not live()[row_b]


def test_window_rows_borrow_when_all_live():
    rows = WindowRows(2)
    assert rows.allocate(2, lambda: torch.zeros(2, dtype=torch.bool)) == ([0, 1], [True, True])
    assert rows.allocate(1, lambda: torch.ones(2, dtype=torch.bool)) == ([1], [False])
    assert rows.borrowed == 1
    assert rows.allocate(1, lambda: torch.tensor([True, False])) == ([1], [True])
