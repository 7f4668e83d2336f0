"""GPU benchmark of the SparK kernels against SGLang's and FlashInfer's dense decode (Llama-3.1-8B
attention geometry: 32 query heads, 8 KV heads, head dim 128; one layer).

1. Correctness of the compiled kernels against ``kernels/reference.py``: compress (stored records
   bit-equal, fills to one bfloat16 step), decode and extend (half-precision tolerances), for
   bf16, fp16 and FP8 (e4m3, with a k/v scale) caches, records laid out as the pool lays them.
2. The bandwidth of a large device-to-device copy, the yardstick of "memory-bound".
3. Decode at context 4k / 32k / 128k and batch 1 / 8 / 64 (shapes that do not fit the device's
   free memory are skipped), SparK at K 0.5, K 0.8 and K+V 0.5 ("mean" recovery), each on a bf16
   and an FP8 cache, next to SGLang's Triton decode and FlashInfer's paged decode on the dense
   cache of the same dtype (each when importable). Reported: median time
   (``triton.testing.do_bench``), the bytes each kernel must read (compact records or dense K/V,
   slot ids, window-row ids), the achieved bandwidth on those bytes and its share of the copy's,
   and the speed-up over each baseline of the same cache dtype.
4. Prefill: compress-on-write vs extend attention of one 8k-token request (no prefix, and over an
   8k compressed prefix), SGLang's dense extend alongside.

Each section (and each decode shape) is guarded: a failure is reported in its table and the run
goes on; the report is rewritten after every step, so a run cut short keeps what it measured. A
time budget (``--budget``, default 480 s) skips the remaining decode shapes once spent, so one
run fits a 10-minute job on an H200.

    python benchmarks/bench_kernels.py [--out PATH] [--shapes 1x4096,64x32768] [--fragment 64]
    python benchmarks/bench_kernels.py --dry-run   # CPU smoke test: Triton interpreter, tiny shapes

``--out`` defaults to ``$OUT/bench_kernels.md`` when ``$OUT`` is set. ``--dry-run`` exercises
every section on a CPU through the Triton interpreter, with a small geometry, tiny shapes and
wall-clock timings (one call): its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

# (query heads, KV heads, head dim): Llama-3.1-8B; the dry run's is small (interpreter speed).
GEOMETRY = (32, 8, 128)
DRY_RUN_GEOMETRY = (4, 2, 64)
BATCHES = (1, 8, 64)
CONTEXTS = (4096, 32768, 131072)
DRY_RUN_SHAPES = [(2, 20)]
#: (label, key ratio, value ratio); "mean" recovery, SparK's default and the most side data.
SPARK_CONFIGS = [("K 0.5", 0.5, 0.0), ("K 0.8", 0.8, 0.0), ("K+V 0.5", 0.5, 0.5)]
FP8 = torch.float8_e4m3fn
#: The FP8 caches' k_scale / v_scale (entries are stored as x / scale).
FP8_SCALE = 0.5
WINDOW_ROWS = 8
PREFILL_LEN, DRY_RUN_PREFILL_LEN = 8192, 16
COPY_BYTES = 2 << 30
SGLANG_MAX_SPLITS = 8
#: (key ratio, value ratio, recovery, prefix lengths, new-token lengths) of the correctness checks.
CHECK_CASES = [
    (0.5, 0.0, "mean", [1, 100, 1000], [1, 63, 300]),
    (0.8, 0.5, "mean", [700, 31, 2], [129, 1, 5]),
    (0.5, 0.5, "zero", [0, 257, 64], [64, 2, 40]),
]
DRY_RUN_CHECK_CASES = [(0.5, 0.5, "mean", [0, 17], [3, 5]), (0.8, 0.0, "zero", [9, 2], [2, 1])]
#: Relative tolerance of decode/extend outputs per cache dtype (error / (|expected| + 1)).
TOLERANCE = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3, FP8: 1.6e-2, torch.float32: 1e-5}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_out = os.path.join(os.environ["OUT"], "bench_kernels.md") if os.environ.get("OUT") else None
    parser.add_argument("--out", default=default_out, help="markdown report (default: $OUT/bench_kernels.md)")
    parser.add_argument("--shapes", type=parse_shapes, default=None,
                        help="decode shapes BxL,... (default: every batch in 1,8,64 x context in 4k,32k,128k)")
    parser.add_argument("--fragment", type=int, default=64,
                        help="slots contiguous in runs of this many, runs shuffled (1: every slot random)")
    parser.add_argument("--budget", type=float, default=480.0,
                        help="seconds after which remaining decode shapes are skipped")
    parser.add_argument("--skip-checks", action="store_true", help="skip the correctness checks")
    parser.add_argument("--dry-run", action="store_true", help="CPU smoke test through the Triton interpreter")
    args = parser.parse_args(argv)  # fmt: skip
    if args.shapes is None:
        args.shapes = DRY_RUN_SHAPES if args.dry_run else [(b, n) for n in CONTEXTS for b in BATCHES]
    return args


def parse_shapes(text: str) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(x) for x in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"shapes {text!r} must look like 1x4096,64x32768") from None
    if any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"shapes {text!r} must look like 1x4096,64x32768")
    return shapes


# ---------------------------------------------------------------------------------------------
# Setting: device, geometry, timer, report
# ---------------------------------------------------------------------------------------------


@dataclass
class Setting:
    device: torch.device
    q_heads: int
    kv_heads: int
    head_dim: int
    model_dtype: torch.dtype  # queries, dense caches, new tokens
    cache_dtypes: tuple[torch.dtype, ...]  # what the SparK and dense caches store
    timer: Callable[[Callable[[], object]], float]
    dry_run: bool

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def sm_scale(self) -> float:
        return 1 / math.sqrt(self.head_dim)


def make_timer(dry_run: bool) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds of ``fn``: triton's do_bench (L2 flushed between calls) on a GPU, one
    wall-clock call in a dry run."""
    if dry_run:

        def wall(fn):
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3

        return wall
    import triton.testing

    return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


