"""SparK workers behind sglang-router, on this machine's loopback interface.

``Worker`` is one SparK SGLang HTTP server (``spark_sglang.embedded``) that can be killed and
started again on the same port, as a fault test needs. ``router()`` runs sglang-router's Rust
gateway (PyPI ``sglang-router``: ``python -m sglang_router.launch_router``) in front of worker
URLs. ``fleet()`` starts both: N workers at once (on CPU each pinned to its own core with one torch
thread) and a router over them, and stops everything on exit.

The router keeps an approximate radix tree of the text it routed to each worker; ``cache_aware``
sends a request to the worker whose tree matches most of it (if at least ``--cache-threshold`` of
it matches, else to the worker with the smallest tree), so the turns of one agent session stay on
the worker whose SparK pool holds that session's prefix.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Iterator, Sequence

from spark_sglang.embedded import (
    LOOPBACK,
    PortInUse,
    _log_tail,
    _start,
    _stop,
    _cuda_available,
    check_loopback,
    free_port,
)

ROUTER_MODULE = "sglang_router.launch_router"


def router_available() -> str | None:
    """None when sglang-router's gateway can be imported, else why not (for a skip or an error)."""
    try:
        import sglang_router.sglang_router_rs  # noqa: F401  (the Rust extension the gateway runs)
    except ImportError as error:
        return f"sglang-router is not installed ({error}): pip install sglang-router==0.3.2"
    return None


def post_json(url: str, payload: dict, timeout: float = 600) -> dict:
    """POST ``payload`` to a loopback URL; the decoded JSON answer, or RuntimeError with the status."""
    check_loopback(url)
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise RuntimeError(f"POST {url} answered {error.code}: {error.read()[:300]!r}") from None


def get_json(url: str, timeout: float = 30) -> dict:
    check_loopback(url)
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def memory_fraction(model_path: str, workers: int, kv_share: float = 0.3) -> float:
    """``--mem-fraction-static`` for a CPU worker started beside ``workers - 1`` others.

    On CPU SGLang takes the fraction of free host RAM and counts whatever that RAM lost while the
    weights loaded as the weights: workers loading at once count each other's weights too, and so
    does any other job's allocation meanwhile, hence the wide margin. The fraction only bounds the
    pool: ``--max-total-tokens`` sizes it.
    """
    from spark_sglang.demo import cpu_memory_fraction

    own = cpu_memory_fraction(model_path, kv_share=0.0)
    return round(min(0.95, own * workers + kv_share), 3)


class Worker:
    """One SparK HTTP server on a fixed loopback port; ``kill()`` and ``start()`` again."""

    def __init__(self, model_path: str, *, key_ratio: float = 0.5, port: int | None = None,
                 cpus: Sequence[int] | None = None, threads: int | None = None,
                 extra_args: Sequence[str] = (), startup_timeout: float = 420):  # fmt: skip
        self.model_path, self.key_ratio, self.cpus, self.threads = model_path, key_ratio, cpus, threads
        self.extra_args, self.startup_timeout = list(extra_args), startup_timeout
        self.port = port or free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.process: subprocess.Popen | None = None
        self.tmp_dir: str | None = None

    @classmethod
    def running(cls, url: str) -> "Worker":
        """A handle on a server someone else started (state and flush only; not killed or stopped)."""
        from urllib.parse import urlparse

        worker = cls("", port=urlparse(check_loopback(url)).port)
        return worker

    def start(self) -> "Worker":
        if self.tmp_dir:  # a killed run's folder (log, sockets)
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            self.tmp_dir = None
        for attempt in range(3):  # a port chosen free can be taken before the server binds it
            try:
                self.process, self.tmp_dir, self.url = _start(
                    self.model_path, self.port, self.startup_timeout, threads=self.threads, cpus=self.cpus,
                    key_ratio=self.key_ratio, extra_args=self.extra_args)  # fmt: skip
                return self
            except PortInUse:
                if attempt == 2:
                    raise
                time.sleep(2)  # same port: the router knows the worker by its URL
        return self

    def pids(self) -> list[int]:
        """Every live process of the worker's process group (launcher, scheduler, detokenizer)."""
        import psutil

        if self.process is None:
            return []
        found = []
        for proc in psutil.process_iter(["pid"]):
            with contextlib.suppress(psutil.Error):
                if os.getpgid(proc.pid) == self.process.pid and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc.pid)
        return found

    def kill(self) -> list[int]:
        """SIGKILL the whole worker at once, as a crash would; the pids it had."""
        pids = self.pids()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        return pids

    def log_tail(self, chars: int = 4000) -> str:
        return _log_tail(os.path.join(self.tmp_dir, "server.log"), chars) if self.tmp_dir else "(not started)"

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)
            self.process = None
        if self.tmp_dir:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
            self.tmp_dir = None

    def spark_state(self) -> dict:
        """The worker's SparK pool state (``/get_server_info``'s ``internal_states[0]["spark"]``)."""
        return get_json(self.url + "/get_server_info")["internal_states"][0]["spark"]

    def flush(self) -> None:
        """Empty the radix cache (only possible with no request running)."""
        check_loopback(self.url)
        request = urllib.request.Request(self.url + "/flush_cache", method="POST")
        with urllib.request.urlopen(request, timeout=60) as response:
            if response.status != 200:
                raise RuntimeError(f"{self.url}/flush_cache answered {response.status}")


