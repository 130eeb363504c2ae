"""An OpenAI-compatible HTTP server for one artifact, and a supervisor that keeps servers contained.

`run_server` serves an artifact with the transformers engine on 127.0.0.1:
- `GET /health` -> `{"status": "ok"}` (the model is loaded before the socket accepts anything);
- `POST /v1/completions` -> a prompt (text or token ids), greedy only; the answer carries the
  generated ids in `choices[0].token_ids`, so a comparison with `run` is exact, not textual;
- `POST /v1/chat/completions` -> messages rendered with the chat template carried by the artifact
  itself (never one from elsewhere: the template travelling with the file is what is under test),
  tokenized with the ground-truth tokenizer.

`ServerProcess` launches a server (ours, or llama-cpp-python's own `llama_cpp.server` for the
llama.cpp engine) in its own process group, waits for it to answer, and tears the whole group
down on exit, on an exception and on SIGTERM of the parent (how Snakemake stops jobs), so no
server outlives the job that started it.
"""

from __future__ import annotations

import argparse
import atexit
import http.client
import itertools
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

from pydantic import BaseModel, Field

from convqa.infer.engines.base import DEFAULT_THREADS, Engine, engine_for
from convqa.model import TokenizerSpec

HOST = "127.0.0.1"
DEFAULT_MAX_CONTEXT = 2048
# Readiness timeout: a fixed start-up cost plus loading time proportional to the artifact's size.
STARTUP_BASE_S = 30.0
STARTUP_PER_GB_S = 20.0
HEALTH_POLL_S = 0.2
# After SIGTERM, how long the process group gets before SIGKILL.
TERMINATE_GRACE_S = 10.0
GROUP_EXIT_WAIT_S = 2.0
REQUEST_TIMEOUT_S = 600.0


# ---------------------------------------------------------------- prompts


def render_chat(
    chat_template: str,
    messages: list[dict],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
) -> str:
    """Render `messages` with a Jinja chat template the way transformers does.

    Same sandbox and whitespace settings as `transformers.utils.chat_template_utils`
    (trim_blocks, lstrip_blocks, `raise_exception`), so the text equals `apply_chat_template`.
    """
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def strftime_now(fmt):
        return time.strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(chat_template).render(
        messages=messages, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=add_generation_prompt
    )


def special_token_text(spec: TokenizerSpec | None, token_id: int | None) -> str:
    """The spelling of a special token in the artifact's own vocabulary ('' when absent)."""
    if spec is None or token_id is None or not 0 <= token_id < len(spec.tokens):
        return ""
    return spec.tokens[token_id]


# ---------------------------------------------------------------- the app


# Request bodies live at module level: FastAPI resolves the (postponed) annotations of the
# endpoint functions in this module's namespace.
class CompletionRequest(BaseModel):
    model: str | None = None
    prompt: str | list[int]
    max_tokens: int = Field(default=16, ge=0)
    temperature: float = 0.0
    stop_token_ids: list[int] | None = None  # vLLM's extension: exact stop ids
    add_special_tokens: bool = True  # for text prompts: what the tokenizer adds (BOS, ...)


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatRequest(BaseModel):
    model: str | None = None
    messages: list[ChatMessage]
    max_tokens: int = Field(default=16, ge=0)
    temperature: float = 0.0
    stop_token_ids: list[int] | None = None


class ServingState:
    """What the endpoints share: one loaded engine (used under a lock), tokenizer, chat template."""

    def __init__(
        self, engine: Engine, tokenizer, artifact_tokenizer: TokenizerSpec | None, stop_ids: set[int], model_name: str
    ):
        self.engine = engine
        self.tokenizer = tokenizer  # the ground-truth HF tokenizer
        self.artifact_tokenizer = artifact_tokenizer
        self.stop_ids = set(stop_ids)
        self.model_name = model_name
        self.lock = threading.Lock()
        self.request_counter = itertools.count(1)

    def complete(self, prompt_ids: list[int], max_tokens: int, stop_ids: set[int] | None) -> dict:
        stops = self.stop_ids if stop_ids is None else set(stop_ids)
        with self.lock:
            generated = self.engine.generate(prompt_ids, max_tokens, stops)
        stopped = bool(generated) and generated[-1] in stops
        content_ids = generated[:-1] if stopped else generated
        return {
            "token_ids": generated,
            "text": self.tokenizer.decode(content_ids, skip_special_tokens=True),
            "finish_reason": "stop" if stopped else "length",
            "usage": {
                "prompt_tokens": len(prompt_ids),
                "completion_tokens": len(generated),
                "total_tokens": len(prompt_ids) + len(generated),
            },
        }

    def response_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self.request_counter)}"


