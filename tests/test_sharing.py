"""A request's answer is its own: it does not depend on what else the server is doing.

SmolLM2-135M-Instruct through ``sglang.Engine`` on CPU (the spark backend's PyTorch path), beside
SGLang's dense ``torch_native`` backend. Batch composition changes the matmul blocking of the
model's dense layers, and so the last bits of every activation, for any backend (measured on
torch_native: log-probs move by about 3e-6). SparK's per-token channel choice is a ranking: such a
last-bit change flips it where two channels' saliencies nearly tie, and a flipped channel moves
later log-probs by up to a few hundredths (measured: 0.04). Requests that share a batch position
and inputs (identical concurrent prompts) compute bit-identical results.
"""

import math

import pytest
import sglang as sgl

from spark_sglang.smollm2 import smollm2_path

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Give one reason to drink water.",
]
NEW_TOKENS = 12
#: SparK's log-prob gap allowed where the dense backend's last-bit noise can flip channel choices
#: (see the module docstring; measured up to 0.04 at key ratio 0.5).
FLIPPED_CHANNEL_BOUND = 0.15


def start(backend, **options):
    return sgl.Engine(model_path=smollm2_path(), device="cpu", attention_backend=backend, dtype="float32",
                      disable_cuda_graph=True, mem_fraction_static=0.05, max_total_tokens=8192,
                      random_seed=0, log_level="error", sleep_on_idle=True, **options)  # fmt: skip


@pytest.fixture(scope="module")
def prompts():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          tokenize=False) for q in QUESTIONS]  # fmt: skip


#: Engine options by name. One module-scoped engine at a time: Engine.shutdown kills every child
#: process of this one, a live engine's scheduler included, whose watchdog then kills the test.
ENGINES = {
    "torch_native": dict(attention_backend="torch_native"),
    "spark": dict(attention_backend="spark", spark_key_ratio=0.5),
    "spark-reproducible": dict(attention_backend="spark", spark_key_ratio=0.5, spark_reproducible=True),
}


@pytest.fixture(scope="module", params=list(ENGINES))
def engine(request):
    options = dict(ENGINES[request.param])
    engine = start(options.pop("attention_backend"), **options)
    yield request.param, engine
    engine.shutdown()


def generate(engine, prompts):
    outputs = engine.generate(prompt=prompts, sampling_params={"temperature": 0, "max_new_tokens": NEW_TOKENS},
                              return_logprob=True)  # fmt: skip
    return [(o["output_ids"], [entry[0] for entry in o["meta_info"]["output_token_logprobs"]],
             o["meta_info"]["cached_tokens"]) for o in outputs]  # fmt: skip


def largest_gap(a, b) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


def test_answer_does_not_depend_on_batch_position(engine, prompts):
    name, engine = engine
    target, others = prompts[0], prompts[1:]
    placements = {"alone": ([target], 0), "first": ([target, *others], 0),
                  "middle": ([others[0], target, others[1]], 1), "last": ([*others, target], 2)}  # fmt: skip
    results = {}
    for placement, (batch, index) in placements.items():
        assert engine.flush_cache().success  # no radix hits: only the batch differs
        results[placement] = generate(engine, batch)[index]
    alone_ids, alone_logprobs, _ = results["alone"]
    gap = 0.0
    for placement, (ids, logprobs, cached) in results.items():
        assert cached == 0, placement
        assert ids == alone_ids, placement
        gap = max(gap, largest_gap(logprobs, alone_logprobs))
    assert gap <= (1e-4 if name == "torch_native" else FLIPPED_CHANNEL_BOUND), gap


def test_identical_concurrent_prompts_get_one_answer(engine, prompts):
    _, engine = engine
    assert engine.flush_cache().success
    results = generate(engine, [prompts[1]] * 8)
    assert all(ids == results[0][0] for ids, _, _ in results)
    assert max(largest_gap(logprobs, results[0][1]) for _, logprobs, _ in results) <= 1e-5


def test_resent_prompt(engine, prompts):
    """The second request hits the radix cache on all but the last prompt token, whose query then
    reads the prompt compressed where the cold run read it dense: with SparK its log-probs move
    (tokens usually stay). Its decode tokens are compressed under the first request's window (a
    one-token extend keeps the prefix's row). With --spark-reproducible the last prompt query reads
    the cache as stored in the cold run too, so the first token and its log-prob are the cold run's.
    The later ones can move by a flipped channel: the hit recomputes the last prompt token alone, in
    other matmul bits than the cold prefill (seen on CI's CPU: 0.039). tests/test_deterministic.py
    checks the bit-exact version."""
    name, engine = engine
    for prompt in prompts if name == "spark-reproducible" else prompts[2:]:
        assert engine.flush_cache().success
        first_ids, first_logprobs, _ = generate(engine, [prompt])[0]
        second_ids, second_logprobs, cached = generate(engine, [prompt])[0]
        assert cached > 0
        if name == "spark":
            assert all(math.isfinite(x) for x in second_logprobs)
        else:
            assert second_ids == first_ids
            assert abs(first_logprobs[0] - second_logprobs[0]) <= 1e-4
            bound = 1e-4 if name == "torch_native" else FLIPPED_CHANNEL_BOUND
            assert largest_gap(first_logprobs, second_logprobs) <= bound
