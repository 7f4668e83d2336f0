"""``--enable-deterministic-inference`` with the spark backend: a prompt's answer, tokens and
log-probs, is bit-identical whatever else is served with it.

SmolLM2-135M-Instruct through ``sglang.Engine`` on CPU (the spark backend's C++ path), greedy.
One target prompt is served alone (cold, after ``flush_cache``), resent (a radix hit on its own
cached prompt), at different positions of batches of 3 and 8 different prompts, and as a burst of
8 identical copies among other prompts, under two chunked-prefill sizes (64: one prompt per
prefill batch; 256: several). Every answer must equal the cold one exactly. The prompts share no
prefix (a prefix cached by another prompt is read as that prompt compressed it: by design, see the
README). Each prompt is shorter than both chunk sizes: a prompt cut into chunks at different
places is compressed under different windows, also by design.

Without the flag the same plugin runs as before: reproducible off, ATen's own matmuls.
"""

import pytest
import sglang as sgl

from spark_sglang.demo import cpu_memory_fraction
from spark_sglang.smollm2 import smollm2_path

TARGET = ("The Zen of Python says that beautiful is better than ugly, explicit is better than implicit, and "
          "simple is better than complex. In your own words, what does this mean for a programmer?")  # fmt: skip
OTHERS = [
    "Write a short poem about the sea at night.",
    "List three facts about the planet Mars and explain why each one matters to scientists studying it.",
    "What is the capital of France?",
    "Explain how a bicycle stays upright when it is moving, in simple terms a child could follow.",
    "Give me a recipe for pancakes.",
    "Why do leaves change colour in autumn? Answer in two sentences.",
    "Translate 'good morning' into Spanish, German and Italian.",
    "Describe the rules of chess for a complete beginner, starting with how the pieces move.",
]
NEW_TOKENS = 8
#: mem_fraction_static above the weights' share: SGLang on CPU refuses to start when free RAM drops
#: while it loads (other jobs on a shared machine); max_total_tokens caps the pool anyway.
MEMORY_SLACK = 0.4
GREEDY = {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}


def start(**options):
    path = smollm2_path()
    return sgl.Engine(model_path=path, device="cpu", attention_backend="spark", dtype="float32",
                      disable_cuda_graph=True, mem_fraction_static=cpu_memory_fraction(path, MEMORY_SLACK),
                      max_total_tokens=8192, random_seed=0, log_level="error", sleep_on_idle=True,
                      **options)  # fmt: skip


def answer(output):
    """(token ids, log-probs) of one request: what must be bit-identical."""
    logprobs = output["meta_info"]["output_token_logprobs"]
    return output["output_ids"], [lp for lp, _, _ in logprobs]


def generate(engine, prompts, flush=True):
    if flush:
        engine.flush_cache()
    outputs = engine.generate(prompt=prompts, sampling_params=GREEDY, return_logprob=True)
    return outputs


def scenarios(engine) -> dict:
    """The target's answer in each setting (plus cached-token counts) from one engine."""
    runs = {}
    cold = generate(engine, [TARGET])[0]
    runs["cold"] = cold
    runs["radix hit"] = generate(engine, [TARGET], flush=False)[0]
    runs["batch of 3, position 1"] = generate(engine, [OTHERS[0], TARGET, OTHERS[1]])[1]
    runs["batch of 3, position 2"] = generate(engine, [OTHERS[2], OTHERS[3], TARGET])[2]
    runs["batch of 8, position 5"] = generate(engine, OTHERS[:5] + [TARGET] + OTHERS[5:7])[5]
    burst = generate(engine, [OTHERS[4]] + [TARGET] * 8 + [OTHERS[5]])[1:9]
    for i, output in enumerate(burst):
        runs[f"burst member {i}"] = output
    return runs


@pytest.fixture(scope="module")
def deterministic_runs():
    """Scenarios under chunked-prefill sizes 64 and 256, each in its own deterministic engine."""
    results = {}
    for chunk in (64, 256):
        engine = start(enable_deterministic_inference=True, chunked_prefill_size=chunk)
        try:
            info = engine.get_server_info()
            results[chunk] = (info, scenarios(engine))
        finally:
            engine.shutdown()
    return results


def test_deterministic_mode_is_accepted_with_the_radix_cache(deterministic_runs):
    info, _ = deterministic_runs[64]
    assert info["enable_deterministic_inference"] is True and info["attention_backend"] == "spark"
    assert info["disable_radix_cache"] is False  # spark is registered as radix-capable
    assert info["sampling_backend"] == "pytorch"  # SGLang's own deterministic setting
    spark = info["internal_states"][0]["spark"]
    assert spark["reproducible"] is True and spark["cpu_batch_invariant_matmuls"] is True


def test_answers_are_bit_identical_in_every_setting(deterministic_runs):
    reference = answer(deterministic_runs[64][1]["cold"])
    assert len(reference[0]) == NEW_TOKENS
    differing = []
    for chunk, (_, runs) in deterministic_runs.items():
        for name, output in runs.items():
            if answer(output) != reference:
                gap = max(abs(a - b) for a, b in zip(answer(output)[1], reference[1]))
                differing.append(f"chunked prefill {chunk}, {name}: log-prob gap {gap:.3g}")
    assert differing == []


def test_the_settings_exercised_what_they_claim(deterministic_runs):
    """The resend hit the radix cache; the cold runs did not (else the comparison is moot)."""
    for chunk, (_, runs) in deterministic_runs.items():
        assert runs["cold"]["meta_info"]["cached_tokens"] == 0
        assert runs["radix hit"]["meta_info"]["cached_tokens"] >= 30, chunk
        assert runs["batch of 8, position 5"]["meta_info"]["cached_tokens"] == 0


def test_without_the_flag_the_plugin_runs_as_before():
    engine = start(chunked_prefill_size=64)
    try:
        info = engine.get_server_info()
        outputs = generate(engine, OTHERS[:2] + [TARGET])
    finally:
        engine.shutdown()
    assert info["enable_deterministic_inference"] is False and info["disable_radix_cache"] is False
    spark = info["internal_states"][0]["spark"]
    assert spark["reproducible"] is False and spark["cpu_batch_invariant_matmuls"] is False
    assert [len(o["output_ids"]) for o in outputs] == [NEW_TOKENS] * 3
