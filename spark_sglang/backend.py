"""The ``spark`` attention backend, in two forms that share everything SparK-specific:

* ``SparKAttnBackend`` (CUDA): SGLang's ``TritonAttnBackend`` builds the metadata the kernels need
  (CSR ``kv_indptr`` / ``kv_indices`` over each request's slots: the whole sequence for decode, the
  cached prefix for extend; ``qo_indptr``; the fixed buffers CUDA-graph replay refills) and runs
  layers kept dense (``--spark-dense-layers``); SparK's Triton kernels run the compressed layers.
* ``SparKTorchAttnBackend`` (other devices): the same CSR metadata built with PyTorch ops, and
  the PyTorch path (kernels/torch_path.py) for every layer. No Triton.

Window policy: each request's extend computes a fresh row of window statistics from its last
``min(window, extend_len)`` queries (post-RoPE) and its new values; its new tokens are compressed
under that row and so are its later decode tokens. An extend shorter than the window that
continues a cached prefix keeps the prefix's row instead. A radix hit reads the prefix as
compressed under the earlier request's window. Chunked prefill: each chunk uses its own window
(a last chunk shorter than the window keeps the previous chunk's).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.layers.attention.triton_backend import TritonAttnBackend, logit_capping_mod
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.runtime_context import get_parallel

from spark_sglang.kernel_ops import kernel_choice
from spark_sglang.pool import SparKTokenToKVPool
from spark_sglang.window_rows import live_rows
from spark_sglang.window_stats import WindowQueries, batched_value_bias, batched_window_norm, window_queries


class Csr(NamedTuple):
    """Where each request's tokens are: what the kernels read for one batch."""

    kv_indptr: torch.Tensor  # [B + 1] int32 CSR offsets: decode, the whole sequence; extend, the cached prefix
    kv_indices: torch.Tensor  # [nnz] int64 slot ids
    qo_indptr: torch.Tensor | None  # [B + 1] int32 new tokens of each request (extend only)
    max_extend_len: int | None


class ExtendState(NamedTuple):
    """Per-batch SparK state of an extend, shared by every layer."""

    rows: torch.Tensor  # [B] int64 window row of each request
    fresh: torch.Tensor | None  # [B] bool: rows whose statistics this batch writes (None: all)
    starts: torch.Tensor  # [B] int64 first row of each request in q/k/v
    lens: torch.Tensor  # [B] int64 new tokens of each request
    segment: torch.Tensor  # [N] int64 request of each new token
    qo_indptr: torch.Tensor  # [B + 1] int32
    window: WindowQueries  # each request's window query rows


def allocated_slots(allocator) -> torch.Tensor:
    """Bool mask over slots: allocated to a request or held by the radix cache."""
    page = allocator.page_size
    kvcache = allocator.get_kvcache()
    mask = torch.ones(kvcache.size + page, dtype=torch.bool, device=allocator.device)
    mask[:page] = False  # the padding page
    free = allocator.get_all_free_pages().long()
    if page == 1:
        mask[free] = False
    else:
        mask.view(-1, page)[free] = False
    return mask


def running_requests(req_to_token_pool) -> torch.Tensor:
    """Bool mask over request slots (row 0 is padding): in use by a request."""
    running = torch.ones(req_to_token_pool.size + 1, dtype=torch.bool, device=req_to_token_pool.device)
    running[torch.tensor(req_to_token_pool.free_slots, dtype=torch.long, device=running.device)] = False
    running[0] = False
    return running


