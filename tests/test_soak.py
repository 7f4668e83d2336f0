"""The CI-sized soak (``benchmarks/soak.py --quick``): mixed traffic on SmolLM2 through the spark
backend's CPU path, with aborts, bursts, chunked prefill and a pool small enough to evict. After
``flush_cache`` every slot and window row is back, and no log-prob is NaN or inf. The full run
(2000 requests, beside dense) is ``docs/soak.md``."""

import importlib.util
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"


def test_quick_soak_leaks_nothing():
    spec = importlib.util.spec_from_file_location("soak", SCRIPT)
    soak = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = soak  # its dataclasses resolve their annotations through it
    spec.loader.exec_module(soak)
    (result,) = soak.main(["--quick", "--requests", "48", "--concurrency", "8"])
    stats, spark = result["stats"], result["spark"]
    assert stats.served + stats.aborted == sum(stats.kinds.values()) >= 48
    assert stats.served > 0 and stats.bad_logprobs == 0
    assert spark["free_slots"] == spark["pool_slots"] == result["capacity"]
    assert spark["window_rows_live"] == 0
    assert result["counters"]["sglang:num_requests_total"] > 0  # SGLang's counters were read back
