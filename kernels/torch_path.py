"""The PyTorch path: compress, decode and extend over the SparK compact cache without Triton.

The ``spark`` backend runs this on devices without CUDA (CPU serving, tests, the demo): the same
pool, the same compact layout (kernels/layout.py), the same metadata as the Triton kernels, with the
semantics of ``reference.py``: kept entries, bitmaps and signs bit-exact, recovery as
``reference.unpack_keys`` / ``unpack_values``. Every function is vectorised over tokens and heads;
attention loops over the requests of a batch only, as SGLang's ``torch_native`` backend does.

How a batch's keys are read: the compact parts of all its slots are gathered at once (one
``index_select`` each), transposed head-major (compact bytes, cheap), and expanded to dense keys
``[Hkv, tokens, D]``: bitmap bytes -> bits through a 256-entry table, kept values placed by
``masked_scatter_`` (the kept values are stored in channel order, which is the order of the set
bits), pruned channels recovered from the sign bits, the fill and the window row's ``Qn^-1/2``
(computed once per distinct row). Each request's attention is then two matrix products over its
slice.
"""

from __future__ import annotations

import math
import sys

import torch

from .reference import PackedKeys, PackedValues, from_storage, output_dtype, pack_keys, pack_values, rsqrt_or_zero
from .reference import to_storage

__all__ = ["compress_and_store", "TorchDecodeWrapper", "extend_attention", "unpack_slots"]

if sys.byteorder != "little":  # the byte table below reads int32 bitmap words byte by byte
    raise ImportError("spark_sglang.kernels.torch_path assumes a little-endian machine")

_BYTE_BITS: dict[torch.device, torch.Tensor] = {}


def words_to_bits(words: torch.Tensor) -> torch.Tensor:
    """int32 bitmap words ``[..., D/32]`` -> bool ``[..., D]`` (channel ``c`` = bit ``c % 32`` of
    word ``c // 32``), one table lookup per byte (``reference.words_to_bits`` restated)."""
    table = _BYTE_BITS.get(words.device)
    if table is None:
        table = ((torch.arange(256)[:, None] >> torch.arange(8)) & 1).bool().to(words.device)
        _BYTE_BITS[words.device] = table
    as_bytes = words.contiguous().view(torch.uint8).reshape(-1).long()
    return table.index_select(0, as_bytes).view(*words.shape[:-1], words.shape[-1] * 32)


# ---------------------------------------------------------------------------------------------
# Compress-and-store
# ---------------------------------------------------------------------------------------------


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
    """Same contract as ``compress.compress_and_store``: select, pack and write a batch's keys and
    values at ``slots`` under window rows ``rows``. Runs ``reference.pack_keys`` /
    ``pack_values``, so every stored bit equals the reference's."""
    num_tokens, _, head_dim = k.shape
    if num_tokens == 0:
        return
    slots = slots.long()
    stats = window_stats.index_select(0, rows.long()).float()  # [N, stats, H, D]
    recovery = "mean" if key_cache.sign is not None else "zero"
    ratio = (head_dim - key_cache.kept.shape[-1]) / head_dim  # exact: D is a power of two
    packed = pack_keys(k, stats[:, 0], ratio, recovery, dtype=key_cache.kept.dtype, scale=k_scale)
    _write(key_cache, packed, slots)
    if isinstance(value_cache, PackedValues):
        ratio = (head_dim - value_cache.kept.shape[-1]) / head_dim
        _write(value_cache, pack_values(v, stats[:, 1], ratio, dtype=value_cache.kept.dtype, scale=v_scale), slots)
    else:
        value_cache[slots] = to_storage(v, value_cache.dtype, v_scale)


def _write(cache, packed, slots: torch.Tensor) -> None:
    for destination, source in zip(cache, packed):
        if destination is not None:
            destination[slots] = source


# ---------------------------------------------------------------------------------------------
# Reading slots back
# ---------------------------------------------------------------------------------------------


