"""The short version of the kernel fuzz (benchmarks/fuzz_kernels.py): seeded random cases of
compress -> decode / extend against the reference on the CPU paths (PyTorch and C++), a sample
through the Triton kernels in the interpreter, and corrupt metadata read safely by the CPU paths."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz_kernels.py"


@pytest.fixture(scope="module")
def fuzz():
    spec = importlib.util.spec_from_file_location("spark_fuzz_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("seed", [1000, 2000])
def test_pytorch_path_fuzz(fuzz, seed):
    totals = fuzz.fuzz(cases=30, triton=0, seed=seed)
    assert totals["torch cases"] == totals["cpp cases"] == 15
    assert totals["corrupt bitmap read as all-pruned"] > 0 and totals["row id out of range refused"] > 0


def test_triton_fuzz_sample(fuzz):
    totals = fuzz.fuzz(cases=0, triton=4, seed=3000)
    assert totals["triton cases"] == 4
