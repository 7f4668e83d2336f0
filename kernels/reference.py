"""Plain-PyTorch statement of SparK: the ground truth every kernel and the pool are tested against.

Shapes: keys / values ``[N, Hkv, D]`` (one sequence, or any set of tokens); window queries
``[W, Hq, D]`` after RoPE. All scoring runs in float32; outputs keep the input dtype.

Semantics follow the released SparK code (DESIGN.md §1), with these stated choices:

* Ties in saliency break towards pruning the lower channel index (a stable ascending sort), so
  exactly ``P = int(ratio * D)`` channels are pruned and every implementation agrees bit for bit.
  A NaN saliency ranks as ``+inf`` (kept): a NaN key never changes how many channels are kept.
* A channel whose window norm ``Qn[c]`` is 0 (or below the smallest normal float32) recovers to
  0 (the released ``sqrt(w / 0)`` is inf).
* What the compact cache stores (kernels/layout.py) is part of the semantics: the fill is rounded
  to bfloat16; an FP8 cache stores kept entries as ``x / scale`` saturated to the format's range
  (SGLang's ``k_scale`` / ``v_scale`` convention, selection and fills from the unquantised
  values); recovered keys are clamped to the output dtype's finite range.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .layout import FILL_DTYPE, FP8_DTYPES, BITS_PER_WORD, SparKConfig, SlotLayout, bytes_per_token  # noqa: F401

# ---------------------------------------------------------------------------------------------
# Window statistics
# ---------------------------------------------------------------------------------------------


def window_channel_norm(window_queries: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[W, Hq, D] -> [Hkv, D]`` float32: average the GQA group's query heads, then L2 over W."""
    w, hq, d = window_queries.shape
    if hq % num_kv_heads:
        raise ValueError(f"{hq} query heads are not a multiple of {num_kv_heads} KV heads")
    grouped = window_queries.float().view(w, num_kv_heads, hq // num_kv_heads, d).mean(dim=2)
    return torch.linalg.vector_norm(grouped, dim=0)


#: Window norms below the smallest normal float32 count as 0: a GPU's fast ``rsqrt`` flushes
#: denormals to 0 and would return inf.
MIN_NORM = torch.finfo(torch.float32).tiny


def rsqrt_or_zero(key_norm: torch.Tensor) -> torch.Tensor:
    """``Qn^-1/2``, with 0 where ``Qn < MIN_NORM`` (such a channel recovers to 0)."""
    key_norm = key_norm.float()
    return torch.where(key_norm >= MIN_NORM, torch.rsqrt(key_norm.clamp_min(MIN_NORM)), torch.zeros_like(key_norm))


def value_channel_bias(values: torch.Tensor) -> torch.Tensor:
    """``[N, Hkv, D] -> [Hkv, D]``: the sequence-level part of the released value score.

    Released score: ``0.7*|v| + 0.3*(var_seq[c] + var_dim[t]) / 2 / (M + 1e-8)`` with
    ``M = max over (t, c)`` of the numerator. ``var_dim[t]`` is the same for every channel of a
    token, so it cannot change which channels a token keeps; dividing by 0.7 neither. The ranking is
    therefore that of ``|v| + bias`` with ``bias[c] = (3/7) * var_seq[c] / 2 / (M + 1e-8)``.
    """
    v = values.float()
    var_seq = v.var(dim=0) if v.shape[0] > 1 else torch.zeros_like(v[0])  # [H, D]
    var_dim = v.var(dim=2)  # [N, H]
    peak = (var_seq.amax(dim=1) + var_dim.amax(dim=0)) / 2  # [H]
    return (3.0 / 7.0) * (var_seq / 2) / (peak[:, None] + 1e-8)


# ---------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------


def _nan_as_inf(score: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(score), float("inf"), score)


def key_saliency(keys: torch.Tensor, key_norm: torch.Tensor) -> torch.Tensor:
    """``s[t, h, c] = k[t, h, c]^2 * Qn[h, c]`` in float32 (``key_norm`` broadcasts to keys);
    NaN counts as ``+inf``."""
    k = keys.float()
    return _nan_as_inf(k * k * key_norm.float())


def value_saliency(values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return _nan_as_inf(values.float().abs() + bias.float())


def kept_mask(saliency: torch.Tensor, num_pruned: int) -> torch.Tensor:
    """Bool ``[..., D]``: False on the ``num_pruned`` lowest-saliency channels of each row.

    Ties go to the lower channel index being pruned (stable ascending sort).
    """
    keep = torch.ones_like(saliency, dtype=torch.bool)
    if num_pruned:
        order = torch.sort(saliency, dim=-1, stable=True).indices
        keep.scatter_(-1, order[..., :num_pruned], False)
    return keep


def key_fill(saliency: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``sqrt(mean of the pruned channels' saliency)`` per row, float32 (0 if nothing pruned)."""
    pruned = ~keep
    count = pruned.sum(dim=-1).clamp_min(1)
    return torch.sqrt(torch.where(pruned, saliency, 0.0).sum(dim=-1) / count)


def value_fill(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean of the pruned values per row, float32 (0 if nothing pruned)."""
    pruned = ~keep
    count = pruned.sum(dim=-1).clamp_min(1)
    return torch.where(pruned, values.float(), 0.0).sum(dim=-1) / count


def recovered_keys(
    keys_negative: torch.Tensor, fill: torch.Tensor, key_norm: torch.Tensor
) -> torch.Tensor:
    """Value given to a pruned key channel: ``sign * sqrt(w / Qn)`` as ``sign * fill * Qn^-1/2``
    (float32; ``fill`` is the stored, rounded fill)."""
    magnitude = fill.float()[..., None] * rsqrt_or_zero(key_norm.float())
    return torch.where(keys_negative, -magnitude, magnitude)


# ---------------------------------------------------------------------------------------------
# Storage of kept entries: the cache dtype, FP8 with a scale
# ---------------------------------------------------------------------------------------------


def to_storage(x: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """Entries as an ``dtype`` cache stores them: FP8 holds ``x / scale`` saturated to its finite
    range (NaN stays NaN); other dtypes hold ``x`` rounded."""
    if dtype in FP8_DTYPES:
        limit = torch.finfo(dtype).max
        return (x.float() / scale).clamp(-limit, limit).to(dtype)
    return x.to(dtype)


def from_storage(stored: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Stored entries back as float32 (FP8: times ``scale``)."""
    return stored.float() * scale if stored.dtype in FP8_DTYPES else stored.float()


def output_dtype(stored_dtype: torch.dtype) -> torch.dtype:
    """The dtype rebuilt keys/values have: the cache dtype, or float32 for an FP8 cache."""
    return torch.float32 if stored_dtype in FP8_DTYPES else stored_dtype


def _finite(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Clamp to ``dtype``'s finite range (a recovered fp16 key can exceed it)."""
    limit = torch.finfo(dtype).max
    return x.clamp(-limit, limit)


# ---------------------------------------------------------------------------------------------
# Dense simulations (what the released code computes; nothing saved)
# ---------------------------------------------------------------------------------------------


def _num_pruned(prune_ratio: float, head_dim: int) -> int:
    if not 0 <= prune_ratio < 1:
        raise ValueError(f"prune_ratio={prune_ratio!r} must satisfy 0 <= prune_ratio < 1")
    return int(prune_ratio * head_dim)


def simulate_keys_with_norm(
    keys: torch.Tensor, key_norm: torch.Tensor, prune_ratio: float, recovery: str = "mean",
    *, dtype: torch.dtype | None = None, scale: float = 1.0,
) -> torch.Tensor:  # fmt: skip
    """:func:`simulate_keys` given the window norm ``Qn`` (broadcastable to keys) directly.
    ``dtype``/``scale``: the cache's storage (default: the keys' dtype)."""
    if recovery not in ("mean", "zero"):
        raise ValueError(f"recovery={recovery!r} must be 'mean' or 'zero'")
    packed = pack_keys(keys, key_norm, prune_ratio, recovery, dtype=dtype, scale=scale)
    return unpack_keys(packed, key_norm, scale=scale)


def simulate_keys(
    keys: torch.Tensor, window_queries: torch.Tensor, prune_ratio: float, recovery: str = "mean"
) -> torch.Tensor:
    """Keys with each token-head's ``int(ratio * D)`` least salient channels replaced by their
    recovered values ("mean": ``sign(k) * sqrt(mean pruned saliency / Qn)``; "zero": 0), exactly
    as the compact cache serves them (:func:`unpack_keys` of :func:`pack_keys`)."""
    key_norm = window_channel_norm(window_queries, keys.shape[1])
    return simulate_keys_with_norm(keys, key_norm, prune_ratio, recovery)


def simulate_values(
    values: torch.Tensor, prune_ratio: float, *, dtype: torch.dtype | None = None, scale: float = 1.0
) -> torch.Tensor:
    """Values with each token-head's lowest-scoring channels replaced by their mean (§1.5)."""
    packed = pack_values(values, value_channel_bias(values), prune_ratio, dtype=dtype, scale=scale)
    return unpack_values(packed, scale=scale)


def think_keys(
    keys: torch.Tensor, window_queries: torch.Tensor, prune_ratio: float
) -> torch.Tensor:
    """ThinK baseline: one channel set per head for all tokens, scored ``||Q_c|| * ||K_c||`` over
    the window and the sequence, the lowest ``int(ratio * D)`` zeroed."""
    num_pruned = _num_pruned(prune_ratio, keys.shape[-1])
    key_norm = window_channel_norm(window_queries, keys.shape[1])
    score = key_norm * torch.linalg.vector_norm(keys.float(), dim=0)  # [H, D]
    keep = kept_mask(score, num_pruned)
    return torch.where(keep, keys, torch.zeros_like(keys))


# ---------------------------------------------------------------------------------------------
# Compact layout
# ---------------------------------------------------------------------------------------------


class PackedKeys(NamedTuple):
    kept: torch.Tensor  # [N, H, T] cache dtype, channel order (FP8: x / scale)
    mask: torch.Tensor  # [N, H, D/32] int32, bit set = kept
    sign: torch.Tensor | None  # [N, H, ceil(P/32)] int32, bit i set = i-th pruned key <= 0 ("mean" only)
    fill: torch.Tensor | None  # [N, H] bfloat16, sqrt(mean pruned saliency) ("mean" only)


class PackedValues(NamedTuple):
    kept: torch.Tensor  # [N, H, Tv] cache dtype, channel order (FP8: x / scale)
    mask: torch.Tensor  # [N, H, D/32] int32
    fill: torch.Tensor  # [N, H] bfloat16, mean of the pruned values


def bits_to_words(bits: torch.Tensor) -> torch.Tensor:
    """Bool ``[..., n]`` -> int32 ``[..., ceil(n/32)]``; bit ``i`` is bit ``i % 32`` of word ``i // 32``
    (missing high bits of the last word are 0)."""
    *lead, n = bits.shape
    padded = torch.nn.functional.pad(bits, (0, -n % BITS_PER_WORD)) if n % BITS_PER_WORD else bits
    shifts = torch.arange(BITS_PER_WORD, device=bits.device, dtype=torch.int64)
    words = (padded.reshape(*lead, padded.shape[-1] // BITS_PER_WORD, BITS_PER_WORD).long() << shifts).sum(dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def words_to_bits(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`bits_to_words`: ``[..., W]`` int32 -> bool ``[..., 32 W]``."""
    shifts = torch.arange(BITS_PER_WORD, device=words.device, dtype=torch.int32)
    bits = (words.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2).bool()


def _gather_kept(x: torch.Tensor, keep: torch.Tensor, kept: int) -> torch.Tensor:
    return x[keep].view(*x.shape[:-1], kept)


def _scatter_kept(kept_values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Kept values (float32) at their channels, 0 elsewhere."""
    out = torch.zeros(keep.shape, dtype=torch.float32, device=keep.device)
    out[keep] = kept_values.reshape(-1)
    return out


def pruned_signs(keys: torch.Tensor, keep: torch.Tensor, num_pruned: int) -> torch.Tensor:
    """Sign words of the ``num_pruned`` pruned channels only: bit ``i`` = the ``i``-th pruned
    channel's key is not ``> 0`` (``<= 0`` or NaN)."""
    negative = ~(keys > 0)
    return bits_to_words(negative[~keep].view(*keys.shape[:-1], num_pruned))


def pruned_sign_bits(sign: torch.Tensor, keep: torch.Tensor, num_pruned: int) -> torch.Tensor:
    """Inverse of :func:`pruned_signs`: bool ``[..., D]``, True on pruned channels whose key was
    not ``> 0``."""
    negative = torch.zeros_like(keep)
    negative[~keep] = words_to_bits(sign)[..., :num_pruned].reshape(-1)
    return negative


def pack_keys(
    keys: torch.Tensor, key_norm: torch.Tensor, prune_ratio: float, recovery: str = "mean",
    *, dtype: torch.dtype | None = None, scale: float = 1.0,
) -> PackedKeys:  # fmt: skip
    """Dense keys ``[N, H, D]`` -> compact layout. ``key_norm`` broadcasts to keys: ``[H, D]`` for
    one window, or ``[N, H, D]`` for a window per token (``table[row_ids]``). ``dtype``: the cache
    dtype kept entries are stored in (default ``keys.dtype``); ``scale``: FP8's ``k_scale``."""
    num_pruned = _num_pruned(prune_ratio, keys.shape[-1])
    saliency = key_saliency(keys, key_norm)
    keep = kept_mask(saliency, num_pruned)
    kept = to_storage(_gather_kept(keys, keep, keys.shape[-1] - num_pruned), dtype or keys.dtype, scale)
    if recovery == "zero":
        return PackedKeys(kept, bits_to_words(keep), None, None)
    fill = key_fill(saliency, keep).to(FILL_DTYPE)
    return PackedKeys(kept, bits_to_words(keep), pruned_signs(keys, keep, num_pruned), fill)


def unpack_keys(packed: PackedKeys, key_norm: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
    """Compact layout -> dense keys with pruned channels recovered, in :func:`output_dtype`."""
    keep = words_to_bits(packed.mask)
    dense = _scatter_kept(from_storage(packed.kept, scale), keep)
    dtype = output_dtype(packed.kept.dtype)
    if packed.sign is None:
        return dense.to(dtype)
    num_pruned = keep.shape[-1] - packed.kept.shape[-1]
    recovered = recovered_keys(pruned_sign_bits(packed.sign, keep, num_pruned), packed.fill, key_norm)
    return torch.where(keep, dense, _finite(recovered, dtype)).to(dtype)


def pack_values(
    values: torch.Tensor, bias: torch.Tensor, prune_ratio: float,
    *, dtype: torch.dtype | None = None, scale: float = 1.0,
) -> PackedValues:  # fmt: skip
    """Dense values -> compact layout; ``bias`` (:func:`value_channel_bias`) broadcasts to values."""
    num_pruned = _num_pruned(prune_ratio, values.shape[-1])
    keep = kept_mask(value_saliency(values, bias), num_pruned)
    kept = to_storage(_gather_kept(values, keep, values.shape[-1] - num_pruned), dtype or values.dtype, scale)
    return PackedValues(kept, bits_to_words(keep), value_fill(values, keep).to(FILL_DTYPE))


def unpack_values(packed: PackedValues, *, scale: float = 1.0) -> torch.Tensor:
    keep = words_to_bits(packed.mask)
    dense = _scatter_kept(from_storage(packed.kept, scale), keep)
    dtype = output_dtype(packed.kept.dtype)
    return torch.where(keep, dense, _finite(packed.fill.float()[..., None], dtype)).to(dtype)


# ---------------------------------------------------------------------------------------------
# Scoring in the compressed domain: what the decode kernels compute, without a dense key
# ---------------------------------------------------------------------------------------------


def compressed_logits(q: torch.Tensor, packed: PackedKeys, key_norm: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
    """Logits ``q . k~`` of queries ``q [M, Hq, D]`` against packed keys ``[N, Hkv, ...]``, float32
    ``[Hq, M, N]``, with no recovered key formed:

        q . k~_t  =  sum_{c kept} q_c k_{t,c}  +  fill_t * sum_{c pruned} s_{t,c} u_c,
        u = q * Qn^-1/2 (per query and window row),  s = -1 where the sign bit is set, else +1.

    The first sum reads the kept entries as stored; the second needs only the bitmap, the sign
    bits and one fill per token. ``key_norm`` broadcasts to ``[N, Hkv, D]``. Equal to the logits
    over :func:`unpack_keys` up to float32 rounding, except where :func:`unpack_keys` clamps
    (``fill * Qn^-1/2`` past the output dtype's range) or rounds a recovered entry to an fp16 /
    bf16 cache dtype: the kernels apply both per channel (``spark_cpu.cpp``'s ``rebuild_key``, the
    Triton ``_key_part``), so they match :func:`unpack_keys` exactly in what they add up.
    """
    keep = words_to_bits(packed.mask)  # [N, Hkv, D]
    n, hkv, d = keep.shape
    m, hq, _ = q.shape
    qf = q.float().view(m, hkv, hq // hkv, d)
    kept_part = torch.einsum("mhgd,nhd->hgmn", qf, _scatter_kept(from_storage(packed.kept, scale), keep))
    if packed.sign is None:  # "zero" recovery: pruned channels add nothing
        return kept_part.reshape(hq, m, n)
    num_pruned = d - packed.kept.shape[-1]
    negative = pruned_sign_bits(packed.sign, keep, num_pruned)
    signs = torch.where(negative, -1.0, 1.0) * (~keep)  # [N, Hkv, D]: +-1 on pruned channels, 0 on kept
    inv_norm = rsqrt_or_zero(key_norm).expand(n, hkv, d)
    u = qf[:, None] * inv_norm[None, :, :, None, :]  # [M, N, Hkv, G, D]
    pruned_part = torch.einsum("mnhgd,nhd->hgmn", u, signs) * packed.fill.float().T[:, None, None, :]
    return (kept_part + pruned_part).reshape(hq, m, n)


def compressed_values_output(probs: torch.Tensor, packed: PackedValues, *, scale: float = 1.0) -> torch.Tensor:
    """``probs [Hq, M, N] @ v~`` over packed values ``[N, Hkv, ...]`` without dense values:

        sum_t p_t v~_t  =  sum_t p_t kept_t  +  sum_t (p_t fill_t) * pruned_t,

    kept entries at their channels (0 elsewhere) plus, per token, its fill weighted once and
    spread over its pruned channels. Returns ``[Hq, M, Dv]`` float32."""
    keep = words_to_bits(packed.mask)
    n, hkv, d = keep.shape
    hq, m, _ = probs.shape
    p = probs.float().view(hkv, hq // hkv, m, n)
    kept_part = torch.einsum("hgmn,nhd->hgmd", p, _scatter_kept(from_storage(packed.kept, scale), keep))
    weighted_fill = p * packed.fill.float().T[:, None, None, :]  # [Hkv, G, M, N]
    pruned_part = torch.einsum("hgmn,nhd->hgmd", weighted_fill, (~keep).float())
    return (kept_part + pruned_part).reshape(hq, m, d)


# ---------------------------------------------------------------------------------------------
# Attention over a (simulated or unpacked) cache, for kernel tests and evaluation
# ---------------------------------------------------------------------------------------------


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sm_scale: float,
    causal_offset: int | None = None,
    logit_cap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 GQA attention of one sequence: q ``[M, Hq, D]``, k/v ``[N, Hkv, D]``.

    ``causal_offset``: query ``i`` sees keys ``j <= i + causal_offset`` (None: sees all).
    Returns (output ``[M, Hq, Dv]``, natural-log LSE ``[M, Hq]``).
    """
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    logits = torch.einsum("mhd,nhd->hmn", q.float(), kf) * sm_scale
    if logit_cap > 0:
        logits = logit_cap * torch.tanh(logits / logit_cap)
    if causal_offset is not None:
        m, n = q.shape[0], k.shape[0]
        visible = torch.arange(n)[None, :] <= torch.arange(m)[:, None] + causal_offset
        logits = logits.masked_fill(~visible.to(logits.device), float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [H, M]
    out = torch.einsum("hmn,nhd->mhd", torch.softmax(logits, dim=-1), vf)
    return out, lse.transpose(0, 1)