def gather_slots(req_to_token, req_pool_indices, lens, lens_cpu) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR ``(indptr [B + 1] int32, indices [sum(lens)] int64)``: each request's first ``lens[b]``
    slots from ``req_to_token``, back to back. No host sync (the total comes from ``lens_cpu``)."""
    device = req_to_token.device
    lens = lens.to(device, torch.int64)
    total = int(sum(lens_cpu))
    indptr = torch.zeros(len(lens_cpu) + 1, dtype=torch.int32, device=device)
    indptr[1:] = torch.cumsum(lens, 0)
    request = torch.repeat_interleave(torch.arange(len(lens_cpu), device=device), lens, output_size=total)
    position = torch.arange(total, device=device) - indptr[:-1].long()[request]
    indices = req_to_token[req_pool_indices.long()[request], position].to(torch.int64)
    return indptr, indices


def kv_scales(layer) -> tuple[float, float]:
    """An FP8 cache's per-layer dequantisation scales (SGLang's ``k_scale_float``; 1 if unset)."""
    return getattr(layer, "k_scale_float", None) or 1.0, getattr(layer, "v_scale_float", None) or 1.0


def kv_scale_kwargs(layer) -> dict:
    k_scale, v_scale = kv_scales(layer)
    return {"k_scale": k_scale, "v_scale": v_scale}


def spark_pool(model_runner) -> SparKTokenToKVPool:
    pool = model_runner.token_to_kv_pool
    if not isinstance(pool, SparKTokenToKVPool):
        raise RuntimeError(
            f"--attention-backend spark needs SparK's KV pool, but this model got {type(pool).__name__} "
            "(hybrid, sliding-window or MLA models are not supported)"
        )
    return pool


def new_attention_backend(model_runner):
    """The ``spark`` backend for this device (see the module docstring)."""
    if kernel_choice(model_runner.device) == "triton":
        return SparKAttnBackend(model_runner)
    return SparKTorchAttnBackend(model_runner)


class SparKBackendMixin:
    """SparK's per-batch state (window rows, window statistics) and its compressed-layer forwards.

    A host class provides ``self.csr`` (the batch's ``Csr``) and ``_dense_forward`` (attention of a
    layer kept dense).
    """

    def _init_spark(self, model_runner, num_qo_heads: int, max_splits: int) -> None:
        self.pool = spark_pool(model_runner)
        self.config = self.pool.config
        self.ops = self.pool.ops
        self.spark_device = torch.device(model_runner.device)
        self.spark_num_qo_heads, self.spark_max_splits = num_qo_heads, max_splits
        self.spark_req_to_token_pool = model_runner.req_to_token_pool
        self.spark_allocator = model_runner.token_to_kv_pool_allocator
        self.req_rows = torch.zeros(model_runner.req_to_token_pool.size + 1, dtype=torch.int32, device=self.spark_device)
        self.decode_wrapper = self._new_decode_wrapper()
        self.active_decode_wrapper = self.decode_wrapper
        self.last_query_wrapper = self._new_decode_wrapper()  # extends' last queries, see forward_extend
        self.extend_state: ExtendState | None = None
        self.write_rows: torch.Tensor | None = None  # [tokens] window row of each token written this batch

    def _new_decode_wrapper(self):
        return self.ops.decode_wrapper(
            self.spark_num_qo_heads, self.pool.head_num, self.pool.head_dim,
            device=self.spark_device, max_splits=self.spark_max_splits, **self._split_options(),
        )  # fmt: skip

    def _split_options(self) -> dict:
        """Decode split options of this backend (the CPU paths split at a fixed size always)."""
        return {}

    # --- per-batch metadata -------------------------------------------------------------------

    def _init_spark_metadata(self, forward_batch) -> None:
        if forward_batch.forward_mode.is_decode_or_idle():
            self._assign_decode_rows(forward_batch)
            csr = self.csr
            self.decode_wrapper.plan(csr.kv_indptr, csr.kv_indices, seq_lens_cpu=forward_batch.seq_lens_cpu)
            self.active_decode_wrapper = self.decode_wrapper
        else:
            self._init_extend(forward_batch)

    def _assign_decode_rows(self, forward_batch) -> None:
        """Decode tokens are compressed under their request's latest window row (graph-safe)."""
        self.write_rows = self.req_rows[forward_batch.req_pool_indices]
        self.pool.slot_rows[forward_batch.out_cache_loc] = self.write_rows

    def _init_extend(self, forward_batch) -> None:
        if forward_batch.forward_mode != ForwardMode.EXTEND:
            raise RuntimeError(f"the spark attention backend does not support {forward_batch.forward_mode}")
        lens_cpu = [int(n) for n in forward_batch.extend_seq_lens_cpu]
        device = self.spark_device
        rows_t, fresh_t, all_fresh = self._extend_rows(lens_cpu, [int(n) for n in forward_batch.extend_prefix_lens_cpu])
        lens = forward_batch.extend_seq_lens.to(torch.int64)
        segment = torch.repeat_interleave(torch.arange(len(lens_cpu), device=device), lens, output_size=sum(lens_cpu))
        self.req_rows[forward_batch.req_pool_indices] = rows_t
        self.write_rows = rows_t[segment]
        self.pool.slot_rows[forward_batch.out_cache_loc] = self.write_rows
        if self.config.reproducible:  # the whole sequence of each request, for its last query
            indptr, indices = gather_slots(self.spark_req_to_token_pool.req_to_token, forward_batch.req_pool_indices,
                                           forward_batch.seq_lens, forward_batch.seq_lens_cpu)  # fmt: skip
            self.last_query_wrapper.plan(indptr, indices, seq_lens_cpu=forward_batch.seq_lens_cpu)
        qo_indptr = self.csr.qo_indptr
        starts = qo_indptr[:-1].to(torch.int64)
        self.extend_state = ExtendState(
            rows=rows_t.long(),
            fresh=None if all_fresh else fresh_t,
            starts=starts,
            lens=lens,
            segment=segment,
            qo_indptr=qo_indptr.to(torch.int32),
            window=window_queries(starts, lens, lens_cpu, self.config.window),
        )

    def _extend_rows(self, lens: list[int], prefix_lens: list[int]) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Each request's window row ``[B]`` int32, whether this batch writes its statistics
        ``[B]`` bool, and whether it writes all of them.

        An extend shorter than the window that continues a cached prefix (a near-full radix hit,
        a short turn, a short last chunk) keeps the prefix's row: a window of a few queries would
        compress its tokens and all its decode tokens. Every other extend gets a fresh row.
        """
        device = self.spark_device
        inherit = [n < self.config.window and p > 0 for n, p in zip(lens, prefix_lens)]
        own = [b for b, inherits in enumerate(inherit) if not inherits]
        new_rows, fresh = self.pool.window_rows.allocate(len(own), self._live_rows)
        rows = torch.empty(len(lens), dtype=torch.int32, device=device)
        writes = torch.zeros(len(lens), dtype=torch.bool, device=device)
        if own:
            own_t = torch.tensor(own, dtype=torch.long, device=device)
            rows[own_t] = torch.tensor(new_rows, dtype=torch.int32, device=device)
            writes[own_t] = torch.tensor(fresh, dtype=torch.bool, device=device)
        if len(own) < len(lens):
            heirs = torch.tensor([b for b, inherits in enumerate(inherit) if inherits], dtype=torch.long, device=device)
            last_prefix_slot = self.csr.kv_indices[self.csr.kv_indptr[heirs + 1].long() - 1]
            # A prefix loaded from HiCache's host tier gets its row ids with its first layer.
            self.pool.wait_for_layer(self.pool.start_layer)
            rows[heirs] = self.pool.slot_rows[last_prefix_slot]
        return rows, writes, len(own) == len(lens) and all(fresh)

    def _live_rows(self) -> torch.Tensor:
        live = live_rows(
            self.pool.num_window_rows, self.pool.slot_rows, allocated_slots(self.spark_allocator),
            self.req_rows, running_requests(self.spark_req_to_token_pool),
        )  # fmt: skip
        return live | self.pool.host_pinned_rows()  # rows of slots evicted to HiCache's host tier

    # --- attention ------------------------------------------------------------------------------

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        cache = self.pool.layer_cache(layer.layer_id)
        if not cache.compressed:
            return self._dense_forward(True, q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        self._reject_extras(kwargs)
        if k is None or v is None:
            raise NotImplementedError("the spark attention backend needs the new tokens' K/V (cross-layer KV reuse is not supported)")
        q3, k3, v3 = self._new_tokens(q, k, v, layer)
        if save_kv_cache:
            self._write_window_stats(cache, q3, v3)
            self.pool.store(layer.layer_id, forward_batch.out_cache_loc, k3, v3, self.write_rows, *kv_scales(layer))
        o = self._extend_attention(q3, k3, v3, layer, cache.keys, cache.values, cache.window_stats)
        # --spark-reproducible: each request's last query (the one whose logits pick its next
        # token) reads the cache as stored, its own extend included, as a decode step would; then a
        # request that recomputes only the tail of a cached prompt (a resent prompt, parallel
        # samples) computes exactly what the cold run computed.
        if save_kv_cache and self.config.reproducible:
            last = self.extend_state.qo_indptr[1:].long() - 1
            o_last = self._decode_attention(q3[last], layer, cache.keys, cache.values, cache.window_stats,
                                            self.last_query_wrapper)  # fmt: skip
            o.view(q3.shape[0], -1)[last] = o_last
        return o

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        cache = self.pool.layer_cache(layer.layer_id)
        if not cache.compressed:
            return self._dense_forward(False, q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        self._reject_extras(kwargs)
        if save_kv_cache:
            self.pool.store(layer.layer_id, forward_batch.out_cache_loc, k, v, self.write_rows, *kv_scales(layer))
        return self._decode_attention(q, layer, cache.keys, cache.values, cache.window_stats)

    def _new_tokens(self, q, k, v, layer):
        """The extend's q/k/v as ``[tokens, heads, D]``; k/v in the cache dtype, or as computed
        (the model dtype) when the cache is FP8: the extend reads its own tokens dense."""
        q3 = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        k3 = k.view(-1, layer.tp_k_head_num, layer.qk_head_dim)
        v3 = v.view(-1, layer.tp_v_head_num, layer.v_head_dim)
        if not self.pool.layout.is_fp8:
            k3, v3 = k3.to(self.pool.dtype), v3.to(self.pool.dtype)
        return q3, k3, v3

    def _extend_attention(self, q3, k3, v3, layer, keys, values, window_stats):
        state, csr = self.extend_state, self.csr
        o = q3.new_empty(q3.shape[0], layer.tp_q_head_num * layer.v_head_dim)
        self.ops.extend_attention(
            q3, k3, v3, state.qo_indptr, csr.kv_indptr, csr.kv_indices,
            keys, values, window_stats, self.pool.slot_rows,
            max_q_len=csr.max_extend_len, sm_scale=layer.scaling,
            logit_cap=logit_capping_mod(layer.logit_capping_method, layer.logit_cap),
            out=o.view(-1, layer.tp_q_head_num, layer.v_head_dim), **kv_scale_kwargs(layer),
        )  # fmt: skip
        return o

    def _decode_attention(self, q, layer, keys, values, window_stats, wrapper=None):
        q3 = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        o = q.new_empty(q3.shape[0], layer.tp_q_head_num * layer.v_head_dim)
        (wrapper or self.active_decode_wrapper).run(
            q3, keys, values, window_stats, self.pool.slot_rows,
            sm_scale=layer.scaling,
            logit_cap=logit_capping_mod(layer.logit_capping_method, layer.logit_cap),
            out=o.view(-1, layer.tp_q_head_num, layer.v_head_dim), **kv_scale_kwargs(layer),
        )  # fmt: skip
        return o

    def _write_window_stats(self, cache, q3, v3) -> None:
        """This layer's statistics for every request of the batch that got a fresh row."""
        state = self.extend_state
        stats = [batched_window_norm(q3, state.window, v3.shape[1])]
        if cache.window_stats.shape[1] > 1:
            stats.append(batched_value_bias(v3, state.segment, state.rows.numel()))
        stats = torch.stack(stats, dim=1)  # [B, stats, Hkv, D]
        rows = state.rows
        if state.fresh is not None:
            rows, stats = rows[state.fresh], stats[state.fresh]
        cache.window_stats[rows] = stats.to(cache.window_stats.dtype)

    @staticmethod
    def _reject_extras(kwargs) -> None:
        extras = [name for name, value in kwargs.items() if value is not None]
        if extras:
            raise NotImplementedError(f"the spark attention backend does not support {extras}")


