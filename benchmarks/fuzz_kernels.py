"""Kernel fuzz: seeded random cases of compress -> decode / extend against the reference.

Each case draws a geometry (head dim, KV heads, GQA group), a cache dtype (fp32, fp16, bf16,
FP8 e4m3/e5m2 with a random scale), key / value ratios, the recovery, a page size, a ragged batch
(some requests empty), window rows, split settings (Triton), and then:

1. writes the batch's keys and values into the pool's records with ``compress_and_store``
   (records start poisoned with 0xFF bytes) and checks every written part against
   ``reference.pack_keys`` / ``pack_values`` (fills to one bfloat16 step for Triton);
2. decodes one query per request over its slots and extends a few new tokens per request over
   them, checking outputs and log-sum-exps against ``reference.attention`` over the unpacked cache;
3. corrupts the metadata of one slot (a bitmap with too many bits set, or a window-row id past
   the table) and decodes again: the PyTorch path reads the bitmap as all-pruned (finite, only
   its own request moves) and refuses the row id (an exception), never reading outside its
   tensors; the Triton kernels must stay finite on every request that does not read that slot.

The CPU paths run every case, alternating between the PyTorch path and the C++ extension
(kernels/cpp_path.py); the Triton kernels (``--triton N``) a sample, in the interpreter on a CPU. Prints a summary table; exits non-zero on the first failure with the case's seed.

    python benchmarks/fuzz_kernels.py [--cases 2000] [--triton 50] [--seed 0]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from collections import Counter

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from spark_sglang.kernels import cpp_path, layout, reference, torch_path  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]
#: (output, LSE) absolute tolerances by the dtype tiles are rebuilt in.
TOLERANCE = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 1e-4), torch.bfloat16: (1.6e-2, 2e-4)}


class Case:
    """One random draw; ``impl`` ("torch", "cpp" or "triton") is the implementation under test."""

    def __init__(self, seed: int, impl: str):
        rng = random.Random(seed)
        self.seed, self.impl, self.triton = seed, impl, impl == "triton"
        self.head_dim = rng.choice(layout.SUPPORTED_HEAD_DIMS)
        self.kv_heads, self.group = rng.choice([1, 2, 3]), rng.choice([1, 2, 3, 4, 8])
        # The interpreter computes bf16 arithmetic wrongly: Triton cases use fp32/fp16/FP8 tiles.
        dtypes = DTYPES if not self.triton or DEVICE == "cuda" else [torch.float32, torch.float16, torch.float8_e4m3fn]
        self.dtype = rng.choice(dtypes)
        self.scale = rng.choice([0.5, 1.0, 2.0]) if self.dtype in layout.FP8_DTYPES else 1.0
        self.config = reference.SparKConfig(
            key_ratio=rng.choice([0.0, 0.3, 0.5, 0.8, rng.uniform(0, 0.97)]),
            value_ratio=rng.choice([0.0, 0.0, 0.5, rng.uniform(0, 0.97)]),
            recovery=rng.choice(["mean", "mean", "zero"]),
        )
        self.page_size = rng.choice([1, 1, 4, 16])
        self.lens = [rng.choice([0, 1, rng.randint(1, 40), rng.randint(40, 200)]) for _ in range(rng.randint(1, 5))]
        self.new_lens = [rng.randint(1, 12) for _ in self.lens]
        self.num_rows = rng.randint(1, 4)
        self.block_n = rng.choice([16, 32])
        self.num_sms = rng.choice([1, 4, 16])
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def model_dtype(self) -> torch.dtype:
        """Queries, new keys/values and rebuilt tiles: the cache dtype, float32 for FP8."""
        return torch.float32 if self.dtype in layout.FP8_DTYPES else self.dtype

    def describe(self) -> str:
        c = self.config
        return (f"seed {self.seed} {self.impl} D{self.head_dim} Hkv{self.kv_heads} "
                f"G{self.group} {str(self.dtype)[6:]} k{c.key_ratio:.3f} v{c.value_ratio:.3f} {c.recovery} "
                f"page{self.page_size} lens{self.lens}")  # fmt: skip


def randn(case: Case, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=case.generator)


def paged_slots(case: Case, lens: list[int]) -> tuple[torch.Tensor, list[torch.Tensor], int]:
    """Each request's slots in randomly placed pages; (all slots, per request, slots in the pool)."""
    page = case.page_size
    pages = [-(-n // page) for n in lens]
    order = torch.randperm(sum(pages) + 2, generator=case.generator)
    per_request, used = [], 0
    for n, p in zip(lens, pages):
        chosen = order[used : used + p]
        used += p
        per_request.append((chosen[:, None] * page + torch.arange(page)).flatten()[:n])
    return torch.cat(per_request) if per_request else torch.zeros(0, dtype=torch.long), per_request, (sum(pages) + 2) * page


def empty_cache(lay: layout.SlotLayout, num_slots: int, heads: int):
    """The pool's storage for one layer, poisoned with 0xFF bytes, and its typed views."""
    def raw(nbytes):
        return torch.full((num_slots, heads, nbytes), 0xFF, dtype=torch.uint8, device=DEVICE)

    keys = reference.PackedKeys(*layout.key_views(lay, raw(lay.key_record_bytes)))
    if lay.values_compressed:
        values = reference.PackedValues(*layout.value_views(lay, raw(lay.value_record_bytes)))
    else:
        values = raw(lay.head_dim * lay.esize).view(lay.dtype)
    return keys, values


def ops(case: Case):
    if case.triton:
        from spark_sglang.kernels import compress, decode, extend

        return compress.compress_and_store, decode.SparKDecodeWrapper, extend.extend_attention
    if case.impl == "cpp":
        return cpp_path.compress_and_store, cpp_path.CppDecodeWrapper, cpp_path.extend_attention
    return torch_path.compress_and_store, torch_path.TorchDecodeWrapper, torch_path.extend_attention


def check_packed(case: Case, stored, expected) -> None:
    for name, got, want in zip(expected._fields, stored, expected):
        if want is None:
            continue
        got = got.cpu()
        if name == "fill":
            tolerance = 2**-7 if case.triton else 0.0  # Triton sums the fill in another order
            torch.testing.assert_close(got.float(), want.float(), rtol=tolerance, atol=0)
        elif got.is_floating_point():
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), name
        else:
            assert torch.equal(got, want), name


def assert_close(case: Case, out, lse, expect_out, expect_lse) -> None:
    atol, lse_atol = TOLERANCE[case.model_dtype]
    assert torch.isfinite(out).all() and not lse.isnan().any()
    torch.testing.assert_close(out.float().cpu(), expect_out, rtol=atol, atol=atol)
    torch.testing.assert_close(lse.cpu(), expect_lse, rtol=0, atol=lse_atol)


def run(case: Case) -> Counter:
    """Run one case; returns what was checked (raises on a mismatch)."""
    compress_and_store, decode_wrapper, extend_attention = ops(case)
    config, d, hkv, hq = case.config, case.head_dim, case.kv_heads, case.kv_heads * case.group
    lay = config.layout(d, case.dtype)
    all_slots, per_request, num_slots = paged_slots(case, case.lens)
    n = len(all_slots)
    k, v = randn(case, n, hkv, d).to(case.model_dtype), randn(case, n, hkv, d).to(case.model_dtype)
    stats = (torch.rand(case.num_rows, 2, hkv, d, generator=case.generator) + 0.05)
    stats[:, 0, :, :: 5] = 0  # window channels that never fired
    stats = stats.to(layout.STATS_DTYPE)
    rows = torch.randint(0, case.num_rows, (n,), generator=case.generator, dtype=torch.int32)
    slot_rows = torch.zeros(num_slots, dtype=torch.int32)
    slot_rows[all_slots] = rows
    kernel_stats = (stats if lay.values_compressed else stats[:, :1]).to(DEVICE)
    keys, values = empty_cache(lay, num_slots, hkv)
    compress_and_store(k.to(DEVICE), v.to(DEVICE), all_slots.to(DEVICE), rows.to(DEVICE), kernel_stats, keys,
                       values, k_scale=case.scale, v_scale=case.scale)  # fmt: skip

    norm = stats[rows.long(), 0]
    expect_k = reference.pack_keys(k, norm, config.key_ratio, config.recovery, dtype=case.dtype, scale=case.scale)
    check_packed(case, reference.PackedKeys(*(None if t is None else t[all_slots] for t in keys)), expect_k)
    dense_k = reference.unpack_keys(expect_k, norm, scale=case.scale)
    if lay.values_compressed:
        expect_v = reference.pack_values(v, stats[rows.long(), 1], config.value_ratio, dtype=case.dtype,
                                         scale=case.scale)  # fmt: skip
        check_packed(case, reference.PackedValues(*(t[all_slots] for t in values)), expect_v)
        dense_v = reference.unpack_values(expect_v, scale=case.scale)
    else:
        stored = reference.to_storage(v, case.dtype, case.scale)
        assert torch.equal(values[all_slots.to(DEVICE)].cpu().view(torch.uint8), stored.view(torch.uint8))
        dense_v = reference.from_storage(stored, case.scale).to(reference.output_dtype(case.dtype))
    position = {int(s): i for i, s in enumerate(all_slots)}
    cache = (keys, values, kernel_stats, slot_rows.to(DEVICE))

    indptr = torch.tensor([0] + case.lens).cumsum(0).to(torch.int32)
    indices = all_slots.to(torch.int64)
    sm_scale = 1.0 / math.sqrt(d)
    q = randn(case, len(case.lens), hq, d).to(case.model_dtype)
    wrapper = decode_wrapper(hq, hkv, d, device=DEVICE, **({"block_n": case.block_n, "num_sms": case.num_sms}
                                                           if case.triton else {}))  # fmt: skip
    wrapper.plan(indptr.to(DEVICE), indices.to(DEVICE))
    out, lse = wrapper.run(q.to(DEVICE), *cache, sm_scale=sm_scale, k_scale=case.scale, v_scale=case.scale)
    for b, slots in enumerate(per_request):
        if len(slots) == 0:
            assert (out[b] == 0).all() and (lse[b] == float("-inf")).all()
            continue
        at = [position[int(s)] for s in slots]
        expect = reference.attention(q[b : b + 1], dense_k[at], dense_v[at], sm_scale)
        assert_close(case, out[b : b + 1], lse[b : b + 1], *expect)

    qo_indptr = torch.tensor([0] + case.new_lens).cumsum(0).to(torch.int32)
    m = sum(case.new_lens)
    qn = randn(case, m, hq, d).to(case.model_dtype)
    kn, vn = randn(case, m, hkv, d).to(case.model_dtype), randn(case, m, hkv, d).to(case.model_dtype)
    out, lse = extend_attention(qn.to(DEVICE), kn.to(DEVICE), vn.to(DEVICE), qo_indptr.to(DEVICE), indptr.to(DEVICE),
                                indices.to(DEVICE), *cache, max_q_len=max(case.new_lens), sm_scale=sm_scale,
                                k_scale=case.scale, v_scale=case.scale)  # fmt: skip
    for b, slots in enumerate(per_request):
        rows_b = slice(int(qo_indptr[b]), int(qo_indptr[b + 1]))
        at = [position[int(s)] for s in slots]
        expect = reference.attention(qn[rows_b], torch.cat([dense_k[at], kn[rows_b].to(dense_k.dtype)]),
                                     torch.cat([dense_v[at], vn[rows_b].to(dense_v.dtype)]), sm_scale,
                                     causal_offset=len(slots))  # fmt: skip
        assert_close(case, out[rows_b], lse[rows_b], *expect)
    checked = Counter(compress=1, decode=1, extend=1)
    if n and lay.key_pruned and not case.triton:
        checked.update(corrupt(case, wrapper, q, cache, all_slots))
    return checked


def corrupt(case: Case, wrapper, q, cache, all_slots) -> Counter:
    """Corrupt one slot's metadata: the CPU paths must not read outside their tensors. A bitmap
    with too many bits reads as all-pruned (finite, only its own request moves); a window-row id
    past the table raises."""
    keys, values, stats, slot_rows = cache
    victim = int(all_slots[0])
    saved_mask, saved_row = keys.mask[victim].clone(), slot_rows[victim].clone()
    results = Counter()
    try:
        clean = wrapper.run(q.to(DEVICE), *cache, k_scale=case.scale, v_scale=case.scale)[0].clone()
        keys.mask[victim] = -1  # every channel "kept": more bits than kept entries
        out = wrapper.run(q.to(DEVICE), *cache, k_scale=case.scale, v_scale=case.scale)[0]
        if not torch.isfinite(out).all():
            raise AssertionError("a bitmap with too many bits set gave a non-finite output")
        if int((out != clean).flatten(1).any(1).sum()) > 1:
            raise AssertionError("a bitmap with too many bits set changed another request's output")
        results["corrupt bitmap read as all-pruned"] += 1
        keys.mask[victim] = saved_mask
        if keys.sign is not None:
            slot_rows[victim] = stats.shape[0] + 7  # a window row past the table
            try:
                wrapper.run(q.to(DEVICE), *cache, k_scale=case.scale, v_scale=case.scale)
                raise AssertionError("a window-row id past the table was read without an error")
            except (IndexError, RuntimeError):
                results["row id out of range refused"] += 1
    finally:
        keys.mask[victim], slot_rows[victim] = saved_mask, saved_row
    return results


def fuzz(cases: int, triton: int, seed: int) -> Counter:
    """``cases`` CPU-path cases (PyTorch and C++ in turn) and ``triton`` Triton cases; raises with the
    seed on a failure."""
    totals = Counter()
    plan = [(seed + i, ("torch", "cpp")[i % 2]) for i in range(cases)]
    plan += [(seed + 10_000_000 + i, "triton") for i in range(triton)]
    for case_seed, impl in plan:
        case = Case(case_seed, impl)
        try:
            totals.update(run(case))
        except Exception as error:
            raise AssertionError(f"fuzz case failed: {case.describe()}: {error}") from error
        totals[f"{impl} cases"] += 1
    return totals


def main(argv=None) -> Counter:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=2000, help="CPU-path cases (PyTorch and C++ in turn)")
    parser.add_argument("--triton", type=int, default=50, help="Triton cases (interpreter on a CPU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if DEVICE == "cpu":
        from spark_sglang.kernels import interpreter

        interpreter.install()
    start = time.perf_counter()
    totals = fuzz(args.cases, args.triton, args.seed)
    print(f"| check | count |\n|---|---:|")
    for name, count in sorted(totals.items()):
        print(f"| {name} | {count} |")
    print(f"\nall passed in {time.perf_counter() - start:.0f} s (seed {args.seed}, device {DEVICE})")
    return totals


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
