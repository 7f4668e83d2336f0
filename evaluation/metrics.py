"""Attention-level fidelity metrics: compressed cache vs full cache, per (query, query head).

Shapes follow :mod:`spark_sglang.kernels.reference`: queries ``[M, Hq, D]``, keys/values
``[N, Hkv, D]``, attention probabilities ``[Hq, M, N]``, outputs ``[M, Hq, Dv]``. Every metric
returns one number per (query head, query), shape ``[Hq, M]``; the harness averages them.

KL divergence and evicted tokens
--------------------------------
``KL(full || compressed) = sum_j p_j log(p_j / q_j)`` is infinite as soon as a method gives
probability 0 to a token the full cache attends to, which token eviction does for every evicted
token (channel pruning never does: every token keeps a finite logit). We keep one formula for all
methods and floor the compressed probability at ``eps`` (default ``1e-6``) inside the log::

    KL_eps(p || q) = sum_j p_j * (log p_j - log max(q_j, eps))

For SparK / ThinK the floor changes nothing measurable (``q_j < 1e-6`` only where ``p_j`` is tiny
too). For eviction each evicted token ``j`` contributes ``p_j log(p_j / eps)``, so the reported KL is
roughly ``log(1/eps)`` times the evicted attention mass: a *finite stand-in for an infinite
divergence*, and a lower bound that grows as ``eps`` shrinks. The evicted mass itself is reported
separately (:func:`evicted_mass`) so the reader does not have to trust the convention, and so is
the reverse divergence ``KL(compressed || full)`` (:func:`reverse_kl_divergence`), finite for every
method without any floor: for eviction it is exactly ``-log(kept mass)``.
"""

from __future__ import annotations

import math

import torch

#: Floor on compressed probabilities inside the KL log (see module docstring).
DEFAULT_KL_EPS = 1e-6
#: Floor on full-cache probabilities inside the reverse-KL log (only float32 underflow reaches it).
TINY = 1e-38


