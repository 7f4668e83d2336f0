"""SparK serving semantics on a transformers model, from the PyTorch reference: the test oracle.

Each step recomputes the whole sequence. A sequence is a list of extends ``[start, end)`` (the
prefill, or the part of a prompt after a radix-cache hit) followed by decode tokens. Exactly as the
engine serves it:

* an extend's keys (values) are compressed under statistics of that extend: the window norm of its
  last ``min(window, end - start)`` queries (and its value bias), or, for an extend shorter than
  the window that continues a prefix, the prefix's statistics; decode tokens under the last
  extend's statistics;
* a query inside an extend sees the keys of its own extend dense (causally) and every earlier key
  compressed (with ``reproducible``, the extend's last query, like a decode query, sees every key
  compressed, its own included).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AutoModelForCausalLM

from spark_sglang.kernels import reference as R
from spark_sglang.kernels.layout import STATS_DTYPE, SparKConfig


def _segment_of_positions(extends, length):
    segment = torch.full((length,), len(extends) - 1, dtype=torch.long)
    for index, (start, end) in enumerate(extends):
        segment[start:end] = index
    return segment


class SparKReferenceModel:
    def __init__(self, model_path: str, config: SparKConfig):
        self.config = config
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        AttentionInterface.register("spark_reference", self._attention)
        self.model.config._attn_implementation = "spark_reference"
        self.extends: list[tuple[int, int]] = []
        self.window_override: dict | None = None
        self.last_statistics: dict = {}  # layer -> (norm, bias) of the last extend, for radix hits

    def _attention(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)  # [n, H, D]
        n, hkv = k.shape[0], k.shape[1]
        segment = _segment_of_positions(self.extends, n)
        norms, biases = [], []
        for start, end in self.extends:
            # The engine keeps window statistics in bfloat16 tables.
            norms.append(R.window_channel_norm(q[max(start, end - self.config.window) : end], hkv).to(STATS_DTYPE))
            biases.append(R.value_channel_bias(v[start:end]).to(STATS_DTYPE))
        if self.window_override is not None:  # statistics of an earlier request (radix hit)
            layer_norms, layer_biases = self.window_override[module.layer_idx]
            norms[0], biases[0] = layer_norms, layer_biases
        for i, (start, end) in enumerate(self.extends[1:], start=1):
            if end - start < self.config.window:  # a short extend keeps its prefix's statistics
                norms[i], biases[i] = norms[i - 1], biases[i - 1]
        self.last_statistics[module.layer_idx] = (norms[-1], biases[-1])
        norm_per_key = torch.stack(norms)[segment]
        k_sparse = R.simulate_keys_with_norm(k, norm_per_key, self.config.key_ratio, self.config.recovery)
        v_sparse = v
        if self.config.value_ratio:
            bias = torch.stack(biases)[segment]
            v_sparse = R.unpack_values(R.pack_values(v, bias, self.config.value_ratio))

        last_end = self.extends[-1][1]
        in_last_extend = torch.arange(n) < last_end
        same_extend = (segment[:, None] == segment[None, :]) & in_last_extend[:, None] & in_last_extend[None, :]
        if self.config.reproducible:  # the extend's last query reads every key compressed
            same_extend[last_end - 1] = False
        group = q.shape[1] // hkv
        qf = q.float()
        dense_logits = torch.einsum("ihd,jhd->hij", qf, k.float().repeat_interleave(group, 1))
        sparse_logits = torch.einsum("ihd,jhd->hij", qf, k_sparse.float().repeat_interleave(group, 1))
        logits = torch.where(same_extend, dense_logits, sparse_logits) * scaling
        causal = torch.arange(n)[None, :] <= torch.arange(n)[:, None]
        logits = logits.masked_fill(~causal, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        v_dense_part = torch.einsum("hij,jhd->ihd", torch.where(same_extend, probs, 0), v.float().repeat_interleave(group, 1))
        v_sparse_part = torch.einsum("hij,jhd->ihd", torch.where(same_extend, 0, probs), v_sparse.float().repeat_interleave(group, 1))
        return (v_dense_part + v_sparse_part).unsqueeze(0).to(query.dtype), None

    @torch.no_grad()
    def generate(self, ids: list[int], max_new_tokens: int, cached: int = 0, statistics=None):
        """Greedy ids and their logprobs. ``cached`` leading tokens come from an earlier request whose
        per-layer statistics are ``statistics`` (as returned in ``self.last_statistics``)."""
        self.extends = [(0, cached), (cached, len(ids))] if cached else [(0, len(ids))]
        self.window_override = None
        if cached:
            self.window_override = statistics
        out_ids, logprobs = [], []
        seq = list(ids)
        for _ in range(max_new_tokens):
            self.last_statistics = {}
            logits = self.model(torch.tensor([seq])).logits[0, -1].float()
            token = int(logits.argmax())
            out_ids.append(token)
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            seq.append(token)
        return out_ids, logprobs
