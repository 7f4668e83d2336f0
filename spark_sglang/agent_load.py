"""A multi-turn agent load over SGLang's ``/generate``: many sessions, each growing turn by turn.

Each session works on its own file (a span of a bundled licence text) and asks a fixed series of
questions; every turn resends the whole transcript so far (task, file, earlier questions, the
model's own answers and a tool observation), so from the second turn on a prompt starts with the
previous turn's prompt and answer: a worker that served the previous turn serves that prefix from
its radix cache. Sessions start with different words, so two sessions share no prefix and a
session's cached tokens depend only on where its own earlier turns ran.

``run()`` drives the sessions against one base URL (a worker or a router) with up to
``concurrency`` sessions in flight, each session's turns in order, greedy decoding, and returns
one ``Turn`` per request; ``summary()`` turns them into the benchmark's figures.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from spark_sglang.fleet import post_json

#: First words of each session's prompt (distinct, so sessions share no radix prefix).
OPENINGS = ["Audit", "Review", "Summarise", "Inspect", "Check", "Explain", "Annotate", "Examine", "Study", "Assess"]
QUESTIONS = [
    "What is this file about? Answer in one sentence.",
    "Which obligations does it put on the user?",
    "Call a tool to find the word 'warranty' and report what you found.",
    "Give your final verdict in one line.",
    "List one risk you noticed.",
    "Propose a one-line fix.",
]
OBSERVATION = "Observation: grep found 2 matches; the text disclaims any warranty."


@dataclass
class Turn:
    session: int
    turn: int
    prompt: str
    output_ids: list | None = None
    text: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    error: str | None = None  # why the request failed (a dead worker: a connection or HTTP error)
    started: float = 0.0
    finished: float = 0.0


def session_file(index: int, chars: int) -> str:
    """Session ``index``'s file: a span of the bundled texts, different for every session."""
    from spark_sglang.texts import load_documents

    text = " ".join(doc.text for doc in load_documents())
    start = (index * 2311) % max(1, len(text) - chars)
    return text[start : start + chars]


def opening(index: int, file_chars: int) -> str:
    return (f"{OPENINGS[index % len(OPENINGS)]} file session-{index}.txt as a careful agent. "
            f"Tools: grep(pattern), read(line). The file:\n{session_file(index, file_chars)}\n")  # fmt: skip


def _session(url: str, index: int, turns: int, file_chars: int, max_new_tokens: int, timeout: float,
             stop: threading.Event, record) -> None:  # fmt: skip
    transcript = opening(index, file_chars)
    for t in range(turns):
        if stop.is_set():
            return
        transcript += f"\nUser: {QUESTIONS[t % len(QUESTIONS)]}\nAgent:"
        turn = Turn(index, t, transcript, started=time.perf_counter())
        try:
            out = post_json(url + "/generate", {"text": transcript, "sampling_params": {
                "temperature": 0, "max_new_tokens": max_new_tokens}}, timeout=timeout)  # fmt: skip
            meta = out["meta_info"]
            turn.output_ids, turn.text = out.get("output_ids"), out["text"]
            turn.prompt_tokens, turn.cached_tokens = meta["prompt_tokens"], meta.get("cached_tokens", 0)
            turn.completion_tokens = meta["completion_tokens"]
        except Exception as error:  # recorded: a session whose turn failed stops, as an agent would
            turn.error = f"{type(error).__name__}: {error}"[:300]
        turn.finished = time.perf_counter()
        turn.seconds = turn.finished - turn.started
        record(turn)
        if turn.error:
            return
        transcript += turn.text + "\n" + OBSERVATION


def run(url: str, *, sessions: int = 6, turns: int = 4, concurrency: int = 6, file_chars: int = 600,
        max_new_tokens: int = 12, timeout: float = 600, first_session: int = 0,
        stop: threading.Event | None = None, on_turn=None) -> list[Turn]:  # fmt: skip
    """Drive the load against ``url``; every turn, in the order they finished."""
    done: list[Turn] = []
    lock = threading.Lock()
    stop = stop or threading.Event()

    def record(turn: Turn) -> None:
        with lock:
            done.append(turn)
        if on_turn is not None:
            on_turn(turn)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(_session, url, first_session + i, turns, file_chars, max_new_tokens, timeout, stop,
                               record) for i in range(sessions)]  # fmt: skip
        for future in futures:
            future.result()
    return done


def summary(turns: list[Turn], seconds: float, reference: list[Turn] | None = None) -> dict:
    """Cached-token share, tokens per second, and answers equal to ``reference`` (same session and turn)."""
    ok = [t for t in turns if t.error is None]
    prompt = sum(t.prompt_tokens for t in ok)
    cached = sum(t.cached_tokens for t in ok)
    generated = sum(t.completion_tokens for t in ok)
    result = {
        "requests": len(turns), "failed": len(turns) - len(ok), "prompt_tokens": prompt, "cached_tokens": cached,
        "cached_share": cached / prompt if prompt else 0.0, "generated_tokens": generated, "seconds": seconds,
        "tokens_per_s": (prompt + generated) / seconds if seconds else 0.0,  # served: prompt (cached or not) + generated
        "generated_per_s": generated / seconds if seconds else 0.0,
    }  # fmt: skip
    if reference is not None:
        ref = {(t.session, t.turn): t.output_ids for t in reference if t.error is None}
        compared = [t for t in ok if (t.session, t.turn) in ref]
        result["equal_answers"] = sum(t.output_ids == ref[(t.session, t.turn)] for t in compared)
        result["compared_answers"] = len(compared)
    return result
