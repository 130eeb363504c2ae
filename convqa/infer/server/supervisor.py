"""A supervisor that keeps servers contained.

`ServerProcess` launches a server (ours, or llama-cpp-python's own `llama_cpp.server` for the
llama.cpp engine) in its own process group, waits for it to answer, and tears the whole group
down on exit, on an exception and on SIGTERM of the parent (how Snakemake stops jobs), so no
server outlives the job that started it.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from convqa.files import path_size
from convqa.infer.engines.base import DEFAULT_THREADS
from convqa.infer.server import DEFAULT_MAX_CONTEXT, HOST

# Readiness timeout: a fixed start-up cost plus loading time proportional to the artifact's size.
# Generous on purpose: a server that dies is seen at once (wait_ready polls the process), so the
# deadline only bounds a hung one, while a tight one turned a loaded machine into a false F-SERVE
# failure (30 s missed by a healthy transformers server on 2 cores at load 18; issue 12 mvp run).
STARTUP_BASE_S = 120.0
STARTUP_PER_GB_S = 60.0
HEALTH_POLL_S = 0.2
# After SIGTERM, how long the process group gets before SIGKILL.
TERMINATE_GRACE_S = 10.0
GROUP_EXIT_WAIT_S = 2.0
REQUEST_TIMEOUT_S = 600.0
# After a request lost its connection: how long the process may take to be seen dead. An abort
# closes the socket before the exit status can be read; on a loaded machine the gap was long
# enough that a server killed by SIGABRT was recorded as "still running" (and F-SERVE-001 went
# from fail to not_evaluated, run to run).
DEATH_GRACE_S = 5.0


def free_port(host: str = HOST) -> int:
    """A port nothing listens on right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def startup_timeout_s(artifact_path: str | os.PathLike) -> float:
    return STARTUP_BASE_S + STARTUP_PER_GB_S * path_size(artifact_path) / 1e9


class ServerError(RuntimeError):
    """A server did not start, died, or answered with an error."""


