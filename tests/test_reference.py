"""The PyTorch reference against SparK's formulas restated independently, its invariants, and
the compact layout's round trip."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spark_sglang.kernels import reference as R
from spark_sglang.kernels.layout import SparKConfig

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _rand(seed, *shape, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


# --- formulas restated with plain loops, float64 ------------------------------------------------


def _loop_window_norm(q, hkv):
    w, hq, d = q.shape
    g = hq // hkv
    out = torch.zeros(hkv, d, dtype=torch.float64)
    for h in range(hkv):
        for c in range(d):
            total = 0.0
            for i in range(w):
                mean = sum(float(q[i, h * g + j, c]) for j in range(g)) / g
                total += mean * mean
            out[h, c] = math.sqrt(total)
    return out


def _loop_simulate_keys(k, qn, ratio, recovery):
    n, hkv, d = k.shape
    p = int(ratio * d)
    out = k.double().clone()
    for t in range(n):
        for h in range(hkv):
            s = [float(k[t, h, c]) ** 2 * float(qn[h, c]) for c in range(d)]
            pruned = sorted(range(d), key=lambda c: (s[c], c))[:p]
            # The cache stores the fill sqrt(wbar) rounded to bfloat16.
            fill = float(torch.tensor(math.sqrt(sum(s[c] for c in pruned) / max(p, 1))).to(torch.bfloat16))
            for c in pruned:
                if recovery == "zero" or qn[h, c] == 0:
                    out[t, h, c] = 0.0
                else:
                    sign = 1.0 if float(k[t, h, c]) > 0 else -1.0
                    out[t, h, c] = sign * fill / math.sqrt(float(qn[h, c]))
    return out


def _released_value_mask(v, ratio):
    """The released compress_values' fixed-ratio branch, restated for one sequence [N, H, D]."""
    v = v.double()
    n, h, d = v.shape
    var_seq = v.var(dim=0, keepdim=True).expand(n, h, d)
    var_dim = v.var(dim=2, keepdim=True).expand(n, h, d)
    diversity = (var_seq + var_dim) / 2
    diversity = diversity / (diversity.amax(dim=(0, 2), keepdim=True) + 1e-8)
    score = v.abs() * 0.7 + diversity * 0.3
    p = int(ratio * d)
    keep = torch.ones(n, h, d, dtype=torch.bool)
    for t in range(n):
        for hh in range(h):
            pruned = sorted(range(d), key=lambda c: (float(score[t, hh, c]), c))[:p]
            keep[t, hh, pruned] = False
    return keep


# --- against the restated formulas ----------------------------------------------------------------


