"""The quantized KV caches an SGLang user would pick instead of SparK, restated in plain PyTorch.

Each format is a pure function ``x [N, H, D] -> x_hat [N, H, D]`` (float32): the keys or the values
of a batch as attention reads them back after SGLang stored them, plus the bytes the format stores
per token-head for one of K or V (side data included). ``x`` arrives in the serving dtype
(bfloat16 for a bf16 model); every intermediate rounding of the original code is restated.

In SGLang 0.5.23 (``--kv-cache-dtype`` choices in ``sglang/srt/arg_groups/fields/model.py``: auto,
bf16, fp8_e4m3, fp8_e5m2, mxfp8, nvfp4, fp4_mx_block16):

* **bf16** — the dense cache: ``2`` bytes per entry.
* **fp8_e4m3 / fp8_e5m2** — ``sglang/srt/mem_cache/memory_pool.py``,
  ``MHATokenToKVPool.set_kv_buffer``: ``cache_k.div_(k_scale)`` if the layer has a ``k_scale`` (a
  checkpoint's calibrated scale; none, i.e. 1, by default), then ``cache_k.to(self.dtype)``: a plain
  torch cast, round-to-nearest-even, which saturates e4m3fn at +-448 and sends e5m2 overflow to
  +-inf. Attention reads ``stored * k_scale``. ``D`` bytes.
* **fp4_mx_block16** — ``sglang/srt/layers/quantization/kvfp4_tensor.py``,
  ``FP4MXBlock16KVQuantizeUtil.batched_quantize`` / ``batched_dequantize`` (called by
  ``fp4_kv_cache_quant_method.FP4MXBlock16KVCacheMethod``): blocks of 16 consecutive channels, one
  uint8 power-of-two exponent ``ceil(log2(max(amax / 6, 1e-10)))`` per block, E2M1 values chosen by
  ``sum(|x / 2^e| >= E2M1_BOUNDS)`` (ties round *up* in magnitude). ``D/2 + D/16`` bytes. The
  function is ``torch.compile``-d (inductor computes bf16 pointwise ops in float32); restated in
  float32, it matches SGLang's code run eagerly on float32 input bit for bit.
* **nvfp4** — ``NVFP4KVCacheMethod`` / ``NVFP4KVQuantizeUtil``: FlashInfer kernels (SM90+) with one
  FP8 E4M3 scale per 16 channels and a per-layer float32 global scale (1.0 without calibrated
  scales). Restated from the NVFP4 recipe the dequantizer states (``x_fp4 * block_scale *
  global_scale``; ``block_scale = e4m3(amax / 6 / global_scale)``, E2M1 round-to-nearest-even,
  saturating): the CUDA kernels use approximate reciprocals, so a value on a rounding boundary may
  differ in its last bit. ``D/2 + D/16`` bytes counted (one scale layout; SGLang also allocates a
  second scale layout and an FP8 dequant workspace for some backend pairs, and the FlashInfer
  prefill path re-rounds the dequantized values to FP8: neither is modelled).
* **mxfp8** (the FA4 backend, Blackwell) is not restated: FP8 E4M3 with one scale per 32 channels
  (``sglang/kernels/ops/kvcache/mxfp8_quant_store_kv.py``), ``D + D/32`` bytes, next to fp8_e4m3.

Not in SGLang 0.5.23 — **int8 / int4**: an SGLang development commit (sgl-project/sglang 6bb1035,
``--kv-cache-dtype int8|int4``, ``--kvint4-groupsize`` default 32) carried lightllm-derived Triton
kernels, restated here: ``destindex_copy_quantize_kv`` (``layers/attention/triton_ops/
decode_attention_int8kv.py``: symmetric per token-head, ``scale = amax / 127`` in the model dtype,
``q = int8(x / scale)`` truncating towards zero) and ``destindex_copy_quantize_int4kv``
(``decode_attention_int4kv.py``: symmetric per group of consecutive channels, ``scale = amax / 7``,
truncation, clamp to ``[-7, 7]``); the decode kernels dequantize as ``q.to(scale dtype) * scale``.
Later upstream proposals (PRs #2864 and #3034: asymmetric int8 with a zero point per token-head;
#15285: int8/int4) were closed unmerged.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

#: Magnitudes of FP4 E2M1 (codes 0..7) and the midpoints between neighbours
#: (``E2M1_VALUES`` / ``E2M1_BOUNDS`` of kvfp4_tensor.py).
E2M1_LEVELS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
E2M1_MAX = 6.0
#: Channels per FP4 scale (both SGLang FP4 recipes).
FP4_BLOCK = 16
#: Default int4 group size of the int8/int4 SGLang commit (``--kvint4-groupsize``).
INT4_GROUP = 32


# ---------------------------------------------------------------------------------------------
# Formats: x [N, H, D] (serving dtype) -> what attention reads [N, H, D] float32
# ---------------------------------------------------------------------------------------------


def bf16(x: torch.Tensor) -> torch.Tensor:
    """The dense bfloat16 cache."""
    return x.to(torch.bfloat16).float()


def fp8(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn, scale: float = 1.0) -> torch.Tensor:
    """``--kv-cache-dtype fp8_e4m3`` / ``fp8_e5m2``: ``(x / scale).to(dtype)``, read back times
    ``scale`` (``MHATokenToKVPool.set_kv_buffer``)."""
    return (x / scale).to(dtype).float() * scale


def _truncated_quotient(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``int(x / scale)`` as the Triton kernels form it: the quotient rounded to the promoted dtype
    of ``x`` and ``scale``, then truncated towards zero; 0 where ``scale`` is 0 (``0 / 0`` is NaN,
    which the GPU's saturating float-to-int conversion maps to 0). float32 result."""
    quotient = (x.float() / scale.float()).to(torch.promote_types(x.dtype, scale.dtype))
    return torch.where(scale == 0, 0.0, quotient.float().trunc())


