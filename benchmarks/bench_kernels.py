"""GPU benchmark of the SparK kernels (Llama-3.1-8B attention geometry: 32 query heads, 8 KV
heads, head dim 128, bf16).

1. Checks every kernel, compiled, in bf16 and fp16 against ``kernels/reference.py`` on a few
   shapes (compress bit-equal; decode and extend to half-precision tolerance).
2. Times decode over the compact cache (key ratios 0.5 / 0.8, keys only and keys + values) from
   batch 1 x 4k to batch 64 x 32k, next to dense baselines over the same slots: SGLang's Triton
   decode kernel, FlashInfer's paged decode (each when importable) and torch SDPA over a
   contiguous copy of the KV. Reports the median time, the bytes each kernel must read, the
   achieved bandwidth, its share of a device-to-device copy's bandwidth measured in the same run,
   and the speed-up over each baseline.
3. Times compress-on-write against the extend attention of the same layer (1 x 8k prefill, and
   8k new tokens over an 8k compressed prefix; SGLang's dense extend kernel alongside).

Prints markdown tables and writes them to ``--out`` (default ``$OUT/bench_kernels.md`` when
``$OUT`` is set). Needs torch + triton; sglang and flashinfer are optional baselines.

    python benchmarks/bench_kernels.py [--out PATH] [--shapes 1x4096,64x32768] [--fragment 64]
    python benchmarks/bench_kernels.py --dry-run   # CPU smoke test: Triton interpreter, tiny shapes

``--dry-run`` exercises the script's plumbing on a CPU through the Triton interpreter with tiny
shapes and wall-clock timings; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from collections.abc import Callable

import torch

NUM_QO_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128
DTYPE = torch.bfloat16
#: (batch, kv length) for decode timing.
DECODE_SHAPES = [(1, 4096), (1, 32768), (8, 8192), (16, 16384), (32, 8192), (64, 32768)]
#: (label, key ratio, value ratio); recovery "mean" (SparK's default, the most side data).
SPARK_CONFIGS = [
    ("K 0.5", 0.5, 0.0),
    ("K 0.8", 0.8, 0.0),
    ("K+V 0.5", 0.5, 0.5),
    ("K+V 0.8", 0.8, 0.8),
]
PREFILL_LEN = 8192
COPY_BYTES = 2 << 30
WINDOW_ROWS = 4
#: (key ratio, value ratio, recovery, prefix lengths, new-token lengths) checked per dtype.
CHECK_CASES = [
    (0.5, 0.0, "mean", [1, 100, 1000], [1, 63, 300]),
    (0.8, 0.8, "zero", [700, 31, 2], [129, 1, 5]),
    (0.5, 0.5, "mean", [0, 257, 64], [64, 2, 40]),
]
DRY_RUN_SHAPES = [(1, 40), (2, 24)]
DRY_RUN_CHECK_CASES = [(0.5, 0.5, "mean", [0, 33], [3, 17])]
DRY_RUN_PREFILL_LEN = 24


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_out = (
        os.path.join(os.environ["OUT"], "bench_kernels.md") if os.environ.get("OUT") else None
    )
    parser.add_argument(
        "--out", default=default_out, help="markdown file to write (default: $OUT/bench_kernels.md)"
    )
    parser.add_argument(
        "--shapes",
        type=parse_shapes,
        default=None,
        help="decode shapes as BxL,BxL,... (default: {})".format(
            ",".join(f"{b}x{n}" for b, n in DECODE_SHAPES)
        ),
    )
    parser.add_argument(
        "--fragment",
        type=int,
        default=64,
        help="slots are contiguous in runs of this many, runs shuffled (1: every slot random)",
    )
    parser.add_argument("--skip-checks", action="store_true", help="skip the correctness checks")
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU smoke test through the Triton interpreter"
    )
    args = parser.parse_args(argv)
    if args.shapes is None:
        args.shapes = DRY_RUN_SHAPES if args.dry_run else DECODE_SHAPES
    return args


def parse_shapes(text: str) -> list[tuple[int, int]]:
    try:
        shapes = [tuple(int(x) for x in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"shapes {text!r} must look like 1x4096,64x32768"
        ) from None
    if any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"shapes {text!r} must look like 1x4096,64x32768")
    return shapes


# ---------------------------------------------------------------------------------------------
# Timing and tables
# ---------------------------------------------------------------------------------------------


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

    return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Timing:
    kernel: str
    ms: float | None  # None: baseline unavailable
    bytes_read: int
    note: str = ""


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def fragmented_slots(num_tokens: int, fragment: int, gen: torch.Generator) -> torch.Tensor:
    """A permutation of ``num_tokens`` slots, contiguous in runs of ``fragment``."""
    runs = torch.randperm(-(-num_tokens // fragment), generator=gen)
    slots = (runs[:, None] * fragment + torch.arange(fragment)).flatten()
    return slots[slots < num_tokens]


def window_stats(num_heads: int, head_dim: int, device, gen: torch.Generator) -> torch.Tensor:
    """``[WINDOW_ROWS, 2, H, D]`` float32 from random window queries and values."""
    from spark_sglang.kernels import reference

    rows = []
    for _ in range(WINDOW_ROWS):
        queries = torch.randn(32, num_heads * NUM_QO_HEADS // NUM_KV_HEADS, head_dim, generator=gen)
        values = torch.randn(64, num_heads, head_dim, generator=gen)
        rows.append(
            torch.stack(
                [
                    reference.window_channel_norm(queries, num_heads),
                    reference.value_channel_bias(values),
                ]
            )
        )
    return torch.stack(rows).to(device)


def empty_cache(num_slots, num_heads, head_dim, dtype, key_ratio, value_ratio, recovery, device):
    """Uninitialised compact buffers of one layer (PackedKeys, PackedValues or dense values)."""
    from spark_sglang.kernels import reference

    words = head_dim // 32
    kept = head_dim - int(key_ratio * head_dim)
    mean = recovery == "mean"
    keys = reference.PackedKeys(
        torch.empty(num_slots, num_heads, kept, dtype=dtype, device=device),
        torch.empty(num_slots, num_heads, words, dtype=torch.int32, device=device),
        torch.empty(num_slots, num_heads, words, dtype=torch.int32, device=device)
        if mean
        else None,
        torch.empty(num_slots, num_heads, dtype=torch.float32, device=device) if mean else None,
    )
    if value_ratio:
        values = reference.PackedValues(
            torch.empty(
                num_slots,
                num_heads,
                head_dim - int(value_ratio * head_dim),
                dtype=dtype,
                device=device,
            ),
            torch.empty(num_slots, num_heads, words, dtype=torch.int32, device=device),
            torch.empty(num_slots, num_heads, dtype=torch.float32, device=device),
        )
    else:
        values = torch.empty(num_slots, num_heads, head_dim, dtype=dtype, device=device)
    return keys, values


def spark_bytes_per_token(key_ratio: float, value_ratio: float, dtype) -> int:
    """Compact bytes per token and layer (all KV heads), as the decode kernel reads them."""
    from spark_sglang.kernels.layout import ROW_ID_BYTES, SparKConfig

    layout = SparKConfig(key_ratio=key_ratio, value_ratio=value_ratio, recovery="mean").layout(
        HEAD_DIM, dtype
    )
    return (
        NUM_KV_HEADS * (layout.key_bytes_per_head() + layout.value_bytes_per_head()) + ROW_ID_BYTES
    )


def dense_bytes_per_token(dtype) -> int:
    return NUM_KV_HEADS * 2 * HEAD_DIM * torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------
# Optional baselines
# ---------------------------------------------------------------------------------------------


def sglang_decode(q, k_pool, v_pool, kv_indptr, kv_indices, seq_lens, sm_scale):
    """SGLang's dense Triton decode (its own split heuristic, default 8 max splits), or a reason."""
    try:
        from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd
        from sglang.kernels.ops.attention.metadata import get_num_kv_splits_triton
    except Exception as exc:  # any import failure only drops this baseline
        return None, f"sglang not importable ({type(exc).__name__}: {exc})"
    batch, num_heads, _ = q.shape
    max_splits = 8
    num_splits = torch.empty(batch, dtype=torch.int32, device=q.device)
    cores = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 8
    get_num_kv_splits_triton[(1,)](
        num_splits, seq_lens, batch, 1, num_heads, k_pool.shape[1], max_splits, cores,
        MAX_NUM_SEQ=max(256, 1 << (batch - 1).bit_length()),
    )  # fmt: skip
    logits = torch.empty(
        batch, num_heads, max_splits, v_pool.shape[-1], dtype=torch.float32, device=q.device
    )
    lse = torch.empty(batch, num_heads, max_splits, dtype=torch.float32, device=q.device)
    out = torch.empty(batch, num_heads, v_pool.shape[-1], dtype=q.dtype, device=q.device)

    def run():
        decode_attention_fwd(
            q,
            k_pool,
            v_pool,
            out,
            kv_indptr,
            kv_indices,
            logits,
            lse,
            num_splits,
            max_splits,
            sm_scale,
            1.0,
            1.0,
        )
        return out

    return run, ""


