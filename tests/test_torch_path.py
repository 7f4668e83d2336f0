"""The CPU paths against the reference and against the Triton kernels, on the kernel tests' random
caches: ragged batches, paged and scattered slots, GQA, both recoveries, dense and compressed
values, poisoned outputs and poisoned unused slots. Decode and extend run on each CPU
implementation: the PyTorch path (kernels/torch_path.py) and the C++ extension (kernels/cpp_path.py),
native (AVX-512 where the machine has it) and portable builds. bf16 runs here too: these paths
compute it correctly on a CPU (the Triton interpreter does not)."""

import math
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from tests.test_kernels_compress import CASES as COMPRESS_CASES  # noqa: E402
from tests.test_kernels_compress import POISON_BYTE, _inputs, assert_packed_equal, poisoned_records  # noqa: E402
from tests.test_kernels_compress import _bits, _case_id as compress_case_id  # noqa: E402
from tests.test_kernels_decode import (  # noqa: E402
    CASES as DECODE_CASES,
    _case_id,
    assert_close_to_reference,
    build_cache,
    cache_scale,
    paged_batch,
    poisoned_outputs,
    query_dtype,
    reference_decode,
)
from tests.test_kernels_extend import CASES as EXTEND_CASES  # noqa: E402
from tests.test_kernels_extend import _indptr, reference_extend  # noqa: E402

from spark_sglang.kernels import compress, cpp_path, decode, extend, layout, reference, torch_path  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

BF16 = [
    # dtype, head_dim, group, key_ratio, recovery, value_ratio, page_size, logit_cap
    (torch.bfloat16, 64, 3, 0.5, "mean", 0.0, 1, 0.0),
    (torch.bfloat16, 128, 4, 0.8, "mean", 0.5, 16, 0.0),
    (torch.bfloat16, 64, 1, 0.5, "zero", 0.8, 4, 30.0),
]


#: name -> (decode wrapper class, extend function)
CPU_PATHS = {
    "torch": (torch_path.TorchDecodeWrapper, torch_path.extend_attention),
    "cpp": (cpp_path.CppDecodeWrapper, cpp_path.extend_attention),
    "cpp-portable": (cpp_path.PortableDecodeWrapper,
                     lambda *args, **kwargs: cpp_path.extend_attention(*args, portable=True, **kwargs)),
}


@pytest.fixture(params=list(CPU_PATHS))
def cpu_path(request):
    return CPU_PATHS[request.param]


def generator(request) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.name.encode()))


def _unique(cases):
    return list(dict.fromkeys(cases))


@pytest.mark.parametrize("case", _unique(DECODE_CASES + BF16), ids=_case_id)
def test_decode_matches_reference(request, case, cpu_path):
    dtype, head_dim, group, key_ratio, recovery, value_ratio, page_size, logit_cap = case
    gen = generator(request)
    num_kv_heads = 2
    num_heads = num_kv_heads * group
    lens = [1, 15, 17, 0, 93]
    indptr, indices, num_slots = paged_batch(gen, lens, page_size)
    scale = cache_scale(dtype)
    cache = build_cache(gen, num_slots, indices, num_kv_heads, head_dim, dtype, key_ratio, recovery, value_ratio,
                        scale=scale)  # fmt: skip
    q = torch.randn(len(lens), num_heads, head_dim, generator=gen).to(query_dtype(dtype))
    sm_scale = 1.3 / math.sqrt(head_dim)

    wrapper = cpu_path[0](num_heads, num_kv_heads, head_dim)
    wrapper.plan(indptr, indices)
    out, lse = poisoned_outputs(len(lens), num_heads, head_dim, query_dtype(dtype))
    args = (cache.keys, cache.values, cache.window_stats, cache.slot_rows)
    wrapper.run(q, *args, sm_scale=sm_scale, logit_cap=logit_cap, out=out, lse=lse, k_scale=scale, v_scale=scale)

    empty = 3
    assert (out[empty] == 0).all() and (lse[empty] == float("-inf")).all()
    keep = [b for b in range(len(lens)) if b != empty]
    expect_out, expect_lse = reference_decode(q, cache, indptr, indices, sm_scale, logit_cap)
    assert_close_to_reference(out[keep], lse[keep], expect_out[keep], expect_lse[keep], dtype)


