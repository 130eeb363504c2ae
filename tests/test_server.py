"""The OpenAI-compatible server and the process supervisor around it.

The answers are checked against the engine token for token (F-SERVE-001); the supervisor is
checked to leave nothing running however its context ends: normally, by an exception, or by
SIGTERM of the parent process (how Snakemake cancels a job).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from test_engines import (
    PROMPT,
    SMOLLM2_EOS,
    build_tiny_model,
    needs_llama_cpp,
    smollm2_gguf,
    tiny_tokenizer,
)
from transformers import AutoTokenizer

from convqa.infer.engines import engine_for
from convqa.infer.chat_template import render_chat
from convqa.infer.server.supervisor import ServerError, ServerProcess, free_port

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("qwen2"), "qwen2")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with ServerProcess.transformers(model_dir, model_dir, log_path=log) as srv:
        yield srv


@pytest.fixture(scope="module")
def engine(model_dir):
    with engine_for("transformers", "cpu") as engine:
        yield engine.load(model_dir)


def gone(pid: int) -> bool:
    """The process has exited and been reaped (a zombie still counts as alive here)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return all(gone(p.pid) for p in psutil.process_iter() if _pgid(p.pid) == pgid)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


# ---------------------------------------------------------------- answers


def test_health_and_models(server):
    assert server.get("/health") == {"status": "ok"}
    assert server.get("/v1/models")["data"][0]["object"] == "model"


def test_completion_token_ids_equal_engine_generate(server, engine):
    expected = engine.generate(PROMPT, 10, set())
    answer = server.post(
        "/v1/completions", {"prompt": PROMPT, "max_tokens": 10, "temperature": 0, "stop_token_ids": []}
    )
    choice = answer["choices"][0]
    assert choice["token_ids"] == expected
    assert choice["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 10
    assert choice["text"] == tiny_tokenizer().decode(expected, skip_special_tokens=True)


def test_text_prompt_is_tokenized_with_the_ground_truth_tokenizer(server, engine, model_dir):
    text = "The capital of France is"
    ids = AutoTokenizer.from_pretrained(model_dir).encode(text)
    answer = server.post("/v1/completions", {"prompt": text, "max_tokens": 6, "stop_token_ids": []})
    assert answer["prompt_token_ids"] == ids
    assert answer["choices"][0]["token_ids"] == engine.generate(ids, 6, set())


def test_stop_token_ids_end_the_answer(server, engine):
    free_run = engine.generate(PROMPT, 10, set())
    stop = free_run[3]
    expected = free_run[: free_run.index(stop) + 1]
    answer = server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 10, "stop_token_ids": [stop]})
    choice = answer["choices"][0]
    assert choice["token_ids"] == expected and choice["finish_reason"] == "stop"
    # The text leaves the stop token out, as OpenAI-style servers do.
    assert choice["text"] == tiny_tokenizer().decode(expected[:-1], skip_special_tokens=True)


