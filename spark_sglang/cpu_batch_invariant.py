"""Row-count-independent matrix products on CPU, for ``--enable-deterministic-inference``.

Why: MKL/oneDNN pick a different GEMM code path (and thread split) by the number of rows ``M``.
Measured with torch 2.13 CPU (MKL 2024.2) at SmolLM2's shapes: a row of ``x @ W`` computed with
``M`` = 1, 2 or 3 rows, or with 2 threads at ``M`` = 5-7 and 9-11, differs in the last bits from
the same row computed among more rows. So a token's activations depend on how many other tokens
share its batch, and SparK's per-token channel ranking can flip on such a last-bit change. On a
GPU SGLang's own batch-invariant kernels (``sglang.srt.batch_invariant_ops``) do this job; they
cannot run on a CPU (they register Triton kernels for CUDA), so this module is the CPU's.

How: ``aten::mm`` and ``aten::addmm`` on CPU are replaced by one GEMM whose row count is padded
with zero rows to a multiple of ``BLOCK_ROWS`` (at least one block), run through ``torch.bmm`` with a
batch of one (ATen's CPU ``bmm`` calls the same MKL GEMM without going back through ``aten::mm``).
MKL's small-``M`` paths are never taken, and measured on this machine every row of such a product
is bit-identical whatever the padded ``M`` (16 to 608) and wherever the row sits, at 1 and 2
threads. Cutting the rows into fixed 16-row blocks instead (one GEMM shape for every row) is
row-count-independent by construction but re-reads the weight once per block: 2-3x slower prefill
at SmolLM2's shapes, so it is not used. ``tests/test_deterministic.py`` checks the engine's
answers end to end. A bias is added afterwards, elementwise. Installed once per process, only in
deterministic mode.
"""

from __future__ import annotations

import warnings

import torch

#: Row counts are padded to a multiple of this: above MKL's small-M paths (1-3 rows, and 5-11
#: with 2 threads), small enough that a decode step of a few tokens pads little.
BLOCK_ROWS = 16

_LIBRARY: torch.library.Library | None = None


def padded_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (``[M, K] @ [K, N]``) as one GEMM of ``M`` rounded up to ``BLOCK_ROWS`` rows."""
    rows = a.shape[0]
    padded_rows = max(BLOCK_ROWS, -(-rows // BLOCK_ROWS) * BLOCK_ROWS)
    if padded_rows != rows or not a.is_contiguous():
        padded = a.new_zeros(padded_rows, a.shape[1])
        padded[:rows] = a
        a = padded
    return torch.bmm(a[None], b[None])[0, :rows]


def _mm(a, b):
    return padded_mm(a, b)


def _addmm(bias, a, b, *, beta=1, alpha=1):
    product = padded_mm(a, b)
    if alpha != 1:
        product = product * alpha
    return product + (bias if beta == 1 else bias * beta)


def install() -> None:
    """Route CPU ``mm`` / ``addmm`` (so ``F.linear`` and ``matmul``) through ``padded_mm``."""
    global _LIBRARY
    if _LIBRARY is not None:
        return
    library = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():  # "overriding a previously registered kernel": intended
        warnings.simplefilter("ignore", UserWarning)
        library.impl("aten::mm", _mm, "CPU")
        library.impl("aten::addmm", _addmm, "CPU")
    _LIBRARY = library


def installed() -> bool:
    return _LIBRARY is not None


def uninstall() -> None:
    """Back to ATen's own kernels (tests)."""
    global _LIBRARY
    if _LIBRARY is not None:
        _LIBRARY._destroy()
        _LIBRARY = None