def flashinfer_decode(q, k_pool, v_pool, kv_indptr, kv_indices, sm_scale):
    """FlashInfer's paged decode (page size 1, NHD), or a reason."""
    try:
        import flashinfer
    except Exception as exc:
        return None, f"flashinfer not importable ({type(exc).__name__})"
    try:
        workspace = torch.empty(256 << 20, dtype=torch.uint8, device=q.device)
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            workspace, "NHD", use_tensor_cores=True
        )
        last_page_len = torch.ones(q.shape[0], dtype=torch.int32, device=q.device)
        plan_args = (
            kv_indptr,
            kv_indices.to(torch.int32),
            last_page_len,
            q.shape[1],
            k_pool.shape[1],
            k_pool.shape[2],
            1,
        )
        try:
            wrapper.plan(
                *plan_args, q_data_type=q.dtype, kv_data_type=k_pool.dtype, sm_scale=sm_scale
            )
        except TypeError:  # releases before q_data_type / kv_data_type
            wrapper.plan(*plan_args, data_type=k_pool.dtype, sm_scale=sm_scale)
        paged = (k_pool.unsqueeze(1), v_pool.unsqueeze(1))  # [pages, page_size=1, Hkv, D]
        wrapper.run(q, paged)
    except Exception as exc:
        return None, f"flashinfer failed ({type(exc).__name__}: {exc})"
    return lambda: wrapper.run(q, paged), ""