def test_chat_uses_the_artifacts_template(server, engine, model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    expected_prompt = tokenizer.apply_chat_template(
        MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    answer = server.post("/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 8, "stop_token_ids": []})
    assert answer["prompt_token_ids"] == list(expected_prompt)
    assert answer["choices"][0]["token_ids"] == engine.generate(list(expected_prompt), 8, set())
    assert answer["choices"][0]["message"]["role"] == "assistant"


def test_only_greedy_is_served(server):
    with pytest.raises(ServerError, match="400.*temperature must be 0"):
        server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "temperature": 0.7})
    with pytest.raises(ServerError, match="422"):
        server.post("/v1/completions", {"prompt": PROMPT, "max_tokens": -1})


def test_render_chat_matches_transformers(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    conversation = MESSAGES + [{"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"}]
    expected = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert render_chat(tokenizer.chat_template, conversation) == expected


# ---------------------------------------------------------------- supervision (no model needed)


def http_server_argv(port: int, *, with_grandchild: bool = False) -> list[str]:
    """A stand-in server: Python's http.server, optionally forking a long-lived grandchild first."""
    code = textwrap.dedent(f"""
        import http.server, subprocess, sys
        if {with_grandchild}:
            subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        http.server.ThreadingHTTPServer(("127.0.0.1", {port}), http.server.SimpleHTTPRequestHandler).serve_forever()
        """)
    return [sys.executable, "-c", code]


def test_process_group_is_killed_on_exit_and_on_exception():
    port = free_port()
    with ServerProcess(
        http_server_argv(port, with_grandchild=True), port=port, health_path="/", startup_timeout_s=20
    ) as srv:
        pid = srv.pid
        children = psutil.Process(pid).children(recursive=True)
        assert children, "the stand-in server should have forked a grandchild"
    assert gone(pid) and all(gone(c.pid) for c in children) and group_gone(pid)

    port = free_port()
    with pytest.raises(RuntimeError, match="boom"):
        with ServerProcess(http_server_argv(port), port=port, health_path="/", startup_timeout_s=20) as srv:
            pid = srv.pid
            raise RuntimeError("boom")
    assert gone(pid) and group_gone(pid)


def test_a_server_that_aborts_after_dropping_the_connection_is_seen_dead():
    """llama.cpp aborts on a forward pass: the client sees the connection drop before the exit
    status can be read. Under load the gap was long enough that a server killed by SIGABRT was
    recorded as still running, and F-SERVE-001 flipped from fail to not_evaluated. Here the gap
    is made 1 s on purpose."""
    port = free_port()
    code = textwrap.dedent(f"""
        import http.server, os, socket, time
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200); self.end_headers(); self.wfile.write(b"{{}}")
            def do_POST(self):
                self.connection.shutdown(socket.SHUT_RDWR)  # drop the client first, as an abort does
                time.sleep(1.0)
                os.abort()
        http.server.HTTPServer(("127.0.0.1", {port}), Handler).serve_forever()
        """)
    with ServerProcess([sys.executable, "-c", code], port=port, health_path="/", startup_timeout_s=20) as srv:
        with pytest.raises(ServerError, match="server killed by SIGABRT"):
            srv.post("/v1/completions", {"prompt": "x"})
        assert srv.exit_state() == "server killed by SIGABRT (signal 6)"


def test_startup_failure_and_timeout_are_reported_and_cleaned_up():
    crash = [sys.executable, "-c", "import sys; print('cannot load model'); sys.exit(3)"]
    with pytest.raises(ServerError, match=r"exited with status 3(.|\n)*cannot load model"):
        with ServerProcess(crash, port=free_port(), health_path="/health", startup_timeout_s=20):
            pass
    mute = ServerProcess(
        [sys.executable, "-c", "import time; time.sleep(600)"],
        port=free_port(),
        health_path="/health",
        startup_timeout_s=1,
    )
    with pytest.raises(ServerError, match="did not answer /health within 1 s"):
        with mute:
            pass
    assert mute.process is None


def test_sigterm_to_the_parent_kills_the_server_group(tmp_path):
    """The parent (a Snakemake job) gets SIGTERM while holding a server: nothing may survive it."""
    port = free_port()
    argv = http_server_argv(port, with_grandchild=True)
    parent_code = textwrap.dedent(f"""
        import time
        from convqa.infer.server.supervisor import ServerProcess
        with ServerProcess({argv!r}, port={port}, health_path="/", startup_timeout_s=20) as srv:
            print(srv.pid, flush=True)
            time.sleep(600)
        """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    try:
        server_pid = int(parent.stdout.readline())
        family = [server_pid] + [c.pid for c in psutil.Process(server_pid).children(recursive=True)]
        assert len(family) == 2
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) == -signal.SIGTERM  # it still dies of the signal, after cleanup
        deadline = time.monotonic() + 10
        while not all(gone(pid) for pid in family) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(gone(pid) for pid in family) and group_gone(server_pid)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


# ---------------------------------------------------------------- llama.cpp's server


@needs_llama_cpp
def test_llamacpp_server_answers_like_the_llamacpp_engine():
    gguf = smollm2_gguf()
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    with engine_for("llama.cpp", "cpu", max_context=256) as engine:
        engine.load(gguf)
        # As llama.cpp's server tokenizes: BOS only if the file asks for it, special tokens parsed.
        ids = engine.llm.tokenize(prompt.encode(), add_bos=True, special=True)
        generated = engine.generate(ids, 12, {SMOLLM2_EOS})
        expected = engine.detokenize(generated[:-1] if generated[-1] == SMOLLM2_EOS else generated)
    with ServerProcess.llama_cpp(gguf, n_ctx=256) as srv:
        answer = srv.post(
            "/v1/completions",
            # Greedy, and no repetition penalty (the server's default of 1.1 would change the argmax).
            {"prompt": prompt, "max_tokens": 12, "temperature": 0, "repeat_penalty": 1.0, "seed": 0},
        )
    assert "Paris" in expected
    assert answer["choices"][0]["text"] == expected
    assert answer["usage"]["prompt_tokens"] == len(ids)
