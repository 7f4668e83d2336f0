"""The CPU path: SparK's decode and extend through a small C++ extension (kernels/cpu/spark_cpu.cpp).

The default on devices without CUDA. Decode reads the compact records directly, one pass per
slot-head with no per-step dense keys (``compressed_logits`` of reference.py, in float32);
extend rebuilds its cached prefix once in C++ and attends with PyTorch's CPU flash attention, the
prefix and the new tokens as two unmasked / causal calls merged by log-sum-exp. Compress-on-write
is the PyTorch path's (``torch_path.compress_and_store``, bit-exact with the reference).

The extension is compiled on first use for the machine it runs on (``-march=native``; about a
minute, once per machine, torch version and source: ``python -m spark_sglang.kernels.cpp_path``
builds it ahead, as ``scripts/setup_env.sh`` does) into ``~/.cache/spark-sglang/cpu-ext``, or
``$SPARK_SGLANG_CACHE/cpu-ext``. A portable build (no AVX-512) of the same source exists for tests.
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import sys
from functools import lru_cache
from pathlib import Path

import torch

from .reference import PackedKeys, PackedValues, output_dtype
from .torch_path import TorchDecodeWrapper, compress_and_store, extend_attention as _torch_extend_attention

__all__ = ["compress_and_store", "CppDecodeWrapper", "extend_attention", "unpack_slots", "load_extension"]

SOURCE = Path(__file__).resolve().parent / "cpu" / "spark_cpu.cpp"
#: Tokens per decode task: fixed, so a request's result does not depend on its batch or threads.
SPLIT_TOKENS = 256
_NATIVE_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno"]
_PORTABLE_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-DSPARK_PORTABLE"]


def _cache_root() -> Path:
    root = os.environ.get("SPARK_SGLANG_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "spark-sglang"


def _cpu_signature() -> str:
    """What ``-march=native`` compiles for: the CPU's model and flags (a build is not portable)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        wanted = [line for line in lines if line.startswith(("model name", "flags"))][:2]
        return "\n".join(wanted)
    except OSError:
        return platform.processor()


@lru_cache(maxsize=None)
def load_extension(portable: bool = False):
    """The compiled extension module (built on first call, then loaded from the cache)."""
    from torch.utils import cpp_extension

    flags = _PORTABLE_FLAGS if portable else _NATIVE_FLAGS
    key = hashlib.sha1(
        "\n".join([SOURCE.read_text(), torch.__version__, " ".join(flags), sys.version,
                   "" if portable else _cpu_signature()]).encode()  # fmt: skip
    ).hexdigest()[:12]
    name = f"spark_cpu_{'portable' if portable else 'native'}_{key}"
    build_dir = _cache_root() / "cpu-ext" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    # pip's ninja lives next to the interpreter, which need not be on PATH (.venv/bin/python ...).
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    try:
        return cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                                  build_directory=str(build_dir), verbose=False)  # fmt: skip
    except Exception as error:  # compiler or ninja missing, or a failed build
        raise RuntimeError(
            f"could not build SparK's CPU extension ({SOURCE.name}): {error}. It needs a C++ compiler (g++) and "
            "ninja (pip install ninja). Set SPARK_SGLANG_KERNELS=torch to serve with the slower pure-PyTorch path."
        ) from error


_EMPTY = torch.empty(0)


