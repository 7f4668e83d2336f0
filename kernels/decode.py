"""Decode attention over the SparK compact KV cache, with a FlashInfer-style plan/run wrapper.

One query token per request attends to that request's KV slots, read in their compact form
(kernels/layout.py): the pruned channels are rebuilt in registers, so HBM traffic is the compact
bytes only. Two launches:

* ``_decode_split_kernel``, grid ``(batch, kv_heads, grid_splits)``: one program holds the ``G``
  query heads of one KV group (padded to 16 rows for ``tl.dot``) and walks one contiguous split
  of the request's slots in ``BLOCK_N``-slot tiles with an online softmax; it writes a normalised
  partial output and its log-sum-exp.
* ``_merge_splits_kernel``, grid ``(batch, q_heads)``: merges the partials by log-sum-exp.

How a tile ``[BLOCK_N, D]`` is rebuilt (``rebuild_keys`` / ``rebuild_values``, shared with
extend): the decode loop is issue-bound, not memory-bound, unless every channel costs a handful
of instructions, so the tile is built in the layout that makes each step cheap:

* A thread owns one slot-word: all 32 channels ``32 w + lane`` of one bitmap word of one slot.
  The tile is assembled from 32 lanes ``[BLOCK_N, D/32]`` joined in registers (``_join4`` over
  ``lane // 8``, ``_interleave8`` over ``lane % 8``, then ``_join32``'s reshape: no data
  movement), so what a slot-word shares (the word, its prefix, the kept entries' address, the
  sign word, the fill) is a per-thread scalar, and every lane's masks and shifts are immediates.
* Rank of channel ``c`` (its index among the kept entries): ``prefix[word] + popc(word & below)``
  with ``below = (1 << c % 32) - 1``, taken from ``popc(word | above) = rank + kept + 31 - c % 32``
  (``_lane_bits``): the constant folds into the load's offset and the same count is the shift
  that brings a pruned channel's sign to bit 31. The kept entry is one predicated 16-bit load
  from the slot's record (L1-resident: the tile's records are read whole), whose ``other`` value
  is the recovered entry, so kept and pruned channels need no select.
* A pruned key channel ("mean") is ``sign * min(fill * Qn[c]^-1/2, max)``: ``Qn^-1/2`` is computed
  once per window row (``row_rsqrt``, IEEE ``1 / sqrt``, 0 below the smallest normal float), the
  fill per slot, and the sign bit is moved from the slot-word's pruned-sign word (bit ``i`` = the
  ``i``-th pruned channel of the word) into the float's sign with one shift.
* Window rows: a program rebuilds a tile with one row's ``Qn^-1/2`` at a time. Rows come in long
  runs (one per compression event), so a tile almost always has one row; a tile that mixes rows
  is walked once per distinct row, each pass taking the slots of that row.

Corrupt inputs stay in bounds: a bitmap with more than ``T`` bits set reads as all-pruned (no rank
reaches past the slot's kept entries), sign words are read only below ``ceil(P/32)``, and window
row ids are clamped to the table.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.runtime.jit import JITFunction

from .layout import SlotLayout
from .reference import PackedKeys, PackedValues

__all__ = ["SparKDecodeWrapper"]

#: Smallest normal float32: window norms below it recover to 0 (reference.MIN_NORM).
MIN_NORMAL = tl.constexpr(1.1754943508222875e-38)


# ---------------------------------------------------------------------------------------------
# Tile rebuilding, shared with the extend kernel
# ---------------------------------------------------------------------------------------------


@triton.jit
def _popcount_hw(x):
    return libdevice.popc(x)


@triton.jit
def _popcount_swar(x):
    u = x.to(tl.uint32, bitcast=True)
    u = u - ((u >> 1) & 0x55555555)
    u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
    u = (u + (u >> 4)) & 0x0F0F0F0F
    return ((u * 0x01010101) >> 24).to(tl.int32)


#: Set bits of int32 words: the hardware ``POPC`` when compiled; the Triton interpreter (CPU
#: tests) has no libdevice, so it counts with shifts and masks.
popcount = _popcount_hw if isinstance(_popcount_hw, JITFunction) else _popcount_swar


@triton.jit
def _join4(a0, a1, a2, a3):
    """Parts ``[...]`` -> ``[..., 2, 2]`` whose flattened element ``i`` is part ``i``."""
    return tl.join(tl.join(a0, a2), tl.join(a1, a3))


@triton.jit
def _split4(x):
    """Inverse of ``_join4``."""
    even, odd = tl.split(x)
    a0, a2 = tl.split(even)
    a1, a3 = tl.split(odd)
    return a0, a1, a2, a3


@triton.jit
def _interleave8(c0, c1, c2, c3, c4, c5, c6, c7):
    """Parts ``[...]`` -> ``[..., 2, 2, 2]`` whose flattened element ``j`` is part ``j``.
    ``tl.join`` puts the new dims in registers, so nothing moves between threads."""
    return tl.join(tl.join(tl.join(c0, c4), tl.join(c2, c6)), tl.join(tl.join(c1, c5), tl.join(c3, c7)))


@triton.jit
def _split8(x):
    """Inverse of ``_interleave8``: ``[..., 2, 2, 2]`` -> 8 parts ``[...]``."""
    even, odd = tl.split(x)
    ee, eo = tl.split(even)
    oe, oo = tl.split(odd)
    c0, c4 = tl.split(ee)
    c2, c6 = tl.split(eo)
    c1, c5 = tl.split(oe)
    c3, c7 = tl.split(oo)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _join32(c0, c1, c2, c3, c4, c5, c6, c7, BLOCK: tl.constexpr, D: tl.constexpr):
    """8 parts ``[BLOCK, D/32, 2, 2]`` (part ``j``'s element ``q`` is lane ``8 q + j`` of its
    bitmap word) -> the tile ``[BLOCK, D]``, channel ``32 w + lane``: a thread keeps all 32 lanes
    of its slot-word in registers."""
    return tl.reshape(_interleave8(c0, c1, c2, c3, c4, c5, c6, c7), (BLOCK, D))


@triton.jit
def _rsqrt_lane(Stats, base, lane: tl.constexpr, D: tl.constexpr):
    offs = 32 * tl.arange(0, D // 32)[None, :] + lane
    qn = tl.load(Stats + base + offs).to(tl.float32)
    normal = qn >= MIN_NORMAL
    return tl.where(normal, tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.where(normal, qn, 1.0))), 0.0)


@triton.jit
def _rsqrt_lanes(Stats, base, j: tl.constexpr, D: tl.constexpr):
    return _join4(
        _rsqrt_lane(Stats, base, j, D), _rsqrt_lane(Stats, base, 8 + j, D),
        _rsqrt_lane(Stats, base, 16 + j, D), _rsqrt_lane(Stats, base, 24 + j, D),
    )  # fmt: skip


@triton.jit
def _rsqrt_parts(Stats, base, D: tl.constexpr):
    """``Qn^-1/2`` of the window-statistics rows at element offsets ``base`` (a scalar, or
    ``[BLOCK, 1]``) in the tile's register order (``_join32`` before the reshape), 0 where ``Qn``
    is below the smallest normal float (or NaN): IEEE ``1 / sqrt``, as ``reference.rsqrt_or_zero``."""
    return _interleave8(
        _rsqrt_lanes(Stats, base, 0, D), _rsqrt_lanes(Stats, base, 1, D),
        _rsqrt_lanes(Stats, base, 2, D), _rsqrt_lanes(Stats, base, 3, D),
        _rsqrt_lanes(Stats, base, 4, D), _rsqrt_lanes(Stats, base, 5, D),
        _rsqrt_lanes(Stats, base, 6, D), _rsqrt_lanes(Stats, base, 7, D),
    )  # fmt: skip


@triton.jit
def row_rsqrt(Stats, row, stride_st_r, kv_head, stride_st_h, D: tl.constexpr):
    """``Qn^-1/2`` of one window row and KV head, ``[1, D/32, 2, 2, 2, 2, 2]`` float32: computed
    once per run of slots sharing the row, not per slot."""
    return _rsqrt_parts(Stats, row * stride_st_r + kv_head * stride_st_h, D)


@triton.jit
def slot_rsqrt(Stats, rows, stride_st_r, kv_head, stride_st_h, D: tl.constexpr):
    """``row_rsqrt`` of each slot's own window row ``rows [BLOCK]``: ``[BLOCK, D/32, 2, 2, 2, 2,
    2]``, for a tile whose slots mix rows."""
    return _rsqrt_parts(Stats, rows.to(tl.int64)[:, None] * stride_st_r + kv_head * stride_st_h, D)


@triton.jit
def _bitmaps(rec, sel, MASK_OFF: tl.constexpr, KEPT: tl.constexpr, W: tl.constexpr):
    """Bitmap words ``[BLOCK, W]`` of the selected records and the kept entries before each word.
    A bitmap with more than ``KEPT`` bits set (corrupt) reads as all-pruned: ranks stay below
    ``KEPT``, so no load leaves the slot's kept entries."""
    words_ptr = (rec + MASK_OFF).to(tl.pointer_type(tl.int32))
    words = tl.load(words_ptr[:, None] + tl.arange(0, W)[None, :], mask=sel[:, None], other=0)
    counts = popcount(words)
    sane = tl.sum(counts, axis=1) <= KEPT
    words = tl.where(sane[:, None], words, 0)
    counts = tl.where(sane[:, None], counts, 0)
    return words, tl.cumsum(counts, axis=1) - counts


