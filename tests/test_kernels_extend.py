"""extend_attention against reference.attention over concat(unpacked prefix, new dense tokens)
with causal offset = prefix length; then a prefill -> compress -> decode round trip."""

import math
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from tests.test_kernels_decode import (  # noqa: E402
    DEVICE,
    _case_id,
    assert_close_to_reference,
    build_cache,
    cache_scale,
    paged_batch,
    poisoned_outputs,
    query_dtype,
)

from spark_sglang.kernels import compress, decode, extend, layout, reference  # noqa: E402
from tests.test_kernels_compress import poisoned_records  # noqa: E402

BLOCK_M, BLOCK_N = 16, 16

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def generator(request) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.name.encode()))


def _indptr(lens) -> torch.Tensor:
    return torch.tensor([0] + list(lens), dtype=torch.int64).cumsum(0).to(torch.int32)


def reference_extend(
    q, k, v, qo_indptr, prefix_keys, prefix_values, prefix_indptr, sm_scale, logit_cap
):
    outs, lses = [], []
    for b in range(qo_indptr.numel() - 1):
        rows = slice(qo_indptr[b], qo_indptr[b + 1])
        prefix = slice(prefix_indptr[b], prefix_indptr[b + 1])
        o, lse = reference.attention(
            q[rows],
            torch.cat([prefix_keys[prefix], k[rows]]),
            torch.cat([prefix_values[prefix], v[rows]]),
            sm_scale,
            causal_offset=prefix.stop - prefix.start,
            logit_cap=logit_cap,
        )
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


CASES = [
    # dtype, head_dim, group, key_ratio, recovery, value_ratio, page_size, logit_cap
    (torch.float32, 64, 1, 0.5, "mean", 0.0, 1, 0.0),
    (torch.float32, 64, 4, 0.8, "zero", 0.5, 1, 0.0),
    (torch.float32, 128, 8, 0.5, "mean", 0.5, 4, 0.0),
    (torch.float32, 128, 4, 0.0, "zero", 0.0, 1, 0.0),
    (torch.float32, 32, 4, 0.5, "mean", 0.0, 1, 3.0),
    (torch.float16, 64, 4, 0.5, "mean", 0.5, 1, 0.0),
    (torch.float16, 128, 1, 0.8, "mean", 0.0, 16, 0.0),
    (torch.float8_e4m3fn, 64, 3, 0.5, "mean", 0.0, 1, 0.0),
    (torch.float8_e5m2, 128, 2, 0.6, "mean", 0.5, 4, 0.0),
]
if DEVICE == "cuda":
    CASES += [
        (torch.bfloat16, 128, 4, 0.5, "mean", 0.0, 1, 0.0),
        (torch.bfloat16, 128, 8, 0.8, "mean", 0.8, 16, 0.0),
    ]


@pytest.mark.parametrize(
    "dtype,head_dim,group,key_ratio,recovery,value_ratio,page_size,logit_cap",
    CASES,
    ids=[_case_id(c) for c in CASES],
)
def test_extend_matches_reference(
    request, dtype, head_dim, group, key_ratio, recovery, value_ratio, page_size, logit_cap
):
    gen = generator(request)
    num_kv_heads = 2
    num_heads = num_kv_heads * group
    # Prefix lengths around a KV tile (and none); extends around a query tile (and a single token).
    prefix_lens = [0, BLOCK_N - 1, BLOCK_N + 1, 3 * BLOCK_N + 2]
    q_lens = [BLOCK_M + 1, 1, BLOCK_M - 1, 5]
    prefix_indptr, prefix_indices, num_slots = paged_batch(gen, prefix_lens, page_size)
    scale = cache_scale(dtype)
    cache = build_cache(
        gen, num_slots, prefix_indices, num_kv_heads, head_dim, dtype, key_ratio, recovery, value_ratio,
        scale=scale,
    )  # fmt: skip
    qo_indptr = _indptr(q_lens)
    num_q = sum(q_lens)
    q = torch.randn(num_q, num_heads, head_dim, generator=gen).to(query_dtype(dtype))
    k = torch.randn(num_q, num_kv_heads, head_dim, generator=gen).to(query_dtype(dtype))
    v = torch.randn(num_q, num_kv_heads, head_dim, generator=gen).to(query_dtype(dtype))
    sm_scale = 0.9 / math.sqrt(head_dim)

    out, lse = poisoned_outputs(num_q, num_heads, head_dim, query_dtype(dtype))
    extend.extend_attention(
        q.to(DEVICE), k.to(DEVICE), v.to(DEVICE),
        qo_indptr.to(DEVICE), prefix_indptr.to(DEVICE), prefix_indices.to(DEVICE),
        cache.keys, cache.values, cache.window_stats, cache.slot_rows,
        max_q_len=max(q_lens), sm_scale=sm_scale, logit_cap=logit_cap, out=out, lse=lse,
        block_m=BLOCK_M, block_n=BLOCK_N, k_scale=scale, v_scale=scale,
    )  # fmt: skip

    slots = prefix_indices.long()
    expect = reference_extend(
        q,
        k,
        v,
        qo_indptr,
        cache.dense_keys[slots],
        cache.dense_values[slots],
        prefix_indptr,
        sm_scale,
        logit_cap,
    )
    assert_close_to_reference(out, lse, *expect, dtype)


