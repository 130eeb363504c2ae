"""Which recorded run judges which: the reference of every inference row, named in one place.

A run is judged only against runs made on the **same backend**. Two backends run different
kernels (cuBLAS vs torch's CPU GEMM, CUDA vs CPU ggml), which sum in a different order: on a
CUDA device even a perfect lossless conversion cannot reproduce the cpu ground truth bit for bit,
while it must reproduce the gpu ground truth exactly (the same kernels see the same values). So:

- F-INF (an artifact under an engine on a backend) -> the ground truth on that backend:
  transformers over the SafeTensors source, `("st", "transformers", backend)`. llama.cpp cannot
  read SafeTensors, so its runs are held to transformers' ground truth on the same backend with
  llama.cpp's own (cross-engine) tolerance, as on cpu.
- F-INF-REF (a lossy variant's artifact) -> the reference-quantized model of the chain's first
  hop, run by transformers on that backend.
- F-BACKEND-001 (convqa.gates.backend) is the only place two backends meet: the same input
  (the source, or one GGUF under llama.cpp) on gpu against cpu. It judges the backend, never
  the conversion.

The workflow (convqa.workflow.jobs: which runs the gate job reads) and the gates
(convqa.gates.inference, convqa.gates.backend) both ask these functions, so the DAG and the
judgement cannot disagree about what a row was compared with.
"""

from __future__ import annotations

from dataclasses import dataclass

from convqa.workflow.plan import first_hop

SOURCE_CHAIN = "st"
GROUND_TRUTH_ENGINE = "transformers"
REFERENCE_ENGINE = "transformers"  # the reference-quantized model exists only in memory, in torch
CPU, GPU = "cpu", "gpu"


@dataclass(frozen=True)
class RunRef:
    """One recorded run. kind "run": results/.../infer/{engine}-{backend} of `chain`; kind
    "reference": the reference-quantized model of the first hop `chain`."""
    chain: str
    engine: str
    backend: str
    kind: str = "run"

    @property
    def key(self) -> tuple:
        """The key the gates index runs by: (chain, engine, backend) for a run, (hop, backend)
        for a reference model."""
        return (self.chain, self.engine, self.backend) if self.kind == "run" else (self.chain, self.backend)

    def describe(self) -> str:
        if self.kind == "reference":
            return f"the reference-quantized model of {self.chain} ({self.engine}, {self.backend})"
        if is_ground_truth(self.chain, self.engine):
            return f"the ground truth ({self.engine} on {self.backend} over the SafeTensors source)"
        return f"{self.chain} under {self.engine} on {self.backend}"


def is_ground_truth(chain: str, engine: str) -> bool:
    """The SafeTensors source under transformers is the ground truth, on whichever backend."""
    return chain == SOURCE_CHAIN and engine == GROUND_TRUTH_ENGINE


def ground_truth(backend: str) -> RunRef:
    return RunRef(SOURCE_CHAIN, GROUND_TRUTH_ENGINE, backend)


def inference_reference(chain: str, engine: str, backend: str) -> RunRef | None:
    """The run an F-INF row of (chain, engine, backend) is judged against: the ground truth on the
    same backend. None for the ground truth itself (nothing judges it but F-BACKEND-001)."""
    if is_ground_truth(chain, engine):
        return None
    return ground_truth(backend)


def quantized_reference(chain: str, engine: str, backend: str, variant: str, reference_tolerances: dict) -> RunRef | None:
    """The run an F-INF-REF row is judged against: the reference-quantized model of the chain's
    first hop on the same backend. None when the variant (lossless) or the engine has no
    reference tolerance, or for the source itself."""
    if chain == SOURCE_CHAIN or engine not in (reference_tolerances.get(variant) or {}):
        return None
    return RunRef(first_hop(chain), REFERENCE_ENGINE, backend, kind="reference")


def references_of(chain: str, engine: str, backend: str, variant: str, reference_tolerances: dict) -> dict[str, RunRef]:
    """Gate family -> the run it judges (chain, engine, backend) against; `reference_tolerances`
    is config inference.reference_tolerances (variant -> engine -> tolerance)."""
    refs = {"F-INF": inference_reference(chain, engine, backend),
            "F-INF-REF": quantized_reference(chain, engine, backend, variant, reference_tolerances)}
    return {family: ref for family, ref in refs.items() if ref is not None}


def backend_pairs(cells) -> list[tuple[RunRef, RunRef]]:
    """(gpu run, cpu run) pairs F-BACKEND-001 compares, from the (chain, engine, backend) cells of
    a matrix: per engine, runs of one identical input on both backends. transformers: the ground
    truth (the source). llama.cpp, which cannot read the source: each GGUF it runs on both."""
    cells = set(cells)
    pairs = []
    for chain, engine, backend in sorted(cells):
        if backend != GPU or (chain, engine, CPU) not in cells:
            continue
        if engine == GROUND_TRUTH_ENGINE and not is_ground_truth(chain, engine):
            continue  # a converted artifact under transformers is judged by F-INF on each backend
        pairs.append((RunRef(chain, engine, GPU), RunRef(chain, engine, CPU)))
    return pairs
