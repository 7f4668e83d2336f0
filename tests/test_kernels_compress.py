"""compress_and_store against reference.pack_keys / pack_values: bit-equal kept entries, bitmaps
and signs, float32-close fills, nothing written outside the batch's slots."""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from spark_sglang.kernels import compress, reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
POISON_INT = -0x5A5A5A5B  # an int32 with scattered bits, never a valid bitmap here

# Reading a window norm of 0 evaluates rsqrt(0) = inf in the branch where() discards.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _generator(request) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.name.encode()))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a float tensor, so NaN and -0.0 compare exactly."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _poisoned(shape, dtype):
    if dtype == torch.int32:
        return torch.full(shape, POISON_INT, dtype=dtype, device=DEVICE)
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def _inputs(gen, num_tokens, num_heads, head_dim, dtype, num_rows, ties):
    if ties:
        # Few distinct magnitudes, exact zeros and repeated norms: selection decided by ties.
        k = torch.randint(-3, 4, (num_tokens, num_heads, head_dim), generator=gen) * 0.5
        v = torch.randint(-2, 3, (num_tokens, num_heads, head_dim), generator=gen) * 0.25
        stats = torch.randint(0, 3, (num_rows, 2, num_heads, head_dim), generator=gen) * 0.5
    else:
        k = torch.randn(num_tokens, num_heads, head_dim, generator=gen)
        v = torch.randn(num_tokens, num_heads, head_dim, generator=gen)
        stats = torch.rand(num_rows, 2, num_heads, head_dim, generator=gen)
        stats[:, 0, :, ::5] = 0  # window channels that never fired
        k[0, 0, :4] = 0
    return k.to(dtype), v.to(dtype), stats.float()


CASES = [
    # dtype, head_dim, key_ratio, recovery, value_ratio, slot dtype, ties
    (torch.float32, 64, 0.5, "mean", 0.0, torch.int64, False),
    (torch.float32, 128, 0.8, "mean", 0.5, torch.int32, False),
    (torch.float32, 128, 0.5, "zero", 0.5, torch.int64, True),
    (torch.float32, 32, 0.0, "mean", 0.0, torch.int64, False),
    (torch.float32, 256, 0.5, "mean", 0.5, torch.int64, False),
    (torch.float16, 64, 0.8, "zero", 0.0, torch.int32, False),
    (torch.float16, 128, 0.5, "mean", 0.5, torch.int64, True),
    (torch.float16, 32, 0.5, "mean", 0.5, torch.int32, True),
]


def _case_id(case) -> str:
    dtype, head_dim, key_ratio, recovery, value_ratio, slot_dtype, ties = case
    values = f"v{value_ratio}" if value_ratio else "vdense"
    name = f"{str(dtype)[6:]}-d{head_dim}-k{key_ratio}-{recovery}-{values}-{str(slot_dtype)[6:]}"
    return name + ("-ties" if ties else "")


