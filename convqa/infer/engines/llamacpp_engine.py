"""The llama.cpp engine (llama-cpp-python), the reference runtime for GGUF files.

Settings follow docs/formats.md GGUF 6: `logits_all=True` (in 0.3.x `eval()` keeps no logits
otherwise), an F32 KV cache (the default F16 cache alone costs ~1e-3 relative), and fixed
threads and batch sizes (batch splitting changes kernel paths and the last bits). Logits are a
pure function of the ids, so the seed only pins what llama.cpp might sample, which greedy never does.
"""

from __future__ import annotations

import time

import numpy as np

from convqa.infer.engines.base import Engine

GGML_TYPE_F32 = 0  # KV cache element type for parity runs
BATCH_SIZE = 512
SEED = 0
ALL_LAYERS_ON_GPU = -1


def gpu_offload_problem(system_info: bytes | str) -> str:
    """Why llama.cpp cannot offload, from its system info: llama_supports_gpu_offload() is false
    both for a CPU-only build (PyPI's sdist builds one unless CMAKE_ARGS says otherwise) and for a
    CUDA build that sees no device (its CUDA backend is listed in the system info, with no GPU)."""
    info = system_info.decode(errors="replace") if isinstance(system_info, bytes) else system_info
    if "CUDA" in info:
        return "no CUDA device visible to llama.cpp (llama-cpp-python is built with CUDA)"
    return "llama-cpp-python was built without GPU offload (make setup-cuda rebuilds it with CUDA)"


def llama_settings(backend: str, threads: int, n_ctx: int) -> dict:
    """Keyword arguments for `llama_cpp.Llama` (and, spelled as flags, for its server)."""
    return {
        "n_ctx": n_ctx,
        "n_batch": BATCH_SIZE,
        "n_ubatch": BATCH_SIZE,
        "n_threads": threads,
        "n_threads_batch": threads,
        "logits_all": True,
        "type_k": GGML_TYPE_F32,
        "type_v": GGML_TYPE_F32,
        "seed": SEED,
        "n_gpu_layers": ALL_LAYERS_ON_GPU if backend == "gpu" else 0,
    }


class LlamaCppEngine(Engine):
    name = "llama.cpp"

    def __init__(self, backend: str = "cpu", threads: int = 2, max_context: int = 512):
        super().__init__(backend=backend, threads=threads, max_context=max_context)
        self.llm = None

    @classmethod
    def capability(cls, backend: str) -> tuple[bool, str]:
        try:
            import llama_cpp
        except ImportError:
            return False, "llama-cpp-python not installed"
        if backend == "gpu" and not llama_cpp.llama_supports_gpu_offload():
            return False, gpu_offload_problem(llama_cpp.llama_print_system_info())
        return True, ""

    def _load(self, artifact_path: str) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=artifact_path,
            verbose=False,
            **llama_settings(self.backend, self.threads, self.max_context),
        )

    def teacher_forced_logits(self, ids: list[int]) -> np.ndarray:
        self._check_prompt(ids)
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(list(ids))
        logits = np.array(self.llm.scores[: self.llm.n_tokens], dtype=np.float32)
        self.timings.prefill_s = time.perf_counter() - start
        self.timings.prefill_tokens = len(ids)
        return logits

    def _last_argmax(self) -> int:
        return int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))

    def generate(self, ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[int]:
        """Argmax decoding, one `eval` per token (llama.cpp's samplers would add penalties)."""
        self._check_prompt(ids, max_new_tokens)
        if max_new_tokens <= 0:
            return []
        self.teacher_forced_logits(ids)
        return self._decode(max_new_tokens, stop_ids)

    def logits_and_generate(self, ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> tuple[np.ndarray, list[int]]:
        """The teacher-forced `eval` of the prompt is the prefill a generation starts from (the
        same call on a reset context): one prefill instead of two."""
        self._check_prompt(ids, max_new_tokens)
        logits = self.teacher_forced_logits(ids)
        return logits, self._decode(max_new_tokens, stop_ids) if max_new_tokens > 0 else []

    def _decode(self, max_new_tokens: int, stop_ids: set[int]) -> list[int]:
        """Greedy tokens after the evaluated prompt: the prompt's last argmax, then one `eval` each."""
        generated = [self._last_argmax()]
        start = time.perf_counter()
        while generated[-1] not in stop_ids and len(generated) < max_new_tokens:
            self.llm.eval(generated[-1:])
            generated.append(self._last_argmax())
        self.timings.decode_s = time.perf_counter() - start
        self.timings.decode_tokens = len(generated) - 1
        return generated

    def detokenize(self, ids: list[int]) -> str:
        """Text of `ids` as llama.cpp spells it (what its server returns), special tokens omitted."""
        return self.llm.detokenize(list(ids), special=False).decode("utf-8", errors="replace")

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None
