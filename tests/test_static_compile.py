"""Every Triton kernel compiles for sm_90 with real Triton, no GPU needed.

The kernel tests run on CPU under the Triton interpreter, which accepts code that real Triton
rejects (host functions called in a kernel, wrong ``tl`` signatures, unsupported layouts). This
runs ``benchmarks/static_report.py --quick`` in a subprocess without ``TRITON_INTERPRET`` (this
process has it set by conftest.py), so the kernels go through Triton's compiler and the bundled
``ptxas``, and checks that the report has numbers for each kernel family.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "static_report.py"
FAMILIES = ("SparK decode", "SparK extend", "SparK compress", "SGLang decode")


def _bundled_ptxas() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def _table(report: str) -> list[dict[str, str]]:
    """Rows of the report's markdown table, as {column: cell}."""
    lines = [line for line in report.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [
        dict(zip(header, (cell.strip() for cell in line.strip("|").split("|"))))
        for line in lines[2:]
    ]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@pytest.mark.skipif(
    not _bundled_ptxas().exists(), reason="the triton wheel's bundled ptxas is missing"
)
def test_quick_static_report_compiles_every_kernel():
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    failures = proc.stdout.partition("Failures:")[2]
    assert proc.returncode == 0, f"static report failed:\n{failures or proc.stdout}\n{proc.stderr}"
    rows = _table(proc.stdout)
    for family in FAMILIES:
        measured = [
            row
            for row in rows
            if row["family"] == family
            and row["regs"].isdigit()
            and _is_number(row["warp-instr/B"])
        ]
        assert measured, f"no row with registers and instructions/byte for {family}:\n{proc.stdout}"
