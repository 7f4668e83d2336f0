"""Decode attention over the SparK compact KV cache, with a FlashInfer-style plan/run wrapper.

One query token per request attends to that request's KV slots, read in their compact form
(kernels/layout.py): the pruned channels are rebuilt in registers, so HBM traffic is the compact
bytes only. Two launches:

* ``_decode_split_kernel``, grid ``(batch, kv_heads, grid_splits)``: one program holds the ``G``
  query heads of one KV group (padded to 16 rows for ``tl.dot``) and walks one contiguous split
  of the request's slots in ``BLOCK_N`` tiles with an online softmax; it writes a normalised
  partial output and its log-sum-exp.
* ``_merge_splits_kernel``, grid ``(batch, q_heads)``: merges the partials by log-sum-exp.

Rebuilding a tile of ``BLOCK_N`` slots (one KV head):

* the bitmap words ``[BLOCK_N, D/32]`` are expanded to bits ``[BLOCK_N, D]``;
* the rank of a kept channel (its index in ``kept``) is the exclusive prefix count of the bits;
* kept channels are gathered at ``kept[slot, head, rank]``; a pruned key channel gets
  ``(sign ? -1 : 1) * fill * Qn[c]^-1/2`` ("mean") or 0 ("zero"), rounded to the KV dtype as
  ``reference.unpack_keys`` does; a pruned value channel gets the value fill.

``Qn`` is row ``slot_rows[slot]`` of the layer's window statistics; it is read only for pruned
channels, and the few live rows stay in L2.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .layout import FP8_DTYPES
from .reference import PackedKeys, PackedValues

__all__ = ["SparKDecodeWrapper"]


# ---------------------------------------------------------------------------------------------
# Tile rebuilding, shared with the extend kernel
# ---------------------------------------------------------------------------------------------


@triton.jit
def load_bits(words_ptr, row_offs, mask_n, BLOCK_N: tl.constexpr, D: tl.constexpr):
    """Bits ``[BLOCK_N, D]`` int32 (0/1) of the bitmaps at ``words_ptr + row_offs[n]``; channel
    ``c`` is bit ``c % 32`` of word ``c // 32``. Rows off ``mask_n`` read as all zero."""
    W: tl.constexpr = D // 32
    offs_w = tl.arange(0, W)
    words = tl.load(words_ptr + row_offs[:, None] + offs_w[None, :], mask=mask_n[:, None], other=0)
    lane = tl.arange(0, 32)
    # Arithmetic shift of a negative word smears the sign bit; the & 1 keeps one bit.
    bits = (words[:, :, None] >> lane[None, None, :]) & 1
    return tl.reshape(bits, (BLOCK_N, D))


@triton.jit
def gather_kept(kept_ptr, row_offs, bits, scale, IS_FP8: tl.constexpr):
    """Kept entries at their channels ``[BLOCK_N, D]`` as float32 (FP8: times ``scale``), 0 on
    pruned channels; also returns each channel's rank (kept channels below it)."""
    rank = tl.cumsum(bits, axis=1) - bits
    kept = tl.load(kept_ptr + row_offs[:, None] + rank, mask=bits != 0, other=0.0).to(tl.float32)
    if IS_FP8:
        kept = kept * scale
    return kept, rank


