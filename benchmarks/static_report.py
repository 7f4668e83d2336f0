"""Static kernel report: every Triton kernel of spark-sglang (and SGLang's dense baseline) compiled
for an H100/H200 (sm_90) on a machine without a GPU, with the figures that decide its speed.

What is measured, per kernel and configuration, from the cubin that Triton + the bundled ``ptxas``
produce (nothing runs on a GPU):

* registers per thread, spills (bytes stored / loaded to local memory and the number of
  ``STL``/``LDL`` instructions), shared memory (Triton's ``shared`` metadata), stack frame and
  ``cmem[0]`` (``cuobjdump -res-usage``): the facts ``ptxas -v`` prints;
* CTAs per SM: the occupancy the registers, shared memory and warps allow under the sm_90 limits
  (65536 registers per SM allocated in units of 256 per warp, 64 warps and 32 CTAs per SM,
  228 KiB of shared memory per SM allocated in 128-byte units plus 1 KiB reserved per CTA);
* the hot loop's SASS: the KV tile loop, one iteration of which consumes ``BLOCK_N`` KV slots. Its
  static instruction count is per thread and per iteration (every instruction in the body, also
  predicated-off ones, which are still issued; a body with forward branches is marked ``≤``, its
  count an upper bound); times ``num_warps`` it is the warp-instructions a
  CTA issues per tile; divided by the KV bytes of the tile (``BLOCK_N`` x the key + value bytes
  one slot holds for the KV head a program reads) it is warp-instructions per byte. For the
  compact kernels those bytes come from the cache buffers actually passed to the launcher (all
  their bytes, divided by slots x KV heads: record padding included, window statistics and slot
  ids excluded); for SGLang's dense kernels they are ``2 x D x`` element size. The compress kernel
  has no loop: its unit is one program (one token-head; bytes: the dense K and V rows it reads).

Decode on an H200 stays memory-bound only while it issues fewer than ``132 SMs x 4 warp-issues/clk
x 1.9 GHz / 4.8 TB/s = 0.21`` warp-instructions per byte of KV; the verdict column compares each
row with that threshold (extend/prefill kernels are meant to be compute-bound; their figure shows
how much of the issue budget rebuilding the compact tiles takes).

How: each kernel family calls its public launcher with small CPU tensors of the real shapes and
dtypes, while ``JITFunction.run`` is patched to record ``kernel[grid](*args, **kwargs)`` instead of
launching. Triton's own binder (``create_function_from_signature`` and ``JITFunction._pack_args``,
as in ``JITFunction.run``) turns each recorded call into the signature, constexprs, specialisation
attributes and options a CUDA launch gets; tensors are presented as device allocations (a 256-byte
aligned base plus the view's offset), so a pointer is 16-byte divisible exactly when it would be on
the GPU, an integer divisible by 16 gets ``tt.divisibility = 16`` and an integer equal to 1 becomes
a constant, as the runtime does. ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90,
32))`` then builds the cubin with the wheel's ``ptxas``, and the wheel's ``cuobjdump`` reads its
resources and SASS. SGLang is imported first, as in a server: it patches Triton at import time. So
signature changes in the kernels need no change here; launcher changes only touch the one small
input builder of their family.

Hot-loop heuristic: a loop is a backward branch (``BRA`` to a lower address), its body the address
range from the target to the last branch back to it. Loops whose body holds no global load
(``LDG``, ``LDGSTS``, ``UTMALDG``) are ignored, as is any loop that contains another loop with
global loads (nested loops: the inner one reads the KV). Of the remaining sequential loops (an
extend kernel walks the cached prefix, then the new tokens) the one with the most global-load
instructions is the KV tile loop; it is the prefix loop in both extend kernels, whose slots are
gathered through an index.

Usage: ``python benchmarks/static_report.py [--quick|--all] [--out docs/static_report.md]
[--jobs N]``. The exit status is non-zero when any kernel fails to capture or compile: the Triton
interpreter that runs the tests on CPU accepts code that real Triton rejects.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable
from unittest import mock

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.compiler.errors import CompilationError
from triton.runtime.cache import get_cache_manager
from triton.runtime.jit import JITFunction, create_function_from_signature

# ---------------------------------------------------------------------------------------------
# The target: an H100/H200 (sm_90)
# ---------------------------------------------------------------------------------------------

TARGET = GPUTarget("cuda", 90, 32)
NUM_SMS = 132  # H200 SXM (H100 SXM has 132 as well)
WARP_ISSUES_PER_CLOCK = 4  # per SM: one per sub-partition
CLOCK_HZ = 1.9e9
HBM_BYTES_PER_S = 4.8e12
#: Warp-instructions per byte of KV below which decode is memory-bound on an H200.
MEMORY_BOUND_THRESHOLD = NUM_SMS * WARP_ISSUES_PER_CLOCK * CLOCK_HZ / HBM_BYTES_PER_S

REGISTERS_PER_SM = 65536
REGISTER_ALLOC_UNIT = 256  # registers, per warp
MAX_WARPS_PER_SM = 64
MAX_CTAS_PER_SM = 32
SHARED_PER_SM = 228 * 1024
SHARED_ALLOC_UNIT = 128
SHARED_RESERVED_PER_CTA = 1024

# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------

HEAD_DIMS = (32, 64, 128, 256)
GROUPS = (1, 4, 8, 16)
SMOLLM2 = (64, 3)  # SmolLM2-135M: D = 64, 9 query heads over 3 KV heads
DTYPES = (torch.bfloat16, torch.float16)
SETTINGS = ("K0.5 mean", "K0.8 mean", "K0.5 zero", "KV0.5 mean")
DENSE = "dense"  # the setting label of SGLang's kernels
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class Config:
    """One model shape and SparK setting; ``setting`` is ``DENSE`` for SGLang's kernels."""

    head_dim: int
    group: int  # query heads per KV head
    dtype: torch.dtype
    setting: str

    @property
    def kv_heads(self) -> int:
        """KV heads of the tensors: they set strides (hence divisibility specialisation)."""
        return 3 if (self.head_dim, self.group) == SMOLLM2 else 8

    @property
    def q_heads(self) -> int:
        return self.kv_heads * self.group

    def spark_config(self):
        from spark_sglang.kernels.layout import SparKConfig

        ratios, recovery = self.setting.split()
        ratio = float(ratios.lstrip("KV"))
        return SparKConfig(
            key_ratio=ratio,
            value_ratio=ratio if ratios.startswith("KV") else 0.0,
            recovery=recovery,
        )

    def dense(self) -> "Config":
        return Config(self.head_dim, self.group, self.dtype, DENSE)

    def __str__(self) -> str:
        return f"D={self.head_dim} G={self.group} {DTYPE_NAMES[self.dtype]} {self.setting}"


