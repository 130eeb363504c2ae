"""The real model: SmolLM2-135M-Instruct (llama, tied, 30 layers), imported from its llama.cpp GGUF.

The ground truth is the bundled Q4_1 GGUF imported G->S (dequantized to F32, recorded). Every
round trip from there must be bit-exact, and the consumers must agree on the converted files.
"""

from __future__ import annotations

import numpy as np
import pytest

from convqa.compare.tensors import compare_models
from convqa.convert.builtin import convert
from convqa.infer.engines import capability, engine_for
from convqa.formats import open_model

pytestmark = pytest.mark.slow

# "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n" with SmolLM2's tokenizer.
PROMPT = "<|im_start|>user\nWrite a Python function that adds two numbers.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def chains(smollm2_st, tmp_path_factory):
    work = tmp_path_factory.mktemp("smollm2-chains")
    paths = {"st": smollm2_st}
    for chain in ("st-gguf", "st-apr", "st-gguf-st", "st-apr-st", "st-gguf-apr", "st-gguf-apr-gguf", "st-apr-gguf", "st-apr-gguf-apr"):
        parent, hop = chain.rsplit("-", 1)
        fmt = {"st": "safetensors", "gguf": "gguf", "apr": "apr"}[hop]
        paths[chain] = work / (chain + {"safetensors": "", "gguf": ".gguf", "apr": ".apr"}[fmt])
        convert(paths[parent], paths[chain], fmt)
    return paths


def test_import_records_the_dequantization(smollm2_gguf, smollm2_st):
    with open_model(smollm2_gguf) as g, open_model(smollm2_st) as s:
        assert len(g.tensors) == len(s.tensors) == 272
        assert s.config.tie_word_embeddings and s.config.num_layers == 30 and s.config.rope_theta == 100000.0
        assert {t.encoding.name for t in s} == {"F32"}
        assert s.metadata["provenance"]["dequantized"] == {"Q4_1->F32": 210, "Q8_0->F32": 1}
        result = compare_models(g, s)
        assert all(r.max_abs == 0.0 for r in result.tensors)  # dequantization is exact, values unchanged
        assert result.tokenizer_differences == {}


@pytest.mark.parametrize("subject,reference", [
    ("st-gguf-st", "st"), ("st-apr-st", "st"), ("st-gguf-apr-gguf", "st-gguf"), ("st-apr-gguf-apr", "st-apr"), ("st-gguf-apr", "st-apr"),
])
def test_round_trips_bit_exact(chains, subject, reference):
    with open_model(chains[reference]) as a, open_model(chains[subject]) as b:
        result = compare_models(a, b)
    assert len(result.tensors) == 272
    assert all(r.status == "identical" for r in result.tensors), [r for r in result.tensors if r.status != "identical"][:2]
    assert result.config_differences == {} and result.tokenizer_differences == {}


def test_consumers_agree_on_converted_files(chains):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(chains["st"])(PROMPT)["input_ids"]
    assert 10 < len(ids) < 64
    with engine_for("transformers", "cpu").load(chains["st"]) as engine:
        reference = engine.teacher_forced_logits(ids)
    for name in ("st-gguf", "st-apr"):
        with engine_for("transformers", "cpu").load(chains[name]) as engine:
            got = engine.teacher_forced_logits(ids)
        assert np.array_equal(got, reference), name
    ok, reason = capability("llama.cpp", "cpu")
    if not ok:
        pytest.skip(reason)
    with engine_for("llama.cpp", "cpu").load(chains["st-gguf"]) as engine:
        got = engine.teacher_forced_logits(ids)
    rel = np.abs(got - reference).max() / np.abs(reference).max()
    assert rel < 1e-5, rel
