"""Decode and extend kernels on corrupt or extreme inputs, checked where a GPU would fail silently.

What these CPU tests can and cannot prove. The Triton interpreter executes the same kernel
programs the GPU compiles (``benchmarks/static_report.py`` compiles them), but it reads raw host
memory: a load past a buffer returns whatever lies there (or crashes the process), exactly as a GPU
would read a neighbour's data. So every test here checks the address of each element every load
of the kernel reads, before the read (``checked_reads`` wraps the interpreter's load), against the
buffers the kernel was given: reads of a record buffer must stay inside the records of slots the
request owns (record by record, so a rank that ran past a slot's kept entries into its neighbour
is caught even though that memory is valid), and every other read inside a tensor passed to the
launch. Caches sit at the end of their allocation (the corrupt slot is the last record), so a
read past them would also leave the allocation. This proves the kernel program's masks and clamps
for these inputs; it cannot show timing-dependent behaviour, and the interpreter computes with
numpy (IEEE, denormals kept), so ``rsqrt`` of a denormal is finite here while the GPU's
flush-to-zero ``rsqrt`` returns inf: the tests check the kernel's explicit ``Qn < tiny -> 0``
guard through its results (which would be inf or NaN without it on a GPU), not the hardware.
"""

import contextlib
import math
import os

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from tests.test_kernels_decode import (  # noqa: E402
    DEVICE,
    assert_close_to_reference,
    build_cache,
    generator,
    poisoned_outputs,
    reference_decode,
)
from tests.test_kernels_extend import _indptr, reference_extend  # noqa: E402

from spark_sglang.kernels import decode, extend, layout, reference  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
    pytest.mark.skipif(DEVICE == "cuda", reason="reads are recorded through the Triton interpreter"),
]

HEAD_DIM, NUM_KV_HEADS, GROUP = 64, 2, 2
NUM_HEADS = NUM_KV_HEADS * GROUP


@contextlib.contextmanager
def checked_reads(records: list[torch.Tensor], live_slots, others: list[torch.Tensor]):
    """Within the block, every element an interpreted Triton load reads is checked before it is
    read (``assert_in_bounds``); a stray address fails the test instead of reading (or faulting
    on) memory the kernel does not own."""
    from triton.runtime import interpreter

    builder = type(interpreter.interpreter_builder)
    original = builder.create_masked_load

    def create_masked_load(self, ptrs, mask, other, *args):
        addresses = np.broadcast_to(ptrs.data, np.shape(mask.data))[np.asarray(mask.data, dtype=bool)]
        element = ptrs.get_element_ty()
        size = np.dtype(interpreter._get_np_dtype(element)).itemsize
        assert_in_bounds(addresses.astype(np.int64), size, str(element), records, live_slots, others)
        return original(self, ptrs, mask, other, *args)

    builder.create_masked_load = create_masked_load
    try:
        yield
    finally:
        builder.create_masked_load = original


