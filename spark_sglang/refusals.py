"""What SparK does not support yet, refused at start-up with the option to change.

Runs in the launcher (SGLang's argument-resolution pipeline), before any scheduler process starts,
so the caller of ``sglang.Engine`` / ``launch_server`` gets an ordinary ``ValueError``.
"""

from __future__ import annotations

import warnings

from spark_sglang.kernels.layout import SparKConfig
from spark_sglang.server_args import BACKEND_NAME, deterministic, given_options, option_errors, spark_config

#: (server option, test on its resolved value, what to do)
_UNSUPPORTED_OPTIONS = (
    ("speculative_algorithm", lambda v: v is not None, "speculative decoding is not supported: drop --speculative-algorithm"),
    ("hicache_storage_backend", lambda v: v is not None, "HiCache's storage tier is not supported (its pages would "
        "reference window rows the device pool no longer keeps): drop --hicache-storage-backend; the host tier "
        "(--enable-hierarchical-cache) works"),
    ("disaggregation_decode_enable_offload_kvcache", bool, "decode-side KV offload is not supported: drop "
        "--disaggregation-decode-enable-offload-kvcache"),
    ("enable_hisparse", bool, "HiSparse is not supported: drop --enable-hisparse"),
    ("disaggregation_mode", lambda v: v not in (None, "null"), "PD disaggregation is not supported: drop --disaggregation-mode"),
    ("kv_cache_dtype", lambda v: v not in (None, "auto", "bf16", "bfloat16", "float16", "float32", "fp8_e4m3", "fp8_e5m2"),
        "MXFP8 and FP4 KV caches cannot be combined with SparK: use --kv-cache-dtype auto, fp8_e4m3 or fp8_e5m2"),
    ("enable_mixed_chunk", bool, "mixed prefill/decode batches are not supported: drop --enable-mixed-chunk"),
    ("enable_two_batch_overlap", bool, "two-batch overlap is not supported: drop --enable-two-batch-overlap"),
    ("enable_pdmux", bool, "PD multiplexing is not supported: drop --enable-pdmux"),
    ("enable_lmcache", bool, "LMCache is not supported: drop --enable-lmcache"),
    ("enable_kv_cache_sharding", bool, "KV-cache sharding is not supported: drop --enable-kv-cache-sharding"),
    ("enable_page_major_kv_layout", bool, "the page-major KV layout is not supported: drop --enable-page-major-kv-layout"),
    ("dcp_size", lambda v: v not in (None, 1), "decode context parallelism is not supported: use --dcp-size 1"),
    ("enable_dp_attention", bool, "DP attention is not supported: drop --enable-dp-attention "
        "(--dp-size N alone runs N replicas, each with its own SparK pool)"),
    ("attn_dp_size", lambda v: v not in (None, 1), "DP attention is not supported: use --attn-dp-size 1 "
        "(--dp-size N alone runs N replicas, each with its own SparK pool)"),
)  # fmt: skip
# Not refused: --dp-size N without DP attention. SGLang's DataParallelController then starts N
# independent schedulers, each with its own model runner, SparK pool and radix cache
# (tests/test_data_parallel.py). Its dispatch (round robin, or by queued requests / tokens) does
# not look at prefixes, so a multi-turn session's turns land on different pools and lose their
# radix hits: for agents, run one server per replica behind sglang-router's cache-aware policy
# (examples/router_fleet.py).


