"""``--dp-size 2`` with SparK on CPU: two replicas, each with its own SparK pool, give one replica's tokens.

SGLang's DataParallelController starts one scheduler per replica (its own model runner, pool and
radix cache). Prompt i is routed to replica i (``routed_dp_rank``: the dispatcher's round robin
also counts requests other than ours, so it cannot be relied on to alternate), and a last prompt
goes through the dispatcher unrouted, to exactly one replica. Each
prompt runs on an empty cache (``flush_cache`` first: the prompts share their first token, which a
single replica would serve from its radix cache), so both runs compute the same thing. The tiny
model keeps the start-ups short; one core per replica. The replicas load at the same time and each
takes what the other loads for its own weights, so the memory fraction is generous and
``max_total_tokens`` sizes the pools.
"""

import os

import pytest
import sglang as sgl

from spark_sglang.tiny_model import build_tiny_llama

PROMPTS = ["def parse(path):\n    with open(path) as f:\n", "import os\nimport sys\n\nclass Config:\n",
           "for line in lines:\n    if line.strip():\n"]


def replica_states(engine) -> list[dict]:
    """Every replica's SparK state, by rank (the replicas answer in any order)."""
    return sorted((state["spark"] for state in engine.get_server_info()["internal_states"]), key=lambda s: s["dp_rank"])


def serve(dp_size: int) -> tuple[list[list[int]], list[list[dict]]]:
    """Greedy tokens per prompt, and every replica's SparK state after each prompt and after the last flush."""
    engine = sgl.Engine(model_path=build_tiny_llama(), device="cpu", attention_backend="spark", spark_key_ratio=0.5,
                        dtype="float32", disable_cuda_graph=True, mem_fraction_static=0.3, max_total_tokens=2048,
                        dp_size=dp_size, random_seed=0, log_level="error", sleep_on_idle=True)  # fmt: skip
    tokens, states = [], []
    try:
        info = engine.get_server_info()
        for i, prompt in enumerate(PROMPTS):
            assert engine.flush_cache().success
            routed = {"routed_dp_rank": i} if dp_size > 1 and i < dp_size else {}
            output = engine.generate(prompt=prompt, sampling_params={"temperature": 0, "max_new_tokens": 12}, **routed)
            tokens.append(output["output_ids"])
            states.append(replica_states(engine))
        assert engine.flush_cache().success
        states.append(replica_states(engine))
    finally:
        engine.shutdown()
    assert info["attention_backend"] == "spark" and info["dp_size"] == dp_size
    return tokens, states


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two replicas need two cores")
def test_two_replicas_own_their_pools_and_give_the_tokens_of_one(monkeypatch):
    one, _ = serve(1)
    monkeypatch.setenv("SGLANG_CPU_OMP_THREADS_BIND", "0|1")  # SGLang asks for one core set per replica
    two, states = serve(2)
    assert two == one
    assert all([state["dp_rank"] for state in replicas] == [0, 1] for replicas in states), states
    # Prompt i was cached in replica i's pool, and only there; the unrouted one in one pool.
    holding = [[r for r, state in enumerate(replicas) if state["evictable_slots"] > 0] for replicas in states[:3]]
    assert holding[:2] == [[0], [1]] and len(holding[2]) == 1, (holding, states)
    for state in states[-1]:  # every slot and window row came back
        assert state["free_slots"] == state["pool_slots"], states[-1]
        assert state["window_rows_live"] == 0, states[-1]
