"""SparK through SGLang's HTTP server: OpenAI API, prefix caching, server info, the examples, and a
bad option refused by the launcher.

One embedded server (``spark_sglang.embedded``, SmolLM2-135M-Instruct, key ratio 0.5) serves the
whole module; on CPU the spark backend runs its PyTorch path.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

from spark_sglang.embedded import (  # noqa: E402
    embedded_server,
    free_port,
    kv_bytes_per_token,
    launch_command,
    server_env,
    server_info,
)
from spark_sglang.smollm2 import smollm2_path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEY_RATIO = 0.5


def load_example(name: str):
    """An example script as a module (examples/ is not a package)."""
    path = REPO / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"spark_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_path():
    return smollm2_path()


@pytest.fixture(scope="module")
def url(model_path):
    structured = load_example("structured_generation")
    with embedded_server(model_path, key_ratio=KEY_RATIO, extra_args=structured.COMPACT_JSON_ARGS) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="EMPTY", timeout=300)


def cached_tokens(response) -> int:
    details = response.usage.prompt_tokens_details
    assert details is not None, "the embedded server runs with --enable-cache-report"
    return details.cached_tokens


def test_completion(client):
    response = client.completions.create(model="default", prompt="def add(a, b):", max_tokens=8, temperature=0)
    choice = response.choices[0]
    assert isinstance(choice.text, str)
    assert 1 <= response.usage.completion_tokens <= 8
    assert choice.finish_reason in ("length", "stop")


def test_multi_turn_chat_reuses_the_prefix(client):
    messages = [{"role": "system", "content": "You answer briefly."}]
    previous_prompt = None
    for turn, question in enumerate(["Name a color.", "Another one?", "And a number?"], start=1):
        messages.append({"role": "user", "content": question})
        response = client.chat.completions.create(model="default", messages=messages, max_tokens=8, temperature=0)
        reply = response.choices[0].message.content
        assert isinstance(reply, str)
        assert response.usage.completion_tokens >= 1
        if previous_prompt is not None:
            # The new prompt starts with the whole previous prompt: the radix cache serves it from
            # the SparK pool.
            cached = cached_tokens(response)
            assert cached > 0, f"turn {turn}: no cached tokens"
            assert previous_prompt // 2 < cached < response.usage.prompt_tokens, (turn, cached, previous_prompt)
        previous_prompt = response.usage.prompt_tokens
        messages.append({"role": "assistant", "content": reply})


def test_server_info_reports_spark(url, model_path):
    info = server_info(url)
    assert info["attention_backend"] == "spark"
    assert info["spark_key_ratio"] == KEY_RATIO
    assert info["max_total_num_tokens"] > 0
    sizes = kv_bytes_per_token(url, model_path)
    # SmolLM2: 30 layers x 3 KV heads x head dim 64, float32 K and V
    assert sizes["dense"] == 30 * 3 * 2 * 64 * 4
    assert sizes["key_ratio"] == KEY_RATIO
    assert 0 < sizes["spark_slot"] <= sizes["spark"] < sizes["dense"]


def test_multi_turn_agent_example(url):
    agent = load_example("multi_turn_agent")
    summary = agent.main(["--url", url, "--turns", "3", "--max-tokens", "8"])
    assert summary["turns"] == 3
    cached, prompts = summary["cached_tokens"], summary["prompt_tokens"]
    assert all(c is not None for c in cached)
    for turn in (1, 2):  # every turn resends the conversation so far
        assert cached[turn] > cached[turn - 1], cached
        assert cached[turn] > prompts[turn - 1] // 2, (cached, prompts)
    assert summary["conversation_tokens"] > prompts[-1]
    assert 0 < summary["spark_bytes"] < summary["dense_bytes"]
    assert summary["saved_bytes"] == pytest.approx(summary["dense_bytes"] - summary["spark_bytes"])


def test_structured_generation_example(url):
    structured = load_example("structured_generation")
    result = structured.main(["--url", url])
    checks = result["checks"]
    assert checks["select_in_choices"], result["mode"]
    assert result["mode"] in structured.MODES
    assert checks["scores_match_regex"], result["scores"]
    assert checks["record_matches_regex"] and checks["record_is_json"], result["record"]
    assert checks["plan_is_valid_json"], (result["plan_text"], result["plan_error"])
    assert result["plan"]["mode"] in structured.MODES


def test_bad_option_fails_fast_naming_it(model_path, tmp_path):
    cmd = launch_command(model_path, key_ratio=1.5, port=free_port())
    start = time.monotonic()
    process = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env=server_env(str(tmp_path)), cwd=tmp_path, start_new_session=True,
    )  # fmt: skip
    try:
        output, _ = process.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"launcher still running after 150 s with --spark-key-ratio 1.5:\n{output[-3000:]!r}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    text = output.decode("utf-8", "replace")
    assert process.returncode != 0, text[-3000:]
    assert "spark_key_ratio" in text, text[-3000:]
    assert "out of range" in text, text[-3000:]
    print(f"refused in {time.monotonic() - start:.1f} s")


def test_agent_protocol_and_tools_offline():
    agent = load_example("multi_turn_agent")
    assert agent.parse_reply("x CALL calculator(17*23) y") == ("call", "calculator", "17*23")
    assert agent.parse_reply("ANSWER: 391") == ("answer", "391")
    assert agent.parse_reply("\x00gibberish")[0] == "none"
    assert agent.parse_reply(None)[0] == "none"
    assert agent.parse_reply("CALL rm(-rf)")[0] == "none"  # only the listed tools
    assert agent.run_tool("calculator", "(2 ** 10) % 7") == "2"
    assert agent.run_tool("calculator", "__import__('os')").startswith("error")
    assert agent.run_tool("list_files", "no") == "notes.txt"
    assert agent.run_tool("read_file", "/etc/passwd").startswith("error")
    import re

    assert re.fullmatch(agent.PROTOCOL_REGEX, "CALL list_files()")
    assert re.fullmatch(agent.PROTOCOL_REGEX, "ANSWER 42")


def test_port_taken_before_bind_is_detected(tmp_path):
    """uvicorn's bind failure is recognised at once (embedded_server then retries on another port)."""
    import subprocess

    from spark_sglang.embedded import PortInUse, wait_until_ready

    log = tmp_path / "server.log"
    log.write_text("ERROR:    [Errno 98] error while attempting to bind on address ('127.0.0.1', 1): address already in use\n")
    process = subprocess.Popen(["sleep", "30"])
    try:
        with pytest.raises(PortInUse):
            wait_until_ready("http://127.0.0.1:1", process, str(log), timeout=30)
    finally:
        process.kill()
        process.wait()