def _shape_grid(dims: Iterable[int], groups: Iterable[int]) -> list[tuple[int, int]]:
    shapes = [(d, g) for d in dims for g in groups]
    return shapes + ([SMOLLM2] if SMOLLM2[0] in dims and SMOLLM2 not in shapes else [])


def spark_configs(grid: str) -> list[Config]:
    """``default``: every head dim x group at bf16 "K0.5 mean", every setting and fp16 at D = 64
    and 128 with 4 query heads per KV head; ``all``: the cross product; ``quick``: D = 64, 128."""
    base, bf16 = SETTINGS[0], torch.bfloat16
    if grid == "quick":
        return [Config(d, 4, bf16, base) for d in (64, 128)]
    if grid == "all":
        return [
            Config(d, g, dtype, s)
            for d, g in _shape_grid(HEAD_DIMS, GROUPS)
            for dtype in DTYPES
            for s in SETTINGS
        ]
    configs = [Config(d, g, bf16, base) for d, g in _shape_grid(HEAD_DIMS, GROUPS)]
    configs += [Config(d, 4, bf16, s) for d in (64, 128) for s in SETTINGS[1:]]
    configs += [Config(d, 4, torch.float16, base) for d in (64, 128)]
    return configs


# ---------------------------------------------------------------------------------------------
# Capturing launches
# ---------------------------------------------------------------------------------------------


