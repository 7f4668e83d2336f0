"""Continuation perplexity through ``sglang.Engine``: the frontier's measurement, served.

``python -m evaluation.engine_perplexity`` (from the repository root; CPU) writes
``docs/engine_perplexity.md``; ``--help`` lists the knobs. :mod:`.frontier` measures SparK in a
transformers simulation; this runs the same samples (:func:`.frontier.token_spans`, so the token ids
are identical) through one SGLang engine per configuration and sets each configuration's
perplexity change beside the harness's simulated figure for it, computed here in process.

Per sample (context ``<bos> X``, continuation ``Y`` of ``C + 1`` tokens) and engine:

1. the radix cache is flushed (samples share ``<bos>``, which would otherwise be read as an earlier
   sample's request stored it);
2. request 1 is the context, one new token: its extend computes SparK's window statistics from its
   last ``W`` queries and stores the context (compressed, for SparK) in the radix cache;
3. request 2 is the context + ``Y`` with ``return_logprob`` from ``logprob_start_len =
   len(context)``. It must hit the cached context (``cached_tokens``): ``Y`` reads it as stored
   and, under ``spark``, its own tokens dense among themselves, the harness's continuation pass.
   SGLang returns ``Y[0]``'s log-prob as None (the context's prefill predicted it) and those of
   ``Y[1:]``: the ``C`` tokens :func:`.frontier.mean_nll` scores.

``torch_native`` differs: its extend writes its own K/V to the cache and attends over the cache, so
with an FP8 cache the context's prefill and ``Y`` read their own tokens in FP8 too, where the
harness quantizes only the cached context (computed dense).

Perplexity change, per sample: ``exp(NLL - NLL of the dense float32 engine) - 1`` for an engine,
``exp(NLL - NLL over the uncompressed float32 cache) - 1`` for the harness, whose continuation pass
the tests check equals the model's own forward pass. The engine computes in float32 and, on CPU,
stores K/V in float32 (or FP8); the harness's cache receives them in bfloat16 as from a bf16 model.
Both harness storages are run: bfloat16 (the figures of ``docs/frontier.md``) and float32 (like for
like; FP8 settings then cast float32 to FP8 directly, as the engine does).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from spark_sglang import texts

from . import activations, frontier, quant

TORCH_NATIVE = "torch_native"
SPARK = "spark"
FP8 = torch.float8_e4m3fn
#: Harness storages: the dtype the simulated cache receives K/V in, by report label.
STORAGES = {"bf16": torch.bfloat16, "fp32": torch.float32}
#: Engine arguments shared by every configuration (CPU, float32; the pool is capped per run).
ENGINE_ARGS = dict(device="cpu", dtype="float32", disable_cuda_graph=True, random_seed=0,
                   log_level="error", sleep_on_idle=True, skip_tokenizer_init=True)
GREEDY_ONE_TOKEN = {"temperature": 0.0, "max_new_tokens": 1}

COMMAND = "python -m evaluation.engine_perplexity"
BEGIN = frontier.begin_marker(None, COMMAND)
END = frontier.END


# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One engine configuration and the harness method that simulates it."""

    name: str
    label: str
    backend: str
    key_ratio: float = 0.0
    value_ratio: float = 0.0
    fp8: bool = False  # --kv-cache-dtype fp8_e4m3

    @property
    def is_reference(self) -> bool:
        return self.backend != SPARK and not self.fp8

    def engine_options(self, window: int) -> dict:
        """``sglang.Engine`` arguments of this configuration."""
        options = {"attention_backend": self.backend}
        if self.fp8:
            options["kv_cache_dtype"] = "fp8_e4m3"
        if self.backend == SPARK:
            options |= {"spark_key_ratio": self.key_ratio, "spark_value_ratio": self.value_ratio,
                        "spark_window": window}
        return options

    def method(self, storage: torch.dtype, geometry: frontier.Geometry) -> frontier.Method | None:
        """The :mod:`.frontier` method simulating this configuration for a cache receiving K/V in
        ``storage`` (None for the dense reference: the uncompressed float32 cache)."""
        if self.is_reference:
            return None
        if self.backend != SPARK:
            return frontier.quant_method(quant.FP8_E4M3, geometry)
        dtype = FP8 if self.fp8 else storage
        return frontier.spark_method(self.key_ratio, self.value_ratio, dtype, geometry)