def build_app(state: ServingState):
    from fastapi import FastAPI, HTTPException

    def require_greedy(temperature: float) -> None:
        if temperature != 0.0:
            raise HTTPException(
                status_code=400, detail=f"only greedy decoding is served: temperature must be 0, got {temperature}"
            )

    app = FastAPI(title="convqa serve")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "owned_by": "convqa"}]}

    @app.post("/v1/completions")
    def completions(request: CompletionRequest) -> dict:
        require_greedy(request.temperature)
        if isinstance(request.prompt, str):
            prompt_ids = state.tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens)
        else:
            prompt_ids = list(request.prompt)
        if not prompt_ids:
            raise HTTPException(status_code=400, detail="the prompt has no tokens")
        try:
            answer = state.complete(prompt_ids, request.max_tokens, request.stop_token_ids)
        except ValueError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc
        return {
            "id": state.response_id("cmpl"),
            "object": "text_completion",
            "created": int(time.time()),
            "model": state.model_name,
            "prompt_token_ids": prompt_ids,
            "choices": [
                {
                    "index": 0,
                    "text": answer["text"],
                    "token_ids": answer["token_ids"],
                    "logprobs": None,
                    "finish_reason": answer["finish_reason"],
                }
            ],
            "usage": answer["usage"],
        }

    @app.post("/v1/chat/completions")
    def chat_completions(request: ChatRequest) -> dict:
        require_greedy(request.temperature)
        spec = state.artifact_tokenizer
        if spec is None or not spec.chat_template:
            raise HTTPException(status_code=400, detail="the artifact carries no chat template")
        text = render_chat(
            spec.chat_template,
            [message.model_dump() for message in request.messages],
            bos_token=special_token_text(spec, spec.bos_token_id),
            eos_token=special_token_text(spec, spec.eos_token_id),
        )
        # The template already spells out every special token it wants.
        prompt_ids = state.tokenizer.encode(text, add_special_tokens=False)
        try:
            answer = state.complete(prompt_ids, request.max_tokens, request.stop_token_ids)
        except ValueError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc
        return {
            "id": state.response_id("chatcmpl"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": state.model_name,
            "prompt_token_ids": prompt_ids,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer["text"]},
                    "token_ids": answer["token_ids"],
                    "finish_reason": answer["finish_reason"],
                }
            ],
            "usage": answer["usage"],
        }

    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready socket; port 0 lets the kernel pick a free port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def run_server(
    artifact_path: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    host: str = HOST,
    port: int = 0,
    *,
    backend: str = "cpu",
    threads: int = DEFAULT_THREADS,
    max_context: int = DEFAULT_MAX_CONTEXT,
    stop_ids: set[int] | None = None,
    log_level: str = "warning",
) -> None:
    """Load `artifact_path` with the transformers engine and serve it until stopped.

    `stop_ids` defaults to the ground-truth tokenizer's EOS id; requests may override it.
    """
    import uvicorn
    from transformers import AutoTokenizer

    from convqa.formats import open_model

    with open_model(artifact_path) as artifact:
        artifact_tokenizer = artifact.tokenizer
    tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer_dir))
    if stop_ids is None:
        stop_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    engine = engine_for("transformers", backend, threads=threads, max_context=max_context)
    engine.load(artifact_path)
    state = ServingState(engine, tokenizer, artifact_tokenizer, stop_ids, Path(artifact_path).name)
    sock = bind_socket(host, port)
    print(f"convqa serve: {artifact_path} on http://{host}:{sock.getsockname()[1]}", flush=True)
    server = uvicorn.Server(uvicorn.Config(build_app(state), log_level=log_level))
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()


# ---------------------------------------------------------------- supervision


def free_port(host: str = HOST) -> int:
    """A port nothing listens on right now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def artifact_size_bytes(path: str | os.PathLike) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return path.stat().st_size


def startup_timeout_s(artifact_path: str | os.PathLike) -> float:
    return STARTUP_BASE_S + STARTUP_PER_GB_S * artifact_size_bytes(artifact_path) / 1e9


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
    ) -> "ServerProcess":
        port = free_port()
        argv = [
            sys.executable, "-m", "convqa.infer.server", os.fspath(artifact_path),
            "--tokenizer", os.fspath(tokenizer_dir), "--host", HOST, "--port", str(port),
            "--backend", backend, "--threads", str(threads), "--max-context", str(max_context),
        ]  # fmt: skip
        for stop_id in sorted(stop_ids or ()):
            argv += ["--stop-id", str(stop_id)]
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
            raise ServerError(f"{request.full_url}: no answer ({type(exc).__name__}: {exc}); {self.exit_state()}\n"
                              f"{self.log_tail(1500)}") from exc

    def exit_state(self) -> str:
        """'server still running' or how it ended (the signal by name)."""
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


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="convqa serve", description="Serve one artifact with the transformers engine (OpenAI-compatible, greedy)."
    )
    parser.add_argument("artifact", help="SafeTensors directory, .gguf or .apr file")
    parser.add_argument("--tokenizer", required=True, help="directory of the ground-truth HF tokenizer")
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--backend", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    parser.add_argument("--max-context", type=int, default=DEFAULT_MAX_CONTEXT)
    parser.add_argument("--stop-id", type=int, action="append", help="token id that ends generation (repeatable)")
    args = parser.parse_args(argv)
    run_server(
        args.artifact,
        args.tokenizer,
        args.host,
        args.port,
        backend=args.backend,
        threads=args.threads,
        max_context=args.max_context,
        stop_ids=set(args.stop_id) if args.stop_id else None,
    )


if __name__ == "__main__":
    main()
