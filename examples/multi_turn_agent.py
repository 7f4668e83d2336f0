"""A tool-using agent loop against a SparK SGLang server, through the OpenAI client.

Every turn resends the whole conversation, so from the second turn on the prompt starts with the
previous turn's prompt and SGLang's radix cache serves that prefix from the SparK KV pool: the
``cached tokens`` column grows turn by turn, and the per-token saving of SparK's compact cache
applies to all of it.

Tools are plain Python functions over fixed in-memory data (no file system, no network). The model
is asked to reply ``CALL tool(argument)`` or ``ANSWER text``; a reply that parses as neither counts
as a turn without a tool call (a 135M-parameter model often answers in prose instead; with
``--constrained`` the server decodes under the protocol's regex) and the loop goes on for a fixed
number of turns.

    python examples/multi_turn_agent.py                    # embedded SparK server (SmolLM2)
    python examples/multi_turn_agent.py --url http://127.0.0.1:30000 --turns 6
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import operator
import re
import time

# ----------------------------------------------------------------------------- tools

FILES = {
    "notes.txt": "SparK prunes key channels per token; recovery fills them at attention time.",
    "todo.md": "- benchmark decode\n- try key ratio 0.8",
    "config.json": '{"key_ratio": 0.5, "window": 32}',
}

_OPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
    ast.USub: operator.neg, ast.UAdd: operator.pos,
}  # fmt: skip


def calculator(expression: str) -> str:
    """Arithmetic, e.g. calculator(2*(3+4))."""

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Pow) and abs(right) > 64:
                raise ValueError("exponent too large")
            return _OPS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"unsupported expression element {type(node).__name__}")

    if len(expression) > 200:
        raise ValueError("expression too long")
    return repr(ev(ast.parse(expression, mode="eval")))


def list_files(prefix: str = "") -> str:
    """File names starting with a prefix."""
    names = sorted(n for n in FILES if n.startswith(prefix.strip()))
    return ", ".join(names) if names else "(no files)"


def read_file(name: str) -> str:
    """Contents of a file."""
    name = name.strip()
    if name not in FILES:
        raise ValueError(f"no file named {name!r}; see list_files()")
    return FILES[name]


TOOLS = {"calculator": calculator, "list_files": list_files, "read_file": read_file}

#: Kept short: on CPU every new prompt token costs a prefill step through the Triton interpreter.
SYSTEM_PROMPT = (
    "Tools:\n"
    + "".join(f"{name}: {fn.__doc__.strip()}\n" for name, fn in TOOLS.items())
    + "Reply one line: CALL tool(argument) or ANSWER text."
)
RETRY_MESSAGE = "Not understood. Reply CALL tool(argument) or ANSWER text."

TASKS = [
    "How many files are in the folder, and what is 17 * 23?",
    "What key ratio does config.json set? Multiply it by 128.",
    "Read todo.md and tell me the first item.",
    "What is (2 ** 10) % 7?",
]

#: With ``--constrained`` the server decodes under this regex (SGLang's ``regex`` extension of the
#: OpenAI API), so even a small model follows the protocol and the tools really run.
PROTOCOL_REGEX = r"(CALL (calculator|list_files|read_file)\([0-9a-z_.*+/-]{0,6}\)|ANSWER [0-9a-z ]{1,8})"
#: Reply tokens that always fit a PROTOCOL_REGEX match (one character per token at worst).
CONSTRAINED_MIN_TOKENS = 24

_CALL = re.compile(r"CALL\s+([A-Za-z_]\w*)\s*\((.*)\)", re.S)
_ANSWER = re.compile(r"ANSWER\b[:\s]*(.*)", re.S)


def parse_reply(text: str):
    """``("call", tool, argument)``, ``("answer", text)`` or ``("none", reason)``."""
    text = (text or "").strip()
    match = _CALL.search(text)
    if match:
        tool, argument = match.group(1), match.group(2).strip().strip("'\"")
        if tool not in TOOLS:
            return ("none", f"unknown tool {tool!r}")
        return ("call", tool, argument)
    match = _ANSWER.search(text)
    if match:
        return ("answer", match.group(1).strip())
    return ("none", "no CALL or ANSWER line")


def run_tool(tool: str, argument: str) -> str:
    try:
        return TOOLS[tool](argument)
    except Exception as error:  # a tool error is a message to the model, not a crash
        return f"error: {error}"


# ----------------------------------------------------------------------------- loop


def cached_tokens_of(response) -> int | None:
    """Cached prompt tokens of a chat response: ``usage.prompt_tokens_details.cached_tokens``
    (SGLang fills it when the server runs with ``--enable-cache-report``), else the choice's
    ``meta_info`` (asked for with ``return_meta_info``), else None."""
    details = getattr(response.usage, "prompt_tokens_details", None)
    if details is not None and getattr(details, "cached_tokens", None) is not None:
        return int(details.cached_tokens)
    meta = (response.choices[0].model_extra or {}).get("meta_info") or {}
    return int(meta["cached_tokens"]) if "cached_tokens" in meta else None


def agent_loop(client, model: str, turns: int, max_tokens: int, constrained: bool = False,
               log=print) -> list[dict]:  # fmt: skip
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": TASKS[0]}]
    next_task = 1
    records = []
    log(f"{'turn':>4} {'prompt tok':>10} {'cached tok':>10} {'time s':>7}  action")
    for turn in range(1, turns + 1):
        start = time.perf_counter()
        response = client.chat.completions.create(
            model=model, messages=messages, temperature=0,
            max_tokens=max(max_tokens, CONSTRAINED_MIN_TOKENS) if constrained else max_tokens,
            extra_body={"return_meta_info": True, **({"regex": PROTOCOL_REGEX} if constrained else {})},
        )  # fmt: skip
        elapsed = time.perf_counter() - start
        reply = response.choices[0].message.content or ""
        action = parse_reply(reply)
        messages.append({"role": "assistant", "content": reply})
        if action[0] == "call":
            result = run_tool(action[1], action[2])
            messages.append({"role": "user", "content": f"RESULT of {action[1]}({action[2]}): {result}"})
            shown = f"CALL {action[1]}({action[2]!r}) -> {result!r}"
        elif action[0] == "answer":
            task = TASKS[next_task % len(TASKS)]
            next_task += 1
            messages.append({"role": "user", "content": f"Next task: {task}"})
            shown = f"ANSWER {action[1]!r}"
        else:
            messages.append({"role": "user", "content": RETRY_MESSAGE})
            shown = f"no tool call ({action[1]}): {reply[:40]!r}"
        record = {
            "turn": turn,
            "prompt_tokens": response.usage.prompt_tokens,
            "completion_tokens": response.usage.completion_tokens,
            "cached_tokens": cached_tokens_of(response),
            "action": action[0],
            "tool_call": {"tool": action[1], "argument": action[2], "result": result} if action[0] == "call" else None,
            "seconds": elapsed,
        }
        records.append(record)
        cached = "n/a" if record["cached_tokens"] is None else record["cached_tokens"]
        log(f"{turn:>4} {record['prompt_tokens']:>10} {cached:>10} {elapsed:>7.2f}  {shown}")
    return records


def default_model(client) -> str:
    try:
        return client.models.list().data[0].id
    except Exception:
        return "default"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="base URL of a running SparK SGLang server (default: start an embedded one)")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--model", help="model name for the OpenAI API (default: the server's)")
    parser.add_argument("--constrained", action="store_true",
                        help="decode replies under a regex of the CALL/ANSWER protocol "
                        f"(max tokens then at least {CONSTRAINED_MIN_TOKENS})")  # fmt: skip
    args = parser.parse_args(argv)

    from openai import OpenAI

    from spark_sglang.embedded import check_loopback, embedded_server, kv_bytes_per_token

    with contextlib.ExitStack() as stack:
        url = args.url and check_loopback(args.url)
        if url is None:
            print("starting an embedded SparK server (SmolLM2) ...", flush=True)
            url = stack.enter_context(embedded_server())
        url = url.rstrip("/")
        client = OpenAI(base_url=url + "/v1", api_key="EMPTY", timeout=300)
        model = args.model or default_model(client)
        print(f"server {url}, model {model}")
        records = agent_loop(client, model, args.turns, args.max_tokens, args.constrained)
        sizes = kv_bytes_per_token(url)

    last = records[-1]
    tokens = last["prompt_tokens"] + last["completion_tokens"]
    dense, spark = sizes["dense"] * tokens, sizes["spark"] * tokens
    print(
        f"KV cache of the {tokens}-token conversation: dense {dense / 1024:.1f} KiB, SparK "
        f"(key ratio {sizes['key_ratio']}, value ratio {sizes['value_ratio']}, {sizes['dtype']}) "
        f"{spark / 1024:.1f} KiB: {(dense - spark) / 1024:.1f} KiB saved ({100 * (1 - spark / dense):.1f}%)"
    )
    return {
        "turns": len(records),
        "prompt_tokens": [r["prompt_tokens"] for r in records],
        "cached_tokens": [r["cached_tokens"] for r in records],
        "actions": [r["action"] for r in records],
        "tool_calls": [r["tool_call"] for r in records if r["tool_call"]],
        "seconds": [r["seconds"] for r in records],
        "conversation_tokens": tokens,
        "bytes_per_token": {"dense": sizes["dense"], "spark": sizes["spark"]},
        "dense_bytes": dense,
        "spark_bytes": spark,
        "saved_bytes": dense - spark,
    }


if __name__ == "__main__":
    main()