class SparKAttnBackend(SparKBackendMixin, TritonAttnBackend):
    """CUDA: SGLang's Triton backend metadata and CUDA-graph state, SparK's Triton kernels."""

    def __init__(self, model_runner):
        spark_pool(model_runner)  # a clear error before the Triton backend's own
        super().__init__(model_runner)
        self._init_spark(model_runner, self.num_head, self.max_kv_splits)
        self.graph_decode_wrappers: dict[int, object] = {}

    @property
    def csr(self) -> Csr:
        md = self.forward_metadata
        return Csr(md.kv_indptr, md.kv_indices, md.qo_indptr, md.max_extend_len)

    def init_forward_metadata(self, forward_batch):
        super().init_forward_metadata(forward_batch)
        self._init_spark_metadata(forward_batch)

    def _split_options(self) -> dict:
        # Deterministic mode: TritonAttnBackend fixes split_tile_size (SGLang's default 256) and
        # sizes max_kv_splits for the longest context; SparK's decode splits at the same size.
        if getattr(self, "enable_deterministic", False):
            return {"fixed_split_len": self.split_tile_size}
        return {}

    def _dense_forward(self, extend, *args, **kwargs):
        parent = TritonAttnBackend.forward_extend if extend else TritonAttnBackend.forward_decode
        return parent(self, *args, **kwargs)

    # --- CUDA graphs (decode) -----------------------------------------------------------------

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        super().init_forward_metadata_out_graph(forward_batch, in_capture)
        if not forward_batch.forward_mode.is_decode_or_idle():
            return
        batch = forward_batch.batch_size
        wrapper = self.graph_decode_wrappers.get(batch)
        if wrapper is None:
            wrapper = self.graph_decode_wrappers[batch] = self._new_decode_wrapper()
        md = self.forward_metadata
        wrapper.plan(md.kv_indptr[: batch + 1], md.kv_indices, seq_lens_cpu=forward_batch.seq_lens_cpu)
        self.active_decode_wrapper = wrapper

    def init_forward_metadata_in_graph(self, forward_batch):
        super().init_forward_metadata_in_graph(forward_batch)
        if forward_batch.forward_mode.is_decode_or_idle():
            self._assign_decode_rows(forward_batch)


