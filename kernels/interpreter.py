"""Correct float rounding for the Triton interpreter (Triton kernels run on a CPU: tests, and
``SPARK_SGLANG_KERNELS=triton`` off CUDA).

The interpreter (triton 3.8, ``triton.runtime.interpreter._convert_float``) narrows floats to
bfloat16 by truncation and to FP8 without carrying a rounded-up mantissa into the exponent (so
1.9969 becomes 1.0 in e4m3); a GPU rounds to nearest even. ``install()`` routes those narrowing
conversions through PyTorch's (round to nearest even, as ``cvt.rn`` on the GPU), so the kernels'
stores are checked bit for bit on a CPU. Widening conversions are left as they are (exact).
"""

from __future__ import annotations

import numpy as np
import torch


def install() -> None:
    """Idempotent; call before launching kernels under ``TRITON_INTERPRET=1``."""
    import triton.language as tl
    from triton.runtime import interpreter

    if getattr(interpreter, "_spark_rounding_fixed", False):
        return
    narrow_targets = {tl.bfloat16: torch.bfloat16, tl.float8e4nv: torch.float8_e4m3fn, tl.float8e5: torch.float8_e5m2}
    wide_sources = {tl.float32: (np.float32, torch.float32), tl.float16: (np.float16, torch.float16)}
    original = interpreter._convert_float

    def convert_float(data, input_dtype, output_dtype, rounding_mode):
        target = narrow_targets.get(output_dtype)
        source = wide_sources.get(input_dtype)
        if target is None or source is None:
            return original(data, input_dtype, output_dtype, rounding_mode)
        values = torch.from_numpy(np.ascontiguousarray(data).view(source[0]).copy())
        narrowed = values.to(target)
        bits = narrowed.view(torch.uint8 if target.itemsize == 1 else torch.int16).numpy()
        return bits.view(np.uint8 if target.itemsize == 1 else np.uint16).reshape(data.shape)

    interpreter._convert_float = convert_float
    interpreter._spark_rounding_fixed = True
