"""The bundled real Gemma-3-270M (llama.cpp Q4_K_M: Q4_K, Q6_K, Q5_0, Q8_0, F32), imported G->S.

The ground truth is the assembled GGUF with every quantized tensor dequantized by gguf-py, one
tensor at a time; its SentencePiece tokenizer is carried losslessly (tokenizer.model) and
tokenizes as llama.cpp does; transformers runs the imported model as llama.cpp runs the GGUF.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import quants

from convqa.errors import FormatError
from convqa.formats import open_model
from convqa.formats.spm_tokenizer import tokenizer_from_spm_dir
from convqa.sources import bundled

pytestmark = pytest.mark.slow

NAME = "gemma3-270m-q4-k-m"
# Text where SentencePiece tokenizers go wrong: space runs, newlines, accents, CJK, emoji, code,
# digits, the chat markers and a special-token lookalike.
CORPUS = [
    "Hello world!  Two  spaces,   three.\n\nNew paragraph\ttab",
    "Naïve café résumé, Zürich, 日本語, 中文, 한국어 😀👍",
    "def add(a, b):\n    return a + b  # 1234567890",
    "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n",
    " leading space and trailing space ",
    "<start_of_turn is not a token",
]


@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory) -> Path:
    try:
        return bundled.gguf_path(NAME, tmp_path_factory.mktemp("gemma-gguf"))
    except bundled.MissingBundledModel as exc:
        pytest.skip(str(exc))


_IMPORT = """
import json, sys
from convqa.formats import open_model
def peak_rss():  # VmHWM: this image's own peak (ru_maxrss keeps the forking pytest's across exec)
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
from convqa.sources.prepare import prepare_source
with open_model(sys.argv[1]) as m:  # imports and the GGUF's header: the baseline
    largest = max(m.tensors.values(), key=lambda t: np.prod(t.shape))
    sizes = [int(np.prod(largest.shape)) * 4, largest.encoding.nbytes(largest.shape), sum(int(np.prod(t.shape)) * 4 for t in m),
             sum(t.encoding.nbytes(t.shape) for t in m)]
import torch, transformers.integrations.gguf.gguf_tokenizer_mapping  # what the import loads anyway
base = peak_rss()
provenance = prepare_source({"kind": "bundled", "name": sys.argv[2]}, sys.argv[3])
peak = peak_rss()
print(json.dumps({"base": base, "peak": peak, "sizes": sizes, "provenance": provenance}))
"""


@pytest.fixture(scope="module")
def imported(gemma_gguf, tmp_path_factory) -> dict:
    """prepare_source on the bundled spec, in a child process whose peak RSS is the import's."""
    out = tmp_path_factory.mktemp("gemma") / "source"
    proc = subprocess.run(
        [sys.executable, "-c", "import numpy as np\n" + _IMPORT, str(gemma_gguf), NAME, str(out)],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["dir"] = out
    return result


def test_import_records_the_dequantization_of_every_quant_type(imported):
    record = imported["provenance"]["record"]
    assert Counter(src for _, src, _ in record["dequantized"]) == {"Q5_0": 81, "Q4_K": 27, "Q8_0": 10, "Q6_K": 9}
    assert record["passthrough"] == 109 and record["encodings_written"] == {"F32": 236}
    assert imported["provenance"]["origin"]["sha256"] == bundled.BUNDLED_MODELS[NAME].sha256
    with open_model(imported["dir"]) as s:
        assert s.config.architecture == "gemma3" and s.config.vocab_size == 262144 and s.config.tie_word_embeddings
        assert s.metadata["provenance"]["dequantized"] == {"Q4_K->F32": 27, "Q5_0->F32": 81, "Q6_K->F32": 9, "Q8_0->F32": 10}


def test_imported_tensors_are_gguf_py_dequantized_values(imported, gemma_gguf):
    """Every tensor equals gguf-py's own reading of the file: dequantize(), dims reversed, and
    gemma's stored norm `w + 1` undone (float32, as llama.cpp's converter added it)."""
    reader = gguf.GGUFReader(gemma_gguf)
    stored = {t.name: t for t in reader.tensors}
    with open_model(gemma_gguf) as g, open_model(imported["dir"]) as s:
        assert len(s.tensors) == len(stored) == 236
        for name, tensor in s.tensors.items():
            t = stored[g.tensors[name].stored_name]
            expected = quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
            if name.endswith("norm.weight"):
                expected = expected - np.float32(1.0)
            got = tensor.to_float32()
            assert got.dtype == np.float32 and np.array_equal(got, expected), (name, t.tensor_type.name)


def test_import_streams_one_tensor_at_a_time(imported):
    """Peak RSS above the baseline is the largest tensor (its F32 values and its stored bytes) plus
    the tokenizer's Python objects (256 MiB allowed); holding the model would take all its F32
    values and stored bytes (1265 MiB). Measured: +968 MiB for a 640 + 167 MiB embedding."""
    largest_f32, largest_stored, total_f32, total_stored = imported["sizes"]
    grown = imported["peak"] - imported["base"]
    print(f"import peak RSS {imported['peak'] / 2**20:.0f} MiB, +{grown / 2**20:.0f} MiB over the baseline; "
          f"largest tensor {largest_f32 / 2**20:.0f} MiB F32, model {total_f32 / 2**20:.0f} MiB F32")
    assert total_f32 > 1.0e9
    assert grown < largest_f32 + largest_stored + 256 * 2**20 < total_f32 + total_stored


def test_tokenizer_is_carried_losslessly_and_loads_in_sentencepiece(imported, gemma_gguf):
    import sentencepiece

    with open_model(gemma_gguf) as g:
        source = g.tokenizer
    carried = tokenizer_from_spm_dir(imported["dir"])
    assert carried.model == "llama" and carried.add_space_prefix is False and carried.add_bos_token
    assert carried.fingerprint() == source.fingerprint()
    assert (carried.tokens, carried.scores, carried.token_types) == (source.tokens, source.scores, source.token_types)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(imported["dir"] / "tokenizer.model"))
    assert sp.get_piece_size() == 262144
    assert [sp.id_to_piece(i) for i in (2, 106, 238, 9259)] == [source.tokens[i] for i in (2, 106, 238, 9259)]
    assert sp.get_score(9259) == source.scores[9259] and sp.is_byte(238) and sp.is_control(106)