def start_workers(model_path: str, count: int, *, key_ratio: float = 0.5, max_total_tokens: int = 8192,
                  extra_args: Sequence[str] = (), startup_timeout: float = 420) -> list[Worker]:  # fmt: skip
    """``count`` SparK workers started at once; on CPU worker i runs one torch thread on core i % cores."""
    cpu = not _cuda_available()
    args = list(extra_args)
    if cpu:  # later flags win over embedded.CPU_ARGS
        args = ["--max-total-tokens", str(max_total_tokens),
                "--mem-fraction-static", str(memory_fraction(model_path, count))] + args  # fmt: skip
    cores = sorted(os.sched_getaffinity(0))
    workers = [Worker(model_path, key_ratio=key_ratio, extra_args=args, startup_timeout=startup_timeout,
                      cpus=[cores[i % len(cores)]] if cpu else None, threads=1 if cpu else None)
               for i in range(count)]  # fmt: skip
    errors: list[BaseException] = []

    def start(worker):
        try:
            worker.start()
        except BaseException as error:  # reported below, after every start has finished
            errors.append(error)

    threads = [threading.Thread(target=start, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for worker in workers:
            worker.stop()
        raise errors[0]
    return workers


def router_command(worker_urls: Sequence[str], port: int, *, policy: str = "cache_aware",
                   metrics_port: int | None = None, extra_args: Sequence[str] = ()) -> list[str]:  # fmt: skip
    """The gateway's command line: loopback only (its HTTP and Prometheus listeners default to 0.0.0.0)."""
    for url in worker_urls:
        check_loopback(url)
    return [sys.executable, "-m", ROUTER_MODULE, "--host", LOOPBACK, "--port", str(port),
            "--worker-urls", *worker_urls, "--policy", policy,
            "--prometheus-host", LOOPBACK, "--prometheus-port", str(metrics_port or free_port()),
            # Notice a dead worker within seconds, not the default minute.
            "--health-check-interval-secs", "2", "--health-failure-threshold", "2",
            "--health-success-threshold", "1", "--log-level", "warn", *map(str, extra_args)]  # fmt: skip


def healthy_workers(router_url: str) -> list[str]:
    """URLs of the workers the router currently counts as healthy."""
    listing = get_json(router_url + "/workers")
    return sorted(w["url"] for w in listing.get("workers", []) if w.get("is_healthy", True))


@contextlib.contextmanager
def router(worker_urls: Sequence[str], *, policy: str = "cache_aware", extra_args: Sequence[str] = (),
           startup_timeout: float = 120) -> Iterator[str]:  # fmt: skip
    """Run sglang-router over ``worker_urls``; yields its base URL once every worker is registered."""
    reason = router_available()
    if reason:
        raise RuntimeError(reason)
    tmp_dir = tempfile.mkdtemp(prefix="spark-router-")
    log_path = os.path.join(tmp_dir, "router.log")
    for attempt in range(3):
        port = free_port()
        url = f"http://{LOOPBACK}:{port}"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(router_command(worker_urls, port, policy=policy, extra_args=extra_args),
                                       stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       cwd=tmp_dir, start_new_session=True)  # fmt: skip
        try:
            _wait_for_router(url, process, log_path, len(worker_urls), startup_timeout)
            break
        except PortInUse:
            _stop(process, grace=5)
            if attempt == 2:
                raise
        except BaseException:
            _stop(process, grace=5)
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
    try:
        yield url
    finally:
        _stop(process, grace=10)
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _wait_for_router(url: str, process: subprocess.Popen, log_path: str, workers: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            tail = _log_tail(log_path)
            if "Address already in use" in tail or "address in use" in tail.lower():
                raise PortInUse(url)
            raise RuntimeError(f"sglang-router exited with code {process.returncode}; its log:\n{tail}")
        with contextlib.suppress(OSError, ValueError, urllib.error.URLError):
            if len(healthy_workers(url)) >= workers:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"sglang-router at {url} did not list {workers} workers in {timeout:.0f} s; "
                               f"its log:\n{_log_tail(log_path)}")  # fmt: skip
        time.sleep(0.5)


@contextlib.contextmanager
def fleet(model_path: str | None = None, *, workers: int = 2, policy: str = "cache_aware", key_ratio: float = 0.5,
          worker_args: Sequence[str] = (), router_args: Sequence[str] = ()) -> Iterator[tuple[str, list[Worker]]]:  # fmt: skip
    """``workers`` SparK servers and sglang-router over them: yields (router URL, workers)."""
    if model_path is None:
        from spark_sglang.smollm2 import smollm2_path

        model_path = smollm2_path()
    started = start_workers(model_path, workers, key_ratio=key_ratio, extra_args=worker_args)
    try:
        with router([w.url for w in started], policy=policy, extra_args=router_args) as url:
            yield url, started
    finally:
        for worker in started:
            worker.stop()


@contextlib.contextmanager
def fleet_over(worker_urls: Sequence[str], *, policy: str = "cache_aware",
               router_args: Sequence[str] = ()) -> Iterator[tuple[str, list[Worker]]]:  # fmt: skip
    """sglang-router over SparK servers already running (left running on exit): yields (router URL, workers)."""
    workers = [Worker.running(url) for url in worker_urls]
    with router(worker_urls, policy=policy, extra_args=router_args) as url:
        yield url, workers