def unsupported_reasons(settings, backends, model_config) -> list[str]:
    """Every reason this configuration cannot run SparK (empty: it can).

    ``settings``: resolved server settings (attribute access); ``backends``: the (prefill, decode)
    attention backends; ``model_config``: SGLang's ModelConfig.
    """
    reasons = []
    if tuple(backends) != (BACKEND_NAME, BACKEND_NAME):
        reasons.append(
            f"--attention-backend spark cannot be mixed with another backend (prefill/decode backends "
            f"resolve to {tuple(backends)}): drop --prefill-attention-backend / --decode-attention-backend"
        )
    for option, is_set, fix in _UNSUPPORTED_OPTIONS:
        if is_set(getattr(settings, option, None)):
            reasons.append(fix)
    if deterministic(settings) and getattr(settings, "spark_reproducible", None) is False:
        reasons.append("--enable-deterministic-inference needs SparK's reproducible last query: "
                       "drop --spark-reproducible false (deterministic mode turns it on)")
    arch = str(getattr(model_config, "attention_arch", ""))
    if arch.endswith("MLA"):
        reasons.append("MLA models (e.g. DeepSeek) are not supported: use another attention backend")
    if getattr(model_config, "is_hybrid_swa", False) or getattr(model_config, "attention_chunk_size", None):
        reasons.append("hybrid sliding-window / chunked-attention models are not supported: use another attention backend")
    if getattr(model_config, "is_encoder_decoder", False):
        reasons.append("encoder-decoder models are not supported: use another attention backend")
    try:
        from sglang.srt.configs.hybrid_arch import mambaish_config

        if mambaish_config(model_config) is not None:
            reasons.append("hybrid linear-attention (Mamba-style) models are not supported: use another attention backend")
    except ImportError:  # not in every SGLang layout; the pool check in the scheduler backs it up
        pass
    head_dim, v_head_dim = getattr(model_config, "head_dim", None), getattr(model_config, "v_head_dim", None)
    if v_head_dim not in (None, head_dim):
        reasons.append(f"models with different key and value head dims ({head_dim}, {v_head_dim}) are not supported")
    return reasons


def model_reasons(config: SparKConfig, model_config) -> list[str]:
    """What this model's geometry rules out: head dim / dtype, dense layers it does not have."""
    reasons = []
    dtype = getattr(model_config, "dtype", None)
    if getattr(model_config, "head_dim", None) is not None and dtype is not None:
        try:
            config.layout(model_config.head_dim, dtype)
        except ValueError as error:
            reasons.append(str(error))
    num_layers = getattr(model_config, "num_hidden_layers", None)
    missing = [layer for layer in config.dense_layers if num_layers is not None and layer >= num_layers]
    if missing:
        reasons.append(f"--spark-dense-layers names layers {missing} but the model has {num_layers} layers "
                       f"(0 to {num_layers - 1})")  # fmt: skip
    return reasons


#: Architectures whose answers an FP8 KV cache was measured to break: Qwen2.5-Coder-1.5B passes 12
#: of 40 HumanEval problems with FP8 keys against 36 dense (docs/humaneval.md); its first layer's
#: keys (|k| up to 360) are the cause (docs/frontier.md). A warning, not a refusal: a user may have
#: checked their own model.
FP8_FRAGILE_ARCHITECTURES = ("Qwen2ForCausalLM",)


class FP8KeyWarning(UserWarning):
    """An FP8 KV cache under SparK on a model family where FP8 keys were measured to break answers."""


def fp8_warning(kv_cache_dtype, model_config) -> str | None:
    """The start-up warning for an FP8 cache on a fragile architecture, or None."""
    architectures = getattr(getattr(model_config, "hf_config", None), "architectures", None) or ()
    fragile = sorted(set(architectures) & set(FP8_FRAGILE_ARCHITECTURES))
    if not str(kv_cache_dtype).startswith("fp8") or not fragile:
        return None
    return (f"--kv-cache-dtype {kv_cache_dtype} on a {fragile[0]} model: on Qwen2.5-Coder-1.5B FP8 keys "
            "broke the answers (HumanEval 12/40 against 36/40 dense, SparK on FP8 11/40; docs/humaneval.md). "
            "Check your model's outputs, or use --kv-cache-dtype auto with SparK (34/40 at key ratio 0.5; "
            "docs/frontier.md: the first layer's keys are what FP8 breaks).")


def check(server_args, settings, backends, model_config) -> None:
    """Raise one ValueError listing everything to change, or return when SparK can run."""
    if BACKEND_NAME not in tuple(backends):
        given = given_options(server_args)
        if given:
            raise ValueError(
                f"SparK options {sorted(given)} were given but the attention backend is {tuple(backends)}: "
                "add --attention-backend spark (attention_backend='spark')"
            )
        return
    reasons = option_errors(server_args) + unsupported_reasons(settings, backends, model_config)
    if not option_errors(server_args):
        reasons += model_reasons(spark_config(server_args), model_config)
    if reasons:
        raise ValueError("--attention-backend spark cannot start:\n  - " + "\n  - ".join(reasons))
    message = fp8_warning(getattr(settings, "kv_cache_dtype", None), model_config)
    if message:
        warnings.warn(message, FP8KeyWarning, stacklevel=2)