def _head_major(t: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rows ``slots`` of ``[S, H, ...]`` as a contiguous ``[H, n, ...]``."""
    return t.index_select(0, slots).transpose(0, 1).contiguous()


def _ranks(keep: torch.Tensor) -> torch.Tensor:
    """``[..., D]`` int64: kept channels before each channel (a kept channel's index among the
    kept entries; a pruned channel ``c``'s index among the pruned ones is ``c`` minus it)."""
    kept_before = torch.cumsum(keep, dim=-1)
    return kept_before.sub_(keep.long())


def sane_bitmaps(keep: torch.Tensor, kept: int) -> torch.Tensor:
    """``[...]`` bool: bitmaps ``keep [..., D]`` with at most ``kept`` bits set. A corrupt one reads
    as all-pruned, as in the Triton kernels (``decode._bitmaps``)."""
    return keep.sum(dim=-1) <= kept


def _spread(entries: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``entries [..., n]`` read at ``index [..., D]`` (clamped into the row: the entries read for
    channels of the other kind are discarded by the caller's select)."""
    return entries.gather(-1, index.clamp(max=entries.shape[-1] - 1))


def unpack_slots(
    keys: PackedKeys | torch.Tensor,
    values: PackedValues | torch.Tensor,
    window_stats: torch.Tensor | None,
    slot_rows: torch.Tensor,
    slots: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense keys and values ``[Hkv, n, D]`` of ``slots``, head-major, equal to
    ``reference.unpack_keys`` / ``unpack_values`` of those slots (``reference.output_dtype``: the
    cache dtype, float32 for FP8). A dense layer's plain ``[S, Hkv, D]`` tensors
    (``--spark-dense-layers``) are read as they are."""
    slots = slots.long()
    if isinstance(keys, torch.Tensor):
        k, v = _head_major(keys, slots), _head_major(values, slots)
        dtype = output_dtype(k.dtype)
        return from_storage(k, k_scale).to(dtype), from_storage(v, v_scale).to(dtype)
    dtype = output_dtype(keys.kept.dtype)
    keep = words_to_bits(_head_major(keys.mask, slots))
    keep &= sane_bitmaps(keep, keys.kept.shape[-1])[..., None]
    rank = _ranks(keep)
    k = _spread(from_storage(_head_major(keys.kept, slots), k_scale).float(), rank)
    num_pruned = keep.shape[-1] - keys.kept.shape[-1]
    if keys.sign is not None and num_pruned:
        sign_bits = words_to_bits(_head_major(keys.sign, slots))[..., :num_pruned]
        pruned_rank = torch.arange(keep.shape[-1], device=keep.device) - rank
        negative = _spread(sign_bits, pruned_rank)
        # Qn^-1/2 of each distinct window row once, then one gather per token.
        rows, row_of_slot = torch.unique(slot_rows.index_select(0, slots), return_inverse=True)
        inv_norm = rsqrt_or_zero(window_stats[rows.long(), 0].float()).transpose(0, 1)  # [H, U, D]
        magnitude = _head_major(keys.fill, slots).float()[..., None] * inv_norm.index_select(1, row_of_slot)
        recovered = torch.where(negative, -magnitude, magnitude)
        if dtype != torch.float32:  # a recovered fp16 key may exceed the range: clamp, as the reference
            recovered = recovered.clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max)
        k = torch.where(keep, k, recovered)
    elif num_pruned:  # "zero" recovery
        k = k.masked_fill_(~keep, 0.0)
    if isinstance(values, PackedValues):
        keep_v = words_to_bits(_head_major(values.mask, slots))
        keep_v &= sane_bitmaps(keep_v, values.kept.shape[-1])[..., None]
        v = _spread(from_storage(_head_major(values.kept, slots), v_scale).float(), _ranks(keep_v))
        v = torch.where(keep_v, v, _head_major(values.fill, slots).float()[..., None])
    else:
        v = from_storage(_head_major(values, slots), v_scale)
    return k.to(dtype), v.to(dtype)


def _soft_cap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    return cap * torch.tanh(logits / cap) if cap > 0 else logits


# ---------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------


class TorchDecodeWrapper:
    """``SparKDecodeWrapper``'s interface (``plan`` then ``run``) on the PyTorch path.

    ``plan`` keeps the CSR metadata and the host-side lengths; ``run`` unpacks every slot of the
    batch at once and computes each request's attention in float32.
    """

    def __init__(self, num_qo_heads: int, num_kv_heads: int, head_dim: int, *, v_head_dim: int | None = None,
                 device: torch.device | str = "cpu", **_ignored):  # fmt: skip
        if num_qo_heads % num_kv_heads:
            raise ValueError(f"{num_qo_heads} query heads are not a multiple of {num_kv_heads} KV heads")
        self.num_qo_heads, self.num_kv_heads = num_qo_heads, num_kv_heads
        self.head_dim, self.v_head_dim = head_dim, v_head_dim or head_dim
        self._kv_indptr = self._kv_indices = None
        self._bounds: list[int] = []

    def plan(self, kv_indptr: torch.Tensor, kv_indices: torch.Tensor, *, seq_lens_cpu=None, **_ignored) -> None:
        self._kv_indptr, self._kv_indices = kv_indptr, kv_indices
        self._bounds = kv_indptr.to("cpu", torch.int64).tolist()

    def _check_planned(self, q) -> int:
        """The batch size, after checking ``plan`` ran for this ``q``."""
        if self._kv_indptr is None:
            raise RuntimeError(f"{type(self).__name__}.run called before plan")
        batch = q.shape[0]
        if batch != len(self._bounds) - 1 or q.shape[1:] != (self.num_qo_heads, self.head_dim):
            raise ValueError(f"q has shape {tuple(q.shape)}, the plan is for {len(self._bounds) - 1} requests "
                             f"of [{self.num_qo_heads}, {self.head_dim}]")  # fmt: skip
        return batch

    def run(self, q, keys, values, window_stats, slot_rows, *, sm_scale=None, logit_cap=0.0, out=None, lse=None,
            k_scale=1.0, v_scale=1.0):  # fmt: skip
        """Same contract as ``SparKDecodeWrapper.run``: returns ``(out [B, Hq, Dv], lse [B, Hq])``."""
        batch = self._check_planned(q)
        out = out if out is not None else q.new_empty(batch, self.num_qo_heads, self.v_head_dim)
        lse = lse if lse is not None else torch.empty(batch, self.num_qo_heads, dtype=torch.float32, device=q.device)
        scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(self.head_dim)
        slots = self._kv_indices[: self._bounds[-1]]
        k, v = unpack_slots(keys, values, window_stats, slot_rows, slots, k_scale, v_scale)
        group = self.num_qo_heads // self.num_kv_heads
        qf = q.float().view(batch, self.num_kv_heads, group, self.head_dim)
        for b, (start, end) in enumerate(zip(self._bounds[:-1], self._bounds[1:])):
            if start == end:
                out[b], lse[b] = 0, float("-inf")
                continue
            logits = _soft_cap(torch.matmul(qf[b], k[:, start:end].float().transpose(1, 2)) * scale, logit_cap)
            request_lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [Hkv, G, 1]
            probs = torch.exp(logits - request_lse)
            out[b] = torch.matmul(probs, v[:, start:end].float()).view(self.num_qo_heads, -1)
            lse[b] = request_lse.view(-1)
        return out, lse


# ---------------------------------------------------------------------------------------------
# Extend
# ---------------------------------------------------------------------------------------------


def _attend(q, k, v, prefix_len: int, scale: float, logit_cap: float):
    """One request: q ``[Hq, M, D]``, k/v ``[Hkv, P + M, D]``; query ``i`` sees keys ``j <= P + i``.
    Returns (out ``[Hq, M, Dv]`` float32, lse ``[Hq, M]``)."""
    m, n = q.shape[1], k.shape[1]
    visible = torch.arange(n, device=q.device)[None, :] <= torch.arange(m, device=q.device)[:, None] + prefix_len
    if logit_cap == 0:
        # PyTorch's CPU flash attention returns the log-sum-exp as well; GQA heads map like
        # repeat_interleave (query head h reads KV head h // G).
        bias = torch.zeros(visible.shape, dtype=torch.float32, device=q.device).masked_fill_(~visible, float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q[None].float(), k[None].float(), v[None].float(), 0.0, False, attn_mask=bias[None, None], scale=scale
        )
        return out[0], lse[0]
    group = q.shape[0] // k.shape[0]
    kf = k.float().repeat_interleave(group, dim=0)
    logits = _soft_cap(torch.matmul(q.float(), kf.transpose(1, 2)) * scale, logit_cap)
    logits = logits.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    return torch.matmul(torch.exp(logits - lse[..., None]), v.float().repeat_interleave(group, dim=0)), lse


def extend_attention(
    q, k, v, qo_indptr, prefix_indptr, prefix_indices, keys, values, window_stats, slot_rows, *,
    max_q_len=None, sm_scale=None, logit_cap=0.0, out=None, lse=None, k_scale=1.0, v_scale=1.0, **_ignored,
):  # fmt: skip
    """Same contract as ``extend.extend_attention``: each request's new tokens attend to its
    compact prefix and, causally, to themselves. Returns ``(out [Nq, Hq, Dv], lse [Nq, Hq])``."""
    num_q, num_qo_heads, head_dim = q.shape
    value_dim = v.shape[-1]
    out = out if out is not None else q.new_empty(num_q, num_qo_heads, value_dim)
    lse = lse if lse is not None else torch.empty(num_q, num_qo_heads, dtype=torch.float32, device=q.device)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
    q_bounds = qo_indptr.to("cpu", torch.int64).tolist()
    p_bounds = prefix_indptr.to("cpu", torch.int64).tolist()
    prefix_k, prefix_v = unpack_slots(keys, values, window_stats, slot_rows, prefix_indices[: p_bounds[-1]],
                                      k_scale, v_scale)  # fmt: skip
    for b in range(len(q_bounds) - 1):
        rows = slice(q_bounds[b], q_bounds[b + 1])
        if rows.start == rows.stop:
            continue
        prefix = slice(p_bounds[b], p_bounds[b + 1])
        k_all = torch.cat([prefix_k[:, prefix], k[rows].transpose(0, 1).to(prefix_k.dtype)], dim=1)
        v_all = torch.cat([prefix_v[:, prefix], v[rows].transpose(0, 1).to(prefix_v.dtype)], dim=1)
        o, request_lse = _attend(q[rows].transpose(0, 1), k_all, v_all, prefix.stop - prefix.start, scale, logit_cap)
        out[rows] = o.transpose(0, 1)
        lse[rows] = request_lse.transpose(0, 1)
    return out, lse