def torch_sdpa_decode(q, k_pool, v_pool, kv_indices, batch, kv_len, sm_scale):
    """SDPA over a contiguous ``[B, Hkv, L, D]`` copy of the KV (gathered once, untimed): the
    group's query heads ride along the query axis, so no KV head is repeated."""
    import torch.nn.functional as F

    group = q.shape[1] // k_pool.shape[1]
    k = k_pool[kv_indices].view(batch, kv_len, k_pool.shape[1], -1).transpose(1, 2).contiguous()
    v = v_pool[kv_indices].view(batch, kv_len, v_pool.shape[1], -1).transpose(1, 2).contiguous()
    qg = q.view(batch, k_pool.shape[1], group, -1)
    return lambda: F.scaled_dot_product_attention(qg, k, v, scale=sm_scale)


def sglang_extend(q, k, v, k_pool, v_pool, qo_indptr, kv_indptr, kv_indices, max_len, sm_scale):
    try:
        from sglang.kernels.ops.attention.extend_attention import extend_attention_fwd
    except Exception as exc:
        return None, f"sglang not importable ({type(exc).__name__})"
    out = torch.empty_like(q)

    def run():
        extend_attention_fwd(
            q, k, v, out, k_pool, v_pool, qo_indptr, kv_indptr, kv_indices,
            None, True, None, max_len, 1.0, 1.0, sm_scale=sm_scale,
        )  # fmt: skip
        return out

    return run, ""


# ---------------------------------------------------------------------------------------------
# 1. Correctness of the compiled kernels
# ---------------------------------------------------------------------------------------------


