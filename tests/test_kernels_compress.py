"""compress_and_store against reference.pack_keys / pack_values, writing into the pool's real
records (kernels/layout.py): bit-equal kept entries, bitmaps and signs, fills to one bfloat16
rounding step, nothing written outside the batch's slots (records poisoned with 0xFF bytes)."""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from spark_sglang.kernels import compress, layout, reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
POISON_INT = -0x5A5A5A5B  # an int32 with scattered bits, never a valid bitmap here
POISON_BYTE = 0xFF  # NaN in every float format, -1 as int32

# Reading a window norm of 0 evaluates rsqrt(0) = inf in the branch where() discards.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _generator(request) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.name.encode()))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern of a float tensor, so NaN and -0.0 compare exactly."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def poisoned_records(lay: layout.SlotLayout, num_slots: int, num_heads: int):
    """The pool's storage for one layer, every byte POISON_BYTE: (key records, value storage),
    and their typed views (PackedKeys, PackedValues or the dense value tensor)."""
    def raw(nbytes):
        return torch.full((num_slots, num_heads, nbytes), POISON_BYTE, dtype=torch.uint8, device=DEVICE)

    k_raw = raw(lay.key_record_bytes)
    keys = reference.PackedKeys(*layout.key_views(lay, k_raw))
    if lay.values_compressed:
        v_raw = raw(lay.value_record_bytes)
        values = reference.PackedValues(*layout.value_views(lay, v_raw))
    else:
        v_raw = raw(lay.head_dim * lay.esize)
        values = v_raw.view(lay.dtype)
    return (k_raw, v_raw), keys, values


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
    # dtype (cache), head_dim, key_ratio, recovery, value_ratio, slot dtype, ties
    (torch.float32, 64, 0.5, "mean", 0.0, torch.int64, False),
    (torch.float32, 128, 0.8, "mean", 0.5, torch.int32, False),
    (torch.float32, 128, 0.5, "zero", 0.5, torch.int64, True),
    (torch.float32, 32, 0.0, "mean", 0.0, torch.int64, False),
    (torch.float32, 256, 0.7, "mean", 0.5, torch.int64, False),
    (torch.float16, 64, 0.8, "zero", 0.0, torch.int32, False),
    (torch.float16, 128, 0.5, "mean", 0.5, torch.int64, True),
    (torch.float16, 32, 0.5, "mean", 0.5, torch.int32, True),
    (torch.bfloat16, 64, 0.5, "mean", 0.3, torch.int64, False),
    (torch.float8_e4m3fn, 64, 0.5, "mean", 0.0, torch.int64, False),
    (torch.float8_e4m3fn, 128, 0.8, "mean", 0.5, torch.int32, True),
    (torch.float8_e5m2, 64, 0.6, "zero", 0.5, torch.int64, False),
]


def _case_id(case) -> str:
    dtype, head_dim, key_ratio, recovery, value_ratio, slot_dtype, ties = case
    values = f"v{value_ratio}" if value_ratio else "vdense"
    name = f"{str(dtype)[6:]}-d{head_dim}-k{key_ratio}-{recovery}-{values}-{str(slot_dtype)[6:]}"
    return name + ("-ties" if ties else "")