SETTINGS = (
    Setting("dense", "dense float32 (torch_native)", TORCH_NATIVE),
    Setting("fp8", "FP8 E4M3 (torch_native)", TORCH_NATIVE, fp8=True),
    Setting("spark-k0.5", "SparK K 0.5", SPARK, 0.5),
    Setting("spark-k0.8", "SparK K 0.8", SPARK, 0.8),
    Setting("spark-kv0.5", "SparK K+V 0.5", SPARK, 0.5, 0.5),
    Setting("spark-k0.5-fp8", "SparK K 0.5 on FP8", SPARK, 0.5, fp8=True),
)
QUICK_SETTINGS = ("dense", "spark-k0.5", "spark-k0.5-fp8")


# ---------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Span:
    """One sample's token ids: ``prefix`` (special tokens) + ``text`` = ``X`` (``context_len``
    tokens) + ``Y``."""

    source: str
    prefix: list[int]
    text: list[int]
    context_len: int

    @property
    def context(self) -> list[int]:
        """What request 1 sends and the radix cache keeps: ``prefix + X``."""
        return self.prefix + self.text[: self.context_len]

    @property
    def continuation(self) -> list[int]:
        """``Y``: ``C + 1`` ids; the ``C`` after the first are scored."""
        return self.text[self.context_len :]


def build_spans(lm: activations.CaptureModel, documents: Sequence[texts.Document], count: int,
                context_len: int, continuation_len: int, window: int) -> list[Span]:
    """The samples :func:`.frontier.iter_samples` captures, as token ids."""
    return [Span(source, list(lm.prefix), ids, context_len)
            for source, ids in frontier.token_spans(lm, documents, context_len, continuation_len,
                                                    window, count)]


# ---------------------------------------------------------------------------------------------
# Engine
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def engine_environment() -> Iterator[None]:
    """SGLang's processes leave sockets and temp files in ``TMPDIR``: point it at a fresh folder,
    removed afterwards. ``SGLANG_USE_CPU_ENGINE`` (the sgl_kernel CPU path) is unset so CPU runs go
    through the ordinary model runner and the configured attention backend."""
    saved = {name: os.environ.get(name) for name in ("TMPDIR", "SGLANG_USE_CPU_ENGINE")}
    folder = tempfile.mkdtemp(prefix="spark-engine-perplexity-")
    os.environ["TMPDIR"] = folder
    os.environ.pop("SGLANG_USE_CPU_ENGINE", None)
    tempfile.tempdir = None
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        tempfile.tempdir = None
        shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class Served:
    """Request 2's answer for one sample."""

    logprobs: torch.Tensor  # [C] float64: log-probs of Y[1:], each given everything before it
    cached_tokens: int  # tokens it read from the radix cache


def continuation_logprobs(meta_info: dict, continuation: Sequence[int]) -> torch.Tensor:
    """``[C]`` float64 log-probs of ``Y[1:]`` from SGLang's ``input_token_logprobs`` (one
    ``(logprob, token id, text)`` per token from ``logprob_start_len``; the first one's logprob is
    None), after checking they are ``Y``'s tokens."""
    entries = meta_info["input_token_logprobs"]
    ids = [entry[1] for entry in entries]
    if ids != list(continuation):
        raise RuntimeError(f"the engine returned prompt log-probs for tokens {ids[:8]}..., expected "
                           f"the continuation {list(continuation)[:8]}...")
    return torch.tensor([entry[0] for entry in entries[1:]], dtype=torch.float64)


