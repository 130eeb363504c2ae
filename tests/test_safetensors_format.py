"""SafeTensors reader/writer and the HF config mapping: strictness, bit-exact round trips, HF loading."""

from __future__ import annotations

import json
import shutil
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open

from convqa import encodings
from convqa.arch import expected_tensors
from convqa.arch.hf_config import config_from_hf, hf_config_from
from convqa.errors import ConversionError, FormatError
from convqa.formats.safetensors import INDEX_FILE, read_header, read_safetensors, write_safetensors
from convqa.model import LazyTensor, WritePlan
from convqa.sources.synthetic import build_preset
from tinymodel import tiny_config, tiny_plan, tiny_values

CONFIG = tiny_config("qwen2", preset="q8-narrow", layers=1, rope_theta=1e6, rms_norm_eps=1e-6)


def _file(tmp_path, header: dict, data: bytes = b"", *, raw_header: bytes | None = None, name="x.safetensors"):
    body = raw_header if raw_header is not None else json.dumps(header).encode()
    path = tmp_path / name
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def _valid_header():
    return {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]},
    }


def test_valid_header_parses_like_the_reference_library(tmp_path):
    path = _file(tmp_path, _valid_header(), np.arange(4, dtype="<f4").tobytes() + b"\x80\x3f" * 3)
    header = read_header(path)
    assert [e.name for e in header.entries] == ["a", "b"]
    assert header.metadata == {"format": "pt"}
    with safe_open(path, framework="pt") as fh:
        assert sorted(fh.keys()) == ["a", "b"]
        assert fh.get_tensor("b").tolist() == [1.0, 1.0, 1.0]


def _mutate(header, **changes):
    header = json.loads(json.dumps(header))
    for key, value in changes.items():
        name, field = key.split("__")
        header[name][field] = value
    return header


