"""Inference engines behind one interface: transformers (all formats) and llama.cpp (GGUF).

`engine_for(name, backend)` builds an engine; `capability(name, backend)` says whether it can run
here and, if not, why (the reason a `skipped` gate row carries). Engines import their heavy
libraries (torch, llama_cpp) only when used.
"""

from convqa.infer.engines.base import BACKENDS, ENGINES, Engine, InferenceResult, Timings, capability, engine_for

__all__ = ["BACKENDS", "ENGINES", "Engine", "InferenceResult", "Timings", "capability", "engine_for"]