@dataclass
class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)``."""

    kernel: JITFunction
    args: tuple
    kwargs: dict


@contextlib.contextmanager
def captured_launches():
    """Within the block, Triton kernel launches are recorded in the yielded list, not run."""
    launches: list[Launch] = []

    def record(kernel, *args, grid, warmup, **kwargs):
        launches.append(Launch(kernel, args, kwargs))

    with mock.patch.object(JITFunction, "run", record):
        yield launches


def bytes_per_slot_head(tensors: Iterable[torch.Tensor | None], slots: int, heads: int) -> int:
    """Bytes one slot holds for one KV head, summed over the distinct buffers behind ``tensors``
    (typed views into one record buffer count once)."""
    storages = {}
    for t in tensors:
        if t is not None:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    total = sum(storages.values())
    if total % (slots * heads):
        raise ValueError(f"buffers of {total} bytes do not split into {slots} x {heads} rows")
    return total // (slots * heads)


SLOTS = 256  # cache rows of the small CPU pools


@dataclass
class Job:
    """A captured launch to compile, and how to read its SASS.

    scope: ``"loop"`` (the KV tile loop is the unit), ``"program"`` (the whole loop-free program
    is), or None (not a KV kernel: no per-byte figures).
    """

    family: str
    config: Config
    launch: Launch
    scope: str | None = None
    slots_per_unit: int = 0
    bytes_per_slot: int = 0


def kv_jobs(
    family: str, config: Config, launches: list[Launch], cache: list, tile_key: str = "BLOCK_N"
) -> list[Job]:
    """Jobs of a launcher's launches: a launch handed the ``cache`` tensors walks them in tiles of
    ``kwargs[tile_key]`` slots; the others (split merges) are not KV kernels."""
    per_slot = bytes_per_slot_head(cache, SLOTS, config.kv_heads)
    ids = {id(t) for t in cache if t is not None}
    return [
        Job(family, config, launch, "loop", launch.kwargs[tile_key], per_slot)
        if any(id(a) in ids for a in (*launch.args, *launch.kwargs.values()))
        else Job(family, config, launch)
        for launch in launches
    ]


# --- SparK (one small function per kernel family; they share the cache builder) --------------


def spark_cache(config: Config):
    """``(keys, values, window_stats, slot_rows)`` of one layer, allocated as the pool does:
    uint8 records read through their typed views (``layout.key_views``), or dense values."""
    from spark_sglang.kernels.layout import STATS_DTYPE, key_views, value_views
    from spark_sglang.kernels.reference import PackedKeys, PackedValues

    layout = config.spark_config().layout(config.head_dim, config.dtype)

    def records(nbytes: int) -> torch.Tensor:
        return torch.zeros(SLOTS, config.kv_heads, nbytes, dtype=torch.uint8)

    keys = PackedKeys(*key_views(layout, records(layout.key_record_bytes)))
    if layout.values_compressed:
        values = PackedValues(*value_views(layout, records(layout.value_record_bytes)))
    else:
        values = torch.zeros(SLOTS, config.kv_heads, config.head_dim, dtype=config.dtype)
    stats_shape = (16, layout.stats_per_window_row, config.kv_heads, config.head_dim)
    stats = torch.zeros(stats_shape, dtype=STATS_DTYPE)
    return keys, values, stats, torch.zeros(SLOTS, dtype=torch.int32)


def _cache_tensors(keys, values) -> list[torch.Tensor]:
    return [*keys, *(values if isinstance(values, tuple) else (values,))]


def spark_decode(config: Config) -> list[Job]:
    """``SparKDecodeWrapper.plan`` + ``run``: ``_decode_split_kernel``, ``_merge_splits_kernel``."""
    from spark_sglang.kernels.decode import SparKDecodeWrapper

    batch, kv_len = 4, 48
    cache = spark_cache(config)
    q = torch.zeros(batch, config.q_heads, config.head_dim, dtype=config.dtype)
    wrapper = SparKDecodeWrapper(
        config.q_heads, config.kv_heads, config.head_dim, device="cpu", num_sms=NUM_SMS
    )
    indptr = torch.arange(0, (batch + 1) * kv_len, kv_len, dtype=torch.int32)
    wrapper.plan(indptr, torch.arange(batch * kv_len, dtype=torch.int64))
    with captured_launches() as launches:
        wrapper.run(q, *cache)
    return kv_jobs("SparK decode", config, launches, _cache_tensors(*cache[:2]))


def _extend_batch(config: Config, new=(40, 24), prefix=(56, 72)):
    """``(q, k, qo_indptr, prefix_indptr, prefix_indices)`` of a two-request extend (two, so that
    the batch size is not specialised as the constant 1)."""
    tokens = sum(new)
    q = torch.zeros(tokens, config.q_heads, config.head_dim, dtype=config.dtype)
    k = torch.zeros(tokens, config.kv_heads, config.head_dim, dtype=config.dtype)
    qo_indptr = torch.tensor([0, *new], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    prefix_indptr = torch.tensor([0, *prefix], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return q, k, qo_indptr, prefix_indptr, torch.arange(sum(prefix), dtype=torch.int64)


def spark_extend(config: Config) -> list[Job]:
    """``extend_attention``: ``_extend_kernel`` (compact prefix, then the new tokens)."""
    from spark_sglang.kernels.extend import extend_attention

    cache = spark_cache(config)
    q, k, qo_indptr, prefix_indptr, prefix_indices = _extend_batch(config)
    with captured_launches() as launches:
        extend_attention(q, k, k.clone(), qo_indptr, prefix_indptr, prefix_indices, *cache)
    return kv_jobs("SparK extend", config, launches, _cache_tensors(*cache[:2]))


def spark_compress(config: Config) -> list[Job]:
    """``compress_and_store``: ``_compress_kernel``, one program per token-head, no loop."""
    from spark_sglang.kernels.compress import compress_and_store

    tokens = 8
    keys, values, stats, _ = spark_cache(config)
    k = torch.zeros(tokens, config.kv_heads, config.head_dim, dtype=config.dtype)
    v = k.clone()
    slots = torch.arange(tokens, dtype=torch.int64)
    rows = torch.zeros(tokens, dtype=torch.int32)
    with captured_launches() as launches:
        compress_and_store(k, v, slots, rows, stats, keys, values)
    per_slot = bytes_per_slot_head([k, v], tokens, config.kv_heads)
    return [Job("SparK compress", config, launch, "program", 1, per_slot) for launch in launches]


# --- SGLang's dense Triton kernels (page size 1), as its Triton backend calls them ------------


def _dense_cache(config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (SLOTS, config.kv_heads, config.head_dim)
    return torch.zeros(shape, dtype=config.dtype), torch.zeros(shape, dtype=config.dtype)


def sglang_decode(config: Config) -> list[Job]:
    """``decode_attention_fwd``: stage 1 (grouped kernel, or the per-head one for G = 1) and
    stage 2, with SGLang's default 8 KV splits and PDL (on for sm_90)."""
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd

    batch, kv_len, max_splits = 4, 48, 8
    heads, dim = config.q_heads, config.head_dim
    cache = _dense_cache(config)
    q = torch.zeros(batch, heads, dim, dtype=config.dtype)
    indptr = torch.arange(0, (batch + 1) * kv_len, kv_len, dtype=torch.int32)
    indices = torch.arange(batch * kv_len, dtype=torch.int64)
    logits = torch.zeros(batch, heads, max_splits, dim, dtype=torch.float32)
    lse = torch.zeros(batch, heads, max_splits, dtype=torch.float32)
    splits = torch.full((batch,), max_splits, dtype=torch.int32)
    with captured_launches() as launches:
        decode_attention_fwd(
            q, *cache, torch.zeros_like(q), indptr, indices, logits, lse, splits, max_splits,
            1.0 / math.sqrt(dim), 1.0, 1.0, use_pdl=True,
        )  # fmt: skip
    return kv_jobs("SGLang decode", config, launches, cache)


