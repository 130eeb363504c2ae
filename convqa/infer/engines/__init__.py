"""Inference engines behind one interface: transformers (all formats) and llama.cpp (GGUF).

`engine_for(name, backend)` builds an engine; `capability(name, backend)` says whether it can run
here and, if not, why (the reason a `skipped` gate row carries). Engines import their heavy
libraries (torch, llama_cpp) only when used.
"""

from convqa.infer.engines.base import BACKENDS, ENGINES, Engine, InferenceResult, Timings


def engine_class(engine_name: str) -> type[Engine]:
    if engine_name == "transformers":
        from convqa.infer.engines.transformers_engine import TransformersEngine

        return TransformersEngine
    if engine_name == "llama.cpp":
        from convqa.infer.engines.llamacpp_engine import LlamaCppEngine

        return LlamaCppEngine
    raise ValueError(f"unknown engine {engine_name!r}; expected one of {ENGINES}")


def capability(engine_name: str, backend: str) -> tuple[bool, str]:
    """(available, reason) for an engine x backend pair; the reason feeds a `skipped` gate row."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    return engine_class(engine_name).capability(backend)


def engine_for(engine_name: str, backend: str = "cpu", **options) -> Engine:
    """A fresh, unloaded engine; raises RuntimeError with the reason when the pair is unavailable."""
    return engine_class(engine_name)(backend=backend, **options)


__all__ = ["BACKENDS", "ENGINES", "Engine", "InferenceResult", "Timings", "capability", "engine_class", "engine_for"]