class ServerProcess:
    """A server subprocess in its own process group, killed as a group when the context ends.

    Use the `transformers` / `llama_cpp` constructors; `with ServerProcess.transformers(...) as srv:`
    returns once the server answers its health path, and `srv.post(...)` talks to it.
    """

    def __init__(
        self,
        argv: list[str],
        *,
        port: int,
        health_path: str,
        startup_timeout_s: float,
        log_path: str | os.PathLike | None = None,
        host: str = HOST,
    ):
        self.argv = list(argv)
        self.host = host
        self.port = port
        self.health_path = health_path
        self.startup_timeout_s = startup_timeout_s
        self.log_path = Path(log_path) if log_path is not None else None
        self.process: subprocess.Popen | None = None
        self._log_file = None
        self._previous_sigterm = None
        self._owns_sigterm = False

    @classmethod
    def transformers(
        cls,
        artifact_path: str | os.PathLike,
        tokenizer_dir: str | os.PathLike,
        *,
        backend: str = "cpu",
        threads: int = DEFAULT_THREADS,
        max_context: int = DEFAULT_MAX_CONTEXT,
        stop_ids: set[int] | None = None,
        log_path: str | os.PathLike | None = None,
        weights_dtype: str | None = None,
    ) -> "ServerProcess":
        # Imported (not only spawned) so the job's code fingerprint covers the app it serves with.
        from convqa.infer.server import app

        port = free_port()
        argv = [
            sys.executable, "-m", app.__package__, os.fspath(artifact_path),  # python -m convqa.infer.server
            "--tokenizer", os.fspath(tokenizer_dir), "--host", HOST, "--port", str(port),
            "--backend", backend, "--threads", str(threads), "--max-context", str(max_context),
        ]  # fmt: skip
        for stop_id in sorted(stop_ids or ()):
            argv += ["--stop-id", str(stop_id)]
        if weights_dtype is not None:
            argv += ["--weights-dtype", weights_dtype]
        return cls(
            argv,
            port=port,
            health_path="/health",
            startup_timeout_s=startup_timeout_s(artifact_path),
            log_path=log_path,
        )

    @classmethod
    def llama_cpp(
        cls,
        artifact_path: str | os.PathLike,
        *,
        backend: str = "cpu",
        threads: int = DEFAULT_THREADS,
        n_ctx: int = DEFAULT_MAX_CONTEXT,
        log_path: str | os.PathLike | None = None,
    ) -> "ServerProcess":
        """llama-cpp-python's own server with the engine's deterministic settings."""
        from convqa.infer.engines.llamacpp_engine import llama_settings

        port = free_port()
        argv = [sys.executable, "-m", "llama_cpp.server", "--model", os.fspath(artifact_path),
                "--host", HOST, "--port", str(port), "--verbose", "false",
                # The prompt cache would let one request's state leak into the next.
                "--cache", "false"]  # fmt: skip
        for key, value in llama_settings(backend, threads, n_ctx).items():
            argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
        # Its /v1/models answers once the model is loaded (it has no /health).
        return cls(
            argv,
            port=port,
            health_path="/v1/models",
            startup_timeout_s=startup_timeout_s(artifact_path),
            log_path=log_path,
        )

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> "ServerProcess":
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "wb")
        else:
            self._log_file = tempfile.TemporaryFile()
        self._install_sigterm_cleanup()
        atexit.register(self.stop)
        # A new session makes the server the leader of its own process group, so stop() can kill
        # it together with anything it forks (uvicorn workers, compiler helpers, ...).
        # No gdb backtrace on a ggml abort: the attach hangs where ptrace is not allowed (convqa.infer.isolated).
        self.process = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True,
            env={"GGML_NO_BACKTRACE": "1", **os.environ},
        )
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"{self.exit_state()} before answering:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base_url + self.health_path, timeout=HEALTH_POLL_S * 5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(HEALTH_POLL_S)
        raise ServerError(
            f"server did not answer {self.health_path} within {self.startup_timeout_s:.0f} s:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after the grace period."""
        process = self.process
        if process is not None:
            pgid = process.pid  # leader of its own session, so its pid is the group id
            _signal_group(pgid, signal.SIGTERM)
            try:
                process.wait(timeout=TERMINATE_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
            # Also reaches children that outlived the leader.
            _signal_group(pgid, signal.SIGKILL)
            process.wait()
            _wait_group_gone(pgid, GROUP_EXIT_WAIT_S)
            self.process = None
        if self._log_file is not None and self.log_path is not None:
            self._log_file.close()
            self._log_file = None
        self._restore_sigterm()
        atexit.unregister(self.stop)

    def log_tail(self, n_bytes: int = 4000) -> str:
        if self._log_file is None:
            return ""
        self._log_file.flush()
        if self.log_path is not None:
            data = self.log_path.read_bytes()
        else:
            self._log_file.seek(0)
            data = self._log_file.read()
        return data[-n_bytes:].decode("utf-8", errors="replace")

    def get(self, path: str) -> dict:
        return self._request(urllib.request.Request(self.base_url + path))

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(
            self.base_url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        return self._request(request)

    def _request(self, request: urllib.request.Request) -> dict:
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise ServerError(f"{request.full_url} answered {exc.code}: {exc.read().decode(errors='replace')}") from exc
        except (urllib.error.URLError, OSError, http.client.HTTPException, json.JSONDecodeError) as exc:
            # The server died while answering (llama.cpp aborts on some files at the first
            # forward pass), hung past the timeout, or answered something that is not JSON.
            raise ServerError(f"{request.full_url}: no answer ({type(exc).__name__}: {exc}); "
                              f"{self.exit_state(wait_s=DEATH_GRACE_S)}\n"
                              f"{self.log_tail(1500)}") from exc

    def exit_state(self, wait_s: float = 0.0) -> str:
        """'server still running' or how it ended (the signal by name), giving a process that is
        going down up to `wait_s` seconds to be reaped."""
        if self.process is not None and wait_s > 0:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=wait_s)
        if self.process is None or self.process.poll() is None:
            return "server still running"
        code = self.process.returncode
        if code < 0:
            return f"server killed by {signal.Signals(-code).name} (signal {-code})"
        return f"server exited with status {code}"

    def _install_sigterm_cleanup(self) -> None:
        """On SIGTERM, stop the server first, then let the previous disposition act."""
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread; atexit still applies
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum, frame):
            self.stop()
            if callable(previous):
                previous(signum, frame)
            else:
                # Restored SIG_DFL/SIG_IGN decides: the default ends this process as SIGTERM would.
                os.kill(os.getpid(), signum)

        self._previous_sigterm = previous
        signal.signal(signal.SIGTERM, on_sigterm)
        self._owns_sigterm = True

    def _restore_sigterm(self) -> None:
        if self._owns_sigterm and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._owns_sigterm = False

    def __enter__(self) -> "ServerProcess":
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass  # the group is already gone


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    """Give SIGKILLed members time to exit; signal 0 fails once the group is empty.

    Bounded, because orphaned zombies count as members until init reaps them.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