@pytest.mark.parametrize("case", _unique(EXTEND_CASES + BF16), ids=_case_id)
def test_extend_matches_reference(request, case, cpu_path):
    dtype, head_dim, group, key_ratio, recovery, value_ratio, page_size, logit_cap = case
    gen = generator(request)
    num_kv_heads = 2
    num_heads = num_kv_heads * group
    prefix_lens, q_lens = [0, 15, 17, 50], [17, 1, 15, 5]
    prefix_indptr, prefix_indices, num_slots = paged_batch(gen, prefix_lens, page_size)
    scale = cache_scale(dtype)
    cache = build_cache(gen, num_slots, prefix_indices, num_kv_heads, head_dim, dtype, key_ratio, recovery,
                        value_ratio, scale=scale)  # fmt: skip
    qo_indptr = _indptr(q_lens)
    num_q = sum(q_lens)
    model_dtype = query_dtype(dtype)
    q = torch.randn(num_q, num_heads, head_dim, generator=gen).to(model_dtype)
    k = torch.randn(num_q, num_kv_heads, head_dim, generator=gen).to(model_dtype)
    v = torch.randn(num_q, num_kv_heads, head_dim, generator=gen).to(model_dtype)
    sm_scale = 0.9 / math.sqrt(head_dim)

    out, lse = poisoned_outputs(num_q, num_heads, head_dim, model_dtype)
    cpu_path[1](
        q, k, v, qo_indptr, prefix_indptr, prefix_indices,
        cache.keys, cache.values, cache.window_stats, cache.slot_rows,
        sm_scale=sm_scale, logit_cap=logit_cap, out=out, lse=lse, k_scale=scale, v_scale=scale,
    )  # fmt: skip
    slots = prefix_indices.long()
    expect = reference_extend(q, k, v, qo_indptr, cache.dense_keys[slots], cache.dense_values[slots],
                              prefix_indptr, sm_scale, logit_cap)  # fmt: skip
    assert_close_to_reference(out, lse, *expect, dtype)


@pytest.mark.parametrize("case", COMPRESS_CASES, ids=compress_case_id)
def test_compress_matches_reference_bit_for_bit(request, case):
    """Every stored bit (fills included) equals the reference's; other slots and the records'
    padding keep their poison."""
    dtype, head_dim, key_ratio, recovery, value_ratio, slot_dtype, ties = case
    gen = generator(request)
    num_tokens, num_heads, num_slots, num_rows = 21, 2, 64, 3
    k, v, stats = _inputs(gen, num_tokens, num_heads, head_dim, query_dtype(dtype), num_rows, ties)
    stats = stats.to(layout.STATS_DTYPE)
    scale = cache_scale(dtype)
    slots = torch.randperm(num_slots, generator=gen)[:num_tokens].to(slot_dtype)
    rows = torch.randint(0, num_rows, (num_tokens,), generator=gen, dtype=torch.int32)
    config = reference.SparKConfig(key_ratio=key_ratio, value_ratio=value_ratio, recovery=recovery)
    lay = config.layout(head_dim, dtype)
    storage, keys, values = poisoned_records(lay, num_slots, num_heads)
    before = [t.clone() for t in storage]
    torch_path.compress_and_store(k, v, slots, rows, stats if value_ratio else stats[:, :1], keys, values,
                                  k_scale=scale, v_scale=scale)  # fmt: skip

    at = slots.long()
    expect_k = reference.pack_keys(k, stats[rows.long(), 0], key_ratio, recovery, dtype=dtype, scale=scale)
    for got, want in zip(keys, expect_k):
        assert (got is None) == (want is None)
        if want is not None:
            assert torch.equal(_bits(got[at]), _bits(want))
    if value_ratio:
        expect_v = reference.pack_values(v, stats[rows.long(), 1], value_ratio, dtype=dtype, scale=scale)
        assert all(torch.equal(_bits(got[at]), _bits(want)) for got, want in zip(values, expect_v))
    else:
        assert torch.equal(_bits(values[at]), _bits(reference.to_storage(v, dtype, scale)))
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[at] = False
    for old, new in zip(before, storage):
        assert torch.equal(old[untouched], new[untouched])
    padding_start = lay.key_fill_offset + (2 if lay.stores_sign else 0)
    assert (storage[0][at][..., padding_start:] == POISON_BYTE).all()