class Report:
    """Markdown sections, rewritten to ``path`` (if any) whenever one changes."""

    def __init__(self, path: str | None, title: str):
        self.path = path
        self.sections: dict[str, str] = {"title": title}

    def set(self, key: str, text: str) -> None:
        self.sections[key] = text
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(self.path, "w") as f:
                f.write(self.text())

    def text(self) -> str:
        return "\n\n".join(self.sections.values()) + "\n"


def failure(exc: BaseException) -> str:
    """One line for a table cell."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", FP8: "fp8e4m3"}[dtype]


def cache_scale(dtype: torch.dtype) -> float:
    return FP8_SCALE if dtype == FP8 else 1.0


# ---------------------------------------------------------------------------------------------
# Caches laid out as the pool lays them (kernels/layout.py)
# ---------------------------------------------------------------------------------------------


@dataclass
class SparkCache:
    layout: object  # layout.SlotLayout
    keys: object  # reference.PackedKeys of views into uint8 records
    values: object  # reference.PackedValues, or the dense [S, Hkv, D] cache

    def bytes_per_slot(self, kv_heads: int) -> int:
        return kv_heads * (self.layout.key_bytes_per_head() + self.layout.value_bytes_per_head())


def spark_cache(setting: Setting, num_slots: int, cache_dtype, key_ratio, value_ratio, recovery="mean") -> SparkCache:
    from spark_sglang.kernels import layout, reference

    config = layout.SparKConfig(key_ratio=key_ratio, value_ratio=value_ratio, recovery=recovery)
    lay = config.layout(setting.head_dim, cache_dtype)

    def records(nbytes):
        return torch.zeros(num_slots, setting.kv_heads, nbytes, dtype=torch.uint8, device=setting.device)

    keys = reference.PackedKeys(*layout.key_views(lay, records(lay.key_record_bytes)))
    if lay.values_compressed:
        values = reference.PackedValues(*layout.value_views(lay, records(lay.value_record_bytes)))
    else:
        values = torch.zeros(num_slots, setting.kv_heads, setting.head_dim, dtype=cache_dtype, device=setting.device)
    return SparkCache(lay, keys, values)


def window_stats(setting: Setting, gen: torch.Generator) -> torch.Tensor:
    """``[WINDOW_ROWS, 2, Hkv, D]`` bfloat16 window statistics from random window queries/values."""
    from spark_sglang.kernels import layout, reference

    rows = []
    for _ in range(WINDOW_ROWS):
        queries = torch.randn(32, setting.q_heads, setting.head_dim, generator=gen)
        values = torch.randn(64, setting.kv_heads, setting.head_dim, generator=gen)
        norm = reference.window_channel_norm(queries, setting.kv_heads)
        rows.append(torch.stack([norm, reference.value_channel_bias(values)]))
    return torch.stack(rows).to(layout.STATS_DTYPE).to(setting.device)


def request_rows(lens: list[int], device) -> torch.Tensor:
    """Window row of every token of back-to-back requests: one row per request (a compression
    event), as the backend assigns them."""
    rows = [torch.full((n,), b % WINDOW_ROWS, dtype=torch.int32) for b, n in enumerate(lens)]
    return torch.cat(rows).to(device) if rows else torch.zeros(0, dtype=torch.int32, device=device)


def fragmented_slots(num_tokens: int, fragment: int, gen: torch.Generator) -> torch.Tensor:
    """A permutation of ``num_tokens`` slots, contiguous in runs of ``fragment``."""
    runs = torch.randperm(-(-num_tokens // fragment), generator=gen)
    slots = (runs[:, None] * fragment + torch.arange(fragment)).flatten()
    return slots[slots < num_tokens]


# ---------------------------------------------------------------------------------------------
# 1. Correctness of the compiled kernels
# ---------------------------------------------------------------------------------------------


def check_kernels(setting: Setting, cases) -> list[list[str]]:
    from spark_sglang.kernels import compress, decode, extend, reference

    gen = torch.Generator().manual_seed(0)
    device, dev = setting.device, setting.device
    results = []

    def record(name, dtype, case, ok, detail):
        results.append([name, dtype_name(dtype), case, "PASS" if ok else "FAIL", detail])
        print(f"  {'PASS' if ok else 'FAIL'}  {name:<8} {dtype_name(dtype):<8} {case}  {detail}", flush=True)

    def max_error(got, expect, tol):
        err = ((got.float() - expect.float()).abs() / (expect.float().abs() + 1)).max().item()
        return err <= tol and not got.isnan().any(), f"max err {err:.2e} (tol {tol:.0e})"

    for cache_dtype in setting.cache_dtypes:
        tol, scale = TOLERANCE[cache_dtype], cache_scale(cache_dtype)
        for key_ratio, value_ratio, recovery, lens, new_lens in cases:
            case = f"k{key_ratio}/v{value_ratio}/{recovery} prefix {lens} new {new_lens}"
            try:
                num_tokens = sum(lens) + sum(new_lens)
                num_slots = num_tokens + 37
                slots = torch.randperm(num_slots, generator=gen)[:num_tokens].to(dev)
                stats = window_stats(setting, gen)
                rows = request_rows([n + m for n, m in zip(lens, new_lens)], dev)
                k = torch.randn(num_tokens, setting.kv_heads, setting.head_dim, generator=gen).to(setting.model_dtype).to(dev)
                v = torch.randn(num_tokens, setting.kv_heads, setting.head_dim, generator=gen).to(setting.model_dtype).to(dev)
                cache = spark_cache(setting, num_slots, cache_dtype, key_ratio, value_ratio, recovery)
                slot_rows = torch.zeros(num_slots, dtype=torch.int32, device=dev)
                slot_rows[slots] = rows
                compress.compress_and_store(k, v, slots, rows, stats, cache.keys, cache.values,
                                            k_scale=scale, v_scale=scale)  # fmt: skip

                norm = stats[rows.long(), 0].float()
                pk = reference.pack_keys(k, norm, key_ratio, recovery, dtype=cache_dtype, scale=scale)
                ok, what = True, []
                for name, got, want in zip(pk._fields, cache.keys, pk):
                    if want is None:
                        continue
                    if name == "fill":
                        same = torch.allclose(got[slots].float(), want.float(), rtol=2**-7, atol=0)
                    else:
                        same = torch.equal(got[slots].view(torch.uint8), want.view(torch.uint8))
                    ok &= same
                    what += [] if same else [f"keys.{name}"]
                if value_ratio:
                    pv = reference.pack_values(v, stats[rows.long(), 1].float(), value_ratio, dtype=cache_dtype, scale=scale)
                    for name, got, want in zip(pv._fields, cache.values, pv):
                        same = (torch.allclose(got[slots].float(), want.float(), rtol=2**-7, atol=1e-6) if name == "fill"
                                else torch.equal(got[slots].view(torch.uint8), want.view(torch.uint8)))  # fmt: skip
                        ok &= same
                        what += [] if same else [f"values.{name}"]
                    dense_v = reference.unpack_values(pv, scale=scale)
                else:
                    stored = reference.to_storage(v, cache_dtype, scale)
                    same = torch.equal(cache.values[slots].view(torch.uint8), stored.view(torch.uint8))
                    ok &= same
                    what += [] if same else ["values"]
                    dense_v = reference.from_storage(stored, scale)
                record("compress", cache_dtype, case, ok, "records bit-equal" if ok else "mismatch: " + ", ".join(what))
                dense_k = reference.unpack_keys(pk, norm, scale=scale)

                # Decode: request b attends to its first lens[b] tokens.
                offsets = [0]
                for n, m in zip(lens, new_lens):
                    offsets.append(offsets[-1] + n + m)
                kv_indptr = torch.tensor([0] + lens, device=dev).cumsum(0).to(torch.int32)
                kv_pos = torch.cat([torch.arange(o, o + n) for o, n in zip(offsets, lens)]).to(dev)
                q = torch.randn(len(lens), setting.q_heads, setting.head_dim, generator=gen).to(setting.model_dtype).to(dev)
                wrapper = decode.SparKDecodeWrapper(setting.q_heads, setting.kv_heads, setting.head_dim, device=dev)
                wrapper.plan(kv_indptr, slots[kv_pos], seq_lens_cpu=torch.tensor(lens))
                out, _ = wrapper.run(q, cache.keys, cache.values, stats, slot_rows, sm_scale=setting.sm_scale,
                                     k_scale=scale, v_scale=scale)  # fmt: skip
                errors = [(True, "")]
                for b, n in enumerate(lens):
                    if n:
                        pos = kv_pos[kv_indptr[b] : kv_indptr[b + 1]]
                        expect, _ = reference.attention(q[b : b + 1], dense_k[pos], dense_v[pos], setting.sm_scale)
                        errors.append(max_error(out[b : b + 1], expect, tol))
                record("decode", cache_dtype, case, all(e[0] for e in errors), errors[-1][1])

                # Extend: request b's next new_lens[b] tokens over its first lens[b] (compressed).
                new_pos = torch.cat([torch.arange(o + n, o + n + m) for o, n, m in zip(offsets, lens, new_lens)]).to(dev)
                qo_indptr = torch.tensor([0] + new_lens, device=dev).cumsum(0).to(torch.int32)
                qe = torch.randn(len(new_pos), setting.q_heads, setting.head_dim, generator=gen).to(setting.model_dtype).to(dev)
                out, _ = extend.extend_attention(
                    qe, k[new_pos], v[new_pos], qo_indptr, kv_indptr, slots[kv_pos], cache.keys, cache.values,
                    stats, slot_rows, max_q_len=max(new_lens), sm_scale=setting.sm_scale, k_scale=scale, v_scale=scale,
                )  # fmt: skip
                errors = []
                for b in range(len(lens)):
                    pre = kv_pos[kv_indptr[b] : kv_indptr[b + 1]]
                    new = new_pos[qo_indptr[b] : qo_indptr[b + 1]]
                    rows_b = slice(int(qo_indptr[b]), int(qo_indptr[b + 1]))
                    expect, _ = reference.attention(
                        qe[rows_b], torch.cat([dense_k[pre].float(), k[new].float()]),
                        torch.cat([dense_v[pre].float(), v[new].float()]), setting.sm_scale, causal_offset=len(pre),
                    )  # fmt: skip
                    errors.append(max_error(out[rows_b], expect, tol))
                record("extend", cache_dtype, case, all(e[0] for e in errors), errors[-1][1])
            except Exception as exc:  # a failing case is a result, not the end of the run
                traceback.print_exc()
                record("(error)", cache_dtype, case, False, failure(exc))
    return results


# ---------------------------------------------------------------------------------------------
# 2. Copy bandwidth
# ---------------------------------------------------------------------------------------------


def copy_bandwidth(setting: Setting, num_bytes: int) -> float:
    """Bytes/s of a large device-to-device copy, counting its read and its write."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=setting.device)
    dst = torch.empty_like(src)
    ms = setting.timer(lambda: dst.copy_(src))
    return 2 * num_bytes / (ms * 1e-3)