BAD_HEADERS = {
    "unknown dtype": (_mutate(_valid_header(), b__dtype="Q9"), "b.dtype"),
    "integer dtype": (_mutate(_valid_header(), b__dtype="I16"), "b.dtype"),
    "shape/size mismatch": (_mutate(_valid_header(), a__shape=[2, 3]), "a.data_offsets"),
    "overlap": (_mutate(_valid_header(), b__data_offsets=[14, 20], b__shape=[3]), "b.data_offsets"),
    "gap": (_mutate(_valid_header(), b__data_offsets=[18, 24]), "b.data_offsets"),
    "out of range": (_mutate(_valid_header(), b__data_offsets=[16, 28], b__shape=[6]), "data_offsets"),
    "negative dim": (_mutate(_valid_header(), a__shape=[-2, -2]), "a.shape"),
    "reversed offsets": (_mutate(_valid_header(), a__data_offsets=[16, 0]), "a.data_offsets"),
    "metadata not strings": ({**_valid_header(), "__metadata__": {"format": 1}}, "__metadata__"),
    "extra key": (_mutate(_valid_header(), a__extra=1), "a"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_bad_headers_raise_format_error_naming_the_field(tmp_path, case):
    header, field = BAD_HEADERS[case]
    path = _file(tmp_path, header, bytes(22))
    with pytest.raises(FormatError) as err:
        read_header(path)
    assert err.value.field == field
    assert str(path) in str(err.value)
    # I16 is valid safetensors (just not a weight we carry); the library ignores unknown keys.
    if case not in ("integer dtype", "extra key"):
        with pytest.raises(Exception):
            with safe_open(path, framework="pt") as fh:
                [fh.get_tensor(k) for k in fh.keys()]


@pytest.mark.parametrize(
    "blob, field",
    [
        (b"\x01\x02\x03", "header_length"),  # truncated before the length is complete
        (struct.pack("<Q", 1000) + b"{}", "header_length"),  # length past the end
        (struct.pack("<Q", 0), "header_length"),
        (struct.pack("<Q", 2**63) + b"{}", "header_length"),
        (struct.pack("<Q", 5) + b"{abc}", "header"),  # not JSON
        (struct.pack("<Q", 2) + b"[]", "header"),  # not an object
        (struct.pack("<Q", 4) + b"\xff{}}", "header"),  # not UTF-8
        (struct.pack("<Q", 16) + b'{"a":1, "a":1}  ', "header"),  # duplicate key
        (struct.pack("<Q", 2) + b"{}" + b"junk", "data_offsets"),  # trailing bytes
    ],
)
def test_malformed_files_raise_format_error(tmp_path, blob, field):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    with pytest.raises(FormatError) as err:
        read_header(path)
    assert err.value.field == field
    assert err.value.offset is not None


def test_truncated_data_region_reports_offset(tmp_path):
    path = _file(tmp_path, _valid_header(), bytes(20))
    with pytest.raises(FormatError, match="truncated") as err:
        read_header(path)
    assert err.value.offset == 8 + len(json.dumps(_valid_header()).encode()) + 20


def _plan(encoding, seed=0, config=CONFIG):
    values = tiny_values(config, np.random.default_rng(seed))
    return tiny_plan(config, values, encoding, metadata={"converter": "test", "n": 1})


@pytest.mark.parametrize("encoding", [encodings.F32, encodings.F16, encodings.BF16])
def test_write_read_round_trip_is_bit_exact(tmp_path, encoding):
    plan = _plan(encoding)
    out = tmp_path / "model"
    write_safetensors(out, plan)
    with read_safetensors(out) as model:
        assert model.config == CONFIG
        assert list(model.tensors) == [t.name for t in plan.tensors]
        for tensor in plan.tensors:
            got = model.tensors[tensor.name]
            assert got.encoding == encoding and got.shape == tensor.shape
            assert got.sha256() == tensor.sha256()
        assert model.metadata["provenance"] == {"converter": "test", "n": 1}
    torch_dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[encoding.name]
    with safe_open(out / "model.safetensors", framework="pt") as fh:
        assert fh.metadata()["format"] == "pt"
        for tensor in plan.tensors:
            loaded = fh.get_tensor(tensor.name)
            assert loaded.dtype == torch_dtype
            assert loaded.float().numpy().tobytes() == tensor.to_float32().tobytes()


def test_sharded_write_and_read(tmp_path):
    plan = _plan(encodings.F32, seed=1)
    out = tmp_path / "sharded"
    write_safetensors(out, plan, max_shard_bytes=10_000)
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in plan.tensors)
    with read_safetensors(out) as model:
        assert model.metadata["shards"] == shards
        assert {n: t.sha256() for n, t in model.tensors.items()} == {t.name: t.sha256() for t in plan.tensors}
    for shard in shards:
        with safe_open(out / shard, framework="np") as fh:
            assert all(index["weight_map"][k] == shard for k in fh.keys())


def test_sharded_index_errors(tmp_path):
    out = tmp_path / "sharded"
    write_safetensors(out, _plan(encodings.F32), max_shard_bytes=10_000)
    index_path = out / INDEX_FILE
    index = json.loads(index_path.read_text())
    for bad, message in [
        ({**index["weight_map"], "model.norm.weight": "../escape.safetensors"}, "not a .safetensors file in this directory"),
        ({**index["weight_map"], "ghost.weight": index["weight_map"]["model.norm.weight"]}, "in no shard"),
        ({k: v for k, v in index["weight_map"].items() if k != "model.norm.weight"}, "not listed"),
        ({**index["weight_map"], "model.norm.weight": "model-00009-of-00009.safetensors"}, "does not exist"),
    ]:
        index_path.write_text(json.dumps({**index, "weight_map": bad}))
        with pytest.raises(FormatError, match=message):
            read_safetensors(out)


def test_writer_refuses_quantized_tensors(tmp_path):
    plan = _plan(encodings.F32)
    q = plan.tensors[1]
    plan.tensors[1] = LazyTensor(q.name, q.shape, encodings.Q8_0, lambda: encodings.Q8_0.encode(q.to_float32()))
    with pytest.raises(ConversionError, match="Q8_0"):
        write_safetensors(tmp_path / "q", plan)
    assert not (tmp_path / "q").exists()  # atomic: nothing left behind
    assert not list(tmp_path.iterdir())


def test_tied_lm_head_dropped_only_when_identical(tmp_path):
    out = tmp_path / "tied"
    plan = _plan(encodings.F32)
    write_safetensors(out, plan)
    cfg = json.loads((out / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="differs from model.embed_tokens.weight"):
        read_safetensors(out)

    emb = next(t for t in plan.tensors if t.name == "model.embed_tokens.weight")
    plan.tensors = [LazyTensor(t.name, t.shape, t.encoding, emb.load_raw) if t.name == "lm_head.weight" else t for t in plan.tensors]
    write_safetensors(out, plan)
    (out / "config.json").write_text(json.dumps(cfg))
    with read_safetensors(out) as model:
        assert "lm_head.weight" not in model.tensors
        assert model.metadata["dropped"][0]["name"] == "lm_head.weight"


def test_single_file_path_and_missing_config(tmp_path):
    out = tmp_path / "m"
    write_safetensors(out, _plan(encodings.F16))
    with read_safetensors(out / "model.safetensors") as model:
        assert len(model.tensors) == len(expected_tensors(CONFIG))
    (out / "config.json").unlink()
    with pytest.raises(FormatError, match="config.json"):
        read_safetensors(out)


# ---- HF config mapping ----


def test_config_round_trip_through_hf_dict():
    for config in (CONFIG, CONFIG.replace(architecture="llama", tie_word_embeddings=True, rope_theta=1e5, rms_norm_eps=1e-5)):
        assert config_from_hf(hf_config_from(config, None), "config.json") == config


def test_legacy_rope_theta_and_transformers_defaults():
    base = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 100,
    }
    legacy = config_from_hf({**base, "rope_theta": 100000.0, "rope_scaling": None}, "c.json")
    assert legacy.rope_theta == 1e5 and legacy.num_kv_heads == 4 and legacy.head_dim == 16
    assert legacy.max_position_embeddings == 2048 and legacy.tie_word_embeddings is False
    assert config_from_hf(base, "c.json").rope_theta == 10000.0
    # Qwen2Config's own default for an absent num_key_value_heads is 32, whatever the head count.
    qwen = {**base, "model_type": "qwen2", "num_attention_heads": 32, "hidden_size": 512}
    assert config_from_hf(qwen, "c.json").num_kv_heads == 32


@pytest.mark.parametrize(
    "change, field",
    [
        ({"hidden_size": None}, "hidden_size"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_parameters"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"model_type": "gpt2"}, "model_type"),
        ({"architectures": ["FalconForCausalLM"]}, "architectures"),
        ({"architectures": ["MistralForCausalLM"]}, "model_type"),  # supported, but not what model_type llama says
        ({"rope_theta": 1e4, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}, "rope_theta"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"sliding_window": 4096}, "sliding_window"),
        ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
        ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quantization_config"),
        ({"torch_dtype": "float8_e4m3fn"}, "torch_dtype"),
        ({"torch_dtype": "bfloat16", "dtype": "float16"}, "dtype"),
    ],
)
def test_config_errors(change, field):
    hf = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 100,
    }
    hf.update(change)
    hf = {k: v for k, v in hf.items() if v is not None}
    with pytest.raises(FormatError) as err:
        config_from_hf(hf, "dir/config.json")
    assert err.value.field == field
    assert "dir/config.json" in str(err.value)


