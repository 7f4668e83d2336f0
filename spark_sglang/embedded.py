"""A SparK-enabled SGLang HTTP server in a subprocess, for examples and tests.

``embedded_server()`` starts ``python -m sglang.launch_server --attention-backend spark ...`` on
127.0.0.1 and a free port, waits until it answers ``/health_generate``, yields its base URL and on
exit stops the whole process group (SGLang's scheduler and detokenizer children included) and
removes the private temp folder it ran in (its log, sockets and temp files).

On a machine without CUDA the server runs on CPU (``--device cpu --dtype float32``): the spark
backend then runs its PyTorch path. The default model is the embedded SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Iterator, Sequence

LOOPBACK = "127.0.0.1"
#: Flags for a CPU-only machine. ``--sleep-on-idle``: without it the idle scheduler busy-polls,
#: taking about half a core.
CPU_ARGS = (
    "--device", "cpu", "--dtype", "float32", "--disable-cuda-graph",
    "--max-total-tokens", "8192", "--mem-fraction-static", "0.05", "--sleep-on-idle",
)  # fmt: skip


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a dependency
        return False


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def check_loopback(url: str) -> str:
    """``url`` if it names this machine's loopback interface; ValueError otherwise."""
    from urllib.parse import urlparse

    host = urlparse(url).hostname
    if host not in (LOOPBACK, "localhost", "::1"):
        raise ValueError(f"only loopback servers (http://127.0.0.1:PORT) are used here, not {url!r}")
    return url


def _get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    check_loopback(url)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _log_tail(path: str, chars: int = 6000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - chars))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"


def launch_command(model_path: str, *, key_ratio: float | None = 0.5, value_ratio: float | None = None,
                   port: int, extra_args: Sequence[str] = (), cpu: bool | None = None) -> list[str]:  # fmt: skip
    """The ``sglang.launch_server`` command line ``embedded_server`` runs."""
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model_path,
           "--attention-backend", "spark"]  # fmt: skip
    if key_ratio is not None:
        cmd += ["--spark-key-ratio", str(key_ratio)]
    if value_ratio is not None:
        cmd += ["--spark-value-ratio", str(value_ratio)]
    # --enable-cache-report: OpenAI responses then carry usage.prompt_tokens_details.cached_tokens.
    cmd += ["--host", LOOPBACK, "--port", str(port), "--random-seed", "0", "--enable-cache-report"]
    if cpu if cpu is not None else not _cuda_available():
        cmd += list(CPU_ARGS)
    cmd += [str(a) for a in extra_args]
    return cmd


def server_env(tmp_dir: str, cpu: bool | None = None, threads: int | None = None) -> dict[str, str]:
    """The server's environment: private TMPDIR; on CPU SGLang's plain CPU platform; ``threads``:
    torch's intra-op threads in every server process (OMP_NUM_THREADS)."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env["TMPDIR"] = tmp_dir
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(tmp_dir, "inductor"))
    env["PYTHONUNBUFFERED"] = "1"
    if cpu if cpu is not None else not _cuda_available():
        env.pop("SGLANG_USE_CPU_ENGINE", None)  # that engine needs sgl_kernel
    return env


def _stop(process: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM the server's process group, then SIGKILL whatever is left after ``grace`` s."""
    pgid = process.pid  # started with start_new_session=True: it leads its own process group
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):  # children may outlive the launcher
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


class PortInUse(RuntimeError):
    """The HTTP port was taken between choosing it and binding it (e.g. by SGLang's own ports)."""