def sglang_extend(config: Config) -> list[Job]:
    """``extend_attention_fwd`` with the block sizes SGLang picks on sm_90 (it reads the device's
    capability at import time, so it is set here)."""
    from sglang.kernels.ops.attention import extend_attention

    cache = _dense_cache(config)
    q, k, qo_indptr, kv_indptr, kv_indices = _extend_batch(config)
    max_new = int((qo_indptr[1:] - qo_indptr[:-1]).max())
    sm90 = mock.patch.multiple(extend_attention, _is_cuda=True, CUDA_CAPABILITY=(9, 0), create=True)
    with sm90, captured_launches() as launches:
        extend_attention.extend_attention_fwd(
            q, k, k.clone(), torch.zeros_like(q), *cache, qo_indptr, kv_indptr, kv_indices,
            None, True, None, max_new, 1.0, 1.0,
        )  # fmt: skip
    return kv_jobs("SGLang extend", config, launches, cache, tile_key="BLOCK_N_PREFIX")


Family = Callable[[Config], list[Job]]
SPARK_FAMILIES: tuple[Family, ...] = (spark_decode, spark_extend, spark_compress)
DENSE_FAMILIES: tuple[Family, ...] = (sglang_decode, sglang_extend)
FAMILY_ORDER = ("SparK decode", "SGLang decode", "SparK extend", "SGLang extend", "SparK compress")


def plan(grid: str) -> list[tuple[Family, Config]]:
    """(family, config) pairs: SparK families over the SparK configs, SGLang's over their shapes
    (``--quick``: SGLang's decode at D = 128 only)."""
    configs = spark_configs(grid)
    pairs = [(family, c) for c in configs for family in SPARK_FAMILIES]
    dense = list(dict.fromkeys(c.dense() for c in configs))
    if grid == "quick":
        return pairs + [(sglang_decode, c) for c in dense if c.head_dim == 128]
    return pairs + [(family, c) for c in dense for family in DENSE_FAMILIES]