# ---------------------------------------------------------------------------------------------
# 3. Decode
# ---------------------------------------------------------------------------------------------


@dataclass
class Timing:
    kernel: str
    cache_dtype: torch.dtype
    ms: float | None  # None: not measured (see note)
    bytes_read: int
    note: str = ""
    baseline: bool = False


def sglang_decode(setting: Setting, q, k_pool, v_pool, kv_indptr, kv_indices, seq_lens, scale):
    """SGLang's Triton decode as its backend calls it (its split heuristic, 8 max splits)."""
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd
    from sglang.kernels.ops.attention.metadata import get_num_kv_splits_triton

    batch, num_heads, _ = q.shape
    num_splits = torch.empty(batch, dtype=torch.int32, device=q.device)
    cores = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 8
    get_num_kv_splits_triton[(1,)](
        num_splits, seq_lens, batch, 1, num_heads, setting.kv_heads, SGLANG_MAX_SPLITS, cores,
        MAX_NUM_SEQ=max(256, 1 << (batch - 1).bit_length()),
    )  # fmt: skip
    shape = (batch, num_heads, SGLANG_MAX_SPLITS)
    logits = torch.empty(*shape, v_pool.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.empty(shape, dtype=torch.float32, device=q.device)
    out = torch.empty(batch, num_heads, v_pool.shape[-1], dtype=q.dtype, device=q.device)

    def run():
        decode_attention_fwd(q, k_pool, v_pool, out, kv_indptr, kv_indices, logits, lse, num_splits,
                             SGLANG_MAX_SPLITS, setting.sm_scale, scale, scale)  # fmt: skip
        return out

    run()
    return run


def flashinfer_decode(setting: Setting, q, k_pool, v_pool, kv_indptr, kv_indices, scale):
    """FlashInfer's paged decode (page size 1, NHD, tensor cores)."""
    import flashinfer

    workspace = torch.empty(256 << 20, dtype=torch.uint8, device=q.device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=True)
    last_page_len = torch.ones(q.shape[0], dtype=torch.int32, device=q.device)
    plan_args = (kv_indptr, kv_indices.to(torch.int32), last_page_len, q.shape[1], setting.kv_heads, setting.head_dim, 1)
    try:
        wrapper.plan(*plan_args, q_data_type=q.dtype, kv_data_type=k_pool.dtype, sm_scale=setting.sm_scale)
    except TypeError:  # releases before q_data_type / kv_data_type
        wrapper.plan(*plan_args, data_type=k_pool.dtype, sm_scale=setting.sm_scale)
    paged = (k_pool.unsqueeze(1), v_pool.unsqueeze(1))  # [pages, page_size=1, Hkv, D]
    kwargs = {"k_scale": scale, "v_scale": scale} if k_pool.dtype == FP8 else {}

    def run():
        return wrapper.run(q, paged, **kwargs)

    run()
    return run


def fits(setting: Setting, num_tokens: int) -> tuple[bool, str]:
    """Whether a shape's pools fit: dense K/V in the model dtype and in FP8, plus the largest
    compact cache, with room to spare."""
    if setting.device.type != "cuda":
        return True, ""
    per_token = setting.kv_heads * setting.head_dim * 2 * (2 + 1 + 2)  # dense bf16, dense fp8, compact
    need = num_tokens * per_token * 1.15 + (1 << 30)
    free = torch.cuda.mem_get_info(setting.device)[0]
    return need <= free, f"needs ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free"


def bench_decode_shape(setting: Setting, batch: int, kv_len: int, fragment: int, gen) -> list[Timing]:
    """Every kernel at one (batch, context): the dense baselines over one dense pool per cache
    dtype, SparK over compact caches compressed from the same K/V."""
    from spark_sglang.kernels import compress, decode

    dev = setting.device
    num_tokens = batch * kv_len
    slots = fragmented_slots(num_tokens, fragment, gen).to(dev)
    kv_indptr = torch.arange(0, num_tokens + 1, kv_len, dtype=torch.int32, device=dev)
    seq_lens = torch.full((batch,), kv_len, dtype=torch.int32, device=dev)
    q = torch.randn(batch, setting.q_heads, setting.head_dim, device=dev, dtype=setting.model_dtype)
    # The dense pool: slot s holds token s of the batch; requests read it through `slots`.
    k_pool = torch.randn(num_tokens, setting.kv_heads, setting.head_dim, device=dev, dtype=setting.model_dtype)
    v_pool = torch.randn(num_tokens, setting.kv_heads, setting.head_dim, device=dev, dtype=setting.model_dtype)
    index_bytes = num_tokens * slots.element_size()
    stats = window_stats(setting, gen)
    token_rows = request_rows([kv_len] * batch, dev)
    slot_rows = torch.empty(num_tokens, dtype=torch.int32, device=dev)
    slot_rows[slots] = token_rows  # slot slots[i] holds token i of the batch (request i // kv_len)
    timings = []
    for cache_dtype in setting.cache_dtypes:
        scale = cache_scale(cache_dtype)
        # An FP8 pool holds x / scale (scale a power of two: exact in the model dtype).
        dense_k = k_pool if cache_dtype == setting.model_dtype else (k_pool / scale).to(cache_dtype)
        dense_v = v_pool if cache_dtype == setting.model_dtype else (v_pool / scale).to(cache_dtype)
        dense_bytes = 2 * dense_k.numel() * dense_k.element_size() + index_bytes
        for name, make in (
            ("SGLang Triton decode", lambda: sglang_decode(setting, q, dense_k, dense_v, kv_indptr, slots, seq_lens, scale)),
            ("FlashInfer decode", lambda: flashinfer_decode(setting, q, dense_k, dense_v, kv_indptr, slots, scale)),
        ):  # fmt: skip
            try:
                run = make()
                timings.append(Timing(name, cache_dtype, setting.timer(run), dense_bytes, baseline=True))
            except Exception as exc:  # an unavailable baseline is reported, not fatal
                timings.append(Timing(name, cache_dtype, None, dense_bytes, failure(exc), baseline=True))
            finally:
                run = None
        del dense_k, dense_v

        wrapper = decode.SparKDecodeWrapper(setting.q_heads, setting.kv_heads, setting.head_dim, device=dev)
        wrapper.plan(kv_indptr, slots, seq_lens_cpu=torch.full((batch,), kv_len))
        out = torch.empty(batch, setting.q_heads, setting.head_dim, dtype=setting.model_dtype, device=dev)
        lse = torch.empty(batch, setting.q_heads, dtype=torch.float32, device=dev)
        for label, key_ratio, value_ratio in SPARK_CONFIGS:
            cache = None
            try:
                cache = spark_cache(setting, num_tokens, cache_dtype, key_ratio, value_ratio)
                # Compressed slot for slot: slot s gets token s's keys under its request's row.
                compress.compress_and_store(k_pool, v_pool, torch.arange(num_tokens, device=dev), slot_rows, stats,
                                            cache.keys, cache.values, k_scale=scale, v_scale=scale)  # fmt: skip
                bytes_read = num_tokens * (cache.bytes_per_slot(setting.kv_heads) + 4) + index_bytes

                def run(cache=cache):
                    return wrapper.run(q, cache.keys, cache.values, stats, slot_rows, sm_scale=setting.sm_scale,
                                       out=out, lse=lse, k_scale=scale, v_scale=scale)  # fmt: skip

                run()
                timings.append(Timing(f"SparK {label}", cache_dtype, setting.timer(run), bytes_read))
            except Exception as exc:
                traceback.print_exc()
                timings.append(Timing(f"SparK {label}", cache_dtype, None, 0, failure(exc)))
            finally:
                del cache
    return timings


def decode_rows(batch, kv_len, timings: list[Timing], copy_bw: float) -> list[list[str]]:
    rows = []
    for t in timings:
        baselines = {b.kernel: b for b in timings if b.baseline and b.cache_dtype == t.cache_dtype}
        shape, dtype = f"{batch}x{kv_len}", dtype_name(t.cache_dtype)
        if t.ms is None:
            rows.append([shape, dtype, t.kernel, "n/a", "", "", "", "", "", t.note])
            continue
        bandwidth = t.bytes_read / (t.ms * 1e-3)
        speedups = []
        for name in ("SGLang Triton decode", "FlashInfer decode"):
            base = baselines.get(name)
            speedups.append(f"{base.ms / t.ms:.2f}x" if base is not None and base.ms and not t.baseline else "")
        rows.append([shape, dtype, t.kernel, f"{t.ms * 1e3:.1f}", f"{t.bytes_read / 1e6:.1f}",
                     f"{bandwidth / 1e9:.0f}", f"{100 * bandwidth / copy_bw:.0f}%", *speedups, t.note])  # fmt: skip
    return rows


DECODE_HEADER = ["batch x len", "cache", "kernel", "median us", "MB read", "GB/s", "% of copy",
                 "vs SGLang", "vs FlashInfer", "note"]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# 4. Prefill: compress-on-write vs extend attention (one layer)
# ---------------------------------------------------------------------------------------------


def bench_prefill(setting: Setting, num_new: int, gen) -> list[list[str]]:
    from spark_sglang.kernels import compress, extend

    dev, cache_dtype = setting.device, setting.cache_dtypes[0]
    q = torch.randn(num_new, setting.q_heads, setting.head_dim, device=dev).to(setting.model_dtype)
    k = torch.randn(num_new, setting.kv_heads, setting.head_dim, device=dev).to(setting.model_dtype)
    v = torch.randn(num_new, setting.kv_heads, setting.head_dim, device=dev).to(setting.model_dtype)
    stats = window_stats(setting, gen)
    rows = torch.zeros(2 * num_new, dtype=torch.int32, device=dev)
    prefix_slots = torch.arange(num_new, device=dev)
    new_slots = prefix_slots + num_new
    qo_indptr = torch.tensor([0, num_new], dtype=torch.int32, device=dev)
    shape = f"1x{num_new}"
    results = []
    for label, key_ratio, value_ratio in (SPARK_CONFIGS[0], SPARK_CONFIGS[2]):
        try:
            cache = spark_cache(setting, 2 * num_new, cache_dtype, key_ratio, value_ratio)
            args = (stats, cache.keys, cache.values)
            compress.compress_and_store(k, v, prefix_slots, rows[:num_new], *args)
            ms_compress = setting.timer(lambda: compress.compress_and_store(k, v, new_slots, rows[:num_new], *args))
            for prefix, prefix_len in (("none", 0), (f"{num_new} compressed", num_new)):
                prefix_indptr = torch.tensor([0, prefix_len], dtype=torch.int32, device=dev)

                def run(prefix_indptr=prefix_indptr):
                    return extend.extend_attention(q, k, v, qo_indptr, prefix_indptr, prefix_slots, cache.keys,
                                                   cache.values, stats, rows, max_q_len=num_new)  # fmt: skip

                ms = setting.timer(run)
                results.append([shape, prefix, f"SparK {label}", f"{ms_compress * 1e3:.1f}", f"{ms * 1e3:.1f}",
                                f"{100 * ms_compress / ms:.1f}%", ""])  # fmt: skip
        except Exception as exc:
            traceback.print_exc()
            results.append([shape, "", f"SparK {label}", "n/a", "n/a", "", failure(exc)])

    # SGLang's dense extend over the same tokens: slot s < num_new holds prefix token s.
    k_pool, v_pool = torch.cat([k, k]), torch.cat([v, v])
    for prefix, prefix_len in (("none", 0), (f"{num_new} dense", num_new)):
        prefix_indptr = torch.tensor([0, prefix_len], dtype=torch.int32, device=dev)
        try:
            from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd

            out = torch.empty_like(q)

            def run(prefix_indptr=prefix_indptr):
                extend_attention_fwd(q, k, v, out, k_pool, v_pool, qo_indptr, prefix_indptr, prefix_slots,
                                     None, True, None, num_new, 1.0, 1.0, sm_scale=setting.sm_scale)  # fmt: skip
                return out

            results.append([shape, prefix, "SGLang Triton extend (dense)", "", f"{setting.timer(run) * 1e3:.1f}", "", ""])
        except Exception as exc:
            results.append([shape, prefix, "SGLang Triton extend (dense)", "", "n/a", "", failure(exc)])
    return results


PREFILL_HEADER = ["batch x new", "prefix", "kernel", "compress us", "extend us", "compress / extend", "note"]


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any @triton.jit module is imported
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU (none is visible here). Use --dry-run for a CPU smoke "
              "test of the script itself.", file=sys.stderr)  # fmt: skip
        return 2
    else:
        device = torch.device("cuda")
    if args.dry_run:
        from spark_sglang.kernels import interpreter

        interpreter.install()  # round as a GPU does
    import triton

    q_heads, kv_heads, head_dim = DRY_RUN_GEOMETRY if args.dry_run else GEOMETRY
    setting = Setting(
        device, q_heads, kv_heads, head_dim,
        model_dtype=torch.float16 if args.dry_run else torch.bfloat16,
        cache_dtypes=(torch.float16, FP8) if args.dry_run else (torch.bfloat16, FP8),
        timer=make_timer(args.dry_run), dry_run=args.dry_run,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(1234)
    name = "CPU dry run (Triton interpreter; timings meaningless)" if args.dry_run else torch.cuda.get_device_name()
    report = Report(args.out, (
        f"# SparK kernel benchmark\n\ndevice: {name}; torch {torch.__version__}, triton {triton.__version__}; "
        f"{q_heads} query heads, {kv_heads} KV heads, head dim {head_dim}, queries in "
        f"{dtype_name(setting.model_dtype)}; SparK 'mean' recovery; FP8 caches e4m3 with k/v scale "
        f"{FP8_SCALE}; slots contiguous in runs of {args.fragment}; one window row per request."
    ))  # fmt: skip
    status = 0

    if not args.skip_checks:
        print("== correctness of the compiled kernels vs kernels/reference.py", flush=True)
        checks = check_kernels(setting, DRY_RUN_CHECK_CASES if args.dry_run else CHECK_CASES)
        status |= any(row[3] != "PASS" for row in checks)
        report.set("checks", "## Correctness (compiled kernels vs reference)\n\n"
                   + markdown_table(["kernel", "cache", "case", "result", "detail"], checks))  # fmt: skip

    copy_bytes = (1 << 20) if args.dry_run else COPY_BYTES
    try:
        copy_bw = copy_bandwidth(setting, copy_bytes)
    except Exception as exc:
        print(f"copy bandwidth failed: {failure(exc)}", flush=True)
        copy_bw = float("nan")
    print(f"== device-to-device copy: {copy_bw / 1e9:.0f} GB/s", flush=True)

    print("== decode", flush=True)
    rows = []
    intro = (
        f"## Decode\n\nCopy bandwidth (read + write of a {copy_bytes >> 20} MiB device-to-device copy): "
        f"{copy_bw / 1e9:.0f} GB/s. MB read: what each kernel must read from memory (compact records or "
        "dense K/V, slot ids, and SparK's window-row ids), once. Speed-ups: the baseline's time on the "
        "dense cache of the same dtype / SparK's time.\n\n"
    )
    for batch, kv_len in args.shapes:
        shape = f"{batch}x{kv_len}"
        spent = time.monotonic() - start
        ok, why = fits(setting, batch * kv_len)
        if spent > args.budget or not ok:
            reason = f"skipped: time budget spent ({spent:.0f} s)" if ok else f"skipped: {why}"
            rows.append([shape, "", "(all)", "n/a", "", "", "", "", "", reason])
        else:
            try:
                timings = bench_decode_shape(setting, batch, kv_len, args.fragment, gen)
                rows += decode_rows(batch, kv_len, timings, copy_bw)
            except Exception as exc:  # e.g. out of memory while building the caches
                traceback.print_exc()
                rows.append([shape, "", "(all)", "n/a", "", "", "", "", "", failure(exc)])
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print("  " + "\n  ".join(" | ".join(r[:9]) for r in rows if r[0] == shape), flush=True)
        report.set("decode", intro + markdown_table(DECODE_HEADER, rows))

    print("== prefill: compress-on-write vs extend attention (one layer)", flush=True)
    try:
        prefill = bench_prefill(setting, DRY_RUN_PREFILL_LEN if args.dry_run else PREFILL_LEN, gen)
    except Exception as exc:
        traceback.print_exc()
        prefill = [["", "", "(all)", "n/a", "n/a", "", failure(exc)]]
    for row in prefill:
        print("  " + " | ".join(row), flush=True)
    report.set("prefill", f"## Prefill: compress-on-write vs extend attention (one layer, "
               f"{dtype_name(setting.cache_dtypes[0])} cache)\n\n" + markdown_table(PREFILL_HEADER, prefill))  # fmt: skip

    print("\n" + report.text())
    if args.out:
        print(f"written to {args.out}")
    print(f"{time.monotonic() - start:.0f} s", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
