"""Window statistics of a batch of requests, computed in one pass per layer.

An extend batch holds several requests back to back (``q``/``v`` rows ``starts[b] : starts[b] +
lens[b]``). Each request gets its own statistics, exactly as the reference computes them for one
sequence: ``reference.window_channel_norm`` over its last ``min(window, len)`` queries and
``reference.value_channel_bias`` over its new values.
"""

from __future__ import annotations

import torch


def batched_window_norm(
    q: torch.Tensor, starts: torch.Tensor, lens: torch.Tensor, window: int, num_kv_heads: int
) -> torch.Tensor:
    """q ``[N, Hq, D]``, starts/lens ``[B]`` (device) -> ``[B, Hkv, D]`` float32 ``Qn``."""
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    offsets = torch.arange(window, device=q.device)
    # The last `window` rows of each request; rows before the request's start are masked out.
    index = (starts + lens - window)[:, None] + offsets[None, :]
    valid = offsets[None, :] >= (window - lens.clamp(max=window))[:, None]
    rows = q[index.clamp_min(0)].float() * valid[:, :, None, None]  # [B, W, Hq, D]
    grouped = rows.view(-1, window, num_kv_heads, num_q_heads // num_kv_heads, head_dim).mean(dim=3)
    return torch.linalg.vector_norm(grouped, dim=1)


def batched_value_bias(v: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    """v ``[N, H, D]``, segment ``[N]`` request index of each row -> ``[B, H, D]`` value bias."""
    vf = v.float()
    count = torch.bincount(segment, minlength=num_segments).to(vf.dtype)[:, None, None]
    mean = torch.zeros((num_segments,) + vf.shape[1:], device=vf.device).index_add_(0, segment, vf)
    mean = mean / count.clamp_min(1)
    centred = (vf - mean[segment]) ** 2
    var_seq = torch.zeros_like(mean).index_add_(0, segment, centred) / (count - 1).clamp_min(1)
    var_dim = vf.var(dim=2)  # [N, H]
    peak_dim = torch.full(var_dim.shape[1:], float("-inf"), device=vf.device).repeat(num_segments, 1)
    peak_dim = peak_dim.scatter_reduce(0, segment[:, None].expand_as(var_dim), var_dim, "amax")
    peak = (var_seq.amax(dim=2) + peak_dim) / 2
    return (3.0 / 7.0) * (var_seq / 2) / (peak[:, :, None] + 1e-8)