def attention_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    sm_scale: float,
    causal_offset: int | None = None,
    logit_cap: float = 0.0,
) -> torch.Tensor:
    """Float32 GQA logits ``[Hq, M, N]``, as :func:`reference.attention` forms them (query head
    ``h`` reads KV head ``h // (Hq / Hkv)``; grouped without materialising repeated keys)."""
    m, hq, d = q.shape
    n, hkv, _ = k.shape
    qg = q.float().view(m, hkv, hq // hkv, d)
    logits = torch.einsum("mkgd,nkd->kgmn", qg, k.float()).reshape(hq, m, n) * sm_scale
    if logit_cap > 0:
        logits = logit_cap * torch.tanh(logits / logit_cap)
    if causal_offset is not None:
        visible = torch.arange(n)[None, :] <= torch.arange(m)[:, None] + causal_offset
        logits = logits.masked_fill(~visible.to(logits.device), float("-inf"))
    return logits


def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    sm_scale: float,
    causal_offset: int | None = None,
    logit_cap: float = 0.0,
) -> torch.Tensor:
    """Softmax attention probabilities ``[Hq, M, N]`` float32 (GQA: query head ``h`` reads KV
    head ``h // (Hq / Hkv)``, as in :func:`reference.attention`)."""
    return torch.softmax(attention_logits(q, k, sm_scale, causal_offset, logit_cap), dim=-1)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, logit_cap: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output ``[M, Hq, Dv]``, probabilities ``[Hq, M, N]``), float32.

    The output is ``probs @ v``: :func:`reference.attention`'s output (the tests check they agree),
    computed once with the probabilities the other metrics need.
    """
    out, probs, _ = attend_log(q, k, v, sm_scale, logit_cap)
    return out, probs


def attend_log(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, logit_cap: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`attend` plus the log-probabilities (``log_softmax`` of the logits)."""
    log_probs = torch.log_softmax(attention_logits(q, k, sm_scale, logit_cap=logit_cap), dim=-1)
    probs = torch.exp(log_probs)
    group = q.shape[1] // k.shape[1]
    hq, m, n = probs.shape
    out = torch.einsum("kgmn,nkd->mkgd", probs.view(hq // group, group, m, n), v.float())
    return out.reshape(m, hq, v.shape[-1]), probs, log_probs


def relative_error(out: torch.Tensor, out_full: torch.Tensor) -> torch.Tensor:
    """``||o - o_full|| / ||o_full||`` over the head dim: ``[M, Hq, Dv] -> [Hq, M]``."""
    diff = torch.linalg.vector_norm(out.float() - out_full.float(), dim=-1)
    ref = torch.linalg.vector_norm(out_full.float(), dim=-1).clamp_min(1e-30)
    return (diff / ref).transpose(0, 1)


def kl_divergence(
    p_full: torch.Tensor, q_comp: torch.Tensor, eps: float = DEFAULT_KL_EPS
) -> torch.Tensor:
    """``KL_eps(full || compressed)`` in nats over the last axis (see module docstring).

    ``0 * log 0 = 0`` on the full side; the compressed side is floored at ``eps``.
    """
    p = p_full.float()
    q = q_comp.float().clamp_min(eps)
    return (torch.xlogy(p, p) - p * torch.log(q)).sum(dim=-1)


def reverse_kl_divergence(p_full: torch.Tensor, q_comp: torch.Tensor) -> torch.Tensor:
    """``KL(compressed || full)`` in nats over the last axis: finite for every method compared
    (eviction zeroes ``q``, never ``p``); for pure eviction it equals ``-log(kept full mass)``."""
    q = q_comp.float()
    return (torch.xlogy(q, q) - q * torch.log(p_full.float().clamp_min(TINY))).sum(dim=-1)


def topk_overlap(p_full: torch.Tensor, q_comp: torch.Tensor, k: int) -> torch.Tensor:
    """``|topk(full) ∩ topk(compressed)| / k`` over the last axis (ties: torch.topk's order)."""
    n = p_full.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"top-k overlap needs 1 <= k <= {n} tokens, got k={k}")
    top_full = torch.zeros_like(p_full, dtype=torch.bool)
    top_full.scatter_(-1, torch.topk(p_full, k, dim=-1).indices, True)
    top_comp = torch.zeros_like(q_comp, dtype=torch.bool)
    top_comp.scatter_(-1, torch.topk(q_comp, k, dim=-1).indices, True)
    return (top_full & top_comp).sum(dim=-1).float() / k


def evicted_mass(p_full: torch.Tensor, q_comp: torch.Tensor) -> torch.Tensor:
    """Full-cache attention mass on tokens the compressed cache gives exactly 0 (evicted)."""
    return torch.where(q_comp == 0, p_full.float(), 0.0).sum(dim=-1)


class FullAttention:
    """The scored queries' attention over the full cache, and the parts every comparison reuses
    (computed once per sample): the output, the probabilities, ``sum p log p`` and the top-k set."""

    def __init__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float,
        logit_cap: float = 0.0, topk: int = 8, kl_eps: float = DEFAULT_KL_EPS,
    ):
        n = k.shape[0]
        if not 1 <= topk <= n:
            raise ValueError(f"top-k overlap needs 1 <= k <= {n} tokens, got k={topk}")
        self.out, self.probs = attend(q, k, v, sm_scale, logit_cap)
        self.p_log_p = torch.xlogy(self.probs, self.probs).sum(dim=-1)
        self.log_p = torch.log(self.probs.clamp_min(TINY))
        self.top = torch.zeros_like(self.probs, dtype=torch.bool)
        self.top.scatter_(-1, torch.topk(self.probs, topk, dim=-1).indices, True)
        self.topk, self.kl_eps = topk, kl_eps

    def compare(
        self, out: torch.Tensor, probs: torch.Tensor, log_probs: torch.Tensor | None = None,
        evicted: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Every metric, ``[Hq, M]`` each, as the standalone functions above compute them.

        ``log_probs`` (``-inf`` at evicted tokens) saves a log; it is floored at ``log(eps)`` for
        both KLs, which changes ``KL(compressed || full)`` by at most ``eps/e`` per token with
        ``0 < q < eps`` (never measurable here). ``evicted=False`` (channel methods, which never
        zero a token) reports 0 evicted mass.
        """
        p = self.probs
        if log_probs is None:
            log_probs = torch.log(probs)
        log_q = log_probs.clamp_min(math.log(self.kl_eps))
        top = torch.topk(probs, self.topk, dim=-1).indices
        return {
            "rel_err": relative_error(out, self.out),
            "kl": self.p_log_p - (p * log_q).sum(dim=-1),
            "kl_rev": (probs * (log_q - self.log_p)).sum(dim=-1),
            "topk": self.top.gather(-1, top).sum(dim=-1).float() / self.topk,
            "evicted_mass": evicted_mass(p, probs) if evicted else torch.zeros_like(self.p_log_p),
        }
