"""The fidelity experiment: every method, every ratio, both window settings, per sample.

For each sample (see :mod:`.activations`) and each setting (``same``: window = the context's last
``W`` queries; ``new``: window = a different question's queries), for each ratio ``r``:

* each channel method (SparK mean K, SparK zero K, ThinK K, SparK mean K+V) compresses the context
  at ratio ``r`` with that window; its bytes per token come from :mod:`.budget`;
* SnapKV token eviction with the same window keeps ``round(f * N)`` tokens per head, where ``f`` makes
  its bytes equal to that channel method's (so eviction is measured once per channel method and
  ratio, "matched" to it);
* the scored queries attend over the compressed context and are compared with the full context:
  relative output error, KL(full || compressed), KL(compressed || full), top-k overlap and
  evicted attention mass.

Window references (``window_references``), for SparK mean (K) and SnapKV at its bytes only:
``oracle`` takes the scored queries themselves as the window (the best a window can do; an oracle
for SnapKV's vote too), ``none`` ranks SparK's channels with ``Qn = 1`` (no query information).
Between them they say how much of either method's result the window's choice accounts for.

Metrics are averaged over query heads and scored queries per layer, giving per sample and layer
one number; the report averages over layers, then over samples (mean and standard error).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from spark_sglang.kernels import reference

from . import budget, metrics
from .activations import Sample
from .methods import (
    CHANNEL_METHODS,
    EVICTION,
    SPARK_MEAN_K,
    compress_all,
    gather_tokens,
    keep_indices,
    scatter_probs,
    snapkv_scores,
)

SETTINGS = ("same", "new")
#: Window-sensitivity references, for SparK mean (K) and SnapKV at its bytes only.
REFERENCE_SETTINGS = ("oracle", "none")
SETTING_LABELS = {
    "same": "same question (window = last W context queries)",
    "new": "new question (window = another question's queries)",
    "oracle": "oracle window (the scored queries themselves)",
    "none": "no window (Qn = 1: channels ranked by k^2 alone; SparK only)",
}
METRICS = ("rel_err", "kl", "kl_rev", "topk", "evicted_mass")
DEFAULT_RATIOS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class EvalConfig:
    ratios: tuple[float, ...] = DEFAULT_RATIOS
    topk: int = 8
    kv_dtype: torch.dtype = torch.bfloat16
    pooling: str = "max"
    kernel_size: int = 7
    eviction_index_bytes: float = 0.0
    kl_eps: float = metrics.DEFAULT_KL_EPS
    #: also evaluate the "oracle" / "none" window references (SparK mean K and SnapKV only)
    window_references: bool = True


@dataclass
class Results:
    config: EvalConfig
    shape: budget.CacheShape
    num_tokens: int
    sources: list[str]
    #: (setting, method, matched, ratio) -> {"bytes": float, metric: Tensor [samples, layers]}
    cells: dict[tuple[str, str, str, float], dict] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def dense_bytes(self) -> float:
        return self.shape.dense()

    def per_sample(self, setting: str, method: str, ratio: float, metric: str,
                   matched: str = "") -> torch.Tensor:
        """``[samples]``: the metric averaged over layers."""
        return self.cells[(setting, method, matched, ratio)][metric].mean(dim=1)

    def mean(self, setting: str, method: str, ratio: float, metric: str, matched: str = "") -> float:
        return float(self.per_sample(setting, method, ratio, metric, matched).mean())

    def bytes_frac(self, setting: str, method: str, ratio: float, matched: str = "") -> float:
        return self.cells[(setting, method, matched, ratio)]["bytes"] / self.dense_bytes

    def rows(self) -> list[dict]:
        """Long-format rows (layer ``"all"`` then each layer) for the CSV."""
        out = []
        for (setting, method, matched, ratio), cell in self.cells.items():
            n = cell["rel_err"].shape[0]
            layers = cell["rel_err"].shape[1]
            for layer in ["all", *range(layers)]:
                row = {
                    "setting": setting, "method": method, "matched_to": matched, "ratio": ratio,
                    "layer": layer, "bytes_per_token": cell["bytes"],
                    "bytes_frac": cell["bytes"] / self.dense_bytes, "samples": n,
                }
                for name in METRICS:
                    values = cell[name].mean(dim=1) if layer == "all" else cell[name][:, layer]
                    row[name] = float(values.mean())
                    row[name + "_se"] = float(values.std() / math.sqrt(n)) if n > 1 else 0.0
                out.append(row)
        return out


def _layer_means(x: torch.Tensor, layers: int) -> torch.Tensor:
    """``[L*Hq, M]`` -> ``[L]``."""
    return x.reshape(layers, -1).mean(dim=1).cpu()


def evaluate_sample(sample: Sample, config: EvalConfig, shape: budget.CacheShape) -> list[tuple]:
    """``[(setting, method, matched, ratio, bytes, {metric: Tensor [L]}), ...]`` for one sample."""
    k, v, q = sample.keys, sample.values, sample.queries
    n, layers, cap = sample.num_tokens, sample.num_layers, sample.logit_cap
    full = metrics.FullAttention(q, k, v, 1.0, cap, config.topk, config.kl_eps)

    def score(out, probs, log_probs, evicted=False, reuse=None) -> dict[str, torch.Tensor]:
        """Layer means of every metric; ``reuse``: the scores of the same keys (so the same
        probabilities) with other values, of which only the output error changes."""
        if reuse is not None:
            return {**reuse, "rel_err": _layer_means(metrics.relative_error(out, full.out), layers)}
        compared = full.compare(out, probs, log_probs, evicted)
        return {name: _layer_means(x, layers) for name, x in compared.items()}

    records = []
    compressed_values = {
        ratio: reference.simulate_values(v, ratio) for ratio in config.ratios
    } if any(m.values for m in CHANNEL_METHODS) else {}
    windows = (("same", sample.window_same, True), ("new", sample.window_new, False))
    for setting, window_q, in_context in windows:
        votes = snapkv_scores(k, window_q, 1.0, in_context, sample.causal, config.kernel_size,
                              config.pooling, cap)
        evicted: dict[int, dict] = {}
        for ratio in config.ratios:
            variants = compress_all(k, v, window_q, ratio, CHANNEL_METHODS,
                                    compressed_values.get(ratio))
            by_keys: dict[int, dict] = {}  # same compressed keys -> same probabilities
            for method in CHANNEL_METHODS:
                kc, vc = variants[method.name]
                out, probs, log_probs = metrics.attend_log(q, kc, vc, 1.0, cap)
                scored = score(out, probs, log_probs, reuse=by_keys.get(id(kc)))
                by_keys.setdefault(id(kc), scored)
                nbytes = method.bytes_per_token(shape, ratio, n)
                records.append((setting, method.name, "", ratio, nbytes, scored))
                frac = budget.eviction_fraction(shape, nbytes, config.eviction_index_bytes)
                keep = budget.eviction_keep_count(n, frac)
                if keep not in evicted:
                    idx = keep_indices(votes, keep)
                    out, probs, log_probs = metrics.attend_log(
                        q, gather_tokens(k, idx), gather_tokens(v, idx), 1.0, cap)
                    evicted[keep] = score(
                        out, scatter_probs(probs, idx, n),
                        scatter_probs(log_probs, idx, n, float("-inf")), evicted=True)
                ebytes = budget.eviction_bytes(shape, keep / n, config.eviction_index_bytes)
                records.append((setting, EVICTION, method.name, ratio, ebytes, evicted[keep]))

    # How much the window matters: SparK mean (K) with the scored queries' own channel norm (the
    # best any window could do) and with none (Qn = 1); SnapKV voted by the scored queries.
    if config.window_references:
        oracle_votes = snapkv_scores(k, q, 1.0, False, False, config.kernel_size, config.pooling, cap)
        norms = {"oracle": reference.window_channel_norm(q, k.shape[1]),
                 "none": torch.ones(k.shape[1], k.shape[2], device=k.device)}
        for ratio in config.ratios:
            nbytes = SPARK_MEAN_K.bytes_per_token(shape, ratio, n)
            for setting, norm in norms.items():
                kc = reference.simulate_keys_with_norm(k, norm, ratio, "mean")
                records.append((setting, SPARK_MEAN_K.name, "", ratio, nbytes,
                                score(*metrics.attend_log(q, kc, v, 1.0, cap))))
            keep = budget.eviction_keep_count(
                n, budget.eviction_fraction(shape, nbytes, config.eviction_index_bytes))
            idx = keep_indices(oracle_votes, keep)
            out, probs, log_probs = metrics.attend_log(
                q, gather_tokens(k, idx), gather_tokens(v, idx), 1.0, cap)
            scored = score(out, scatter_probs(probs, idx, n),
                           scatter_probs(log_probs, idx, n, float("-inf")), evicted=True)
            ebytes = budget.eviction_bytes(shape, keep / n, config.eviction_index_bytes)
            records.append(("oracle", EVICTION, SPARK_MEAN_K.name, ratio, ebytes, scored))
    return records


def run(samples: list[Sample], config: EvalConfig = EvalConfig(), progress=None) -> Results:
    """Evaluate every sample; ``progress(i, total)`` is called after each one."""
    if not samples:
        raise ValueError("no samples to evaluate")
    first = samples[0]
    shape = budget.CacheShape(first.num_layers, first.num_kv_heads, first.head_dim, config.kv_dtype)
    if first.num_tokens < config.topk:
        raise ValueError(f"top-{config.topk} overlap needs at least {config.topk} context tokens")
    start = time.perf_counter()
    collected: dict[tuple, dict] = defaultdict(lambda: {"bytes": None, **{m: [] for m in METRICS}})
    for i, sample in enumerate(samples):
        if sample.num_tokens != first.num_tokens:
            raise ValueError("all samples must have the same context length")
        for setting, method, matched, ratio, nbytes, values in evaluate_sample(sample, config, shape):
            cell = collected[(setting, method, matched, ratio)]
            cell["bytes"] = nbytes
            for name in METRICS:
                cell[name].append(values[name])
        if progress is not None:
            progress(i + 1, len(samples))
    cells = {
        key: {"bytes": cell["bytes"], **{m: torch.stack(cell[m]) for m in METRICS}}
        for key, cell in collected.items()
    }
    return Results(
        config=config, shape=shape, num_tokens=first.num_tokens,
        sources=[s.source for s in samples], cells=cells, seconds=time.perf_counter() - start,
    )
