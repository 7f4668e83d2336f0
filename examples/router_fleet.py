"""Two SparK workers behind sglang-router (cache-aware policy), on this machine's loopback interface.

Starts two SparK SGLang HTTP servers (the embedded SmolLM2-135M-Instruct unless ``--model-path``;
on CPU each on its own core with one torch thread), then sglang-router's Rust gateway in front of
them, runs a few multi-turn agent sessions through the router and prints, per turn, how many
prompt tokens the worker served from its SparK radix cache. Everything stops on exit (Ctrl-C and
SIGTERM included).

    python examples/router_fleet.py                       # 2 workers, cache_aware, 3 sessions x 3 turns
    python examples/router_fleet.py --policy round_robin  # compare: turns bounce between the pools
    python examples/router_fleet.py --serve               # keep the fleet up; send requests to the router URL
    python examples/router_fleet.py --worker-urls http://127.0.0.1:30001 http://127.0.0.1:30002  # servers already running

Needs ``pip install sglang-router==0.3.2`` (scripts/setup_env.sh installs it). The same fleet by
hand: ``python -m sglang.launch_server --attention-backend spark ... --port 30001`` (and 30002), then
``python -m sglang_router.launch_router --host 127.0.0.1 --worker-urls http://127.0.0.1:30001
http://127.0.0.1:30002 --policy cache_aware --prometheus-host 127.0.0.1``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time


def main(argv=None) -> dict:
    from spark_sglang import agent_load
    from spark_sglang.fleet import fleet, fleet_over, healthy_workers, router_available

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--policy", default="cache_aware", choices=["cache_aware", "round_robin", "random", "power_of_two"])
    parser.add_argument("--key-ratio", type=float, default=0.5)
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--serve", action="store_true", help="after the sessions, keep serving until Ctrl-C")
    parser.add_argument("--worker-urls", nargs="+", default=None,
                        help="put the router in front of these running SparK servers instead of starting workers")
    args = parser.parse_args(argv)
    reason = router_available()
    if reason:
        raise SystemExit(reason)
    # SIGTERM unwinds like Ctrl-C, so the context managers stop the workers and the router.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        print(f"starting {args.workers} SparK workers and sglang-router ({args.policy}) ...", flush=True)
        if args.worker_urls:
            serving = fleet_over(args.worker_urls, policy=args.policy)
        else:
            serving = fleet(args.model_path, workers=args.workers, policy=args.policy, key_ratio=args.key_ratio)
        with serving as (url, workers):
            print(f"router {url} over {', '.join(w.url for w in workers)}", flush=True)
            start = time.perf_counter()
            turns = agent_load.run(url, sessions=args.sessions, turns=args.turns, concurrency=args.sessions,
                                   max_new_tokens=args.max_tokens)  # fmt: skip
            seconds = time.perf_counter() - start
            for t in sorted(turns, key=lambda t: (t.session, t.turn)):
                status = t.error or f"{t.cached_tokens:4d} of {t.prompt_tokens:4d} prompt tokens cached"
                print(f"  session {t.session} turn {t.turn}: {status}  {t.text.strip()[:40]!r}")
            result = agent_load.summary(turns, seconds)
            print(f"cached share {result['cached_share']:.0%}, {result['tokens_per_s']:.1f} tokens/s, "
                  f"{result['failed']} failed", flush=True)  # fmt: skip
            result.update(router=url, workers=[w.url for w in workers], healthy=healthy_workers(url),
                          pools=[w.spark_state() for w in workers], turns=turns)  # fmt: skip
            if args.serve:
                print(f"serving at {url} (Ctrl-C stops the fleet)", flush=True)
                while True:
                    time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
        return {}
    finally:
        signal.signal(signal.SIGTERM, previous)
    return result


if __name__ == "__main__":
    main()