def _key_parts(keys: PackedKeys | torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(kept, mask, sign, fill) views for the extension; a dense layer's plain tensor as kept."""
    if isinstance(keys, torch.Tensor):
        return keys, _EMPTY, _EMPTY, _EMPTY
    return tuple(_EMPTY if part is None else part for part in keys)


def _value_parts(values: PackedValues | torch.Tensor) -> tuple[torch.Tensor, ...]:
    if isinstance(values, torch.Tensor):
        return values, _EMPTY, _EMPTY
    return tuple(values)


def _common(keys, values, window_stats, slot_rows):
    stored = keys if isinstance(keys, torch.Tensor) else keys.kept
    out_max = torch.finfo(output_dtype(stored.dtype)).max
    compressed = not isinstance(keys, torch.Tensor) and keys.fill is not None  # "mean" recovery
    stats = window_stats if (compressed and window_stats is not None) else _EMPTY
    rows = slot_rows if compressed else _EMPTY
    return (*_key_parts(keys), *_value_parts(values), stats, rows), out_max


def unpack_slots(keys, values, window_stats, slot_rows, slots, head_dim, k_scale=1.0, v_scale=1.0, *,
                 portable=False):  # fmt: skip
    """Dense float32 keys and values ``[Hkv, n, D]`` of ``slots``, rebuilt as the decode does."""
    parts, out_max = _common(keys, values, window_stats, slot_rows)
    k, v = load_extension(portable).unpack(slots.long().contiguous(), *parts, head_dim, float(k_scale),
                                           float(v_scale), out_max)  # fmt: skip
    return k, v


class CppDecodeWrapper(TorchDecodeWrapper):
    """``SparKDecodeWrapper``'s interface on the CPU extension (``plan`` as the PyTorch path's)."""

    portable = False

    def plan(self, kv_indptr, kv_indices, **kwargs) -> None:
        super().plan(kv_indptr, kv_indices, **kwargs)
        # int64 once per batch, not once per layer
        self._indptr64, self._indices64 = kv_indptr.long().contiguous(), kv_indices.long().contiguous()

    def run(self, q, keys, values, window_stats, slot_rows, *, sm_scale=None, logit_cap=0.0, out=None, lse=None,
            k_scale=1.0, v_scale=1.0):  # fmt: skip
        batch = self._check_planned(q)
        parts, out_max = _common(keys, values, window_stats, slot_rows)
        out32 = torch.empty(batch, self.num_qo_heads, self.v_head_dim, dtype=torch.float32)
        lse32 = torch.empty(batch, self.num_qo_heads, dtype=torch.float32)
        scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(self.head_dim)
        load_extension(self.portable).decode(
            q.float().contiguous(), self._indptr64, self._indices64, *parts, float(scale),
            float(logit_cap), float(k_scale), float(v_scale), out_max, SPLIT_TOKENS, out32, lse32,
        )  # fmt: skip
        out = out32.to(q.dtype) if out is None else out.copy_(out32)
        return out, (lse32 if lse is None else lse.copy_(lse32))


class PortableDecodeWrapper(CppDecodeWrapper):
    """The portable build (tests: the scalar rebuild against the AVX-512 one and the reference)."""

    portable = True


def _flash(q, k, v, scale: float, causal: bool):
    """PyTorch's CPU flash attention of one request, heads first: q ``[Hq, M, D]``, k/v
    ``[Hkv, N, D]`` (GQA: query head ``h`` reads KV head ``h // G``). Returns (out, lse)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q[None], k[None], v[None], 0.0, causal, scale=scale
    )
    return out[0], lse[0]


def extend_attention(
    q, k, v, qo_indptr, prefix_indptr, prefix_indices, keys, values, window_stats, slot_rows, *,
    max_q_len=None, sm_scale=None, logit_cap=0.0, out=None, lse=None, k_scale=1.0, v_scale=1.0, portable=False,
    **_ignored,
):  # fmt: skip
    """Same contract as ``extend.extend_attention``. Each request: its new tokens attend to the
    rebuilt prefix (no mask) and causally to themselves, merged by log-sum-exp."""
    if logit_cap > 0:  # soft-capped logits: the PyTorch path's masked matmuls
        return _torch_extend_attention(q, k, v, qo_indptr, prefix_indptr, prefix_indices, keys, values, window_stats,
                                       slot_rows, sm_scale=sm_scale, logit_cap=logit_cap, out=out, lse=lse,
                                       k_scale=k_scale, v_scale=v_scale)  # fmt: skip
    num_q, num_qo_heads, head_dim = q.shape
    out = out if out is not None else q.new_empty(num_q, num_qo_heads, v.shape[-1])
    lse = lse if lse is not None else torch.empty(num_q, num_qo_heads, dtype=torch.float32, device=q.device)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
    q_bounds = qo_indptr.to("cpu", torch.int64).tolist()
    p_bounds = prefix_indptr.to("cpu", torch.int64).tolist()
    if p_bounds[-1] > 0:
        prefix_k, prefix_v = unpack_slots(keys, values, window_stats, slot_rows, prefix_indices[: p_bounds[-1]],
                                          head_dim, k_scale, v_scale, portable=portable)  # fmt: skip
    for b in range(len(q_bounds) - 1):
        rows = slice(q_bounds[b], q_bounds[b + 1])
        if rows.start == rows.stop:
            continue
        qb = q[rows].transpose(0, 1).float()
        o, request_lse = _flash(qb, k[rows].transpose(0, 1).float(), v[rows].transpose(0, 1).float(), scale, True)
        if p_bounds[b + 1] > p_bounds[b]:
            prefix = slice(p_bounds[b], p_bounds[b + 1])
            o_prefix, lse_prefix = _flash(qb, prefix_k[:, prefix], prefix_v[:, prefix], scale, False)
            merged = torch.logaddexp(request_lse, lse_prefix)
            o = o * torch.exp(request_lse - merged)[..., None] + o_prefix * torch.exp(lse_prefix - merged)[..., None]
            request_lse = merged
        out[rows] = o.transpose(0, 1)
        lse[rows] = request_lse.transpose(0, 1)
    return out, lse


if __name__ == "__main__":  # ahead-of-time build (scripts/setup_env.sh)
    for portable in (False, True):
        module = load_extension(portable)
        print(f"spark_sglang CPU extension ({'portable' if portable else 'native'}): {module.__file__}")
