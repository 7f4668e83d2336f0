"""Tensor parallelism on CPU: two ranks (one core each) serve SparK with the tokens of one rank.

Each rank holds half of the KV heads, so its pool, window tables and kernels see half the heads;
the tiny model (4 query / 2 KV heads) is used because SmolLM2's 3 KV heads do not split in two.
"""

import os

import pytest
import sglang as sgl

from spark_sglang.tiny_model import build_tiny_llama

PROMPTS = ["def parse(path):\n    with open(path) as f:\n", "import os\nimport sys\n\nclass Config:\n"]


def greedy(tp_size: int) -> list[list[int]]:
    engine = sgl.Engine(model_path=build_tiny_llama(), device="cpu", attention_backend="spark", spark_key_ratio=0.5,
                        dtype="float32", disable_cuda_graph=True, mem_fraction_static=0.02, tp_size=tp_size,
                        random_seed=0, log_level="error", sleep_on_idle=True)  # fmt: skip
    try:
        outputs = engine.generate(prompt=PROMPTS, sampling_params={"temperature": 0, "max_new_tokens": 12})
        info = engine.get_server_info()
    finally:
        engine.shutdown()
    assert info["tp_size"] == tp_size and info["attention_backend"] == "spark"
    return [o["output_ids"] for o in outputs]


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two ranks need two cores")
def test_two_ranks_give_the_tokens_of_one(monkeypatch):
    one = greedy(1)
    monkeypatch.setenv("SGLANG_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank
    assert greedy(2) == one