def serve_span(engine, span: Span, page_size: int) -> Served:
    """Request 1 (the context) on an emptied radix cache, so that it computes the whole context
    under its own window (samples share ``<bos>``); then request 2 (context + continuation, prompt
    log-probs of the continuation), which must read the context from the cache (at most a page
    short)."""
    if not engine.flush_cache().success:
        raise RuntimeError("the engine did not flush its radix cache")
    first = engine.generate(input_ids=span.context, sampling_params=GREEDY_ONE_TOKEN)
    if first["meta_info"]["cached_tokens"]:
        raise RuntimeError(f"{span.source}: request 1 hit the flushed radix cache")
    out = engine.generate(input_ids=span.context + span.continuation, sampling_params=GREEDY_ONE_TOKEN,
                          return_logprob=True, logprob_start_len=len(span.context))
    cached = int(out["meta_info"]["cached_tokens"])
    if cached < len(span.context) - page_size:
        raise RuntimeError(f"{span.source}: request 2 read {cached} of its {len(span.context)} context "
                           "tokens from the radix cache, so it did not read the context as stored")
    return Served(continuation_logprobs(out["meta_info"], span.continuation), cached)


def run_engine(model_path: str, setting: Setting, spans: Sequence[Span], window: int) -> list[Served]:
    """Serve every span on a fresh engine of ``setting`` (the pool sized for two sequences)."""
    import sglang

    longest = max(len(s.context) + len(s.continuation) for s in spans)
    # On CPU SGLang takes the static fraction of free RAM and the weights must fit inside it (a
    # 1.5B float32 model needs a third of this machine's); max_total_tokens caps the pool itself.
    engine = sglang.Engine(model_path=model_path, max_total_tokens=2 * longest, mem_fraction_static=0.9,
                           **ENGINE_ARGS, **setting.engine_options(window))
    try:
        page_size = int(engine.get_server_info()["page_size"])
        return [serve_span(engine, span, page_size) for span in spans]
    finally:
        engine.shutdown()


# ---------------------------------------------------------------------------------------------
# Harness (simulation)
# ---------------------------------------------------------------------------------------------


@dataclass
class Simulated:
    """The harness's per-sample mean NLLs (``[S]`` float64)."""

    reference_nll: torch.Tensor  # uncompressed float32 cache
    nll: dict[str, dict[str, torch.Tensor]]  # storage label -> setting name -> [S]
    methods: dict[str, dict[str, str]]  # storage label -> setting name -> frontier method label


def _nll(model, sample: frontier.Sample, keys: torch.Tensor, values: torch.Tensor) -> float:
    return frontier.mean_nll(sample, frontier.continuation_logprobs(model, sample, keys, values))


def simulate(model, spans: Sequence[Span], settings: Sequence[Setting], window: int,
             progress: Callable[[str], None]) -> Simulated:
    """:mod:`.frontier`'s continuation pass for every span, setting and storage."""
    reference, nll, labels = [], {}, {}
    for span in spans:
        sample = frontier.capture_sample(model, span.prefix, span.text, span.context_len, window,
                                         span.source)
        geometry = frontier.Geometry.of(sample)
        reference.append(_nll(model, sample, sample.keys, sample.values))
        for storage, dtype in STORAGES.items():
            cache = frontier.CacheInput.of(sample, dtype)
            for setting in settings:
                method = setting.method(dtype, geometry)
                if method is not None:
                    value = _nll(model, sample, *method.compress(cache))
                    nll.setdefault(storage, {}).setdefault(setting.name, []).append(value)
                    labels.setdefault(storage, {})[setting.name] = method.label
        progress(f"harness: {span.source} done")
    as_tensor = partial(torch.tensor, dtype=torch.float64)
    return Simulated(as_tensor(reference),
                     {s: {k: as_tensor(v) for k, v in by_setting.items()} for s, by_setting in nll.items()},
                     labels)


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass
class Results:
    """Engine and harness figures over the same samples."""

    spans: list[Span]
    settings: list[Setting]
    served: dict[str, list[Served]]  # setting name -> per sample
    simulated: Simulated

    @property
    def reference(self) -> Setting:
        return next(s for s in self.settings if s.is_reference)

    @property
    def compared(self) -> list[Setting]:
        return [s for s in self.settings if not s.is_reference]

    def engine_nll(self, name: str) -> torch.Tensor:
        """``[S]`` mean NLL of the scored continuation tokens per sample."""
        return torch.stack([-served.logprobs.mean() for served in self.served[name]])

    def engine_change(self, name: str) -> torch.Tensor:
        """``[S]`` perplexity change in % of the dense engine's, per sample."""
        return torch.expm1(self.engine_nll(name) - self.engine_nll(self.reference.name)) * 100

    def harness_change(self, storage: str, name: str) -> torch.Tensor:
        """``[S]`` perplexity change in % of the uncompressed cache's, per sample."""
        return torch.expm1(self.simulated.nll[storage][name] - self.simulated.reference_nll) * 100

    def difference(self, storage: str, name: str) -> torch.Tensor:
        """``[S]`` engine minus harness perplexity change, percentage points."""
        return self.engine_change(name) - self.harness_change(storage, name)


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _pm(x: torch.Tensor, digits: int = 2) -> str:
    mean, se = frontier.mean_se(x)
    return f"{mean:+.{digits}f} ± {se:.{digits}f}"