@triton.jit
def _pruned_signs(rec, sel, prefix, SIGN_OFF: tl.constexpr, SIGN_WORDS: tl.constexpr, W: tl.constexpr):
    """``[BLOCK, W]`` uint32: bit ``i`` = sign of the ``i``-th pruned channel of bitmap word ``w``.
    Signs are stored for the pruned channels in order; word ``w``'s start at pruned rank
    ``32 w - prefix``, so each is a funnel shift of two stored sign words."""
    sign_ptr = (rec + SIGN_OFF).to(tl.pointer_type(tl.int32))[:, None]
    start = 32 * tl.arange(0, W)[None, :] - prefix
    index = start >> 5
    shift = (start & 31).to(tl.uint32)
    lo = tl.load(sign_ptr + index, mask=sel[:, None] & (index < SIGN_WORDS), other=0)
    hi = tl.load(sign_ptr + index + 1, mask=sel[:, None] & (index + 1 < SIGN_WORDS), other=0)
    lo = lo.to(tl.uint32, bitcast=True)
    hi = hi.to(tl.uint32, bitcast=True)
    return (lo >> shift) | ((hi << 1) << (31 - shift))


@triton.jit
def _lane_bits(word, lane: tl.constexpr):
    """Lane ``lane`` of each bitmap word: ``count = rank + kept + 31 - lane`` (``rank``: the kept
    lanes below it) and whether it is kept. One ``popc`` serves both users: a kept lane's entry
    is ``count + lane - 32`` past the word's first (the constant folds into the load's offset),
    and a pruned lane's sign is bit ``lane - rank = 31 - count`` of the word's pruned signs. The
    lane is a constant: the masks are immediates."""
    if lane == 31:
        kept = word < 0
        count = popcount(word)
    else:
        kept = (word & (1 << lane)) != 0
        # Bits above the lane all set: they add 31 - lane.
        count = popcount(word | -(1 << (lane + 1)))
    return count, kept


@triton.jit
def _kept_or(entry_ptr, kept, fallback, scale, IS_FP8: tl.constexpr, out_dtype: tl.constexpr):
    """The stored entry where ``kept`` (FP8: dequantised with ``scale``), else ``fallback``."""
    # Both branches assign one result: the compiler type-checks every return of a function,
    # a static branch's too (an FP8 entry is not the tile's dtype).
    if IS_FP8:
        stored = tl.load(entry_ptr, mask=kept, other=0.0).to(tl.float32) * scale
        entry = tl.where(kept, stored, fallback).to(out_dtype)
    else:
        entry = tl.load(entry_ptr, mask=kept, other=fallback.to(out_dtype))
    return entry