@triton.jit
def pruned_negative(sign_ptr, row_offs, mask_n, rank, SIGN_WORDS: tl.constexpr, D: tl.constexpr):
    """``[BLOCK_N, D]`` bool: the sign bit of each pruned channel ``c``, stored at its pruned rank
    ``c - rank(c)`` among ``SIGN_WORDS`` words per slot (meaningless on kept channels)."""
    pruned_rank = tl.arange(0, D)[None, :] - rank
    word = tl.zeros(rank.shape, tl.int32)
    for w in tl.static_range(SIGN_WORDS):
        column = tl.load(sign_ptr + row_offs + w, mask=mask_n, other=0)
        word = tl.where((pruned_rank // 32) == w, column[:, None], word)
    return ((word >> (pruned_rank % 32)) & 1) != 0


@triton.jit
def finite(x, dtype):
    """Clamp float32 ``x`` to ``dtype``'s finite range (a recovered fp16 key can exceed it)."""
    if dtype == tl.float16:
        x = tl.clamp(x, -65504.0, 65504.0)
    return x


@triton.jit
def rebuild_keys(
    slots,
    mask_n,
    kv_head,
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
    Stats,
    stride_st_r,
    stride_st_h,
    SlotRows,
    k_scale,
    out_dtype: tl.constexpr,
    BLOCK_N: tl.constexpr,
    D: tl.constexpr,
    MEAN_RECOVERY: tl.constexpr,
    SIGN_WORDS: tl.constexpr,
    IS_FP8: tl.constexpr,
):
    """Dense keys ``[BLOCK_N, D]`` in ``out_dtype`` for the slots ``slots [BLOCK_N]`` (int64)."""
    bits = load_bits(KMask, slots * stride_km_s + kv_head * stride_km_h, mask_n, BLOCK_N, D)
    k, rank = gather_kept(KKept, slots * stride_kk_s + kv_head * stride_kk_h, bits, k_scale, IS_FP8)
    if MEAN_RECOVERY:
        pruned = (bits == 0) & mask_n[:, None]
        negative = pruned_negative(KSign, slots * stride_ks_s + kv_head * stride_ks_h, mask_n, rank, SIGN_WORDS, D)
        fill = tl.load(KFill + slots * stride_kf_s + kv_head * stride_kf_h, mask=mask_n, other=0.0).to(tl.float32)
        row = tl.load(SlotRows + slots, mask=mask_n, other=0).to(tl.int64)
        offs_d = tl.arange(0, D)
        qn = tl.load(
            Stats + row[:, None] * stride_st_r + kv_head * stride_st_h + offs_d[None, :],
            mask=pruned,
            other=0.0,
        ).to(tl.float32)
        # Norms below the smallest normal float (0 included) recover to 0, as in the reference:
        # rsqrt of 0 or of a flushed denormal is inf, and inf * 0 = nan.
        normal = qn >= 1.1754943508222875e-38
        magnitude = fill[:, None] * tl.where(normal, tl.math.rsqrt(tl.where(normal, qn, 1.0)), 0.0)
        recovered = finite(tl.where(negative, -magnitude, magnitude), out_dtype)
        k = tl.where(bits != 0, k, recovered)
    return k.to(out_dtype)


@triton.jit
def rebuild_values(
    slots,
    mask_n,
    kv_head,
    V,
    stride_v_s,
    stride_v_h,
    VMask,
    stride_vm_s,
    stride_vm_h,
    VFill,
    stride_vf_s,
    stride_vf_h,
    v_scale,
    out_dtype: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DV: tl.constexpr,
    VALUES_PACKED: tl.constexpr,
    IS_FP8: tl.constexpr,
):
    """Dense values ``[BLOCK_N, DV]`` in ``out_dtype``; ``V`` is the dense cache or the kept part."""
    row_offs = slots * stride_v_s + kv_head * stride_v_h
    if VALUES_PACKED:
        bits = load_bits(VMask, slots * stride_vm_s + kv_head * stride_vm_h, mask_n, BLOCK_N, DV)
        v, _ = gather_kept(V, row_offs, bits, v_scale, IS_FP8)
        fill = tl.load(VFill + slots * stride_vf_s + kv_head * stride_vf_h, mask=mask_n, other=0.0).to(tl.float32)
        v = tl.where(bits != 0, v, finite(fill[:, None], out_dtype))
    else:
        offs_d = tl.arange(0, DV)
        v = tl.load(V + row_offs[:, None] + offs_d[None, :], mask=mask_n[:, None], other=0.0).to(tl.float32)
        if IS_FP8:
            v = v * v_scale
    return v.to(out_dtype)


@triton.jit
def soft_cap(x, cap):
    """``cap * tanh(x / cap)``, with tanh written through the sigmoid (no libdevice needed)."""
    return cap * (2.0 * tl.sigmoid(2.0 * x / cap) - 1.0)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _decode_split_kernel(
    Q,
    stride_q_b,
    stride_q_h,
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
    V,
    stride_v_s,
    stride_v_h,
    VMask,
    stride_vm_s,
    stride_vm_h,
    VFill,
    stride_vf_s,
    stride_vf_h,
    Stats,
    stride_st_r,
    stride_st_h,
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
    MEAN_RECOVERY: tl.constexpr,
    VALUES_PACKED: tl.constexpr,
    SIGN_WORDS: tl.constexpr,
    IS_FP8: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    HAS_CAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    batch = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    splits = tl.load(num_splits + batch)
    if split >= splits:
        return
    kv_start = tl.load(kv_indptr + batch).to(tl.int64)
    kv_len = tl.load(kv_indptr + batch + 1).to(tl.int64) - kv_start
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
    for start in tl.range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < hi
        slots = tl.load(kv_indices + kv_start + offs_n, mask=mask_n, other=0).to(tl.int64)
        k = rebuild_keys(
            slots, mask_n, kv_head,
            KKept, stride_kk_s, stride_kk_h,
            KMask, stride_km_s, stride_km_h,
            KSign, stride_ks_s, stride_ks_h,
            KFill, stride_kf_s, stride_kf_h,
            Stats, stride_st_r, stride_st_h, SlotRows, k_scale,
            COMPUTE_DTYPE, BLOCK_N, D, MEAN_RECOVERY, SIGN_WORDS, IS_FP8,
        )  # fmt: skip
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale
        if HAS_CAP:
            s = soft_cap(s, logit_cap)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = rebuild_values(
            slots, mask_n, kv_head,
            V, stride_v_s, stride_v_h,
            VMask, stride_vm_s, stride_vm_h,
            VFill, stride_vf_s, stride_vf_h, v_scale,
            COMPUTE_DTYPE, BLOCK_N, DV, VALUES_PACKED, IS_FP8,
        )  # fmt: skip
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

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
    Tiles are rebuilt in the cache dtype, or in the query's dtype for an FP8 cache.
    """
    head_dim = keys.mask.shape[-1] * 32
    mean = keys.sign is not None
    if mean != (keys.fill is not None):
        raise ValueError("PackedKeys.sign and PackedKeys.fill must both be set ('mean') or both None")
    packed_values = isinstance(values, PackedValues)
    for name, t in (("keys.kept", keys.kept), ("keys.mask", keys.mask), ("window_stats", window_stats)):
        _check_last_dim_contiguous(name, t)
    v_data = values.kept if packed_values else values
    _check_last_dim_contiguous("values", v_data)
    if packed_values:
        _check_last_dim_contiguous("values.mask", values.mask)
        v_mask, v_fill, value_dim = values.mask, values.fill, values.mask.shape[-1] * 32
    else:
        v_mask, v_fill, value_dim = values, values, values.shape[-1]
    # Unused operands ("zero" recovery, dense values) point at a live tensor; never read.
    k_sign = keys.sign if mean else keys.mask
    k_fill = keys.fill if mean else keys.mask
    is_fp8 = keys.kept.dtype in FP8_DTYPES
    compute = query_dtype if is_fp8 else keys.kept.dtype
    args = [
        keys.kept, keys.kept.stride(0), keys.kept.stride(1),
        keys.mask, keys.mask.stride(0), keys.mask.stride(1),
        k_sign, k_sign.stride(0), k_sign.stride(1),
        k_fill, k_fill.stride(0), k_fill.stride(1),
        v_data, v_data.stride(0), v_data.stride(1),
        v_mask, v_mask.stride(0), v_mask.stride(1),
        v_fill, v_fill.stride(0), v_fill.stride(1),
        window_stats, window_stats.stride(0), window_stats.stride(2),
        slot_rows, float(k_scale), float(v_scale),
    ]  # fmt: skip
    constexprs = dict(
        D=head_dim,
        DV=value_dim,
        MEAN_RECOVERY=mean,
        VALUES_PACKED=packed_values,
        SIGN_WORDS=k_sign.shape[-1] if mean else 0,
        IS_FP8=is_fp8,
        COMPUTE_DTYPE=_TL_DTYPES[compute],
        DOT_PRECISION="ieee" if compute == torch.float32 else "tf32",
    )
    return args, constexprs


def _device_sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the CPU interpreter: any nominal count


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
        block_n: KV slots per tile (default 32 for ``D <= 128``, else 16).
        num_warps: warps of the split kernel (default 4).
        min_split_len: fewest slots worth a split of their own (default ``4 * block_n``).

    The grid's split axis is ``min(max_splits, cdiv(4 * num_sms, batch * num_kv_heads))``,
    fixed by the batch size alone, so replays keep a static grid.
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
        num_warps: int = 4,
        min_split_len: int | None = None,
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
        self.block_n = block_n or (32 if head_dim <= 128 else 16)
        self.num_warps = num_warps
        self.min_split_len = min_split_len or 4 * self.block_n
        self._batch = -1
        self._grid_splits = 0
        self._mid_o = self._mid_lse = self._num_splits = self._lse = None
        self._kv_indptr = self._kv_indices = None

    def grid_splits(self, batch: int) -> int:
        """Size of the grid's split axis for a batch size."""
        return max(1, min(self.max_splits, -(-4 * self.num_sms // (batch * self.num_kv_heads))))

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
            split_len: slots per split; by default about ``4 * num_sms`` programs in all, and
                at least ``min_split_len`` slots per split.
        """
        if seq_lens_cpu is None:
            indptr = kv_indptr.to("cpu", torch.int64)
            seq_lens_cpu = indptr[1:] - indptr[:-1]
        lens = seq_lens_cpu.to("cpu", torch.int64)
        batch = lens.numel()
        if kv_indptr.numel() != batch + 1:
            raise ValueError(f"kv_indptr has {kv_indptr.numel()} entries for a batch of {batch}")
        grid_splits = self.grid_splits(batch)
        if split_len is None:
            work = int(lens.sum()) * self.num_kv_heads
            split_len = max(self.min_split_len, -(-work // (4 * self.num_sms)))
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
        _decode_split_kernel[(batch, self.num_kv_heads, self._grid_splits)](
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
            **constexprs,
        )  # fmt: skip
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
