"""Two SparK workers behind sglang-router: the router's answers are a single worker's answers.

One module fleet: two SparK HTTP servers (SmolLM2-135M-Instruct, key ratio 0.5; on CPU one core
and one torch thread each), started at once. Sessions run one after another, so every request
runs alone and the comparison is exact: a session's turns through the cache-aware router must
get the tokens, and the cached prompt tokens, that the same turns get on one worker alone
(sessions share no prefix, so only a session's own earlier turns can be cached). That holds only
if the router keeps each session on the worker whose SparK pool holds its earlier turns.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from spark_sglang import agent_load
from spark_sglang.fleet import healthy_workers, router, router_available, start_workers

REASON = router_available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"{REASON} (scripts/setup_env.sh installs it)")

REPO = Path(__file__).resolve().parents[1]
LOAD = dict(sessions=3, turns=3, concurrency=1, max_new_tokens=8, file_chars=400)


@pytest.fixture(scope="module")
def workers():
    from spark_sglang.smollm2 import smollm2_path

    started = start_workers(smollm2_path(), 2)
    try:
        yield started
    finally:
        for worker in started:
            worker.stop()


def flush(workers):
    for worker in workers:
        worker.flush()


def by_turn(turns):
    return {(t.session, t.turn): t for t in turns}


def test_cache_aware_router_gives_a_single_workers_answers(workers):
    flush(workers)
    single = by_turn(agent_load.run(workers[0].url, **LOAD))
    flush(workers)
    with router([w.url for w in workers], policy="cache_aware") as url:
        assert healthy_workers(url) == sorted(w.url for w in workers)
        routed = by_turn(agent_load.run(url, **LOAD))
    assert set(routed) == set(single) and len(single) == LOAD["sessions"] * LOAD["turns"]
    assert all(t.error is None for t in [*single.values(), *routed.values()]), [t.error for t in routed.values()]
    for key, turn in single.items():
        assert routed[key].output_ids == turn.output_ids, (key, routed[key].text, turn.text)
        assert routed[key].cached_tokens == turn.cached_tokens, (key, routed[key].cached_tokens, turn.cached_tokens)
        if key[1] > 0:  # a later turn is served from the session's earlier turns
            assert turn.cached_tokens > single[(key[0], key[1] - 1)].prompt_tokens // 2, (key, turn.cached_tokens)
    # Both pools took sessions: a new session goes to the worker with the smaller tree.
    pools = [w.spark_state() for w in workers]
    assert all(p["evictable_slots"] > 0 for p in pools), pools
    flush(workers)
    for pool in (w.spark_state() for w in workers):  # every slot and window row came back
        assert pool["free_slots"] == pool["pool_slots"] and pool["window_rows_live"] == 0, pool


def test_router_fleet_example_over_running_workers(workers):
    spec = importlib.util.spec_from_file_location("spark_example_router_fleet", REPO / "examples" / "router_fleet.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    flush(workers)
    result = example.main(["--worker-urls", *(w.url for w in workers), "--sessions", "2", "--turns", "2",
                           "--max-tokens", "4"])  # fmt: skip
    assert result["failed"] == 0 and result["requests"] == 4, result
    assert result["healthy"] == sorted(w.url for w in workers)
    assert result["cached_tokens"] > 0 and 0 < result["cached_share"] < 1, result
    for worker in workers:  # the router stopped; the workers it fronted keep serving
        assert worker.spark_state()["pool_slots"] > 0
