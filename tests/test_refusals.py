"""Bad SparK options and unsupported setups stop start-up with a message naming the option.

These checks run in the launcher's argument resolution, before any scheduler process starts, so
the caller gets an ordinary exception.
"""

import warnings

import pytest
import sglang as sgl
from sglang.srt.plugins import load_plugins
from sglang.srt.server_args import prepare_server_args

from spark_sglang.server_args import SparkServerArgs
from spark_sglang.tiny_model import build_tiny_llama


@pytest.fixture(scope="module")
def model_path():
    return build_tiny_llama()


def start(model_path, **options):
    engine = sgl.Engine(model_path=model_path, device="cpu", dtype="float32", disable_cuda_graph=True,
                        mem_fraction_static=0.02, log_level="error", **options)  # fmt: skip
    engine.shutdown()


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(attention_backend="spark", spark_key_ratio=1.5), r"key_ratio=1\.5 is out of range.*spark_key_ratio"),
        (dict(attention_backend="spark", spark_value_ratio=-0.1), r"value_ratio.*spark_value_ratio"),
        (dict(attention_backend="spark", spark_window=0), r"window=0.*spark_window"),
        (dict(attention_backend="spark", spark_dense_layers="1,x"), r"dense_layers.*spark_dense_layers"),
        (dict(attention_backend="triton", spark_key_ratio=0.5), r"add --attention-backend spark"),
        (dict(attention_backend="spark", enable_mixed_chunk=True), r"--enable-mixed-chunk"),
        (dict(attention_backend="spark", decode_attention_backend="triton"), r"cannot be mixed with another backend"),
        (dict(attention_backend="spark", kv_cache_dtype="mxfp8"), r"MXFP8 and FP4 KV caches cannot be combined"),
        (dict(attention_backend="spark", spark_key_ratio="0.5"), r"key_ratio='0\.5' is a str, not a number"),
        (dict(attention_backend="spark", spark_window=2.5), r"window=2\.5 must be a positive integer, not a float"),
        (dict(attention_backend="spark", spark_dense_layers="0,7"), r"names layers \[7\] but the model has 2 layers"),
        (dict(attention_backend="spark", enable_dp_attention=True, dp_size=2), r"DP attention is not supported"),
        (dict(attention_backend="spark", enable_hierarchical_cache=True, hicache_storage_backend="file"),
         r"HiCache's storage tier is not supported.*drop --hicache-storage-backend"),
        (dict(attention_backend="spark", enable_deterministic_inference=True, spark_reproducible=False),
         r"--enable-deterministic-inference needs SparK's reproducible last query"),
    ],
    ids=["key-ratio", "value-ratio", "window", "dense-layers", "not-spark", "mixed-chunk", "mixed-backends", "mxfp8",
         "ratio-type", "window-type", "dense-layers-beyond-model", "dp-attention", "hicache-storage",
         "deterministic-without-reproducible"],
)
def test_engine_refuses_at_start_up(model_path, options, message):
    with pytest.raises(ValueError, match=message):
        start(model_path, **options)


def test_every_problem_is_listed_in_one_message(model_path):
    """Several bad options and an unsupported setting: one ValueError names each of them."""
    with pytest.raises(ValueError) as raised:
        start(model_path, attention_backend="spark", spark_key_ratio=2.0, spark_value_ratio="x",
              spark_window=0, enable_mixed_chunk=True)  # fmt: skip
    message = str(raised.value)
    for part in ("key_ratio=2.0", "value_ratio='x'", "window=0", "--enable-mixed-chunk"):
        assert part in message, part


def test_command_line_options_reach_server_args(model_path):
    load_plugins()
    args = prepare_server_args(["--model-path", model_path, "--attention-backend", "spark", "--spark-key-ratio",
                                "0.8", "--spark-recovery", "zero", "--spark-dense-layers", "0,1"])  # fmt: skip
    assert isinstance(args, SparkServerArgs)
    assert (args.spark_key_ratio, args.spark_recovery, args.spark_dense_layers) == (0.8, "zero", "0,1")
    assert args.spark_value_ratio is None  # not given: the default applies
    with pytest.raises(SystemExit):  # argparse names the flag and its choices
        prepare_server_args(["--model-path", model_path, "--spark-recovery", "gamma"])


def test_every_refused_option_is_a_server_args_field():
    """A renamed SGLang option would silently stop being checked: pin them to the pinned version."""
    from sglang.srt.server_args import ServerArgs

    from spark_sglang.refusals import _UNSUPPORTED_OPTIONS

    fields = set(ServerArgs.__struct_fields__)
    assert [option for option, _, _ in _UNSUPPORTED_OPTIONS if option not in fields] == []


def test_deterministic_inference_is_accepted_with_the_radix_cache(model_path):
    """spark is on SGLang's deterministic and radix-capable lists (patches/deterministic.py): the
    flag resolves without --disable-radix-cache, and SparK's config turns reproducible on."""
    from sglang.srt.arg_groups.overrides import resolved_view

    from spark_sglang.server_args import spark_config

    load_plugins()
    args = prepare_server_args(["--model-path", model_path, "--attention-backend", "spark", "--device", "cpu",
                                "--enable-deterministic-inference"])  # fmt: skip
    args.resolve_once()  # what the launcher runs: SGLang's deterministic checks, then SparK's
    resolved = resolved_view(args)
    assert resolved.enable_deterministic_inference and resolved.attention_backend == "spark"
    assert not resolved.disable_radix_cache and resolved.sampling_backend == "pytorch"
    assert spark_config(args).reproducible
    plain = prepare_server_args(["--model-path", model_path, "--attention-backend", "spark", "--device", "cpu"])
    plain.resolve_once()
    assert not spark_config(plain).reproducible


def test_fp8_cache_warns_on_a_fragile_architecture(model_path, monkeypatch):
    """The warning is wired into start-up: the tiny Llama stands in for a fragile architecture."""
    from spark_sglang import refusals

    with warnings.catch_warnings():
        warnings.simplefilter("error", refusals.FP8KeyWarning)  # a plain Llama: no warning
        start(model_path, attention_backend="spark", kv_cache_dtype="fp8_e4m3")
    monkeypatch.setattr(refusals, "FP8_FRAGILE_ARCHITECTURES", ("LlamaForCausalLM",))
    with pytest.warns(refusals.FP8KeyWarning, match=r"--kv-cache-dtype fp8_e4m3 on a LlamaForCausalLM model"):
        start(model_path, attention_backend="spark", kv_cache_dtype="fp8_e4m3")
