"""Attention-level fidelity evaluation of SparK on real activations.

``python -m evaluation --help``. Pieces:

* :mod:`.texts` — real text found on the system (licence texts), identified by SHA-256;
* :mod:`.activations` — Q/K/V capture from all-MiniLM-L6-v2 or any HF causal LM (post-RoPE),
  and the samples (context, held-out queries, same-question and new-question windows);
* :mod:`.methods` — SparK mean / zero (K, K+V), ThinK and SnapKV eviction via the reference;
* :mod:`.budget` — bytes per token of every method, side data included (equal-bytes matching);
* :mod:`.metrics` — relative output error, KL(full || compressed), top-k overlap;
* :mod:`.harness` — the experiment; :mod:`.report` — CSV, PNG and markdown.
"""

from .budget import CacheShape, eviction_bytes, eviction_fraction, spark_bytes, think_bytes
from .harness import DEFAULT_RATIOS, SETTINGS, EvalConfig, Results, run
from .methods import CHANNEL_METHODS, ChannelMethod

__all__ = [
    "CHANNEL_METHODS", "CacheShape", "ChannelMethod", "DEFAULT_RATIOS", "EvalConfig", "Results",
    "SETTINGS", "eviction_bytes", "eviction_fraction", "run", "spark_bytes", "think_bytes",
]
