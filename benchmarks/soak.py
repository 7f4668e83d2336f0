"""Soak: thousands of mixed requests through ``sglang.Engine``, SparK beside dense on one byte budget.

Both servers get the same KV-cache bytes (dense ``torch_native`` gets ``--budget-tokens`` slots,
SparK the slots those bytes buy at its bytes per token), a small chunked-prefill size and a
bounded number of running requests, and then the same seeded stream of requests, ``--concurrency``
in flight at a time:

* ``system``: one of a few shared system prompts plus a short question (radix hits on the prefix);
* ``turn``: the next turn of one of a few growing conversations (each prompt extends the last);
* ``random``: a random span of licence text (no sharing);
* ``burst``: 8 identical prompts at once (dense gives them one answer; SparK may not, see docs/soak.md);
* ``abort``: a long request aborted after a moment (the waiting queue, a running decode or a
  chunked prefill);
* ``long``: a long generation, so decodes outgrow the pool and SGLang retracts or evicts.

It prints one table: requests served and aborted, prompt / cached / generated tokens, the cached
share, throughput, and, after ``flush_cache``, what came back: free slots vs pool slots, live and
borrowed window rows (SparK), NaN/inf log-probs, distinct answers within bursts. SGLang's own idle
invariant checker runs all along (a leaked slot stops the server).

    python benchmarks/soak.py                          # 2000 requests, SmolLM2 on CPU (about an hour on 2 cores)
    python benchmarks/soak.py --requests 120 --quick   # the CI-sized version
    python benchmarks/soak.py --quick --reproducible   # SparK with --spark-reproducible
    python benchmarks/soak.py --quick --deterministic  # SparK with --enable-deterministic-inference
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from spark_sglang.texts import load_documents
from spark_sglang.kernels.layout import SparKConfig, bytes_per_token
from spark_sglang.pool import TOKENS_PER_WINDOW_ROW
from spark_sglang.smollm2 import smollm2_path

SYSTEM_PROMPTS = [
    "You are a helpful assistant who answers in one sentence.",
    "You are a careful librarian. Answer briefly and precisely.",
    "You are a friendly teacher explaining things to a child.",
]
QUESTIONS = [
    "What is the capital of France?", "Why is the sky blue?", "Name a fruit that is yellow.",
    "How many legs does a spider have?", "What do bees make?", "What is water made of?",
    "Give me a word that rhymes with cat.", "What is the opposite of hot?",
]  # fmt: skip
KINDS = {"system": 0.3, "turn": 0.25, "random": 0.2, "burst": 0.08, "abort": 0.1, "long": 0.07}
BURST = 8


@dataclass
class Stats:
    served: int = 0
    aborted: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    bad_logprobs: int = 0
    burst_answers: list = field(default_factory=list)  # distinct answers per burst
    burst_hits: list = field(default_factory=list)  # distinct cached-prefix lengths per burst
    kinds: Counter = field(default_factory=Counter)


class Workload:
    """A seeded stream of request batches (a batch is one prompt, or a burst of identical ones)."""

    def __init__(self, tokenizer, seed: int, conversations: int = 6):
        self.rng = random.Random(seed)
        self.tokenizer = tokenizer
        self.text = " ".join(doc.text for doc in load_documents())
        self.conversations = [[{"role": "system", "content": SYSTEM_PROMPTS[i % 3]}] for i in range(conversations)]

    def chat(self, messages) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def next(self) -> tuple[str, list[str], dict]:
        kind = self.rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        question = self.rng.choice(QUESTIONS)
        params = {"temperature": 0, "max_new_tokens": self.rng.randint(4, 16)}
        if kind == "system":
            prompts = [self.chat([{"role": "system", "content": self.rng.choice(SYSTEM_PROMPTS)},
                                  {"role": "user", "content": question}])]  # fmt: skip
        elif kind == "turn":
            conversation = self.rng.choice(self.conversations)
            if len(conversation) > 12:  # start over, keeping the system prompt
                del conversation[1:]
            conversation.append({"role": "user", "content": question})
            prompts = [self.chat(conversation)]
            conversation.append({"role": "assistant", "content": "I am not sure."})
        elif kind == "burst":
            prompts = [self.chat([{"role": "user", "content": question}])] * BURST
        else:
            start = self.rng.randrange(0, len(self.text) - 4000)
            length = self.rng.randint(200, 2500) if kind != "long" else 400
            prompts = [self.text[start : start + length]]
            if kind == "long":
                params["max_new_tokens"] = self.rng.randint(96, 192)
            if kind == "abort":
                params["max_new_tokens"] = 256
        return kind, prompts, params


async def run_batch(engine, kind, prompts, params, stats: Stats, rng: random.Random, counter: list[int]):
    rids = [f"soak-{counter[0]}-{i}" for i in range(len(prompts))]
    counter[0] += 1
    task = asyncio.ensure_future(engine.async_generate(prompt=prompts if len(prompts) > 1 else prompts[0],
                                                       sampling_params=params, rid=rids if len(rids) > 1 else rids[0],
                                                       return_logprob=True))  # fmt: skip
    if kind == "abort":
        await asyncio.sleep(rng.uniform(0.0, 1.5))
        for rid in rids:
            engine.tokenizer_manager.abort_request(rid)
    outputs = await task
    outputs = outputs if isinstance(outputs, list) else [outputs]
    stats.kinds[kind] += len(outputs)
    for out in outputs:
        meta = out["meta_info"]
        if meta.get("finish_reason", {}).get("type") == "abort":
            stats.aborted += 1
        else:
            stats.served += 1
        stats.prompt_tokens += meta.get("prompt_tokens", 0)  # absent when aborted while waiting
        stats.cached_tokens += meta.get("cached_tokens", 0)
        stats.generated_tokens += meta.get("completion_tokens", 0)
        stats.bad_logprobs += sum(1 for entry in meta.get("output_token_logprobs", [])
                                  if entry[0] is not None and not math.isfinite(entry[0]))  # fmt: skip
    if kind == "burst":
        stats.burst_answers.append(len({tuple(out["output_ids"]) for out in outputs}))
        stats.burst_hits.append(len({out["meta_info"].get("cached_tokens", 0) for out in outputs}))


async def drive(engine, workload: Workload, requests: int, concurrency: int, seed: int) -> Stats:
    stats, rng, counter = Stats(), random.Random(seed + 1), [0]
    in_flight: set = set()
    issued = 0
    while issued < requests:
        kind, prompts, params = workload.next()
        in_flight.add(asyncio.ensure_future(run_batch(engine, kind, prompts, params, stats, rng, counter)))
        issued += len(prompts)
        if issued // 100 != (issued - len(prompts)) // 100:  # a progress line every 100 requests
            print(f"  {issued} requests issued, {stats.served} served, {stats.aborted} aborted",
                  file=sys.stderr, flush=True)
        if len(in_flight) >= concurrency:
            done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
    for task in asyncio.as_completed(in_flight):
        await task
    return stats


def budget_tokens(model_path: str, dense_tokens: int, config: SparKConfig) -> int:
    """SparK slots in the bytes of ``dense_tokens`` dense float32 slots."""
    import json

    with open(os.path.join(model_path, "config.json")) as f:
        hf = json.load(f)
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    sizes = bytes_per_token(config, head_dim, hf["num_key_value_heads"], hf["num_hidden_layers"], torch.float32,
                            tokens_per_window=TOKENS_PER_WINDOW_ROW)  # fmt: skip
    return int(dense_tokens * sizes["dense"] // sizes["spark_total"])


def soak(name: str, backend: str, tokens: int, args, options: dict) -> dict:
    import sglang as sgl
    from transformers import AutoTokenizer

    model_path = args.model_path
    # This run's SGLang counters (evictions, retractions), written by its processes into a fresh folder.
    outer_metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    metrics_dir = tempfile.mkdtemp(prefix="soak-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    engine = sgl.Engine(model_path=model_path, device="cpu", attention_backend=backend, dtype="float32",
                        disable_cuda_graph=True, max_total_tokens=tokens, mem_fraction_static=0.2,
                        chunked_prefill_size=args.chunked_prefill, max_running_requests=args.max_running,
                        random_seed=0, log_level="error", sleep_on_idle=True, enable_metrics=True, **options)  # fmt: skip
    try:
        workload = Workload(AutoTokenizer.from_pretrained(model_path), args.seed)
        start = time.perf_counter()
        stats = engine.loop.run_until_complete(drive(engine, workload, args.requests, args.concurrency, args.seed))
        seconds = time.perf_counter() - start
        assert engine.flush_cache().success, "flush_cache failed: requests still running after the soak"
        state = engine.get_server_info()["internal_states"][0]
        spark = state.get("spark") or {}
        capacity = state.get("memory_usage", {}).get("token_capacity") or tokens
    finally:
        engine.shutdown()
        forget_engine_metrics()
        counters = sglang_counters(metrics_dir)
        if outer_metrics_dir is None:  # later engines of this process start without metrics, as before
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]
        else:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = outer_metrics_dir
    return {"name": name, "stats": stats, "seconds": seconds, "spark": spark, "capacity": capacity,
            "counters": counters}


def forget_engine_metrics() -> None:
    """Drop the Engine's metrics from this process's Prometheus registry, so a second Engine in the
    same process can register its own (SGLang registers them once per process)."""
    from prometheus_client import REGISTRY

    for collector, names in list(REGISTRY._collector_to_names.items()):
        if any(name.startswith("sglang:") for name in names):
            REGISTRY.unregister(collector)


def sglang_counters(metrics_dir: str) -> dict[str, float]:
    """Totals of SGLang's Prometheus counters written by the run's processes."""
    from prometheus_client import CollectorRegistry, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=metrics_dir)
    totals: dict[str, float] = Counter()
    for metric in registry.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                totals[sample.name] += sample.value
    shutil.rmtree(metrics_dir, ignore_errors=True)
    return totals


def table(results: list[dict], args) -> str:
    rows = [
        ("pool slots (same bytes)", lambda r: r["capacity"]),
        ("requests served / aborted", lambda r: f"{r['stats'].served} / {r['stats'].aborted}"),
        ("prompt tokens", lambda r: r["stats"].prompt_tokens),
        ("cached prompt tokens (share)", lambda r: f"{r['stats'].cached_tokens} "
                                                  f"({r['stats'].cached_tokens / max(1, r['stats'].prompt_tokens):.0%})"),
        ("generated tokens", lambda r: r["stats"].generated_tokens),
        ("seconds", lambda r: f"{r['seconds']:.0f}"),
        ("requests / s", lambda r: f"{(r['stats'].served + r['stats'].aborted) / r['seconds']:.2f}"),
        ("generated tokens / s", lambda r: f"{r['stats'].generated_tokens / r['seconds']:.1f}"),
        ("NaN / inf log-probs", lambda r: r["stats"].bad_logprobs),
        ("bursts with more than one answer", lambda r: f"{sum(n > 1 for n in r['stats'].burst_answers)} of "
                                                      f"{len(r['stats'].burst_answers)}"),
        ("... of them with unequal radix hits", lambda r: sum(n > 1 and h > 1 for n, h in
                                                              zip(r["stats"].burst_answers, r["stats"].burst_hits))),
        ("radix-evicted tokens", lambda r: f"{r['counters'].get('sglang:evicted_tokens_total', 0):.0f}"),
        ("retracted requests", lambda r: f"{r['counters'].get('sglang:num_retracted_requests_total', 0):.0f}"),
        ("after flush: free slots / pool", lambda r: f"{r['spark'].get('free_slots', '-')} / "
                                                    f"{r['spark'].get('pool_slots', '-')}"),
        ("after flush: live window rows / rows", lambda r: f"{r['spark'].get('window_rows_live', '-')} / "
                                                          f"{r['spark'].get('window_rows', '-')}"),
        ("requests that borrowed a window row", lambda r: r["spark"].get("window_rows_borrowed", "-")),
    ]  # fmt: skip
    lines = [f"| | {' | '.join(r['name'] for r in results)} |", "|---" * (len(results) + 1) + "|"]
    lines += [f"| {label} | {' | '.join(str(get(r)) for r in results)} |" for label, get in rows]
    kinds = results[0]["stats"].kinds
    header = (f"{args.requests} requests ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))}), "
              f"{args.concurrency} batches in flight, chunked prefill {args.chunked_prefill}, at most "
              f"{args.max_running} running; SmolLM2-135M-Instruct, float32, CPU "
              f"({os.cpu_count()} cores); seed {args.seed}.")  # fmt: skip
    return header + "\n\n" + "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None, help="default: the embedded SmolLM2")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--budget-tokens", type=int, default=3000, help="dense slots; SparK gets the same bytes")
    parser.add_argument("--chunked-prefill", type=int, default=64)
    parser.add_argument("--max-running", type=int, default=16)
    parser.add_argument("--key-ratio", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="SparK only (the CI check)")
    parser.add_argument("--reproducible", action="store_true", help="serve SparK with --spark-reproducible")
    parser.add_argument("--deterministic", action="store_true",
                        help="serve SparK with --enable-deterministic-inference (reproducible included)")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    args.model_path = args.model_path or smollm2_path()
    config = SparKConfig(key_ratio=args.key_ratio)
    spark_options = {"spark_key_ratio": args.key_ratio, "spark_reproducible": args.reproducible or None}
    if args.deterministic:
        spark_options["enable_deterministic_inference"] = True
    spark_name = "SparK K %.1f" % args.key_ratio + (" reproducible" if args.reproducible else "")
    spark_name += " deterministic" if args.deterministic else ""
    runs = [(spark_name, "spark", budget_tokens(args.model_path, args.budget_tokens, config), spark_options)]
    if not args.quick:
        runs.insert(0, ("dense torch_native", "torch_native", args.budget_tokens, {}))
    results = []
    for name, backend, tokens, options in runs:
        results.append(soak(name, backend, tokens, args, options))
        text = table(results, args)
        print(text, flush=True)  # each run's column as soon as it is measured
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