def test_transformers_4_and_5_dialects_of_one_model_read_the_same(tmp_path):
    """The hub-4.x preset rewrites transformers 5's config.json the way 4.44 wrote Qwen2.5's."""
    import json

    hub = build_preset(tmp_path / "hub", "qwen2.5-tiny-bf16")
    new = build_preset(tmp_path / "new", "qwen2.5-tiny-bf16", checkpoint="transformers-5")
    old_hf, new_hf = (json.loads((d / "config.json").read_text()) for d in (hub, new))
    assert "rope_theta" in old_hf and "torch_dtype" in old_hf and "rope_parameters" not in old_hf and "dtype" not in old_hf
    assert old_hf["sliding_window"] is not None and old_hf["use_sliding_window"] is False
    assert "rope_parameters" in new_hf and "dtype" in new_hf and "torch_dtype" not in new_hf
    assert config_from_hf(old_hf, hub / "config.json") == config_from_hf(new_hf, new / "config.json")
    assert config_from_hf(old_hf, hub / "config.json").rope_theta == 1e6
    with pytest.raises(FormatError, match="use_sliding_window is true") as err:
        config_from_hf({**old_hf, "use_sliding_window": True}, hub / "config.json")
    assert err.value.field == "use_sliding_window"


# ---- against transformers ----


@pytest.mark.parametrize("preset, dtype, shard", [("qwen2-tiny", "float32", False), ("llama-tiny-tied", "bfloat16", True)])
def test_written_directory_loads_in_transformers_with_identical_logits(tmp_path, preset, dtype, shard):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = build_preset(tmp_path / "source", preset, dtype=dtype)
    out = tmp_path / "written"
    with read_safetensors(source) as model:
        plan = WritePlan(config=model.config, tokenizer=model.tokenizer, tensors=list(model), metadata={"converter": "test"})
        write_safetensors(out, plan, max_shard_bytes=40_000 if shard else 2**31)
    assert (out / INDEX_FILE).exists() == shard

    ids = AutoTokenizer.from_pretrained(source)("def f(x):\n    return 3333 * x  # naïve")["input_ids"]
    assert ids == AutoTokenizer.from_pretrained(out)(("def f(x):\n    return 3333 * x  # naïve"))["input_ids"]
    logits = []
    for directory in (source, out):
        model = AutoModelForCausalLM.from_pretrained(directory).eval()
        assert str(model.dtype) == f"torch.{dtype}"
        with torch.no_grad():
            logits.append(model(torch.tensor([ids])).logits)
    assert torch.equal(logits[0], logits[1])

    # A dropped q/k/v bias or a reset norm must change the logits (the test can fail).
    with read_safetensors(out) as model:
        broken = tmp_path / "broken"
        victim = "model.layers.0.input_layernorm.weight"
        ones = LazyTensor(
            victim,
            model.tensors[victim].shape,
            model.tensors[victim].encoding,
            lambda: model.tensors[victim].encoding.encode(np.ones(model.tensors[victim].shape, np.float32)),
        )
        tensors = [ones if t.name == victim else t for t in model]
        write_safetensors(broken, WritePlan(model.config, model.tokenizer, tensors))
    with torch.no_grad():
        changed = AutoModelForCausalLM.from_pretrained(broken).eval()(torch.tensor([ids])).logits
    assert not torch.equal(changed, logits[0])
    shutil.rmtree(broken)
