"""``benchmarks/bench_kernels.py --dry-run`` runs end to end on a CPU (Triton interpreter, tiny
shapes) and writes every table: the GPU benchmark's plumbing (caches laid out as the pool lays
them, the kernels' launch arguments, the baselines' calls, the report) is exercised without a GPU.
The numbers of a dry run mean nothing; its correctness checks must pass."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_kernels.py"


def _table(report: str, heading: str) -> list[list[str]]:
    """Body rows of the markdown table under ``heading``."""
    section = report.split(heading, 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_dry_run_writes_every_table(tmp_path):
    out = tmp_path / "bench_kernels.md"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, f"dry run failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    report = out.read_text()

    checks = _table(report, "## Correctness")
    assert {row[0] for row in checks} == {"compress", "decode", "extend"}
    assert {row[1] for row in checks} == {"fp16", "fp8e4m3"}
    assert all(row[3] == "PASS" for row in checks), checks

    decode = _table(report, "## Decode")
    for cache in ("fp16", "fp8e4m3"):
        for kernel in ("SparK K 0.5", "SparK K 0.8", "SparK K+V 0.5"):
            row = next(r for r in decode if r[1] == cache and r[2] == kernel)
            assert row[3] != "n/a" and float(row[3]) > 0, row
        # Baselines are measured or say why not (FlashInfer is not installed on CPU machines).
        for row in (r for r in decode if r[1] == cache and not r[2].startswith("SparK")):
            assert row[3] != "n/a" or row[-1], row

    prefill = _table(report, "## Prefill")
    assert any(row[2] == "SparK K 0.5" and row[4] != "n/a" for row in prefill), prefill
