"""Batched per-request window statistics equal the reference's per-sequence statistics."""

import pytest
import torch

from spark_sglang.kernels import reference as R
from spark_sglang.window_stats import batched_value_bias, batched_window_norm, window_queries


@pytest.mark.parametrize(
    "lens,window,group", [([5, 40, 1, 32], 32, 4), ([7, 3], 4, 1), ([1], 32, 2), ([3, 9], 100_000, 3)]
)
def test_batched_statistics_match_reference(lens, window, group):
    g = torch.Generator().manual_seed(sum(lens) + window)
    hkv, d = 2, 32
    q = torch.randn(sum(lens), hkv * group, d, generator=g)
    v = torch.randn(sum(lens), hkv, d, generator=g) * torch.rand(d, generator=g) * 3
    lens_t = torch.tensor(lens)
    starts = torch.cumsum(lens_t, 0) - lens_t
    segment = torch.repeat_interleave(torch.arange(len(lens)), lens_t)
    window_rows = window_queries(starts, lens_t, lens, window)
    assert window_rows.index.numel() == sum(min(window, n) for n in lens)  # memory: the batch's tokens
    norms = batched_window_norm(q, window_rows, hkv)
    biases = batched_value_bias(v, segment, len(lens))
    for b, (start, n) in enumerate(zip(starts.tolist(), lens)):
        last = q[start + max(0, n - window) : start + n]
        torch.testing.assert_close(norms[b], R.window_channel_norm(last, hkv), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(biases[b], R.value_channel_bias(v[start : start + n]), rtol=1e-5, atol=1e-7)