def _ppl(nll: torch.Tensor) -> str:
    mean, se = frontier.mean_se(torch.exp(nll))
    return f"{mean:.3f} ± {se:.3f}"


def comparison_table(results: Results) -> list[str]:
    """Per configuration: the engine's perplexity change, the harness's in both storages, and the
    paired differences."""
    lines = ["| configuration | engine, % | harness, bf16 storage (`docs/frontier.md` method), % | "
             "engine − harness (bf16), points | harness, fp32 storage (like for like), % | "
             "engine − harness (fp32), points |", "|---|---:|---|---:|---:|---:|"]
    for setting in results.compared:
        name = setting.name
        lines.append(
            f"| {setting.label} | {_pm(results.engine_change(name))} | "
            f"{_pm(results.harness_change('bf16', name))} ({results.simulated.methods['bf16'][name]}) | "
            f"{_pm(results.difference('bf16', name), 3)} | {_pm(results.harness_change('fp32', name))} | "
            f"{_pm(results.difference('fp32', name), 3)} |")
    return lines


def per_sample_table(results: Results) -> list[str]:
    """Per sample: the fewest cached tokens any engine reported, and per configuration the engine
    minus the like-for-like harness perplexity change (points)."""
    compared = results.compared
    lines = ["| sample | cached / context tokens | " + " | ".join(s.label for s in compared) + " |",
             "|---|---:|" + "---:|" * len(compared)]
    differences = [results.difference("fp32", s.name) for s in compared]
    for i, span in enumerate(results.spans):
        cached = min(served[i].cached_tokens for served in results.served.values())
        cells = " | ".join(f"{float(d[i]):+.3f}" for d in differences)
        lines.append(f"| {span.source} | {cached} / {len(span.context)} | {cells} |")
    return lines


@dataclass
class RunInfo:
    """What the run was made of, for the report header."""

    model: str
    documents: list[texts.Document]
    window: int
    command: str
    seconds: float


