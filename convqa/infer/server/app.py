"""The HTTP server: one artifact served with the transformers engine on 127.0.0.1.

`run_server` serves an artifact with the transformers engine on 127.0.0.1:
- `GET /health` -> `{"status": "ok"}` (the model is loaded before the socket accepts anything);
- `POST /v1/completions` -> a prompt (text or token ids), greedy only; the answer carries the
  generated ids in `choices[0].token_ids`, so a comparison with `run` is exact, not textual;
- `POST /v1/chat/completions` -> messages rendered with the chat template carried by the artifact
  itself (never one from elsewhere: the template travelling with the file is what is under test),
  tokenized with the ground-truth tokenizer.
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket
import threading
import time
from pathlib import Path

from pydantic import BaseModel, Field

from convqa.infer.chat_template import render_chat, special_token_text
from convqa.infer.weights_dtype import WEIGHTS_DTYPES
from convqa.infer.engines import engine_for
from convqa.infer.engines.base import DEFAULT_THREADS, Engine
from convqa.infer.server import DEFAULT_MAX_CONTEXT, HOST
from convqa.model import TokenizerSpec


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
    weights_dtype: str | None = None,
) -> None:
    """Load `artifact_path` with the transformers engine and serve it until stopped.

    `stop_ids` defaults to the ground-truth tokenizer's EOS id; requests may override it.
    `weights_dtype` (convqa.infer.weights_dtype) defaults to the artifact's own; the workflow
    passes its source's, so that the answers compare exactly with the `run` of the same artifact.
    """
    import uvicorn
    from transformers import AutoTokenizer

    from convqa.formats import open_model

    with open_model(artifact_path) as artifact:
        artifact_tokenizer = artifact.tokenizer
    tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer_dir))
    if stop_ids is None:
        stop_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    engine = engine_for("transformers", backend, threads=threads, max_context=max_context, weights_dtype=weights_dtype)
    engine.load(artifact_path)
    state = ServingState(engine, tokenizer, artifact_tokenizer, stop_ids, Path(artifact_path).name)
    sock = bind_socket(host, port)
    print(f"convqa serve: {artifact_path} on http://{host}:{sock.getsockname()[1]}", flush=True)
    server = uvicorn.Server(uvicorn.Config(build_app(state), log_level=log_level))
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()


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
    parser.add_argument("--weights-dtype", choices=WEIGHTS_DTYPES, default=None,
                        help="dtype to build and run the model in (default: the one its own weights are mostly stored in)")
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
        weights_dtype=args.weights_dtype,
    )


if __name__ == "__main__":
    main()
