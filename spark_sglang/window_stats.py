"""Window statistics of a batch of requests, computed in one pass per layer.

An extend batch holds several requests back to back (``q``/``v`` rows ``starts[b] : starts[b] +
lens[b]``). Each request gets its own statistics, exactly as the reference computes them for one
sequence: ``reference.window_channel_norm`` over its last ``min(window, len)`` queries and
``reference.value_channel_bias`` over its new values.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class WindowQueries(NamedTuple):
    """The window queries of a batch: row ``index[i]`` of q belongs to request ``request[i]``."""

    index: torch.Tensor  # [sum(min(window, lens))] int64 rows of q
    request: torch.Tensor  # [sum(min(window, lens))] int64
    num_requests: int


def window_queries(starts: torch.Tensor, lens: torch.Tensor, lens_cpu: list[int], window: int) -> WindowQueries:
    """Each request's last ``min(window, len)`` query rows, back to back, found once per batch.

    Memory is that of the batch's own tokens whatever the window (``lens_cpu`` sizes the index
    without a device sync)."""
    sizes_cpu = [min(window, n) for n in lens_cpu]
    sizes = lens.clamp(max=window)
    total = sum(sizes_cpu)
    request = torch.repeat_interleave(torch.arange(len(lens_cpu), device=lens.device), sizes, output_size=total)
    first = torch.cumsum(sizes, 0) - sizes  # position of each request's first window row
    offset = torch.arange(total, device=lens.device) - first[request]
    index = (starts + lens - sizes)[request] + offset
    return WindowQueries(index.long(), request, len(lens_cpu))


def batched_window_norm(q: torch.Tensor, window: WindowQueries, num_kv_heads: int) -> torch.Tensor:
    """q ``[N, Hq, D]`` -> ``[B, Hkv, D]`` float32 ``Qn``: per request, the L2 norm over its window
    rows of the GQA group's mean query (``reference.window_channel_norm``)."""
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    rows = q.index_select(0, window.index).float()
    grouped = rows.view(-1, num_kv_heads, num_q_heads // num_kv_heads, head_dim).mean(dim=2)
    squares = torch.zeros(window.num_requests, num_kv_heads, head_dim, device=q.device)
    return squares.index_add_(0, window.request, grouped * grouped).sqrt()


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
