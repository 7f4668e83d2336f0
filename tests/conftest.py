"""Test environment: CPU machines run Triton kernels in the interpreter, and SGLang's processes
keep their sockets and temp files in a folder this session removes."""

import logging
import os
import shutil
import sys
import tempfile

import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # sglang's CPU-engine path needs sgl_kernel, which cannot be installed here.
    os.environ.pop("SGLANG_USE_CPU_ENGINE", None)
    from spark_sglang.kernels.interpreter import install as _round_like_a_gpu

    _round_like_a_gpu()

_TMP = tempfile.mkdtemp(prefix="spark-tests-")
os.environ["TMPDIR"] = _TMP
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_TMP, "inductor"))
tempfile.tempdir = None


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_TMP, ignore_errors=True)


def pytest_unconfigure(config):
    # SGLang's exit-time engine shutdown logs to streams pytest has closed by then: drop those
    # records quietly instead of printing tracebacks after the test summary.
    logging.raiseExceptions = False


def pytest_report_header(config):
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (TRITON_INTERPRET=1)"
    return f"spark-sglang tests on {device}, torch {torch.__version__}, python {sys.version.split()[0]}"