@pytest.mark.parametrize("value_ratio", [0.0, 0.5])
def test_agrees_with_triton_kernels(request, value_ratio):
    """Both paths on one pool: compress the same tokens with each (identical bits), then decode
    and extend over it (outputs within float32 rounding)."""
    gen = generator(request)
    num_kv_heads, group, head_dim, dtype = 3, 3, 64, torch.float32
    num_heads, num_slots, num_rows = num_kv_heads * group, 160, 4
    lay = reference.SparKConfig(key_ratio=0.5, value_ratio=value_ratio).layout(head_dim, dtype)
    k, v, stats = _inputs(gen, 120, num_kv_heads, head_dim, dtype, num_rows, ties=False)
    stats = (stats if value_ratio else stats[:, :1]).to(layout.STATS_DTYPE)
    slots = torch.randperm(num_slots, generator=gen)[:120]
    rows = torch.randint(0, num_rows, (120,), generator=gen, dtype=torch.int32)
    slot_rows = torch.zeros(num_slots, dtype=torch.int32)
    slot_rows[slots] = rows
    caches = []
    for implementation in (compress.compress_and_store, torch_path.compress_and_store):
        _, keys, values = poisoned_records(lay, num_slots, num_kv_heads)
        implementation(k, v, slots, rows, stats, keys, values)
        caches.append((keys, values))
    for triton_packed, torch_packed in zip(*caches):
        if isinstance(torch_packed, torch.Tensor):
            assert torch.equal(triton_packed[slots], torch_packed[slots])
        else:  # the Triton kernel sums the fill in another order: one bfloat16 step at most
            assert_packed_equal(type(torch_packed)(*(t[slots] for t in triton_packed)),
                                type(torch_packed)(*(t[slots] for t in torch_packed)))  # fmt: skip
    keys, values = caches[1]
    cache = (keys, values, stats, slot_rows)

    lens = [1, 40, 79]
    indptr = _indptr(lens)
    q = torch.randn(len(lens), num_heads, head_dim, generator=gen)
    outs = []
    for wrapper in (decode.SparKDecodeWrapper(num_heads, num_kv_heads, head_dim, device="cpu"),
                    torch_path.TorchDecodeWrapper(num_heads, num_kv_heads, head_dim)):  # fmt: skip
        wrapper.plan(indptr, slots)
        outs.append(wrapper.run(q, *cache))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)

    q_lens = [3, 20, 1]
    qo_indptr = _indptr(q_lens)
    qn = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen)
    kn = torch.randn(sum(q_lens), num_kv_heads, head_dim, generator=gen)
    vn = torch.randn(sum(q_lens), num_kv_heads, head_dim, generator=gen)
    outs = [f(qn, kn, vn, qo_indptr, indptr, slots, *cache) for f in (extend.extend_attention,
                                                                      torch_path.extend_attention)]  # fmt: skip
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_words_to_bits_matches_reference():
    words = torch.randint(-(2**31), 2**31 - 1, (7, 3, 4), dtype=torch.int32)
    words[0, 0] = torch.tensor([0, -1, -(2**31), 1], dtype=torch.int32)
    assert torch.equal(torch_path.words_to_bits(words), reference.words_to_bits(words))


def test_corrupt_bitmap_reads_as_all_pruned_and_stays_in_its_slot():
    """A bitmap with more set bits than kept entries reads as all-pruned (as the Triton kernels do):
    no read leaves the slot, the output stays finite and other requests are untouched."""
    gen = torch.Generator().manual_seed(1)
    cache = build_cache(gen, 8, torch.arange(8), 1, 64, torch.float32, 0.5, "mean", 0.0)
    q = torch.randn(2, 2, 64, generator=gen)
    wrapper = torch_path.TorchDecodeWrapper(2, 1, 64)
    wrapper.plan(_indptr([4, 4]), torch.arange(8))
    args = (cache.values, cache.window_stats, cache.slot_rows)
    clean_out, _ = wrapper.run(q, cache.keys, *args)
    clean_out = clean_out.clone()
    cache.keys.mask[5, 0, 0] = -1  # 32 + popcount(word 1) > 32 kept entries
    out, lse = wrapper.run(q, cache.keys, *args)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out[0], clean_out[0], rtol=0, atol=0)
    keep = torch_path.words_to_bits(cache.keys.mask[5:6].transpose(0, 1))
    assert not torch_path.sane_bitmaps(keep, cache.keys.kept.shape[-1]).any()
