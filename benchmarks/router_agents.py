"""Multi-turn agents through sglang-router over two SparK workers: cache_aware vs round_robin, and a fault.

One fleet (2 SparK HTTP workers, SmolLM2-135M-Instruct, key ratio 0.5; on CPU one core and one
torch thread each) serves the same agent load (``spark_sglang.agent_load``: ``--sessions``
sessions in flight at once, each ``--turns`` turns, every turn resending its transcript) three
ways, caches flushed before each: one worker alone (the reference answers), then the router with
each ``--policies`` entry. The table gives the share of prompt tokens the workers served from
their radix caches (SGLang's ``meta_info.cached_tokens``), served tokens per second, and answers
equal to the single worker's at the same session and turn (concurrent batches differ between
the runs, so a nearly tied greedy choice can flip; once an answer differs the session's later
prompts differ too).

``--fault`` then runs the load once more through the cache-aware router (twice with
``--no-retries-too``: the router's defaults, then ``--disable-retries``), SIGKILLs the second
worker's whole process group once ``--kill-after`` turns have finished, and reports what the
requests in flight did (served after the router re-sent them, or failed with an error, and how
long either took), that the other worker kept serving, how long the killed worker took to
restart and be routed to again, and after a flush of both workers the soak's leak checks
(free slots against pool slots, live window rows) and whether any process of the killed worker
survived.

    python benchmarks/router_agents.py --fault --no-retries-too   # the run in docs/agents.md (about 20 min on 2 cores)
    python benchmarks/router_agents.py --dry-run --fault      # 2 sessions x 2 turns: the plumbing only
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

import torch

from spark_sglang import agent_load
from spark_sglang.fleet import healthy_workers, router, router_available, start_workers


def flush(workers) -> None:
    for worker in workers:
        worker.flush()


def pools(workers) -> list[dict]:
    return [worker.spark_state() for worker in workers]


def measure(url: str, args, reference=None) -> tuple[dict, list]:
    start = time.perf_counter()
    turns = agent_load.run(url, **load_options(args))
    result = agent_load.summary(turns, time.perf_counter() - start, reference)
    return result, turns


def load_options(args, **overrides) -> dict:
    options = dict(sessions=args.sessions, turns=args.turns, concurrency=args.sessions,
                   max_new_tokens=args.max_new_tokens, file_chars=args.file_chars)  # fmt: skip
    options.update(overrides)
    return options


def comparison(args, workers) -> list[tuple[str, dict, list[dict]]]:
    """(name, summary, cached slots per worker) for the single worker and each policy."""
    rows = []
    flush(workers)
    single, reference = measure(workers[0].url, args)
    rows.append(("1 worker (no router)", single, [p["evictable_slots"] for p in pools(workers)[:1]]))
    print(f"  single worker: {single}", file=sys.stderr, flush=True)
    for policy in args.policies:
        flush(workers)
        with router([w.url for w in workers], policy=policy) as url:
            result, _ = measure(url, args, reference)
        rows.append((f"2 workers, router {policy}", result, [p["evictable_slots"] for p in pools(workers)]))
        print(f"  {policy}: {result}", file=sys.stderr, flush=True)
    return rows


def comparison_table(rows) -> str:
    lines = ["| | cached prompt tokens (share) | served tokens / s | generated tokens / s | seconds | "
             "answers equal to 1 worker | failed | radix-cached slots per worker |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r, cached in rows:
        equal = f"{r['equal_answers']} / {r['compared_answers']}" if "equal_answers" in r else "(reference)"
        lines.append(f"| {name} | {r['cached_tokens']} / {r['prompt_tokens']} ({r['cached_share']:.0%}) | "
                     f"{r['tokens_per_s']:.1f} | {r['generated_per_s']:.2f} | {r['seconds']:.0f} | {equal} | "
                     f"{r['failed']} | {' / '.join(map(str, cached))} |")  # fmt: skip
    return "\n".join(lines)


def fault(args, workers, retries: bool) -> dict:
    """Kill workers[1] in the middle of the load; what happened, the restart, and the leak checks."""
    import psutil

    flush(workers)
    victim, survivor = workers[1], workers[0]
    total = args.sessions * args.turns
    kill_after = args.kill_after if args.kill_after is not None else total // 3
    finished, killed = [], threading.Event()
    facts: dict = {"retries": retries, "kill_after": kill_after}
    extra = [] if retries else ["--disable-retries"]

    def on_turn(turn):
        finished.append(turn)
        if len(finished) >= kill_after and not killed.is_set():
            killed.set()
            facts["killed_at"] = time.perf_counter()
            facts["killed_pids"] = victim.kill()

    with router([w.url for w in workers], policy="cache_aware", extra_args=extra) as url:
        start = time.perf_counter()
        turns = agent_load.run(url, **load_options(args), on_turn=on_turn)
        facts["load_seconds"] = time.perf_counter() - start
        kill = facts.get("killed_at", float("inf"))
        in_flight = [t for t in turns if t.started < kill < t.finished]
        after = [t for t in turns if t.started >= kill]
        facts.update(
            requests=len(turns), failed=sum(t.error is not None for t in turns),
            in_flight=len(in_flight), in_flight_served=sum(t.error is None for t in in_flight),
            in_flight_failed=sum(t.error is not None for t in in_flight),
            in_flight_max_s=max((t.finished - kill for t in in_flight), default=0.0),
            errors=sorted({t.error.split(":")[0] for t in in_flight if t.error}),
            error_sample=next((t.error for t in in_flight if t.error), None),
            after_kill=len(after), after_kill_served=sum(t.error is None for t in after),
            survivor_healthy=survivor.url in healthy_workers(url),
            victim_routed_after_kill=victim.url in healthy_workers(url),
        )  # fmt: skip
        time.sleep(1)
        facts["leftover_pids"] = [p for p in facts.get("killed_pids", [])
                                  if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]  # fmt: skip
        restart = time.perf_counter()
        victim.start()
        facts["restart_s"] = time.perf_counter() - restart
        deadline = time.monotonic() + 120
        while victim.url not in healthy_workers(url) and time.monotonic() < deadline:
            time.sleep(0.5)
        facts["routed_again_s"] = time.perf_counter() - restart
        facts["victim_healthy_again"] = victim.url in healthy_workers(url)
        # New sessions after the restart: the cache-aware router sends them to the emptier pool.
        more = agent_load.run(url, **load_options(args, sessions=2, turns=2, first_session=100))
        facts["after_restart"] = len(more)
        facts["after_restart_failed"] = sum(t.error is not None for t in more)
        facts["victim_cached_slots_after_restart"] = victim.spark_state()["evictable_slots"]
    flush(workers)
    facts["pools_after_flush"] = pools(workers)
    facts["leak_free"] = all(p["free_slots"] == p["pool_slots"] and p["window_rows_live"] == 0
                             for p in facts["pools_after_flush"])  # fmt: skip
    return facts


def fault_table(runs: list[dict]) -> str:
    rows = [
        ("router retries", lambda f: "default (on)" if f["retries"] else "--disable-retries"),
        ("worker 2 SIGKILLed after turns finished", lambda f: f["kill_after"]),
        ("requests in flight at the kill", lambda f: f["in_flight"]),
        ("... served (router re-sent them) / failed", lambda f: f"{f['in_flight_served']} / {f['in_flight_failed']}"),
        ("... error seen by the client", lambda f: f["error_sample"] or "-"),
        ("... latest answer or error after the kill (s)", lambda f: f"{f['in_flight_max_s']:.1f}"),
        ("requests sent after the kill: served / sent", lambda f: f"{f['after_kill_served']} / {f['after_kill']}"),
        ("all requests: failed / sent", lambda f: f"{f['failed']} / {f['requests']}"),
        ("worker 1 healthy throughout", lambda f: f["survivor_healthy"]),
        ("processes of the killed worker left", lambda f: len(f["leftover_pids"])),
        ("restart: ready (s) / routed to again (s)", lambda f: f"{f['restart_s']:.0f} / {f['routed_again_s']:.0f}"),
        ("after restart: failed / sent, slots cached on worker 2",
         lambda f: f"{f['after_restart_failed']} / {f['after_restart']}, {f['victim_cached_slots_after_restart']}"),
        ("after flush: free slots / pool (worker 1, worker 2)",
         lambda f: ", ".join(f"{p['free_slots']} / {p['pool_slots']}" for p in f["pools_after_flush"])),
        ("after flush: live window rows / rows",
         lambda f: ", ".join(f"{p['window_rows_live']} / {p['window_rows']}" for p in f["pools_after_flush"])),
        ("nothing leaked", lambda f: f["leak_free"] and not f["leftover_pids"]),
    ]  # fmt: skip
    lines = ["| | " + " | ".join(f"run {i + 1}" for i in range(len(runs))) + " |", "|---" * (len(runs) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(str(get(f)) for f in runs) + " |" for label, get in rows]
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--sessions", type=int, default=6)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--file-chars", type=int, default=600, help="characters of each session's file")
    parser.add_argument("--key-ratio", type=float, default=0.5)
    parser.add_argument("--policies", default="cache_aware,round_robin")
    parser.add_argument("--fault", action="store_true", help="also kill a worker in the middle of the load")
    parser.add_argument("--no-retries-too", action="store_true", help="repeat the fault with --disable-retries")
    parser.add_argument("--kill-after", type=int, default=None, help="finished turns before the kill (default: a third)")
    parser.add_argument("--dry-run", action="store_true", help="2 sessions x 2 turns of 4 tokens: the plumbing only")
    parser.add_argument("--out", default=None, help="also write the tables to this file")
    args = parser.parse_args(argv)
    args.policies = [p for p in args.policies.split(",") if p]
    if args.dry_run:
        args.sessions, args.turns, args.max_new_tokens, args.file_chars = 2, 2, 4, 300
    reason = router_available()
    if reason:
        raise SystemExit(reason)
    torch.set_num_threads(1)  # this process only sends requests
    from spark_sglang.smollm2 import smollm2_path

    model_path = args.model_path or smollm2_path()
    started = time.perf_counter()
    workers = start_workers(model_path, 2, key_ratio=args.key_ratio)
    print(f"  2 workers ready in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    try:
        rows = comparison(args, workers)
        faults = []
        if args.fault:
            faults.append(fault(args, workers, retries=True))
            if args.no_retries_too:
                faults.append(fault(args, workers, retries=False))
    finally:
        for worker in workers:
            worker.stop()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores, one per worker)"
    header = (f"{args.sessions} sessions x {args.turns} turns (all sessions in flight, {args.max_new_tokens} new "
              f"tokens a turn, greedy, {args.file_chars}-character file per session), SparK K {args.key_ratio}, "
              f"SmolLM2-135M-Instruct, {device}; caches flushed before each run.")  # fmt: skip
    text = header + "\n\n" + comparison_table(rows)
    if faults:
        text += "\n\nFault: worker 2 killed (SIGKILL, whole process group) under the cache-aware router.\n\n" + fault_table(faults)
    print(text, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return {"rows": rows, "faults": faults, "text": text}


if __name__ == "__main__":
    main()
