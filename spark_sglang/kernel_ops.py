"""Which implementation of SparK's three operations runs: Triton kernels or the PyTorch path.

CUDA devices run the Triton kernels (kernels/compress.py, decode.py, extend.py); other devices the
PyTorch path (kernels/torch_path.py), which needs no Triton. ``SPARK_SGLANG_KERNELS=triton`` forces
the Triton kernels on a CPU (under ``TRITON_INTERPRET=1``, for tests); ``=torch`` forces the
PyTorch path anywhere.
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple

import torch

ENV = "SPARK_SGLANG_KERNELS"
CHOICES = ("triton", "torch")


class KernelOps(NamedTuple):
    name: str
    compress_and_store: Callable
    decode_wrapper: type
    extend_attention: Callable


def kernel_choice(device: torch.device | str) -> str:
    forced = os.environ.get(ENV, "")
    if forced:
        if forced not in CHOICES:
            raise ValueError(f"{ENV}={forced!r} must be one of {CHOICES} (or unset: Triton on CUDA, PyTorch elsewhere)")
        return forced
    return "triton" if torch.device(device).type == "cuda" else "torch"


def kernel_ops(device: torch.device | str) -> KernelOps:
    if kernel_choice(device) == "triton":
        from spark_sglang.kernels import compress, decode, extend

        if torch.device(device).type != "cuda":  # the interpreter: round as a GPU does
            from spark_sglang.kernels import interpreter

            interpreter.install()

        return KernelOps("triton", compress.compress_and_store, decode.SparKDecodeWrapper, extend.extend_attention)
    from spark_sglang.kernels import torch_path

    return KernelOps("torch", torch_path.compress_and_store, torch_path.TorchDecodeWrapper, torch_path.extend_attention)