class SparKTorchAttnBackend(SparKBackendMixin, AttentionBackend):
    """Devices without CUDA: CSR metadata from ``req_to_token`` with PyTorch ops, and the PyTorch
    path for every layer (dense layers read their plain buffers through the same code). No CUDA
    graphs (SGLang does not capture them off CUDA)."""

    def __init__(self, model_runner):
        super().__init__()
        num_qo_heads = model_runner.model_config.get_max_num_attention_heads() // get_parallel().attn_tp_size
        self._init_spark(model_runner, num_qo_heads, max_splits=1)
        self.csr: Csr | None = None

    def init_forward_metadata(self, forward_batch):
        if forward_batch.forward_mode.is_decode_or_idle():
            self.csr = self._gather_csr(forward_batch, forward_batch.seq_lens, forward_batch.seq_lens_cpu)
        else:
            self.csr = self._gather_csr(forward_batch, forward_batch.extend_prefix_lens,
                                        forward_batch.extend_prefix_lens_cpu, extend=True)  # fmt: skip
        self._init_spark_metadata(forward_batch)

    def _gather_csr(self, forward_batch, lens, lens_cpu, extend: bool = False) -> Csr:
        """Each request's first ``lens[b]`` slots; for an extend also its new tokens' offsets."""
        if lens_cpu is None:
            lens_cpu = lens.tolist()
        kv_indptr, kv_indices = gather_slots(self.spark_req_to_token_pool.req_to_token,
                                             forward_batch.req_pool_indices, lens, lens_cpu)  # fmt: skip
        if not extend:
            return Csr(kv_indptr, kv_indices, None, None)
        qo_indptr = torch.zeros(len(lens_cpu) + 1, dtype=torch.int32, device=self.spark_device)
        qo_indptr[1:] = torch.cumsum(forward_batch.extend_seq_lens.to(self.spark_device, torch.int64), 0)
        return Csr(kv_indptr, kv_indices, qo_indptr, max(forward_batch.extend_seq_lens_cpu, default=0))

    def _dense_forward(self, extend, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self._reject_extras(kwargs)
        cache = self.pool.layer_cache(layer.layer_id)
        if save_kv_cache and k is not None and v is not None:
            self.pool.store(layer.layer_id, forward_batch.out_cache_loc, k, v, self.write_rows, *kv_scales(layer))
        if not extend:
            return self._decode_attention(q, layer, cache.keys, cache.values, None)
        q3, k3, v3 = self._new_tokens(q, k, v, layer)
        return self._extend_attention(q3, k3, v3, layer, cache.keys, cache.values, None)

    def support_triton(self):
        return False
