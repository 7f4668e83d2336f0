"""Compress-and-store: new keys/values of a batch -> one layer's SparK compact cache.

One launch per layer, grid ``(tokens, kv_heads)``; a program handles one token-head, keys and
values together:

* saliency per channel: keys ``k * k * Qn`` (float32, a pure product), values ``|v| + bias``
  (a pure add), so the selection is bit-equal to ``reference.kept_mask`` on every backend;
* channel ``c`` is pruned iff its position in the stable ascending order of the scores is below
  ``P``: ``#{c' : s[c'] < s[c] or (s[c'] == s[c] and c' < c)} < P``, counted over ``CHUNK``
  channels at a time so the comparison matrix stays at ``[D, CHUNK]``;
* kept entries are scattered to ``kept[slot, head, rank]`` with ``rank`` the exclusive prefix count
  of the kept bits (FP8 caches: ``x / scale``, saturated); bitmap words are built by shifting the
  bits into their lanes and summing (distinct bits: the sum is their OR); a NaN score counts as
  ``+inf``, so exactly ``T`` channels are kept whatever the input;
* "mean" recovery stores the sign bits of the pruned channels only, at their pruned rank
  ``c - rank(c)``, and ``fill = sqrt(sum of pruned saliency / P)`` as bfloat16; compressed values
  store the mean of the pruned values as bfloat16. Dense values are copied (FP8: scaled).

``Qn`` and ``bias`` come from row ``rows[token]`` of the layer's window statistics (bfloat16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import FP8_DTYPES
from .reference import PackedKeys, PackedValues

__all__ = ["compress_and_store"]


@triton.jit
def _scores(x, stat, IS_KEY: tl.constexpr):
    """Saliency in float32 from float32 inputs; NaN ranks as +inf (kept), as in the reference."""
    if IS_KEY:
        score = x * x * stat
    else:
        score = tl.abs(x) + stat
    return tl.where(score != score, float("inf"), score)


@triton.jit
def to_storage(x, dtype, FP8_MAX: tl.constexpr, inv_scale):
    """Float32 ``x`` as the cache stores it (FP8: ``x / scale`` saturated)."""
    if FP8_MAX > 0:
        x = tl.clamp(x * inv_scale, -FP8_MAX, FP8_MAX)
    return x.to(dtype)


@triton.jit
def _sorted_position(X, Stat, score, IS_KEY: tl.constexpr, D: tl.constexpr, CHUNK: tl.constexpr):
    """Position ``[D]`` int32 of each channel in the stable ascending order of ``score``.

    The chunks' scores are recomputed from ``X`` / ``Stat`` with the same float ops, so they
    equal ``score`` bit for bit.
    """
    offs = tl.arange(0, D)
    position = tl.zeros([D], tl.int32)
    for start in tl.static_range(0, D, CHUNK):
        offs_c = start + tl.arange(0, CHUNK)
        other = _scores(tl.load(X + offs_c).to(tl.float32), tl.load(Stat + offs_c).to(tl.float32), IS_KEY)
        before = (other[None, :] < score[:, None]) | (
            (other[None, :] == score[:, None]) & (offs_c[None, :] < offs[:, None])
        )
        position += tl.sum(before.to(tl.int32), axis=1)
    return position


@triton.jit
def _pack_words(bits, D: tl.constexpr):
    """Bits ``[D]`` int32 (0/1) -> words ``[D/32]`` int32, channel ``c`` at bit ``c % 32``."""
    lanes = bits << (tl.arange(0, D) % 32)
    return tl.sum(tl.reshape(lanes, (D // 32, 32)), axis=1)


@triton.jit
def _pack_pruned_signs(negative, keep, rank, D: tl.constexpr, SIGN_WORDS_P2: tl.constexpr):
    """Sign words ``[SIGN_WORDS_P2]``: bit ``i`` = the ``i``-th pruned channel is negative. A
    pruned channel ``c`` has pruned rank ``c - rank(c)``."""
    pruned_rank = tl.arange(0, D) - rank
    lanes = tl.where((keep == 0) & (negative != 0), 1 << (pruned_rank % 32), 0)
    word_of = tl.where(keep == 0, pruned_rank // 32, -1)
    words = tl.arange(0, SIGN_WORDS_P2)
    return tl.sum(tl.where(word_of[:, None] == words[None, :], lanes[:, None], 0), axis=0)


@triton.jit
def _store_packed(
    x,
    score,
    X,
    Stat,
    Kept,
    kept_offs,
    Mask,
    mask_offs,
    inv_scale,
    IS_KEY: tl.constexpr,
    PRUNED: tl.constexpr,
    D: tl.constexpr,
    CHUNK: tl.constexpr,
    FP8_MAX: tl.constexpr,
):
    """Select and store one row's kept entries and bitmap; returns (kept flags, ranks) ``[D]``."""
    keep = (_sorted_position(X, Stat, score, IS_KEY, D, CHUNK) >= PRUNED).to(tl.int32)
    rank = tl.cumsum(keep, axis=0) - keep
    stored = to_storage(x, Kept.dtype.element_ty, FP8_MAX, inv_scale)
    tl.store(Kept + kept_offs + rank, stored, mask=keep != 0)
    tl.store(Mask + mask_offs + tl.arange(0, D // 32), _pack_words(keep, D))
    return keep, rank


@triton.jit
def _compress_kernel(
    K,
    stride_k_t,
    stride_k_h,
    V,
    stride_v_t,
    stride_v_h,
    slots,
    rows,
    Stats,
    stride_st_r,
    stride_st_w,
    stride_st_h,
    KKept,
    stride_kk_s,
    stride_kk_h,
    KMask,
    stride_km_s,
    stride_km_h,
    KSign,
    stride_ks_s,
    stride_ks_h,
    KFill,
    stride_kf_s,
    stride_kf_h,
    VOut,
    stride_vo_s,
    stride_vo_h,
    VMask,
    stride_vm_s,
    stride_vm_h,
    VFill,
    stride_vf_s,
    stride_vf_h,
    k_inv_scale,
    v_inv_scale,
    D: tl.constexpr,
    KEY_PRUNED: tl.constexpr,
    VALUE_PRUNED: tl.constexpr,
    SIGN_WORDS: tl.constexpr,
    SIGN_WORDS_P2: tl.constexpr,
    MEAN_RECOVERY: tl.constexpr,
    VALUES_PACKED: tl.constexpr,
    CHUNK: tl.constexpr,
    FP8_MAX: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    slot = tl.load(slots + token).to(tl.int64)
    row = tl.load(rows + token).to(tl.int64)
    offs = tl.arange(0, D)

    # Keys.
    k_row = K + token * stride_k_t + head * stride_k_h
    qn_row = Stats + row * stride_st_r + head * stride_st_h
    kf = tl.load(k_row + offs).to(tl.float32)
    saliency = _scores(kf, tl.load(qn_row + offs).to(tl.float32), True)
    keep, rank = _store_packed(
        kf, saliency, k_row, qn_row,
        KKept, slot * stride_kk_s + head * stride_kk_h,
        KMask, slot * stride_km_s + head * stride_km_h,
        k_inv_scale, True, KEY_PRUNED, D, CHUNK, FP8_MAX,
    )  # fmt: skip
    if MEAN_RECOVERY:
        if SIGN_WORDS > 0:
            negative = (~(kf > 0)).to(tl.int32)  # the reference's ~(k > 0): NaN counts as negative
            words = _pack_pruned_signs(negative, keep, rank, D, SIGN_WORDS_P2)
            offs_w = tl.arange(0, SIGN_WORDS_P2)
            tl.store(KSign + slot * stride_ks_s + head * stride_ks_h + offs_w, words, mask=offs_w < SIGN_WORDS)
        pruned_sum = tl.sum(tl.where(keep != 0, 0.0, saliency), axis=0)
        # Divide by P, or by 1 when nothing is pruned (the reference's clamp_min(1)).
        fill = tl.sqrt_rn(
            tl.div_rn(pruned_sum, tl.full([], KEY_PRUNED + (KEY_PRUNED == 0), tl.float32))
        )
        tl.store(KFill + slot * stride_kf_s + head * stride_kf_h, fill.to(KFill.dtype.element_ty))

    # Values.
    v_row = V + token * stride_v_t + head * stride_v_h
    vf = tl.load(v_row + offs).to(tl.float32)
    v_out = slot * stride_vo_s + head * stride_vo_h
    if VALUES_PACKED:
        bias_row = Stats + row * stride_st_r + stride_st_w + head * stride_st_h
        v_keep, _ = _store_packed(
            vf, _scores(vf, tl.load(bias_row + offs).to(tl.float32), False), v_row, bias_row,
            VOut, v_out,
            VMask, slot * stride_vm_s + head * stride_vm_h,
            v_inv_scale, False, VALUE_PRUNED, D, CHUNK, FP8_MAX,
        )  # fmt: skip
        pruned_sum = tl.sum(tl.where(v_keep != 0, 0.0, vf), axis=0)
        v_fill = tl.div_rn(pruned_sum, tl.full([], VALUE_PRUNED + (VALUE_PRUNED == 0), tl.float32))
        tl.store(VFill + slot * stride_vf_s + head * stride_vf_h, v_fill.to(VFill.dtype.element_ty))
    else:
        tl.store(VOut + v_out + offs, to_storage(vf, VOut.dtype.element_ty, FP8_MAX, v_inv_scale))


def compress_and_store(
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    rows: torch.Tensor,
    window_stats: torch.Tensor,
    key_cache: PackedKeys,
    value_cache: PackedValues | torch.Tensor,
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Compress a batch's new keys and values and write them into one layer's compact cache.

    Args:
        k, v: ``[N, Hkv, D]`` new keys / values (any float dtype), last dim contiguous.
        slots: ``[N]`` int32 or int64, destination slot of each token.
        rows: ``[N]`` int32, window-statistics row of each token (the caller also records it in
            the pool-wide ``slot_rows``).
        window_stats: ``[R, 2, Hkv, D]`` (bfloat16 in the pool; any float dtype): ``[:, 0]`` key
            channel norm ``Qn``, ``[:, 1]`` value channel bias (``[R, 1, Hkv, D]`` suffices for
            dense values).
        key_cache: the layer's ``PackedKeys`` (views into the pool's records, or plain tensors):
            ``kept [S, Hkv, T]`` in the cache dtype, ``mask [S, Hkv, D/32]`` int32, and for "mean"
            recovery ``sign [S, Hkv, ceil(P/32)]`` int32 and ``fill [S, Hkv]`` bfloat16; ``sign is
            None`` selects "zero" recovery. ``T`` fixes the number of pruned channels ``P = D - T``.
        value_cache: dense ``[S, Hkv, D]`` (copied into), or ``PackedValues``
            (``kept [S, Hkv, Tv]``, ``mask [S, Hkv, D/32]`` int32, ``fill [S, Hkv]`` bfloat16).
        k_scale, v_scale: FP8 caches store ``x / scale`` (ignored for other dtypes).

    Writes ``key_cache`` / ``value_cache`` at ``slots``, bit-equal to ``reference.pack_keys`` /
    ``reference.pack_values`` on kept entries, bitmaps and signs; fills to one bfloat16 rounding
    step (the float32 sum runs in another order). Returns nothing; one kernel launch.
    """
    num_tokens, num_heads, head_dim = k.shape
    if v.shape != k.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if head_dim % 32 or head_dim < 32:
        raise ValueError(f"head_dim={head_dim} must be a multiple of 32")
    for name, t in (("k", k), ("v", v), ("window_stats", window_stats), ("key_cache.kept", key_cache.kept)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    mean = key_cache.sign is not None
    if mean != (key_cache.fill is not None):
        raise ValueError("PackedKeys.sign and PackedKeys.fill must both be set ('mean') or both None")
    if num_tokens == 0:
        return
    packed_values = isinstance(value_cache, PackedValues)
    if packed_values:
        v_out, v_mask, v_fill = value_cache
        value_pruned = head_dim - v_out.shape[-1]
    else:
        v_out, v_mask, v_fill = value_cache, value_cache, value_cache  # mask/fill unused
        value_pruned = 0
    k_sign = key_cache.sign if mean else key_cache.mask  # unused for "zero" recovery
    k_fill = key_cache.fill if mean else key_cache.mask
    fp8_max = torch.finfo(key_cache.kept.dtype).max if key_cache.kept.dtype in FP8_DTYPES else 0.0
    sign_words = k_sign.shape[-1] if mean else 0
    _compress_kernel[(num_tokens, num_heads)](
        k, k.stride(0), k.stride(1),
        v, v.stride(0), v.stride(1),
        slots, rows,
        window_stats, window_stats.stride(0), window_stats.stride(1), window_stats.stride(2),
        key_cache.kept, key_cache.kept.stride(0), key_cache.kept.stride(1),
        key_cache.mask, key_cache.mask.stride(0), key_cache.mask.stride(1),
        k_sign, k_sign.stride(0), k_sign.stride(1),
        k_fill, k_fill.stride(0), k_fill.stride(1),
        v_out, v_out.stride(0), v_out.stride(1),
        v_mask, v_mask.stride(0), v_mask.stride(1),
        v_fill, v_fill.stride(0), v_fill.stride(1),
        1.0 / k_scale, 1.0 / v_scale,
        D=head_dim,
        KEY_PRUNED=head_dim - key_cache.kept.shape[-1],
        VALUE_PRUNED=value_pruned,
        SIGN_WORDS=sign_words,
        SIGN_WORDS_P2=triton.next_power_of_2(max(sign_words, 1)),
        MEAN_RECOVERY=mean,
        VALUES_PACKED=packed_values,
        CHUNK=32,
        FP8_MAX=fp8_max,
        num_warps=2 if head_dim <= 64 else 4,
    )  # fmt: skip