def assert_packed_equal(stored, expected) -> None:
    """Stored parts equal the reference's bit for bit; fills (float32 sums in another order, then
    bfloat16) to one bfloat16 step."""
    for name, got, want in zip(expected._fields, stored, expected):
        if want is None:
            continue
        if name == "fill":
            torch.testing.assert_close(got.float().cpu(), want.float(), rtol=2**-7, atol=0)
        else:
            assert torch.equal(_bits(got.cpu()), _bits(want)), name


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
    model_dtype = torch.float32 if dtype in layout.FP8_DTYPES else dtype
    k, v, stats = _inputs(gen, num_tokens, num_heads, head_dim, model_dtype, num_rows, ties)
    stats = stats.to(layout.STATS_DTYPE)
    scale = 0.5 if dtype in layout.FP8_DTYPES else 1.0
    slots = torch.randperm(num_slots, generator=gen)[:num_tokens].to(slot_dtype)
    rows = torch.randint(0, num_rows, (num_tokens,), generator=gen, dtype=torch.int32)
    config = reference.SparKConfig(key_ratio=key_ratio, value_ratio=value_ratio, recovery=recovery)
    storage, key_cache, value_cache = poisoned_records(config.layout(head_dim, dtype), num_slots, num_heads)
    before = [t.clone() for t in storage]

    # Dense values need no value bias: the kernel then gets a strided [R, 1, H, D] view.
    kernel_stats = (stats if value_ratio else stats[:, :1]).to(DEVICE)
    compress.compress_and_store(
        k.to(DEVICE), v.to(DEVICE), slots.to(DEVICE), rows.to(DEVICE), kernel_stats, key_cache, value_cache,
        k_scale=scale, v_scale=scale,
    )  # fmt: skip

    at = slots.long().to(DEVICE)
    norm = stats[rows.long(), 0]
    expect_k = reference.pack_keys(k, norm, key_ratio, recovery, dtype=dtype, scale=scale)
    assert_packed_equal(reference.PackedKeys(*(None if t is None else t[at] for t in key_cache)), expect_k)
    if value_ratio:
        expect_v = reference.pack_values(v, stats[rows.long(), 1], value_ratio, dtype=dtype, scale=scale)
        assert_packed_equal(reference.PackedValues(*(t[at] for t in value_cache)), expect_v)
    else:
        assert torch.equal(_bits(value_cache[at].cpu()), _bits(reference.to_storage(v, dtype, scale)))

    # Slots outside the batch, and the records' padding, keep their poison byte for byte.
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[slots.long()] = False
    for old, new in zip(before, storage):
        assert torch.equal(old[untouched.to(DEVICE)], new[untouched.to(DEVICE)])
    padding = storage[0][at][..., key_cache_end(config.layout(head_dim, dtype)) :]
    assert (padding == POISON_BYTE).all()


def key_cache_end(lay: layout.SlotLayout) -> int:
    """First byte of a key record's padding."""
    return lay.key_fill_offset + (2 if lay.stores_sign else 0)


def test_nan_key_keeps_exactly_t_channels():
    """A NaN key (or window norm) counts as most salient: the kept count never changes, so kept
    entries never spill past their T places in the record."""
    lay = reference.SparKConfig(key_ratio=0.5).layout(64, torch.float32)
    storage, keys, values = poisoned_records(lay, 4, 1)
    k = torch.randn(2, 1, 64, device=DEVICE)
    k[0, 0, ::3] = float("nan")
    stats = torch.rand(1, 1, 1, 64, device=DEVICE).to(layout.STATS_DTYPE)
    stats[0, 0, 0, 5] = float("nan")
    slots = torch.tensor([1, 2], device=DEVICE)
    rows = torch.zeros(2, dtype=torch.int32, device=DEVICE)
    compress.compress_and_store(k, k, slots, rows, stats, keys, values)
    kept = reference.words_to_bits(keys.mask[slots]).sum(-1)
    assert (kept == 32).all()
    expect = reference.pack_keys(k.cpu(), stats[0, 0].float().cpu(), 0.5)
    assert_packed_equal(reference.PackedKeys(*(t[slots] for t in keys)), expect)


def test_compress_empty_batch_is_a_no_op():
    lay = reference.SparKConfig(key_ratio=0.5, recovery="zero").layout(64, torch.float32)
    storage, keys, values = poisoned_records(lay, 4, 2)
    k = torch.empty(0, 2, 64, device=DEVICE)
    empty = torch.empty(0, dtype=torch.int32, device=DEVICE)
    stats = torch.ones(1, 2, 2, 64, device=DEVICE)
    compress.compress_and_store(k, k, empty, empty, stats, keys, values)
    assert all((t == POISON_BYTE).all() for t in storage)
