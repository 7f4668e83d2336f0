"""Extend (prefill) attention: new tokens over their request's compact prefix and causally over
themselves, in one fused kernel.

Grid ``(cdiv(max_q_len, BLOCK_M), Hkv, batch)``. A program holds ``BLOCK_M`` queries of all ``G``
query heads of one KV group, stacked as ``G_pad * BLOCK_M`` rows (``G_pad``: ``G`` rounded up to
a power of two; row ``r`` is query ``r // G_pad``, head ``r % G_pad``), and keeps one online
softmax across two stages:

1. the request's prefix slots, read in the compact layout and rebuilt in registers ``BLOCK_N``
   slots at a time by ``decode.fold_tile`` (the same tile rebuild as decode, one window row's run
   at a time); every query sees the whole prefix. A rebuilt tile serves all ``G`` heads, so the
   rebuild is paid once per KV head, not once per query head;
2. the new tokens' dense keys/values, causally: query ``i`` of the extend sees new tokens
   ``j <= i``.

This equals ``reference.attention`` over ``concat(unpack(prefix), new)`` with
``causal_offset = prefix_len``. The new tokens are read dense, as they were computed: storing
them compressed (``compress.compress_and_store``) is for the steps that follow.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .decode import cache_launch_args, fold_slots, soft_cap
from .layout import FP8_DTYPES
from .reference import PackedKeys, PackedValues

__all__ = ["extend_attention"]


@triton.jit
def _extend_kernel(
    Q,
    stride_q_t,
    stride_q_h,
    KNew,
    stride_kn_t,
    stride_kn_h,
    VNew,
    stride_vn_t,
    stride_vn_h,
    Out,
    stride_o_t,
    stride_o_h,
    Lse,
    stride_lse_t,
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
    qo_indptr,
    prefix_indptr,
    prefix_indices,
    sm_scale,
    logit_cap,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
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
    """One program: queries ``[BLOCK_M * program_id(0), +BLOCK_M)`` of request ``program_id(2)``,
    all query heads of KV head ``program_id(1)``; the compact prefix, then the new tokens."""
    m_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    batch = tl.program_id(2)
    q_start = tl.load(qo_indptr + batch)
    q_len = tl.load(qo_indptr + batch + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    prefix_start = tl.load(prefix_indptr + batch)
    prefix_len = tl.load(prefix_indptr + batch + 1) - prefix_start

    ROWS: tl.constexpr = GROUP_PAD * BLOCK_M
    offs_r = tl.arange(0, ROWS)
    query = m_block * BLOCK_M + offs_r // GROUP_PAD  # within the request's new tokens
    head = kv_head * GROUP + offs_r % GROUP_PAD
    mask_r = (query < q_len) & (offs_r % GROUP_PAD < GROUP)
    tokens = (q_start + query).to(tl.int64)
    offs_d = tl.arange(0, D)
    offs_dv = tl.arange(0, DV)
    q = tl.load(
        Q + tokens[:, None] * stride_q_t + head[:, None] * stride_q_h + offs_d[None, :],
        mask=mask_r[:, None],
        other=0.0,
    ).to(COMPUTE_DTYPE)

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, DV], tl.float32)

    # Stage 1: the compact prefix, visible to every query.
    m_i, l_i, acc = fold_slots(
        q, m_i, l_i, acc, prefix_indices + prefix_start, 0, prefix_len, kv_head, KRec, stride_k_s,
        stride_k_h, V, stride_v_s, stride_v_h, Stats, stride_st_r, stride_st_h, num_rows, SlotRows,
        k_scale, v_scale, sm_scale, logit_cap, BLOCK_N, D, DV, KEPT, K_MASK_OFF, K_SIGN_OFF,
        K_FILL_OFF, SIGN_WORDS, MEAN_RECOVERY, VALUES_PACKED, V_KEPT, V_MASK_OFF, V_FILL_OFF, IS_FP8,
        COMPUTE_DTYPE, OUT_MAX, HAS_CAP, DOT_PRECISION,
    )  # fmt: skip

    # Stage 2: the new tokens, dense and causal; this block's last query is the bound.
    new_end = tl.minimum(q_len, (m_block + 1) * BLOCK_M)
    for start in tl.range(0, new_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        in_range = offs_n < new_end
        new_tokens = (q_start + offs_n).to(tl.int64)
        k = tl.load(
            KNew + new_tokens[:, None] * stride_kn_t + kv_head * stride_kn_h + offs_d[None, :],
            mask=in_range[:, None],
            other=0.0,
        ).to(COMPUTE_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale
        if HAS_CAP:
            s = soft_cap(s, logit_cap)
        # Key 0 is visible to every row (padding rows included), so no row is all -inf.
        visible = in_range[None, :] & (offs_n[None, :] <= query[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            VNew + new_tokens[:, None] * stride_vn_t + kv_head * stride_vn_h + offs_dv[None, :],
            mask=in_range[:, None],
            other=0.0,
        ).to(COMPUTE_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    tl.store(
        Out + tokens[:, None] * stride_o_t + head[:, None] * stride_o_h + offs_dv[None, :],
        (acc / l_i[:, None]).to(Out.dtype.element_ty),
        mask=mask_r[:, None],
    )
    tl.store(Lse + tokens * stride_lse_t + head, m_i + tl.log(l_i), mask=mask_r)


def default_blocks(head_dim: int, group: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): 128 query rows (``G_pad * BLOCK_M``) and 64 slots per tile,
    as SGLang's extend on sm_90, so a rebuilt prefix tile is shared by as many rows as its dense
    tiles are; 64 rows and 32 slots for ``D > 128`` (registers)."""
    rows, block_n = (128, 64) if head_dim <= 128 else (64, 32)
    num_warps = 4 if head_dim <= 64 else 8
    return max(1, rows // triton.next_power_of_2(group)), block_n, num_warps


def extend_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qo_indptr: torch.Tensor,
    prefix_indptr: torch.Tensor,
    prefix_indices: torch.Tensor,
    keys: PackedKeys,
    values: PackedValues | torch.Tensor,
    window_stats: torch.Tensor,
    slot_rows: torch.Tensor,
    *,
    max_q_len: int | None = None,
    sm_scale: float | None = None,
    logit_cap: float = 0.0,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a batch's new tokens over their compact prefix and, causally, themselves.

    Args:
        q: ``[Nq, Hq, D]`` queries of the new tokens, requests back to back.
        k, v: ``[Nq, Hkv, D]`` / ``[Nq, Hkv, Dv]`` dense keys/values of the same tokens, in the
            cache's dtype (an FP8 cache: any float dtype, read as q's) (last dims contiguous).
        qo_indptr: ``[B + 1]`` int32, request ``b``'s new tokens are rows
            ``qo_indptr[b]:qo_indptr[b + 1]`` of q/k/v.
        prefix_indptr: ``[B + 1]`` int32, CSR offsets into ``prefix_indices``.
        prefix_indices: ``[nnz]`` int32/int64 slot ids of each request's cached prefix, in order.
        keys, values, window_stats, slot_rows: one layer's compact cache, as for
            ``SparKDecodeWrapper.run``.
        max_q_len: longest extend in the batch (sizes the grid); by default read from
            ``qo_indptr`` (a device-to-host copy).
        sm_scale: logit scale (default ``1/sqrt(D)``); logit_cap: ``cap * tanh(x / cap)`` when > 0.
        out: ``[Nq, Hq, Dv]`` buffer (default: new, q's dtype); lse: ``[Nq, Hq]`` float32 buffer
            for the natural-log LSE (default: new).
        block_m, block_n, num_warps: tile overrides (queries per program, each with all ``G``
            heads of its KV group; slots per KV tile).
        k_scale, v_scale: an FP8 cache's dequantisation scales (ignored otherwise).

    Returns:
        ``(out, lse)``.
    """
    num_q, num_qo_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if num_qo_heads % num_kv_heads:
        raise ValueError(
            f"{num_qo_heads} query heads are not a multiple of {num_kv_heads} KV heads"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    fp8 = keys.kept.dtype in FP8_DTYPES
    if not fp8 and (k.dtype != keys.kept.dtype or v.dtype != keys.kept.dtype):
        raise ValueError(f"new k/v ({k.dtype}, {v.dtype}) must have the cache's dtype {keys.kept.dtype}")
    cache_args, constexprs = cache_launch_args(keys, values, window_stats, slot_rows, q.dtype, k_scale, v_scale)
    if constexprs["D"] != head_dim or constexprs["DV"] != v.shape[-1]:
        raise ValueError(
            f"the cache has head dims ({constexprs['D']}, {constexprs['DV']}), q/v "
            f"({head_dim}, {v.shape[-1]})"
        )
    value_dim = v.shape[-1]
    if out is None:
        out = torch.empty((num_q, num_qo_heads, value_dim), dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty((num_q, num_qo_heads), dtype=torch.float32, device=q.device)
    for name, t in (("out", out), ("lse", lse)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    if max_q_len is None:
        max_q_len = int((qo_indptr[1:] - qo_indptr[:-1]).max()) if qo_indptr.numel() > 1 else 0
    batch = qo_indptr.numel() - 1
    if num_q == 0 or batch == 0 or max_q_len == 0:
        return out, lse
    group = num_qo_heads // num_kv_heads
    default_m, default_n, default_warps = default_blocks(head_dim, group)
    block_m, block_n = block_m or default_m, block_n or default_n
    group_pad = triton.next_power_of_2(group)
    block_m = max(block_m, -(-16 // group_pad))  # tl.dot needs 16 query rows
    _extend_kernel[(triton.cdiv(max_q_len, block_m), num_kv_heads, batch)](
        q, q.stride(0), q.stride(1),
        k, k.stride(0), k.stride(1),
        v, v.stride(0), v.stride(1),
        out, out.stride(0), out.stride(1),
        lse, lse.stride(0),
        *cache_args,
        qo_indptr, prefix_indptr, prefix_indices,
        sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim),
        float(logit_cap),
        GROUP=group,
        GROUP_PAD=group_pad,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HAS_CAP=logit_cap > 0,
        num_warps=num_warps or default_warps,
        **constexprs,
    )  # fmt: skip
    return out, lse