def int8_per_token_head(x: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """SGLang commit 6bb1035 ``--kv-cache-dtype int8`` (``destindex_copy_quantize_kv``): one
    ``scale = amax / 127`` per token-head in ``scale_dtype`` (the model dtype), ``q = trunc(x / scale)``,
    read back as ``q.to(scale_dtype) * scale`` (rounded to ``scale_dtype``)."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = (amax.float() / 127.0).to(x.dtype).to(scale_dtype)
    q = _truncated_quotient(x, scale)
    return (q.to(scale_dtype) * scale).float()


def int4_per_token_group(
    x: torch.Tensor, group_size: int = INT4_GROUP, scale_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """SGLang commit 6bb1035 ``--kv-cache-dtype int4`` (``destindex_copy_quantize_int4kv``): per
    token-head, groups of ``group_size`` consecutive channels, ``scale = amax / 7`` in
    ``scale_dtype``, ``q = clamp(trunc(x / scale), -7, 7)`` (stored as ``q + 8`` in a nibble), read
    back as ``q.to(scale_dtype) * scale``."""
    if x.shape[-1] % group_size:
        raise ValueError(f"int4 groups of {group_size} do not divide head dim {x.shape[-1]}")
    groups = x.unflatten(-1, (x.shape[-1] // group_size, group_size))
    amax = groups.abs().amax(dim=-1, keepdim=True)
    scale = (amax.float() / 7.0).to(x.dtype).to(scale_dtype)
    q = _truncated_quotient(groups, scale).clamp(-7, 7)
    return (q.to(scale_dtype) * scale).float().flatten(-2)


def _fp4_blocks(x: torch.Tensor) -> torch.Tensor:
    """``[..., D] -> [..., D/16, 16]`` float32 (a block never spans two heads)."""
    if x.shape[-1] % FP4_BLOCK:
        raise ValueError(f"FP4 blocks of {FP4_BLOCK} do not divide head dim {x.shape[-1]}")
    return x.float().unflatten(-1, (x.shape[-1] // FP4_BLOCK, FP4_BLOCK))


def _midpoints(device: torch.device) -> torch.Tensor:
    return torch.tensor(E2M1_MIDPOINTS, device=device)


def _e2m1(index: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """E2M1 code magnitude ``index`` (0..7) with a sign, float32."""
    magnitude = torch.tensor(E2M1_LEVELS, device=index.device)[index]
    return torch.where(negative, -magnitude, magnitude)


def fp4_mx_block16(x: torch.Tensor) -> torch.Tensor:
    """``--kv-cache-dtype fp4_mx_block16`` (``FP4MXBlock16KVQuantizeUtil``): per block of 16, the
    exponent ``e = ceil(log2(max(amax / 6, 1e-10)))``, E2M1 of ``x / 2^e`` with ties rounded up in
    magnitude (``sum(|v| >= E2M1_BOUNDS)``, which also saturates at 6), read back times ``2^e``."""
    blocks = _fp4_blocks(x)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    step = torch.exp2(torch.ceil(torch.log2(torch.clamp(amax / E2M1_MAX, min=1e-10))))
    scaled = blocks / step
    index = torch.bucketize(scaled.abs(), _midpoints(x.device), right=True)  # #{bounds <= |v|}
    return (_e2m1(index, scaled < 0) * step).flatten(-2)


def _e2m1_nearest_even(magnitude: torch.Tensor) -> torch.Tensor:
    """E2M1 code (0..7) of ``magnitude >= 0``: round to nearest, ties to the even code, saturating."""
    bounds = _midpoints(magnitude.device)
    below = torch.bucketize(magnitude, bounds)  # #{bounds < m}: m rounded down at a tie
    tie = torch.bucketize(magnitude, bounds, right=True) > below
    return below + (tie & (below % 2 == 1)).long()  # midpoint i sits below code i + 1


def nvfp4(x: torch.Tensor, global_scale: float = 1.0) -> torch.Tensor:
    """``--kv-cache-dtype nvfp4``, restated: per block of 16, ``block_scale = e4m3(amax / 6 /
    global_scale)``; E2M1 (nearest-even, saturating) of ``x / (block_scale * global_scale)``; read
    back as ``x_fp4 * block_scale * global_scale``. A block whose scale rounds to 0 reads 0."""
    blocks = _fp4_blocks(x)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    block_scale = (amax / E2M1_MAX / global_scale).to(torch.float8_e4m3fn).float()
    step = block_scale * global_scale
    scaled = torch.where(step > 0, blocks / step, 0.0)
    return (_e2m1(_e2m1_nearest_even(scaled.abs()), scaled < 0) * step).flatten(-2)


# ---------------------------------------------------------------------------------------------
# The formats as frontier baselines
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KVQuant:
    """One KV cache format: how it rounds K or V, and its bytes per token-head for one of them."""

    name: str
    label: str
    in_sglang: bool  # selectable with --kv-cache-dtype in SGLang 0.5.23
    quantize: Callable[[torch.Tensor], torch.Tensor]
    bytes_per_head: Callable[[int], float]  # head dim -> bytes (one of K or V)


BF16 = KVQuant("bf16", "bf16 (dense)", True, bf16, lambda d: 2 * d)
FP8_E4M3 = KVQuant("fp8_e4m3", "FP8 E4M3", True, partial(fp8, dtype=torch.float8_e4m3fn), lambda d: d)
FP8_E5M2 = KVQuant("fp8_e5m2", "FP8 E5M2", True, partial(fp8, dtype=torch.float8_e5m2), lambda d: d)
INT8 = KVQuant("int8", "int8 per token-head (not in 0.5.23)", False, int8_per_token_head,
               lambda d: d + torch.bfloat16.itemsize)
INT4 = KVQuant("int4", f"int4 groups of {INT4_GROUP} (not in 0.5.23)", False, int4_per_token_group,
               lambda d: d / 2 + d / INT4_GROUP * torch.bfloat16.itemsize)
FP4_MX = KVQuant("fp4_mx_block16", "FP4 MX block16", True, fp4_mx_block16,
                 lambda d: d / 2 + d / FP4_BLOCK)
NVFP4 = KVQuant("nvfp4", "NVFP4 (restated)", True, nvfp4, lambda d: d / 2 + d / FP4_BLOCK)

#: Every baseline, densest first.
FORMATS = (BF16, FP8_E4M3, FP8_E5M2, INT8, INT4, FP4_MX, NVFP4)