def check_kernels(device, dtypes, cases) -> list[list[str]]:
    from spark_sglang.kernels import compress, decode, extend, reference

    gen = torch.Generator().manual_seed(0)
    tolerance = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float32: 1e-5}
    results = []

    def record(name, dtype, shape, ok, detail):
        results.append([name, str(dtype)[6:], shape, "PASS" if ok else "FAIL", detail])
        print(
            f"  {'PASS' if ok else 'FAIL'}  {name:<8} {str(dtype)[6:]:<9} {shape}  {detail}",
            flush=True,
        )

    def max_error(got, expect, tol):
        err = ((got.float() - expect.float()).abs() / (expect.float().abs() + 1)).max().item()
        return err <= tol and not got.isnan().any(), f"max err {err:.2e} (tol {tol:.0e})"

    for dtype in dtypes:
        tol = tolerance[dtype]
        for key_ratio, value_ratio, recovery, lens, new_lens in cases:
            config = f"k{key_ratio}/v{value_ratio}/{recovery}"
            num_tokens = sum(lens) + sum(new_lens)
            slots = torch.randperm(num_tokens + 37, generator=gen)[:num_tokens]
            stats = window_stats(NUM_KV_HEADS, HEAD_DIM, device, gen)
            rows = torch.randint(0, WINDOW_ROWS, (num_tokens,), generator=gen, dtype=torch.int32)
            k = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype).to(device)
            v = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen).to(dtype).to(device)
            keys, values = empty_cache(
                num_tokens + 37,
                NUM_KV_HEADS,
                HEAD_DIM,
                dtype,
                key_ratio,
                value_ratio,
                recovery,
                device,
            )
            slot_rows = torch.zeros(num_tokens + 37, dtype=torch.int32, device=device)
            slot_rows[slots.to(device)] = rows.to(device)
            compress.compress_and_store(
                k, v, slots.to(device), rows.to(device), stats, keys, values
            )

            at = slots.to(device)
            norm = stats[rows.to(device).long(), 0]
            pk = reference.pack_keys(k, norm, key_ratio, recovery)
            ok = torch.equal(keys.kept[at], pk.kept) and torch.equal(keys.mask[at], pk.mask)
            if recovery == "mean":
                ok = ok and torch.equal(keys.sign[at], pk.sign)
                ok = ok and torch.allclose(keys.fill[at], pk.fill, rtol=2e-6, atol=0)
            if value_ratio:
                pv = reference.pack_values(v, stats[rows.to(device).long(), 1], value_ratio)
                ok = (
                    ok
                    and torch.equal(values.kept[at], pv.kept)
                    and torch.equal(values.mask[at], pv.mask)
                )
                ok = ok and torch.allclose(values.fill[at], pv.fill, rtol=1e-6, atol=1e-6)
            else:
                ok = ok and torch.equal(values[at], v)
            record(
                "compress",
                dtype,
                f"{num_tokens} tok {config}",
                ok,
                "bit-equal" if ok else "mismatch",
            )

            dense_k = reference.unpack_keys(pk, norm)
            dense_v = reference.unpack_values(pv) if value_ratio else v
            sm_scale = 1 / math.sqrt(HEAD_DIM)

            # Decode: request b attends to its first lens[b] tokens.
            offsets = [0]
            for n, m in zip(lens, new_lens):
                offsets.append(offsets[-1] + n + m)
            kv_indptr = torch.tensor([0] + lens, device=device).cumsum(0).to(torch.int32)
            kv_pos = torch.cat([torch.arange(o, o + n) for o, n in zip(offsets, lens)]).to(device)
            q = torch.randn(len(lens), NUM_QO_HEADS, HEAD_DIM, generator=gen).to(dtype).to(device)
            wrapper = decode.SparKDecodeWrapper(NUM_QO_HEADS, NUM_KV_HEADS, HEAD_DIM, device=device)
            wrapper.plan(kv_indptr, at[kv_pos], seq_lens_cpu=torch.tensor(lens))
            out, lse = wrapper.run(q, keys, values, stats, slot_rows, sm_scale=sm_scale)
            errors = []
            for b, n in enumerate(lens):
                if n:
                    pos = kv_pos[kv_indptr[b] : kv_indptr[b + 1]]
                    expect, _ = reference.attention(
                        q[b : b + 1], dense_k[pos], dense_v[pos], sm_scale
                    )
                    errors.append(max_error(out[b : b + 1], expect, tol))
            ok = all(e[0] for e in errors)
            record("decode", dtype, f"lens {lens} {config}", ok, errors[-1][1])

            # Extend: request b's next new_lens[b] tokens over its first lens[b] (compressed).
            new_pos = torch.cat(
                [torch.arange(o + n, o + n + m) for o, n, m in zip(offsets, lens, new_lens)]
            ).to(device)
            qo_indptr = torch.tensor([0] + new_lens, device=device).cumsum(0).to(torch.int32)
            qe = (
                torch.randn(len(new_pos), NUM_QO_HEADS, HEAD_DIM, generator=gen)
                .to(dtype)
                .to(device)
            )
            out, _ = extend.extend_attention(
                qe, k[new_pos], v[new_pos], qo_indptr, kv_indptr, at[kv_pos],
                keys, values, stats, slot_rows, max_q_len=max(new_lens), sm_scale=sm_scale,
            )  # fmt: skip
            errors = []
            for b in range(len(lens)):
                pre = kv_pos[kv_indptr[b] : kv_indptr[b + 1]]
                new = new_pos[qo_indptr[b] : qo_indptr[b + 1]]
                rows_b = slice(int(qo_indptr[b]), int(qo_indptr[b + 1]))
                expect, _ = reference.attention(
                    qe[rows_b], torch.cat([dense_k[pre], k[new]]),
                    torch.cat([dense_v[pre], v[new]]), sm_scale, causal_offset=len(pre),
                )  # fmt: skip
                errors.append(max_error(out[rows_b], expect, tol))
            ok = all(e[0] for e in errors)
            record("extend", dtype, f"prefix {lens} new {new_lens} {config}", ok, errors[-1][1])
    return results