def generated_block(results: Results, info: RunInfo, begin: str = BEGIN) -> str:
    span = results.spans[0]
    dense_nll = results.engine_nll(results.reference.name)
    gap = (dense_nll - results.simulated.reference_nll).abs().max()
    return "\n".join([
        begin, "",
        f"Reproduce: `{info.command}` ({info.seconds / 60:.1f} min here: "
        f"{len(results.settings)} engines, one at a time, and the harness in process).",
        "",
        f"- Model: {info.model}; engines on CPU in float32, window W = {info.window}.",
        f"- Samples: {len(results.spans)} contexts of {len(span.context)} tokens (special tokens "
        f"included), each followed by {len(span.continuation)} continuation tokens "
        f"({len(span.continuation) - 1} scored); the spans of `python -m evaluation.frontier`.",
        f"- Text: {frontier.sampled_documents(info.documents, (s.source for s in results.spans))}.",
        f"- Dense check: continuation perplexity {_ppl(dense_nll)} through the dense engine, "
        f"{_ppl(results.simulated.reference_nll)} in the harness (uncompressed float32 cache); "
        f"largest per-sample difference of the mean NLL {float(gap):.2e} nats/token.",
        "", "### Engine vs harness", "",
        "Perplexity change in % (mean ± standard error over samples): an engine's against the dense "
        "engine's, the harness's against its uncompressed cache. Differences are paired per sample, "
        "in percentage points.", "",
        *comparison_table(results), "",
        "### Per sample: engine − harness (fp32 storage), points", "",
        *per_sample_table(results), "", END,
    ])


SKELETON = """# Continuation perplexity through the engine

{block}
"""


def write_markdown(path: Path, block: str, begin: str = BEGIN, title: str = "") -> None:
    """Replace the block that starts with ``begin`` in ``path`` (the hand-written text around it
    stays); a page without it gets it as a new section ``title``."""
    if path.exists():
        path.write_text(frontier.splice_block(path.read_text(), block, begin, title))
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(SKELETON.format(block=block))


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m evaluation.engine_perplexity",
        description=(
            "Continuation perplexity of SparK, FP8 and dense KV caches served by sglang.Engine on "
            "CPU, beside the evaluation.frontier simulation of the same samples. Writes "
            "OUT_DIR/engine_perplexity.md."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=None,
                   help="smollm2-135m (the embedded default), qwen2.5-coder-1.5b (once fetched) or a "
                        "Hugging Face Llama/Qwen2-family directory")
    p.add_argument("--corpus", default="licenses", choices=["licenses", "python-sources"],
                   help="named text corpus (spark_sglang.texts)")
    p.add_argument("--samples", type=int, default=None,
                   help=f"samples (default {frontier.DEFAULTS['contexts']}; "
                        f"{frontier.DEFAULTS['quick_contexts']} with --quick)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: few samples, configurations {', '.join(QUICK_SETTINGS)}; "
                        "written as engine_perplexity-quick.md")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads of the harness (0: torch's default); one reproduces "
                        "docs/frontier.csv's figures exactly")
    p.add_argument("--out-dir", default="docs", help="folder of the report")
    return p


def _load(model: str | None) -> tuple[activations.CaptureModel, str, str]:
    """(model, its path, its name in the report)."""
    path, name = activations.resolve_model(model)
    return activations.load_causal_lm(path), path, name


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    count = args.samples or frontier.DEFAULTS["quick_contexts" if args.quick else "contexts"]
    settings = [s for s in SETTINGS if not args.quick or s.name in QUICK_SETTINGS]
    window = frontier.DEFAULTS["window"]
    lm, model_path, model_name = _load(args.model)
    documents = texts.load_documents(texts.corpus_paths(args.corpus))
    spans = build_spans(lm, documents, count, frontier.DEFAULTS["context_len"],
                        frontier.DEFAULTS["continuation_len"], window)
    simulated = simulate(lm.model, spans, settings, window, _progress)
    del lm
    gc.collect()
    served = {}
    with engine_environment():
        for setting in settings:
            began = time.perf_counter()
            served[setting.name] = run_engine(model_path, setting, spans, window)
            _progress(f"engine {setting.name}: {time.perf_counter() - began:.0f} s")
    results = Results(spans, settings, served, simulated)
    info = RunInfo(model_name, documents, window,
                   " ".join([COMMAND, *argv]),
                   time.perf_counter() - start)
    out = Path(args.out_dir) / ("engine_perplexity-quick.md" if args.quick else "engine_perplexity.md")
    begin = frontier.begin_marker(args.model, COMMAND)
    write_markdown(out, generated_block(results, info, begin), begin, model_name)
    print("\n".join(comparison_table(results)))
    _progress(f"wrote {out} in {info.seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