def wait_until_ready(url: str, process: subprocess.Popen, log_path: str, timeout: float) -> None:
    """Poll ``/health_generate`` (falling back to ``/health``) until it answers 200."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(
                f"SparK server exited with code {process.returncode} during start-up; "
                f"last lines of its log:\n{_log_tail(log_path)}"
            )
        if "error while attempting to bind" in _log_tail(log_path):  # uvicorn could not take the port
            raise PortInUse(f"{url}: the port was taken before the server bound it")
        for path in ("/health_generate", "/health"):
            try:
                status, _ = _get(url + path, timeout=30)
            except (OSError, urllib.error.URLError):
                break  # not listening yet
            if status == 200:
                return
            if status != 404:
                break  # up but not ready: poll again
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"SparK server at {url} not ready after {timeout:.0f} s; last lines of its log:\n"
                f"{_log_tail(log_path)}"
            )
        time.sleep(0.5)


@contextlib.contextmanager
def embedded_server(model_path: str | None = None, *, key_ratio: float | None = 0.5,
                    value_ratio: float | None = None, port: int | None = None,
                    extra_args: Sequence[str] = (), startup_timeout: float = 240, threads: int | None = None,
                    cpus: Sequence[int] | None = None) -> Iterator[str]:  # fmt: skip
    """Run a SparK SGLang server on 127.0.0.1; yields its base URL (``http://127.0.0.1:PORT``).

    ``model_path`` defaults to the embedded SmolLM2-135M-Instruct (``smollm2_path()``). ``threads``
    caps torch's threads per server process, ``cpus`` pins the server's processes to these cores.
    Raises ``RuntimeError`` with the tail of the server log when it dies or is not ready in
    ``startup_timeout`` seconds.
    """
    if model_path is None:
        from spark_sglang.smollm2 import smollm2_path

        model_path = smollm2_path()
    elif os.path.exists(model_path):  # the server runs in its temp folder
        model_path = os.path.abspath(model_path)
    attempts = 1 if port else 3  # a port we chose may be taken before the server binds it
    for attempt in range(attempts):
        try:
            process, tmp_dir, url = _start(model_path, port or free_port(), startup_timeout, threads=threads, cpus=cpus,
                                           key_ratio=key_ratio, value_ratio=value_ratio, extra_args=extra_args)  # fmt: skip
            break
        except PortInUse:
            if attempt == attempts - 1:
                raise
    try:
        yield url
    finally:
        _stop(process)
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _start(model_path: str, port: int, startup_timeout: float, threads: int | None = None,
           cpus: Sequence[int] | None = None, **options) -> tuple[subprocess.Popen, str, str]:  # fmt: skip
    """Start a server and wait until it is ready: (process, its temp folder, base URL)."""
    url = f"http://{LOOPBACK}:{port}"
    tmp_dir = tempfile.mkdtemp(prefix="spark-server-")
    log_path = os.path.join(tmp_dir, "server.log")
    cmd = launch_command(model_path, port=port, **options)
    if cpus and shutil.which("taskset"):  # pinned from exec on: the processes it spawns inherit the cores
        cmd = ["taskset", "-c", ",".join(map(str, cpus))] + cmd
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=server_env(tmp_dir, threads=threads), cwd=tmp_dir, start_new_session=True,
        )  # fmt: skip
    if cpus and not shutil.which("taskset"):  # before it spawns its scheduler (seconds of imports away)
        os.sched_setaffinity(process.pid, set(cpus))
    try:
        wait_until_ready(url, process, log_path, startup_timeout)
    except BaseException:
        _stop(process)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return process, tmp_dir, url


def server_info(url: str) -> dict:
    """``GET /get_server_info`` as a dict (server arguments, ``spark_*`` options included)."""
    status, body = _get(url.rstrip("/") + "/get_server_info", timeout=30)
    if status != 200:
        raise RuntimeError(f"GET {url}/get_server_info answered {status}: {body[:500]!r}")
    return json.loads(body)


def _torch_dtype(name: str | None, model_config: dict):
    import torch

    if name in (None, "auto"):
        name = model_config.get("torch_dtype") or model_config.get("dtype") or "bfloat16"
    name = str(name).replace("torch.", "")
    aliases = {"half": "float16", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    return getattr(torch, aliases.get(name, name))


def kv_bytes_per_token(url: str, model_path: str | None = None) -> dict:
    """KV-cache bytes per token (all layers and KV heads) of a running SparK server, dense vs SparK.

    The server does not report its pool's bytes per token over HTTP (its log has them), so this
    computes them as the server sizes its pool (``spark_sglang.patches.capacity``): with
    ``spark_sglang.kernels.layout.bytes_per_token``, the server's SparK options and dtype
    (``/get_server_info``) and the model's ``config.json`` (default: the server's model path).

    Figures are for the whole model (all KV heads; under tensor parallelism each GPU holds its
    share). Returns ``dense``, ``spark`` (every byte the pool holds per token: compact K/V, side data,
    row id, window-statistics tables amortised at the rate the pool provisions them),
    ``spark_slot`` (per-slot bytes only, tables left out), ``ratio``, ``key_ratio``,
    ``value_ratio`` and ``dtype``.
    """
    from spark_sglang.kernels.layout import bytes_per_token
    from spark_sglang.pool import TOKENS_PER_WINDOW_ROW
    from spark_sglang.server_args import spark_config

    info = server_info(url)
    model_path = model_path or info.get("model_path")
    with open(os.path.join(model_path, "config.json")) as f:
        config = json.load(f)
    config = config.get("text_config", config)
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv_heads = config.get("num_key_value_heads", heads)
    layers = config["num_hidden_layers"]
    kv_dtype = info.get("kv_cache_dtype")
    dtype = _torch_dtype(kv_dtype if kv_dtype not in (None, "auto") else info.get("dtype"), config)

    class _Args:  # spark_config reads the spark_* attributes the server reports
        pass

    args = _Args()
    for key, value in info.items():
        if key.startswith("spark_"):
            setattr(args, key, value)
    spark = spark_config(args)
    sizes = bytes_per_token(spark, head_dim, kv_heads, layers, dtype, tokens_per_window=TOKENS_PER_WINDOW_ROW)
    cell = float(-(-sizes["spark_total"] // 1))  # whole bytes, as the pool's cell size
    return {
        "dense": sizes["dense"],
        "spark": cell,
        "spark_slot": sizes["spark"],
        "ratio": cell / sizes["dense"],
        "key_ratio": spark.key_ratio,
        "value_ratio": spark.value_ratio,
        "dtype": str(dtype).replace("torch.", ""),
    }
