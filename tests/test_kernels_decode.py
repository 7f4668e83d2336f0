"""SparKDecodeWrapper against reference.attention over the unpacked cache: ragged batches, scattered
and paged slots, GQA groups, both recoveries, dense and compressed values, split-KV merging."""

import math
import os
import zlib
from typing import NamedTuple

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from spark_sglang.kernels import decode, layout, reference  # noqa: E402
from tests.test_kernels_compress import poisoned_records  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: (output rtol = atol, LSE atol). Half-precision outputs: P is rounded to the KV dtype for the
#: P.V product and the output is stored in it (observed fp16 error: 2.5e-4; fp32: 4e-7).
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-5), torch.bfloat16: (8e-3, 1e-4)}
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
BLOCK_N = 16

# Reading a window norm of 0 evaluates rsqrt(0) = inf in the branch where() discards.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def generator(request) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.name.encode()))


class Cache(NamedTuple):
    """One layer's compact cache on DEVICE and its unpacked dense view on the CPU (NaN outside
    the live slots)."""

    keys: reference.PackedKeys
    values: reference.PackedValues | torch.Tensor
    window_stats: torch.Tensor
    slot_rows: torch.Tensor
    dense_keys: torch.Tensor
    dense_values: torch.Tensor


def _scatter(shape, fill, live, data):
    out = torch.full(shape, fill, dtype=data.dtype)
    out[live] = data
    return out


def window_row_runs(gen, n, num_rows, longest=40):
    """``[n]`` int32 window rows in runs of 1 to ``longest`` slots, as compression events give them
    (one row per request extend); short runs put several rows in one kernel tile."""
    rows, done = [], 0
    while done < n:
        run = int(torch.randint(1, longest + 1, (1,), generator=gen))
        rows += [int(torch.randint(0, num_rows, (1,), generator=gen))] * run
        done += run
    return torch.tensor(rows[:n], dtype=torch.int32)


def build_cache(
    gen, num_slots, live, num_heads, head_dim, dtype, key_ratio, recovery, value_ratio, num_rows=3, scale=1.0,
    rows=None, stats=None,
):  # fmt: skip
    """Pack random keys/values of the ``live`` slots with the reference into the pool's records
    (kernels/layout.py); every other slot's record is poisoned (0xFF bytes: NaN entries, all-ones
    bitmaps) and one window row only they point at holds NaN. ``dtype`` is the cache dtype (FP8:
    entries stored as ``x / scale``). ``rows``: the live slots' window rows (default: runs, in the
    order of ``live``, see ``window_row_runs``); ``stats``: the ``[num_rows + 1, 2, H, D]`` window
    statistics (default random, window channels that never fired at 0)."""
    lay = reference.SparKConfig(key_ratio=key_ratio, value_ratio=value_ratio, recovery=recovery).layout(
        head_dim, dtype
    )
    model_dtype = torch.float32 if lay.is_fp8 else dtype
    keys = torch.randn(len(live), num_heads, head_dim, generator=gen).to(model_dtype)
    values = torch.randn(len(live), num_heads, head_dim, generator=gen).to(model_dtype)
    if stats is None:
        stats = torch.rand(num_rows + 1, 2, num_heads, head_dim, generator=gen) + 0.05
        stats[:, 0, :, ::7] = 0  # window channels that never fired recover to 0
    stats = stats.clone()
    stats[num_rows] = float("nan")
    stats = stats.to(layout.STATS_DTYPE)
    live_rows = window_row_runs(gen, len(live), num_rows) if rows is None else rows
    rows = torch.full((num_slots,), num_rows, dtype=torch.int32)
    rows[live] = live_rows
    norm = stats[rows[live].long(), 0]

    (k_raw, v_raw), packed_keys, packed_values = poisoned_records(lay, num_slots, num_heads)
    pk = reference.pack_keys(keys, norm, key_ratio, recovery, dtype=dtype, scale=scale)
    for destination, source in zip(packed_keys, pk):
        if destination is not None:
            destination[live] = source.to(DEVICE)
    shape = (num_slots, num_heads, head_dim)
    nan = float("nan")
    dense_keys = _scatter(shape, nan, live, reference.unpack_keys(pk, norm, scale=scale))
    if value_ratio:
        pv = reference.pack_values(values, stats[rows[live].long(), 1], value_ratio, dtype=dtype, scale=scale)
        for destination, source in zip(packed_values, pv):
            destination[live] = source.to(DEVICE)
        dense_values = _scatter(shape, nan, live, reference.unpack_values(pv, scale=scale))
    else:
        stored = reference.to_storage(values, dtype, scale)
        packed_values[live] = stored.to(DEVICE)
        dense_values = _scatter(shape, nan, live, reference.from_storage(stored, scale).to(reference.output_dtype(dtype)))

    return Cache(
        packed_keys,
        packed_values,
        # Dense values: the pool may keep only Qn, a strided [R, 1, H, D] view here.
        (stats if value_ratio else stats[:, :1]).to(DEVICE),
        rows.to(DEVICE),
        dense_keys,
        dense_values,
    )