def test_extend_empty_batch():
    q = torch.empty(0, 4, 64, device=DEVICE)
    kv = torch.empty(0, 2, 64, device=DEVICE)
    cache = build_cache(
        torch.Generator().manual_seed(0), 4, torch.arange(4), 2, 64, torch.float32, 0.5, "zero", 0.0
    )
    zeros = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    out, lse = extend.extend_attention(
        q,
        kv,
        kv,
        zeros,
        zeros,
        zeros[:0],
        cache.keys,
        cache.values,
        cache.window_stats,
        cache.slot_rows,
    )
    assert out.shape == (0, 4, 64) and lse.shape == (0, 4)


def test_prefill_compress_decode_round_trip(request):
    """Extend over a compressed prefix, store the new tokens with compress_and_store, then decode
    over everything: each step equals the reference over the reference's packing. Default tiles."""
    gen = generator(request)
    num_kv_heads, group, head_dim, dtype = 2, 4, 64, torch.float32
    key_ratio, value_ratio, recovery = 0.5, 0.5, "mean"
    num_heads = num_kv_heads * group
    prefix_lens, q_lens = [40, 0], [9, 70]
    num_slots, num_rows = 256, 2

    # Window statistics: row b from request b's own window queries and values.
    window = torch.randn(len(q_lens), 8, num_heads, head_dim, generator=gen)
    k_all = [
        torch.randn(p + n, num_kv_heads, head_dim, generator=gen)
        for p, n in zip(prefix_lens, q_lens)
    ]
    v_all = [
        torch.randn(p + n, num_kv_heads, head_dim, generator=gen)
        for p, n in zip(prefix_lens, q_lens)
    ]
    stats = torch.stack(
        [
            torch.stack(
                [
                    reference.window_channel_norm(window[b], num_kv_heads),
                    reference.value_channel_bias(v_all[b]),
                ]
            )
            for b in range(num_rows)
        ]
    ).to(layout.STATS_DTYPE)

    config = reference.SparKConfig(key_ratio=key_ratio, value_ratio=value_ratio, recovery=recovery)
    _, keys, values = poisoned_records(config.layout(head_dim, dtype), num_slots, num_kv_heads)
    slot_rows = torch.full((num_slots,), num_rows, dtype=torch.int32)  # out of range: never read
    slots = torch.randperm(num_slots, generator=gen)[: sum(prefix_lens) + sum(q_lens)].split(
        [n for pair in zip(prefix_lens, q_lens) for n in pair]
    )
    prefix_slots, new_slots = slots[0::2], slots[1::2]

    def store(part_slots, part_k, part_v, b):
        rows = torch.full((len(part_slots),), b, dtype=torch.int32)
        slot_rows[part_slots] = rows
        compress.compress_and_store(
            part_k.to(DEVICE),
            part_v.to(DEVICE),
            part_slots.to(DEVICE),
            rows.to(DEVICE),
            stats.to(DEVICE),
            keys,
            values,
        )

    for b, p in enumerate(prefix_lens):
        store(prefix_slots[b], k_all[b][:p], v_all[b][:p], b)

    def unpacked(b, n):
        """The reference's packing of request b's first n tokens, unpacked."""
        norm = stats[b, 0].expand(n, -1, -1)
        pk = reference.pack_keys(k_all[b][:n], norm, key_ratio, recovery)
        pv = reference.pack_values(v_all[b][:n], stats[b, 1], value_ratio)
        return reference.unpack_keys(pk, norm), reference.unpack_values(pv)

    # Prefill.
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=gen)
    k_new = torch.cat([k_all[b][p:] for b, p in enumerate(prefix_lens)])
    v_new = torch.cat([v_all[b][p:] for b, p in enumerate(prefix_lens)])
    qo_indptr, prefix_indptr = _indptr(q_lens), _indptr(prefix_lens)
    out, lse = extend.extend_attention(
        q.to(DEVICE), k_new.to(DEVICE), v_new.to(DEVICE),
        qo_indptr.to(DEVICE), prefix_indptr.to(DEVICE), torch.cat(list(prefix_slots)).to(DEVICE),
        keys, values, stats.to(DEVICE), slot_rows.to(DEVICE),
    )  # fmt: skip
    prefix_k, prefix_v = zip(*(unpacked(b, p) for b, p in enumerate(prefix_lens)))
    expect = reference_extend(
        q,
        k_new,
        v_new,
        qo_indptr,
        torch.cat(prefix_k),
        torch.cat(prefix_v),
        prefix_indptr,
        1 / 8,
        0.0,
    )
    assert_close_to_reference(out, lse, *expect, dtype)

    # Store the new tokens compressed, then decode one more query per request over everything.
    for b, p in enumerate(prefix_lens):
        store(new_slots[b], k_all[b][p:], v_all[b][p:], b)
    kv_lens = [p + n for p, n in zip(prefix_lens, q_lens)]
    kv_indptr = _indptr(kv_lens).to(DEVICE)
    kv_indices = torch.cat(
        [torch.cat([prefix_slots[b], new_slots[b]]) for b in range(len(kv_lens))]
    ).to(DEVICE)
    wrapper = decode.SparKDecodeWrapper(num_heads, num_kv_heads, head_dim, device=DEVICE)
    wrapper.plan(kv_indptr, kv_indices)
    q_dec = torch.randn(len(kv_lens), num_heads, head_dim, generator=gen)
    out, lse = wrapper.run(q_dec.to(DEVICE), keys, values, stats.to(DEVICE), slot_rows.to(DEVICE))
    for b, n in enumerate(kv_lens):
        k_ref, v_ref = unpacked(b, n)
        expect = reference.attention(q_dec[b : b + 1], k_ref, v_ref, 1 / 8)
        assert_close_to_reference(out[b : b + 1], lse[b : b + 1], *expect, dtype)
