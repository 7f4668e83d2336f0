"""The compression methods compared, applied to one context's keys/values.

Channel methods return dense tensors with pruned entries recovered, computed by the project's
reference (:mod:`spark_sglang.kernels.reference`): ``simulate_keys`` / ``simulate_values`` for SparK,
``think_keys`` for ThinK. Token eviction (SnapKV) returns, per KV head, the indices of the tokens it
keeps; the kept tokens are dense.

Heads are independent in every method here (window norms, value channel bias, ThinK's channel
score and SnapKV's vote are all per head), so the harness folds layers into the head axis:
``[N, L*Hkv, D]`` keys with ``[W, L*Hq, D]`` window queries, layer-major.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from spark_sglang.kernels import reference

from . import budget
from .metrics import attention_probs


@dataclass(frozen=True)
class ChannelMethod:
    """A per-channel key (and optionally value) pruning method at a ratio."""

    name: str
    label: str
    kind: str  # "spark" or "think"
    recovery: str = "mean"  # SparK key recovery; ThinK is zero fill
    values: bool = False  # also prune values (SparK only) at the same ratio

    def compress(
        self, keys: torch.Tensor, values: torch.Tensor, window_q: torch.Tensor, ratio: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "think":
            return reference.think_keys(keys, window_q, ratio), values
        k = reference.simulate_keys(keys, window_q, ratio, self.recovery)
        v = reference.simulate_values(values, ratio) if self.values else values
        return k, v

    def bytes_per_token(self, shape: budget.CacheShape, ratio: float, tokens: int) -> float:
        if self.kind == "think":
            return budget.think_bytes(shape, ratio, tokens)
        return budget.spark_bytes(shape, ratio, ratio if self.values else 0.0, self.recovery, tokens)


SPARK_MEAN_K = ChannelMethod("spark-mean-k", "SparK mean (K)", "spark", "mean")
SPARK_ZERO_K = ChannelMethod("spark-zero-k", "SparK zero (K)", "spark", "zero")
THINK_K = ChannelMethod("think-k", "ThinK (K)", "think", "zero")
SPARK_MEAN_KV = ChannelMethod("spark-mean-kv", "SparK mean (K+V)", "spark", "mean", values=True)

#: Channel methods in report order; token eviction is matched to each at equal bytes.
CHANNEL_METHODS = (SPARK_MEAN_K, SPARK_ZERO_K, THINK_K, SPARK_MEAN_KV)
EVICTION = "snapkv"
EVICTION_LABEL = "SnapKV eviction"


def compress_all(
    keys: torch.Tensor,
    values: torch.Tensor,
    window_q: torch.Tensor,
    ratio: float,
    methods=CHANNEL_METHODS,
    compressed_values: torch.Tensor | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{method.name: (keys, values)}`` for ``methods`` at ``ratio``; equal to each
    :meth:`ChannelMethod.compress` (the tests check it), but the window norms are computed once,
    SparK's keys once per fill (K and K+V share them), and ``compressed_values``
    (:func:`reference.simulate_values` at ``ratio``, which does not depend on the window) can be
    passed in to reuse it across windows."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    spark = [m for m in methods if m.kind == "spark"]
    if spark:
        key_norm = reference.window_channel_norm(window_q, keys.shape[1])
        recovered = {
            mode: reference.simulate_keys_with_norm(keys, key_norm, ratio, mode)
            for mode in {m.recovery for m in spark}
        }
        for method in spark:
            k = recovered[method.recovery]  # one tensor per fill: K and K+V share their keys
            v = values
            if method.values:
                if compressed_values is None:
                    compressed_values = reference.simulate_values(values, ratio)
                v = compressed_values
            out[method.name] = (k, v)
    for method in methods:
        if method.kind != "spark":
            out[method.name] = method.compress(keys, values, window_q, ratio)
    return out


def snapkv_scores(
    keys: torch.Tensor,
    window_q: torch.Tensor,
    sm_scale: float,
    window_in_context: bool,
    causal: bool,
    kernel_size: int = 7,
    pooling: str = "max",
    logit_cap: float = 0.0,
) -> torch.Tensor:
    """SnapKV's vote ``[N, Hkv]`` for each context token (higher = keep).

    The window queries' attention over the context keys, summed over the window and the GQA group,
    1D-pooled over tokens (``kernel_size``, ``"max"`` or ``"avg"``; 1 disables). When the window is
    the context's own last ``W`` tokens, only the tokens before it are voted on and pooled, and the
    window tokens get ``+inf`` so they are always kept (SnapKV keeps its observation window);
    ``causal`` then also hides later window tokens from earlier window queries.
    """
    n, hkv = keys.shape[0], keys.shape[1]
    w, hq = window_q.shape[0], window_q.shape[1]
    offset = n - w if (causal and window_in_context) else None
    probs = attention_probs(window_q, keys, sm_scale, causal_offset=offset, logit_cap=logit_cap)
    vote = probs.view(hkv, hq // hkv, w, n).sum(dim=(1, 2))  # [Hkv, N]
    prefix = n - w if window_in_context else n
    body = vote[:, :prefix]
    if kernel_size > 1 and prefix > 0:
        pad = kernel_size // 2
        if pooling == "max":
            body = F.max_pool1d(body[:, None], kernel_size, stride=1, padding=pad)[:, 0]
        elif pooling == "avg":
            body = F.avg_pool1d(body[:, None], kernel_size, stride=1, padding=pad,
                                count_include_pad=False)[:, 0]
        else:
            raise ValueError(f"pooling={pooling!r} must be 'max' or 'avg'")
        body = body[:, :prefix]
    scores = torch.full_like(vote, float("inf"))
    scores[:, :prefix] = body
    return scores.transpose(0, 1).contiguous()


def keep_indices(scores: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Top ``num_keep`` tokens per head of ``scores [N, Hkv]``: indices ``[num_keep, Hkv]``,
    ascending. Ties go to the later token (the recency bias of a stable descending sort on the
    reversed sequence); with ``+inf`` window scores, a budget smaller than the window keeps the
    window's last tokens."""
    n = scores.shape[0]
    num_keep = max(1, min(n, num_keep))
    flipped = torch.flip(scores, dims=[0])
    order = torch.sort(flipped, dim=0, descending=True, stable=True).indices[:num_keep]
    return torch.sort(n - 1 - order, dim=0).values


def gather_tokens(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``x [N, H, D]``, ``indices [n, H]`` -> ``[n, H, D]``: each head's own kept tokens."""
    return x.gather(0, indices[..., None].expand(-1, -1, x.shape[-1]))


def scatter_probs(
    probs_kept: torch.Tensor, indices: torch.Tensor, num_tokens: int, fill: float = 0.0
) -> torch.Tensor:
    """Per-token values over kept tokens ``[Hq, M, n]`` -> over all tokens ``[Hq, M, N]``, ``fill``
    at evicted tokens (0 for probabilities, ``-inf`` for log-probabilities)."""
    hq, m, _ = probs_kept.shape
    group = hq // indices.shape[1]
    idx = indices.transpose(0, 1).repeat_interleave(group, dim=0)  # [Hq, n]
    full = probs_kept.new_full((hq, m, num_tokens), fill)
    return full.scatter_(-1, idx[:, None, :].expand(-1, m, -1), probs_kept)
