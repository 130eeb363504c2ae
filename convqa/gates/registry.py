"""The gate registry: every gate ID, in report order, with its family, its specificity and the
function that evaluates it. The report (row order, JUnit suites, the inference section) and the
detection matrix (which failing gate names a bug first) read order and families from here.

- `family`: the report section and JUnit suite (`F-CONV-S-G` -> `F-CONV`). Families are in report
  order: the order of their first gate below.
- `specificity`: the detection matrix names the failing gate with the lowest number first (a
  layout gate names the bug class, an edge gate only says that the values differ); a gate without
  one follows them, inference gates last.
- `verdict`: False for a gate that judges the machine, not the conversion (F-BACKEND-001: gpu
  against cpu). Its rows are shown and counted apart, and never change the verdict
  (convqa.report.evidence.summarize).
- `evaluator`: the dotted name of the function that decides the gate's rows (imported on demand,
  so reading the registry imports no gate code); the gate's ID is written literally in that
  function's module.

This module imports nothing from convqa: the report and the workflow read it without loading the
gates.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Gate:
    id: str
    family: str
    subject: str
    passes_when: str
    evaluator: str
    specificity: int | None = None
    inference: bool = False
    verdict: bool = True

    def evaluating_function(self):
        module, _, name = self.evaluator.rpartition(".")
        return getattr(importlib.import_module(module), name)


_ARTIFACT = "convqa.gates.artifact."
_EDGES = "convqa.gates.edges.check_rows"
_CONTRACTS = "convqa.gates.contracts."
_INFERENCE = "convqa.gates.inference."
_EDGE = "names one-to-one, shapes equal, values equal (bit-exact when lossless, within tolerance when quantized), config and tokenizer carried"
_INF_SUBJECT = "artifact x engine x backend x modality"
_INF = ("inference runs, output non-empty and not garbage, logits match the ground truth run on the same backend "
        "within tolerance (convqa.workflow.references)")
_REF_SUBJECT = "artifact x engine x backend x modality, lossy variants"
_REF = ("logits equal the reference-quantized model's (the source through the reference quantizer of each tensor's stored "
        "encoding) within tolerance: bit for bit under transformers")
_INF_ROWS, _REF_ROWS = _INFERENCE + "inference_rows", _INFERENCE + "reference_rows"

GATES = (
    Gate("G0-INTEGRITY", "G0", "each artifact", "config agrees with tensor shapes: layers, hidden, vocab, heads, kv heads, intermediate, head_dim",
         _ARTIFACT + "integrity", specificity=9),
    Gate("G0-VALIDATE", "G0", "each artifact", "no NaN/Inf, no all-zero weight, embedding < 50% zeros, weights < 80% zeros, 2-D weights vary, norms non-degenerate",
         _ARTIFACT + "validity", specificity=10),
    Gate("F-LAYOUT-001", "F-LAYOUT", "each GGUF", "every ne is the reversed shape the config implies (transposed values are caught, with their diagnosis, by the F-CONV edge gates)",
         _ARTIFACT + "gguf_layout", specificity=0),
    Gate("F-LAYOUT-002", "F-LAYOUT", "each APR", "row-major flag set, column-major flag absent, embedding and lm_head are [vocab, hidden]",
         _ARTIFACT + "apr_layout", specificity=1),
    Gate("F-LAYOUT-003", "F-LAYOUT", "each GGUF", "every 1-D tensor and norm is F32, as llama.cpp's converter writes them and its kernels need (a BF16/F16 norm aborts llama.cpp on the first forward pass)",
         _ARTIFACT + "gguf_f32_tensors", specificity=2),
    Gate("F-CONV-S-G", "F-CONV", "edge", _EDGE, _EDGES, specificity=13),
    Gate("F-CONV-S-A", "F-CONV", "edge", "as F-CONV-S-G, for SafeTensors -> APR", _EDGES, specificity=14),
    Gate("F-CONV-G-A", "F-CONV", "edge", "as F-CONV-S-G, for GGUF -> APR", _EDGES, specificity=15),
    Gate("F-CONV-A-G", "F-CONV", "edge", "as F-CONV-S-G, for APR -> GGUF", _EDGES, specificity=16),
    Gate("F-CONV-G-S", "F-CONV", "edge", "as F-CONV-S-G, for GGUF -> SafeTensors", _EDGES, specificity=17),
    Gate("F-CONV-A-S", "F-CONV", "edge", "as F-CONV-S-G, for APR -> SafeTensors", _EDGES, specificity=18),
    Gate("F-CONV-RT-001", "F-CONV-RT", "round trip", "S->A->G->A equals S->A", _EDGES, specificity=19),
    Gate("F-CONV-RT-002", "F-CONV-RT", "round trip", "S->G->A->G equals S->G", _EDGES, specificity=20),
    Gate("F-CONV-RT-003", "F-CONV-RT", "round trip", "S->G->S and S->A->S equal S", _EDGES, specificity=21),
    Gate("F-CONV-IDEM-001", "F-CONV-IDEM", "repeated conversion", "two independent runs of the same conversion give byte-identical files",
         _EDGES, specificity=7),
    Gate("F-CONV-IDEM-002", "F-CONV-IDEM", "fixpoint", "converting a round-tripped artifact again gives the same bytes as the first conversion",
         _EDGES, specificity=8),
    Gate("F-CONV-COM-001", "F-CONV-COM", "commutativity", "S->A equals S->G->A; G->A equals G->S->A", _EDGES, specificity=22),
    Gate("F-QUANT-001", "F-QUANT", "first hop out of SafeTensors, lossy variants",
         "every tensor the converter quantized is the reference quantizer's output for the source tensor, byte for byte "
         "(the first differing block is named with its scale); an encoding with no byte-reproducible reference is held "
         "to its tolerance and says so",
         "convqa.gates.quantizer.quantizer_rows", specificity=12),
    Gate("F-CONTRACT-OUTPUT", "F-CONTRACT", "each conversion", "the converter writes exactly the requested output path (in the workflow a violation fails the conversion job; the detection run records it as this gate)",
         "convqa.gates.output_contract.conversion_failure_rows", specificity=3),
    Gate("F-CONTRACT-I2", "F-CONTRACT", "each converted artifact", "tensor names are a bijection with the parent's",
         _CONTRACTS + "names_preserved", specificity=4),
    Gate("F-CONTRACT-I3", "F-CONTRACT", "each converted artifact", "no silent dtype fallback: every encoding change is a recorded quantization, dequantization or lossless upcast",
         _CONTRACTS + "dtype_changes_recorded", specificity=6),
    Gate("F-CONTRACT-I4", "F-CONTRACT", "each converted artifact", "mean/std/min/max of every tensor preserved within its encoding's tolerance",
         _CONTRACTS + "statistics_preserved", specificity=11),
    Gate("F-CONTRACT-I5", "F-CONTRACT", "each converted artifact", "tokenizer carried: same tokens, merges, special ids and chat template as the parent",
         _CONTRACTS + "tokenizer_preserved", specificity=5),
    Gate("F-XCONV-001", "F-XCONV", "edge with two converters", "two converters' outputs for the same edge agree tensor by tensor",
         "convqa.gates.cross_converter.xconv_row", specificity=23),
    # F-INF-{format}-{backend}-{modality}: the backends and modalities config/schema.yaml allows.
    Gate("F-INF-st-cpu-run", "F-INF", _INF_SUBJECT, _INF, _INF_ROWS, inference=True),
    Gate("F-INF-st-cpu-chat", "F-INF", _INF_SUBJECT, _INF, _INF_ROWS, inference=True),
    Gate("F-INF-st-gpu-run", "F-INF", _INF_SUBJECT, _INF, _INF_ROWS, inference=True),
    Gate("F-INF-st-gpu-chat", "F-INF", _INF_SUBJECT, _INF, _INF_ROWS, inference=True),
    Gate("F-INF-gguf-cpu-run", "F-INF", _INF_SUBJECT, _INF, _INF_ROWS, inference=True),
    Gate("F-INF-gguf-cpu-chat", "F-INF", _INF_SUBJECT, _INF, _INF_ROWS, inference=True),
    Gate("F-INF-gguf-gpu-run", "F-INF", _INF_SUBJECT, _INF, _INF_ROWS, inference=True),
    Gate("F-INF-gguf-gpu-chat", "F-INF", _INF_SUBJECT, _INF, _INF_ROWS, inference=True),
    Gate("F-INF-apr-cpu-run", "F-INF", _INF_SUBJECT, _INF, _INF_ROWS, inference=True),
    Gate("F-INF-apr-cpu-chat", "F-INF", _INF_SUBJECT, _INF, _INF_ROWS, inference=True),
    Gate("F-INF-apr-gpu-run", "F-INF", _INF_SUBJECT, _INF, _INF_ROWS, inference=True),
    Gate("F-INF-apr-gpu-chat", "F-INF", _INF_SUBJECT, _INF, _INF_ROWS, inference=True),
    # F-INF-REF-{format}-{backend}-{modality}: the reference model runs on the artifact's backend.
    Gate("F-INF-REF-st-cpu-run", "F-INF", _REF_SUBJECT, _REF, _REF_ROWS, inference=True),
    Gate("F-INF-REF-st-cpu-chat", "F-INF", _REF_SUBJECT, _REF, _REF_ROWS, inference=True),
    Gate("F-INF-REF-st-gpu-run", "F-INF", _REF_SUBJECT, _REF, _REF_ROWS, inference=True),
    Gate("F-INF-REF-st-gpu-chat", "F-INF", _REF_SUBJECT, _REF, _REF_ROWS, inference=True),
    Gate("F-INF-REF-gguf-cpu-run", "F-INF", _REF_SUBJECT, _REF, _REF_ROWS, inference=True),
    Gate("F-INF-REF-gguf-cpu-chat", "F-INF", _REF_SUBJECT, _REF, _REF_ROWS, inference=True),
    Gate("F-INF-REF-gguf-gpu-run", "F-INF", _REF_SUBJECT, _REF, _REF_ROWS, inference=True),
    Gate("F-INF-REF-gguf-gpu-chat", "F-INF", _REF_SUBJECT, _REF, _REF_ROWS, inference=True),
    Gate("F-INF-REF-apr-cpu-run", "F-INF", _REF_SUBJECT, _REF, _REF_ROWS, inference=True),
    Gate("F-INF-REF-apr-cpu-chat", "F-INF", _REF_SUBJECT, _REF, _REF_ROWS, inference=True),
    Gate("F-INF-REF-apr-gpu-run", "F-INF", _REF_SUBJECT, _REF, _REF_ROWS, inference=True),
    Gate("F-INF-REF-apr-gpu-chat", "F-INF", _REF_SUBJECT, _REF, _REF_ROWS, inference=True),
    Gate("F-ENGINE-001", "F-ENGINE", "each GGUF", "llama.cpp and transformers agree on the same file within tolerance",
         _INFERENCE + "engine_rows", inference=True),
    # Judges the machine, not the conversion: shown apart, never part of the verdict.
    Gate("F-BACKEND-001", "F-BACKEND", "engine x input run on both backends",
         "the same input under the same engine gives the same logits on gpu as on cpu within the backend tolerance "
         "(config inference.backend_tolerances): transformers on the SafeTensors source, llama.cpp on each GGUF",
         "convqa.gates.backend.backend_rows", inference=True, verdict=False),
    Gate("F-SERVE-001", "F-SERVE", "each served artifact", "the HTTP answer equals the run answer token for token",
         _INFERENCE + "serve_rows", inference=True),
    Gate("F-TOK-001", "F-TOK", "each GGUF (inference chains)",
         "llama.cpp's tokenizer built from the file encodes the fixed corpus (English, code, digits, whitespace runs, "
         "CJK, emoji, accents, every added token, special-token lookalikes) to the source HF tokenizer's ids, "
         "with specials parsed, without and with the specials each side adds",
         "convqa.gates.parity.tokenizer_rows", inference=True),
    Gate("F-CHAT-001", "F-CHAT", "each artifact (inference chains) x renderer",
         "the artifact's chat template renders every fixed conversation (multi-turn, with and without the generation "
         "prompt, a tool call where the template knows tools) to exactly the source's apply_chat_template text: "
         "Jinja2 as transformers renders, and llama-cpp-python's Jinja2ChatFormatter for GGUF; no template where the "
         "source has one fails, neither with one is skipped",
         "convqa.gates.parity.chat_rows", inference=True),
)
REGISTRY = {g.id: g for g in GATES}
# Report order of gate families; a family no gate is registered in follows in name order.
FAMILY_ORDER = tuple(dict.fromkeys(g.family for g in GATES))
# Gate families that describe inference rather than files; they get their own report section.
INFERENCE_FAMILIES = tuple(dict.fromkeys(g.family for g in GATES if g.inference))


def family_of(gate: str) -> str:
    """`F-CONV-S-G` -> `F-CONV`, `F-CONV-RT-001` -> `F-CONV-RT`, `F-INF-gguf-cpu-run` -> `F-INF`.

    An unregistered ID belongs to the longest registered family it extends (`F-CONV-RT-009` ->
    `F-CONV-RT`), else to its first two dash-separated parts."""
    if gate in REGISTRY:
        return REGISTRY[gate].family
    extended = [f for f in FAMILY_ORDER if gate == f or gate.startswith(f + "-")]
    if extended:
        return max(extended, key=len)
    return "-".join(gate.split("-")[:2])


def family_sort_key(family: str) -> tuple:
    return (FAMILY_ORDER.index(family), "") if family in FAMILY_ORDER else (len(FAMILY_ORDER), family)


def is_inference_family(family: str) -> bool:
    return family in INFERENCE_FAMILIES


def is_inference_gate(gate: str) -> bool:
    if gate in REGISTRY:
        return REGISTRY[gate].inference
    return gate.startswith(INFERENCE_FAMILIES)


def counts_toward_verdict(gate: str) -> bool:
    """False for a gate that judges the machine rather than the conversion (F-BACKEND-001)."""
    return REGISTRY[gate].verdict if gate in REGISTRY else True


def specificity(gate: str) -> tuple:
    """Sort key: the most specific diagnosis first, unranked gates after, inference gates last."""
    rank = REGISTRY[gate].specificity if gate in REGISTRY else None
    if rank is not None:
        return (0, rank, gate)
    return (2 if is_inference_gate(gate) else 1, 0, gate)