# ---------------------------------------------------------------------------------------------
# From a launch to what JITFunction.run would compile on an sm_90 device
# ---------------------------------------------------------------------------------------------

CUDA_ALLOCATION_ALIGN = 256


class _DeviceTensor:
    """A tensor as the specialiser sees it on the GPU: its dtype, and a data pointer at the
    view's offset from an aligned allocation."""

    def __init__(self, tensor: torch.Tensor):
        self.dtype = tensor.dtype
        self._offset = tensor.storage_offset() * tensor.element_size()

    def data_ptr(self) -> int:
        return CUDA_ALLOCATION_ALIGN + self._offset


def _on_device(value):
    return _DeviceTensor(value) if isinstance(value, torch.Tensor) else value


@dataclass(frozen=True)
class CompileSpec:
    """Everything ``triton.compile`` needs, picklable for the worker processes."""

    module: str
    name: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict

    def key(self) -> str:
        return repr((self.module, self.name, self.signature, sorted(self.constexprs.items()),
                     sorted(self.attrs.items()), sorted(self.options.items())))  # fmt: skip


def compile_spec(launch: Launch) -> CompileSpec:
    """Signature, constexprs, attributes and options exactly as ``JITFunction.run`` derives them."""
    kernel = launch.kernel
    if not isinstance(kernel, JITFunction):
        raise TypeError(f"{kernel!r} is not a JITFunction: is TRITON_INTERPRET set?")
    backend = make_backend(TARGET)
    kwargs = {name: _on_device(value) for name, value in launch.kwargs.items()}
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*map(_on_device, launch.args), **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound, specialization, options
    )
    return CompileSpec(
        kernel.fn.__module__, kernel.fn.__name__, signature, constexprs, attrs, options.__dict__
    )


# ---------------------------------------------------------------------------------------------
# Compiling and reading the cubin (worker side)
# ---------------------------------------------------------------------------------------------

_SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s*(.*?)\s*;\s*/\*\s*0x[0-9a-f]{16}\s*\*/\s*$")
_PREDICATE = re.compile(r"^@!?U?P[T0-9]+\s+")
_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:\d+ CONSTANT\[0\]:(\d+)")
_ACCESS_WIDTH = {"8": 1, "U8": 1, "S8": 1, "16": 2, "U16": 2, "S16": 2, "64": 8, "128": 16}
GLOBAL_LOADS = ("LDG", "LDGSTS", "UTMALDG")


@dataclass(frozen=True)
class Instr:
    """One SASS instruction (its predicate dropped)."""

    address: int
    opcode: str  # with modifiers, e.g. "LDG.E.U16"
    operands: str

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def branch_target(self) -> int | None:
        if self.base != "BRA":
            return None
        targets = re.findall(r"0x[0-9a-f]+", self.operands)
        return int(targets[-1], 16) if targets else None

    @property
    def access_bytes(self) -> int:
        widths = [_ACCESS_WIDTH[m] for m in self.opcode.split(".")[1:] if m in _ACCESS_WIDTH]
        return widths[-1] if widths else 4


def parse_sass(text: str) -> list[Instr]:
    """Instructions of ``cuobjdump -sass`` output (one kernel)."""
    instrs = []
    for line in text.splitlines():
        match = _SASS_LINE.match(line)
        if match:
            opcode, _, operands = _PREDICATE.sub("", match.group(2)).partition(" ")
            instrs.append(Instr(int(match.group(1), 16), opcode, operands.strip()))
    return instrs


@dataclass(frozen=True)
class Binary:
    """What one compiled kernel is made of, or why it did not compile."""

    name: str
    num_warps: int = 0
    num_stages: int = 0
    shared: int = 0
    registers: int = 0
    stack: int = 0
    cmem: int = 0
    sass: tuple[Instr, ...] = ()
    error: str | None = None


def _tool(name: str) -> str:
    return getattr(knobs.nvidia, name).path