def _span(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def assert_in_bounds(addresses, size, element: str, records: list[torch.Tensor], live_slots, others):
    """Reads of ``size``-byte ``element``s at ``addresses``: inside a record buffer (given by its
    ``kept`` view ``[S, H, T]``, records contiguous) they stay inside the records of
    ``live_slots`` (any head), each within one record, and reads of kept entries (the cache dtype:
    use a cache dtype no other record part has) within the record's ``T`` kept entries; any other
    read lies inside one of ``others`` (tensors)."""
    live = torch.zeros(records[0].shape[0], dtype=torch.bool)
    live[torch.as_tensor(live_slots).long()] = True
    unchecked = np.ones(len(addresses), dtype=bool)
    for kept in records:
        record_bytes = kept.stride(1) * kept.element_size()
        assert kept.stride(0) * kept.element_size() == kept.shape[1] * record_bytes
        start = kept.data_ptr()
        inside = (addresses >= start) & (addresses < start + kept.shape[0] * kept.shape[1] * record_bytes)
        offset = addresses[inside] - start
        assert ((offset % record_bytes) + size <= record_bytes).all(), "a read crosses a record's end"
        if element == str(kept.dtype).replace("torch.", "").replace("float", "fp"):
            kept_bytes = kept.shape[-1] * kept.element_size()
            assert ((offset % record_bytes) + size <= kept_bytes).all(), "a rank past the slot's kept entries"
        slot = torch.from_numpy(offset // record_bytes // kept.shape[1])
        assert live[slot].all(), f"read records of slots {sorted(set(slot[~live[slot]].tolist()))} outside the batch"
        unchecked &= ~inside
    rest = addresses[unchecked]
    ok = np.zeros(len(rest), dtype=bool)
    for start, end in map(_span, others):
        ok |= (rest >= start) & (rest + size <= end)
    assert ok.all(), f"{(~ok).sum()} reads outside every buffer given to the kernel"


def records_of(cache) -> list[torch.Tensor]:
    """The ``kept`` views that start the cache's record buffers (dense values are plain)."""
    buffers = [cache.keys.kept]
    if isinstance(cache.values, reference.PackedValues):
        buffers.append(cache.values.kept)
    return buffers


def plain_tensors(cache, *tensors) -> list[torch.Tensor]:
    dense_values = [] if isinstance(cache.values, reference.PackedValues) else [cache.values]
    return [cache.window_stats, cache.slot_rows, *dense_values, *tensors]


def run_decode(cache, q, indptr, indices, split_len=16):
    wrapper = decode.SparKDecodeWrapper(NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, device=DEVICE, block_n=16, num_sms=4)
    wrapper.plan(indptr, indices, split_len=split_len)
    out, lse = poisoned_outputs(q.shape[0], NUM_HEADS, HEAD_DIM, q.dtype)
    scratch = [wrapper._mid_o, wrapper._mid_lse, wrapper.num_splits, indptr, indices, q]
    with checked_reads(records_of(cache), indices, plain_tensors(cache, *scratch)):
        wrapper.run(q, cache.keys, cache.values, cache.window_stats, cache.slot_rows, out=out, lse=lse)
    return out, lse


def two_requests(num_slots):
    """Request 0: slots 0..14; request 1: 15..num_slots-1, ending with the last record in memory."""
    indices = torch.arange(num_slots, dtype=torch.int64)
    return _indptr([15, num_slots - 15]), indices


def test_corrupt_bitmaps_read_only_their_own_record():
    """Bitmaps with more than T bits set (one all-ones, in the last record of the allocation; one
    with a single extra bit) read as all-pruned: no load leaves the slot's record, outputs stay
    finite, and the request without corrupt slots equals the reference."""
    gen = torch.Generator().manual_seed(11)
    num_slots = 40
    indptr, indices = two_requests(num_slots)
    cache = build_cache(gen, num_slots, indices, NUM_KV_HEADS, HEAD_DIM, torch.float32, 0.5, "mean", 0.5)
    cache.keys.mask[num_slots - 1] = -1
    cache.values.mask[num_slots - 1] = -1
    word = cache.keys.mask[20, 1, 0]
    cache.keys.mask[20, 1, 0] = word | (~word & -~word)  # set the lowest clear bit: T + 1 bits
    assert reference.words_to_bits(cache.keys.mask[20, 1]).sum() == cache.keys.kept.shape[-1] + 1
    q = torch.randn(2, NUM_HEADS, HEAD_DIM, generator=gen)
    out, lse = run_decode(cache, q, indptr, indices)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    expect_out, expect_lse = reference_decode(q, cache, indptr, indices, 1 / math.sqrt(HEAD_DIM), 0.0)
    assert_close_to_reference(out[:1], lse[:1], expect_out[:1], expect_lse[:1], torch.float32)

    # The same prefix under extend: the first request's prefix is clean, the second's corrupt.
    q_new = torch.randn(6, NUM_HEADS, HEAD_DIM, generator=gen)
    kv_new = torch.randn(6, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    qo_indptr = _indptr([3, 3])
    given = plain_tensors(cache, q_new, kv_new, qo_indptr, indptr, indices)
    with checked_reads(records_of(cache), indices, given):
        out, lse = extend.extend_attention(
            q_new, kv_new, kv_new, qo_indptr, indptr, indices,
            cache.keys, cache.values, cache.window_stats, cache.slot_rows, block_m=8, block_n=16,
        )  # fmt: skip
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    expect = reference_extend(q_new, kv_new, kv_new, qo_indptr, cache.dense_keys[indices], cache.dense_values[indices],
                              indptr, 1 / math.sqrt(HEAD_DIM), 0.0)  # fmt: skip
    assert_close_to_reference(out[:3], lse[:3], expect[0][:3], expect[1][:3], torch.float32)


def test_corrupt_window_row_ids_are_clamped():
    """A slot row id past the table (or negative) is clamped into it: the slot is recovered with
    the table's last (first) row, reads stay in the table, and the result is the reference's over
    the clamped rows."""
    gen = torch.Generator().manual_seed(12)
    num_slots = 40
    indptr, indices = two_requests(num_slots)
    cache = build_cache(gen, num_slots, indices, NUM_KV_HEADS, HEAD_DIM, torch.float32, 0.5, "mean", 0.0)
    table = cache.window_stats
    table[-1] = 0.5  # the last row (NaN in the fixture, only unused slots point at it) made finite
    for slot, row_id, clamped in ((7, 10**6, table.shape[0] - 1), (30, -5, 0)):
        cache.slot_rows[slot] = row_id
        packed = reference.PackedKeys(*(t[slot] for t in cache.keys))
        cache.dense_keys[slot] = reference.unpack_keys(packed, table[clamped, 0].float())
    q = torch.randn(2, NUM_HEADS, HEAD_DIM, generator=gen)
    out, lse = run_decode(cache, q, indptr, indices)
    expect = reference_decode(q, cache, indptr, indices, 1 / math.sqrt(HEAD_DIM), 0.0)
    assert_close_to_reference(out, lse, *expect, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_zero_and_denormal_window_norms_recover_to_zero(dtype):
    """Window norms of 0 and below the smallest normal float (bfloat16 denormals) recover to 0,
    as the reference does; a GPU's rsqrt of either is inf, and inf * 0 is NaN."""
    gen = torch.Generator().manual_seed(13)
    num_slots, num_rows = 40, 2
    indptr, indices = two_requests(num_slots)
    stats = torch.rand(num_rows + 1, 2, NUM_KV_HEADS, HEAD_DIM, generator=gen) + 0.05
    stats[:, 0, :, 0::4] = 0.0
    stats[:, 0, :, 1::4] = 1e-39  # a bfloat16 denormal
    stats[:, 0, :, 2::8] = 2e-38  # just above the smallest normal: recovered normally
    assert (stats[:, 0, :, 1::4].to(layout.STATS_DTYPE) > 0).all()
    cache = build_cache(gen, num_slots, indices, NUM_KV_HEADS, HEAD_DIM, dtype, 0.5, "mean", 0.0,
                        num_rows=num_rows, stats=stats)  # fmt: skip
    q = torch.randn(2, NUM_HEADS, HEAD_DIM, generator=gen).to(dtype)
    out, lse = run_decode(cache, q, indptr, indices)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    expect = reference_decode(q, cache, indptr, indices, 1 / math.sqrt(HEAD_DIM), 0.0)
    assert_close_to_reference(out, lse, *expect, dtype)


def test_fp16_recovered_keys_that_overflow_are_clamped():
    """An fp16 cache whose recovered keys exceed 65504 (tiny window norms on pruned channels) gets
    them clamped to the largest finite half, as the reference: scores stay finite."""
    gen = torch.Generator().manual_seed(14)
    num_slots, num_rows = 40, 2
    indptr, indices = two_requests(num_slots)
    stats = torch.rand(num_rows + 1, 2, NUM_KV_HEADS, HEAD_DIM, generator=gen) + 0.05
    stats[:, 0, :, ::3] = 1e-20  # least salient: pruned, recovered as fill * 1e10
    cache = build_cache(gen, num_slots, indices, NUM_KV_HEADS, HEAD_DIM, torch.float16, 0.5, "mean", 0.0,
                        num_rows=num_rows, stats=stats)  # fmt: skip
    assert cache.dense_keys[indices].abs().max() == 65504
    q = torch.randn(2, NUM_HEADS, HEAD_DIM, generator=gen).to(torch.float16) * 1e-3
    out, lse = run_decode(cache, q, indptr, indices)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    expect_out, expect_lse = reference_decode(q, cache, indptr, indices, 1 / math.sqrt(HEAD_DIM), 0.0)
    torch.testing.assert_close(out.float(), expect_out, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(lse, expect_lse, rtol=1e-5, atol=1e-3)


def test_poisoned_unused_slots_are_never_read():
    """Slots outside the batch hold NaN entries and all-ones bitmaps: no load touches them (not even
    the tile rows past a request's end), so nothing of them reaches the output."""
    gen = torch.Generator().manual_seed(15)
    num_slots = 64
    live = torch.randperm(num_slots, generator=gen)[:23]
    indptr = _indptr([1, 22])
    cache = build_cache(gen, num_slots, live, NUM_KV_HEADS, HEAD_DIM, torch.float32, 0.8, "mean", 0.5)
    q = torch.randn(2, NUM_HEADS, HEAD_DIM, generator=gen)
    out, lse = run_decode(cache, q, indptr, live, split_len=32)  # asserts no read of an unused record
    expect = reference_decode(q, cache, indptr, live, 1 / math.sqrt(HEAD_DIM), 0.0)
    assert_close_to_reference(out, lse, *expect, torch.float32)
