"""Structured generation with SGLang's frontend language on a SparK server.

One ``@sgl.function`` program that forks into parallel branches (they share the prompt prefix,
which SGLang's radix cache keeps once in the SparK KV pool), picks among fixed choices with
``sgl.select``, and constrains generation with a regular expression (``regex=``) and a JSON schema
(``json_schema=``). The results are checked against their constraints.

    python examples/structured_generation.py                    # embedded SparK server (SmolLM2)
    python examples/structured_generation.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re

import sglang as sgl

MODES = ["train", "plane", "bike"]
ASPECTS = ["food", "museums", "weather"]
SCORE_REGEX = r"(100|[1-9]?[0-9])"
#: A flat JSON record through a regular expression: valid JSON whatever the model prefers.
RECORD_REGEX = r'\{"city": "(Paris|Rome|Oslo)", "days": [1-9]\}'
PLAN_SCHEMA = {
    "type": "object",
    "properties": {
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "mode": {"type": "string", "enum": MODES},
    },
    "required": ["days", "mode"],
    "additionalProperties": False,
}
#: Server option that keeps JSON-schema output compact; without it a random-weight model can fill
#: its token budget with whitespace (the embedded server passes it).
COMPACT_JSON_ARGS = ("--constrained-json-disable-any-whitespace",)


@sgl.function
def trip_planner(s, city: str, max_json_tokens: int = 48):
    s += f"Plan a short trip to {city}.\n"
    s += "Travel mode: " + sgl.select("mode", choices=MODES) + "\n"
    branches = s.fork(len(ASPECTS))
    for branch, aspect in zip(branches, ASPECTS):
        branch += f"Rate {city} for {aspect} from 0 to 100: "
        branch += sgl.gen("score", max_tokens=4, regex=SCORE_REGEX)
    for branch, aspect in zip(branches, ASPECTS):
        s += f"{aspect}: {branch['score']}\n"
    s += "Record: " + sgl.gen("record", max_tokens=24, regex=RECORD_REGEX) + "\n"
    s += "Plan as JSON: " + sgl.gen("plan", max_tokens=max_json_tokens, json_schema=json.dumps(PLAN_SCHEMA))


def check_plan(plan: dict) -> None:
    """Validate against PLAN_SCHEMA (jsonschema when installed, else by hand)."""
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    if jsonschema is not None:
        jsonschema.validate(plan, PLAN_SCHEMA)
        return
    assert set(plan) == {"days", "mode"}, plan
    assert isinstance(plan["days"], int) and 1 <= plan["days"] <= 14, plan
    assert plan["mode"] in MODES, plan


def run(city: str = "Paris", max_json_tokens: int = 48) -> dict:
    state = trip_planner.run(city=city, max_json_tokens=max_json_tokens, temperature=0)
    text = state.text()
    scores = [re.search(rf"^{a}: (.*)$", text, re.M).group(1) for a in ASPECTS]
    record, plan_text = state["record"], state["plan"]
    try:
        record_json = json.loads(record)
    except ValueError:
        record_json = None
    try:
        plan = json.loads(plan_text)
        check_plan(plan)
        plan_error = None
    except Exception as error:
        plan, plan_error = None, f"{type(error).__name__}: {error}"
    checks = {
        "select_in_choices": state["mode"] in MODES,
        "scores_match_regex": all(re.fullmatch(SCORE_REGEX, s) is not None for s in scores),
        "record_matches_regex": re.fullmatch(RECORD_REGEX, record) is not None,
        "record_is_json": isinstance(record_json, dict),
        "plan_is_valid_json": plan is not None,
    }
    return {
        "text": text,
        "mode": state["mode"],
        "scores": scores,
        "record": record,
        "record_json": record_json,
        "plan_text": plan_text,
        "plan": plan,
        "plan_error": plan_error,
        "checks": checks,
        "ok": all(checks.values()),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="base URL of a running SparK SGLang server (default: start an embedded one)")
    parser.add_argument("--city", default="Paris")
    parser.add_argument("--max-json-tokens", type=int, default=48)
    args = parser.parse_args(argv)

    from spark_sglang.embedded import check_loopback, embedded_server, server_info

    with contextlib.ExitStack() as stack:
        url = args.url and check_loopback(args.url)
        if url is None:
            print("starting an embedded SparK server (SmolLM2) ...", flush=True)
            url = stack.enter_context(embedded_server(extra_args=COMPACT_JSON_ARGS))
        elif not server_info(url).get("constrained_json_disable_any_whitespace", True):
            print(f"note: the server runs without {COMPACT_JSON_ARGS[0]}; a weak model may fill the JSON "
                  "budget with whitespace (raise --max-json-tokens)")
        backend = sgl.RuntimeEndpoint(url.rstrip("/"))
        sgl.set_default_backend(backend)
        try:
            result = run(args.city, args.max_json_tokens)
        finally:
            sgl.set_default_backend(None)

    print("--- program text ---")
    print(result["text"])
    print("--- constraints ---")
    print(f"select   mode = {result['mode']!r} in {MODES}")
    print(f"regex    scores = {result['scores']} match {SCORE_REGEX}")
    print(f"regex    record = {result['record']!r} -> json {result['record_json']}")
    print(f"schema   plan = {result['plan_text']!r} -> {result['plan'] if result['plan'] is not None else result['plan_error']}")
    for name, ok in result["checks"].items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    return result


if __name__ == "__main__":
    raise SystemExit(0 if main()["ok"] else 1)
