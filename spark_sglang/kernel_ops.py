"""Which implementation of SparK's three operations runs: Triton kernels, the C++ CPU path or the
PyTorch path.

CUDA devices run the Triton kernels (kernels/compress.py, decode.py, extend.py); other devices the
CPU path (kernels/cpp_path.py: a C++ extension compiled for the machine, reading the compact
records directly). ``SPARK_SGLANG_KERNELS=triton`` forces the Triton kernels on a CPU (under
``TRITON_INTERPRET=1``, for tests); ``=torch`` the pure-PyTorch path (kernels/torch_path.py, no
compiler needed, slower decode); ``=cpp`` the C++ path.
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple

import torch

ENV = "SPARK_SGLANG_KERNELS"
CHOICES = ("triton", "cpp", "torch")


class KernelOps(NamedTuple):
    name: str
    compress_and_store: Callable
    decode_wrapper: type
    extend_attention: Callable


def kernel_choice(device: torch.device | str) -> str:
    forced = os.environ.get(ENV, "")
    if forced:
        if forced not in CHOICES:
            raise ValueError(f"{ENV}={forced!r} must be one of {CHOICES} (or unset: Triton on CUDA, C++ elsewhere)")
        return forced
    return "triton" if torch.device(device).type == "cuda" else "cpp"


def kernel_ops(device: torch.device | str) -> KernelOps:
    if kernel_choice(device) == "triton":
        from spark_sglang.kernels import compress, decode, extend

        if torch.device(device).type != "cuda":  # the interpreter: round as a GPU does
            from spark_sglang.kernels import interpreter

            interpreter.install()

        return KernelOps("triton", compress.compress_and_store, decode.SparKDecodeWrapper, extend.extend_attention)
    if kernel_choice(device) == "cpp":
        from spark_sglang.kernels import cpp_path

        cpp_path.load_extension()  # built at start-up (or a clear error), never in a request
        return KernelOps("cpp", cpp_path.compress_and_store, cpp_path.CppDecodeWrapper, cpp_path.extend_attention)
    from spark_sglang.kernels import torch_path

    return KernelOps("torch", torch_path.compress_and_store, torch_path.TorchDecodeWrapper, torch_path.extend_attention)
