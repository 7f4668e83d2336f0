"""What ``--enable-deterministic-inference`` costs the spark backend on CPU, and what each part buys.

One process, engines one after another on the same machine (SmolLM2-135M-Instruct, float32,
``sglang.Engine``, the spark backend's C++ path, key ratio 0.5):

* ``spark``: no flag (the plugin's default);
* ``spark deterministic``: the flag (reproducible last query + row-count-independent matmuls);
* ``spark deterministic (ATen matmuls)``: the flag with ``SPARK_SGLANG_CPU_BATCH_INVARIANT=0``, to
  see whether the matmul part is needed.

Per engine: generated tokens per second of a batch of ``--prompts`` different prompts
(``--new-tokens`` greedy tokens each), ``--repeats`` times after one warm-up, median reported; and
whether a target prompt's tokens and log-probs served alone equal those served inside batches of
3 and 8 at several positions and as 8 identical copies (bit-identical or not, the largest
log-prob gap). The scheduler runs with one torch thread (``OMP_NUM_THREADS=1``) unless
``--threads`` says otherwise.

    python benchmarks/bench_deterministic.py            # about 10 minutes on 2 cores
    python benchmarks/bench_deterministic.py --quick    # fewer repeats and tokens
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_deterministic import MEMORY_SLACK, OTHERS, TARGET  # noqa: E402

MODES = {
    "spark": ({}, {}),
    "spark deterministic": ({"enable_deterministic_inference": True}, {}),
    "spark deterministic (ATen matmuls)": ({"enable_deterministic_inference": True},
                                           {"SPARK_SGLANG_CPU_BATCH_INVARIANT": "0"}),
}  # fmt: skip
WORKLOAD = [
    "Summarise the plot of a detective story in which the butler is innocent.",
    "What are the main differences between a list and a tuple in Python?",
    "Explain photosynthesis to a ten year old.",
    "Write a haiku about coffee.",
    "How does a refrigerator keep food cold?",
    "Name five programming languages and one strength of each.",
    "What causes the seasons on Earth?",
    "Describe a sunset over the mountains in three sentences.",
]


def answers(engine, new_tokens: int) -> dict[str, tuple[list[int], list[float]]]:
    """The target's (tokens, log-probs) alone and in each batch setting."""
    params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
    settings = {
        "alone": ([TARGET], [0]),
        "batch of 3, position 1": ([OTHERS[0], TARGET, OTHERS[1]], [1]),
        "batch of 3, position 2": ([OTHERS[2], OTHERS[3], TARGET], [2]),
        "batch of 8, position 5": (OTHERS[:5] + [TARGET] + OTHERS[5:7], [5]),
        "burst of 8": ([OTHERS[4]] + [TARGET] * 8 + [OTHERS[5]], list(range(1, 9))),
    }
    found = {}
    for name, (prompts, positions) in settings.items():
        engine.flush_cache()
        outputs = engine.generate(prompt=prompts, sampling_params=params, return_logprob=True)
        for i in positions:
            o = outputs[i]
            found[f"{name} #{i}"] = (o["output_ids"], [lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]])
    return found


def throughput(engine, new_tokens: int, prompts: int, repeats: int) -> list[float]:
    params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
    batch = (WORKLOAD * (prompts // len(WORKLOAD) + 1))[:prompts]
    batch = [f"{p} (request {i})" for i, p in enumerate(batch)]  # no shared prompts
    rates = []
    for run in range(repeats + 1):
        engine.flush_cache()
        started = time.perf_counter()
        outputs = engine.generate(prompt=batch, sampling_params=params)
        seconds = time.perf_counter() - started
        if run:  # the first run warms up
            rates.append(sum(len(o["output_ids"]) for o in outputs) / seconds)
    return rates


def run_mode(name: str, args) -> dict:
    import sglang as sgl

    from spark_sglang.demo import cpu_memory_fraction
    from spark_sglang.smollm2 import smollm2_path

    options, env = MODES[name]
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    path = smollm2_path()
    engine = sgl.Engine(model_path=path, device="cpu", attention_backend="spark", dtype="float32",
                        disable_cuda_graph=True, mem_fraction_static=cpu_memory_fraction(path, MEMORY_SLACK),
                        max_total_tokens=8192, random_seed=0, log_level="error", sleep_on_idle=True,
                        chunked_prefill_size=args.chunked_prefill_size, spark_key_ratio=0.5, **options)  # fmt: skip
    try:
        found = answers(engine, args.check_tokens)
        rates = throughput(engine, args.new_tokens, args.prompts, args.repeats)
    finally:
        engine.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    reference = found["alone #0"]
    differing = [k for k, v in found.items() if v != reference]
    gap = max((abs(a - b) for v in found.values() for a, b in zip(v[1], reference[1])), default=0.0)
    token_mismatch = sum(v[0] != reference[0] for v in found.values())
    return {"rates": rates, "differing": differing, "gap": gap, "token_mismatch": token_mismatch,
            "settings": len(found) - 1}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--check-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunked-prefill-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the scheduler")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, from: " + ", ".join(MODES))
    parser.add_argument("--quick", action="store_true", help="2 repeats, 16 new tokens")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.new_tokens = 2, 16
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the scheduler process

    results = {}
    for name in args.modes.split(","):
        results[name] = run_mode(name, args)
        print(f"{name}: {results[name]}", flush=True)
    print(f"\n{args.prompts} different prompts x {args.new_tokens} new tokens per batch, median of {args.repeats} "
          f"batches after one warm-up; chunked prefill {args.chunked_prefill_size}; {args.threads} torch thread(s); "
          f"SmolLM2-135M-Instruct float32 on CPU, spark K 0.5\n")  # fmt: skip
    base = statistics.median(results["spark"]["rates"]) if "spark" in results else None
    print("| mode | generated tokens/s (median) | runs | vs no flag | target alone = in batches (bitwise) | "
          "largest log-prob gap | token sequences that differ |")  # fmt: skip
    print("|---|---:|---|---:|---|---:|---:|")
    for name, r in results.items():
        median = statistics.median(r["rates"])
        ratio = f"{median / base:.2f}x" if base else "-"
        same = "yes" if not r["differing"] else f"no ({len(r['differing'])} of {r['settings']})"
        runs = ", ".join(f"{x:.1f}" for x in r["rates"])
        print(f"| {name} | {median:.1f} | {runs} | {ratio} | {same} | {r['gap']:.3g} | {r['token_mismatch']} |")


if __name__ == "__main__":
    main()