# ---------------------------------------------------------------------------------------------
# 2. Decode timing
# ---------------------------------------------------------------------------------------------


def copy_bandwidth(device, timer, num_bytes) -> float:
    """Bytes/s of a large device-to-device copy, counting its read and its write."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * num_bytes / (ms * 1e-3)


def time_spark_decode(wrapper, q, k_pool, v_pool, stats, rows, key_ratio, value_ratio, timer):
    """Compress the dense pool into a compact one (slot for slot) and time the planned decode."""
    from spark_sglang.kernels import compress

    num_tokens = k_pool.shape[0]
    keys, values = empty_cache(
        num_tokens, NUM_KV_HEADS, HEAD_DIM, DTYPE, key_ratio, value_ratio, "mean", q.device
    )
    compress.compress_and_store(
        k_pool, v_pool, torch.arange(num_tokens, device=q.device), rows, stats, keys, values
    )
    out = torch.empty(q.shape[0], NUM_QO_HEADS, HEAD_DIM, dtype=DTYPE, device=q.device)
    lse = torch.empty(q.shape[0], NUM_QO_HEADS, dtype=torch.float32, device=q.device)
    sm_scale = 1 / math.sqrt(HEAD_DIM)
    return timer(
        lambda: wrapper.run(q, keys, values, stats, rows, sm_scale=sm_scale, out=out, lse=lse)
    )


def bench_decode_shape(batch, kv_len, device, timer, fragment, gen) -> list[Timing]:
    from spark_sglang.kernels import decode

    num_tokens = batch * kv_len
    sm_scale = 1 / math.sqrt(HEAD_DIM)
    slots = fragmented_slots(num_tokens, fragment, gen).to(device)
    kv_indptr = torch.arange(0, num_tokens + 1, kv_len, dtype=torch.int32, device=device)
    seq_lens = torch.full((batch,), kv_len, dtype=torch.int32, device=device)
    q = torch.randn(batch, NUM_QO_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    # The dense pool: slot s holds token position s; requests read it through `slots`.
    k_pool = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    v_pool = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, device=device, dtype=DTYPE)

    dense_bytes = num_tokens * dense_bytes_per_token(DTYPE)
    timings = []
    run, why = sglang_decode(q, k_pool, v_pool, kv_indptr, slots, seq_lens, sm_scale)
    ms = timer(run) if run else None
    timings.append(Timing("SGLang triton (dense)", ms, dense_bytes + 8 * num_tokens, why))
    run, why = flashinfer_decode(q, k_pool, v_pool, kv_indptr, slots, sm_scale)
    ms = timer(run) if run else None
    timings.append(Timing("FlashInfer (dense)", ms, dense_bytes + 4 * num_tokens, why))
    run = torch_sdpa_decode(q, k_pool, v_pool, slots, batch, kv_len, sm_scale)
    timings.append(Timing("torch SDPA (dense, contiguous)", timer(run), dense_bytes))
    del run  # frees the contiguous copy

    stats = window_stats(NUM_KV_HEADS, HEAD_DIM, device, gen)
    rows = torch.randint(0, WINDOW_ROWS, (num_tokens,), generator=gen, dtype=torch.int32)
    wrapper = decode.SparKDecodeWrapper(NUM_QO_HEADS, NUM_KV_HEADS, HEAD_DIM, device=device)
    wrapper.plan(kv_indptr, slots, seq_lens_cpu=torch.full((batch,), kv_len))
    for label, key_ratio, value_ratio in SPARK_CONFIGS:
        ms = time_spark_decode(
            wrapper, q, k_pool, v_pool, stats, rows.to(device), key_ratio, value_ratio, timer
        )
        spark_bytes = num_tokens * (spark_bytes_per_token(key_ratio, value_ratio, DTYPE) + 8)
        timings.append(Timing(f"SparK {label}", ms, spark_bytes))
    return timings


def decode_rows(batch, kv_len, timings: list[Timing], copy_bw: float) -> list[list[str]]:
    baselines = [t for t in timings if not t.kernel.startswith("SparK")]
    rows = []
    for t in timings:
        if t.ms is None:
            rows.append([f"{batch}x{kv_len}", t.kernel, "n/a", "", "", "", "", "", "", t.note])
            continue
        bandwidth = t.bytes_read / (t.ms * 1e-3)
        speedups = [f"{b.ms / t.ms:.2f}x" if b.ms else "n/a" for b in baselines]
        rows.append(
            [
                f"{batch}x{kv_len}",
                t.kernel,
                f"{t.ms * 1e3:.1f}",
                f"{t.bytes_read / 1e6:.1f}",
                f"{bandwidth / 1e9:.0f}",
                f"{100 * bandwidth / copy_bw:.0f}%",
                *speedups,
                t.note,
            ]
        )
    return rows


# ---------------------------------------------------------------------------------------------
# 3. Compress-on-write vs extend attention (one layer)
# ---------------------------------------------------------------------------------------------


def time_spark_prefill(
    q, k, v, stats, key_ratio, value_ratio, timer
) -> list[tuple[str, float, float]]:
    """(prefix, compress ms, extend ms) of one layer: the new tokens are stored compressed after
    an equally long prefix, and attend to no prefix, then to that compressed prefix."""
    from spark_sglang.kernels import compress, extend

    num_new, device = q.shape[0], q.device
    keys, values = empty_cache(
        2 * num_new, NUM_KV_HEADS, HEAD_DIM, DTYPE, key_ratio, value_ratio, "mean", device
    )
    rows = torch.zeros(2 * num_new, dtype=torch.int32, device=device)
    prefix_slots = torch.arange(num_new, device=device)
    new_slots = prefix_slots + num_new
    compress.compress_and_store(k, v, prefix_slots, rows[:num_new], stats, keys, values)
    ms_compress = timer(
        lambda: compress.compress_and_store(k, v, new_slots, rows[:num_new], stats, keys, values)
    )
    qo_indptr = torch.tensor([0, num_new], dtype=torch.int32, device=device)
    cache = (keys, values, stats, rows)
    results = []
    for prefix, prefix_len in (("none", 0), (f"{num_new} compressed", num_new)):
        prefix_indptr = torch.tensor([0, prefix_len], dtype=torch.int32, device=device)

        def run(prefix_indptr=prefix_indptr):
            return extend.extend_attention(
                q, k, v, qo_indptr, prefix_indptr, prefix_slots, *cache, max_q_len=num_new
            )

        results.append((prefix, ms_compress, timer(run)))
    return results


def bench_prefill(device, timer, num_new, gen) -> list[list[str]]:
    sm_scale = 1 / math.sqrt(HEAD_DIM)
    q = torch.randn(num_new, NUM_QO_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    k = torch.randn(num_new, NUM_KV_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    v = torch.randn(num_new, NUM_KV_HEADS, HEAD_DIM, device=device, dtype=DTYPE)
    stats = window_stats(NUM_KV_HEADS, HEAD_DIM, device, gen)
    shape = f"1x{num_new}"
    rows = []
    for label, key_ratio, value_ratio in (SPARK_CONFIGS[0], SPARK_CONFIGS[2]):
        for prefix, ms_compress, ms_extend in time_spark_prefill(
            q, k, v, stats, key_ratio, value_ratio, timer
        ):
            ratio = f"{100 * ms_compress / ms_extend:.1f}%"
            us = f"{ms_compress * 1e3:.1f}", f"{ms_extend * 1e3:.1f}"
            rows.append([shape, prefix, f"SparK {label}", *us, ratio, ""])

    # SGLang's dense extend over the same tokens: slot s < num_new holds prefix token s.
    k_pool, v_pool = torch.cat([k, k]), torch.cat([v, v])
    qo_indptr = torch.tensor([0, num_new], dtype=torch.int32, device=device)
    prefix_slots = torch.arange(num_new, device=device)
    for prefix, prefix_len in (("none", 0), (f"{num_new} dense", num_new)):
        prefix_indptr = torch.tensor([0, prefix_len], dtype=torch.int32, device=device)
        run, why = sglang_extend(
            q, k, v, k_pool, v_pool, qo_indptr, prefix_indptr, prefix_slots, num_new, sm_scale
        )
        ms = f"{timer(run) * 1e3:.1f}" if run else "n/a"
        rows.append([shape, prefix, "SGLang triton extend (dense)", "", ms, "", why])
    return rows


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any @triton.jit module is imported
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print(
            "bench_kernels.py needs a CUDA GPU (none is visible here). "
            "Use --dry-run for a CPU smoke test of the script itself.",
            file=sys.stderr,
        )
        return 2
    else:
        device = torch.device("cuda")
    timer = make_timer(args.dry_run)
    gen = torch.Generator().manual_seed(1234)
    sections = []
    name = (
        "CPU dry run (Triton interpreter; timings meaningless)"
        if args.dry_run
        else torch.cuda.get_device_name()
    )
    import triton

    sections.append(
        f"# SparK kernel benchmark\n\ndevice: {name}; torch {torch.__version__}, "
        f"triton {triton.__version__}; Llama-3.1-8B geometry: {NUM_QO_HEADS} q heads, "
        f"{NUM_KV_HEADS} KV heads, head dim {HEAD_DIM}, {str(DTYPE)[6:]}; 'mean' recovery; "
        f"slots contiguous in runs of {args.fragment}."
    )

    if not args.skip_checks:
        print("== correctness of the compiled kernels vs kernels/reference.py", flush=True)
        dtypes = [torch.float32] if args.dry_run else [torch.bfloat16, torch.float16]
        checks = check_kernels(device, dtypes, DRY_RUN_CHECK_CASES if args.dry_run else CHECK_CASES)
        sections.append(
            "## Correctness (compiled kernels vs reference)\n\n"
            + markdown_table(["kernel", "dtype", "shape", "result", "detail"], checks)
        )

    copy_bytes = (1 << 20) if args.dry_run else COPY_BYTES
    copy_bw = copy_bandwidth(device, timer, copy_bytes)
    print(f"== device-to-device copy: {copy_bw / 1e9:.0f} GB/s", flush=True)

    print("== decode", flush=True)
    header = [
        "batch x len", "kernel", "median us", "MB read", "GB/s", "% of copy",
        "vs SGLang", "vs FlashInfer", "vs SDPA", "note",
    ]  # fmt: skip
    rows = []
    for batch, kv_len in args.shapes:
        timings = bench_decode_shape(batch, kv_len, device, timer, args.fragment, gen)
        shape_rows = decode_rows(batch, kv_len, timings, copy_bw)
        for row in shape_rows:
            print("  " + " | ".join(row[:9]), flush=True)
        rows += shape_rows
        if device.type == "cuda":
            torch.cuda.empty_cache()
    sections.append(
        f"## Decode\n\nCopy bandwidth (read + write of a {copy_bytes >> 20} MiB "
        f"device-to-device copy): {copy_bw / 1e9:.0f} GB/s. Bytes read: the KV each kernel must "
        "read (compact or dense, side data and slot ids included). Speed-up columns: baseline "
        "time / this kernel's time.\n\n" + markdown_table(header, rows)
    )

    print("== compress-on-write vs extend attention (one layer)", flush=True)
    prefill = bench_prefill(
        device, timer, DRY_RUN_PREFILL_LEN if args.dry_run else PREFILL_LEN, gen
    )
    for row in prefill:
        print("  " + " | ".join(row), flush=True)
    sections.append(
        "## Prefill: compress-on-write vs extend attention (one layer)\n\n"
        + markdown_table(
            [
                "batch x new",
                "prefix",
                "kernel",
                "compress us",
                "extend us",
                "compress / extend",
                "note",
            ],
            prefill,
        )
    )

    report = "\n\n".join(sections) + "\n"
    print("\n" + report)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(report)
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