def paged_batch(gen, lens, page_size, spare_pages=4, index_dtype=torch.int64):
    """CSR ``(indptr [B+1] int32, indices [nnz], num_slots)`` over randomly placed pages: each
    request's slots are runs of ``page_size`` consecutive slots, as SGLang's req_to_token gives."""
    pages_per_req = [-(-n // page_size) for n in lens]
    num_pages = sum(pages_per_req) + spare_pages
    order = torch.randperm(num_pages, generator=gen)
    indices, used = [], 0
    for n, p in zip(lens, pages_per_req):
        pages = order[used : used + p]
        used += p
        slots = (pages[:, None] * page_size + torch.arange(page_size)).flatten()[:n]
        indices.append(slots)
    indptr = torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(torch.int32)
    return indptr, torch.cat(indices).to(index_dtype), num_pages * page_size


def query_dtype(cache_dtype: torch.dtype) -> torch.dtype:
    """Queries (and tiles) of an FP8 cache stay in the model's dtype: float32 in these tests."""
    return torch.float32 if cache_dtype in layout.FP8_DTYPES else cache_dtype


def cache_scale(cache_dtype: torch.dtype) -> float:
    """The k_scale / v_scale FP8 caches are tested with (1 otherwise)."""
    return 0.5 if cache_dtype in layout.FP8_DTYPES else 1.0


def assert_close_to_reference(out, lse, expect_out, expect_lse, dtype):
    rtol, lse_atol = TOLERANCE[query_dtype(dtype)]
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.float().cpu(), expect_out, rtol=rtol, atol=rtol)
    torch.testing.assert_close(lse.cpu(), expect_lse, rtol=0, atol=lse_atol)


def reference_decode(q, cache, indptr, indices, sm_scale, logit_cap):
    outs, lses = [], []
    for b in range(q.shape[0]):
        slots = indices[indptr[b] : indptr[b + 1]].long()
        o, lse = reference.attention(
            q[b : b + 1].cpu(),
            cache.dense_keys[slots],
            cache.dense_values[slots],
            sm_scale,
            logit_cap=logit_cap,
        )
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def poisoned_outputs(batch, num_heads, head_dim, dtype):
    out = torch.full((batch, num_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    return out, torch.full((batch, num_heads), float("nan"), device=DEVICE)


CASES = [
    # dtype, head_dim, group, key_ratio, recovery, value_ratio, page_size, logit_cap
    (torch.float32, 64, 1, 0.5, "mean", 0.0, 1, 0.0),
    (torch.float32, 64, 4, 0.8, "mean", 0.5, 1, 0.0),
    (torch.float32, 128, 8, 0.5, "zero", 0.0, 1, 0.0),
    (torch.float32, 128, 4, 0.0, "mean", 0.5, 4, 0.0),
    (torch.float32, 128, 1, 0.8, "zero", 0.5, 16, 0.0),
    (torch.float32, 32, 4, 0.5, "mean", 0.0, 1, 2.0),
    (torch.float32, 256, 4, 0.5, "mean", 0.5, 1, 0.0),
    (torch.float16, 64, 8, 0.5, "mean", 0.5, 1, 0.0),
    (torch.float16, 128, 1, 0.8, "zero", 0.0, 1, 0.0),
    (torch.float16, 128, 4, 0.5, "mean", 0.0, 8, 0.0),
    (torch.float8_e4m3fn, 64, 4, 0.5, "mean", 0.0, 1, 0.0),
    (torch.float8_e5m2, 128, 2, 0.8, "mean", 0.5, 4, 0.0),
    (torch.float8_e4m3fn, 32, 1, 0.7, "zero", 0.5, 1, 0.0),
]
if DEVICE == "cuda":
    CASES += [
        (torch.bfloat16, 128, 4, 0.5, "mean", 0.0, 1, 0.0),
        (torch.bfloat16, 128, 8, 0.8, "mean", 0.8, 16, 0.0),
    ]


def _case_id(case) -> str:
    dtype, head_dim, group, key_ratio, recovery, value_ratio, page_size, logit_cap = case
    values = f"v{value_ratio}" if value_ratio else "vdense"
    name = f"{str(dtype)[6:]}-d{head_dim}-g{group}-k{key_ratio}-{recovery}-{values}-page{page_size}"
    return name + (f"-cap{logit_cap}" if logit_cap else "")


@pytest.mark.parametrize(
    "dtype,head_dim,group,key_ratio,recovery,value_ratio,page_size,logit_cap",
    CASES,
    ids=[_case_id(c) for c in CASES],
)
def test_decode_matches_reference(
    request, dtype, head_dim, group, key_ratio, recovery, value_ratio, page_size, logit_cap
):
    gen = generator(request)
    num_kv_heads = 2
    num_heads = num_kv_heads * group
    # Around tile edges, one request longer than the grid's splits can cover in BLOCK_N tiles
    # (empty trailing splits), and one with no KV at all.
    lens = [1, BLOCK_N - 1, BLOCK_N + 1, 0, 6 * BLOCK_N - 3]
    indptr, indices, num_slots = paged_batch(gen, lens, page_size)
    scale = cache_scale(dtype)
    cache = build_cache(
        gen, num_slots, indices, num_kv_heads, head_dim, dtype, key_ratio, recovery, value_ratio, scale=scale
    )
    q = torch.randn(len(lens), num_heads, head_dim, generator=gen).to(query_dtype(dtype))
    sm_scale = 1.3 / math.sqrt(head_dim)

    wrapper = decode.SparKDecodeWrapper(
        num_heads, num_kv_heads, head_dim, device=DEVICE, block_n=BLOCK_N, num_sms=10
    )
    wrapper.plan(indptr.to(DEVICE), indices.to(DEVICE), split_len=BLOCK_N)
    # The last request is clamped to the grid's splits (4 with 4 warps, 2 with D 256's 8 warps),
    # of 2 or more tiles each: its last split is empty with 4.
    grid = wrapper.grid_splits(len(lens))
    assert grid == (2 if head_dim > 128 else 4)
    assert wrapper.num_splits.cpu().tolist() == [max(1, min(grid, -(-n // BLOCK_N))) for n in lens]
    out, lse = poisoned_outputs(len(lens), num_heads, head_dim, query_dtype(dtype))
    wrapper.run(
        q.to(DEVICE), cache.keys, cache.values, cache.window_stats, cache.slot_rows,
        sm_scale=sm_scale, logit_cap=logit_cap, out=out, lse=lse, k_scale=scale, v_scale=scale,
    )  # fmt: skip

    empty = 3
    assert (out[empty] == 0).all() and (lse[empty] == float("-inf")).all()
    keep = [b for b in range(len(lens)) if b != empty]
    expect_out, expect_lse = reference_decode(q, cache, indptr, indices, sm_scale, logit_cap)
    assert_close_to_reference(
        out[keep], lse[keep].nan_to_num(), expect_out[keep], expect_lse[keep], dtype
    )


def test_decode_many_splits(request):
    """A single long request spread over many splits, int32 slot ids, default tiles."""
    gen = generator(request)
    num_kv_heads, group, head_dim, dtype = 1, 4, 64, torch.float32
    lens = [300]
    indptr, indices, num_slots = paged_batch(gen, lens, 1, index_dtype=torch.int32)
    cache = build_cache(
        gen, num_slots, indices.long(), num_kv_heads, head_dim, dtype, 0.5, "mean", 0.5
    )
    q = torch.randn(1, group, head_dim, generator=gen)
    wrapper = decode.SparKDecodeWrapper(
        group, num_kv_heads, head_dim, device=DEVICE, num_sms=4, min_split_len=32
    )
    wrapper.plan(indptr.to(DEVICE), indices.to(DEVICE))
    assert wrapper.num_splits.item() == 5  # cdiv(300, 64): tiles of 64 slots at D 64, a grid of 16
    out, lse = poisoned_outputs(1, group, head_dim, dtype)
    wrapper.run(
        q.to(DEVICE),
        cache.keys,
        cache.values,
        cache.window_stats,
        cache.slot_rows,
        out=out,
        lse=lse,
    )
    expect = reference_decode(q, cache, indptr, indices, 1 / math.sqrt(head_dim), 0.0)
    assert_close_to_reference(out, lse, *expect, dtype)


def test_decode_rows_change_every_slot(request):
    """Window rows that change at every slot (real rows come in long runs; the kernel rebuilds a
    tile once per run it holds): still the reference's result, with splits cutting the runs."""
    gen = generator(request)
    num_kv_heads, group, head_dim, dtype = 2, 2, 64, torch.float32
    lens = [2 * BLOCK_N + 5, 3]
    indptr, indices, num_slots = paged_batch(gen, lens, 1)
    rows = (torch.arange(len(indices)) % 3).to(torch.int32)
    cache = build_cache(
        gen, num_slots, indices, num_kv_heads, head_dim, dtype, 0.5, "mean", 0.0, rows=rows
    )
    q = torch.randn(len(lens), group * num_kv_heads, head_dim, generator=gen)
    wrapper = decode.SparKDecodeWrapper(
        group * num_kv_heads, num_kv_heads, head_dim, device=DEVICE, block_n=BLOCK_N, num_sms=4
    )
    wrapper.plan(indptr.to(DEVICE), indices.to(DEVICE), split_len=BLOCK_N)
    out, lse = poisoned_outputs(len(lens), group * num_kv_heads, head_dim, dtype)
    args = (cache.keys, cache.values, cache.window_stats, cache.slot_rows)
    wrapper.run(q.to(DEVICE), *args, out=out, lse=lse)
    expect = reference_decode(q, cache, indptr, indices, 1 / math.sqrt(head_dim), 0.0)
    assert_close_to_reference(out, lse, *expect, dtype)


def test_plan_once_run_twice(request):
    """run reads the planned indptr/indices and the cache at launch: new data, same plan."""
    gen = generator(request)
    num_kv_heads, group, head_dim, dtype = 2, 4, 64, torch.float32
    lens = [BLOCK_N + 1, 2 * BLOCK_N + 3, 1]
    indptr, indices, num_slots = paged_batch(gen, lens, 1)
    wrapper = decode.SparKDecodeWrapper(
        group * num_kv_heads, num_kv_heads, head_dim, device=DEVICE, block_n=BLOCK_N, num_sms=4
    )
    indptr_dev, indices_dev = indptr.to(DEVICE), indices.to(DEVICE)
    wrapper.plan(indptr_dev, indices_dev, seq_lens_cpu=torch.tensor(lens), split_len=BLOCK_N)
    out, lse = poisoned_outputs(len(lens), group * num_kv_heads, head_dim, dtype)
    results = []
    for step in range(2):
        cache = build_cache(
            gen, num_slots, indices, num_kv_heads, head_dim, dtype, 0.5, "mean", 0.5 * step
        )
        q = torch.randn(len(lens), group * num_kv_heads, head_dim, generator=gen)
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        wrapper.run(
            q.to(DEVICE),
            cache.keys,
            cache.values,
            cache.window_stats,
            cache.slot_rows,
            out=out,
            lse=lse,
        )
        assert_close_to_reference(
            out, lse, *reference_decode(q, cache, indptr, indices, 1 / 8, 0.0), dtype
        )
        results.append((q, cache, out.clone()))
    # Replaying the first step's inputs gives the first step's output, bit for bit.
    q, cache, first = results[0]
    wrapper.run(
        q.to(DEVICE),
        cache.keys,
        cache.values,
        cache.window_stats,
        cache.slot_rows,
        out=out,
        lse=lse,
    )
    assert torch.equal(out, first)


def test_run_checks_the_plan():
    wrapper = decode.SparKDecodeWrapper(4, 2, 64, device=DEVICE)
    q = torch.zeros(2, 4, 64, device=DEVICE)
    cache = build_cache(
        torch.Generator().manual_seed(0), 4, torch.arange(4), 2, 64, torch.float32, 0.5, "zero", 0.0
    )
    args = (cache.keys, cache.values, cache.window_stats, cache.slot_rows)
    with pytest.raises(RuntimeError, match="before plan"):
        wrapper.run(q, *args)
    indptr = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    wrapper.plan(indptr, torch.arange(4, device=DEVICE))
    with pytest.raises(ValueError, match="the plan is for"):
        wrapper.run(q, *args)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_cuda_graph_replay(request):
    """Capture run once; re-plan with other lengths (same batch size) and replay."""
    gen = generator(request)
    num_kv_heads, group, head_dim, dtype = 8, 4, 128, torch.bfloat16
    batch, capacity = 4, 4096
    wrapper = decode.SparKDecodeWrapper(group * num_kv_heads, num_kv_heads, head_dim, device=DEVICE)
    indptr_buf = torch.zeros(batch + 1, dtype=torch.int32, device=DEVICE)
    indices_buf = torch.zeros(capacity, dtype=torch.int64, device=DEVICE)
    q_buf = torch.zeros(batch, group * num_kv_heads, head_dim, dtype=dtype, device=DEVICE)
    cache = build_cache(
        gen, capacity, torch.arange(capacity), num_kv_heads, head_dim, dtype, 0.5, "mean", 0.5
    )
    args = (cache.keys, cache.values, cache.window_stats, cache.slot_rows)

    def load(lens):
        indptr, indices, _ = paged_batch(gen, lens, 16)
        indptr_buf.copy_(indptr)
        indices_buf[: len(indices)].copy_(indices)
        q_buf.copy_(torch.randn(q_buf.shape, generator=gen).to(dtype))
        wrapper.plan(indptr_buf, indices_buf, seq_lens_cpu=torch.tensor(lens))
        return indptr, indices

    load([64, 64, 64, 64])
    out, lse = poisoned_outputs(batch, group * num_kv_heads, head_dim, dtype)
    wrapper.run(q_buf, *args, out=out, lse=lse)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        wrapper.run(q_buf, *args, out=out, lse=lse)
    for lens in ([1, 900, 33, 2048], [1000, 7, 7, 1]):
        indptr, indices = load(lens)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        expect = reference_decode(q_buf.cpu(), cache, indptr, indices, 1 / math.sqrt(head_dim), 0.0)
        assert_close_to_reference(out, lse, *expect, dtype)


def test_fixed_split_len_makes_a_request_independent_of_its_batch(request):
    """Deterministic mode (``fixed_split_len``): a request's splits and their merge order do not
    depend on the batch, so its output is bit-identical alone and beside other requests; without
    it the split length follows the batch's total work (checked: the two plans differ)."""
    gen = generator(request)
    num_kv_heads, group, head_dim, dtype = 2, 2, 64, torch.float32
    lens = [100, 20, 60, 7]
    indptr, indices, num_slots = paged_batch(gen, lens, 1)
    cache = build_cache(gen, num_slots, indices, num_kv_heads, head_dim, dtype, 0.5, "mean", 0.0)
    q = torch.randn(len(lens), group * num_kv_heads, head_dim, generator=gen)
    args = (cache.keys, cache.values, cache.window_stats, cache.slot_rows)

    def run(wrapper, batch):
        sub_indptr = torch.tensor([0] + [lens[b] for b in batch], dtype=torch.int64).cumsum(0).to(torch.int32)
        sub_indices = torch.cat([indices[indptr[b] : indptr[b + 1]] for b in batch])
        wrapper.plan(sub_indptr.to(DEVICE), sub_indices.to(DEVICE))
        out, lse = poisoned_outputs(len(batch), group * num_kv_heads, head_dim, dtype)
        wrapper.run(q[batch].to(DEVICE), *args, out=out, lse=lse)
        at = batch.index(0)  # request 0's position in this batch
        return out[at].cpu(), lse[at].cpu(), int(wrapper.num_splits[at])

    def new(**options):
        return decode.SparKDecodeWrapper(group * num_kv_heads, num_kv_heads, head_dim, device=DEVICE,
                                         block_n=BLOCK_N, num_sms=4, min_split_len=BLOCK_N, max_splits=8, **options)  # fmt: skip

    alone, batched = run(new(fixed_split_len=32), [0]), run(new(fixed_split_len=32), [2, 0, 1, 3])
    assert alone[2] == batched[2] == 4  # cdiv(100, 32) in both
    assert torch.equal(alone[0], batched[0]) and torch.equal(alone[1], batched[1])
    assert run(new(), [0])[2] != run(new(), [0, 1, 2, 3])[2]  # the default plan depends on the batch
    with pytest.raises(ValueError, match="not a multiple of block_n"):
        new(fixed_split_len=40)
