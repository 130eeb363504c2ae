"""The one interface every inference engine implements, and what a run of it produces.

An engine loads one artifact and answers two questions about a list of token ids: the logits of
a teacher-forced forward pass, and the greedy continuation. Both are deterministic (fixed seed,
fixed thread count, float32), so two runs of the same engine on the same file give the same
numbers and a difference between artifacts is the artifacts' doing.

Token ids always come from the ground-truth tokenizer, never from a tokenizer an engine rebuilds
from the file (docs/formats.md GGUF 5: transformers' GGUF tokenizer prepends a BOS the file
does not ask for), so tokenization and model parity are measured separately.
"""

from __future__ import annotations

import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

# OpenMP threads that busy-wait between parallel regions starve everything else on a small
# machine: with torch and llama.cpp (two OpenMP runtimes) in one process on 2 cores, llama.cpp ran
# 10-40x slower (0.12 s -> 1.5-5 s for 16 tokens of SmolLM2) and torch's small forwards ~10x
# slower. Sleeping waiters cost nothing measurable here. The runtimes read this once, when they
# load, so it is set before either library is imported (a user's own setting wins).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ENGINES = ("transformers", "llama.cpp")
BACKENDS = ("cpu", "gpu")
DEFAULT_THREADS = 2


@dataclass
class Timings:
    """Wall-clock measurements of one engine: load, and the latest prefill and decode."""

    load_s: float = 0.0
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "load_s": self.load_s,
            "prefill_tokens": self.prefill_tokens,
            "prefill_s": self.prefill_s,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_tokens": self.decode_tokens,
            "decode_s": self.decode_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
        }


@dataclass
class InferenceResult:
    """One prompt through one engine: teacher-forced logits and greedy continuation."""

    prompt_id: str
    engine: str
    backend: str
    ids: list[int]  # the prompt, as given
    logits: np.ndarray  # float32 (len(ids), vocab), teacher-forced
    generated_ids: list[int]  # greedy continuation; ends with the stop id when one was produced
    timings: Timings = field(default_factory=Timings)

    def as_row(self) -> dict:
        """JSON-safe summary (the logits array is stored separately, it is too big for a row)."""
        return {
            "prompt_id": self.prompt_id,
            "engine": self.engine,
            "backend": self.backend,
            "n_prompt_tokens": len(self.ids),
            "ids": list(self.ids),
            "logits_shape": list(self.logits.shape),
            "generated_ids": list(self.generated_ids),
            **self.timings.as_dict(),
        }


class Engine(ABC):
    """An inference engine bound to one backend; load one artifact, then query it."""

    name: ClassVar[str]

    def __init__(self, backend: str = "cpu", threads: int = DEFAULT_THREADS, max_context: int = 512):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        available, reason = self.capability(backend)
        if not available:
            raise RuntimeError(f"{self.name} cannot run on {backend}: {reason}")
        self.backend = backend
        self.threads = threads
        self.max_context = max_context
        self.timings = Timings()
        self.artifact_path: str | None = None

    @classmethod
    @abstractmethod
    def capability(cls, backend: str) -> tuple[bool, str]:
        """(available, reason): whether this engine can run on `backend` on this machine."""

    @abstractmethod
    def _load(self, artifact_path: str) -> None: ...

    @abstractmethod
    def teacher_forced_logits(self, ids: list[int]) -> np.ndarray:
        """float32 (len(ids), vocab): logits at every position of one forward pass over `ids`."""

    @abstractmethod
    def generate(self, ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
        """Greedy continuation of `ids`: at each step the argmax token; stops after a stop id."""

    @abstractmethod
    def close(self) -> None: ...

    def load(self, artifact_path: str | os.PathLike) -> "Engine":
        start = time.perf_counter()
        self._load(os.fspath(artifact_path))
        self.timings.load_s = time.perf_counter() - start
        self.artifact_path = os.fspath(artifact_path)
        return self

    def logits_and_generate(self, ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> tuple[np.ndarray, list[int]]:
        """`teacher_forced_logits(ids)` and `generate(ids, ...)`, the same numbers. An engine
        whose teacher-forced pass leaves the state a generation continues from overrides this
        with one prefill instead of two."""
        return self.teacher_forced_logits(ids), self.generate(ids, max_new_tokens, stop_ids)

    def run(self, prompt_id: str, ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> InferenceResult:
        """Both queries for one prompt, with the timings of this prompt's prefill and decode."""
        logits, generated = self.logits_and_generate(ids, max_new_tokens, stop_ids)
        return InferenceResult(
            prompt_id=prompt_id,
            engine=self.name,
            backend=self.backend,
            ids=list(ids),
            logits=logits,
            generated_ids=generated,
            timings=Timings(**vars(self.timings)),
        )

    def _check_prompt(self, ids: list[int], max_new_tokens: int = 0) -> None:
        if not ids:
            raise ValueError("an empty prompt has no logits; give at least one token id")
        if len(ids) + max_new_tokens > self.max_context:
            raise ValueError(
                f"prompt of {len(ids)} tokens + {max_new_tokens} new tokens exceeds max_context={self.max_context}"
            )

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