@triton.jit
def _key_lane(word, kept_ptr, signs, fill, rs, k_scale, lane: tl.constexpr, MEAN_RECOVERY: tl.constexpr,
              IS_FP8: tl.constexpr, OUT_MAX: tl.constexpr, out_dtype: tl.constexpr):
    count, kept = _lane_bits(word, lane)
    entry_ptr = (kept_ptr + count) + (lane - 32)
    if MEAN_RECOVERY:
        magnitude = tl.minimum(fill * rs, OUT_MAX, propagate_nan=tl.PropagateNan.ALL)
        # Bit (lane - rank) of the word's pruned signs: a shift by count moves it to bit 31.
        sign = (signs << count.to(tl.uint32)) & 0x80000000
        recovered = (magnitude.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    else:
        recovered = tl.zeros(count.shape, tl.float32)
    return _kept_or(entry_ptr, kept, recovered, k_scale, IS_FP8, out_dtype)


@triton.jit
def _key_lanes(word, kept_ptr, signs, fill, rs, k_scale, j: tl.constexpr, MEAN_RECOVERY: tl.constexpr,
               IS_FP8: tl.constexpr, OUT_MAX: tl.constexpr, out_dtype: tl.constexpr):
    """Lanes ``j, 8 + j, 16 + j, 24 + j`` of every slot-word, ``[BLOCK, W, 2, 2]``; ``rs``: their
    ``Qn^-1/2`` (``_split4`` order)."""
    r0, r1, r2, r3 = _split4(rs)
    return _join4(
        _key_lane(word, kept_ptr, signs, fill, r0, k_scale, j, MEAN_RECOVERY, IS_FP8, OUT_MAX, out_dtype),
        _key_lane(word, kept_ptr, signs, fill, r1, k_scale, 8 + j, MEAN_RECOVERY, IS_FP8, OUT_MAX, out_dtype),
        _key_lane(word, kept_ptr, signs, fill, r2, k_scale, 16 + j, MEAN_RECOVERY, IS_FP8, OUT_MAX, out_dtype),
        _key_lane(word, kept_ptr, signs, fill, r3, k_scale, 24 + j, MEAN_RECOVERY, IS_FP8, OUT_MAX, out_dtype),
    )  # fmt: skip


@triton.jit
def rebuild_keys(
    rec,
    sel,
    rs,
    k_scale,
    KRec,
    BLOCK: tl.constexpr,
    D: tl.constexpr,
    KEPT: tl.constexpr,
    MASK_OFF: tl.constexpr,
    SIGN_OFF: tl.constexpr,
    FILL_OFF: tl.constexpr,
    SIGN_WORDS: tl.constexpr,
    MEAN_RECOVERY: tl.constexpr,
    IS_FP8: tl.constexpr,
    OUT_MAX: tl.constexpr,
    out_dtype: tl.constexpr,
):
    """Keys ``[BLOCK, D]`` in ``out_dtype`` of the key records at byte pointers ``rec [BLOCK]``
    (rows off ``sel`` read nothing and come out 0); ``rs``: the window row's ``row_rsqrt``
    ("mean" only); ``KRec``: any pointer of the cache's entry type."""
    W: tl.constexpr = D // 32
    word, prefix = _bitmaps(rec, sel, MASK_OFF, KEPT, W)
    kept_ptr = rec.to(KRec.dtype, bitcast=True)[:, None] + prefix
    if MEAN_RECOVERY:
        signs = _pruned_signs(rec, sel, prefix, SIGN_OFF, SIGN_WORDS, W)
        fill_ptr = (rec + FILL_OFF).to(tl.pointer_type(tl.bfloat16))
        fill = tl.load(fill_ptr, mask=sel, other=0.0).to(tl.float32)[:, None]
        r0, r1, r2, r3, r4, r5, r6, r7 = _split8(rs)
    else:
        signs = word
        fill = 0.0
        zero = tl.zeros([1, W, 2, 2], tl.float32)
        r0, r1, r2, r3, r4, r5, r6, r7 = zero, zero, zero, zero, zero, zero, zero, zero
    return _join32(
        _key_lanes(word, kept_ptr, signs, fill, r0, k_scale, 0, MEAN_RECOVERY, IS_FP8, OUT_MAX, out_dtype),
        _key_lanes(word, kept_ptr, signs, fill, r1, k_scale, 1, MEAN_RECOVERY, IS_FP8, OUT_MAX, out_dtype),
        _key_lanes(word, kept_ptr, signs, fill, r2, k_scale, 2, MEAN_RECOVERY, IS_FP8, OUT_MAX, out_dtype),
        _key_lanes(word, kept_ptr, signs, fill, r3, k_scale, 3, MEAN_RECOVERY, IS_FP8, OUT_MAX, out_dtype),
        _key_lanes(word, kept_ptr, signs, fill, r4, k_scale, 4, MEAN_RECOVERY, IS_FP8, OUT_MAX, out_dtype),
        _key_lanes(word, kept_ptr, signs, fill, r5, k_scale, 5, MEAN_RECOVERY, IS_FP8, OUT_MAX, out_dtype),
        _key_lanes(word, kept_ptr, signs, fill, r6, k_scale, 6, MEAN_RECOVERY, IS_FP8, OUT_MAX, out_dtype),
        _key_lanes(word, kept_ptr, signs, fill, r7, k_scale, 7, MEAN_RECOVERY, IS_FP8, OUT_MAX, out_dtype),
        BLOCK, D,
    )  # fmt: skip


@triton.jit
def _value_lane(word, kept_ptr, fill, v_scale, lane: tl.constexpr, IS_FP8: tl.constexpr, out_dtype: tl.constexpr):
    count, kept = _lane_bits(word, lane)
    entry_ptr = (kept_ptr + count) + (lane - 32)
    return _kept_or(entry_ptr, kept, fill, v_scale, IS_FP8, out_dtype)


@triton.jit
def _value_lanes(word, kept_ptr, fill, v_scale, j: tl.constexpr, IS_FP8: tl.constexpr, out_dtype: tl.constexpr):
    return _join4(
        _value_lane(word, kept_ptr, fill, v_scale, j, IS_FP8, out_dtype),
        _value_lane(word, kept_ptr, fill, v_scale, 8 + j, IS_FP8, out_dtype),
        _value_lane(word, kept_ptr, fill, v_scale, 16 + j, IS_FP8, out_dtype),
        _value_lane(word, kept_ptr, fill, v_scale, 24 + j, IS_FP8, out_dtype),
    )  # fmt: skip


@triton.jit
def rebuild_values(
    V,
    slots,
    kv_head,
    stride_v_s,
    stride_v_h,
    sel,
    v_scale,
    BLOCK: tl.constexpr,
    DV: tl.constexpr,
    VALUES_PACKED: tl.constexpr,
    KEPT: tl.constexpr,
    MASK_OFF: tl.constexpr,
    FILL_OFF: tl.constexpr,
    IS_FP8: tl.constexpr,
    OUT_MAX: tl.constexpr,
    out_dtype: tl.constexpr,
):
    """Values ``[BLOCK, DV]`` in ``out_dtype`` of ``slots``: dense (``V`` the cache, strides in
    elements) or value records (``V`` the kept view, strides in bytes); rows off ``sel`` are 0."""
    if VALUES_PACKED:
        W: tl.constexpr = DV // 32
        rec = V.to(tl.pointer_type(tl.uint8), bitcast=True) + kv_head * stride_v_h + wide_product(slots, stride_v_s)
        word, prefix = _bitmaps(rec, sel, MASK_OFF, KEPT, W)
        kept_ptr = rec.to(V.dtype, bitcast=True)[:, None] + prefix
        fill = tl.load((rec + FILL_OFF).to(tl.pointer_type(tl.bfloat16)), mask=sel, other=0.0).to(tl.float32)
        fill = tl.clamp(fill, -OUT_MAX, OUT_MAX)[:, None]
        return _join32(
            _value_lanes(word, kept_ptr, fill, v_scale, 0, IS_FP8, out_dtype),
            _value_lanes(word, kept_ptr, fill, v_scale, 1, IS_FP8, out_dtype),
            _value_lanes(word, kept_ptr, fill, v_scale, 2, IS_FP8, out_dtype),
            _value_lanes(word, kept_ptr, fill, v_scale, 3, IS_FP8, out_dtype),
            _value_lanes(word, kept_ptr, fill, v_scale, 4, IS_FP8, out_dtype),
            _value_lanes(word, kept_ptr, fill, v_scale, 5, IS_FP8, out_dtype),
            _value_lanes(word, kept_ptr, fill, v_scale, 6, IS_FP8, out_dtype),
            _value_lanes(word, kept_ptr, fill, v_scale, 7, IS_FP8, out_dtype),
            BLOCK, DV,
        )  # fmt: skip
    offs_d = tl.arange(0, DV)
    rows = V + kv_head * stride_v_h + wide_product(slots, stride_v_s)
    v = tl.load(rows[:, None] + offs_d[None, :], mask=sel[:, None], other=0.0)
    if IS_FP8:
        return (v.to(tl.float32) * v_scale).to(out_dtype)
    return v.to(out_dtype)


@triton.jit
def wide_product(slots, stride):
    """``slots * stride`` as int64 from non-negative int32 operands: one 32x32->64-bit multiply
    (a signed widening costs three more instructions per slot)."""
    return (slots.to(tl.uint32).to(tl.uint64) * stride.to(tl.uint32).to(tl.uint64)).to(tl.int64)


@triton.jit
def soft_cap(x, cap):
    """``cap * tanh(x / cap)``, with tanh written through the sigmoid (no libdevice needed)."""
    return cap * (2.0 * tl.sigmoid(2.0 * x / cap) - 1.0)


@triton.jit
def row_run(indices, start, hi, SlotRows, num_rows, BLOCK: tl.constexpr):
    """The window row of slot ``indices[start]`` and the end of its run: the first position in
    ``[start, hi)`` whose slot has another row (``hi`` if none). Row ids are clamped into the
    table (a corrupt id reads a valid row, never outside it). Rows come in long runs (one per
    compression event), so this is one pass over the run's row ids, ``BLOCK`` at a time."""
    row = tl.load(SlotRows + tl.load(indices + start))
    row = tl.minimum(tl.maximum(row, 0), num_rows - 1)
    end = start
    scanning = True
    while scanning:
        offs = end + tl.arange(0, BLOCK)
        in_range = offs < hi
        slots = tl.load(indices + offs, mask=in_range, other=0)
        rows = tl.load(SlotRows + slots, mask=in_range, other=0)
        rows = tl.minimum(tl.maximum(rows, 0), num_rows - 1)
        other = tl.min(tl.where(in_range & (rows != row), offs, hi), axis=0)
        found = other < hi
        end = tl.where(found, other, end + BLOCK)
        scanning = (other == hi) & (end < hi)
    return row, tl.minimum(end, hi)


@triton.jit
def fold_tile(
    q, m_i, l_i, acc, slots, sel, rs, kv_head, KRec, stride_k_s, stride_k_h, V, stride_v_s,
    stride_v_h, k_scale, v_scale, sm_scale, logit_cap, BLOCK_N: tl.constexpr, D: tl.constexpr,
    DV: tl.constexpr, KEPT: tl.constexpr, K_MASK_OFF: tl.constexpr, K_SIGN_OFF: tl.constexpr,
    K_FILL_OFF: tl.constexpr, SIGN_WORDS: tl.constexpr, MEAN_RECOVERY: tl.constexpr,
    VALUES_PACKED: tl.constexpr, V_KEPT: tl.constexpr, V_MASK_OFF: tl.constexpr,
    V_FILL_OFF: tl.constexpr, IS_FP8: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    OUT_MAX: tl.constexpr, HAS_CAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Fold the slots ``sel`` of one tile of compact slots into the online softmax ``(m_i, l_i,
    acc)`` of the query rows ``q`` (a decode program's GQA group, or an extend program's group x
    queries): keys and values rebuilt once for all rows."""
    rec = KRec.to(tl.pointer_type(tl.uint8), bitcast=True) + kv_head * stride_k_h + wide_product(slots, stride_k_s)
    k = rebuild_keys(
        rec, sel, rs, k_scale, KRec, BLOCK_N, D, KEPT, K_MASK_OFF, K_SIGN_OFF, K_FILL_OFF,
        SIGN_WORDS, MEAN_RECOVERY, IS_FP8, OUT_MAX, COMPUTE_DTYPE,
    )  # fmt: skip
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale
    if HAS_CAP:
        s = soft_cap(s, logit_cap)
    s = tl.where(sel[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = rebuild_values(
        V, slots, kv_head, stride_v_s, stride_v_h, sel, v_scale, BLOCK_N, DV,
        VALUES_PACKED, V_KEPT, V_MASK_OFF, V_FILL_OFF, IS_FP8, OUT_MAX, COMPUTE_DTYPE,
    )  # fmt: skip
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def fold_slots(
    q, m_i, l_i, acc, indices, lo, hi, kv_head, KRec, stride_k_s, stride_k_h, V, stride_v_s,
    stride_v_h, Stats, stride_st_r, stride_st_h, num_rows, SlotRows, k_scale, v_scale, sm_scale,
    logit_cap, BLOCK_N: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, KEPT: tl.constexpr,
    K_MASK_OFF: tl.constexpr, K_SIGN_OFF: tl.constexpr, K_FILL_OFF: tl.constexpr,
    SIGN_WORDS: tl.constexpr, MEAN_RECOVERY: tl.constexpr, VALUES_PACKED: tl.constexpr,
    V_KEPT: tl.constexpr, V_MASK_OFF: tl.constexpr, V_FILL_OFF: tl.constexpr, IS_FP8: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, OUT_MAX: tl.constexpr, HAS_CAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Fold the compact slots ``indices[lo:hi]`` into ``(m_i, l_i, acc)``, ``BLOCK_N`` at a time.

    "mean" recovery needs each slot's window row: rows come in runs (one per compression event),
    so the slots are walked run by run (``row_run``). The whole tiles of a run (and a run that
    reaches ``hi``) go through the hot loop with the run's ``Qn^-1/2`` computed once; a tile
    that holds the end of a shorter run, and so mixes rows, is rebuilt once with each slot's own
    ``Qn^-1/2`` (``slot_rsqrt``). "zero" recovery reads no window statistics: one loop."""
    if MEAN_RECOVERY:
        pos = lo
        while pos < hi:
            row, run_end = row_run(indices, pos, hi, SlotRows, num_rows, BLOCK_N)
            whole = tl.where(run_end == hi, hi, pos + (run_end - pos) // BLOCK_N * BLOCK_N)
            if whole > pos:
                rs = row_rsqrt(Stats, row.to(tl.int64), stride_st_r, kv_head, stride_st_h, D)
                for start in tl.range(pos, whole, BLOCK_N):
                    offs_n = start + tl.arange(0, BLOCK_N)
                    sel = offs_n < whole
                    slots = tl.load(indices + offs_n, mask=sel, other=0).to(tl.int32)
                    m_i, l_i, acc = fold_tile(
                        q, m_i, l_i, acc, slots, sel, rs, kv_head, KRec, stride_k_s, stride_k_h,
                        V, stride_v_s, stride_v_h, k_scale, v_scale, sm_scale, logit_cap, BLOCK_N,
                        D, DV, KEPT, K_MASK_OFF, K_SIGN_OFF, K_FILL_OFF, SIGN_WORDS, True,
                        VALUES_PACKED, V_KEPT, V_MASK_OFF, V_FILL_OFF, IS_FP8, COMPUTE_DTYPE,
                        OUT_MAX, HAS_CAP, DOT_PRECISION,
                    )  # fmt: skip
                pos = whole
            else:
                offs_n = pos + tl.arange(0, BLOCK_N)
                sel = offs_n < hi
                slots = tl.load(indices + offs_n, mask=sel, other=0).to(tl.int32)
                rows = tl.load(SlotRows + slots, mask=sel, other=0)
                rows = tl.minimum(tl.maximum(rows, 0), num_rows - 1)
                slot_rs = slot_rsqrt(Stats, rows, stride_st_r, kv_head, stride_st_h, D)
                m_i, l_i, acc = fold_tile(
                    q, m_i, l_i, acc, slots, sel, slot_rs, kv_head, KRec, stride_k_s, stride_k_h, V,
                    stride_v_s, stride_v_h, k_scale, v_scale, sm_scale, logit_cap, BLOCK_N, D, DV,
                    KEPT, K_MASK_OFF, K_SIGN_OFF, K_FILL_OFF, SIGN_WORDS, True, VALUES_PACKED,
                    V_KEPT, V_MASK_OFF, V_FILL_OFF, IS_FP8, COMPUTE_DTYPE, OUT_MAX, HAS_CAP,
                    DOT_PRECISION,
                )  # fmt: skip
                pos += BLOCK_N
    else:
        for start in tl.range(lo, hi, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            sel = offs_n < hi
            slots = tl.load(indices + offs_n, mask=sel, other=0).to(tl.int32)
            m_i, l_i, acc = fold_tile(
                q, m_i, l_i, acc, slots, sel, 0.0, kv_head, KRec, stride_k_s, stride_k_h, V,
                stride_v_s, stride_v_h, k_scale, v_scale, sm_scale, logit_cap, BLOCK_N, D, DV, KEPT,
                K_MASK_OFF, K_SIGN_OFF, K_FILL_OFF, SIGN_WORDS, False, VALUES_PACKED, V_KEPT,
                V_MASK_OFF, V_FILL_OFF, IS_FP8, COMPUTE_DTYPE, OUT_MAX, HAS_CAP, DOT_PRECISION,
            )  # fmt: skip
    return m_i, l_i, acc


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _decode_split_kernel(
    Q,
    stride_q_b,
    stride_q_h,
    KRec,
    stride_k_s,
    stride_k_h,
    V,
    stride_v_s,
    stride_v_h,
    Stats,
    stride_st_r,
    stride_st_h,
    num_rows,
    SlotRows,
    k_scale,
    v_scale,
    kv_indptr,
    kv_indices,
    num_splits,
    MidO,
    MidLse,
    stride_mid_b,
    stride_mid_h,
    stride_mid_s,
    sm_scale,
    logit_cap,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D: tl.constexpr,
    DV: tl.constexpr,
    KEPT: tl.constexpr,
    K_MASK_OFF: tl.constexpr,
    K_SIGN_OFF: tl.constexpr,
    K_FILL_OFF: tl.constexpr,
    SIGN_WORDS: tl.constexpr,
    MEAN_RECOVERY: tl.constexpr,
    VALUES_PACKED: tl.constexpr,
    V_KEPT: tl.constexpr,
    V_MASK_OFF: tl.constexpr,
    V_FILL_OFF: tl.constexpr,
    IS_FP8: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    OUT_MAX: tl.constexpr,
    HAS_CAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program: the ``GROUP`` query heads of KV head ``program_id(1)`` of request
    ``program_id(0)`` over split ``program_id(2)`` of its slots, ``BLOCK_N`` slots per tile: keys
    and values rebuilt in registers (``rebuild_keys`` / ``rebuild_values``), ``QK^T`` and ``PV``
    on ``tl.dot``, an online softmax; writes the split's normalised output and LSE."""
    batch = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    splits = tl.load(num_splits + batch)
    if split >= splits:
        return
    kv_start = tl.load(kv_indptr + batch)
    kv_len = tl.load(kv_indptr + batch + 1) - kv_start
    # Whole tiles per split; _merge_splits_kernel recomputes the same bounds.
    split_len = tl.cdiv(tl.cdiv(kv_len, splits), BLOCK_N) * BLOCK_N
    lo = split * split_len
    hi = tl.minimum(lo + split_len, kv_len)
    if lo >= hi:
        return

    offs_h = tl.arange(0, BLOCK_H)
    mask_h = offs_h < GROUP
    heads = kv_head * GROUP + offs_h
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    q = tl.load(
        Q + batch * stride_q_b + heads[:, None] * stride_q_h + offs_d[None, :],
        mask=mask_h[:, None],
        other=0.0,
    ).to(COMPUTE_DTYPE)
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, DV], tl.float32)
    m_i, l_i, acc = fold_slots(
        q, m_i, l_i, acc, kv_indices + kv_start, lo, hi, kv_head, KRec, stride_k_s, stride_k_h, V,
        stride_v_s, stride_v_h, Stats, stride_st_r, stride_st_h, num_rows, SlotRows, k_scale,
        v_scale, sm_scale, logit_cap, BLOCK_N, D, DV, KEPT, K_MASK_OFF, K_SIGN_OFF, K_FILL_OFF,
        SIGN_WORDS, MEAN_RECOVERY, VALUES_PACKED, V_KEPT, V_MASK_OFF, V_FILL_OFF, IS_FP8,
        COMPUTE_DTYPE, OUT_MAX, HAS_CAP, DOT_PRECISION,
    )  # fmt: skip

    mid = batch * stride_mid_b + heads * stride_mid_h + split * stride_mid_s
    tl.store(MidO + mid[:, None] * DV + offs_dv[None, :], acc / l_i[:, None], mask=mask_h[:, None])
    tl.store(MidLse + mid, m_i + tl.log(l_i), mask=mask_h)


@triton.jit
def _merge_splits_kernel(
    MidO,
    MidLse,
    stride_mid_b,
    stride_mid_h,
    stride_mid_s,
    kv_indptr,
    num_splits,
    Out,
    stride_o_b,
    stride_o_h,
    Lse,
    stride_lse_b,
    BLOCK_N: tl.constexpr,
    DV: tl.constexpr,
    GRID_SPLITS: tl.constexpr,
):
    """One program per (request, query head): the log-sum-exp merge of its splits' partials."""
    batch = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    kv_len = tl.load(kv_indptr + batch + 1) - tl.load(kv_indptr + batch)
    splits = tl.load(num_splits + batch)
    split_len = tl.cdiv(tl.cdiv(kv_len, splits), BLOCK_N) * BLOCK_N
    offs_dv = tl.arange(0, DV)

    m = float("-inf")
    total = 0.0
    acc = tl.zeros([DV], tl.float32)
    base = batch * stride_mid_b + head * stride_mid_h
    for split in range(GRID_SPLITS):
        # Same emptiness test as the split kernel: empty splits wrote nothing.
        if (split < splits) & (split * split_len < kv_len):
            lse = tl.load(MidLse + base + split * stride_mid_s)
            o = tl.load(MidO + (base + split * stride_mid_s) * DV + offs_dv)
            m_new = tl.maximum(m, lse)
            alpha = tl.exp(m - m_new)
            w = tl.exp(lse - m_new)
            acc = acc * alpha + w * o
            total = total * alpha + w
            m = m_new
    # An empty request (kv_len == 0) gets output 0 and LSE -inf.
    out = acc / tl.where(total > 0, total, 1.0)
    tl.store(Out + batch * stride_o_b + head * stride_o_h + offs_dv, out.to(Out.dtype.element_ty))
    tl.store(Lse + batch * stride_lse_b + head, m + tl.log(total))


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------


def _check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.stride(-1) != 1:
        raise ValueError(
            f"{name} must be contiguous in its last dimension, got strides {t.stride()}"
        )


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _record_strides(name: str, views: dict[str, torch.Tensor | None], offsets: dict[str, int]):
    """Byte strides ``(slot, head)`` of the records behind typed views, after checking that every
    view sits at its ``SlotLayout`` offset of the same records (the pool's ``key_views`` /
    ``value_views``): the kernels address one record per slot and head from its first byte."""
    base = views["kept"]
    strides = (base.stride(0) * base.element_size(), base.stride(1) * base.element_size())
    for part, view in views.items():
        if view is None or view.numel() == 0:  # no sign words when nothing is pruned
            continue
        if view.dim() == 3:  # the fill is [S, H]
            _check_last_dim_contiguous(f"{name}.{part}", view)
        found = (view.stride(0) * view.element_size(), view.stride(1) * view.element_size())
        offset = view.data_ptr() - base.data_ptr()
        if found != strides or offset != offsets[part]:
            raise ValueError(
                f"{name} must be typed views of one record buffer (kernels/layout.py key_views / "
                f"value_views): {name}.{part} is at byte offset {offset} with byte strides "
                f"{found}, expected {offsets[part]} and {strides}"
            )
    if base.data_ptr() % 16 or any(s % 16 for s in strides):
        raise ValueError(f"{name} records must be 16-byte aligned, got strides {strides}")
    return strides


def cache_launch_args(
    keys: PackedKeys,
    values: PackedValues | torch.Tensor,
    window_stats: torch.Tensor,
    slot_rows: torch.Tensor,
    query_dtype: torch.dtype,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> tuple[list, dict]:
    """Pointer/stride arguments and constexprs that address one layer's compact cache.

    Shared by the decode and extend launchers, whose kernels take the arguments in this order.
    ``keys`` / compressed ``values`` are the pool's typed views into its records; the kernels get
    each record buffer's first byte (the ``kept`` view) and the record layout as constexprs.
    Tiles are rebuilt in the cache dtype, or in the query's dtype for an FP8 cache.
    """
    head_dim = keys.mask.shape[-1] * 32
    mean = keys.sign is not None
    if mean != (keys.fill is not None):
        raise ValueError("PackedKeys.sign and PackedKeys.fill must both be set ('mean') or both None")
    packed_values = isinstance(values, PackedValues)
    value_dim = values.mask.shape[-1] * 32 if packed_values else values.shape[-1]
    layout = SlotLayout(
        head_dim=head_dim,
        dtype=keys.kept.dtype,
        key_kept=keys.kept.shape[-1],
        value_kept=values.kept.shape[-1] if packed_values else value_dim,
        recovery="mean" if mean else "zero",
        values_compressed=packed_values,
    )
    key_offsets = {"kept": 0, "mask": layout.key_mask_offset, "sign": layout.key_sign_offset,
                   "fill": layout.key_fill_offset}  # fmt: skip
    k_strides = _record_strides("keys", keys._asdict(), key_offsets)
    if packed_values:
        value_offsets = {"kept": 0, "mask": layout.value_mask_offset, "fill": layout.value_fill_offset}
        v_data, v_strides = values.kept, _record_strides("values", values._asdict(), value_offsets)
    else:
        _check_last_dim_contiguous("values", values)
        v_data, v_strides = values, (values.stride(0), values.stride(1))
    _check_last_dim_contiguous("window_stats", window_stats)
    if window_stats.shape[0] == 0:
        raise ValueError("window_stats has no rows")
    is_fp8 = layout.is_fp8
    compute = query_dtype if is_fp8 else keys.kept.dtype
    args = [
        keys.kept, *k_strides,
        v_data, *v_strides,
        window_stats, window_stats.stride(0), window_stats.stride(2), window_stats.shape[0],
        slot_rows, float(k_scale), float(v_scale),
    ]  # fmt: skip
    constexprs = dict(
        D=head_dim,
        DV=value_dim,
        KEPT=layout.key_kept,
        K_MASK_OFF=layout.key_mask_offset,
        K_SIGN_OFF=layout.key_sign_offset,
        K_FILL_OFF=layout.key_fill_offset,
        SIGN_WORDS=layout.sign_words,
        MEAN_RECOVERY=mean,
        VALUES_PACKED=packed_values,
        V_KEPT=layout.value_kept,
        V_MASK_OFF=layout.value_mask_offset if packed_values else 0,
        V_FILL_OFF=layout.value_fill_offset if packed_values else 0,
        IS_FP8=is_fp8,
        COMPUTE_DTYPE=_TL_DTYPES[compute],
        OUT_MAX=torch.finfo(compute).max,
        DOT_PRECISION="ieee" if compute == torch.float32 else "tf32",
    )
    return args, constexprs


def _device_sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the CPU interpreter: any nominal count
#: Registers per thread the split kernel is compiled for: 16 resident warps per SM (4 CTAs of 4
#: warps) on sm_80/sm_90, whose 65536 registers per SM the rebuilt tiles would otherwise fill.
MAX_REGISTERS = 128
#: Measured residency (CTAs per SM) of compiled split kernels, by ``(device, geometry)``.
_RESIDENCY: dict[tuple, int] = {}


def ctas_per_sm(device: torch.device, registers: int, shared: int, num_warps: int) -> int:
    """Resident CTAs per SM of a kernel: the least of what registers (allocated per warp in units
    of 256), shared memory (plus 1 KiB reserved per CTA), warps and the CTA limit allow."""
    props = torch.cuda.get_device_properties(device)
    regs_per_warp = -(-registers * 32 // 256) * 256
    limits = [
        getattr(props, "regs_per_multiprocessor", 65536) // (regs_per_warp * num_warps),
        props.max_threads_per_multi_processor // (32 * num_warps),
        32,
    ]
    if shared:
        smem = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
        limits.append(smem // (-(-shared // 128) * 128 + 1024))
    return max(1, min(limits))


class SparKDecodeWrapper:
    """Batched decode attention over one SparK compact cache, planned once per batch shape.

    ``plan`` runs on the host: it fixes each request's number of KV splits and allocates the
    split scratch for the batch size; ``run`` only launches two kernels (no allocation when
    ``out`` is given, no host sync), so it can be captured in a CUDA graph and
    replayed after ``plan`` is called again with the same batch size. Use one wrapper per
    captured batch size: planning another batch size reallocates the scratch.

    Args:
        num_qo_heads, num_kv_heads: ``Hq`` and ``Hkv`` (``Hq % Hkv == 0``; a program holds one
            KV group's ``Hq / Hkv`` query heads).
        head_dim: ``D`` of queries and keys; ``v_head_dim``: ``Dv`` (default ``D``).
        device: where the scratch lives.
        max_splits: upper bound of KV splits per request.
        num_sms: multiprocessor count used to size the grid (default: the device's).
        block_n: KV slots per tile (default 128 for ``D = 32``, 64 for ``D = 64``, else 32: at
            least one slot-word, 32 channels of one slot, per thread of 4 warps).
        num_warps: warps of the split kernel (default 4, 8 for ``D > 128``).
        min_split_len: fewest slots worth a split of their own (default ``4 * block_n``).
        fixed_split_len: deterministic mode: every split holds this many slots (a multiple of
            ``block_n``) and the split axis is ``max_splits`` for every batch size, so a request's
            splits, and the order they are merged in, do not depend on the rest of the batch
            (``max_splits`` must cover the longest request).

    The grid's split axis is ``min(max_splits, cdiv(R * num_sms, batch * num_kv_heads))`` with
    ``R`` the split kernel's residency in CTAs per SM: measured from the compiled kernel once one
    has run on the device (``ctas_per_sm``), before that what ``MAX_REGISTERS`` allows (4 for 4
    warps). A wrapper fixes the split axis of a batch size at its first ``plan`` of that size, so
    CUDA-graph replays keep a static grid and scratch.
    """

    def __init__(
        self,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        v_head_dim: int | None = None,
        device: torch.device | str = "cuda",
        max_splits: int = 32,
        num_sms: int | None = None,
        block_n: int | None = None,
        num_warps: int | None = None,
        min_split_len: int | None = None,
        fixed_split_len: int | None = None,
    ):
        if num_qo_heads % num_kv_heads:
            raise ValueError(
                f"{num_qo_heads} query heads are not a multiple of {num_kv_heads} KV heads"
            )
        self.num_qo_heads = num_qo_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.v_head_dim = v_head_dim or head_dim
        self.device = torch.device(device)
        self.max_splits = max_splits
        self.num_sms = num_sms or _device_sm_count(self.device)
        self.block_n = block_n or {32: 128, 64: 64}.get(head_dim, 32)
        self.num_warps = num_warps or (4 if head_dim <= 128 else 8)
        self.min_split_len = min_split_len or 4 * self.block_n
        if fixed_split_len is not None and fixed_split_len % self.block_n:
            raise ValueError(f"fixed_split_len={fixed_split_len} is not a multiple of block_n={self.block_n}")
        self.fixed_split_len = fixed_split_len
        self._geometry = (self.device, head_dim, self.v_head_dim, self.block_n, num_warps)
        self._grid_by_batch: dict[int, int] = {}
        self._batch = -1
        self._grid_splits = 0
        self._mid_o = self._mid_lse = self._num_splits = self._lse = None
        self._kv_indptr = self._kv_indices = None

    @property
    def ctas_per_sm(self) -> int:
        """Residency of the split kernel: measured once it ran on this device, else the register
        bound ``MAX_REGISTERS`` sets."""
        measured = _RESIDENCY.get(self._geometry)
        if measured:
            return measured
        return max(1, min(65536 // (MAX_REGISTERS * 32 * self.num_warps), 64 // self.num_warps))

    def grid_splits(self, batch: int) -> int:
        """Size of the grid's split axis for a batch size (fixed at its first ``plan``)."""
        if batch in self._grid_by_batch:
            return self._grid_by_batch[batch]
        if self.fixed_split_len is not None:
            return self.max_splits
        programs = self.ctas_per_sm * self.num_sms
        return max(1, min(self.max_splits, -(-programs // (batch * self.num_kv_heads))))

    def plan(
        self,
        kv_indptr: torch.Tensor,
        kv_indices: torch.Tensor,
        *,
        seq_lens_cpu: torch.Tensor | None = None,
        split_len: int | None = None,
    ) -> None:
        """Schedule a batch.

        Args:
            kv_indptr: ``[B + 1]`` int32 on the device, CSR offsets into ``kv_indices``.
            kv_indices: ``[nnz]`` int32 or int64 on the device: slot ids of each request's tokens
                in order (pages are runs of consecutive slots). Both are kept by reference:
                ``run`` reads their contents at launch time.
            seq_lens_cpu: ``[B]`` KV lengths on the host; without it they are read from
                ``kv_indptr`` (a device-to-host copy).
            split_len: slots per split; by default the work spread over one resident wave of
                programs (``ctas_per_sm * num_sms``), and at least ``min_split_len`` slots.
        """
        if seq_lens_cpu is None:
            indptr = kv_indptr.to("cpu", torch.int64)
            seq_lens_cpu = indptr[1:] - indptr[:-1]
        lens = seq_lens_cpu.to("cpu", torch.int64)
        batch = lens.numel()
        if kv_indptr.numel() != batch + 1:
            raise ValueError(f"kv_indptr has {kv_indptr.numel()} entries for a batch of {batch}")
        grid_splits = self._grid_by_batch.setdefault(batch, self.grid_splits(batch))
        if self.fixed_split_len is not None:
            split_len = self.fixed_split_len
            longest = int(lens.max()) if batch else 0
            if -(-longest // split_len) > grid_splits:
                raise ValueError(f"a request of {longest} slots needs more than max_splits={grid_splits} "
                                 f"splits of {split_len}")  # fmt: skip
        if split_len is None:
            work = int(lens.sum()) * self.num_kv_heads
            split_len = max(self.min_split_len, -(-work // (self.ctas_per_sm * self.num_sms)))
        split_len = -(-split_len // self.block_n) * self.block_n
        splits = (-(-lens // split_len)).clamp(1, grid_splits).to(torch.int32)

        if (batch, grid_splits) != (self._batch, self._grid_splits):
            shape = (batch, self.num_qo_heads, grid_splits)
            self._mid_o = torch.empty(
                shape + (self.v_head_dim,), dtype=torch.float32, device=self.device
            )
            self._mid_lse = torch.empty(shape, dtype=torch.float32, device=self.device)
            self._num_splits = torch.empty(batch, dtype=torch.int32, device=self.device)
            self._lse = torch.empty(shape[:2], dtype=torch.float32, device=self.device)
            self._batch, self._grid_splits = batch, grid_splits
        self._num_splits.copy_(splits, non_blocking=True)
        self._kv_indptr, self._kv_indices = kv_indptr, kv_indices

    @property
    def num_splits(self) -> torch.Tensor:
        """``[B]`` int32 on the device: splits per request chosen by the last ``plan``."""
        return self._num_splits

    def run(
        self,
        q: torch.Tensor,
        keys: PackedKeys,
        values: PackedValues | torch.Tensor,
        window_stats: torch.Tensor,
        slot_rows: torch.Tensor,
        *,
        sm_scale: float | None = None,
        logit_cap: float = 0.0,
        out: torch.Tensor | None = None,
        lse: torch.Tensor | None = None,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of each request's query over its planned KV slots.

        Args:
            q: ``[B, Hq, D]`` (last dim contiguous), any float dtype; cast to the KV dtype (kept
                in its own dtype for an FP8 cache, whose tiles are rebuilt in q's dtype).
            keys: one layer's ``PackedKeys`` over the pool (views into its records, see
                kernels/layout.py): ``kept [S, Hkv, T]`` cache dtype, ``mask [S, Hkv, D/32]``
                int32, and for "mean" recovery ``sign [S, Hkv, ceil(P/32)]`` int32 (the pruned
                channels' signs) and ``fill [S, Hkv]`` bfloat16; both None for "zero".
            values: dense ``[S, Hkv, Dv]`` cache dtype, or ``PackedValues`` (``kept [S, Hkv, Tv]``,
                ``mask [S, Hkv, Dv/32]`` int32, ``fill [S, Hkv]`` bfloat16).
            window_stats: ``[R, 1 or 2, Hkv, D]`` (bfloat16 in the pool); ``[:, 0]`` is the key
                channel norm ``Qn`` (the only part read here).
            slot_rows: ``[S]`` int32, each slot's row in ``window_stats``.
            sm_scale: logit scale (default ``1/sqrt(D)``); logit_cap: ``cap * tanh(x / cap)``
                applied to scaled logits when > 0.
            out: ``[B, Hq, Dv]`` output buffer (default: a new tensor of q's dtype).
            lse: ``[B, Hq]`` float32 buffer for the natural-log LSE (default: the wrapper's own,
                overwritten by the next ``run``).
            k_scale, v_scale: an FP8 cache's dequantisation scales (ignored otherwise).

        Returns:
            ``(out, lse)``. A request with no KV slots gets output 0 and LSE ``-inf``.
        """
        if self._num_splits is None:
            raise RuntimeError("SparKDecodeWrapper.run called before plan")
        batch = q.shape[0]
        if batch != self._batch or q.shape[1] != self.num_qo_heads or q.shape[2] != self.head_dim:
            raise ValueError(
                f"q has shape {tuple(q.shape)}, the plan is for "
                f"[{self._batch}, {self.num_qo_heads}, {self.head_dim}]"
            )
        _check_last_dim_contiguous("q", q)
        if out is None:
            out = torch.empty(
                (batch, self.num_qo_heads, self.v_head_dim), dtype=q.dtype, device=q.device
            )
        if lse is None:
            lse = self._lse
        _check_last_dim_contiguous("out", out)
        _check_last_dim_contiguous("lse", lse)
        cache_args, constexprs = cache_launch_args(keys, values, window_stats, slot_rows, q.dtype, k_scale, v_scale)
        if constexprs["D"] != self.head_dim or constexprs["DV"] != self.v_head_dim:
            raise ValueError(
                f"the cache has head dims ({constexprs['D']}, {constexprs['DV']}), the wrapper "
                f"({self.head_dim}, {self.v_head_dim})"
            )
        group = self.num_qo_heads // self.num_kv_heads
        mid_o, mid_lse = self._mid_o, self._mid_lse
        compiled = _decode_split_kernel[(batch, self.num_kv_heads, self._grid_splits)](
            q, q.stride(0), q.stride(1),
            *cache_args,
            self._kv_indptr, self._kv_indices, self._num_splits,
            mid_o, mid_lse, mid_lse.stride(0), mid_lse.stride(1), mid_lse.stride(2),
            sm_scale if sm_scale is not None else 1.0 / math.sqrt(self.head_dim),
            float(logit_cap),
            GROUP=group,
            BLOCK_H=max(16, triton.next_power_of_2(group)),
            BLOCK_N=self.block_n,
            HAS_CAP=logit_cap > 0,
            num_warps=self.num_warps,
            maxnreg=MAX_REGISTERS,
            **constexprs,
        )  # fmt: skip
        if self.device.type == "cuda" and self._geometry not in _RESIDENCY:
            _RESIDENCY[self._geometry] = ctas_per_sm(
                self.device, compiled.n_regs, compiled.metadata.shared, self.num_warps
            )
        _merge_splits_kernel[(batch, self.num_qo_heads)](
            mid_o, mid_lse, mid_lse.stride(0), mid_lse.stride(1), mid_lse.stride(2),
            self._kv_indptr, self._num_splits,
            out, out.stride(0), out.stride(1),
            lse, lse.stride(0),
            BLOCK_N=self.block_n,
            DV=self.v_head_dim,
            GRID_SPLITS=self._grid_splits,
            num_warps=1 if self.v_head_dim <= 64 else 2,
        )  # fmt: skip
        return out, lse