@pytest.mark.parametrize("seed,hq,hkv,d", [(1, 4, 4, 32), (2, 8, 2, 32), (3, 8, 1, 64)])
def test_window_channel_norm_matches_loops(seed, hq, hkv, d):
    q = _rand(seed, 5, hq, d)
    torch.testing.assert_close(
        R.window_channel_norm(q, hkv).double(), _loop_window_norm(q, hkv), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("recovery", ["mean", "zero"])
@pytest.mark.parametrize("seed,ratio,d", [(4, 0.5, 32), (5, 0.8, 32), (6, 0.3, 64)])
def test_simulate_keys_matches_loops(seed, ratio, d, recovery):
    k, q = _rand(seed, 6, 2, d), _rand(seed + 100, 8, 4, d)
    qn = R.window_channel_norm(q, 2)
    expected = _loop_simulate_keys(k, qn, ratio, recovery)
    got = R.simulate_keys(k, q, ratio, recovery)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed,ratio", [(7, 0.5), (8, 0.75)])
def test_value_mask_ranks_like_the_released_score(seed, ratio):
    v = _rand(seed, 40, 3, 32)
    keep = R.kept_mask(R.value_saliency(v, R.value_channel_bias(v)), int(ratio * 32))
    assert torch.equal(keep, _released_value_mask(v, ratio))


def test_simulate_values_fills_with_mean_of_pruned():
    v = _rand(9, 20, 2, 64)
    out = R.simulate_values(v, 0.5)
    changed = out != v
    for t in range(20):
        for h in range(2):
            pruned = ~R.kept_mask(R.value_saliency(v, R.value_channel_bias(v)), 32)[t, h]
            mean = v[t, h, pruned].mean().to(torch.bfloat16).float()  # stored as a bfloat16 fill
            assert torch.equal(out[t, h, pruned], mean.expand(32))
            assert torch.equal(out[t, h, ~pruned], v[t, h, ~pruned])
    assert changed.any()


def test_think_prunes_one_channel_set_per_head_with_zero_fill():
    k, q = _rand(10, 30, 2, 32), _rand(11, 8, 4, 32)
    out = R.think_keys(k, q, 0.5)
    qn = R.window_channel_norm(q, 2)
    for h in range(2):
        score = [float(qn[h, c]) * float(k[:, h, c].norm()) for c in range(32)]
        pruned = sorted(range(32), key=lambda c: (score[c], c))[:16]
        assert torch.all(out[:, h, pruned] == 0)
        kept = [c for c in range(32) if c not in pruned]
        assert torch.equal(out[:, h, kept], k[:, h, kept])


# --- invariants -------------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.8, 0.95])
def test_invariants(ratio):
    d = 128
    k, q = _rand(12, 50, 4, d), _rand(13, 32, 16, d)
    qn = R.window_channel_norm(q, 4)
    packed = R.pack_keys(k, qn, ratio)
    keep = R.words_to_bits(packed.mask)
    t = d - int(ratio * d)
    assert torch.all(keep.sum(-1) == t)  # exactly T kept per token-head
    out = R.simulate_keys(k, q, ratio)
    assert torch.equal(out[keep], k[keep])  # kept values untouched
    # "mean": every pruned channel's saliency equals the token's mean pruned saliency (to the
    # bfloat16 rounding of the stored fill: relative 2^-8 on sqrt, so about 2^-7 on the saliency).
    s_out = out.double() ** 2 * qn.double()
    s_in = k.double() ** 2 * qn.double()
    wbar = torch.where(~keep, s_in, 0).sum(-1) / (d - t)
    torch.testing.assert_close(
        torch.where(~keep, s_out, 0), torch.where(~keep, wbar[..., None], 0), rtol=2**-7, atol=1e-7
    )
    # The pruned channels are the lowest-saliency ones.
    assert torch.all(
        torch.where(keep, s_in, float("inf")).amin(-1) >= torch.where(~keep, s_in, float("-inf")).amax(-1)
    )


@pytest.mark.parametrize("recovery", ["mean", "zero"])
def test_ratio_zero_is_identity(recovery):
    k, v, q = _rand(14, 10, 2, 64), _rand(15, 10, 2, 64), _rand(16, 4, 2, 64)
    assert torch.equal(R.simulate_keys(k, q, 0.0, recovery), k)
    assert torch.equal(R.simulate_values(v, 0.0), v)


def test_zero_window_norm_recovers_to_zero():
    k = _rand(17, 4, 1, 32)
    qn = torch.ones(1, 32)
    qn[0, :8] = 0  # channels no window query uses: lowest saliency, pruned
    out = R.simulate_keys_with_norm(k, qn, 0.5)
    assert torch.isfinite(out).all()
    assert torch.all(out[:, 0, :8] == 0)


def test_ties_prune_the_lower_channel_first():
    k = torch.ones(1, 1, 32)
    out = R.simulate_keys_with_norm(k, torch.ones(1, 32), 0.25, "zero")
    assert torch.all(out[0, 0, :8] == 0) and torch.all(out[0, 0, 8:] == 1)


# --- compact layout -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("recovery", ["mean", "zero"])
def test_pack_unpack_round_trip(dtype, d, recovery):
    k, q = _rand(18, 33, 2, d, dtype=dtype), _rand(19, 32, 8, d, dtype=dtype)
    qn = R.window_channel_norm(q, 2)
    packed = R.pack_keys(k, qn, 0.5, recovery)
    assert packed.kept.dtype == dtype and packed.mask.dtype == torch.int32
    assert packed.kept.shape == (33, 2, d // 2) and packed.mask.shape == (33, 2, d // 32)
    keep = R.words_to_bits(packed.mask)
    # Kept values are stored bit-exact, in channel order.
    assert torch.equal(packed.kept.view(-1), k[keep])
    assert torch.equal(R.unpack_keys(packed, qn), R.simulate_keys(k, q, 0.5, recovery))


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_unpack_values(dtype):
    v = _rand(20, 17, 2, 128, dtype=dtype)
    packed = R.pack_values(v, R.value_channel_bias(v), 0.5)
    assert torch.equal(packed.kept.view(-1), v[R.words_to_bits(packed.mask)])
    assert torch.equal(R.unpack_values(packed), R.simulate_values(v, 0.5))


def test_per_token_windows():
    """A window per token (table[row_ids]) packs each token under its own statistics."""
    k = _rand(21, 12, 2, 64)
    table = torch.stack([R.window_channel_norm(_rand(22 + i, 8, 2, 64), 2) for i in range(3)])
    rows = torch.tensor([0, 1, 2] * 4)
    packed = R.pack_keys(k, table[rows], 0.5)
    for i in range(12):
        single = R.pack_keys(k[i : i + 1], table[rows[i]], 0.5)
        assert torch.equal(packed.mask[i], single.mask[0]) and torch.equal(packed.kept[i], single.kept[0])


def test_bits_words_round_trip_high_bit():
    bits = torch.zeros(2, 64, dtype=torch.bool)
    bits[0, 31] = bits[1, 63] = bits[1, 0] = True
    words = R.bits_to_words(bits)
    assert words.dtype == torch.int32 and words[0, 0] == -(2**31)
    assert torch.equal(R.words_to_bits(words), bits)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 9),
    hkv=st.sampled_from([1, 2, 4]),
    group=st.sampled_from([1, 2, 4]),
    d=st.sampled_from([32, 64, 128]),
    ratio=st.floats(0.0, 0.97),
    recovery=st.sampled_from(["mean", "zero"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_round_trip_and_counts(n, hkv, group, d, ratio, recovery, seed):
    k, q = _rand(seed, n, hkv, d), _rand(seed ^ 1, 4, hkv * group, d)
    qn = R.window_channel_norm(q, hkv)
    packed = R.pack_keys(k, qn, ratio, recovery)
    assert torch.all(R.words_to_bits(packed.mask).sum(-1) == d - int(ratio * d))
    out = R.unpack_keys(packed, qn)
    assert torch.isfinite(out).all()
    assert torch.equal(out, R.simulate_keys(k, q, ratio, recovery))


# --- bytes and config ---------------------------------------------------------------------------


def test_bytes_per_token_counts_side_data():
    cfg = SparKConfig(key_ratio=0.5)
    layout = cfg.layout(128, torch.bfloat16)
    # kept 128 + mask 16 + sign bits of the 64 pruned channels 8 + bf16 fill 2 = 154, padded to 160
    assert layout.key_bytes_per_head() == 160
    assert layout.value_bytes_per_head() == 256  # dense
    b = R.bytes_per_token(cfg, 128, 8, 32, torch.bfloat16, tokens_per_window=1024)
    assert b["dense"] == 32 * 8 * 512
    assert b["spark"] == 32 * 8 * (160 + 256) + 4
    assert b["spark_total"] == b["spark"] + 32 * 8 * 128 * 2 / 1024  # K only: one bf16 statistic per row
    zero = SparKConfig(key_ratio=0.8, value_ratio=0.5, recovery="zero").layout(128, torch.float16)
    assert zero.key_bytes_per_head() == 80  # T = 26: 52 + mask 16 = 68, no sign or fill, padded
    assert zero.value_bytes_per_head() == 160  # 128 + 16 + 2 = 146, padded
    fp8 = SparKConfig(key_ratio=0.5).layout(128, torch.float8_e4m3fn)
    assert fp8.key_bytes_per_head() == 96 and fp8.value_bytes_per_head() == 128  # 64 + 16 + 8 + 2 = 90
    dense_layers = R.bytes_per_token(SparKConfig(dense_layers="0,1"), 64, 2, 4, torch.float32)
    assert dense_layers["dense_layers"] == 2 * 2 * 2 * 64 * 4


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"key_ratio": 1.0}, "key_ratio"),
        ({"key_ratio": -0.1}, "key_ratio"),
        ({"value_ratio": 1.5}, "value_ratio"),
        ({"key_ratio": "0.5"}, "key_ratio"),
        ({"window": 0}, "window"),
        ({"recovery": "gamma"}, "recovery"),
        ({"dense_layers": "0,x"}, "dense_layers"),
        ({"dense_layers": [-1]}, "dense_layers"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SparKConfig(**kwargs)


def test_layout_refuses_unsupported_head_dim_and_dtype():
    with pytest.raises(ValueError, match="head_dim=96"):
        SparKConfig().layout(96, torch.float16)
    with pytest.raises(ValueError, match="KV cache dtype"):
        SparKConfig().layout(128, torch.int8)


def test_dense_layers_parse():
    assert SparKConfig(dense_layers="3,0,3").dense_layers == (0, 3)
    assert SparKConfig(dense_layers=None).dense_layers == ()


# --- what the compact cache stores -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_stores_scaled_saturated_kept_entries_selected_unquantised(dtype):
    """An FP8 cache stores kept entries as ``k / scale`` saturated to the format's range; which
    channels are kept and the fill come from the unquantised keys."""
    k, q = _rand(40, 9, 2, 64), _rand(41, 16, 4, 64)
    k[0, 0, 0] = 20000.0  # beyond e4m3's 448 and e5m2's 57344 after scaling: saturates, never NaN
    qn = R.window_channel_norm(q, 2)
    scale = 0.25
    packed = R.pack_keys(k, qn, 0.5, dtype=dtype, scale=scale)
    exact = R.pack_keys(k, qn, 0.5)
    assert packed.kept.dtype == dtype
    assert torch.equal(packed.mask, exact.mask) and torch.equal(packed.sign, exact.sign)
    assert torch.equal(packed.fill, exact.fill)
    limit = torch.finfo(dtype).max
    assert torch.equal(packed.kept, (exact.kept / scale).clamp(-limit, limit).to(dtype))
    assert torch.isfinite(packed.kept.float()).all() and packed.kept.float().max() == limit
    unpacked = R.unpack_keys(packed, qn, scale=scale)
    assert unpacked.dtype == torch.float32
    keep = R.words_to_bits(packed.mask)
    assert torch.equal(unpacked[keep], packed.kept.float().reshape(-1) * scale)


def test_nan_key_never_changes_the_kept_count():
    k, q = _rand(42, 5, 2, 64), _rand(43, 8, 2, 64)
    k[1, 0, ::5] = float("nan")
    packed = R.pack_keys(k, R.window_channel_norm(q, 2), 0.8)
    assert torch.all(R.words_to_bits(packed.mask).sum(-1) == 64 - 51)
    assert R.words_to_bits(packed.mask)[1, 0, ::5].all()  # NaN ranks as most salient: kept


def test_recovered_fp16_keys_are_clamped_not_inf():
    """Pruned channels 0 (salient enough to lift the fill) and 1 (tiny Qn): channel 1 recovers to
    sqrt(fill / Qn) = about 7e5, beyond fp16: clamped to its largest finite value."""
    k = torch.full((1, 1, 32), 2000.0, dtype=torch.float16)
    k[0, 0, 0], k[0, 0, 1] = 1000.0, 1.0
    qn = torch.ones(1, 32)
    qn[0, 1] = 1e-6
    out = R.simulate_keys_with_norm(k, qn, 2 / 32)
    assert torch.isfinite(out).all() and out[0, 0, 1] == torch.finfo(torch.float16).max


@pytest.mark.parametrize("d,ratio", [(64, 0.5), (64, 0.8), (128, 0.3), (256, 0.95), (32, 0.0)])
def test_signs_stored_for_pruned_channels_only(d, ratio):
    """Bit i of the sign words is the i-th pruned channel's sign; words cover ceil(P/32) only."""
    k, q = _rand(44, 7, 3, d), _rand(45, 8, 3, d)
    qn = R.window_channel_norm(q, 3)
    packed = R.pack_keys(k, qn, ratio)
    pruned = int(ratio * d)
    assert packed.sign.shape == (7, 3, -(-pruned // 32))
    keep = R.words_to_bits(packed.mask)
    bits = R.words_to_bits(packed.sign)
    assert torch.equal(bits[..., :pruned], (~(k > 0))[~keep].view(7, 3, pruned))
    assert not bits[..., pruned:].any()  # unused high bits stay 0
    assert torch.equal(R.pruned_sign_bits(packed.sign, keep, pruned), ~keep & ~(k > 0))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype,d,ratio,recovery,group", [
    (torch.float32, 64, 0.5, "mean", 3), (torch.float32, 128, 0.8, "mean", 6), (torch.float32, 32, 0.3, "zero", 1),
    (torch.float8_e4m3fn, 64, 0.5, "mean", 2),
])  # fmt: skip
def test_compressed_domain_scores_equal_dense_rebuild(seed, dtype, d, ratio, recovery, group):
    """The compressed-domain formulation (kept sum + fill times the signed pruned sum of
    ``q * Qn^-1/2``; kept values plus the weighted fill) equals attention over the dense rebuild,
    per-token window norms included."""
    gen = torch.Generator().manual_seed(seed)
    n, hkv, m, scale = 37, 2, 3, (0.5 if dtype in R.FP8_DTYPES else 1.0)
    keys, values = torch.randn(n, hkv, d, generator=gen), torch.randn(n, hkv, d, generator=gen)
    norm = torch.rand(n, hkv, d, generator=gen) + 0.1
    norm[:, :, ::7] = 0  # channels that never fired recover to 0
    q = torch.randn(m, hkv * group, d, generator=gen)
    packed_k = R.pack_keys(keys, norm, ratio, recovery, dtype=dtype, scale=scale)
    packed_v = R.pack_values(values, R.value_channel_bias(values), 0.5, dtype=dtype, scale=scale)
    dense_k = R.unpack_keys(packed_k, norm, scale=scale).float().repeat_interleave(group, dim=1)
    dense_v = R.unpack_values(packed_v, scale=scale).float().repeat_interleave(group, dim=1)

    logits = R.compressed_logits(q, packed_k, norm, scale=scale)
    torch.testing.assert_close(logits, torch.einsum("mhd,nhd->hmn", q, dense_k), rtol=1e-5, atol=1e-5)
    probs = torch.softmax(logits, dim=-1)
    out = R.compressed_values_output(probs, packed_v, scale=scale)
    torch.testing.assert_close(out, torch.einsum("hmn,nhd->hmd", probs, dense_v), rtol=1e-5, atol=1e-5)