def test_a_truncated_tokenizer_model_is_refused(imported, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    data = (imported["dir"] / "tokenizer.model").read_bytes()
    (broken / "tokenizer.model").write_bytes(data[: len(data) // 2 + 3])
    with pytest.raises(FormatError, match="not a SentencePiece model: truncated"):
        tokenizer_from_spm_dir(broken)


def test_transformers_tokenizes_as_llama_cpp(imported, gemma_gguf):
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(imported["dir"])
    vocab = Llama(str(gemma_gguf), vocab_only=True, verbose=False)
    for text in CORPUS:
        expected = vocab.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        assert hf(text)["input_ids"] == expected, text
    assert hf.decode(hf("Naïve café 日本語")["input_ids"], skip_special_tokens=True) == "Naïve café 日本語"


def test_transformers_on_the_import_and_llama_cpp_on_the_gguf_agree(imported, gemma_gguf):
    """The same model in two engines: transformers on the dequantized F32 SafeTensors, llama.cpp
    on the Q4_K_M file itself (it quantizes activations for K-quant dot products, so the logits
    are close, not equal); greedy continuations agree on the first tokens."""
    from convqa.infer.engines import capability, engine_for

    ok, reason = capability("llama.cpp", "cpu")
    if not ok:
        pytest.skip(reason)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(imported["dir"])(CORPUS[3])["input_ids"]
    with engine_for("transformers", "cpu").load(imported["dir"]) as engine:
        reference = engine.teacher_forced_logits(ids)
        answer = engine.generate(ids, 6, {1, 106})
    with engine_for("llama.cpp", "cpu").load(gemma_gguf) as engine:
        got = engine.teacher_forced_logits(ids)
        llama_answer = engine.generate(ids, 6, {1, 106})
    assert reference.shape == got.shape == (len(ids), 262144)
    assert np.array_equal(reference.argmax(-1)[-4:], got.argmax(-1)[-4:])
    assert answer[:3] == llama_answer[:3], (answer, llama_answer)
    # A base model (no chat template): it continues the turn by restating the question.
    assert "capital of France" in AutoTokenizer.from_pretrained(imported["dir"]).decode(answer)


def test_tokenizer_and_tensors_survive_s_a_g_and_g_s(imported, tmp_path):
    """S -> A -> G and S -> G -> S on the real model: SentencePiece tokenizer (with Gemma's
    add_space_prefix false) and every tensor come back unchanged."""
    from convqa.compare.tensors import compare_models
    from convqa.convert.builtin import convert

    apr, gguf_file, back = tmp_path / "m.apr", tmp_path / "m.gguf", tmp_path / "st"
    convert(imported["dir"], apr, "apr")
    convert(apr, gguf_file, "gguf")
    convert(gguf_file, back, "safetensors")
    with open_model(imported["dir"]) as s:
        for path in (apr, gguf_file, back):
            with open_model(path) as other:
                assert other.tokenizer.add_space_prefix is False, path
                assert other.tokenizer.fingerprint() == s.tokenizer.fingerprint(), path
                assert other.tokenizer.scores == s.tokenizer.scores, path
                result = compare_models(s, other)
                assert result.tokenizer_differences == {} and result.config_differences == {}, path
                assert all(r.status == "identical" for r in result.tensors), path