@pytest.mark.parametrize(
    "dtype,head_dim,key_ratio,recovery,value_ratio,slot_dtype,ties",
    CASES,
    ids=[_case_id(c) for c in CASES],
)
def test_compress_matches_reference(
    request, dtype, head_dim, key_ratio, recovery, value_ratio, slot_dtype, ties
):
    gen = _generator(request)
    num_tokens, num_heads, num_slots, num_rows = 21, 2, 64, 3
    words = head_dim // 32
    kept, value_kept = head_dim - int(key_ratio * head_dim), head_dim - int(value_ratio * head_dim)
    k, v, stats = _inputs(gen, num_tokens, num_heads, head_dim, dtype, num_rows, ties)
    slots = torch.randperm(num_slots, generator=gen)[:num_tokens].to(slot_dtype)
    rows = torch.randint(0, num_rows, (num_tokens,), generator=gen, dtype=torch.int32)

    mean = recovery == "mean"
    key_cache = reference.PackedKeys(
        _poisoned((num_slots, num_heads, kept), dtype),
        _poisoned((num_slots, num_heads, words), torch.int32),
        _poisoned((num_slots, num_heads, words), torch.int32) if mean else None,
        _poisoned((num_slots, num_heads), torch.float32) if mean else None,
    )
    if value_ratio:
        value_cache = reference.PackedValues(
            _poisoned((num_slots, num_heads, value_kept), dtype),
            _poisoned((num_slots, num_heads, words), torch.int32),
            _poisoned((num_slots, num_heads), torch.float32),
        )
    else:
        value_cache = _poisoned((num_slots, num_heads, head_dim), dtype)
    before = [
        t.clone()
        for t in (*key_cache, *(value_cache if value_ratio else (value_cache,)))
        if t is not None
    ]

    # Dense values need no value bias: the kernel then gets a strided [R, 1, H, D] view.
    kernel_stats = (stats if value_ratio else stats[:, :1]).to(DEVICE)
    k_dev, v_dev = k.to(DEVICE), v.to(DEVICE)
    compress.compress_and_store(
        k_dev, v_dev, slots.to(DEVICE), rows.to(DEVICE), kernel_stats, key_cache, value_cache
    )

    at = slots.long().to(DEVICE)
    expect_k = reference.pack_keys(k, stats[rows.long(), 0], key_ratio, recovery)
    assert torch.equal(_bits(key_cache.kept[at].cpu()), _bits(expect_k.kept))
    assert torch.equal(key_cache.mask[at].cpu(), expect_k.mask)
    if mean:
        assert torch.equal(key_cache.sign[at].cpu(), expect_k.sign)
        torch.testing.assert_close(key_cache.fill[at].cpu(), expect_k.fill, rtol=1e-6, atol=0)
    if value_ratio:
        expect_v = reference.pack_values(v, stats[rows.long(), 1], value_ratio)
        assert torch.equal(_bits(value_cache.kept[at].cpu()), _bits(expect_v.kept))
        assert torch.equal(value_cache.mask[at].cpu(), expect_v.mask)
        torch.testing.assert_close(value_cache.fill[at].cpu(), expect_v.fill, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(_bits(value_cache[at].cpu()), _bits(v))

    # Slots outside the batch keep their poison, bit for bit.
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[slots.long()] = False
    after = [
        t for t in (*key_cache, *(value_cache if value_ratio else (value_cache,))) if t is not None
    ]
    for old, new in zip(before, after):
        old, new = old[untouched.to(DEVICE)], new[untouched.to(DEVICE)]
        assert torch.equal(
            _bits(old) if old.is_floating_point() else old,
            _bits(new) if new.is_floating_point() else new,
        )


def test_compress_empty_batch_is_a_no_op():
    head_dim, num_heads = 64, 2
    k = torch.empty(0, num_heads, head_dim, device=DEVICE)
    keys = reference.PackedKeys(
        _poisoned((4, num_heads, 32), torch.float32),
        _poisoned((4, num_heads, 2), torch.int32),
        None,
        None,
    )
    values = _poisoned((4, num_heads, head_dim), torch.float32)
    empty = torch.empty(0, dtype=torch.int32, device=DEVICE)
    stats = torch.ones(1, 2, num_heads, head_dim, device=DEVICE)
    compress.compress_and_store(k, k, empty, empty, stats, keys, values)
    assert (keys.mask == POISON_INT).all() and values.isnan().all()


def test_compress_rejects_mismatched_dtype():
    keys = reference.PackedKeys(
        _poisoned((4, 1, 32), torch.float16), _poisoned((4, 1, 2), torch.int32), None, None
    )
    k = torch.zeros(1, 1, 64, device=DEVICE)
    idx = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="key cache"):
        compress.compress_and_store(
            k,
            k,
            idx,
            idx,
            torch.ones(1, 2, 1, 64, device=DEVICE),
            keys,
            _poisoned((4, 1, 64), torch.float32),
        )
