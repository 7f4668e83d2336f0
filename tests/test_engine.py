"""End to end through ``sglang.Engine`` on CPU with a tiny random-weight GQA Llama.

The ``spark`` backend runs its PyTorch path on CPU; one case forces the Triton kernels
(``SPARK_SGLANG_KERNELS=triton``, in the interpreter, float32) end to end.
"""

import pytest
import sglang as sgl
import torch

from spark_sglang.kernels.layout import SparKConfig
from spark_sglang.tiny_model import build_tiny_llama
from tests.spark_hf_reference import SparKReferenceModel

PREFIX = "import os\nimport sys\n\ndef main(argv):\n    parser = argparse.ArgumentParser(description='tiny model test')\n"
PROMPTS = [PREFIX + "    return 0\n", PREFIX + "    print(argv)\n"]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def model_path():
    return build_tiny_llama()


def serve(model_path, backend, **options):
    """Run the two prompts one after the other (the second hits the radix cache)."""
    engine = sgl.Engine(model_path=model_path, device="cpu", attention_backend=backend, dtype="float32",
                        disable_cuda_graph=True, mem_fraction_static=0.02, random_seed=0,
                        log_level="error", **options)  # fmt: skip
    try:
        info = engine.get_server_info()
        outputs = [
            engine.generate(prompt=p, sampling_params={"temperature": 0, "max_new_tokens": NEW_TOKENS},
                            return_logprob=True)  # fmt: skip
            for p in PROMPTS
        ]
        tokenizer_ids = [engine.tokenizer_manager.tokenizer.encode(p) for p in PROMPTS]
    finally:
        engine.shutdown()
    return info, outputs, tokenizer_ids


@pytest.fixture(scope="module")
def dense(model_path):
    return serve(model_path, "triton")


def test_ratio_zero_matches_dense_triton_backend(model_path, dense):
    _, spark_outputs, _ = serve(model_path, "spark", spark_key_ratio=0.0)
    _, dense_outputs, _ = dense
    assert [o["output_ids"] for o in spark_outputs] == [o["output_ids"] for o in dense_outputs]
    assert spark_outputs[0]["meta_info"]["cached_tokens"] == 0
    assert spark_outputs[1]["meta_info"]["cached_tokens"] == dense_outputs[1]["meta_info"]["cached_tokens"] >= 60


@pytest.mark.parametrize(
    "config,kernels",
    [
        (SparKConfig(key_ratio=0.5), "cpp"),
        (SparKConfig(key_ratio=0.75, value_ratio=0.5, recovery="zero", window=8), "cpp"),
        (SparKConfig(key_ratio=0.5, value_ratio=0.3), "triton"),
        (SparKConfig(key_ratio=0.5, reproducible=True), "torch"),
    ],
    ids=["K0.5-mean-cpp", "K0.75-V0.5-zero-w8-cpp", "K0.5-V0.3-mean-triton", "K0.5-reproducible-torch"],
)
def test_spark_engine_matches_reference_model_and_saves_memory(model_path, dense, config, kernels, monkeypatch):
    """Greedy tokens and logprobs equal a transformers model whose cache is SparK-simulated by the
    PyTorch reference (radix-shared prefix included), and the pool holds more tokens."""
    monkeypatch.setenv("SPARK_SGLANG_KERNELS", kernels)  # inherited by the scheduler process
    info, outputs, ids = serve(
        model_path, "spark", spark_key_ratio=config.key_ratio, spark_value_ratio=config.value_ratio,
        spark_recovery=config.recovery, spark_window=config.window, spark_reproducible=config.reproducible or None,
    )  # fmt: skip
    assert info["spark_key_ratio"] == config.key_ratio and info["attention_backend"] == "spark"
    cached = outputs[1]["meta_info"]["cached_tokens"]
    assert cached >= 60

    oracle = SparKReferenceModel(model_path, config)
    first_ids, first_logprobs = oracle.generate(ids[0], NEW_TOKENS)
    second_ids, second_logprobs = oracle.generate(ids[1], NEW_TOKENS, cached=cached,
                                                  statistics=oracle.last_statistics)  # fmt: skip
    for output, expected_ids, expected_logprobs in [(outputs[0], first_ids, first_logprobs),
                                                    (outputs[1], second_ids, second_logprobs)]:  # fmt: skip
        assert output["output_ids"] == expected_ids
        logprobs = [entry[0] for entry in output["meta_info"]["output_token_logprobs"]]
        torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(expected_logprobs), rtol=0, atol=2e-4)


def test_same_memory_holds_more_tokens(model_path, capfd):
    """The pool is sized with SparK's bytes per token: K 0.75 + V 0.5 ("zero") on 2 layers x 2 KV
    heads x D 32, float32: key records 8*4 + 4 (bitmap) -> 48, value records 16*4 + 4 + 2 -> 80
    per head (16-byte records), a 4-byte row id and a window row (2 bfloat16 stats x 2 layers x
    2 heads x 32) per 128 tokens = 520 B vs 1024 B dense."""
    infos = []
    for backend, options in [("triton", {}), ("spark", dict(spark_key_ratio=0.75, spark_value_ratio=0.5,
                                                             spark_recovery="zero"))]:  # fmt: skip
        engine = sgl.Engine(model_path=model_path, device="cpu", attention_backend=backend, dtype="float32",
                            disable_cuda_graph=True, mem_fraction_static=0.02, log_level="info", **options)  # fmt: skip
        infos.append(engine.get_server_info())
        engine.shutdown()
    assert "SparK KV cache: 1024 bytes/token dense, 520 bytes/token SparK" in capfd.readouterr().err
    # tokens = budget // bytes per token. On CPU the budget is the free host RAM SGLang samples at
    # start-up, which any other process allocating meanwhile shifts by tens of MB (here 1.4x-1.7x
    # was seen for an ideal 2.3x); on a GPU it is device memory.
    gain = infos[1]["max_total_num_tokens"] / infos[0]["max_total_num_tokens"]
    assert gain > 1.2