def _run_tool(tool: str, *args: str, cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run(
            [_tool(tool), *args, f.name], check=True, capture_output=True, text=True
        ).stdout


def disassemble(compiled) -> str:
    """``cuobjdump -sass`` of a compiled kernel, kept in Triton's cache beside its cubin (the
    disassembly takes longer than a cached compile)."""
    cache, name = get_cache_manager(compiled.hash), f"{compiled.name}.sass.txt"
    path = cache.get_file(name)
    if path is None:
        path = cache.put(_run_tool("cuobjdump", "-sass", cubin=compiled.asm["cubin"]), name)
    return Path(path).read_text()


def _resolve(module: str, name: str) -> JITFunction:
    return getattr(importlib.import_module(module), name)


def describe(error: BaseException) -> str:
    """One line: the innermost error of a (nested) compilation error, and the kernel source line
    it points at."""
    chain = [error]
    while (cause := chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(cause)
    last_line = (str(chain[-1]).strip().splitlines() or [""])[-1]
    # Reprs carry object addresses: keep the report the same from run to run.
    message = re.sub(r" at 0x[0-9a-f]+", "", f"{type(chain[-1]).__name__}: {last_line}")
    located = [
        e for e in chain if isinstance(e, CompilationError) and e.src and hasattr(e.node, "lineno")
    ]
    if located:
        message += f" at `{located[-1].src.splitlines()[located[-1].node.lineno - 1].strip()}`"
    return message


def build(spec: CompileSpec) -> Binary:
    """Compile for sm_90 and read registers, shared memory and SASS from the cubin."""
    kernel = _resolve(spec.module, spec.name)
    try:
        source = ASTSource(kernel, spec.signature, spec.constexprs, spec.attrs)
        compiled = triton.compile(source, target=TARGET, options=spec.options)
    except Exception as error:  # a kernel that does not compile is a finding, not a crash
        return Binary(spec.name, error=describe(error))
    cubin, meta = compiled.asm["cubin"], compiled.metadata
    usage = _RESOURCES.search(_run_tool("cuobjdump", "-res-usage", cubin=cubin))
    registers, stack, cmem = map(int, usage.groups())
    sass = tuple(parse_sass(disassemble(compiled)))
    return Binary(
        spec.name, meta.num_warps, meta.num_stages, meta.shared, registers, stack, cmem, sass
    )


# ---------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """The instructions of one KV tile (loop iteration) or of the whole program."""

    instructions: int
    global_loads: int
    branches: int  # forward branches inside: the count is then an upper bound of the issued ones
    mix: tuple[tuple[str, int], ...]  # (opcode, count), most frequent first


def _is_global_load(instr: Instr) -> bool:
    return instr.base in GLOBAL_LOADS


def _unit(body: list[Instr]) -> Unit:
    mix = Counter(i.base for i in body).most_common()
    branches = sum(1 for i in body if i.branch_target is not None and i.branch_target > i.address)
    return Unit(len(body), sum(map(_is_global_load, body)), branches, tuple(mix))


def loop_spans(sass: list[Instr]) -> list[tuple[int, int]]:
    """(first, last) address of each loop: a backward branch's target and the last branch to it."""
    ends: dict[int, int] = {}
    for instr in sass:
        target = instr.branch_target
        if target is not None and target < instr.address:
            ends[target] = max(ends.get(target, target), instr.address)
    return sorted(ends.items())


def _body(sass: list[Instr], span: tuple[int, int]) -> list[Instr]:
    return [i for i in sass if span[0] <= i.address <= span[1]]


def kv_loop(sass: Iterable[Instr]) -> Unit | None:
    """The KV tile loop (see the module docstring), or None without a loop that loads."""
    sass = list(sass)
    spans = [s for s in loop_spans(sass) if any(map(_is_global_load, _body(sass, s)))]
    innermost = [
        a for a in spans if not any(b != a and a[0] <= b[0] and b[1] <= a[1] for b in spans)
    ]
    units = [_unit(_body(sass, span)) for span in innermost]
    # The most global loads; the first loop on a tie (max keeps the first).
    return max(units, key=lambda u: u.global_loads, default=None)


def program(sass: Iterable[Instr]) -> Unit:
    """The whole program up to its last ``EXIT`` (the padding after it is never issued)."""
    sass = list(sass)
    last_exit = max(n for n, i in enumerate(sass) if i.base == "EXIT")
    return _unit(sass[: last_exit + 1])


def spills(sass: Iterable[Instr]) -> tuple[int, int, int]:
    """(bytes stored, bytes loaded, instructions) of local-memory traffic: register spills."""
    stores = [i.access_bytes for i in sass if i.base == "STL"]
    loads = [i.access_bytes for i in sass if i.base == "LDL"]
    return sum(stores), sum(loads), len(stores) + len(loads)


def ctas_per_sm(registers: int, num_warps: int, shared: int) -> tuple[int, str]:
    """Resident CTAs per SM and the resource that limits them."""
    regs_per_warp = -(-registers * 32 // REGISTER_ALLOC_UNIT) * REGISTER_ALLOC_UNIT
    shared_per_cta = -(-shared // SHARED_ALLOC_UNIT) * SHARED_ALLOC_UNIT + SHARED_RESERVED_PER_CTA
    limits = {
        "regs": REGISTERS_PER_SM // max(1, regs_per_warp * num_warps),
        "smem": SHARED_PER_SM // shared_per_cta,
        "warps": MAX_WARPS_PER_SM // num_warps,
        "CTAs": MAX_CTAS_PER_SM,
    }
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

COLUMNS = (
    "family", "kernel", "D", "G", "dtype", "SparK", "warps/stages", "regs", "spills B st/ld (n)",
    "smem KiB", "CTAs/SM", "BLOCK_N", "instr/iter", "warp-instr/tile", "KV B/tile",
    "warp-instr/B", "verdict", "top opcodes (share of the unit)",
)  # fmt: skip


@dataclass
class Row:
    """One distinct binary and every configuration that compiles to it."""

    jobs: list[Job] = field(default_factory=list)
    binary: Binary | None = None

    def sort_key(self):
        c, family = self.jobs[0].config, self.jobs[0].family
        setting = SETTINGS.index(c.setting) if c.setting in SETTINGS else -1
        return (c.head_dim, min(j.config.group for j in self.jobs), DTYPES.index(c.dtype),
                FAMILY_ORDER.index(family), setting, self.binary.name)  # fmt: skip


def config_cells(row: Row) -> list[str]:
    """D, G, dtype and setting; every value of the configurations that share the binary."""
    def values(attr: str, show=str) -> str:
        return ",".join(show(v) for v in dict.fromkeys(getattr(j.config, attr) for j in row.jobs))

    dtypes = values("dtype", DTYPE_NAMES.get)
    return [values("head_dim"), values("group"), dtypes, values("setting")]


def resource_cells(b: Binary) -> list[str]:
    stored, loaded, count = spills(b.sass)
    ctas, limiter = ctas_per_sm(b.registers, b.num_warps, b.shared)
    return [
        f"{b.num_warps}/{b.num_stages}", str(b.registers),
        f"{stored}/{loaded} ({count})" if count else "0",
        f"{b.shared / 1024:.1f}", f"{ctas} ({limiter})",
    ]  # fmt: skip


def unit_cells(job: Job, b: Binary) -> list[str]:
    """Tile, instructions per iteration / tile / byte, verdict, mix; dashes for non-KV kernels."""
    unit = {"loop": kv_loop, "program": program}[job.scope](b.sass) if job.scope else None
    if unit is None:
        return ["–"] * 7
    per_tile = unit.instructions * b.num_warps
    tile_bytes = job.slots_per_unit * job.bytes_per_slot
    per_byte = per_tile / tile_bytes
    ratio = per_byte / MEMORY_BOUND_THRESHOLD
    verdict = "memory-bound" if ratio <= 1 else f"issue-bound {ratio:.1f}x"
    mix = ", ".join(f"{op} {100 * n / unit.instructions:.0f}%" for op, n in unit.mix[:4])
    block = str(job.slots_per_unit) if job.scope == "loop" else "1 (program)"
    count = f"≤{unit.instructions}" if unit.branches else str(unit.instructions)
    return [
        block, count, str(per_tile), str(tile_bytes), f"{per_byte:.3f}", verdict,
        mix,
    ]  # fmt: skip


def row_cells(row: Row) -> list[str]:
    job, b = row.jobs[0], row.binary
    head = [job.family, f"`{b.name}`", *config_cells(row)]
    if b.error:
        return head + ["FAILED: " + b.error] + [""] * (len(COLUMNS) - len(head) - 1)
    return head + resource_cells(b) + unit_cells(job, b)


def ptxas_line(row: Row) -> str:
    b = row.binary
    stored, loaded, _ = spills(b.sass)
    return (f"{b.name} [{', '.join(config_cells(row))}]: Used {b.registers} registers, "
            f"{b.stack} bytes stack frame, {stored} bytes spill stores, "
            f"{loaded} bytes spill loads, {b.shared} bytes shared (dynamic), "
            f"{b.cmem} bytes cmem[0]")  # fmt: skip


def _ptxas_version() -> str:
    out = subprocess.run([_tool("ptxas"), "--version"], capture_output=True, text=True).stdout
    match = re.search(r"release (\S+),", out)
    return match.group(1) if match else "?"


def render(rows: list[Row], failures: list[str]) -> str:
    lines = [
        f"Static compile figures for sm_90 (H100/H200): Triton {triton.__version__}, ptxas "
        f"{_ptxas_version()}, read from the cubin, not measured on a GPU.",
        "",
        f"Memory-bound threshold on an H200: {NUM_SMS} SMs x {WARP_ISSUES_PER_CLOCK} "
        f"warp-issues/clk x {CLOCK_HZ / 1e9:g} GHz / {HBM_BYTES_PER_S / 1e12:g} TB/s = "
        f"**{MEMORY_BOUND_THRESHOLD:.2f} warp-instructions per byte** of KV; decode rows above it "
        "are issue-bound.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row_cells(row)) + " |")
    lines += ["", "ptxas -v facts (from `cuobjdump -res-usage` and the SASS):", "", "```"]
    lines += [ptxas_line(row) for row in rows if not row.binary.error]
    lines += ["```"]
    if failures:
        lines += ["", "Failures:", ""] + [f"* {f}" for f in failures]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

GENERATED_MARKER = "<!-- generated by benchmarks/static_report.py: everything below is replaced -->"


def collect(grid: str) -> tuple[dict[str, Row], dict[str, CompileSpec], list[str]]:
    """Capture every launch of the grid, grouped by identical compile inputs."""
    rows: dict[str, Row] = {}
    specs: dict[str, CompileSpec] = {}
    failures = []
    for family, config in plan(grid):
        try:
            jobs = family(config)
            keyed = [(compile_spec(job.launch), job) for job in jobs]
        except Exception as error:
            what = f"capturing {family.__name__} {config}"
            failures.append(f"{what}: {type(error).__name__}: {error}")
            continue
        for spec, job in keyed:
            rows.setdefault(spec.key(), Row()).jobs.append(job)
            specs.setdefault(spec.key(), spec)
    return rows, specs, failures


def compile_all(specs: dict[str, CompileSpec], jobs: int) -> dict[str, Binary]:
    """Build every spec, ``jobs`` at a time."""
    keys = list(specs)
    if jobs <= 1:
        return {key: build(specs[key]) for key in keys}
    # Forked workers inherit the imported kernel modules.
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(jobs, mp_context=context) as pool:
        return dict(zip(keys, pool.map(build, (specs[key] for key in keys))))


def write_out(path: Path, report: str) -> None:
    """Write the report below the marker, keeping a hand-written header above it."""
    header = ""
    if path.exists():
        text = path.read_text()
        if GENERATED_MARKER in text:
            header = text[: text.index(GENERATED_MARKER)]
    path.write_text(f"{header}{GENERATED_MARKER}\n\n{report}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    grid = parser.add_mutually_exclusive_group()
    grid.add_argument("--quick", action="store_const", const="quick", dest="grid",
                      help="a handful of kernels: SparK's at D=64 and 128, SGLang's decode at 128")
    grid.add_argument("--all", action="store_const", const="all", dest="grid",
                      help="the full cross product of head dims, groups, dtypes and settings")
    parser.add_argument("--out", type=Path, help="also write the markdown report here")
    parser.add_argument("--jobs", type=int, default=os.cpu_count(), help="parallel compiles")
    args = parser.parse_args(argv)  # fmt: skip

    start = time.monotonic()
    # Under TRITON_INTERPRET=1 @triton.jit makes interpreter functions, which cannot be compiled.
    # Kernel modules are imported by the families, after this.
    os.environ.pop("TRITON_INTERPRET", None)
    # Compile in a server's environment: importing SGLang changes Triton (sglang.srt.utils replaces
    # the constexpr_function triton.next_power_of_2 with a plain Python function).
    importlib.import_module("sglang.srt.utils")
    rows, specs, failures = collect(args.grid or "default")
    print(f"compiling {len(specs)} kernels with {args.jobs} jobs ...", file=sys.stderr)
    for key, binary in compile_all(specs, args.jobs).items():
        rows[key].binary = binary
        if binary.error:
            job = rows[key].jobs[0]
            failures.append(f"compiling {binary.name} ({job.family}, {job.config}): {binary.error}")
    report = render(sorted(rows.values(), key=Row.sort_key), failures)
    print(report, end="")
    if args.out:
        write_out(args.out, report)
    print(f"{len(specs)} kernels in {time.monotonic() - start:.0f} s, {len(failures)} failures",
          file=sys.stderr)  # fmt: skip
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
